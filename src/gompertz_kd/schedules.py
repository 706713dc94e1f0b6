"""Loss-weight schedules: pure functions of training progress ``t`` in ``[0, 1]``.

Every schedule has one interface, ``schedule(progress) -> weight``. None of them knows what an
epoch or a step is: the :class:`~gompertz_kd.callbacks.GompertzWeightCallback` turns the trainer's
position (or the student's learning trajectory) into a progress value and asks the schedules.

The centre is the Gompertz growth curve of Gompertz-CNN,

    w(t) = w_max * exp(-b * exp(-c * t)),

which starts near ``w_max * e^{-b}`` (slow start), rises fastest at its inflection point
``t* = ln(b) / c`` where ``w = w_max / e``, and levels off towards ``w_max`` (late saturation).
The others exist for ablations: constant, DKD-style linear warm-up, WKD-style cosine decay and the
symmetric logistic curve.
"""

from __future__ import annotations

import bisect
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from enum import IntEnum
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from gompertz_kd.run_files import STAGE_NAMES

__all__ = [
    "Constant",
    "CosineDecay",
    "Gompertz",
    "LinearWarmup",
    "Logistic",
    "Piecewise",
    "Schedule",
    "Stage",
    "SCHEDULES",
    "check_progress",
    "gompertz",
    "make_schedule",
]

# Roots of u^2 - 3u + 1 = 0 with u = b * exp(-c t): where the third derivative of the Gompertz curve
# vanishes, i.e. where its acceleration peaks (lag -> growth) and its deceleration peaks
# (growth -> saturation). A standard, parameter-free way to cut a sigmoid into three phases.
_U_LAG_END = (3.0 + math.sqrt(5.0)) / 2.0
_U_GROWTH_END = (3.0 - math.sqrt(5.0)) / 2.0


def _require(condition: bool, name: str, value: object, expected: str) -> None:
    if not condition:
        raise ValueError(f"{name} must be {expected}, got {name}={value!r}")


def check_progress(t: float | Tensor) -> None:
    """Raise ``ValueError`` unless every progress value lies in ``[0, 1]`` (NaN included)."""
    if isinstance(t, Tensor):
        ok = bool(((t >= 0) & (t <= 1)).all())
        shown: object = t if t.numel() <= 8 else f"tensor with min {t.min()} and max {t.max()}"
    else:
        ok = 0.0 <= t <= 1.0
        shown = t
    _require(ok, "progress", shown, "in [0, 1]")


def _exp(x: float | Tensor) -> float | Tensor:
    return torch.exp(x) if isinstance(x, Tensor) else math.exp(x)


def gompertz(t: float | Tensor, w_max: float, b: float, c: float) -> float | Tensor:
    """The Gompertz curve ``w_max * exp(-b * exp(-c * t))``.

    Args:
        t: training progress in ``[0, 1]``, a float or a tensor of any shape.
        w_max: upper asymptote (the weight the curve saturates at), ``>= 0``.
        b: displacement, ``> 0``; ``w(0) = w_max * e^{-b}``, so larger ``b`` starts lower.
        c: growth rate, ``> 0``; larger ``c`` rises sooner and more steeply.

    Returns:
        The weight, a float for a float ``t`` and a tensor of ``t``'s shape otherwise.

    Raises:
        ValueError: naming the parameter when ``b <= 0``, ``c <= 0``, ``w_max < 0`` or ``t`` is
            outside ``[0, 1]``.
    """
    _check_gompertz_params(w_max, b, c)
    check_progress(t)
    return w_max * _exp(-b * _exp(-c * t))


def _check_gompertz_params(w_max: float, b: float, c: float) -> None:
    _require(w_max >= 0, "w_max", w_max, ">= 0")
    _require(b > 0, "b", b, "> 0")
    _require(c > 0, "c", c, "> 0")


@runtime_checkable
class Schedule(Protocol):
    """What every schedule offers: ``schedule(progress) -> weight`` and its largest value."""

    def __call__(self, progress: float) -> float: ...

    @property
    def peak(self) -> float: ...


# Phase of a Gompertz curve (LAG, GROWTH, SATURATION, from gompertz_kd.run_files.STAGE_NAMES);
# an int so it can be logged as a metric.
Stage = IntEnum(
    "Stage",
    [(name.upper(), value) for value, name in enumerate(STAGE_NAMES)],
    module=__name__,
    qualname="Stage",
)


@dataclass(frozen=True)
class Gompertz:
    """Gompertz weight schedule ``w(t) = w_max * exp(-b * exp(-c * t))`` (see :func:`gompertz`).

    Stages are cut where the curve's third derivative vanishes (``b e^{-ct} = (3 ± √5)/2``): *lag*
    until its acceleration peaks at :attr:`lag_end`, *growth* until its deceleration peaks at
    :attr:`growth_end`, *saturation* after. The inflection point :attr:`inflection` lies between.
    These boundaries may fall outside ``[0, 1]`` (e.g. ``b < 2.618`` has no lag within training).
    """

    w_max: float = 1.0
    b: float = 10.0
    c: float = 6.0

    def __post_init__(self) -> None:
        _check_gompertz_params(self.w_max, self.b, self.c)

    def __call__(self, progress: float) -> float:
        return gompertz(progress, self.w_max, self.b, self.c)

    @property
    def peak(self) -> float:
        return self.w_max

    @property
    def inflection(self) -> float:
        """Progress ``t* = ln(b) / c`` of fastest growth, where ``w = w_max / e``."""
        return math.log(self.b) / self.c

    @property
    def lag_end(self) -> float:
        """Progress where the lag stage ends (peak acceleration)."""
        return math.log(self.b / _U_LAG_END) / self.c

    @property
    def growth_end(self) -> float:
        """Progress where the growth stage ends and saturation begins (peak deceleration)."""
        return math.log(self.b / _U_GROWTH_END) / self.c

    def stage(self, progress: float) -> Stage:
        """Which stage ``progress`` falls in."""
        check_progress(progress)
        if progress < self.lag_end:
            return Stage.LAG
        if progress < self.growth_end:
            return Stage.GROWTH
        return Stage.SATURATION


@dataclass(frozen=True)
class Constant:
    """The same weight at every step (static KD)."""

    value: float = 1.0

    def __post_init__(self) -> None:
        _require(self.value >= 0, "value", self.value, ">= 0")

    def __call__(self, progress: float) -> float:
        check_progress(progress)
        return self.value

    @property
    def peak(self) -> float:
        return self.value


@dataclass(frozen=True)
class LinearWarmup:
    """DKD-style warm-up ``w_max * min(t / t0, 1)``: linear ramp, then flat."""

    w_max: float = 1.0
    t0: float = 0.1

    def __post_init__(self) -> None:
        _require(self.w_max >= 0, "w_max", self.w_max, ">= 0")
        _require(0 < self.t0 <= 1, "t0", self.t0, "in (0, 1]")

    def __call__(self, progress: float) -> float:
        check_progress(progress)
        return self.w_max * min(progress / self.t0, 1.0)

    @property
    def peak(self) -> float:
        return self.w_max


@dataclass(frozen=True)
class CosineDecay:
    """WKD-style cosine decay from ``w_max`` to ``w_min`` at ``t = 1``, starting at ``start``:
    ``w_max`` until ``start``, then ``w_min + (w_max - w_min) * (1 + cos(pi * s)) / 2`` with
    ``s = (t - start) / (1 - start)``."""

    w_max: float = 1.0
    w_min: float = 0.0
    start: float = 0.0

    def __post_init__(self) -> None:
        _require(self.w_min >= 0, "w_min", self.w_min, ">= 0")
        _require(self.w_max >= self.w_min, "w_max", self.w_max, f">= w_min ({self.w_min})")
        _require(0 <= self.start < 1, "start", self.start, "in [0, 1)")

    def __call__(self, progress: float) -> float:
        check_progress(progress)
        s = max(progress - self.start, 0.0) / (1.0 - self.start)
        return self.w_min + (self.w_max - self.w_min) * 0.5 * (1.0 + math.cos(math.pi * s))

    @property
    def peak(self) -> float:
        return self.w_max


@dataclass(frozen=True)
class Logistic:
    """Logistic curve ``w_max / (1 + exp(-k * (t - t_mid)))``: the symmetric counterpart of the
    Gompertz curve (same S shape, but the lag and saturation mirror each other around ``t_mid``)."""

    w_max: float = 1.0
    k: float = 12.0
    t_mid: float = 0.4

    def __post_init__(self) -> None:
        _require(self.w_max >= 0, "w_max", self.w_max, ">= 0")
        _require(self.k > 0, "k", self.k, "> 0")
        _require(0 <= self.t_mid <= 1, "t_mid", self.t_mid, "in [0, 1]")

    def __call__(self, progress: float) -> float:
        check_progress(progress)
        return self.w_max / (1.0 + math.exp(-self.k * (progress - self.t_mid)))

    @property
    def peak(self) -> float:
        return self.w_max


@dataclass(frozen=True)
class Piecewise:
    """A step function of progress: ``values[0]`` before ``boundaries[0]``, ``values[i]`` from
    ``boundaries[i - 1]`` on. The schedule population-based training finds
    (:mod:`gompertz_kd.pbt`): each segment is the weight one member of the winning lineage trained
    with, so replaying it from scratch tests the schedule rather than the lucky seed.

    Written ``piecewise(1.0, 0.25:1.2, 0.5:0.96)`` (the first value, then ``progress:value`` where
    a new value starts), as a mapping ``{name: piecewise, boundaries: [0.25, 0.5], values: [1.0,
    1.2, 0.96]}``, or ``piecewise(file=<path>)`` naming a JSON or YAML file with that mapping.
    """

    boundaries: tuple[float, ...] = ()
    values: tuple[float, ...] = (1.0,)

    def __post_init__(self) -> None:
        object.__setattr__(self, "boundaries", tuple(float(b) for b in self.boundaries))
        object.__setattr__(self, "values", tuple(float(v) for v in self.values))
        _require(
            len(self.values) == len(self.boundaries) + 1,
            "values",
            list(self.values),
            f"one more value than boundaries ({len(self.boundaries)} boundaries)",
        )
        _require(all(v >= 0 for v in self.values), "values", list(self.values), "all >= 0")
        edges = (0.0, *self.boundaries, 1.0)
        _require(
            all(a < b for a, b in zip(edges, edges[1:], strict=False)),
            "boundaries",
            list(self.boundaries),
            "strictly increasing inside (0, 1)",
        )

    def __call__(self, progress: float) -> float:
        check_progress(progress)
        return self.values[bisect.bisect_right(self.boundaries, progress)]

    @property
    def peak(self) -> float:
        return max(self.values)

    def text(self) -> str:
        """The schedule as a command line writes it: ``piecewise(1.0, 0.25:1.2)``."""
        # repr: the shortest text that reads back to the same float (a rounded boundary could
        # move a switch by a step, a rounded cap break convex mixing's weight <= 1)
        parts = [repr(self.values[0])]
        parts += [f"{b!r}:{v!r}" for b, v in zip(self.boundaries, self.values[1:], strict=True)]
        return f"piecewise({', '.join(parts)})"


# Schedule shapes by the names configs and command lines use.
SCHEDULES: dict[str, type] = {
    "gompertz": Gompertz,
    "constant": Constant,
    "linear": LinearWarmup,
    "cosine": CosineDecay,
    "logistic": Logistic,
    "piecewise": Piecewise,
}


def _piecewise(args: str, field: str, spec: str) -> Piecewise:
    """``piecewise(...)``'s arguments: ``v0, t1:v1, ...`` or ``file=<path>``."""
    items = [a.strip() for a in args.split(",") if a.strip()]
    if len(items) == 1 and items[0].startswith("file="):
        path = Path(items[0][len("file=") :].strip().strip("'\""))
        if not path.is_file():
            raise ValueError(f"{field}={spec!r}: no schedule file {path}")
        import yaml

        loaded = yaml.safe_load(path.read_text())  # JSON is YAML
        if not isinstance(loaded, Mapping):
            raise ValueError(f"{field}: {path} must hold a mapping with boundaries and values")
        loaded = {k: v for k, v in loaded.items() if k != "name"}
        return make_schedule({"name": "piecewise", **loaded}, field)
    boundaries, values = [], []
    try:
        for i, item in enumerate(items):
            if i == 0:
                values.append(float(item))
                continue
            at, sep, value = item.partition(":")
            if not sep:
                raise ValueError
            boundaries.append(float(at))
            values.append(float(value))
    except ValueError:
        raise ValueError(
            f"{field}={spec!r}: write piecewise(<first value>, <progress>:<value>, ...), e.g. "
            "'piecewise(1.0, 0.25:1.2, 0.5:0.96)', or piecewise(file=<path>)"
        ) from None
    try:
        return Piecewise(tuple(boundaries), tuple(values or [1.0]))
    except ValueError as error:
        raise ValueError(f"{field}: {error}") from None


_SPEC = re.compile(r"^\s*([a-z_]+)\s*(?:\((.*)\))?\s*$")


def make_schedule(spec: object, field: str = "schedule") -> Schedule:
    """A schedule from what a config or a notebook gives.

    Args:
        spec: a built schedule (returned as is); a name from :data:`SCHEDULES` (``"gompertz"``),
            optionally with parameters (``"gompertz(b=5, c=8)"``, ``"linear(t0=0.2)"``); or a
            mapping ``{"name": "gompertz", "b": 5}``. A name alone gives the class defaults,
            whose peak is 1 (``Gompertz(w_max=1, b=10, c=6)``, ``Constant(1)``,
            ``LinearWarmup(1, t0=0.1)``, ``CosineDecay(1, 0)``, ``Logistic(1, 12, 0.4)``), so a
            term's ``scale`` is its weight at the peak.
        field: the config field being read, named in errors.

    Raises:
        ValueError: naming ``field``: an unknown name, an unknown or non-numeric parameter, or a
            parameter out of range (the schedule's own check).
    """
    if isinstance(spec, Schedule) and not isinstance(spec, str | Mapping):
        return spec
    if isinstance(spec, Mapping):
        params = dict(spec)
        name = params.pop("name", None)
    elif isinstance(spec, str):
        match = _SPEC.match(spec)
        if match is None:
            raise ValueError(
                f"{field}={spec!r} is not a schedule: write a name ({', '.join(SCHEDULES)}), "
                "optionally with parameters, e.g. 'gompertz(b=5, c=8)'"
            )
        name, args = match.group(1), match.group(2)
        if name == "piecewise":
            return _piecewise(args or "", field, spec)
        params = {}
        for item in filter(None, (a.strip() for a in (args or "").split(","))):
            key, _, value = item.partition("=")
            try:
                params[key.strip()] = float(value)
            except ValueError:
                raise ValueError(
                    f"{field}={spec!r}: parameter {item!r} must be written key=<number>"
                ) from None
    else:
        raise ValueError(f"{field}={spec!r} is not a schedule name, mapping or schedule object")
    if name not in SCHEDULES:
        raise ValueError(
            f"{field}: unknown schedule {name!r}; choose one of {', '.join(SCHEDULES)}"
        )
    cls = SCHEDULES[name]
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(params) - known)
    if unknown:
        raise ValueError(
            f"{field}: schedule {name!r} has no parameter {', '.join(unknown)}; "
            f"its parameters are {', '.join(sorted(known))}"
        )
    try:
        return cls(**params)
    except ValueError as error:
        raise ValueError(f"{field}: {error}") from None
