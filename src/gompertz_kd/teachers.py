"""Teacher provisioning: find the teacher's weights, or train the teacher once and cache it.

A distillation run needs trained weights for ``model.teacher``. ``teacher.ckpt`` may name them
(a gompertz_kd checkpoint, a benchmark zoo file or a bare state dict). Otherwise the teacher is
trained first, as a student-only run with ``teacher.recipe``, and stored in ``teacher.cache_dir``
under a key of everything that shapes it (data set, data source, held-out split, augmentation,
architecture, recipe, seed). Every later run and every job of a sweep with the same key reuses it.
The file is written atomically under a lock, so parallel sweep jobs train it once.

This module finds, keys, locks and stores; it does not train. The caller hands it the function
that runs a training config (:func:`gompertz_kd.train.run_training`), so provisioning depends on
no part of the training code.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock
from omegaconf import DictConfig, OmegaConf, open_dict

from gompertz_kd.checkpoints import CheckpointError, check_weights, newest_valid_checkpoint
from gompertz_kd.data.sources import CLASSES
from gompertz_kd.models import create_model

__all__ = ["provision_teacher", "teacher_cache_path"]

log = logging.getLogger(__name__)

# Trainer settings that cut training short; the teacher inherits them from the parent run.
_TRAINER_LIMITS = ("fast_dev_run", "limit_train_batches", "max_steps", "overfit_batches")


def teacher_cache_path(cfg: DictConfig) -> Path:
    """Where the auto-trained teacher for ``cfg`` lives: ``<cache_dir>/<dataset>_<arch>_<key>.pt``."""
    identity = _teacher_identity(cfg)
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]
    name = f"{cfg.data.dataset}_{cfg.model.teacher}_{digest}.pt".replace("/", "-")
    return Path(cfg.teacher.cache_dir).expanduser().resolve() / name


def _teacher_identity(cfg: DictConfig) -> dict[str, Any]:
    data = cfg.data
    return {
        "dataset": data.dataset,
        "source": data.get("source", "torchvision"),
        "val_split": int(data.get("val_split", 0)),
        "augment": data.get("augment", "standard"),
        "arch": cfg.model.teacher,
        "recipe": OmegaConf.to_container(cfg.teacher.recipe, resolve=True),
        "momentum": cfg.model.get("momentum"),
        "weight_decay": cfg.model.get("weight_decay"),
        # a shortened parent run (debug presets) trains a shortened teacher: never mix the two
        "trainer_limits": {
            k: cfg.trainer[k] for k in _TRAINER_LIMITS if _limits_training(cfg.trainer.get(k))
        },
    }


def _limits_training(value: Any) -> bool:
    """Whether a Trainer limit setting shortens training (defaults: None, -1, 1.0, 0.0, False)."""
    if value is None or value is False or value in (-1, 0):
        return False
    return not (isinstance(value, float) and value in (0.0, 1.0))


def provision_teacher(cfg: DictConfig, run_training: Callable[[DictConfig], Any]) -> str | None:
    """Return the path of the teacher's weights for ``cfg``, training the teacher if needed with
    ``run_training(teacher_config)`` (which returns an object with ``.module.student`` and
    ``.results``, as :func:`gompertz_kd.train.run_training` does).

    Returns ``None`` when the run has no teacher (``model.teacher`` is null).

    Raises:
        FileNotFoundError: ``teacher.ckpt`` names a missing file, or no cached teacher exists and
            ``teacher.auto_train`` is false.
        CheckpointError: ``teacher.ckpt`` is not a checkpoint (a directory, an empty, text or
            truncated file) or holds weights that do not fit ``model.teacher`` (see
            :func:`gompertz_kd.checkpoints.check_weights`).
    """
    arch = cfg.model.get("teacher")
    if not arch:
        return None
    ckpt = cfg.teacher.get("ckpt")
    if ckpt:
        path = Path(str(ckpt)).expanduser().resolve()
        fix = (
            f"point teacher.ckpt at trained {arch} weights for {cfg.data.dataset}, or leave it "
            "null to train and cache the teacher"
        )
        if not path.exists():
            raise FileNotFoundError(f"teacher.ckpt={ckpt}: no such file ({path}); {fix}")
        # Checked here, naming the setting, before any work; the module loads the file again.
        # Keys and shapes are all the check reads: the network is built without storage.
        num_classes = len(CLASSES[cfg.data.dataset])
        with torch.device("meta"):
            teacher = create_model(str(arch), num_classes=num_classes)
        check_weights(
            teacher,
            path,
            f"teacher {arch} with {num_classes} classes",
            name=f"teacher.ckpt={path}",
            fix=fix,
        )
        log.info("Teacher %s from %s", arch, path)
        return str(path)

    path = teacher_cache_path(cfg)
    if path.is_file():
        log.info("Teacher %s from the cache: %s", arch, path)
        return str(path)
    if not cfg.teacher.get("auto_train", True):
        raise FileNotFoundError(
            f"no trained {arch} teacher for {cfg.data.dataset}: nothing at {path} and "
            "teacher.auto_train=false. Set teacher.ckpt=<weights file>, or "
            "teacher.auto_train=true to train it first."
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        if path.is_file():  # another job trained it while we waited for the lock
            log.info("Teacher %s trained by another job: %s", arch, path)
            return str(path)
        _train_and_store(cfg, path, run_training)
    return str(path)


def _train_and_store(
    cfg: DictConfig, path: Path, run_training: Callable[[DictConfig], Any]
) -> None:
    teacher_cfg = _teacher_run_config(cfg, path.with_suffix(".run"))
    log.info("Training teacher %s (no cached weights at %s)", cfg.model.teacher, path)
    # A teacher training killed earlier (no weights file was written: that happens last) left
    # its checkpoints: resume from the newest valid one; if none is usable, start again.
    checkpoints = path.with_suffix(".run") / "checkpoints"
    if checkpoints.is_dir() and any(checkpoints.glob("*.ckpt")):
        try:
            resume_from, _, _ = newest_valid_checkpoint(checkpoints)
        except CheckpointError as error:
            log.warning(
                "An interrupted teacher training left no usable checkpoint (%s); starting it again",
                error,
            )
        else:
            log.info("Resuming the interrupted teacher training from %s", resume_from)
            with open_dict(teacher_cfg):
                teacher_cfg.ckpt_path = "last"
    run = run_training(teacher_cfg)
    payload = {
        "model": run.module.student.state_dict(),
        "meta": {
            "arch": str(cfg.model.teacher),
            "identity": json.dumps(_teacher_identity(cfg), sort_keys=True),
            "test_top1": run.results["test"]["top1"],
            "run_dir": str(path.with_suffix(".run")),
        },
    }
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)
    log.info(
        "Teacher %s stored at %s (test top-1 %s)",
        cfg.model.teacher,
        path,
        run.results["test"]["top1"],
    )


def _teacher_run_config(cfg: DictConfig, run_dir: Path) -> DictConfig:
    """The student-only config that trains ``cfg.model.teacher`` with ``cfg.teacher.recipe``."""
    recipe = cfg.teacher.recipe
    # resolve now: ${hydra:...} and ${seed} must not follow the parent run
    teacher_cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    with open_dict(teacher_cfg):
        teacher_cfg.name = f"teacher_{cfg.data.dataset}_{cfg.model.teacher}"
        teacher_cfg.seed = int(recipe.seed)
        teacher_cfg.ckpt_path = None
        teacher_cfg.population = None  # a population's teacher is one single run
        teacher_cfg.test = True
        # the teacher's own training gets the whole-step compile when the run asks for it
        teacher_cfg.compile = "step" if cfg.get("compile") == "step" else False
        teacher_cfg.paths.output_dir = str(run_dir)
        teacher_cfg.data.seed = int(recipe.seed)
        teacher_cfg.data.batch_size = int(recipe.batch_size)
        model = teacher_cfg.model
        model.student = cfg.model.teacher
        model.teacher = None
        teacher_cfg.method = {"_target_": "gompertz_kd.objectives.Objective", "terms": {}}
        model.lr = float(recipe.lr)
        model.lr_milestones = list(recipe.lr_milestones)
        trainer = teacher_cfg.trainer
        trainer.max_epochs = int(recipe.max_epochs)
        trainer.default_root_dir = str(run_dir)
        # the teacher trains on one device of the same kind, whatever the student run uses
        trainer.devices = 1
        trainer.num_nodes = 1
        trainer.strategy = "auto"
        for node in _target_nodes(teacher_cfg.get("callbacks")) + _target_nodes(
            teacher_cfg.get("logger")
        ):
            if "dirpath" in node:
                node.dirpath = str(run_dir / "checkpoints")
            if "save_dir" in node:
                node.save_dir = str(run_dir)
    return teacher_cfg


def _target_nodes(group: DictConfig | None) -> list[DictConfig]:
    return [n for n in (group or {}).values() if isinstance(n, DictConfig)]
