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
from gompertz_kd.config import ROOT_DIR, print_config_tree
from gompertz_kd.module import DistillationModule
from gompertz_kd.teachers import provision_teacher

__all__ = ["TrainingRun", "build_module", "train", "run_training"]

log = logging.getLogger(__name__)

RESULTS_FILE = "results.json"


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
    """Like :func:`train`, also returning the trained module and the Trainer."""
    start = time.time()
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if cfg.get("print_config") and _is_global_zero():
        print_config_tree(cfg, save_to=output_dir / "config_tree.log")

    # Bad values fail here, before data or models are touched.
    check_config(cfg)
    data_cache = cfg.data.get("cache_dir") if cfg.data.get("source") == "folder" else None
    log.info(
        "Run directory %s; teacher cache %s; data %s; decoded-data cache %s",
        output_dir.resolve(),
        Path(cfg.teacher.cache_dir).expanduser().resolve() if "teacher" in cfg else None,
        Path(str(cfg.data.root)).expanduser().resolve(),
        Path(str(data_cache)).expanduser().resolve() if data_cache else None,
    )
    L.seed_everything(cfg.seed, workers=True)

    log.info("Building data module <%s>", cfg.data._target_)
    datamodule = build(cfg.data)
    provision_start = time.time()
    teacher_ckpt = provision_teacher(cfg)
    # A teacher trained just now is the cache's cost, not this run's: kept out of its wall time.
    teacher_provision_s = time.time() - provision_start
    # Seed again: training a teacher just now must not change this run's initialisation.
    L.seed_everything(cfg.seed, workers=True)

    log.info("Building model <%s>", cfg.model._target_)
    module = build_module(cfg, num_classes=datamodule.num_classes, teacher_ckpt=teacher_ckpt)
    if cfg.get("compile"):
        module.compile_networks()
    callbacks = _instantiate_group(cfg.get("callbacks"))
    loggers = _instantiate_group(cfg.get("logger"))
    trainer: L.Trainer = build(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    resume_from = _resume_path(cfg, output_dir)
    if resume_from is not None:
        _continue_csv_history(loggers)
    for logger in loggers:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))

    trainer.fit(module, datamodule=datamodule, ckpt_path=resume_from)
    if trainer.interrupted:
        raise RuntimeError("training was interrupted; no results.json written")

    results = _collect_results(
        cfg, trainer, module, datamodule, output_dir, start, teacher_provision_s
    )
    if trainer.is_global_zero:
        _write_json_atomically(output_dir / RESULTS_FILE, results)
        log.info("Results written to %s", output_dir / RESULTS_FILE)
    return TrainingRun(results=results, module=module, trainer=trainer)


def build_module(
    cfg: DictConfig, num_classes: int, teacher_ckpt: str | None
) -> DistillationModule:
    """The DistillationModule of ``cfg`` for a data set of ``num_classes`` classes."""
    return build(cfg.model, num_classes=num_classes, teacher_ckpt=teacher_ckpt, _convert_="all")


def check_config(cfg: DictConfig) -> None:
    """Reject values no run can use, naming the field: the schedule's parameters (checked by the
    schedule itself), learning rates, epoch counts and batch sizes.

    Raises:
        ValueError: ``<field>=<value>`` and what it must be.
    """
    build(cfg.schedule)
    problems = []
    lr = cfg.model.get("lr")
    if lr is not None and not lr > 0:
        problems.append(f"model.lr={lr} must be > 0 (or null for the benchmark's default)")
    epochs, steps = cfg.trainer.get("max_epochs"), cfg.trainer.get("max_steps", -1)
    if (epochs is None or epochs < 1) and not (steps is not None and steps > 0):
        problems.append(f"trainer.max_epochs={epochs} must be >= 1 (or set trainer.max_steps > 0)")
    if not cfg.data.get("batch_size", 1) >= 1:
        problems.append(f"data.batch_size={cfg.data.batch_size} must be >= 1")
    recipe = cfg.get("teacher", {}).get("recipe") if cfg.model.get("teacher") else None
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
        "teacher": cfg.model.get("teacher"),
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


def _resume_path(cfg: DictConfig, output_dir: Path) -> str | None:
    ckpt_path = cfg.get("ckpt_path")
    if ckpt_path in (None, ""):
        return None
    if ckpt_path == "last":
        last = output_dir / "checkpoints" / "last.ckpt"
        if not last.is_file():
            raise FileNotFoundError(
                f"ckpt_path=last: no checkpoint at {last}. Resume inside the interrupted run's "
                "directory (hydra.run.dir=<that run dir>) or give ckpt_path=<file>."
            )
        return str(last)
    path = Path(ckpt_path).expanduser().resolve()
    if not path.is_file():
        raise FileNotFoundError(f"ckpt_path={ckpt_path}: no such checkpoint file ({path})")
    return str(path)


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
