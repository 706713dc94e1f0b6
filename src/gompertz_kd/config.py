"""Configuration plumbing: where ``conf/`` is, the schedule schemas, and the config tree printout.

The configs ship inside the package (``gompertz_kd/conf``; in a checkout a link to its top-level
``conf/``). Runs, teachers and caches go below ``paths.root_dir``: the checkout's top level when
the package runs from a checkout, else the working directory (an installed package never writes
beside its own files); ``GOMPERTZ_KD_ROOT`` or ``paths.*`` overrides either. Your own configs:
``hydra.searchpath=[file:///path/to/conf]`` (e.g. an ``experiment/mine.yaml`` there).

The schedule configs (``conf/schedule/*.yaml``) extend structured schemas registered here, so a
misspelt key (``schedule.bb=3``) or a wrong type (``schedule.b=fast``) fails while Hydra composes
the config, with Hydra's own message, before anything is built. Value ranges (``b > 0``) are
checked by the schedule classes themselves as the first step of :func:`gompertz_kd.train.train`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import rich.syntax
import rich.tree
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf
from rich.console import Console

__all__ = ["CONFIG_DIR", "ROOT_DIR", "print_config_tree", "register_configs"]

PACKAGE_DIR = Path(__file__).resolve().parent
CONFIG_DIR = (PACKAGE_DIR / "conf").resolve()
# The checkout this package runs from (src/gompertz_kd -> parents[1]), or None when installed.
_CHECKOUT = PACKAGE_DIR.parents[1]
ROOT_DIR: Path | None = (
    _CHECKOUT
    if (_CHECKOUT / "pyproject.toml").is_file() and (_CHECKOUT / "conf").is_dir()
    else None
)


# Types and names only: the values live in conf/schedule/*.yaml.
@dataclass
class GompertzSchema:
    _target_: str = "gompertz_kd.schedules.Gompertz"
    w_max: float = MISSING
    b: float = MISSING
    c: float = MISSING


@dataclass
class ConstantSchema:
    _target_: str = "gompertz_kd.schedules.Constant"
    value: float = MISSING


@dataclass
class LinearSchema:
    _target_: str = "gompertz_kd.schedules.LinearWarmup"
    w_max: float = MISSING
    t0: float = MISSING


@dataclass
class CosineSchema:
    _target_: str = "gompertz_kd.schedules.CosineDecay"
    w_max: float = MISSING
    w_min: float = MISSING
    start: float = 0.0


@dataclass
class LogisticSchema:
    _target_: str = "gompertz_kd.schedules.Logistic"
    w_max: float = MISSING
    k: float = MISSING
    t_mid: float = MISSING


_SCHEMAS = {
    "gompertz_schema": GompertzSchema,
    "constant_schema": ConstantSchema,
    "linear_schema": LinearSchema,
    "cosine_schema": CosineSchema,
    "logistic_schema": LogisticSchema,
}


def _root_resolver() -> str:
    """``${gkd.root:}``: the checkout, or the working directory of an installed package."""
    return str(ROOT_DIR) if ROOT_DIR is not None else os.getcwd()


def register_configs() -> None:
    """Register the schemas and the ``${gkd.root:}`` resolver (idempotent)."""
    store = ConfigStore.instance()
    for name, schema in _SCHEMAS.items():
        store.store(group="schedule", name=name, node=schema)
    if not OmegaConf.has_resolver("gkd.root"):
        OmegaConf.register_new_resolver("gkd.root", _root_resolver)


register_configs()


def print_config_tree(cfg: DictConfig, save_to: Path | None = None) -> None:
    """Print the resolved config as a rich tree (one branch per top-level group); optionally also
    write the same text to ``save_to``."""
    style = "dim"
    tree = rich.tree.Tree("CONFIG", style=style, guide_style=style)
    first = ["data", "model", "teacher", "schedule", "trainer", "callbacks", "logger", "paths"]
    keys = [k for k in first if k in cfg] + [k for k in cfg if k not in first]
    for key in keys:
        branch = tree.add(str(key), style=style, guide_style=style)
        value = cfg[key]
        text = (
            OmegaConf.to_yaml(value, resolve=True) if isinstance(value, DictConfig) else str(value)
        )
        branch.add(rich.syntax.Syntax(text, "yaml"))
    rich.print(tree)
    if save_to is not None:
        save_to.parent.mkdir(parents=True, exist_ok=True)
        with save_to.open("w") as f:
            Console(file=f, width=120, color_system=None).print(tree)
