"""``train(cfg)``: one experiment from a composed config to a run directory with ``results.json``.

The flow, top to bottom: validate the schedule -> build the DataModule -> provision the teacher
(:mod:`gompertz_kd.teachers`) -> build the DistillationModule, callbacks, loggers and Trainer ->
fit -> test the last and the best checkpoint -> write ``results.json``. ``results.json`` is written
last, atomically, and only by a run that got there: a failed run leaves none.

This is the single run; a config with a ``population`` is a population run
(:func:`gompertz_kd.population.run_population`), and :func:`gompertz_kd.run.run_config` chooses.
Both are built from :mod:`gompertz_kd.run_parts`, whose names this module also exports under
their former names here (``check_config``, ``build_module``, ``build_objective``, ...).
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from omegaconf import DictConfig, OmegaConf

from gompertz_kd.callbacks import RunTimer
from gompertz_kd.config import print_config_tree
from gompertz_kd.module import DistillationModule
from gompertz_kd.objectives import Need
from gompertz_kd.run_files import RESULTS_FILE
from gompertz_kd.run_parts import (
    TrainingRun,
    build,
    build_module,
    build_objective,
    build_trainer,
    check_config,
    check_model_name,
    compile_options,
    fit,
    git_commit,
    instantiate_group,
    is_global_zero,
    metric_value,
    resume_checkpoint,
    resume_command,
    resume_path,
    task_overrides,
    write_json_atomically,
)
from gompertz_kd.teachers import provision_teacher

__all__ = [
    "TrainingRun",
    "build",
    "build_module",
    "build_objective",
    "build_trainer",
    "check_config",
    "check_model_name",
    "fit",
    "metric_value",
    "resume_command",
    "run_training",
    "train",
]

log = logging.getLogger(__name__)

# the former private names, kept for callers that import them from here
_resume_checkpoint = resume_checkpoint
_resume_path = resume_path
_task_overrides = task_overrides
_git_commit = git_commit
_write_json_atomically = write_json_atomically
_instantiate_group = instantiate_group
_is_global_zero = is_global_zero


def train(cfg: DictConfig) -> dict[str, Any]:
    """Run the experiment described by ``cfg`` and return what it wrote to ``results.json``."""
    return run_training(cfg).results


def run_training(cfg: DictConfig) -> TrainingRun:
    """Like :func:`train`, also returning the trained module and the Trainer.

    Raises:
        ValueError: ``cfg`` holds a population (train it with
            :func:`gompertz_kd.run.run_config` or :func:`gompertz_kd.population.run_population`).
    """
    if cfg.get("population"):
        raise ValueError(
            "this config holds a population: train it with gompertz_kd.run.run_config(cfg) or "
            "gompertz_kd.population.run_population(cfg, base_overrides=[...])"
        )
    start = time.time()
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if cfg.get("print_config") and is_global_zero():
        print_config_tree(cfg, save_to=output_dir / "config_tree.log")

    # Bad values fail here, before data or models are touched or a teacher is trained.
    objective = check_config(cfg)
    teacher_arch = cfg.model.get("teacher") if objective.terms else None
    # a resume checkpoint that is no checkpoint at all fails now, before a teacher is trained;
    # whether it fits this run's module is checked once the module is built
    resume = resume_checkpoint(cfg, output_dir)
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
        module.apply_compile(cfg.compile, **compile_options(cfg))
    callbacks = instantiate_group(cfg.get("callbacks"))
    loggers = instantiate_group(cfg.get("logger"))
    trainer = build_trainer(cfg, callbacks, loggers)
    fit(cfg, trainer, module, datamodule, loggers, resume, module.state_dict())

    results = _collect_results(
        cfg, trainer, module, datamodule, output_dir, start, teacher_provision_s
    )
    if trainer.is_global_zero:
        write_json_atomically(output_dir / RESULTS_FILE, results)
        log.info("Results written to %s", output_dir / RESULTS_FILE)
    return TrainingRun(results=results, module=module, trainer=trainer)


def _collect_results(
    cfg: DictConfig,
    trainer: L.Trainer,
    module: DistillationModule,
    datamodule,
    output_dir: Path,
    start: float,
    teacher_provision_s: float = 0.0,
) -> dict[str, Any]:
    # the timings first: testing the best checkpoint restores the callbacks' state from it
    timer = next((c for c in trainer.callbacks if isinstance(c, RunTimer)), None)
    images_per_s = timer.images_per_second if timer else None
    resumed_s = timer.resumed_seconds if timer else 0.0
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
    csv = next((lg for lg in trainer.loggers if isinstance(lg, CSVLogger)), None)
    history = None
    if csv is not None:
        metrics = Path(csv.log_dir) / "metrics.csv"
        history = os.path.relpath(metrics, output_dir)
    stage = module.stage_at(module.progress)
    return {
        "status": "completed",
        "name": _run_name(cfg),
        "overrides": task_overrides(),
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
        # this run's own time (a resumed run's earlier parts included); training a missing
        # teacher first is counted apart
        "wall_time_s": time.time() - start - teacher_provision_s + resumed_s,
        "teacher_provision_s": teacher_provision_s,
        "train_images_per_s": images_per_s,
        "git_commit": git_commit(),
        "run_dir": str(output_dir),
        "config": OmegaConf.to_container(cfg, resolve=True),
    }


def _test(
    trainer: L.Trainer, module: DistillationModule, datamodule, ckpt_path: str | None
) -> dict[str, float]:
    metrics = trainer.test(module, datamodule=datamodule, ckpt_path=ckpt_path, verbose=False)[0]
    return {"top1": float(metrics["test/top1"]), "top5": float(metrics["test/top5"])}


def _run_name(cfg: DictConfig) -> str:
    if cfg.get("name"):
        return str(cfg.name)
    if HydraConfig.initialized():
        experiment = HydraConfig.get().runtime.choices.get("experiment")
        if experiment:
            return str(experiment)
    return str(cfg.get("task_name", "train"))
