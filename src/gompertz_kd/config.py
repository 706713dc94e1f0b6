"""Configuration plumbing: where ``conf/`` is, the schedule schemas, and the config tree printout.

The schedule configs (``conf/schedule/*.yaml``) extend structured schemas registered here, so a
misspelt key (``schedule.bb=3``) or a wrong type (``schedule.b=fast``) fails while Hydra composes
the config, with Hydra's own message, before anything is built. Value ranges (``b > 0``) are
checked by the schedule classes themselves as the first step of :func:`gompertz_kd.train.train`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import rich.syntax
import rich.tree
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf
from rich.console import Console

__all__ = ["CONFIG_DIR", "ROOT_DIR", "print_config_tree", "register_configs"]

# The checkout: src/gompertz_kd/config.py -> parents[2]. conf/ sits at its top level.
ROOT_DIR = Path(__file__).resolve().parents[2]
CONFIG_DIR = ROOT_DIR / "conf"


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
    return str(ROOT_DIR)


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
