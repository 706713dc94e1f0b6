"""The sections of ``python -m gompertz_kd.bench``: what each one times (steps, methods, accuracy,
data paths, torch.compile, throughput) and the checkpoint cost."""

from __future__ import annotations

import contextlib
import re
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from hydra import compose, initialize_config_dir
from torch import Tensor

from gompertz_kd import losses
from gompertz_kd.bench.harness import (
    BASELINE_METHOD,
    METHOD_DIR,
    METHOD_MODEL_OPTIONS,
    STUDENT_METHOD,
    Case,
    CaseName,
    PlainLoop,
    RatioName,
    Result,
    Setup,
    _fmt_mib,
    _forever,
    lightning_case,
    run_round_robin,
    summarize,
    timed,
)
from gompertz_kd.config import CONFIG_DIR
from gompertz_kd.module import DistillationModule
from gompertz_kd.objectives import CRD, Objective
from gompertz_kd.schedules import Constant
from gompertz_kd.train import build_objective


# ---------------------------------------------------------------------------------- sections
def steps_section(
    setup: Setup,
    repeats: int,
    warmup: int,
    scratch: Path,
    memory: list[tuple[Result, Callable[[], Any]]],
) -> dict[str, Result]:
    """Every step variant of the issue, plus the options that change their cost."""
    dev, batch, k, f = setup.device, setup.batch, setup.gm_every, setup.gm_fraction
    images, targets = setup.fixed_batch()
    student_only = setup.module(teacher=None)
    student_loop = PlainLoop(setup, student_only)
    student_optimizer = student_loop.optimizer

    def student_step() -> None:
        student_optimizer.zero_grad(set_to_none=True)
        with setup.autocast():
            _, terms, _ = student_only.compute_losses(images, targets)
        student_only.weighted_total(terms).backward()
        student_optimizer.step()

    kd = setup.module(gm_every=1)
    unfolded = setup.module(fold_teacher_bn=False)

    def teacher_fwd(module: DistillationModule, inputs: Tensor = images) -> Callable[[], None]:
        def run() -> None:
            with setup.autocast():
                module.teacher_forward(inputs)

        return run

    def teacher_grad(module: DistillationModule) -> Callable[[], None]:
        def run() -> None:
            with setup.autocast():
                module.teacher_forward(images, targets, input_gradient=True)

        return run

    cases = [
        Case(CaseName.TEACHER_FORWARD, timed(teacher_fwd(kd), dev), batch),
        Case(CaseName.TEACHER_FORWARD_UNFOLDED, timed(teacher_fwd(unfolded), dev), batch),
    ]
    if setup.channels_last:
        nchw_teacher = setup.nchw_teacher()
        nchw = setup.module(teacher=nchw_teacher, channels_last=False, fold_teacher_bn=False)
        nchw_images = images.contiguous()
        cases.append(
            Case(
                CaseName.TEACHER_FORWARD_NCHW,
                timed(teacher_fwd(nchw, nchw_images), dev),
                batch,
            )
        )
    bf16_teacher = None
    if setup.precision == "32-true":
        bf16_teacher = setup.module(teacher_precision="bf16")
        cases.append(
            Case(CaseName.TEACHER_FORWARD_BF16, timed(teacher_fwd(bf16_teacher), dev), batch)
        )
    cases += [
        Case(CaseName.TEACHER_GRAD, timed(teacher_grad(kd), dev), batch),
        Case(CaseName.TEACHER_GRAD_UNFOLDED, timed(teacher_grad(unfolded), dev), batch),
    ]
    if bf16_teacher is not None:
        cases.append(
            Case(CaseName.TEACHER_GRAD_BF16, timed(teacher_grad(bf16_teacher), dev), batch)
        )
    cases.append(Case(CaseName.STUDENT_STEP, timed(student_step, dev), batch, memory=student_step))

    # The Wasserstein term on its own: projector, pooling, statistics, forward and backward.
    wd = setup.module(wd_scale=1.0)
    student_features = [f.detach() for f in wd.student.forward_stages(images).features]
    teacher_features = wd.teacher_forward(images)[0].features
    deepest = teacher_features[-1]

    def wd_term() -> None:
        features = [f.requires_grad_(True) for f in student_features]
        with setup.autocast():
            loss = wd.objective.terms["wd"].loss(features, teacher_features)
        loss.backward()

    def statistics_of(fn: Callable[[Tensor], Any]) -> Callable[[], None]:
        return lambda: fn(deepest.requires_grad_(False))

    cases += [
        Case(CaseName.WD_ALONE, timed(wd_term, dev), batch),
        Case(
            CaseName.TWO_PASS_STATISTICS,
            timed(statistics_of(losses.channel_gaussian_stats), dev),
            batch,
        ),
        Case(
            CaseName.VAR_STATISTICS,
            timed(statistics_of(_torch_var_statistics), dev),
            batch,
            note="before",
        ),
    ]

    def loop_case(name: str, steps: int = 1, note: str = "", **options: Any) -> Case:
        loop = PlainLoop(setup, setup.module(**options))
        return Case(name, timed(loop, dev, steps), batch, steps, memory=loop, note=note)

    exact = {"gm_every": 1}
    cases += [
        loop_case(CaseName.STATIC_KD, schedule=Constant(0.9), mixing="convex", **exact),
        loop_case(CaseName.GOMPERTZ_KD, **exact),
        loop_case(CaseName.PLUS_WD, wd_scale=1.0, **exact),
        loop_case(CaseName.PLUS_GM, gm_scale=1.0, **exact),
        loop_case(CaseName.FULL, wd_scale=1.0, gm_scale=1.0, **exact),
        loop_case(
            CaseName.PLUS_GM_UNFOLDED,
            gm_scale=1.0,
            fold_teacher_bn=False,
            note="before",
            **exact,
        ),
        loop_case(CaseName.gm_every(k), k, gm_scale=1.0, gm_every=k),
        loop_case(CaseName.full_every(k), k, wd_scale=1.0, gm_scale=1.0, gm_every=k),
        loop_case(CaseName.gm_fraction(f), gm_scale=1.0, gm_fraction=f, **exact),
        loop_case(CaseName.full_fraction(f), wd_scale=1.0, gm_scale=1.0, gm_fraction=f, **exact),
        loop_case(
            CaseName.full_fraction(f, 2), 2, wd_scale=1.0, gm_scale=1.0, gm_fraction=f, gm_every=2
        ),
    ]
    if setup.precision == "32-true":
        cases += [
            loop_case(
                CaseName.GOMPERTZ_KD_BF16_TEACHER, teacher_precision="bf16", note="approximate"
            ),
            loop_case(
                CaseName.full_every(k, bf16_teacher=True),
                k,
                wd_scale=1.0,
                gm_scale=1.0,
                gm_every=k,
                teacher_precision="bf16",
                note="approximate",
            ),
        ]
    if setup.channels_last:
        cases.append(
            loop_case(
                CaseName.GOMPERTZ_KD_NCHW,
                teacher=nchw_teacher,
                channels_last=False,
                fold_teacher_bn=False,
                note="before",
            )
        )
    cases.append(
        lightning_case(
            setup, CaseName.GOMPERTZ_KD_LIGHTNING, setup.module(**exact), steps=2, scratch=scratch
        )
    )
    # Cases a ratio compares run next to each other, so that load changes within a round
    # touch both sides alike.
    first = [
        CaseName.TEACHER_FORWARD,
        CaseName.STUDENT_STEP,
        CaseName.GOMPERTZ_KD,
        CaseName.GOMPERTZ_KD_LIGHTNING,
        CaseName.STATIC_KD,
        CaseName.PLUS_WD,
        CaseName.WD_ALONE,
        CaseName.PLUS_GM,
        CaseName.gm_every(k),
        CaseName.gm_fraction(f),
        CaseName.FULL,
        CaseName.full_every(k),
        CaseName.full_fraction(f),
        CaseName.full_fraction(f, 2),
    ]
    cases.sort(key=lambda c: first.index(c.name) if c.name in first else len(first))
    results = run_round_robin(cases, repeats, warmup, setup.deadline)
    memory += [(results[c.name], c.memory or c.run) for c in cases]
    return results


def checkpoint_cost(
    setup: Setup, scratch: Path, results: dict[str, Result]
) -> tuple[float, float, float]:
    """``(seconds per checkpoint save, its MiB, seconds per Gompertz KD step)``: the median of 3
    atomic saves of a Gompertz KD module's training state, as the Trainer writes it."""
    from gompertz_kd.checkpoints import AtomicCheckpointIO

    module = setup.module()
    loop = PlainLoop(setup, module)
    loop()  # momentum buffers exist, as in a checkpoint taken during training
    state = {
        "state_dict": module.state_dict(),
        "optimizer_states": [loop.optimizer.state_dict()],
        "epoch": 0,
        "global_step": 1,
    }
    path = scratch / "bench.ckpt"
    io, seconds = AtomicCheckpointIO(), []
    for _ in range(3):
        start = time.perf_counter()
        io.save_checkpoint(state, path)
        seconds.append(time.perf_counter() - start)
    mib = path.stat().st_size / 2**20
    path.unlink()
    return statistics.median(seconds), mib, results[CaseName.GOMPERTZ_KD].median


def _torch_var_statistics(features: Tensor) -> tuple[Tensor, Tensor]:
    """:func:`gompertz_kd.losses.channel_gaussian_stats` as it was, with ``torch.var``."""
    flat = features.flatten(2)
    return flat.mean(dim=2), torch.sqrt(flat.var(dim=2, unbiased=False) + 1e-6)


def ratios(
    results: dict[str, Result], k: int, f: float = 0.25
) -> dict[str, tuple[float, float, float]]:
    """The ratios the targets are stated in, per round, as ``(median, min, max)``."""

    def per_round(fn: Callable[[int], float]) -> tuple[float, float, float]:
        n = len(next(iter(results.values())).seconds)
        return summarize([fn(i) for i in range(n)])

    def t(name: str, i: int) -> float:
        return results[name].seconds[i]

    out = {}
    base = lambda i: t(CaseName.STUDENT_STEP, i) + t(CaseName.TEACHER_FORWARD, i)  # noqa: E731
    out[RatioName.OVERHEAD_PLAIN] = per_round(lambda i: t(CaseName.GOMPERTZ_KD, i) / base(i))
    out[RatioName.OVERHEAD_LIGHTNING] = per_round(
        lambda i: t(CaseName.GOMPERTZ_KD_LIGHTNING, i) / base(i)
    )
    out[RatioName.LIGHTNING_VS_PLAIN] = per_round(
        lambda i: t(CaseName.GOMPERTZ_KD_LIGHTNING, i) / t(CaseName.GOMPERTZ_KD, i)
    )
    out[RatioName.WD_ALONE] = per_round(
        lambda i: t(CaseName.WD_ALONE, i) / t(CaseName.GOMPERTZ_KD, i)
    )
    out[RatioName.STATIC_VS_GOMPERTZ] = per_round(
        lambda i: t(CaseName.STATIC_KD, i) / t(CaseName.GOMPERTZ_KD, i)
    )
    for name in (
        CaseName.PLUS_WD,
        CaseName.PLUS_GM,
        CaseName.PLUS_GM_UNFOLDED,
        CaseName.gm_every(k),
        CaseName.FULL,
        CaseName.full_every(k),
        CaseName.full_every(k, bf16_teacher=True),
        CaseName.gm_fraction(f),
        CaseName.full_fraction(f),
        CaseName.full_fraction(f, 2),
    ):
        if name in results:
            out[RatioName.per_kd_step(name)] = per_round(
                lambda i, n=name: t(n, i) / t(CaseName.GOMPERTZ_KD, i)
            )
    speedups = [  # (ratio, the slower case, the faster case)
        (RatioName.FOLDING_FORWARD, CaseName.TEACHER_FORWARD_UNFOLDED, CaseName.TEACHER_FORWARD),
        (RatioName.FOLDING_GRAD, CaseName.TEACHER_GRAD_UNFOLDED, CaseName.TEACHER_GRAD),
        (
            RatioName.CHANNELS_LAST_FORWARD,
            CaseName.TEACHER_FORWARD_NCHW,
            CaseName.TEACHER_FORWARD_UNFOLDED,
        ),
        (RatioName.BF16_FORWARD, CaseName.TEACHER_FORWARD, CaseName.TEACHER_FORWARD_BF16),
        (RatioName.BF16_GRAD, CaseName.TEACHER_GRAD, CaseName.TEACHER_GRAD_BF16),
        (RatioName.TWO_PASS_SPEEDUP, CaseName.VAR_STATISTICS, CaseName.TWO_PASS_STATISTICS),
        (RatioName.BF16_KD_STEP, CaseName.GOMPERTZ_KD, CaseName.GOMPERTZ_KD_BF16_TEACHER),
        (RatioName.CHANNELS_LAST_KD_STEP, CaseName.GOMPERTZ_KD_NCHW, CaseName.GOMPERTZ_KD),
    ]
    for ratio, slow, fast in speedups:
        if slow in results and fast in results:
            out[ratio] = per_round(lambda i, s=slow, f=fast: t(s, i) / t(f, i))
    return out


def method_names(selected: Sequence[str] | None = None) -> list[str]:
    """The distillation methods of ``conf/method`` (every file but the student alone), the
    baseline first; ``selected`` keeps only those (the baseline always stays).

    Raises:
        ValueError: a selected name with no ``conf/method/<name>.yaml``.
    """
    known = sorted(p.stem for p in METHOD_DIR.glob("*.yaml") if p.stem != STUDENT_METHOD)
    if selected:
        unknown = sorted(set(selected) - set(known))
        if unknown:
            raise ValueError(f"--methods: no method config {unknown}; choose from {known}")
        known = [m for m in known if m in selected or m == BASELINE_METHOD]
    return sorted(known, key=lambda m: m != BASELINE_METHOD)


def method_configs(names: Sequence[str]) -> dict[str, Any]:
    """``{name: cfg}``: ``conf/`` composed with ``method=<name>``, as ``python -m
    gompertz_kd.run method=<name>`` composes it (the shared schedule, the seed and the model's
    options at their defaults)."""
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return {name: compose("train", overrides=[f"method={name}"]) for name in names}


def method_title(name: str) -> str:
    """The method's name as its config's first comment line gives it (``# WKD-L (Lv et al.,
    ...`` -> ``WKD-L``), or ``name`` when the file has none."""
    for line in (METHOD_DIR / f"{name}.yaml").read_text().splitlines():
        if line.startswith("# "):
            return re.split(r" \(|:|,", line[2:], maxsplit=1)[0].strip() or name
        if line.strip():
            break
    return name


@dataclass
class MethodRow:
    """One row of the methods table: the step of ``method=<method>`` and its objective."""

    method: str
    terms: str  # the term classes that are on, e.g. "KD + Wasserstein + GradientMatching"
    result: Result
    ratio: tuple[float, float, float]  # to the baseline's step, per round: (median, min, max)
    parameters: int  # the objective's trainable parameters (projectors, regressors, ...)
    buffers: int  # its other state (CRD's memory banks)


@dataclass
class MethodsResult:
    """The methods section: a row per method (the baseline first), footnotes (markdown
    bullets) on what dominates a method's cost, and the model options every method ran with."""

    rows: list[MethodRow]
    footnotes: list[str]
    model_options: dict[str, Any]


def methods_section(
    setup: Setup,
    repeats: int,
    warmup: int,
    num_train_samples: int,
    memory: list[tuple[Result, Callable[[], Any]]],
    selected: Sequence[str] | None = None,
) -> MethodsResult:
    """One training step (forward, every term, backward, SGD step) of every method, each built
    from its config as a training run builds it, on the shared teacher; round-robin, and each
    step's ratio to the baseline's step taken within the round.

    ``num_train_samples`` sizes the per-image memories (CRD's banks); the batches carry each
    image's index where a term needs it. Every method runs at its configured values (CRD at its
    K): a slow case makes a loaded machine run fewer rounds (``setup.deadline``), never a
    smaller objective.

    ``selected``: method names (default: every one, :func:`method_names`).
    """
    names = method_names(selected)
    configs = method_configs(names)
    loops: dict[str, PlainLoop] = {}
    cases: list[Case] = []
    options: dict[str, Any] = {}
    not_built: list[str] = []
    for name, cfg in configs.items():
        options = {key: cfg.model[key] for key in METHOD_MODEL_OPTIONS}
        try:
            module = setup.module(
                objective=build_objective(cfg), num_train_samples=num_train_samples, **options
            )
        except ValueError as error:  # a method that does not apply to this pair (KDSVD)
            not_built.append(f"- `method={name}` is not timed on this pair: {error}")
            continue
        loops[name] = loop = PlainLoop(setup, module)
        cases.append(Case(name, timed(loop, setup.device), setup.batch, memory=loop))
    results = run_round_robin(cases, repeats, warmup, setup.deadline)
    memory += [(results[c.name], c.memory) for c in cases]
    base = results[BASELINE_METHOD].seconds
    rows, footnotes = [], list(not_built)
    for name, loop in loops.items():
        objective: Objective = loop.module.objective
        result = results[name]
        if loop.last_total is not None and not torch.isfinite(loop.last_total):
            result.note = "non-finite loss (random weights); timed anyway"
        rows.append(
            MethodRow(
                method=name,
                terms=" + ".join(type(t).__name__ for t in objective.terms.values()),
                result=result,
                ratio=summarize([s / b for s, b in zip(result.seconds, base, strict=True)]),
                parameters=sum(p.numel() for p in objective.parameters()),
                buffers=sum(b.numel() for b in objective.buffers()),
            )
        )
        for term_name, term in objective.terms.items():
            if isinstance(term, CRD):
                result.note = (result.note + "; " if result.note else "") + "see below"
                footnotes.append(_crd_footnote(name, term_name, term, setup.batch))
    return MethodsResult(rows, footnotes, options)


def _crd_footnote(method: str, term_name: str, term: CRD, batch: int) -> str:
    """What CRD's memory banks cost per step at its configured ``K``."""
    bank = term.memory.memory_s
    rows = 2 * batch * (term.num_negatives + 1)
    mib = rows * term.feature_dim * bank.element_size() / 2**20
    dtype = str(bank.dtype).removeprefix("torch.")
    return (
        f"- `method={method}` runs at its configured K = {term.num_negatives} negatives "
        f"(`method.terms.{term_name}.term.num_negatives`): each step gathers 2 banks × {batch} "
        f"images × (K + 1) = {rows} rows of {term.feature_dim} {dtype} from its memory banks "
        f"({term.num_data} slots each; {mib:.0f} MiB) and scores each against the image's "
        "embedding, on top of a forward of both networks."
    )


def methods_table(rows: Sequence[MethodRow]) -> list[str]:
    lines = [
        "| method | config | terms | ms/step (median) | spread (min/max) | × KD step (median) "
        "| min–max over rounds | objective parameters | objective buffers | peak MiB | note |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row in rows:
        r, (med, lo, hi) = row.result, row.ratio
        lines.append(
            f"| {method_title(row.method)} | `method={row.method}` | {row.terms} | "
            f"{1000 * r.median:.1f} | {r.spread()} | {med:.2f} | {lo:.2f}–{hi:.2f} | "
            f"{row.parameters:,} | {row.buffers:,} | {_fmt_mib(r.peak_mib)} | {r.note} |"
        )
    return lines


@torch.no_grad()
def data_section(
    setup: Setup, repeats: int, batches: int, workers: Sequence[int]
) -> dict[str, Result]:
    """Images/second of each data path alone, round-robin."""
    arrays = setup.arrays(count=max(4096, 4 * batches * setup.batch))
    loaders = {"tensor path (on_device=True)": _forever(setup.tensor_loader(arrays))}
    for w in workers:
        loader = setup.data(arrays, on_device=False, num_workers=w).train_dataloader()
        if setup.device.type == "cuda":
            loaders[f"per-image DataLoader, num_workers={w}"] = (
                (x.to(setup.device, non_blocking=True), y.to(setup.device, non_blocking=True))
                for x, y in _forever(loader)
            )
        else:
            loaders[f"per-image DataLoader, num_workers={w}"] = _forever(loader)
    cases = [
        Case(name, timed(lambda it=it: next(it), setup.device, batches), setup.batch, batches)
        for name, it in loaders.items()
    ]
    return run_round_robin(cases, repeats, warmup=1, deadline=setup.deadline)


def compile_section(
    setup: Setup, repeats: int, memory: list[tuple[Result, Callable[[], Any]]]
) -> tuple[float, dict[str, Result]]:
    """Compile time of the Gompertz KD step and its compiled against eager speed: the whole
    step's forward compiled as one graph (:meth:`DistillationModule.compile_step`)."""
    eager = PlainLoop(setup, setup.module(gm_every=1))
    compiled_module = setup.module(gm_every=1)
    compiled_module.compile_step()
    compiled = PlainLoop(setup, compiled_module)
    eager()
    eager_seconds = timed(eager, setup.device)()
    with _cold_compile():
        first = timed(compiled, setup.device)()
    compile_seconds = first - eager_seconds
    cases = [
        Case(CaseName.GOMPERTZ_KD_EAGER, timed(eager, setup.device), setup.batch, memory=eager),
        Case(
            CaseName.GOMPERTZ_KD_COMPILED,
            timed(compiled, setup.device),
            setup.batch,
            memory=compiled,
        ),
    ]
    results = run_round_robin(cases, repeats, warmup=1, deadline=setup.deadline)
    memory += [(results[c.name], c.memory) for c in cases]
    return compile_seconds, results


# The c100_resnet50_mbv2 objective: KD + Wasserstein + exact gradient matching every step.
FULL_OBJECTIVE = dict(wd_scale=1.0, gm_scale=1.0, gm_every=1, mixing="convex")


def throughput_modules(setup: Setup, compile_too: bool) -> dict[str, DistillationModule]:
    """The modules of the throughput section, built once and reused for every batch size (so
    a compiled one compiles once per new shape, not once per module)."""
    modules = {
        "kd": setup.module(gm_every=1),
        "evaluator": setup.module(teacher=None).eval(),
        "eager": setup.module(**FULL_OBJECTIVE),
    }
    if setup.precision == "bf16-mixed":
        modules["gm_bf16"] = setup.module(**FULL_OBJECTIVE, gm_precision=None)
    if compile_too:
        modules["compiled"] = setup.module(**FULL_OBJECTIVE)
        with _quiet_compile_warning():
            modules["compiled"].compile_networks()
    return modules


def throughput_section(
    setup: Setup,
    repeats: int,
    modules: dict[str, DistillationModule],
    scratch: Path,
    memory: list[tuple[Result, Callable[[], Any]]],
) -> dict[str, Result]:
    """End-to-end Lightning steps of the ``c100_resnet50_mbv2`` objective, eager and compiled
    (with exact gradient matching the compiled module's student stays eager), plus the
    teacher's forward and the student's evaluation forward for context."""
    images, _ = setup.fixed_batch()
    kd, evaluator = modules["kd"], modules["evaluator"]

    def teacher_fwd() -> None:
        with setup.autocast():
            kd.teacher_forward(images)

    def student_eval() -> None:
        with torch.no_grad(), setup.autocast():
            evaluator(images)

    cases = [
        Case(CaseName.TEACHER_FORWARD, timed(teacher_fwd, setup.device), setup.batch),
        Case(CaseName.STUDENT_EVAL, timed(student_eval, setup.device), setup.batch),
        lightning_case(setup, "c100_resnet50_mbv2 step, Lightning", modules["eager"], 3, scratch),
    ]
    if "gm_bf16" in modules:
        cases.append(
            lightning_case(
                setup,
                "c100_resnet50_mbv2 step, Lightning, gm_precision=null (bf16)",
                modules["gm_bf16"],
                3,
                scratch,
            )
        )
    if "compiled" in modules:
        case = lightning_case(
            setup,
            "c100_resnet50_mbv2 step, Lightning, torch.compile",
            modules["compiled"],
            3,
            scratch,
        )
        start = time.perf_counter()
        with _cold_compile():
            case.memory()  # compiles for this shape
        case.note = f"first fit {time.perf_counter() - start:.0f} s (compiles)"
        cases.append(case)
    results = run_round_robin(cases, repeats, warmup=1, deadline=setup.deadline)
    memory += [(results[c.name], c.memory or c.run) for c in cases]
    return results


@contextlib.contextmanager
def _cold_compile() -> Iterator[None]:
    """Compile without inductor's on-disk caches, which earlier runs would have filled."""
    import torch._functorch.config
    import torch._inductor.config

    with (
        torch._inductor.config.patch(fx_graph_cache=False),
        torch._functorch.config.patch(enable_autograd_cache=False),
    ):
        yield


@contextlib.contextmanager
def _quiet_compile_warning() -> Iterator[None]:
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="compile_networks: the student stays eager")
        yield
