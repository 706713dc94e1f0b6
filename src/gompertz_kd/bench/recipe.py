"""The recipe section of ``python -m gompertz_kd.bench``: the main command at its own scale.

For each thing ``experiment=c100_resnet50_mbv2`` trains (a KD, DKD or DIST student; the
Gompertz-CNN student as the paper states it, gradient matching on every image of every step, and
with the experiment's own gradient-matching settings; the ResNet50 teacher's own training), one
training step at the recipe's batch, eager and compiled (:meth:`DistillationModule.compile_step`,
which with gradient matching every k > 1 steps compiles the steps it is not due on and runs the
due one eager, and with it on every step compiles the networks only), and the wall time of its 240
epochs extrapolated from those steps:

    epochs x (ceil(train images / batch) x step + ceil(test images / batch) x evaluation forward)

Each configuration is composed from ``conf/`` exactly as ``python -m gompertz_kd.run
experiment=c100_resnet50_mbv2 method=<name>`` composes it (its model options included), on the
networks of the bench's set-up (ResNet50 -> MobileNetV2 on a GPU; small ones for a dry run).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from hydra import compose, initialize_config_dir

from gompertz_kd.bench.harness import (
    METHOD_MODEL_OPTIONS,
    Case,
    PlainLoop,
    Result,
    Setup,
    run_round_robin,
    timed,
)
from gompertz_kd.config import CONFIG_DIR
from gompertz_kd.module import DistillationModule
from gompertz_kd.train import build_objective

RECIPE = "c100_resnet50_mbv2"
# (row name, overrides of `python -m gompertz_kd.run experiment=c100_resnet50_mbv2`, GPU target
# for the 240 epochs in minutes or None)
ROWS: tuple[tuple[str, tuple[str, ...], float | None], ...] = (
    ("KD student", ("method=kd",), 10.0),
    ("DKD student", ("method=dkd",), None),
    ("DIST student", ("method=dist",), None),
    (
        "Gompertz-CNN student, paper-exact gradient matching",
        ("method=gompertz_cnn", "model.gm_every=1", "model.gm_fraction=1.0"),
        None,
    ),
    ("Gompertz-CNN student, the experiment's default", ("method=gompertz_cnn",), 20.0),
)
TEACHER_ROW = ("teacher, trained alone", ("method=student",), 15.0)
ROW_NAMES = tuple(r[0] for r in ROWS) + (TEACHER_ROW[0],)


@dataclass
class RecipeRow:
    """One configuration's step, eager and compiled, and its extrapolated 240 epochs."""

    name: str
    overrides: tuple[str, ...]
    target_minutes: float | None
    options: dict[str, Any]  # the model options it ran with (gm_every, gm_fraction, ...)
    steps: int = 1  # steps per timed sample: gm_every when gradient matching is on, so that a
    # sample holds one step with the term and the steps without it, in their proportion
    eager: Result | None = None
    compiled: Result | None = None
    compile_seconds: float | None = None
    note: str = ""


@dataclass
class RecipeResult:
    rows: list[RecipeRow]
    evaluation: dict[str, Result]  # evaluation forward of the student and of the teacher
    epochs: int
    train_images: int
    test_images: int
    batch: int
    compile_mode: str | None
    device: str
    extra: list[str] = field(default_factory=list)

    def minutes(self, row: RecipeRow, result: Result | None) -> float | None:
        """The row's 240 epochs in minutes at ``result``'s step time (``None``: not timed)."""
        if result is None:
            return None
        evaluation = self.evaluation["teacher" if row.name == TEACHER_ROW[0] else "student"]
        per_epoch = (
            math.ceil(self.train_images / self.batch) * result.median
            + math.ceil(self.test_images / self.batch) * evaluation.median
        )
        return self.epochs * per_epoch / 60


def recipe_configs(overrides: Sequence[str] = ()) -> dict[str, Any]:
    """``{row name: cfg}`` composed as ``python -m gompertz_kd.run experiment=c100_resnet50_mbv2
    <row overrides> <overrides>`` composes it."""
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return {
            name: compose("train", overrides=[f"experiment={RECIPE}", *extra, *overrides])
            for name, extra, _ in (*ROWS, TEACHER_ROW)
        }


def recipe_section(
    setup: Setup,
    repeats: int,
    epochs: int,
    train_images: int,
    test_images: int,
    compile_rows: Sequence[str] | None,
    compile_mode: str | None,
    memory: list[tuple[Result, Callable[[], Any]]],
) -> RecipeResult:
    """Time every row eager and, for the rows in ``compile_rows`` (default: all; names or
    leading words of :data:`ROW_NAMES`, case-insensitive), compiled; round-robin.

    Compilation is timed apart (the first compiled step minus an eager step); once the section's
    deadline (``setup.deadline``) has passed no further row is compiled (its note says so)."""
    configs = recipe_configs()
    rows: list[RecipeRow] = []
    loops: dict[tuple[str, str], PlainLoop] = {}
    for name, extra, target in (*ROWS, TEACHER_ROW):
        cfg = configs[name]
        options = {k: cfg.model[k] for k in METHOD_MODEL_OPTIONS}
        row = RecipeRow(name, extra, target, options)
        module = _module(setup, name, cfg, options)
        if module.gm_due(None):  # an input-gradient term: time whole gm_every cycles
            row.steps = int(options["gm_every"])
        rows.append(row)
        loops[(name, "eager")] = PlainLoop(setup, module)
    images, _ = setup.fixed_batch()
    evaluators = {
        "student": setup.module(teacher=None).eval(),
        "teacher": setup.module(teacher=None, student=setup.teacher).eval(),
    }

    def evaluate(module: DistillationModule) -> Callable[[], None]:
        def run() -> None:
            with torch.no_grad(), setup.autocast():
                module(images)

        return run

    kwargs = {} if compile_mode is None else {"mode": compile_mode}
    for row in rows:
        if not _selected(row.name, compile_rows):
            continue
        if setup.deadline is not None and time.perf_counter() > setup.deadline:
            row.note = "not compiled: the section's time budget was spent"
            continue
        module = _module(setup, row.name, configs[row.name], row.options)
        module.compile_step(**kwargs)
        loop = PlainLoop(setup, module)
        eager_seconds = timed(loops[(row.name, "eager")], setup.device, row.steps)()
        try:
            first = timed(loop, setup.device, row.steps)()
        except Exception as error:  # a compiler failure is a finding of the run, not its end
            row.note = f"compile failed: {type(error).__name__}: {str(error).splitlines()[0][:160]}"
            continue
        row.compile_seconds = max(first - eager_seconds, 0.0)
        loops[(row.name, "compiled")] = loop
    steps = {row.name: row.steps for row in rows}
    cases = [
        Case(
            f"{name} ({mode})",
            timed(loop, setup.device, steps[name]),
            setup.batch,
            steps[name],
            memory=loop,
        )
        for (name, mode), loop in loops.items()
    ]
    cases += [
        Case(f"{role} evaluation forward", timed(evaluate(m), setup.device), setup.batch)
        for role, m in evaluators.items()
    ]
    results = run_round_robin(cases, repeats, warmup=1, deadline=setup.deadline)
    memory += [(results[c.name], c.memory) for c in cases if c.memory is not None]
    for row in rows:
        row.eager = results[f"{row.name} (eager)"]
        row.compiled = results.get(f"{row.name} (compiled)")
    evaluation = {role: results[f"{role} evaluation forward"] for role in evaluators}
    return RecipeResult(
        rows, evaluation, epochs, train_images, test_images, setup.batch, compile_mode,
        setup.device.type,
    )  # fmt: skip


def _module(setup: Setup, name: str, cfg: Any, options: dict[str, Any]) -> DistillationModule:
    if name == TEACHER_ROW[0]:  # the teacher trains alone, as the student of its own run
        return setup.module(teacher=None, student=setup.teacher)
    return setup.module(objective=build_objective(cfg), **options)


def _selected(name: str, wanted: Sequence[str] | None) -> bool:
    if wanted is None:
        return True
    return any(name.lower().startswith(w.strip().lower()) for w in wanted if w.strip())


def recipe_lines(result: RecipeResult) -> list[str]:
    """The section's markdown: one row per configuration, its extrapolated 240 epochs and,
    on a GPU, its target."""
    gpu = result.device == "cuda"
    lines = [
        f"### The main command at its own scale: `experiment={RECIPE}`, batch {result.batch}",
        "",
        f"Each row's {result.epochs} epochs extrapolated from its step: {result.epochs} × "
        f"(⌈{result.train_images} / {result.batch}⌉ steps + ⌈{result.test_images} / "
        f"{result.batch}⌉ evaluation forwards of its network). Compiled: "
        f"`compile_step({'' if result.compile_mode is None else f'mode={result.compile_mode!r}'})`"
        "; with gradient matching every k > 1 steps the off-beat steps compiled and the due step "
        "eager (the timed steps cycle through both), on every step the networks only.",
        "",
        "| trains | overrides | gm_every, gm_fraction | eager ms/step | eager img/s | compiled "
        "ms/step | compile s | epochs, eager | epochs, compiled | GPU target | status | note |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for row in result.rows:
        eager, compiled = result.minutes(row, row.eager), result.minutes(row, row.compiled)
        best = min(m for m in (eager, compiled) if m is not None)
        target = "" if row.target_minutes is None else f"≤ {row.target_minutes:g} min"
        if row.target_minutes is None or not gpu:
            status = ""
        elif best <= row.target_minutes:
            status = "met"
        else:
            status = f"**not met** ({best / row.target_minutes:.1f}×)"
        gm = "—"
        if row.steps > 1 or "gompertz_cnn" in " ".join(row.overrides):
            gm = f"{row.options['gm_every']}, {row.options['gm_fraction']:g}"
        lines.append(
            f"| {row.name} | `{' '.join(row.overrides)}` | {gm} | "
            f"{_ms(row.eager)} | {row.eager.images_per_second:.0f} | {_ms(row.compiled)} | "
            f"{'' if row.compile_seconds is None else f'{row.compile_seconds:.0f}'} | "
            f"{_duration(eager)} | {_duration(compiled)} | {target} | {status} | {row.note} |"
        )
    for role, r in result.evaluation.items():
        lines.append(f"- {role}'s evaluation forward: {1000 * r.median:.2f} ms per batch")
    if not gpu:
        lines.append(
            "- the targets are a GPU's (H200-class); on this device the rows are what a run "
            "here would take"
        )
    return lines + result.extra


def _ms(result: Result | None) -> str:
    return "" if result is None else f"{1000 * result.median:.1f}"


def _duration(minutes: float | None) -> str:
    if minutes is None:
        return ""
    if minutes < 1:
        return f"{60 * minutes:.1f} s"
    if minutes < 120:
        return f"{minutes:.1f} min"
    return f"{minutes / 60:.1f} h"
