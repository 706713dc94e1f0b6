"""An objective: cross-entropy plus named distillation terms, each with a scale and a schedule.

    total = ce_weight * CE + sum_i  scale_i * schedule_i(progress) * term_i(step)

Every term's weight follows its own schedule (:mod:`gompertz_kd.schedules`): static, warm-up,
cosine decay, or the Gompertz curve of Gompertz-CNN, for any method.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

from torch import Tensor, nn

from gompertz_kd.objectives.base import Need, Networks, Step, Term
from gompertz_kd.objectives.spec import Recorded
from gompertz_kd.schedules import Gompertz, Schedule, Stage, make_schedule

__all__ = ["MIXINGS", "SHARED", "Objective", "gompertz_cnn"]

# A term whose schedule is SHARED (or unset) follows the objective's shared schedule: in configs,
# the run's `schedule` group, the one curve of Gompertz-CNN.
SHARED = "shared"
MIXINGS = ("additive", "convex")
# Term names become metric names (train/loss_<name>, <name>_weight) that the report parses.
_NAME = re.compile(r"^[a-z][a-z0-9]*$")


class Objective(Recorded, nn.Module):
    """Cross-entropy plus named distillation terms, each ``scale * schedule(progress)``.

    Args:
        terms: ``{name: {"term": Term, "scale": float, "schedule": spec}}`` in the order they are
            logged. ``scale`` (default 1) is the term's weight at its schedule's peak of 1; ``0``
            switches the term off entirely (never computed, no trainable parts). ``schedule`` is
            anything :func:`~gompertz_kd.schedules.make_schedule` reads (``"gompertz"``,
            ``"linear(t0=0.1)"``, a built schedule), or ``"shared"`` / ``None`` for ``schedule``.
            Names are lower-case letters and digits (they become ``train/loss_<name>`` and
            ``<name>_weight``), never ``ce``.
        ce_weight: weight of the cross-entropy on the true labels (``mixing="additive"``).
        mixing: ``"additive"`` keeps ``ce_weight`` constant; ``"convex"`` sets it to
            ``1 - weight of mixing_term`` (classic KD's ``(1 - a) CE + a KD``; that weight must
            stay <= 1); with that term switched off (scale 0) ``ce_weight`` applies.
        mixing_term: the term ``"convex"`` mixing pairs with the cross-entropy.
        schedule: the shared schedule (default ``Gompertz()``).
        field: config path of this objective, named in error messages.

    ``spec()`` gives the objective as plain data (its terms' and schedules' constructor
    arguments), from which :func:`~gompertz_kd.objectives.objective_from_spec` rebuilds it; a
    :class:`~gompertz_kd.module.DistillationModule` records it among its checkpoint's
    hyper-parameters.

    Raises:
        ValueError: naming ``<field>.<...>``: a bad name, a negative scale, an unreadable
            schedule, an unknown mixing, or convex mixing whose weight can exceed 1.
    """

    def __init__(
        self,
        terms: Mapping[str, Mapping[str, Any]] | None = None,
        ce_weight: float = 1.0,
        mixing: str = "additive",
        mixing_term: str = "kd",
        schedule: Schedule | str | Mapping | None = None,
        field: str = "method",
    ) -> None:
        super().__init__()
        if mixing not in MIXINGS:
            raise ValueError(f"{field}.mixing must be one of {MIXINGS}, got mixing={mixing!r}")
        if not ce_weight >= 0:
            raise ValueError(f"{field}.ce_weight must be >= 0, got ce_weight={ce_weight}")
        shared = Gompertz() if schedule is None else make_schedule(schedule, f"{field}.schedule")
        self.terms = nn.ModuleDict()
        declared = list(terms or {})
        self.scales: dict[str, float] = {}
        self.schedules: dict[str, Schedule] = {}
        for name, spec in (terms or {}).items():
            where = f"{field}.terms.{name}"
            if not _NAME.match(name) or name == "ce":
                raise ValueError(
                    f"{where}: term names are lower-case letters and digits (not 'ce'), got {name!r}"
                )
            if not isinstance(spec, Mapping) or not isinstance(spec.get("term"), Term):
                raise ValueError(
                    f"{where} must be a mapping with 'term' (a gompertz_kd.objectives Term), "
                    f"'scale' and 'schedule'; got {spec!r}"
                )
            unknown = set(spec) - {"term", "scale", "schedule"}
            if unknown:
                raise ValueError(
                    f"{where}: unknown key(s) {sorted(unknown)}; a term has term, scale, schedule"
                )
            scale = float(spec.get("scale", 1.0))
            if not scale >= 0:
                raise ValueError(f"{where}.scale must be >= 0, got scale={scale}")
            own = spec.get("schedule")
            schedule_ = shared if own in (None, SHARED) else make_schedule(own, f"{where}.schedule")
            if scale == 0:
                continue
            self.terms[name] = spec["term"]
            self.scales[name] = scale
            self.schedules[name] = schedule_
        self.ce_weight = float(ce_weight)
        self.mixing = mixing
        self.mixing_term = mixing_term
        if mixing == "convex" and mixing_term not in declared:
            raise ValueError(
                f"{field}.mixing=convex pairs the cross-entropy with term {mixing_term!r} "
                f"({field}.mixing_term), which this objective does not have: {declared or 'none'}"
            )
        if mixing == "convex" and mixing_term in self.terms:
            peak = self.scales[mixing_term] * self.schedules[mixing_term].peak
            if peak > 1:
                raise ValueError(
                    f"{field}.mixing=convex needs {mixing_term}_weight <= 1, but "
                    f"{field}.terms.{mixing_term}.scale * schedule peak = {peak}; lower the scale "
                    "or the schedule's w_max, or use mixing=additive"
                )

    # ------------------------------------------------------------------ structure
    @property
    def names(self) -> list[str]:
        """The terms that are on, in order."""
        return list(self.terms)

    @property
    def needs(self) -> frozenset[Need]:
        """Everything some term reads from a step."""
        return frozenset().union(*(t.needs for t in self.terms.values()))

    def names_needing(self, need: Need) -> list[str]:
        return [n for n, t in self.terms.items() if need in t.needs]

    def bind(self, networks: Networks) -> None:
        """Let every term build its trainable parts for these networks (once)."""
        for term in self.terms.values():
            term.bind(networks)

    # ------------------------------------------------------------------ weights
    def weights_at(self, progress: float) -> dict[str, float]:
        """``{"ce_weight": ..., "<name>_weight": ...}`` at ``progress`` in ``[0, 1]``."""
        weights = {f"{n}_weight": s * self.schedules[n](progress) for n, s in self.scales.items()}
        ce = (
            1.0 - weights[f"{self.mixing_term}_weight"]
            if self.mixing == "convex" and self.mixing_term in self.terms
            else self.ce_weight
        )
        return {"ce_weight": ce, **weights}

    def stage_at(self, progress: float) -> Stage | None:
        """Stage of the first term's schedule when it is a Gompertz curve, else ``None``."""
        first = next(iter(self.schedules.values()), None)
        return first.stage(progress) if isinstance(first, Gompertz) else None

    # ------------------------------------------------------------------ losses
    def forward(self, step: Step, names: Iterable[str] | None = None) -> dict[str, Tensor]:
        """``{"loss_<name>": unweighted scalar}`` for ``names`` (default: every term on)."""
        wanted = self.names if names is None else list(names)
        return {f"loss_{n}": self.terms[n](step) for n in wanted}

    def extra_repr(self) -> str:
        parts = [f"{n}: scale={self.scales[n]}, schedule={self.schedules[n]}" for n in self.terms]
        return f"mixing={self.mixing}, ce_weight={self.ce_weight}; " + "; ".join(parts)


def gompertz_cnn(
    kd_scale: float = 1.0,
    wd_scale: float = 0.0,
    gm_scale: float = 0.0,
    schedule: Schedule | str | None = None,
    kd_schedule: Schedule | str | None = None,
    wd_schedule: Schedule | str | None = None,
    gm_schedule: Schedule | str | None = None,
    mixing: str = "additive",
    ce_weight: float = 1.0,
    temperature: float = 4.0,
    standardize: bool = False,
    wd_pairs: Iterable[Iterable[int]] = ((-1, -1),),
    wd_variant: str = "gaussian",
    wd_reduction: str = "mean",
    wd_projections: int = 64,
) -> Objective:
    """The Gompertz-CNN objective in Python (the twin of ``conf/method/gompertz_cnn.yaml``):
    KD + Wasserstein feature term + gradient matching, each ``<term>_scale`` times its own
    schedule or the shared ``schedule`` (default ``Gompertz()``). A ``0`` scale leaves the term
    out, so ``gompertz_cnn()`` alone is KD under the Gompertz curve."""
    from gompertz_kd.objectives.gradient_matching import GradientMatching
    from gompertz_kd.objectives.kd import KD
    from gompertz_kd.objectives.wasserstein import Wasserstein

    return Objective(
        terms={
            "kd": {
                "term": KD(temperature, standardize),
                "scale": kd_scale,
                "schedule": kd_schedule,
            },
            "wd": {
                "term": Wasserstein(wd_pairs, wd_variant, wd_reduction, wd_projections),
                "scale": wd_scale,
                "schedule": wd_schedule,
            },
            "gm": {"term": GradientMatching(), "scale": gm_scale, "schedule": gm_schedule},
        },
        ce_weight=ce_weight,
        mixing=mixing,
        mixing_term="kd",
        schedule=schedule,
    )
