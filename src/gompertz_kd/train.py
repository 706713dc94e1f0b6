"""``train(cfg)``: one experiment from a composed config to a run directory with ``results.json``.

The flow, top to bottom: validate the schedule -> build the DataModule -> provision the teacher
(:mod:`gompertz_kd.teachers`) -> build the DistillationModule, callbacks, loggers and Trainer ->
fit -> test the last and the best checkpoint -> write ``results.json``. ``results.json`` is written
last, atomically, and only by a run that got there: a failed run leaves none.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import shlex
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from omegaconf import DictConfig, OmegaConf

from gompertz_kd.callbacks import RunTimer
from gompertz_kd.checkpoints import (
    AtomicCheckpointIO,
    check_training_checkpoint_fits,
    newest_valid_checkpoint,
    read_training_checkpoint,
)
from gompertz_kd.config import ROOT_DIR, print_config_tree
from gompertz_kd.data.sources import DATASETS
from gompertz_kd.models import list_models
from gompertz_kd.models.registry import TIMM_PREFIX
from gompertz_kd.module import DistillationModule
from gompertz_kd.objectives import SHARED, Need, Objective
from gompertz_kd.run_files import RESULTS_FILE
from gompertz_kd.teachers import provision_teacher

__all__ = ["TrainingRun", "build_module", "train", "run_training"]

log = logging.getLogger(__name__)


@dataclass
class TrainingRun:
    """What a finished run leaves in memory: its results, and the trained module and Trainer."""

    results: dict[str, Any]
    module: DistillationModule
    trainer: L.Trainer


def train(cfg: DictConfig) -> dict[str, Any]:
    """Run the experiment described by ``cfg`` and return what it wrote to ``results.json``."""
    return run_training(cfg).results


def run_training(cfg: DictConfig) -> TrainingRun:
    """Like :func:`train`, also returning the trained module and the Trainer. A config with a
    ``population`` trains it (:func:`gompertz_kd.population.run_population`)."""
    if cfg.get("population"):
        from gompertz_kd.population import run_population

        return run_population(cfg)
    start = time.time()
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if cfg.get("print_config") and _is_global_zero():
        print_config_tree(cfg, save_to=output_dir / "config_tree.log")

    # Bad values fail here, before data or models are touched or a teacher is trained.
    objective = check_config(cfg)
    teacher_arch = cfg.model.get("teacher") if objective.terms else None
    # a resume checkpoint that is no checkpoint at all fails now, before a teacher is trained;
    # whether it fits this run's module is checked once the module is built
    resume = _resume_checkpoint(cfg, output_dir)
    data_cache = cfg.data.get("cache_dir") if cfg.data.get("source") == "folder" else None
    log.info(
        "Run directory %s; teacher cache %s; data %s; decoded-data cache %s",
        output_dir.resolve(),
        Path(cfg.teacher.cache_dir).expanduser().resolve() if teacher_arch else None,
        Path(str(cfg.data.root)).expanduser().resolve(),
        Path(str(data_cache)).expanduser().resolve() if data_cache else None,
    )
    L.seed_everything(cfg.seed, workers=True)

    log.info("Building data module <%s>", cfg.data._target_)
    datamodule = build(cfg.data)
    num_train_samples = None
    if Need.INDICES in objective.needs:
        # a per-image memory (CRD): batches carry each image's index, the bank one slot per image
        datamodule.with_indices = True
        datamodule.setup("fit")
        num_train_samples = datamodule.num_train_samples
    provision_start = time.time()
    teacher_ckpt = provision_teacher(cfg, run_training) if teacher_arch else None
    # A teacher trained just now is the cache's cost, not this run's: kept out of its wall time.
    teacher_provision_s = time.time() - provision_start
    # Seed again: training a teacher just now must not change this run's initialisation.
    L.seed_everything(cfg.seed, workers=True)

    log.info("Building model <%s>", cfg.model._target_)
    module = build_module(
        cfg,
        num_classes=datamodule.num_classes,
        teacher_ckpt=teacher_ckpt,
        objective=objective,
        num_train_samples=num_train_samples,
    )
    if cfg.get("compile"):
        module.compile_networks()
    callbacks = _instantiate_group(cfg.get("callbacks"))
    loggers = _instantiate_group(cfg.get("logger"))
    trainer = build_trainer(cfg, callbacks, loggers)
    fit(cfg, trainer, module, datamodule, loggers, resume, module.state_dict())

    results = _collect_results(
        cfg, trainer, module, datamodule, output_dir, start, teacher_provision_s
    )
    if trainer.is_global_zero:
        _write_json_atomically(output_dir / RESULTS_FILE, results)
        log.info("Results written to %s", output_dir / RESULTS_FILE)
    return TrainingRun(results=results, module=module, trainer=trainer)


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
        _continue_csv_history(loggers)
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
    problems += _device_problems(cfg.trainer)
    if problems:
        raise ValueError("invalid configuration: " + "; ".join(problems))
    return objective


def _check_shared_schedule_used(cfg: DictConfig, objective: Objective) -> None:
    """A command line that sets the shared ``schedule`` for a method none of whose terms follow
    it would change nothing: say so instead of running."""
    overrides = [o.lstrip("+~") for o in _task_overrides()]
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


def _collect_results(
    cfg: DictConfig,
    trainer: L.Trainer,
    module: DistillationModule,
    datamodule,
    output_dir: Path,
    start: float,
    teacher_provision_s: float = 0.0,
) -> dict[str, Any]:
    final = {"top1": None, "top5": None}
    best = {"top1": None, "top5": None, "epoch": None, "selected_on": None}
    if cfg.get("test"):
        final = _test(trainer, module, datamodule, ckpt_path=None)
        checkpoint = trainer.checkpoint_callback
        if isinstance(checkpoint, ModelCheckpoint) and checkpoint.best_model_path:
            best_ckpt = checkpoint.best_model_path
            # testing the best checkpoint loads its weights; the module must end as trained
            last_state = {k: v.clone() for k, v in module.state_dict().items()}
            best = {
                **_test(trainer, module, datamodule, ckpt_path=best_ckpt),
                "epoch": torch.load(best_ckpt, map_location="cpu", weights_only=True)["epoch"],
                "selected_on": "test" if int(cfg.data.get("val_split", 0)) == 0 else "val",
            }
            module.load_state_dict(last_state)
    checkpoint = trainer.checkpoint_callback
    best_score = getattr(checkpoint, "best_model_score", None)
    timer = next((c for c in trainer.callbacks if isinstance(c, RunTimer)), None)
    csv = next((lg for lg in trainer.loggers if isinstance(lg, CSVLogger)), None)
    history = None
    if csv is not None:
        metrics = Path(csv.log_dir) / "metrics.csv"
        history = os.path.relpath(metrics, output_dir)
    stage = module.stage_at(module.progress)
    return {
        "status": "completed",
        "name": _run_name(cfg),
        "overrides": _task_overrides(),
        "seed": int(cfg.seed),
        "dataset": cfg.data.dataset,
        "teacher": module.hparams.get("teacher"),
        "student": cfg.model.student,
        "test": final,
        "best": best,
        "best_val_top1": float(best_score) if best_score is not None else None,
        "epochs": trainer.current_epoch,
        "history": history,
        "final_weights": dict(module.loss_weights),
        "final_stage": stage.name.lower() if stage is not None else None,
        # this run's own time; training a missing teacher first is counted apart
        "wall_time_s": time.time() - start - teacher_provision_s,
        "teacher_provision_s": teacher_provision_s,
        "train_images_per_s": timer.images_per_second if timer else None,
        "git_commit": _git_commit(),
        "run_dir": str(output_dir),
        "config": OmegaConf.to_container(cfg, resolve=True),
    }


def _test(
    trainer: L.Trainer, module: DistillationModule, datamodule, ckpt_path: str | None
) -> dict[str, float]:
    metrics = trainer.test(module, datamodule=datamodule, ckpt_path=ckpt_path, verbose=False)[0]
    return {"top1": float(metrics["test/top1"]), "top5": float(metrics["test/top5"])}


def _resume_path(
    cfg: DictConfig, output_dir: Path, expected: Mapping[str, Any] | None = None
) -> str | None:
    """The checkpoint ``ckpt_path`` names (``"last"``: this run directory's ``last.ckpt``), checked
    to be a Lightning training checkpoint that fits this run's module, whose ``state_dict()`` is
    ``expected`` (not compared when ``None``); ``None`` when ``ckpt_path`` is unset.

    Raises:
        FileNotFoundError: no file there.
        CheckpointError: see :func:`read_training_checkpoint` and :func:`check_training_checkpoint_fits`.
    """
    resume = _resume_checkpoint(cfg, output_dir)
    if resume is None:
        return None
    path, name, ckpt = resume
    if expected is not None:
        check_training_checkpoint_fits(ckpt, name, expected)
    return str(path)


def _resume_checkpoint(
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


def _continue_csv_history(loggers: list[Any]) -> None:
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


def _instantiate_group(group: DictConfig | None) -> list[Any]:
    """Build every ``_target_`` entry of a callbacks/logger group (entries may be null)."""
    if not group:
        return []
    return [
        instantiate(node)
        for node in group.values()
        if isinstance(node, DictConfig) and "_target_" in node
    ]


def _run_name(cfg: DictConfig) -> str:
    if cfg.get("name"):
        return str(cfg.name)
    if HydraConfig.initialized():
        experiment = HydraConfig.get().runtime.choices.get("experiment")
        if experiment:
            return str(experiment)
    return str(cfg.get("task_name", "train"))


def resume_command(cfg: DictConfig) -> str:
    """The command line that resumes this run in its own directory from its last checkpoint."""
    kept = [o for o in _task_overrides() if not o.startswith(("ckpt_path=", "hydra.run.dir="))]
    args = [*kept, "ckpt_path=last", f"hydra.run.dir={cfg.paths.output_dir}"]
    return "python -m gompertz_kd.run " + " ".join(shlex.quote(a) for a in args)


def _task_overrides() -> list[str]:
    if not HydraConfig.initialized():
        return []
    return list(HydraConfig.get().overrides.task)


def _git_commit() -> str | None:
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


def _is_global_zero() -> bool:
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))) == 0


def _write_json_atomically(path: Path, payload: dict[str, Any]) -> None:
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
