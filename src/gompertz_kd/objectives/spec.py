"""An objective as plain data: what a checkpoint records so that it can be rebuilt.

Every :class:`~gompertz_kd.objectives.Term` and :class:`~gompertz_kd.objectives.Objective`
remembers the arguments it was constructed with (:class:`Recorded`), so ::

    spec = objective.spec()                 # {"_target_": "gompertz_kd.objectives.objective.Objective",
                                            #  "terms": {"kd": {"term": {"_target_": ...}, ...}}, ...}
    rebuilt = objective_from_spec(spec)     # an equal, unbound objective

The spec holds only ``None``, booleans, numbers, strings, lists and string-keyed dicts, so it
travels inside a checkpoint's hyper-parameters and loads with ``torch.load(...,
weights_only=True)``; it has the shape of the Hydra method config (``_target_`` and the
constructor's arguments). :meth:`DistillationModule.load_from_checkpoint
<gompertz_kd.module.DistillationModule>` rebuilds the objective from it. Rebuilding never imports
or calls anything outside gompertz_kd's terms, objectives and schedules: a spec naming any
other ``_target_`` is refused.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
from collections.abc import Mapping
from typing import Any

__all__ = ["Recorded", "objective_from_spec", "to_spec"]

_TARGET = "_target_"
_SCHEDULES_MODULE = "gompertz_kd.schedules"


class Recorded:
    """Remembers the arguments of its constructor call, by parameter name, for :meth:`spec`.

    Captured in ``__new__`` (which sees the same arguments as ``__init__``), so a subclass needs
    nothing of its own.
    """

    _init_arguments: dict[str, Any] | None

    def __new__(cls, *args: Any, **kwargs: Any):
        self = super().__new__(cls)
        try:
            bound = inspect.signature(cls.__init__).bind(None, *args, **kwargs)
        except TypeError:  # __init__ raises its own error for these arguments
            arguments = None
        else:
            arguments = {}
            for i, (name, value) in enumerate(bound.arguments.items()):
                if i == 0:
                    continue  # self
                kind = inspect.signature(cls.__init__).parameters[name].kind
                if kind is inspect.Parameter.VAR_KEYWORD:
                    arguments.update(value)
                elif kind is inspect.Parameter.VAR_POSITIONAL:
                    arguments = None  # not expressible as keywords
                    break
                else:
                    arguments[name] = value
        object.__setattr__(self, "_init_arguments", arguments)
        return self

    def spec(self) -> dict[str, Any]:
        """``{"_target_": <class path>, <argument>: <value as plain data>, ...}``.

        Raises:
            TypeError: an argument is not plain data, a schedule, a term or an objective (named).
        """
        if self._init_arguments is None:
            raise TypeError(f"{type(self).__name__} was built with arguments a spec cannot record")
        where = type(self).__name__
        return {
            _TARGET: _path(type(self)),
            **{k: to_spec(v, f"{where}.{k}") for k, v in self._init_arguments.items()},
        }


def _path(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def to_spec(value: Any, where: str = "value") -> Any:
    """``value`` as plain data: terms, objectives and schedules become ``_target_`` dicts.

    Raises:
        TypeError: anything else that is not ``None``, a bool, number, string, list, tuple or a
            mapping with string keys, naming ``where``.
    """
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, Recorded):
        return value.spec()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        if type(value).__module__ != _SCHEDULES_MODULE:
            raise TypeError(f"{where}: cannot record a {type(value).__name__} in a spec")
        return {
            _TARGET: _path(type(value)),
            **{f.name: to_spec(getattr(value, f.name), where) for f in dataclasses.fields(value)},
        }
    if isinstance(value, list | tuple):
        return [to_spec(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, Mapping) and all(isinstance(k, str) for k in value):
        return {k: to_spec(v, f"{where}.{k}") for k, v in value.items()}
    raise TypeError(
        f"{where}: cannot record a {type(value).__name__} in a spec (plain data, schedules, terms "
        "and objectives only)"
    )


def _resolve(target: Any) -> type:
    """The class ``target`` names, if it is a gompertz_kd term, objective or schedule."""
    if not isinstance(target, str) or not target.startswith("gompertz_kd."):
        raise ValueError(f"spec: refusing _target_={target!r} (not a gompertz_kd class)")
    module_name, _, name = target.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError) as error:
        raise ValueError(f"spec: no class {target!r} ({error})") from error
    recorded = isinstance(cls, type) and issubclass(cls, Recorded)
    schedule = (
        isinstance(cls, type) and dataclasses.is_dataclass(cls) and module_name == _SCHEDULES_MODULE
    )
    if not (recorded or schedule):
        raise ValueError(f"spec: refusing _target_={target!r} (not a term, objective or schedule)")
    return cls


def _build(value: Any) -> Any:
    if isinstance(value, list):
        return [_build(v) for v in value]
    if isinstance(value, Mapping):
        if _TARGET in value:
            cls = _resolve(value[_TARGET])
            return cls(**{k: _build(v) for k, v in value.items() if k != _TARGET})
        return {k: _build(v) for k, v in value.items()}
    return value


def objective_from_spec(spec: Mapping[str, Any]):
    """The :class:`~gompertz_kd.objectives.Objective` a :meth:`Recorded.spec` describes, unbound.

    Raises:
        ValueError: the spec is not an objective's, or names a ``_target_`` outside gompertz_kd's
            terms, objectives and schedules.
    """
    from gompertz_kd.objectives.objective import Objective

    built = _build(spec)
    if not isinstance(built, Objective):
        raise ValueError(f"spec: not an objective's spec, got {type(built).__name__}")
    return built
