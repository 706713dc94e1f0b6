"""The parts every training run is made of, shared by the single run (:mod:`gompertz_kd.train`)
and the population (:mod:`gompertz_kd.population`): checking a config before any work, building
objects from it (data, module, objective, Trainer, callbacks, loggers), finding the checkpoint to
resume, fitting, and what a run records about itself (overrides, commit, atomic JSON).

Neither kind of run is imported here: both build on this module, and the entry point
(:func:`gompertz_kd.run.run_config`) chooses between them.
"""

from __future__ import annotations

import csv
import json
import os
import shlex
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning.pytorch.loggers import CSVLogger
from omegaconf import DictConfig, OmegaConf

from gompertz_kd.checkpoints import (
    AtomicCheckpointIO,
    check_training_checkpoint_fits,
    newest_valid_checkpoint,
    read_training_checkpoint,
)
from gompertz_kd.config import ROOT_DIR
from gompertz_kd.data.sources import DATASETS
from gompertz_kd.models import list_models
from gompertz_kd.models.registry import TIMM_PREFIX
from gompertz_kd.module import COMPILE_SETTINGS, DistillationModule
from gompertz_kd.objectives import SHARED, Objective

__all__ = [
    "TrainingRun",
    "build",
    "build_module",
    "build_objective",
    "build_trainer",
    "check_config",
    "check_model_name",
    "continue_csv_history",
    "fit",
    "git_commit",
    "instantiate_group",
    "is_global_zero",
    "metric_value",
    "resume_checkpoint",
    "resume_command",
    "resume_path",
    "task_overrides",
    "write_json_atomically",
]


@dataclass
class TrainingRun:
    """What a finished run leaves in memory: its results (a population's: member name -> its
    results), and the trained module and Trainer."""

    results: dict[str, Any]
    module: L.LightningModule  # a DistillationModule, or a population's PopulationModule
    trainer: L.Trainer


def fit(
    cfg: DictConfig,
    trainer: L.Trainer,
    module: L.LightningModule,
    datamodule,
    loggers: list[Any],
    resume: tuple[Path, str, Mapping[str, Any]] | None,
    expected: Mapping[str, Any],
) -> None:
    """``trainer.fit``, from the resume checkpoint when there is one (checked to fit
    ``expected``, the state the module saves), its CSV history continued and the config logged.

    Raises:
        CheckpointError: the resume checkpoint is of another model or objective.
        RuntimeError: training was interrupted (no results are written).
    """
    resume_from = None
    if resume is not None:
        path, name, ckpt = resume
        check_training_checkpoint_fits(ckpt, name, expected)
        resume_from = str(path)
        del resume, ckpt  # the mapped file is not needed once checked
        continue_csv_history(loggers)
    for logger in loggers:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    trainer.fit(module, datamodule=datamodule, ckpt_path=resume_from)
    if trainer.interrupted:
        raise RuntimeError("training was interrupted; no results.json written")


def build_module(
    cfg: DictConfig,
    num_classes: int,
    teacher_ckpt: str | None,
    objective: Objective | None = None,
    num_train_samples: int | None = None,
) -> DistillationModule:
    """The DistillationModule of ``cfg`` for a data set of ``num_classes`` classes, training on
    ``objective`` (default: built from ``cfg.method``). A method without terms trains the student
    alone: no teacher is built."""
    if objective is None:
        objective = build_objective(cfg)
    return build(
        cfg.model,
        num_classes=num_classes,
        teacher_ckpt=teacher_ckpt,
        objective=objective,
        num_train_samples=num_train_samples,
        teacher=cfg.model.get("teacher") if objective.terms else None,
        _convert_="all",
    )


def build_trainer(cfg: DictConfig, callbacks: list[Any], loggers: list[Any]) -> L.Trainer:
    """The Trainer of ``cfg.trainer`` with these callbacks and loggers, writing checkpoints
    through :class:`~gompertz_kd.checkpoints.AtomicCheckpointIO` (a temporary name, fsync, an
    atomic rename), so a killed run never leaves a half-written checkpoint under a real name."""
    plugins = list(cfg.trainer.get("plugins") or [])
    return build(
        cfg.trainer,
        callbacks=callbacks,
        logger=loggers or False,
        plugins=[*plugins, AtomicCheckpointIO()],
    )


# torch.compile's modes (``compile_mode``; ``None``: its default)
COMPILE_MODES = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def compile_options(cfg: DictConfig) -> dict[str, Any]:
    """``torch.compile``'s keywords from the run's ``compile_mode``."""
    mode = cfg.get("compile_mode")
    return {} if mode is None else {"mode": str(mode)}


def build_objective(cfg: DictConfig) -> Objective:
    """The :class:`~gompertz_kd.objectives.Objective` of ``cfg.method`` (its terms unbound)."""
    return build(cfg.method, _convert_="all")


def check_config(cfg: DictConfig) -> Objective:
    """Reject values no run can use, naming the field, before any data is read or a teacher is
    trained: model and data set names, the method (its terms, scales and schedules, checked as it
    is built) and the shared schedule's parameters, learning rates, epoch counts, batch sizes.

    Returns:
        The run's objective, built (its terms not yet bound to networks).

    Raises:
        ValueError: ``<field>=<value>`` and what it must be.
    """
    build(cfg.schedule)
    for role in ("student", "teacher"):
        name = cfg.model.get(role)
        if name is not None:
            check_model_name(str(name), f"model.{role}")
    dataset = cfg.data.get("dataset")
    if dataset not in DATASETS:
        raise ValueError(
            f"data.dataset={dataset!r} is not one of {', '.join(DATASETS)}; use data=cifar10 or data=cifar100"
        )
    objective = build_objective(cfg)
    if objective.terms and not cfg.model.get("teacher"):
        raise ValueError(
            f"method terms {objective.names} distil from a teacher but model.teacher is null; "
            "set model.teacher=<name>, or method=student to train the student alone"
        )
    _check_shared_schedule_used(cfg, objective)
    problems = []
    lr = cfg.model.get("lr")
    if lr is not None and not lr > 0:
        problems.append(f"model.lr={lr} must be > 0 (or null for the benchmark's default)")
    epochs, steps = cfg.trainer.get("max_epochs"), cfg.trainer.get("max_steps", -1)
    if (epochs is None or epochs < 1) and not (steps is not None and steps > 0):
        problems.append(f"trainer.max_epochs={epochs} must be >= 1 (or set trainer.max_steps > 0)")
    if not cfg.data.get("batch_size", 1) >= 1:
        problems.append(f"data.batch_size={cfg.data.batch_size} must be >= 1")
    recipe = cfg.get("teacher", {}).get("recipe") if objective.terms else None
    if recipe is not None:
        if not recipe.lr > 0:
            problems.append(f"teacher.recipe.lr={recipe.lr} must be > 0")
        if not recipe.max_epochs >= 1:
            problems.append(f"teacher.recipe.max_epochs={recipe.max_epochs} must be >= 1")
        if not recipe.batch_size >= 1:
            problems.append(f"teacher.recipe.batch_size={recipe.batch_size} must be >= 1")
    if cfg.get("compile") not in COMPILE_SETTINGS:
        problems.append(
            f"compile={cfg.get('compile')!r} must be one of false, true (the networks), "
            "networks or step (the whole step's forward as one graph)"
        )
    if cfg.get("compile_mode") not in COMPILE_MODES:
        problems.append(
            f"compile_mode={cfg.get('compile_mode')!r} must be null or one of "
            f"{', '.join(m for m in COMPILE_MODES if m)} (reduce-overhead: CUDA graphs)"
        )
    problems += _device_problems(cfg.trainer)
    if problems:
        raise ValueError("invalid configuration: " + "; ".join(problems))
    return objective


def _check_shared_schedule_used(cfg: DictConfig, objective: Objective) -> None:
    """A command line that sets the shared ``schedule`` for a method none of whose terms follow
    it would change nothing: say so instead of running."""
    overrides = [o.lstrip("+~") for o in task_overrides()]
    touched = [o for o in overrides if o.split("=", 1)[0].split(".")[0] == "schedule"]
    if HydraConfig.initialized():
        params = HydraConfig.get().sweeper.get("params") or {}
        touched += [k for k in params if str(k).split(".")[0] == "schedule"]
    if not touched or not objective.terms:
        return
    shared = [
        name
        for name, term in (cfg.method.get("terms") or {}).items()
        if name in objective.terms and term.get("schedule") in (None, SHARED)
    ]
    if not shared:
        raise ValueError(
            f"{touched[0]} sets the shared schedule, but no term of this method follows it "
            f"(each of {objective.names} has its own); set a term's schedule instead, e.g. "
            f"method.terms.{objective.names[0]}.schedule=gompertz, or make it follow the shared "
            f"one with method.terms.{objective.names[0]}.schedule=shared"
        )


def check_model_name(name: str, field: str) -> None:
    """Raise ``ValueError`` naming ``field`` unless ``name`` is a zoo model or a known
    ``timm/<name>``, without building anything."""
    if name.startswith(TIMM_PREFIX):
        import timm

        if timm.is_model(name[len(TIMM_PREFIX) :]):
            return
        raise ValueError(
            f"{field}={name}: timm has no model {name[len(TIMM_PREFIX) :]!r} (timm.list_models() lists them)"
        )
    if name not in list_models():
        raise ValueError(
            f"{field}={name}: unknown model {name!r}; valid zoo names: {', '.join(list_models())}; "
            f"or '{TIMM_PREFIX}<name>' for any timm model"
        )


def _device_problems(trainer: DictConfig) -> list[str]:
    accelerator, devices = str(trainer.get("accelerator", "auto")), trainer.get("devices", "auto")
    if accelerator not in ("gpu", "cuda"):
        return []
    available = torch.cuda.device_count()
    if available == 0:
        return [
            f"trainer.accelerator={accelerator} but no CUDA GPU is visible here; use trainer=cpu"
        ]
    if isinstance(devices, int) and devices > available:
        return [
            f"trainer.devices={devices} but this machine has {available} GPU(s); use trainer.devices<={available}"
        ]
    return []


def resume_path(
    cfg: DictConfig, output_dir: Path, expected: Mapping[str, Any] | None = None
) -> str | None:
    """The checkpoint ``ckpt_path`` names (``"last"``: this run directory's ``last.ckpt``), checked
    to be a Lightning training checkpoint that fits this run's module, whose ``state_dict()`` is
    ``expected`` (not compared when ``None``); ``None`` when ``ckpt_path`` is unset.

    Raises:
        FileNotFoundError: no file there.
        CheckpointError: see :func:`read_training_checkpoint` and :func:`check_training_checkpoint_fits`.
    """
    resume = resume_checkpoint(cfg, output_dir)
    if resume is None:
        return None
    path, name, ckpt = resume
    if expected is not None:
        check_training_checkpoint_fits(ckpt, name, expected)
    return str(path)


def resume_checkpoint(
    cfg: DictConfig, output_dir: Path
) -> tuple[Path, str, Mapping[str, Any]] | None:
    """``(path, how messages name it, the checkpoint read with mmap)`` for ``ckpt_path``, checked
    to be a Lightning training checkpoint; ``None`` when ``ckpt_path`` is unset."""
    ckpt_path = cfg.get("ckpt_path")
    if ckpt_path in (None, ""):
        return None
    if ckpt_path == "last":
        return newest_valid_checkpoint(output_dir / "checkpoints")
    path = Path(ckpt_path).expanduser().resolve()
    if not path.exists():
        raise FileNotFoundError(f"ckpt_path={ckpt_path}: no such checkpoint file ({path})")
    name = f"ckpt_path={path}"
    return path, name, read_training_checkpoint(path, name)


def continue_csv_history(loggers: list[Any]) -> None:
    """A resumed run appends to its metrics.csv instead of starting it afresh: keep the file
    Lightning's CSV writer deletes on creation, and tell the writer the columns already there."""
    for logger in loggers:
        if isinstance(logger, CSVLogger):
            metrics = Path(logger.log_dir) / "metrics.csv"
            if not metrics.is_file():
                continue
            history = metrics.read_bytes()
            with metrics.open(newline="") as f:
                header = next(csv.reader(f), [])
            writer = logger.experiment  # a new writer deletes the file it finds: put it back
            metrics.write_bytes(history)
            writer.metrics_keys = list(header)


def build(node: DictConfig, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate``, but a user error raised by the object's constructor
    (``ValueError``, ``FileNotFoundError``, ``CheckpointError``) surfaces as itself, with its own
    message, rather than wrapped in Hydra's ``InstantiationException``."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as err:
        if isinstance(err.__cause__, ValueError | FileNotFoundError):
            raise err.__cause__ from None
        raise


def instantiate_group(group: DictConfig | None) -> list[Any]:
    """Build every ``_target_`` entry of a callbacks/logger group (entries may be null)."""
    if not group:
        return []
    return [
        instantiate(node)
        for node in group.values()
        if isinstance(node, DictConfig) and "_target_" in node
    ]


def resume_command(cfg: DictConfig) -> str:
    """The command line that resumes this run in its own directory from its last checkpoint."""
    kept = [o for o in task_overrides() if not o.startswith(("ckpt_path=", "hydra.run.dir="))]
    args = [*kept, "ckpt_path=last", f"hydra.run.dir={cfg.paths.output_dir}"]
    return "python -m gompertz_kd.run " + " ".join(shlex.quote(a) for a in args)


def task_overrides() -> list[str]:
    if not HydraConfig.initialized():
        return []
    return list(HydraConfig.get().overrides.task)


def git_commit() -> str | None:
    if ROOT_DIR is None:  # an installed package: no checkout to ask
        return None
    try:
        out = subprocess.run(
            ["git", "-C", str(ROOT_DIR), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def is_global_zero() -> bool:
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))) == 0


def write_json_atomically(path: Path, payload: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def metric_value(results: dict[str, Any], name: str | None) -> float | None:
    """The value of ``name`` for a hyper-parameter sweep: ``"val/top1"`` (best validation top-1 of
    the run) or a dotted path into ``results`` such as ``"test.top1"``."""
    if not name:
        return None
    if name == "val/top1":
        return results.get("best_val_top1")
    node: Any = results
    for part in name.split("."):
        node = node[part]
    return float(node)
