"""Lightning callbacks of gompertz_kd.

:class:`GompertzWeightCallback` is the thin driver of the dynamic objective: before every training
batch it measures training progress, asks the :class:`~gompertz_kd.module.DistillationModule` to
move its loss weights there (each term's schedule is a pure function of progress), and logs the
weights and the Gompertz stage.
"""

from __future__ import annotations

import math
import signal
import threading
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch

__all__ = [
    "GompertzWeightCallback",
    "GracefulStop",
    "IntervalCheckpoint",
    "RunInterrupted",
    "RunTimer",
    "checkpoint_dir",
]


class GompertzWeightCallback(L.Callback):
    """Set the module's loss weights from training progress before each batch.

    Two ways to measure progress ``t`` in ``[0, 1]``:

    - ``progress="clock"`` (default): how far training is. With ``granularity="step"``,
      ``t = global_step / estimated_stepping_batches`` (weights change every optimiser step);
      with ``granularity="epoch"``, ``t = current_epoch / max_epochs`` (constant within an epoch).
    - ``progress="trajectory"``: how far the *student* is, read from its learning trajectory.
      Both networks' top-1 accuracy on the training batches (the teacher's comes free with the
      KD forward pass) is tracked as a bias-corrected exponential moving average with momentum
      ``ema_momentum``; progress is the student's accuracy above chance as a fraction of the
      teacher's, relative to ``trajectory_target``::

          t = clip(((acc_s - 1/K) / (acc_t - 1/K)) / trajectory_target, 0, 1)

      With ``monotone=True`` it never moves backwards (a running maximum), so a noisy batch does
      not pull the weight down. A slow student thus stays longer in the lag stage and a fast one
      reaches saturation sooner, whatever the epoch budget. Accuracies are summed over all
      processes under DDP, so every rank uses the same weights. With ``granularity="epoch"`` the
      value is taken at the start of each epoch and held for the epoch.

    The callback's state (the moving averages) is saved in checkpoints, so a resumed run
    continues with exactly the weights it would have had.

    Logged every step: ``<term>_weight`` for each active weight, ``schedule/progress`` and, for a
    Gompertz schedule, ``schedule/stage`` (0 lag, 1 growth, 2 saturation).
    """

    def __init__(
        self,
        granularity: str = "step",
        progress: str = "clock",
        ema_momentum: float = 0.98,
        trajectory_target: float = 1.0,
        monotone: bool = True,
    ) -> None:
        if granularity not in ("step", "epoch"):
            raise ValueError(
                f"granularity must be 'step' or 'epoch', got granularity={granularity!r}"
            )
        if progress not in ("clock", "trajectory"):
            raise ValueError(f"progress must be 'clock' or 'trajectory', got progress={progress!r}")
        if not 0.0 <= ema_momentum < 1.0:
            raise ValueError(f"ema_momentum must be in [0, 1), got ema_momentum={ema_momentum}")
        if not 0.0 < trajectory_target <= 1.0:
            raise ValueError(
                f"trajectory_target must be in (0, 1], got trajectory_target={trajectory_target}"
            )
        self.granularity = granularity
        self.progress_mode = progress
        self.ema_momentum = ema_momentum
        self.trajectory_target = trajectory_target
        self.monotone = monotone
        # Trajectory state (plain floats so checkpoints stay weights-only loadable).
        self.ema_student = 0.0
        self.ema_teacher = 0.0
        self.ema_updates = 0
        self.trajectory_progress = 0.0
        self._epoch_progress: float | None = None
        self._total_steps: int | None = None

    # ------------------------------------------------------------------ progress
    def clock_progress(self, trainer: L.Trainer) -> float:
        """``global_step / total_steps`` or ``current_epoch / max_epochs``, clipped to [0, 1]."""
        if self.granularity == "epoch":
            if trainer.max_epochs is None or trainer.max_epochs < 1:
                raise ValueError(
                    "granularity='epoch' needs a finite trainer max_epochs; set max_epochs or use "
                    "granularity='step'"
                )
            return min(trainer.current_epoch / trainer.max_epochs, 1.0)
        if self._total_steps is None:
            total = trainer.estimated_stepping_batches
            if not math.isfinite(total) or total < 1:
                raise ValueError(
                    "the weight schedule needs a known training length: set trainer max_epochs "
                    "or max_steps"
                )
            self._total_steps = int(total)
        return min(trainer.global_step / self._total_steps, 1.0)

    def trajectory_value(self, num_classes: int) -> float:
        """Current trajectory progress from the moving averages (before ``monotone``)."""
        if self.ema_updates == 0:
            return 0.0
        correction = 1.0 - self.ema_momentum**self.ema_updates
        acc_s = self.ema_student / correction
        acc_t = self.ema_teacher / correction
        chance = 1.0 / num_classes
        if acc_t <= chance:
            return 0.0
        ratio = (acc_s - chance) / (acc_t - chance) / self.trajectory_target
        return min(max(ratio, 0.0), 1.0)

    def current_progress(self, trainer: L.Trainer, pl_module: L.LightningModule) -> float:
        if self.progress_mode == "clock":
            return self.clock_progress(trainer)
        if self.granularity == "epoch" and self._epoch_progress is not None:
            return self._epoch_progress
        return self.trajectory_progress

    # ------------------------------------------------------------------ hooks
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not hasattr(pl_module, "set_progress"):
            raise TypeError("GompertzWeightCallback drives a gompertz_kd DistillationModule")
        if self.progress_mode == "trajectory" and getattr(pl_module, "teacher", None) is None:
            raise ValueError(
                "progress='trajectory' compares the student with the teacher; this run has no "
                "teacher. Use progress='clock'."
            )
        self._total_steps = None
        self._epoch_progress = None

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.progress_mode == "trajectory" and self.granularity == "epoch":
            self._epoch_progress = self.trajectory_progress

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        progress = self.current_progress(trainer, pl_module)
        weights = pl_module.set_progress(progress)
        logged = {name: float(value) for name, value in weights.items()}
        logged["schedule/progress"] = float(progress)
        stage = pl_module.stage_at(progress)
        if stage is not None:
            logged["schedule/stage"] = float(stage)
        pl_module.log_dict(logged, on_step=True, on_epoch=False)

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if self.progress_mode != "trajectory" or not isinstance(outputs, dict):
            return
        if "teacher_correct" not in outputs:
            return
        counts = torch.stack(
            [
                outputs["student_correct"].float(),
                outputs["teacher_correct"].float(),
                torch.tensor(float(batch[1].shape[0]), device=outputs["student_correct"].device),
            ]
        )
        counts = trainer.strategy.reduce(counts, reduce_op="sum")
        acc_s, acc_t = (counts[0] / counts[2]).item(), (counts[1] / counts[2]).item()
        self.update_trajectory(acc_s, acc_t, pl_module.hparams.num_classes)

    def update_trajectory(self, student_acc: float, teacher_acc: float, num_classes: int) -> float:
        """Fold one batch's top-1 accuracies (fractions) into the moving averages; return the
        new trajectory progress."""
        m = self.ema_momentum
        self.ema_student = m * self.ema_student + (1.0 - m) * student_acc
        self.ema_teacher = m * self.ema_teacher + (1.0 - m) * teacher_acc
        self.ema_updates += 1
        value = self.trajectory_value(num_classes)
        self.trajectory_progress = max(self.trajectory_progress, value) if self.monotone else value
        return self.trajectory_progress

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {
            "ema_student": self.ema_student,
            "ema_teacher": self.ema_teacher,
            "ema_updates": self.ema_updates,
            "trajectory_progress": self.trajectory_progress,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.ema_student = float(state_dict["ema_student"])
        self.ema_teacher = float(state_dict["ema_teacher"])
        self.ema_updates = int(state_dict["ema_updates"])
        self.trajectory_progress = float(state_dict["trajectory_progress"])


class RunTimer(L.Callback):
    """Measures training throughput: images per second over the training batches of every epoch
    (from the epoch's start to its last training batch, so validation is not counted; data loading
    is). Counts images on every process, so under DDP the figure is for all processes together.

    Its state travels in checkpoints, so a resumed run's figures cover every part of it: a
    checkpoint written mid-epoch carries that epoch's seconds so far with its images, and
    :attr:`resumed_seconds` is the fit time of the processes before this one (what a results
    file adds to this process's wall time)."""

    def __init__(self) -> None:
        self.train_seconds = 0.0
        self.train_images = 0
        self.resumed_seconds = 0.0
        self._fit_start: float | None = None
        self._epoch_start: float | None = None
        self._last_batch_end: float | None = None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._fit_start = time.perf_counter()

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._epoch_start = time.perf_counter()
        self._last_batch_end = None

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        self._last_batch_end = time.perf_counter()
        self.train_images += int(batch[1].shape[0]) * trainer.world_size

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._epoch_start is not None and self._last_batch_end is not None:
            self.train_seconds += self._last_batch_end - self._epoch_start
        self._epoch_start = None

    @property
    def images_per_second(self) -> float | None:
        return self.train_images / self.train_seconds if self.train_seconds > 0 else None

    def state_dict(self) -> dict[str, Any]:
        partial = 0.0  # mid-epoch: the epoch's seconds so far, for the images counted so far
        if self._epoch_start is not None and self._last_batch_end is not None:
            partial = self._last_batch_end - self._epoch_start
        fit = 0.0 if self._fit_start is None else time.perf_counter() - self._fit_start
        return {
            "train_seconds": self.train_seconds + partial,
            "train_images": self.train_images,
            "fit_seconds": self.resumed_seconds + fit,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.train_seconds = float(state_dict["train_seconds"])
        self.train_images = int(state_dict["train_images"])
        self.resumed_seconds = float(state_dict.get("fit_seconds", 0.0))  # older checkpoints: 0


class RunInterrupted(Exception):
    """Training stopped on SIGINT/SIGTERM after saving a checkpoint to resume from."""

    def __init__(self, signum: int, checkpoint: str, step: int) -> None:
        self.signum = signum
        self.checkpoint = checkpoint
        self.step = step
        name = signal.Signals(signum).name
        super().__init__(
            f"{name} received: stopped at step {step}, checkpoint saved to {checkpoint}"
        )


class GracefulStop(L.Callback):
    """Turn SIGINT (Ctrl-C) and SIGTERM (SLURM pre-emption, ``kill``) into a clean stop.

    The signal only raises a flag; at the end of the current training batch, when the model,
    optimiser and data position are consistent, a checkpoint is written to ``last.ckpt`` in the
    checkpoint directory and :class:`RunInterrupted` ends the run (the command exits with
    128 + the signal number and writes no ``results.json``). Resuming with ``ckpt_path=last`` in
    the same run directory continues exactly: optimiser, LR schedule, loss-weight callback, and
    (with the tensor data path) the rest of the interrupted epoch's batches in the same order.
    A second Ctrl-C aborts at once. Under DDP all ranks stop at the same batch. A signal during
    validation stops the run after the next training batch (a run in its last validation
    finishes instead).
    """

    def __init__(self) -> None:
        self.requested: int | None = None
        self._previous: dict[int, Any] = {}

    def _handler(self, signum: int, frame: Any) -> None:
        if self.requested == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt  # asked twice: stop now
        self.requested = signum

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.requested = None
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be installed from the main thread
        for signum in (signal.SIGINT, signal.SIGTERM):
            self._previous[signum] = signal.getsignal(signum)
            signal.signal(signum, self._handler)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Lightning registers its own SIGTERM handler after on_fit_start, composed with ours; its
        # flag makes the validation loop raise at once, before any checkpoint (a signal during
        # validation would lose the epoch). Ours alone, from here on: the stop waits for the next
        # training batch end, where the state is consistent. (Lightning restores the composed
        # handler's original, ours, at its teardown; on_fit_end then restores the pre-fit one.)
        if self._previous and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._handler)

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore()

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        self._restore()

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        requested = self.requested is not None
        if trainer.world_size > 1:
            requested = trainer.strategy.reduce_boolean_decision(requested, all=False)
        if not requested:
            return
        signum = self.requested or signal.SIGTERM
        path = checkpoint_dir(trainer) / "last.ckpt"
        trainer.save_checkpoint(path)
        # This batch's values reach the loggers only after this hook; log them now so the
        # history is whole (Lightning's own step logging, as it would run next).
        connector = getattr(trainer, "_logger_connector", None)
        if connector is not None and hasattr(connector, "update_train_step_metrics"):
            connector.update_train_step_metrics()
        for logger in trainer.loggers:
            logger.save()
        raise RunInterrupted(signum, str(path), trainer.global_step)


class IntervalCheckpoint(L.Callback):
    """Write ``last.ckpt`` in the middle of epochs too: every ``every_n_steps`` optimiser steps
    and/or every ``every_n_minutes`` of training (whichever comes first; both ``None``: off).

    Epoch-end checkpoints alone lose up to an epoch to a hard kill (SIGKILL, the OOM killer, a
    lost node), where no signal handler runs. The checkpoint is written after a batch, when
    model, optimiser, schedules and data position agree, so ``ckpt_path=last`` resumes it exactly,
    mid-epoch included; it is written atomically (:class:`~gompertz_kd.checkpoints.AtomicCheckpointIO`).
    Under DDP rank 0's clock decides for all ranks. Its cost per save is in docs/benchmarks.md.
    """

    def __init__(
        self, every_n_steps: int | None = None, every_n_minutes: float | None = None
    ) -> None:
        if every_n_steps is not None and int(every_n_steps) < 1:
            raise ValueError(
                f"every_n_steps must be >= 1 or null, got every_n_steps={every_n_steps}"
            )
        if every_n_minutes is not None and not float(every_n_minutes) > 0:
            raise ValueError(
                f"every_n_minutes must be > 0 or null, got every_n_minutes={every_n_minutes}"
            )
        self.every_n_steps = None if every_n_steps is None else int(every_n_steps)
        self.every_n_minutes = None if every_n_minutes is None else float(every_n_minutes)
        self._last_step = 0
        self._last_time = 0.0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._last_step = trainer.global_step
        self._last_time = time.monotonic()

    def due(self, trainer: L.Trainer) -> bool:
        steps = self.every_n_steps is not None and (
            trainer.global_step - self._last_step >= self.every_n_steps
        )
        minutes = self.every_n_minutes is not None and (
            time.monotonic() - self._last_time >= 60.0 * self.every_n_minutes
        )
        if self.every_n_minutes is not None and trainer.world_size > 1:
            minutes = bool(trainer.strategy.broadcast(minutes, src=0))
        return steps or minutes

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if self.every_n_steps is None and self.every_n_minutes is None:
            return
        if not self.due(trainer):
            return
        trainer.save_checkpoint(checkpoint_dir(trainer) / "last.ckpt")
        self._last_step = trainer.global_step
        self._last_time = time.monotonic()


def checkpoint_dir(trainer: L.Trainer) -> Path:
    """Where this run keeps its checkpoints: the ModelCheckpoint's directory, or
    ``<default_root_dir>/checkpoints``."""
    dirpath = getattr(trainer.checkpoint_callback, "dirpath", None)
    return Path(dirpath) if dirpath else Path(trainer.default_root_dir) / "checkpoints"
