"""The ``population`` section of ``python -m gompertz_kd.bench``: what one teacher pass saves.

A population step (:class:`~gompertz_kd.population.PopulationModule`: the teacher once, then every
member's student, terms, one backward of the summed losses and one SGD step) is timed side by side
with the single-run step of each of its members (each running its own teacher), round-robin;
the ratio *population step / sum of the members' single steps* is taken within each round.
Members come from a ``conf/population`` config (each built as a training run builds it), cycled
with seed replicas up to the size asked (K = 18 from the six-member paper table is each member
three times). Peak memory per extra member: (population peak - one member's single-step peak)
/ (K - 1).

Beside it, the same population with its fused members (``PopulationModule(fuse=True)``: the
students of one architecture as one network, :mod:`gompertz_kd.fused`; members with gradient
matching stay looped) is timed in the same rounds; *fused / looped* is taken within each round.
With ``--compile`` (cases marked ``compiled``, or every ``--population`` size), the looped
population's whole forward compiled as one graph (``compile=step``,
:meth:`~gompertz_kd.population.PopulationModule.compile_step`) is timed in the same rounds too;
*compiled / looped* is taken within each round, and its compile time is a note.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from hydra import compose, initialize_config_dir
from torch import Tensor

from gompertz_kd.config import CONFIG_DIR
from gompertz_kd.module import DistillationModule
from gompertz_kd.objectives import Need
from gompertz_kd.population import PopulationModule, member_names
from gompertz_kd.run_parts import build_objective

__all__ = [
    "POPULATION_CASES",
    "compiled_ratio_name",
    "fused_ratio_name",
    "PopulationCase",
    "PopulationRow",
    "population_rows",
    "population_table",
]

# model options a member's config sets that change what a step computes
MEMBER_MODEL_OPTIONS = ("gm_every", "gm_precision", "teacher_precision", "fold_teacher_bn")


@dataclass(frozen=True)
class PopulationCase:
    """A pair, the population config its members come from, the sizes K to time and the target
    ratio (population step / sum of single steps) at the largest K compared with single runs."""

    teacher: str
    student: str
    num_classes: int
    population: str
    sizes: tuple[int, ...]
    target: float | None = None
    # with --compile, also time the population's step compiled as one graph (compile=step)
    compiled: bool = False
    # the experiment the members are composed in (its model options: gm_every, precisions);
    # None: the defaults (gradient matching on every step)
    experiment: str | None = None


# What `make bench` times: the paper's table as one population; the same pair with KD-only
# members (four schedules and two replicas: what sharing the teacher saves when no member has
# gradient matching's per-student double backward); and the CPU schedule comparison, also
# compiled (on the CPU the small pair's graph compiles in about a minute, the paper pair's in many).
POPULATION_CASES = (
    PopulationCase("ResNet50", "MobileNetV2", 100, "paper_table", (6,), target=0.25),
    PopulationCase("ResNet50", "MobileNetV2", 100, "schedules_kd", (6,)),
    PopulationCase("resnet20", "resnet8", 10, "schedules_kd", (4,), target=0.8, compiled=True),
)


@dataclass
class PopulationRow:
    pair: str
    population: str
    members: list[str]
    result: Any  # bench.Result of the population step
    singles: float | None  # median over rounds of the summed single steps (s), None if not run
    ratio: tuple[float, float, float] | None  # population / singles, per round
    single_peak: Any = None  # bench.Result of the first member's single step (memory)
    target: float | None = None
    notes: list[str] = field(default_factory=list)
    fused: Any = None  # bench.Result of the population step with fused members, None if none fuse
    fused_members: list[str] = field(default_factory=list)
    fused_ratio: tuple[float, float, float] | None = None  # fused / looped step, per round
    student: str = ""
    compiled: Any = None  # bench.Result of the compiled (compile=step) population step, or None
    compiled_ratio: tuple[float, float, float] | None = None  # compiled / looped, per round

    @property
    def fused_ratio_name(self) -> str:
        return fused_ratio_name(self.student, len(self.members))

    @property
    def compiled_ratio_name(self) -> str:
        return compiled_ratio_name(self.student, len(self.members))


def fused_ratio_name(student: str, size: int) -> str:
    """The name a fused / looped population ratio is stated under (and its target reads)."""
    return f"fused / looped population step, K = {size} {student} members"


def compiled_ratio_name(student: str, size: int) -> str:
    """The name a compiled / looped (eager) population ratio is stated under."""
    return f"compiled (compile=step) / eager population step, K = {size} {student} members"


class PopulationLoop:
    """The population's training step without Lightning: one batch, every member's weights from
    the schedule, the teacher once, every member's losses, one backward, one SGD step."""

    def __init__(self, setup, population: PopulationModule, batches) -> None:
        self.setup = setup
        self.population = population
        self.optimizer = population.configure_optimizers()["optimizer"]
        self.batches = batches
        self.step_index = 0
        self.last_total: Tensor | None = None

    def __call__(self) -> None:
        images, targets, *rest = next(self.batches)
        indices = rest[0] if rest else None
        members = self.population.members
        for member in members.values():
            member.set_progress((self.step_index % 1000) / 1000)
        self.optimizer.zero_grad(set_to_none=True)
        with self.setup.autocast():
            if self.population._compiled_step is not None:  # compile=step: one graph
                _, weighted = self.population._compiled_losses(images, targets, indices)
                total = sum(weighted.values())
            else:
                losses = self.population.member_losses(images, targets, self.step_index, indices)
                total = sum(members[n].weighted_total(t) for n, (_, t, _) in losses.items())
        total.backward()
        self.optimizer.step()
        self.last_total = total.detach()
        self.step_index += 1


def member_specs(
    population: str, size: int, experiment: str | None = None
) -> list[tuple[str, Any]]:
    """``(name, composed config)`` of ``size`` members of ``conf/population/<population>``
    (composed in ``experiment`` when given, as a run of it composes them): its members in order,
    then again as seed replicas. K = 1 is the first member with terms."""
    base = [] if experiment is None else [f"experiment={experiment}"]
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", overrides=[*base, f"population={population}"])
        specs = member_names(cfg.population)
        composed = {
            name: compose("train", overrides=[*base, *overrides])
            for name, (overrides, _) in specs.items()
        }
    names = list(composed)
    if size == 1:
        names = [next(n for n in names if build_objective(composed[n]).terms)]
    out = []
    for replica, name in itertools.islice(((r, n) for r in itertools.count() for n in names), size):
        out.append((name if replica == 0 else f"{name}_r{replica}", composed[name]))
    return out


def population_rows(
    setup,
    case: PopulationCase,
    sizes: Sequence[int],
    repeats: int,
    warmup: int,
    num_train_samples: int,
    memory: list,
    compare: bool = True,
    compile_too: bool = False,
) -> list[PopulationRow]:
    """Time the population of each size against its members' single steps (``compare``), fused,
    and (``compile_too``, where no member's term blocks it) compiled as one graph."""
    from gompertz_kd.bench import harness as bench  # Case, PlainLoop, timed, run_round_robin

    rows = []
    for size in sizes:
        specs = member_specs(case.population, size, case.experiment)
        modules: dict[str, DistillationModule] = {}
        for name, cfg in specs:
            options = {key: cfg.model[key] for key in MEMBER_MODEL_OPTIONS}
            modules[name] = setup.module(
                objective=build_objective(cfg), num_train_samples=num_train_samples, **options
            )
        with_indices = any(Need.INDICES in m.objective.needs for m in modules.values())
        # members with gradient matching every k steps: each timed sample is whole k-step cycles
        # starting on a due step (one step at a time would time the off-beat steps only)
        cycle = max((int(m.gm_every) for m in modules.values() if m.gm_due(None)), default=1)
        cases = []
        singles: dict[str, Callable[[], None]] = {}
        if compare:
            for name, module in modules.items():
                singles[name] = bench.PlainLoop(setup, module)
                cases.append(
                    bench.Case(
                        f"single {name}",
                        bench.timed(singles[name], setup.device, cycle),
                        setup.batch,
                        steps=cycle,
                    )
                )
        # the members' own modules serve the population too: its step trains the same weights
        population = PopulationModule(modules, fuse=False)
        loop = PopulationLoop(
            setup, population, bench._forever(setup.tensor_loader(with_indices=with_indices))
        )
        label = f"population K={size}"
        cases.append(
            bench.Case(
                label, bench.timed(loop, setup.device, cycle), setup.batch, steps=cycle, memory=loop
            )
        )
        # and the same members fused (those of one architecture without gradient matching)
        fused_population = PopulationModule(modules, fuse=True)
        fused_loop, fused_label, refused = None, f"fused population K={size}", None
        if fused_population.fusion_groups():
            images = next(iter(setup.tensor_loader(with_indices=with_indices)))[0]
            try:  # decided here, on one batch, rather than inside the first timed step
                fused_population.fused_groups(images)
            except ValueError as error:
                refused = str(error)
        if fused_population.fusion_groups() and refused is None:
            fused_loop = PopulationLoop(
                setup,
                fused_population,
                bench._forever(setup.tensor_loader(with_indices=with_indices)),
            )
            cases.append(
                bench.Case(
                    fused_label,
                    bench.timed(fused_loop, setup.device, cycle),
                    setup.batch,
                    steps=cycle,
                    memory=fused_loop,
                )
            )
        # and the looped members' whole forward compiled as one graph (compile=step)
        compiled_loop, compiled_label, compile_note = None, f"compiled population K={size}", None
        blocked = [
            name
            for name, module in modules.items()
            for need in (Need.INPUT_GRAD, Need.PROGRESS)
            if module.objective.names_needing(need)
        ]
        if compile_too and blocked:
            compile_note = f"not compiled: members {sorted(set(blocked))} cannot take compile=step"
        elif compile_too:
            compiled_population = PopulationModule(modules, fuse=False)
            compiled_population.compile_step()
            compiled_loop = PopulationLoop(
                setup,
                compiled_population,
                bench._forever(setup.tensor_loader(with_indices=with_indices)),
            )
            start = time.perf_counter()
            compiled_loop()  # compiles here, not inside the first timed round
            compile_note = (
                f"compile=step: first step {time.perf_counter() - start:.0f} s (compiles)"
            )
            cases.append(
                bench.Case(
                    compiled_label,
                    bench.timed(compiled_loop, setup.device, cycle),
                    setup.batch,
                    steps=cycle,
                    memory=compiled_loop,
                )
            )
        results = bench.run_round_robin(cases, repeats, warmup, setup.deadline)
        memory.append((results[label], loop))
        row = PopulationRow(
            pair=f"{setup.teacher} → {setup.student}",
            population=case.population,
            members=list(modules),
            result=results[label],
            singles=None,
            ratio=None,
            target=case.target if size == max(case.sizes) else None,
            student=setup.student,
        )
        if refused is not None:
            row.notes.append(f"not fused: {refused}")
        if compile_note is not None:
            row.notes.append(compile_note)
        if compiled_loop is not None:
            row.compiled = results[compiled_label]
            memory.append((row.compiled, compiled_loop))
            row.compiled_ratio = bench.summarize(
                [c / p for c, p in zip(row.compiled.seconds, results[label].seconds, strict=True)]
            )
        if fused_loop is not None:
            row.fused = results[fused_label]
            memory.append((row.fused, fused_loop))
            row.fused_members = [n for names, _ in fused_population._fused or [] for n in names]
            row.fused_ratio = bench.summarize(
                [f / p for f, p in zip(row.fused.seconds, results[label].seconds, strict=True)]
            )
        if compare:
            per_round = [
                sum(results[f"single {n}"].seconds[i] for n in modules)
                for i in range(len(results[label].seconds))
            ]
            row.singles = sorted(per_round)[len(per_round) // 2]
            row.ratio = bench.summarize(
                [p / s for p, s in zip(results[label].seconds, per_round, strict=True)]
            )
            first = next(iter(modules))
            row.single_peak = results[f"single {first}"]
            memory.append((row.single_peak, singles[first]))
        if loop.last_total is not None and not bool(loop.last_total.isfinite()):
            row.notes.append("non-finite loss (random weights); timed anyway")
        rows.append(row)
        print("\n".join(population_table([row])), flush=True)
    return rows


def population_table(rows: Sequence[PopulationRow]) -> list[str]:
    lines = [
        "| pair | K | members | population ms/step | Σ single steps ms | population / Σ singles "
        "(median, min–max) | target | member-images/s | peak MiB | MiB per extra member "
        "| fused members | fused ms/step | fused / looped (median, min–max) "
        "| compiled ms/step | compiled / looped (median, min–max) |",
        "|---|---:|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        k = len(row.members)
        ms = row.result.median * 1e3
        ratio = (
            "—"
            if row.ratio is None
            else f"{row.ratio[0]:.2f} ({row.ratio[1]:.2f}–{row.ratio[2]:.2f})"
        )
        target = "—"
        if row.target is not None and row.ratio is not None:
            target = f"≤ {row.target:g}: {'yes' if row.ratio[0] <= row.target else 'no'}"
        singles = "—" if row.singles is None else f"{row.singles * 1e3:.0f}"
        peak = row.result.peak_mib
        extra = "—"
        if (
            peak is not None
            and row.single_peak is not None
            and row.single_peak.peak_mib is not None
            and k > 1
        ):
            extra = f"{(peak - row.single_peak.peak_mib) / (k - 1):.0f}"
        shown = ", ".join(row.members) if k <= 6 else f"{', '.join(row.members[:6])}, … ({k})"
        lines.append(
            f"| {row.pair} | {k} | {shown} | {ms:.0f} | {singles} | {ratio} | {target} | "
            f"{k * row.result.images_per_step / row.result.median:.0f} | "
            f"{'n/a' if peak is None else f'{peak:.0f}'} | {extra} | {_fused_cells(row)} | "
            f"{_compiled_cells(row)} |"
        )
    notes = [f"- {row.pair}, K = {len(row.members)}: {note}" for row in rows for note in row.notes]
    return lines + ([""] + notes if notes else [])


def _fused_cells(row: PopulationRow) -> str:
    """``fused members | fused ms/step | fused / looped``: how many of the K fused."""
    if row.fused is None or row.fused_ratio is None:
        return "0 | — | —"
    med, lo, hi = row.fused_ratio
    return (
        f"{len(row.fused_members)} | {row.fused.median * 1e3:.0f} | {med:.2f} ({lo:.2f}–{hi:.2f})"
    )


def _compiled_cells(row: PopulationRow) -> str:
    """``compiled ms/step | compiled / looped``."""
    if row.compiled is None or row.compiled_ratio is None:
        return "— | —"
    med, lo, hi = row.compiled_ratio
    return f"{row.compiled.median * 1e3:.0f} | {med:.2f} ({lo:.2f}–{hi:.2f})"
