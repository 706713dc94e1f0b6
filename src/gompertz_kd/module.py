"""The teacher-student LightningModule of Gompertz-CNN.

:class:`DistillationModule` wires the pieces of :mod:`gompertz_kd.losses` into one objective

    total = ce_weight * loss_ce + kd_weight * loss_kd + wd_weight * loss_wd + gm_weight * loss_gm

and trains the student (plus the Wasserstein projectors) on it. It does not decide the weights:
:class:`~gompertz_kd.callbacks.GompertzWeightCallback` computes training progress before every
batch and calls :meth:`DistillationModule.set_progress`, which reads each term's schedule.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy

from gompertz_kd import losses
from gompertz_kd.checkpoints import load_weights
from gompertz_kd.models import create_model, feature_shapes
from gompertz_kd.schedules import Gompertz, Schedule, Stage

__all__ = ["TERMS", "DistillationModule", "NonFiniteLossError", "benchmark_lr"]

# The distillation terms, in the order they are logged. ``loss_<term>`` is the raw term,
# ``<term>_weight`` its current weight, ``<term>_scale`` its constant factor.
TERMS = ("kd", "wd", "gm")

# The frozen teacher is in eval mode on purpose; Lightning's generic warning about it is noise.
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")

OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LRScheduler]


class NonFiniteLossError(FloatingPointError):
    """A loss term became NaN or infinite during training."""


def benchmark_lr(student: str) -> float:
    """Initial learning rate of the CRD / mdistiller recipe: 0.01 for the MobileNetV2 and
    ShuffleNet students, 0.05 for every other network."""
    return 0.01 if student in ("MobileNetV2", "ShuffleV1", "ShuffleV2") else 0.05


class DistillationModule(L.LightningModule):
    """Teacher-student distillation with scheduled loss weights.

    Args:
        student: zoo or ``timm/<name>`` model name (see :func:`gompertz_kd.models.create_model`),
            or a built ``nn.Module`` exposing ``forward_stages``.
        teacher: the same for the teacher; ``None`` trains the student alone (the no-KD baseline,
            and how teachers themselves are trained).
        num_classes: classes of the data set; both networks must predict this many.
        teacher_ckpt: weights for the teacher (gompertz_kd checkpoint, ``{"model": ...}`` zoo
            file or bare state dict). ``None`` keeps the teacher as built (only sensible when a
            built, trained module is passed in).
        schedule: the schedule shared by every distillation term that has no schedule of its own.
        kd_scale, wd_scale, gm_scale: constant factor of each term; a term's weight is
            ``<term>_scale * <term>_schedule(progress)``. ``0`` switches the term off: it is not
            computed at all (no projector, no extra backward pass).
        kd_schedule, wd_schedule, gm_schedule: per-term schedules overriding ``schedule``.
        mixing: ``"additive"`` keeps ``ce_weight`` constant; ``"convex"`` is the classic
            ``(1 - kd_weight) * CE + kd_weight * KD`` (needs ``kd_weight <= 1`` throughout).
        ce_weight: weight of the cross-entropy on the true labels (``"additive"`` mixing).
        temperature: KD temperature ``T``.
        wd_pairs: ``(teacher_stage, student_stage)`` pairs for the Wasserstein term.
        wd_variant: ``"gaussian"`` (closed form) or ``"sliced"``.
        wd_reduction: channel reduction of the Gaussian variant, ``"mean"`` or ``"sum"``.
        wd_projections: random directions of the sliced variant.
        lr, momentum, weight_decay, lr_milestones, lr_gamma: the default optimiser, SGD with a
            step LR schedule (per epoch). ``lr=None`` picks :func:`benchmark_lr` for the student.
        optimizer, lr_scheduler: factories (e.g. ``functools.partial`` or Hydra ``_partial_``)
            replacing the default; they receive the trainable parameters / the optimiser.
        channels_last: keep both networks and the input batches in ``channels_last`` memory
            format (faster convolutions on most CPUs and on tensor-core GPUs).
        nonfinite: what a NaN or infinite loss does: ``"stop"`` raises
            :class:`NonFiniteLossError` naming the term, the step and the last checkpoint;
            ``"skip"`` skips the batch (no update) and counts it in ``train/skipped_batches``.

    The training forward :meth:`compute_losses` returns ``(student_logits, {"loss_ce": ...,
    "loss_kd": ..., ...})``; the total is the weighted sum of that dict.
    """

    def __init__(
        self,
        student: str | nn.Module = "MobileNetV2",
        teacher: str | nn.Module | None = "ResNet50",
        num_classes: int = 100,
        teacher_ckpt: str | None = None,
        schedule: Schedule | None = None,
        kd_scale: float = 1.0,
        wd_scale: float = 0.0,
        gm_scale: float = 0.0,
        kd_schedule: Schedule | None = None,
        wd_schedule: Schedule | None = None,
        gm_schedule: Schedule | None = None,
        mixing: str = "additive",
        ce_weight: float = 1.0,
        temperature: float = 4.0,
        wd_pairs: Sequence[Sequence[int]] = ((-1, -1),),
        wd_variant: str = "gaussian",
        wd_reduction: str = "mean",
        wd_projections: int = 64,
        lr: float | None = None,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        lr_milestones: Sequence[int] = (150, 180, 210),
        lr_gamma: float = 0.1,
        optimizer: OptimizerFactory | None = None,
        lr_scheduler: SchedulerFactory | None = None,
        channels_last: bool = True,
        nonfinite: str = "stop",
    ) -> None:
        super().__init__()
        self.save_hyperparameters(
            ignore=[
                n
                for n, v in (("student", student), ("teacher", teacher))
                if isinstance(v, nn.Module)
            ]
            + ["optimizer", "lr_scheduler"],
            logger=False,
        )
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got num_classes={num_classes}")
        if mixing not in ("additive", "convex"):
            raise ValueError(f"mixing must be 'additive' or 'convex', got mixing={mixing!r}")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got temperature={temperature}")
        if ce_weight < 0:
            raise ValueError(f"ce_weight must be >= 0, got ce_weight={ce_weight}")
        if nonfinite not in ("stop", "skip"):
            raise ValueError(f"nonfinite must be 'stop' or 'skip', got nonfinite={nonfinite!r}")
        self.nonfinite = nonfinite
        self.skipped_batches = 0

        self.student = _build(student, num_classes, "student")
        self.teacher = None if teacher is None else _build(teacher, num_classes, "teacher")
        if self.teacher is not None:
            if teacher_ckpt is not None:
                load_weights(
                    self.teacher, teacher_ckpt, f"teacher {teacher} with {num_classes} classes"
                )
            self.teacher.requires_grad_(False)
            self.teacher.eval()

        shared = schedule if schedule is not None else Gompertz()
        scales = {"kd": kd_scale, "wd": wd_scale, "gm": gm_scale}
        own = {"kd": kd_schedule, "wd": wd_schedule, "gm": gm_schedule}
        for term, scale in scales.items():
            if scale < 0:
                raise ValueError(f"{term}_scale must be >= 0, got {term}_scale={scale}")
        if self.teacher is None:
            scales = dict.fromkeys(TERMS, 0.0)
        self.scales: dict[str, float] = {t: float(s) for t, s in scales.items() if s > 0}
        self.schedules: dict[str, Schedule] = {t: own[t] or shared for t in self.scales}
        if mixing == "convex" and "kd" in self.scales:
            peak = self.scales["kd"] * self.schedules["kd"].peak
            if peak > 1:
                raise ValueError(
                    f"mixing='convex' needs kd_weight <= 1, but kd_scale * schedule peak = {peak}; "
                    "lower kd_scale or the schedule's w_max"
                )
        self.mixing = mixing
        self.ce_weight = ce_weight
        self.temperature = temperature

        self.wasserstein: losses.WassersteinFeatureLoss | None = None
        if "wd" in self.scales:
            self.wasserstein = losses.WassersteinFeatureLoss(
                student_channels=[c for c, _, _ in feature_shapes(self.student)],
                teacher_channels=[c for c, _, _ in feature_shapes(self.teacher)],
                pairs=wd_pairs,
                variant=wd_variant,
                reduction=wd_reduction,
                n_projections=wd_projections,
            )

        self.lr = benchmark_lr(student if isinstance(student, str) else "") if lr is None else lr
        self._optimizer_factory = optimizer
        self._scheduler_factory = lr_scheduler
        self.channels_last = channels_last
        if channels_last:
            self.to(memory_format=torch.channels_last)

        metrics = MetricCollection(
            {
                "top1": MulticlassAccuracy(num_classes, top_k=1, average="micro"),
                "top5": MulticlassAccuracy(num_classes, top_k=min(5, num_classes), average="micro"),
            }
        )
        self.train_metrics = metrics.clone(prefix="train/")
        self.val_metrics = metrics.clone(prefix="val/")
        self.test_metrics = metrics.clone(prefix="test/")

        self.progress = 0.0
        self.loss_weights: dict[str, float] = self.loss_weights_at(0.0)

    # ------------------------------------------------------------------ weights
    def loss_weights_at(self, progress: float) -> dict[str, float]:
        """Every term's weight at ``progress`` in ``[0, 1]``: ``{"ce_weight": ..., "kd_weight":
        ..., ...}`` for the terms that are on."""
        weights = {f"{t}_weight": s * self.schedules[t](progress) for t, s in self.scales.items()}
        ce = (
            1.0 - weights["kd_weight"]
            if self.mixing == "convex" and "kd" in self.scales
            else self.ce_weight
        )
        return {"ce_weight": ce, **weights}

    def set_progress(self, progress: float) -> dict[str, float]:
        """Move the objective to ``progress`` (called by the weight callback before each batch)."""
        self.loss_weights = self.loss_weights_at(progress)
        self.progress = progress
        return self.loss_weights

    def stage_at(self, progress: float) -> Stage | None:
        """Stage of the KD schedule (or the first scheduled term) if it is a Gompertz curve."""
        for term in TERMS:
            schedule = self.schedules.get(term)
            if schedule is not None:
                return schedule.stage(progress) if isinstance(schedule, Gompertz) else None
        return None

    # ------------------------------------------------------------------ forward
    def forward(self, images: Tensor) -> Tensor:
        """Student logits ``(N, num_classes)`` for images ``(N, 3, H, W)``."""
        return self.student(self._format(images))

    def compute_losses(
        self, images: Tensor, targets: Tensor
    ) -> tuple[Tensor, dict[str, Tensor], Tensor | None]:
        """One training forward: student (and teacher) on a batch, every active loss term.

        Args:
            images: ``(N, 3, H, W)`` normalised batch.
            targets: ``(N,)`` class indices.

        Returns:
            ``(student_logits, terms, teacher_logits)``: logits ``(N, K)``; ``terms`` maps
            ``"loss_ce"`` and ``"loss_<term>"`` for each active term to an unweighted scalar;
            teacher logits ``(N, K)`` (detached) or ``None`` without a teacher.

        Gradient matching needs the input gradient of both networks: the student's is built with
        ``create_graph=True`` (one double-backward through the student when the total is
        back-propagated), the teacher's with one extra backward through the frozen teacher.
        """
        images = self._format(images)
        match_grads = "gm" in self.scales
        if match_grads:
            images = images.detach().requires_grad_(True)
        need_features = self.wasserstein is not None
        student_out = self.student.forward_stages(images)
        terms = {"loss_ce": F.cross_entropy(student_out.logits, targets)}
        if self.teacher is None:
            return student_out.logits, terms, None

        teacher_out, teacher_grad = self._teacher_forward(images, targets, match_grads)
        if "kd" in self.scales:
            terms["loss_kd"] = losses.kd_loss(
                student_out.logits, teacher_out.logits, self.temperature
            )
        if need_features:
            terms["loss_wd"] = self.wasserstein(student_out.features, teacher_out.features)
        if match_grads:
            student_grad = losses.true_class_input_gradient(
                student_out.logits, images, targets, create_graph=True
            )
            terms["loss_gm"] = losses.gradient_matching_loss(student_grad, teacher_grad)
        return student_out.logits, terms, teacher_out.logits

    def _teacher_forward(self, images: Tensor, targets: Tensor, with_input_grad: bool):
        if not with_input_grad:
            with torch.no_grad():
                return self.teacher.forward_stages(images), None
        # Only the input needs a gradient: the teacher's parameters are frozen, so autograd keeps
        # just what the backward to the image needs, and nothing reaches the student's graph.
        teacher_input = images.detach().requires_grad_(True)
        with torch.enable_grad():
            out = self.teacher.forward_stages(teacher_input)
            grad = losses.true_class_input_gradient(
                out.logits, teacher_input, targets, create_graph=False
            )
        detached = type(out)(
            out.logits.detach(), [f.detach() for f in out.features], out.pooled.detach()
        )
        return detached, grad

    def weighted_total(self, terms: Mapping[str, Tensor]) -> Tensor:
        """``sum(<term>_weight * loss_<term>)`` with the current weights."""
        return sum(
            self.loss_weights[name.replace("loss_", "") + "_weight"] * value
            for name, value in terms.items()
        )

    # ------------------------------------------------------------------ Lightning hooks
    def training_step(
        self, batch: tuple[Tensor, Tensor], batch_idx: int
    ) -> dict[str, Tensor] | None:
        images, targets = batch
        logits, terms, teacher_logits = self.compute_losses(images, targets)
        total = self.weighted_total(terms)
        batch_size = targets.shape[0]
        # One host sync per step; all ranks decide together so DDP never waits on a skipped rank.
        if self.trainer.strategy.reduce_boolean_decision(
            not bool(torch.isfinite(total)), all=False
        ):
            return self._non_finite(terms)
        self.log("train/loss", total, prog_bar=True, batch_size=batch_size)
        self.log_dict({f"train/{k}": v.detach() for k, v in terms.items()}, batch_size=batch_size)
        self.train_metrics.update(logits.detach(), targets)
        self.log_dict(self.train_metrics, on_step=False, on_epoch=True, batch_size=batch_size)
        out = {"loss": total, "student_correct": (logits.detach().argmax(1) == targets).sum()}
        if teacher_logits is not None:
            out["teacher_correct"] = (teacher_logits.argmax(1) == targets).sum()
        return out

    def _non_finite(self, terms: Mapping[str, Tensor]) -> None:
        bad = ", ".join(f"{k}={v.item():g}" for k, v in terms.items() if not torch.isfinite(v)) or (
            "the weighted sum (every term finite; a weight is not)"
        )
        if self.nonfinite == "skip":
            self.skipped_batches += 1
            self.log(
                "train/skipped_batches", float(self.skipped_batches), on_step=True, on_epoch=False
            )
            return None
        checkpoint = getattr(self.trainer.checkpoint_callback, "last_model_path", "") or getattr(
            self.trainer.checkpoint_callback, "best_model_path", ""
        )
        raise NonFiniteLossError(
            f"non-finite loss at step {self.trainer.global_step} (epoch {self.current_epoch}): {bad}. "
            f"Last good checkpoint: {checkpoint or 'none saved yet'}. Lower the learning rate or that "
            "term's scale, or set model.nonfinite=skip to skip such batches (each skip is counted)."
        )

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, self.val_metrics, "val")

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, self.test_metrics, "test")

    def _evaluate(
        self, batch: tuple[Tensor, Tensor], metrics: MetricCollection, split: str
    ) -> None:
        images, targets = batch
        logits = self(images)
        self.log(
            f"{split}/loss_ce",
            F.cross_entropy(logits, targets),
            sync_dist=True,
            batch_size=targets.shape[0],
        )
        metrics.update(logits, targets)
        self.log_dict(
            metrics,
            on_step=False,
            on_epoch=True,
            prog_bar=split == "val",
            batch_size=targets.shape[0],
        )

    def train(self, mode: bool = True) -> DistillationModule:
        """Switch the student (and projectors) to ``mode``; the teacher stays in eval mode."""
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The student's and the projectors' parameters: never the teacher's."""
        params = list(self.student.parameters())
        if self.wasserstein is not None:
            params += list(self.wasserstein.parameters())
        return params

    def configure_optimizers(self) -> dict[str, Any]:
        params = self.trainable_parameters()
        if self._optimizer_factory is not None:
            optimizer = self._optimizer_factory(params)
        else:
            optimizer = torch.optim.SGD(
                params,
                lr=self.lr,
                momentum=self.hparams.momentum,
                weight_decay=self.hparams.weight_decay,
            )
        if self._scheduler_factory is not None:
            scheduler = self._scheduler_factory(optimizer)
        else:
            scheduler = torch.optim.lr_scheduler.MultiStepLR(
                optimizer, milestones=list(self.hparams.lr_milestones), gamma=self.hparams.lr_gamma
            )
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"},
        }

    def configure_callbacks(self) -> list[L.Callback]:
        """Add the default weight callback when the trainer has none, so the weights move."""
        from gompertz_kd.callbacks import GompertzWeightCallback

        if not self.scales or any(
            isinstance(c, GompertzWeightCallback) for c in self.trainer.callbacks
        ):
            return []
        return [GompertzWeightCallback()]

    def compile_networks(self, **compile_kwargs: Any) -> None:
        """``torch.compile`` the hot path: the student's and the teacher's ``forward_stages``."""
        self.student.forward_stages = torch.compile(self.student.forward_stages, **compile_kwargs)
        if self.teacher is not None:
            self.teacher.forward_stages = torch.compile(
                self.teacher.forward_stages, **compile_kwargs
            )

    def _format(self, images: Tensor) -> Tensor:
        return (
            images.contiguous(memory_format=torch.channels_last) if self.channels_last else images
        )


def _build(model: str | nn.Module, num_classes: int, role: str) -> nn.Module:
    if isinstance(model, nn.Module):
        if not callable(getattr(model, "forward_stages", None)):
            raise TypeError(
                f"the {role} must expose forward_stages(x); build it with gompertz_kd.models.create_model"
            )
        return model
    return create_model(model, num_classes=num_classes)
