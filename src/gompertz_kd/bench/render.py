"""The report of ``python -m gompertz_kd.bench``: machine lines, tables, targets, and the Markdown
block spliced into docs/benchmarks.md."""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch

from gompertz_kd.bench.harness import (
    MARK_END,
    MARK_START,
    CaseName,
    RatioName,
    Result,
    Setup,
    _fmt_mib,
    summarize,
)
from gompertz_kd.bench.population import (
    PopulationRow,
    compiled_ratio_name,
    fused_ratio_name,
    population_table,
)
from gompertz_kd.bench.profile import profile_lines
from gompertz_kd.bench.recipe import recipe_lines
from gompertz_kd.bench.sections import (
    methods_table,
)
from gompertz_kd.markdown import splice_block


# ---------------------------------------------------------------------------------- report
def machine_lines(device: torch.device) -> list[str]:
    cpu = _lscpu_model() or platform.processor() or platform.machine()
    lines = [
        f"- machine: {cpu}, {os.cpu_count()} logical CPUs, {torch.get_num_threads()} torch threads"
        f"{_cpu_bf16_flags()}, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}",
        f"- torch {torch.__version__}, lightning {L.__version__}, Python {platform.python_version()}",
    ]
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        lines.append(
            f"- GPU: {props.name}, {props.total_memory / 2**30:.0f} GiB, compute capability "
            f"{props.major}.{props.minor}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}"
        )
    return lines


def _lscpu_model() -> str | None:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    for line in out.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return None


def _cpu_bf16_flags() -> str:
    try:
        flags = next(
            line.split(":", 1)[1].split()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("flags")
        )
    except (OSError, StopIteration):
        return ""
    have = [f for f in ("avx512_bf16", "amx_bf16", "amx_tile") if f in flags]
    return f" (CPU bf16 support: {', '.join(have) or 'none'})"


def results_table(results: dict[str, Result]) -> list[str]:
    lines = [
        "| case | images/s | ms/step (median) | spread (min/max) | peak MiB | page faults/step "
        "| note |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in results.values():
        faults = f"{statistics.median(r.faults):.0f}" if r.faults else "n/a"
        lines.append(
            f"| {r.name} | {r.images_per_second:.0f} | {1000 * r.median:.1f} | {r.spread()} | "
            f"{_fmt_mib(r.peak_mib)} | {faults} | {r.note} |"
        )
    return lines


def ratio_table(values: dict[str, tuple[float, float, float]]) -> list[str]:
    lines = ["| ratio | median | min–max over rounds |", "|---|---:|---:|"]
    for name, (med, lo, hi) in values.items():
        lines.append(f"| {name} | {med:.3f} | {lo:.3f}–{hi:.3f} |")
    return lines


@dataclass(frozen=True)
class Target:
    """A performance target: the ratio it is stated in and the bound the ratio must keep."""

    text: str
    ratio: str  # a RatioName
    bound: float
    at_most: bool = True  # the ratio must stay at or below the bound (False: at or above)

    def met(self, value: float) -> bool:
        return value <= self.bound if self.at_most else value >= self.bound


def target_list(gm_every: int) -> tuple[Target, ...]:
    """The bench's targets (why each was set, and what was done to meet it: docs/benchmarks.md)."""
    return (
        Target(
            "framework overhead (Lightning) ≤ 5 % over student step + teacher forward",
            RatioName.OVERHEAD_LIGHTNING,
            1.05,
        ),
        Target("Wasserstein term alone ≤ 5 % of the KD step", RatioName.WD_ALONE, 0.05),
        Target(
            "gradient matching, every step, ≤ 1.6× the KD step",
            RatioName.per_kd_step(CaseName.PLUS_GM),
            1.6,
        ),
        Target(
            f"gradient matching, every {gm_every} steps, ≤ 1.6× the KD step",
            RatioName.per_kd_step(CaseName.gm_every(gm_every)),
            1.6,
        ),
        Target(
            f"Gompertz-CNN with the GPU recipe's gradient matching (every {gm_every} steps) "
            "≤ 1.6× the KD step",
            RatioName.per_kd_step(CaseName.full_every(gm_every)),
            1.6,
        ),
        Target(
            "the compiled KD step (compile_step) no slower than the eager one",
            RatioName.COMPILED_VS_EAGER,
            1.0,
        ),
        Target(
            "fused population of K = 4 resnet8 members ≤ 0.7× the looped population's step",
            fused_ratio_name("resnet8", 4),
            0.7,
        ),
        Target(
            "the compiled population step (compile=step) of K = 4 resnet8 members no slower than "
            "the eager one",
            compiled_ratio_name("resnet8", 4),
            1.0,
        ),
        Target(
            "the fastest data path ≥ 10× the fastest training step",
            RatioName.DATA_HEADROOM,
            10.0,
            at_most=False,
        ),
    )


def targets(
    steps: dict[str, Result] | None,
    rat: dict[str, tuple[float, float, float]] | None,
    data: dict[str, Result] | None,
    setup: Setup,
    compiled: dict[str, Result] | None = None,
) -> list[tuple[Target, tuple[float, float, float]]]:
    """Each target with its measured ratio ``(median, min, max)``, where the run measured it."""
    measured = dict(rat or {})
    if compiled is not None:
        pairs = zip(
            compiled[CaseName.GOMPERTZ_KD_COMPILED].seconds,
            compiled[CaseName.GOMPERTZ_KD_EAGER].seconds,
            strict=True,
        )
        measured[RatioName.COMPILED_VS_EAGER] = summarize([c / e for c, e in pairs])
    if data is not None and steps is not None:
        train = max(
            steps[CaseName.STUDENT_STEP].images_per_second,
            steps[CaseName.GOMPERTZ_KD].images_per_second,
        )
        headroom = max(r.images_per_second for r in data.values()) / train
        measured[RatioName.DATA_HEADROOM] = (headroom, headroom, headroom)
    return [(t, measured[t.ratio]) for t in target_list(setup.gm_every) if t.ratio in measured]


def population_targets(
    rows: list[PopulationRow] | None, gm_every: int
) -> list[tuple[Target, tuple[float, float, float]]]:
    """The population section's targets (fused / looped, compiled / looped) with their measured
    ratios."""
    measured = {row.fused_ratio_name: row.fused_ratio for row in rows or [] if row.fused_ratio}
    measured |= {
        row.compiled_ratio_name: row.compiled_ratio for row in rows or [] if row.compiled_ratio
    }
    return [(t, measured[t.ratio]) for t in target_list(gm_every) if t.ratio in measured]


def target_table(rows: list[tuple[Target, tuple[float, float, float]]]) -> list[str]:
    lines = [
        "| target | measured (median, min–max over rounds) | bound | status |",
        "|---|---|---|---|",
    ]
    for target, (median, lo, hi) in rows:
        bound = f"{'≤' if target.at_most else '≥'} {target.bound:g}"
        status = "met" if target.met(median) else "**not met**"
        lines.append(f"| {target.text} | {median:.3g} ({lo:.3g}–{hi:.3g}) | {bound} | {status} |")
    return lines


def render(
    args: argparse.Namespace,
    setup: Setup,
    sections: dict[str, Any],
    load: tuple[float, float],
    wall: float,
) -> str:
    lines = [
        f"Command: `{_command(args)}`",
        "",
        *machine_lines(setup.device),
        f"- {setup.teacher} → {setup.student}, {setup.num_classes} classes, batch "
        f"{args.batches if 'throughput' in sections else setup.batch}, "
        f"{setup.precision}, {setup.device.type}, channels_last={setup.channels_last}, "
        f"up to {args.repeats} rounds after {args.warmup} warm-up (rounds run: "
        f"{_rounds_run(sections)}), gm_every={setup.gm_every} where the case says so",
        f"- teacher weights: {setup.teacher_ckpt or 'random initialisation'}",
        f"- load average (1 min) before / after: {load[0]:.2f} / {load[1]:.2f}; wall time "
        f"{wall / 60:.1f} min",
        "",
    ]
    if "steps" in sections:
        results, rat = sections["steps"]
        lines += [
            "### Steps",
            "",
            *results_table(results),
            "",
            "### Ratios",
            "",
            *ratio_table(rat),
            "",
        ]
    if "checkpoint" in sections:
        save_s, mib, step_s = sections["checkpoint"]
        lines += [
            "### Checkpoint cost",
            "",
            "One training checkpoint of the Gompertz KD module (student, teacher, objective, SGD "
            "state) written as runs write it (`AtomicCheckpointIO`: `.partial` file, fsync, "
            f"atomic rename), median of 3: {save_s:.2f} s for {mib:.0f} MiB, "
            f"{save_s / step_s:.1f} Gompertz KD steps' time. What "
            "`callbacks.interval_checkpoint.every_n_minutes=N` costs in training time: "
            + ", ".join(f"N = {n}: {100 * save_s / (60 * n):.2f} %" for n in (1, 5, 10, 30))
            + "; `every_n_steps=N`: "
            + ", ".join(f"N = {n}: {100 * save_s / (n * step_s):.1f} %" for n in (100, 500, 2000))
            + ".",
            "",
        ]
    if "population" in sections:
        lines += [
            "### Populations: K members on one teacher pass",
            "",
            "A population step (the teacher once; every member's student, terms, one backward of "
            "the summed losses, one SGD step) timed round-robin with each member's single-run "
            "step (its own teacher pass each), the ratio taken within each round. Members from "
            "`conf/population/<name>.yaml`, built as training runs build them (seed replicas "
            "beyond its size). Member-images/s: K × batch / step time. Fused: the same "
            "population with the students of one architecture as one network "
            "(`population.fuse=true`; members with gradient matching stay looped), timed in the "
            "same rounds, the ratio to the looped step taken within each round. Compiled (with "
            "`--compile`, where no member's term blocks it): the looped population's whole "
            "forward as one graph (`compile=step`), timed and compared the same way; its "
            "compile time is a note. See `gompertz_kd.bench.population`.",
            "",
            *population_table(sections["population"]),
            "",
        ]
    if "methods" in sections:
        methods = sections["methods"]
        model_options = ", ".join(
            f"{k}={'null' if v is None else v}" for k, v in methods.model_options.items()
        )
        lines += [
            "### Methods: one training step each, as a ratio to the KD step",
            "",
            "Each objective built from `conf/method/<name>.yaml` as a training run with "
            "`method=<name>` builds it (the published defaults; the model options of "
            f"`conf/model`: {model_options}), on the pair above with a training set of "
            f"{args.train_images} images (per-image memories) and batches that carry each "
            "image's index; the plain loop of the steps table (forward, every term, backward, "
            "SGD step), every method in each round; the ratio to the `method=kd` step is taken "
            "within each round. Parameters and buffers: the objective's own (projectors, "
            "regressors, memory banks), not the networks'.",
            "",
            *methods_table(methods.rows),
            "",
            *methods.footnotes,
            "",
        ]
    if "accuracy" in sections:
        lines += [
            "### Accuracy of the approximate options",
            "",
            "| quantity | value |",
            "|---|---|",
        ]
        lines += [f"| {q} | {v} |" for q, v in sections["accuracy"]]
        lines.append("")
    if "data" in sections:
        lines += ["### Data paths (synthetic uint8 images, standard augmentation)", ""]
        lines += results_table(sections["data"])
        if "steps" in sections:
            steps = sections["steps"][0]
            lines += ["", "Training throughput the data path feeds (from the steps table):", ""]
            for name in (CaseName.STUDENT_STEP, CaseName.GOMPERTZ_KD, CaseName.FULL):
                lines.append(f"- {name}: {steps[name].images_per_second:.0f} img/s")
        lines.append("")
    if "compile" in sections:
        compile_s, res = sections["compile"]
        lines += [
            "### torch.compile",
            "",
            f"Compile time of the Gompertz KD step (first compiled step minus an eager step, "
            f"inductor's on-disk caches off): "
            f"{compile_s:.0f} s.",
            "",
            *results_table(res),
            "",
        ]
    if "throughput" in sections:
        for batch, (res, estimate) in sections["throughput"].items():
            lines += [f"### End-to-end, batch {batch}", "", *results_table(res), "", *estimate, ""]
    if "recipe" in sections:
        lines += [*recipe_lines(sections["recipe"]), ""]
    if "profile" in sections:
        lines += profile_lines(sections["profile"])
    tg = [
        *(sections.get("targets") or []),
        *population_targets(sections.get("population"), setup.gm_every),
    ]
    if tg:
        lines += ["### Targets", "", *target_table(tg), ""]
    return "\n".join(lines)


def _rounds_run(sections: dict[str, Any]) -> str:
    """How many timed rounds each section got (fewer than asked under ``--budget``)."""
    counts = []
    for name, value in sections.items():
        results = {
            "steps": lambda v: v[0],
            "methods": lambda v: {row.method: row.result for row in v.rows},
            "data": lambda v: v,
            "compile": lambda v: v[1],
            "population": lambda v: {row.population: row.result for row in v},
        }.get(name)
        if results is not None and results(value):
            first = next(iter(results(value).values()))
            counts.append(f"{name} {len(first.seconds)}")
    if "throughput" in sections:
        for batch, (res, _) in sections["throughput"].items():
            counts.append(f"batch {batch} {len(next(iter(res.values())).seconds)}")
    return ", ".join(counts) or "none"


def estimate_lines(
    res: dict[str, Result], epochs: int, train_images: int, test_images: int
) -> list[str]:
    lines = []
    evaluation = res[CaseName.STUDENT_EVAL].images_per_second
    for name, r in res.items():
        if not name.startswith("c100_resnet50_mbv2 step"):
            continue
        seconds = epochs * (train_images / r.images_per_second + test_images / evaluation)
        lines.append(
            f"- estimated full run ({epochs} epochs × {train_images} training + {test_images} "
            f"test images), {name.removeprefix('c100_resnet50_mbv2 step, ')}: "
            f"{seconds / 3600:.1f} h"
        )
    return lines


def _command(args: argparse.Namespace) -> str:
    return "python -m gompertz_kd.bench " + " ".join(args.argv)


def write_report(path: Path, body: str) -> None:
    """Put ``body`` between the markers in ``path`` (created with just the markers if missing),
    leaving the hand-written text around them alone."""
    splice_block(path, body, MARK_START, MARK_END, title="Benchmarks")
