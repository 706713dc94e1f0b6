"""The profile section of ``python -m gompertz_kd.bench``: where a training step's time goes.

``torch.profiler`` over a few steps of the KD student and of the Gompertz-CNN student of
``experiment=c100_resnet50_mbv2`` (the recipe section's configurations, eager), after a warm-up:
the operators that take the most time (self time on the device where there is one, else on the
CPU), and how much of the step the host spends launching them. This is what a missed target is
explained with: a profile, not a guess.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch.profiler import ProfilerActivity, profile

from gompertz_kd.bench.harness import METHOD_MODEL_OPTIONS, PlainLoop, Setup, _sync
from gompertz_kd.bench.recipe import ROWS, recipe_configs
from gompertz_kd.train import build_objective

# the recipe rows profiled: the KD student and the default objective
PROFILED = (ROWS[0][0], ROWS[-1][0])


@dataclass
class Profile:
    """One configuration's profile: its top operators and the step's totals."""

    name: str
    steps: int
    step_ms: float  # wall time per step while profiled
    device_ms: float | None  # summed device self time per step (None on the CPU)
    top: list[tuple[str, int, float, float]]  # (operator, calls per step, ms per step, share)


def profile_section(setup: Setup, rows: Sequence[str] = PROFILED, top: int = 12) -> list[Profile]:
    """Profile ``rows`` (recipe row names) for ``gm_every`` steps each (at least 2), after two
    warm-up steps."""
    configs = recipe_configs()
    cuda = setup.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    out = []
    for name in rows:
        cfg = configs[name]
        options = {k: cfg.model[k] for k in METHOD_MODEL_OPTIONS}
        module = setup.module(objective=build_objective(cfg), **options)
        loop = PlainLoop(setup, module)
        steps = max(2, int(options["gm_every"]) if module.gm_due(None) else 2)
        for _ in range(2):
            loop()
        _sync(setup.device)
        with profile(activities=activities) as prof:
            for _ in range(steps):
                loop()
            _sync(setup.device)
        events = prof.key_averages()
        wall_ms = _wall_ms(prof) / steps

        def self_ms(e, steps: int = steps) -> float:
            # microseconds in the profile, per step in milliseconds
            total = e.self_device_time_total if cuda else e.self_cpu_time_total
            return total / 1000 / steps

        ranked = sorted(events, key=self_ms, reverse=True)
        total = sum(self_ms(e) for e in events)
        out.append(
            Profile(
                name=name,
                steps=steps,
                step_ms=wall_ms,
                device_ms=total if cuda else None,
                top=[
                    (e.key, round(e.count / steps), self_ms(e), self_ms(e) / total if total else 0)
                    for e in ranked[:top]
                ],
            )
        )
    return out


def _wall_ms(prof: profile) -> float:
    """Wall time the profile spans, in milliseconds (first event's start to last event's end)."""
    events = [e for e in prof.events() if e.time_range.end > 0]
    if not events:
        return 0.0
    start = min(e.time_range.start for e in events)
    end = max(e.time_range.end for e in events)
    return (end - start) / 1000


def profile_lines(profiles: Sequence[Profile]) -> list[str]:
    lines = ["### Where a step's time goes (torch.profiler, eager)", ""]
    for p in profiles:
        where = "device" if p.device_ms is not None else "CPU"
        head = f"**{p.name}**, {p.steps} steps: {p.step_ms:.1f} ms of wall time per step"
        if p.device_ms is not None:
            busy = p.device_ms / p.step_ms if p.step_ms else 0
            head += (
                f", of which the device is busy {p.device_ms:.1f} ms ({100 * busy:.0f} %; the "
                "rest is the host launching work, Python, and waiting)"
            )
        lines += [
            head,
            "",
            f"| operator | calls per step | {where} self ms per step | share |",
            "|---|---:|---:|---:|",
        ]
        lines += [
            f"| `{op}` | {calls} | {ms:.2f} | {100 * share:.1f} % |"
            for op, calls, ms, share in p.top
        ]
        lines.append("")
    return lines
