"""The teacher-student LightningModule.

:class:`DistillationModule` trains the student on an :class:`~gompertz_kd.objectives.Objective`:

    total = ce_weight * loss_ce + sum over terms  <term>_weight * loss_<term>

where each term (KD, DKD, CRD, ..., the Wasserstein and gradient-matching terms of Gompertz-CNN)
declares what it needs from a step and each weight follows its own schedule. The module runs the
frozen teacher once per step, computing only what the terms need, and hands every term the same
:class:`~gompertz_kd.objectives.Step`. It does not decide the weights:
:class:`~gompertz_kd.callbacks.GompertzWeightCallback` computes training progress before every
batch and calls :meth:`DistillationModule.set_progress`.
"""

from __future__ import annotations

import contextlib
import math
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
from gompertz_kd.models import ForwardStages, StageOutput, create_model
from gompertz_kd.objectives import (
    Need,
    Networks,
    Objective,
    Step,
    gompertz_cnn,
    objective_from_spec,
)
from gompertz_kd.schedules import Stage

__all__ = [
    "COMPILE_SETTINGS",
    "TEACHER_PRECISIONS",
    "DistillationModule",
    "NonFiniteLossError",
    "benchmark_lr",
    "fold_batchnorm",
]

# The run's `compile` setting: nothing, the networks, or the whole step's forward as one graph.
COMPILE_SETTINGS = (None, False, True, "networks", "step")
# Precision of the teacher's passes: None follows the trainer's autocast.
TEACHER_PRECISIONS = (None, "32", "bf16")

# The frozen teacher is in eval mode on purpose; Lightning's generic warning about it is noise.
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")

OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LRScheduler]


class NonFiniteLossError(FloatingPointError):
    """A loss term became NaN or infinite during training."""


class DeferredFiniteCheck:
    """The device-side record behind ``model.sync_every > 1``: every training step ors in whether
    its loss was not finite (one flag, or one per population member) without a host
    synchronisation; the host reads the record every ``every`` steps, at epoch ends and before a
    checkpoint is written (:meth:`take`)."""

    def __init__(self, every: int) -> None:
        self.every = every
        self.pending: Tensor | None = None
        self.since = 0  # the first step the pending flags cover

    def add(self, bad: Tensor, step: int) -> bool:
        """Or in the flags of training step ``step``; whether the host should read them now."""
        if self.pending is None:
            self.pending, self.since = bad, step
        else:
            self.pending = self.pending | bad
        return (step + 1) % self.every == 0

    def take(self) -> Tensor | None:
        """The flags since the last read (``None`` if no step came since), clearing them."""
        pending, self.pending = self.pending, None
        return pending


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
        objective: the loss (:class:`~gompertz_kd.objectives.Objective`: cross-entropy plus named
            terms, each ``scale * schedule(progress)``). ``None``: Gompertz KD
            (:func:`~gompertz_kd.objectives.gompertz_cnn` with its defaults) when there is a
            teacher, cross-entropy alone when there is none. Its terms build their trainable
            parts here, after the networks (and the teacher's weights) are in place. Its spec
            (:meth:`Objective.spec`, plain data) is recorded as the hyper-parameter
            ``objective``, so ``DistillationModule.load_from_checkpoint(path)`` rebuilds it;
            a spec given here is built with :func:`~gompertz_kd.objectives.objective_from_spec`.
        num_train_samples: images in the training set, for terms with a per-image memory (CRD).
        lr, momentum, weight_decay, lr_milestones, lr_gamma: the default optimiser, SGD with a
            step LR schedule (per epoch). ``lr=None`` picks :func:`benchmark_lr` for the student.
        optimizer, lr_scheduler: factories (e.g. ``functools.partial`` or Hydra ``_partial_``)
            replacing the default; they receive the trainable parameters / the optimiser.
        channels_last: keep both networks, the objective's parts and the input batches in
            ``channels_last`` memory format (faster convolutions on most CPUs and on tensor-core
            GPUs).
        teacher_precision: precision of the teacher's passes. ``None`` follows the trainer (fp32,
            or bf16 under ``precision="bf16-mixed"``); ``"32"`` keeps the teacher in fp32 even
            under mixed precision; ``"bf16"`` runs it under bf16 autocast even when the student
            trains in fp32 (about 2x faster on CPUs with AVX512-BF16 or AMX, not exact: see
            ``docs/benchmarks.md``). Its outputs are cast to fp32 for the loss terms.
        fold_teacher_bn: run the frozen teacher through a private copy with every eval-mode
            BatchNorm folded into the convolution before it (``torch.fx``): the same function up
            to float rounding, without BatchNorm's passes over memory, which dominate the
            teacher's backward to the image under gradient matching. The copy is rebuilt when
            the teacher's tensors change (a device move, loaded weights); state dicts and
            checkpoints hold the teacher as built. A teacher that ``torch.fx`` cannot trace runs
            unfolded, with a warning.
        gm_every: compute the terms that need the teacher's input gradient (gradient matching)
            on every ``gm_every``-th training step only (``global_step % gm_every == 0``), with
            their weight multiplied by ``gm_every`` so their average contribution is unchanged
            (lazy regularisation). The other steps skip the teacher's backward and the student's
            double backward.
        gm_precision: ``"32"`` (default) runs the student's forward, the teacher's input-gradient
            pass and those terms in fp32 on the steps they are due, even under ``bf16-mixed``:
            the student's second-order gradient in bf16 is far from the fp32 one (cosine 0.23 in
            ``docs/benchmarks.md``). On fp32 runs it changes nothing. ``None`` runs them in the
            trainer's precision.
        gm_fraction: compute the input-gradient terms on the first ``round(gm_fraction * N)``
            images of each batch only (at least one). Batches are shuffled, so this is an
            unbiased estimate of the batch mean of the per-image term; the student's forward for
            it is a second pass over those images (BatchNorm in train mode takes that subset's
            statistics; the running statistics are left as the full-batch pass set them), and the
            teacher's input-gradient pass and the student's double backward shrink with it. ``1``
            (default) is the paper's objective: one pass, every image.
        nonfinite: what a NaN or infinite loss does: ``"stop"`` raises
            :class:`NonFiniteLossError` naming the term, the step and the last checkpoint;
            ``"skip"`` skips the batch (no update) and counts it in ``train/skipped_batches``.
        sync_every: how often the host reads whether the loss is finite, in training steps.
            ``1`` (default): every step, before the update, as ``nonfinite`` describes. ``k > 1``
            (``nonfinite="stop"`` only): the steps keep a flag on the device and the host reads it
            every ``k``-th step, at the end of an epoch and before any checkpoint is saved, so
            the device runs ahead of the host instead of waiting for it each step (the step's
            only host synchronisation); a non-finite loss then stops the run within ``k`` steps,
            and no checkpoint is written after it. The step's loss is then not shown on the
            progress bar (a progress bar reads it every step).

    The training forward :meth:`compute_losses` returns ``(student_logits, {"loss_ce": ...,
    "loss_<term>": ..., ...}, teacher_logits)``; the total is the weighted sum of that dict.

    Raises:
        ValueError: an argument out of its range or not one of its choices (named in the message).
    """

    def __init__(
        self,
        student: str | nn.Module = "MobileNetV2",
        teacher: str | nn.Module | None = "ResNet50",
        num_classes: int = 100,
        teacher_ckpt: str | None = None,
        objective: Objective | None = None,
        num_train_samples: int | None = None,
        lr: float | None = None,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        lr_milestones: Sequence[int] = (150, 180, 210),
        lr_gamma: float = 0.1,
        optimizer: OptimizerFactory | None = None,
        lr_scheduler: SchedulerFactory | None = None,
        channels_last: bool = True,
        nonfinite: str = "stop",
        sync_every: int = 1,
        teacher_precision: str | int | None = None,
        fold_teacher_bn: bool = True,
        gm_every: int = 1,
        gm_precision: str | int | None = "32",
        gm_fraction: float = 1.0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(
            ignore=[
                n
                for n, v in (("student", student), ("teacher", teacher))
                if isinstance(v, nn.Module)
            ]
            + ["optimizer", "lr_scheduler", "objective"],
            logger=False,
        )
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got num_classes={num_classes}")
        if nonfinite not in ("stop", "skip"):
            raise ValueError(f"nonfinite must be 'stop' or 'skip', got nonfinite={nonfinite!r}")
        if isinstance(sync_every, bool) or not isinstance(sync_every, int) or sync_every < 1:
            raise ValueError(f"sync_every must be an integer >= 1, got sync_every={sync_every!r}")
        if sync_every > 1 and nonfinite == "skip":
            raise ValueError(
                f"nonfinite=skip decides on every step whether to update, so it needs "
                f"sync_every=1 (got sync_every={sync_every}); use nonfinite=stop to check less often"
            )
        # Hydra reads `teacher_precision=32` as an integer.
        teacher_precision = None if teacher_precision is None else str(teacher_precision)
        gm_precision = None if gm_precision is None else str(gm_precision)
        if teacher_precision not in TEACHER_PRECISIONS:
            raise ValueError(
                f"teacher_precision must be one of {TEACHER_PRECISIONS}, got "
                f"teacher_precision={teacher_precision!r}"
            )
        if gm_precision not in (None, "32"):
            raise ValueError(
                f"gm_precision must be None or '32', got gm_precision={gm_precision!r}"
            )
        if isinstance(gm_every, bool) or not isinstance(gm_every, int) or gm_every < 1:
            raise ValueError(f"gm_every must be an integer >= 1, got gm_every={gm_every!r}")
        if (
            isinstance(gm_fraction, bool)
            or not isinstance(gm_fraction, int | float)
            or not (0 < gm_fraction <= 1)
        ):
            raise ValueError(
                f"gm_fraction must be a number in (0, 1] (1: every image of the batch), got "
                f"gm_fraction={gm_fraction!r}"
            )
        if objective is None:
            objective = gompertz_cnn() if teacher is not None else Objective()
        if isinstance(objective, Mapping):  # a recorded spec (load_from_checkpoint)
            objective = objective_from_spec(objective)
        if not isinstance(objective, Objective):
            raise TypeError(
                f"objective must be a gompertz_kd.objectives.Objective, got {type(objective).__name__}"
            )
        if teacher is None and objective.terms:
            raise ValueError(
                f"the objective's terms {objective.names} distil from a teacher, but teacher=None; "
                "give a teacher, or an objective without terms to train the student alone"
            )
        self.hparams["objective"] = _objective_spec(objective)
        self.nonfinite = nonfinite
        self.skipped_batches = 0
        self.teacher_precision = teacher_precision
        self.fold_teacher_bn = fold_teacher_bn
        self.gm_every = gm_every
        self.gm_precision = gm_precision
        self.gm_fraction = float(gm_fraction)
        # (watched teacher tensors, their fingerprint, the callable the teacher's forward runs
        # through); a plain tuple, so neither state_dict nor .to() sees it. See _teacher_runner.
        self._teacher_cache: tuple[tuple, tuple, Callable[[Tensor], StageOutput]] | None = None
        self._compile_kwargs: dict[str, Any] | None = None
        self.sync_every = sync_every
        self._finite_check = DeferredFiniteCheck(sync_every)
        # compile_step(): the compiled step_forward, and whether the teacher's runner was checked
        # outside it for this call
        self._compiled_step: Callable[..., tuple[Tensor, Tensor, Tensor, Tensor | None]] | None = (
            None
        )
        # whether it is the off-beat step (input-gradient terms left out, run eager when due)
        self._compiled_off_beat = False
        self._runner_checked = False

        self.student = _build(student, num_classes, "student")
        self.teacher = None if teacher is None else _build(teacher, num_classes, "teacher")
        if self.teacher is not None:
            if teacher_ckpt is not None:
                load_weights(
                    self.teacher, teacher_ckpt, f"teacher {teacher} with {num_classes} classes"
                )
            self.teacher.requires_grad_(False)
            self.teacher.eval()

        self.objective = objective
        if self.teacher is not None:
            self.objective.bind(
                Networks(self.student, self.teacher, num_classes, num_train_samples)
            )
        # the terms computed only on every gm_every-th step, their weight x gm_every
        self._lazy_terms = frozenset(objective.names_needing(Need.INPUT_GRAD))
        self._index_terms = objective.names_needing(Need.INDICES)
        self._progress_terms = objective.names_needing(Need.PROGRESS)

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
        return self.objective.weights_at(progress)

    def set_progress(self, progress: float) -> dict[str, float]:
        """Move the objective to ``progress`` (called by the weight callback before each batch)."""
        self.loss_weights = self.loss_weights_at(progress)
        self.progress = progress
        return self.loss_weights

    def stage_at(self, progress: float) -> Stage | None:
        """Stage of the first term's schedule if it is a Gompertz curve."""
        return self.objective.stage_at(progress)

    # ------------------------------------------------------------------ forward
    def forward(self, images: Tensor) -> Tensor:
        """Student logits ``(N, num_classes)`` for images ``(N, 3, H, W)``."""
        return self.student(self._format(images))

    def compute_losses(
        self,
        images: Tensor,
        targets: Tensor,
        step: int | None = None,
        indices: Tensor | None = None,
        teacher: tuple[StageOutput, Tensor | None] | None = None,
        student: StageOutput | None = None,
    ) -> tuple[Tensor, dict[str, Tensor], Tensor | None]:
        """One training forward: student (and teacher) on a batch, every term that is due.

        Args:
            images: ``(N, 3, H, W)`` normalised batch.
            targets: ``(N,)`` class indices.
            step: the training step, which decides whether the input-gradient terms are due when
                ``gm_every > 1``; ``None`` computes every term.
            indices: ``(N,)`` training-set indices of the images (terms that need them: CRD).
            teacher: the teacher's ``(outputs, input_gradient)`` on this batch, computed already
                by :meth:`teacher_forward` (a population shares one teacher pass among its
                members); ``None`` runs the teacher here.
            student: the student's outputs on this batch, computed already (a population's
                fused members, :mod:`gompertz_kd.fused`; not with an input-gradient term due,
                which differentiates the student's forward itself); ``None`` runs it here.

        Returns:
            ``(student_logits, terms, teacher_logits)``: logits ``(N, K)``; ``terms`` maps
            ``"loss_ce"`` and ``"loss_<term>"`` for each term due at this step to an unweighted
            scalar; teacher logits ``(N, K)`` (detached), or ``None`` when no term ran the
            teacher.

        The teacher runs once, without autograd unless a due term needs its input gradient (then
        with autograd on the image only, plus one backward to it); the images then carry autograd
        so that the student's input gradient can be built with ``create_graph=True``.
        """
        images = self._format(images)
        due = self.due_terms(step)
        input_grad = any(name in self._lazy_terms for name in due)
        # gm_fraction < 1: the input-gradient terms get their own pass over a subset; the full
        # batch's forward is then a plain one.
        subset = input_grad and self.gm_fraction < 1
        if input_grad and not subset:
            images = images.detach().requires_grad_(True)
        # The student's forward and its input gradient (create_graph: its ops dispatch through
        # autocast too) run in gm_precision on the steps an input-gradient term is due.
        gm_precision = self.gm_precision if input_grad else None
        with self._precision(images, None if subset else gm_precision):
            student_out = self.student.forward_stages(images) if student is None else student
        terms = {"loss_ce": F.cross_entropy(student_out.logits, targets)}
        if not due:
            return student_out.logits, terms, None
        if indices is None and self._index_terms:
            raise ValueError(
                f"terms {self._index_terms} need each image's training-set "
                "index: pass indices=, or build the data module with with_indices=True"
            )

        if teacher is None:
            teacher_out, teacher_grad = self.teacher_forward(images, targets, input_grad)
        else:
            teacher_out, teacher_grad = teacher
            if input_grad and teacher_grad is None:
                raise ValueError(
                    f"terms {sorted(self._lazy_terms)} are due at step {step} and need the "
                    "teacher's input gradient; pass the teacher_forward(..., input_gradient=True) "
                    "output"
                )
        batch = Step(
            student=student_out,
            teacher=teacher_out,
            images=images,
            targets=targets,
            indices=indices,
            teacher_input_grad=teacher_grad,
            # read only by the terms that need it, so that no other step depends on its value
            progress=self.progress if self._progress_terms else 0.0,
            step=step,
        )
        lazy_batch = batch
        if subset:
            lazy_batch = self._gm_subset_step(batch, gm_precision)
        for name in due:
            lazy = name in self._lazy_terms
            with self._precision(images, gm_precision if lazy else None):
                terms[f"loss_{name}"] = self.objective.terms[name](lazy_batch if lazy else batch)
        return student_out.logits, terms, teacher_out.logits

    def gm_rows(self, batch_size: int) -> int:
        """How many images of a batch of ``batch_size`` the input-gradient terms see: the first
        ``round(gm_fraction * batch_size)``, at least one."""
        if self.gm_fraction >= 1:
            return batch_size
        return max(1, min(batch_size, math.floor(self.gm_fraction * batch_size + 0.5)))

    def _gm_subset_step(self, batch: Step, gm_precision: str | None) -> Step:
        """The :class:`Step` the input-gradient terms see under ``gm_fraction < 1``: the
        student's second forward over the first :meth:`gm_rows` images (with autograd on them),
        the teacher's outputs and input gradient on the same rows. The second pass runs on
        copies of the student's buffers, so BatchNorm's running statistics move once per step,
        as without it."""
        rows = self.gm_rows(batch.targets.shape[0])
        images = batch.images[:rows].detach().requires_grad_(True)
        buffers = {f"model.{n}": b.clone() for n, b in self.student.named_buffers()}
        with self._precision(images, gm_precision):
            student = torch.func.functional_call(ForwardStages(self.student), buffers, (images,))
        teacher = batch.teacher
        return Step(
            student=student,
            teacher=StageOutput(
                logits=teacher.logits[:rows],
                features=[f[:rows] for f in teacher.features],
                pooled=teacher.pooled[:rows],
            ),
            images=images,
            targets=batch.targets[:rows],
            indices=None if batch.indices is None else batch.indices[:rows],
            teacher_input_grad=batch.teacher_input_grad,
            progress=batch.progress,
            step=batch.step,
        )

    def due_terms(self, step: int | None) -> list[str]:
        """The terms computed at training step ``step`` (``None``: every term): all but the
        input-gradient terms off their ``gm_every`` beat."""
        lazy_due = step is None or step % self.gm_every == 0
        return [n for n in self.objective.names if lazy_due or n not in self._lazy_terms]

    def gm_due(self, step: int | None) -> bool:
        """Whether the input-gradient terms (gradient matching) are computed at ``step``."""
        return bool(self._lazy_terms) and (step is None or step % self.gm_every == 0)

    def teacher_forward(
        self, images: Tensor, targets: Tensor | None = None, input_gradient: bool = False
    ) -> tuple[StageOutput, Tensor | None]:
        """The frozen teacher on a batch, BatchNorm folded if asked, in ``teacher_precision``
        (the input-gradient pass in ``gm_precision`` when that is set).

        Args:
            images: ``(N, 3, H, W)`` in the module's memory format.
            targets: ``(N,)`` class indices; needed only with ``input_gradient``.
            input_gradient: also return the gradient of each image's true-class cross-entropy
                with respect to the image (:func:`gompertz_kd.losses.true_class_input_gradient`).

        Returns:
            ``(StageOutput, input_grad)``: detached teacher outputs (fp32 when the teacher ran in
            bf16) and ``(N, 3, H, W)`` or ``None``; under ``gm_fraction < 1`` the input gradient
            covers the first :meth:`gm_rows` images only (a second pass over them), and the
            outputs come from a pass without autograd in ``teacher_precision``. Without
            ``input_gradient`` no autograd state is kept at all.

        Raises:
            RuntimeError: the teacher's weights are on another device than ``images``.
        """
        if self.teacher is None:
            raise RuntimeError("this module has no teacher")
        run = self._teacher_runner(images.device)
        precision = self.teacher_precision
        grad_precision = self.gm_precision if self.gm_precision is not None else precision
        rows = images.shape[0] if not input_gradient else self.gm_rows(images.shape[0])
        if not input_gradient or rows < images.shape[0]:
            with torch.no_grad(), self._precision(images, precision):
                out = self._teacher_output(run(images), precision)
            if not input_gradient:
                return out, None
        if targets is None:
            raise ValueError("input_gradient=True needs the targets")
        # Only the input needs a gradient: the teacher's parameters are frozen, so autograd keeps
        # just what the backward to the image needs, and nothing reaches the student's graph.
        teacher_input = images[:rows].detach().requires_grad_(True)
        with torch.enable_grad(), self._precision(images, grad_precision):
            grad_out = run(teacher_input)
            grad = losses.true_class_input_gradient(
                grad_out.logits.float(), teacher_input, targets[:rows], create_graph=False
            )
        if rows < images.shape[0]:
            return out, grad
        # one pass serves every term: its outputs are the teacher's outputs of this step
        return self._teacher_output(grad_out, grad_precision), grad

    @staticmethod
    def _teacher_output(out: StageOutput, precision: str | None) -> StageOutput:
        to_fp32 = precision == "bf16"
        return StageOutput(
            logits=_detached(out.logits, to_fp32),
            features=[_detached(f, to_fp32) for f in out.features],
            pooled=_detached(out.pooled, to_fp32),
            preact_features=None
            if out.preact_features is None
            else [_detached(f, to_fp32) for f in out.preact_features],
        )

    @staticmethod
    def _precision(images: Tensor, precision: str | None) -> contextlib.AbstractContextManager:
        """``None``: whatever autocast is around; ``"32"``: autocast off; ``"bf16"``: on."""
        if precision is None:
            return contextlib.nullcontext()
        return torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=precision == "bf16")

    def _teacher_runner(
        self, device: torch.device | None = None
    ) -> Callable[[Tensor], StageOutput]:
        """The teacher's ``forward_stages``, through the BatchNorm-folded copy if asked and
        compiled if :meth:`compile_networks` was called. Rebuilt when the teacher is replaced,
        moved, cast or loaded with other weights (seen on its first and last parameter and
        buffer: storage, version counter, dtype), a check of a few microseconds per step.

        ``device``: where the batch is. A teacher left on another device fails here with the
        reason rather than inside its first convolution (under CUDA autocast a CPU weight is not
        cast, and the error names a bf16 input against a float bias). The usual cause: the
        teacher is shared with another LightningModule that a ``Trainer`` fitted, and Lightning
        moves the module it fitted to the CPU when ``fit`` ends."""
        if device is not None:
            where = next(self.teacher.parameters()).device
            if where != device:
                raise RuntimeError(
                    f"the teacher's weights are on {where} but the batch is on {device}: move "
                    f"the module to the batch's device (module.to({str(device)!r})). A teacher "
                    "shared with another module is moved with it, and Lightning moves a module "
                    "to the CPU when Trainer.fit ends"
                )
        cache = self._teacher_cache
        if self._runner_checked and cache is not None:
            return cache[2]  # checked just before the compiled step
        if cache is not None and _fingerprint(self.teacher, cache[0]) == cache[1]:
            return cache[2]
        runner: Callable[[Tensor], StageOutput] = self.teacher.forward_stages
        if self.fold_teacher_bn:
            folded = fold_batchnorm(self.teacher)
            if folded is not None:
                # on the teacher's device, whatever the copy's tensors were made on
                folded = folded.to(next(self.teacher.parameters()).device)
                if self.channels_last:
                    folded = folded.to(memory_format=torch.channels_last)
                runner = folded
        if self._compile_kwargs is not None:
            runner = torch.compile(runner, **self._compile_kwargs)
        watched = _watched_tensors(self.teacher)
        self._teacher_cache = (watched, _fingerprint(self.teacher, watched), runner)
        return runner

    def weighted_total(self, terms: Mapping[str, Tensor]) -> Tensor:
        """``sum(<term>_weight * loss_<term>)`` with the current weights; an input-gradient
        term counts ``gm_every`` times, as it is present on every ``gm_every``-th step only."""
        return sum(
            self.loss_weights[name.removeprefix("loss_") + "_weight"]
            * (self.gm_every if name.removeprefix("loss_") in self._lazy_terms else 1)
            * value
            for name, value in terms.items()
        )

    # ------------------------------------------------------------------ Lightning hooks
    def training_step(self, batch: tuple[Tensor, ...], batch_idx: int) -> dict[str, Tensor] | None:
        # (images, targets), or (images, targets, indices) from a data module asked for indices
        images, targets, *rest = batch
        indices = rest[0] if rest else None
        logits, terms, teacher_logits, total = self.step_losses(
            images, targets, self.global_step, indices
        )
        batch_size = targets.shape[0]
        if self.sync_every > 1:
            self._defer_finite_check(total)
        # One host sync per step; all ranks decide together so DDP never waits on a skipped rank.
        elif self.trainer.strategy.reduce_boolean_decision(
            not bool(torch.isfinite(total)), all=False
        ):
            return self._non_finite(terms)
        # A progress bar reads its values on the host every step: with sync_every > 1 the
        # step's loss stays off it (it is logged as usual), so that nothing waits for the device.
        self.log("train/loss", total, prog_bar=self.sync_every == 1, batch_size=batch_size)
        self.log_dict(self.step_values(terms), batch_size=batch_size)
        self.train_metrics.update(logits.detach(), targets)
        self.log_dict(self.train_metrics, on_step=False, on_epoch=True, batch_size=batch_size)
        return {"loss": total, **self.step_counts(logits, teacher_logits, targets)}

    # ------------------------------------------------------------------ deferred finite check
    def _defer_finite_check(self, total: Tensor) -> None:
        if self._finite_check.add(~torch.isfinite(total.detach()), self.global_step):
            self.check_finite()

    def check_finite(self) -> None:
        """Read the device-side flag of ``sync_every > 1`` (a host synchronisation, taken by
        every rank together) and raise :class:`NonFiniteLossError` if a loss since the last
        check was not finite. A no-op with ``sync_every=1``."""
        pending = self._finite_check.take()
        if pending is None:
            return
        if self.trainer.strategy.reduce_boolean_decision(bool(pending), all=False):
            raise NonFiniteLossError(
                f"non-finite loss at a step between {self._finite_check.since} and "
                f"{self.trainer.global_step} (epoch {self.current_epoch}; the loss is checked "
                f"every {self.sync_every} steps, model.sync_every). No checkpoint was written "
                "after it. Lower the learning rate or a term's scale, or set model.sync_every=1 "
                "to find the step and term"
            )

    def on_train_epoch_end(self) -> None:
        self.check_finite()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # a checkpoint is never written over an unchecked non-finite step
        if self._trainer is not None:
            self.check_finite()

    # ------------------------------------------------------------------ compiled step
    def step_forward(
        self, images: Tensor, targets: Tensor, indices: Tensor | None, weights: Tensor
    ) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """A training step's forward as a function of tensors alone, what :meth:`compile_step`
        compiles: the teacher's pass, the student's, every term, the weighted total.

        Args:
            images, targets, indices: the batch (``indices``: ``None`` unless a term needs them).
            weights: ``(1 + T,)`` the weights of the cross-entropy and of the objective's ``T``
                terms, in :attr:`term_order` (:meth:`weight_vector`).

        Returns:
            ``(total, student_logits, values, teacher_logits)``: ``values`` ``(1 + T,)`` the
            unweighted losses in :attr:`term_order`.
        """
        return self._weighted_forward(images, targets, indices, weights, None, self.term_order)

    def off_beat_step_forward(
        self, images: Tensor, targets: Tensor, indices: Tensor | None, weights: Tensor
    ) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """:meth:`step_forward` of a step on which the input-gradient terms are not due
        (``gm_every > 1``): every other term, in :attr:`off_beat_order`."""
        return self._weighted_forward(images, targets, indices, weights, 1, self.off_beat_order)

    def _weighted_forward(
        self,
        images: Tensor,
        targets: Tensor,
        indices: Tensor | None,
        weights: Tensor,
        step: int | None,
        order: Sequence[str],
    ) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """The losses of training step ``step`` (its due terms: ``order``) and their total."""
        logits, terms, teacher_logits = self.compute_losses(images, targets, step, indices)
        values = torch.stack([terms[f"loss_{name}"] for name in order])
        return (weights * values).sum(), logits, values, teacher_logits

    @property
    def term_order(self) -> list[str]:
        """``["ce", <term>, ...]``: the order of :meth:`step_forward`'s weights and values."""
        return ["ce", *self.objective.names]

    @property
    def off_beat_order(self) -> list[str]:
        """:attr:`term_order` without the input-gradient terms (:meth:`off_beat_step_forward`)."""
        return [n for n in self.term_order if n not in self._lazy_terms]

    def weight_vector(self, device: torch.device, names: Sequence[str] | None = None) -> Tensor:
        """The current weights of ``names`` (default :attr:`term_order`) as a tensor on
        ``device``, copied from pinned memory without blocking on CUDA (no host
        synchronisation)."""
        names = self.term_order if names is None else names
        values = torch.tensor([self.loss_weights[f"{n}_weight"] for n in names])
        if device.type == "cuda":
            return values.pin_memory().to(device, non_blocking=True)
        return values.to(device)

    def compile_step(self, **compile_kwargs: Any) -> None:
        """``torch.compile`` the training step's forward as one graph (:meth:`step_forward`:
        the teacher's pass, BatchNorm folded if asked, the student's, every term and the
        weighted total, with the backward compiled with it): on a GPU, ``mode="reduce-overhead"``
        replays it as CUDA graphs. The weights enter as a tensor, so a moving schedule does not
        recompile it.

        A term that needs the teacher's input gradient (gradient matching: a double backward,
        which compiled graphs lack) is left out of the graph: with ``gm_every > 1`` the steps it
        is not due on run compiled (:meth:`off_beat_step_forward`) and the steps it is due on
        eager. Objectives with such a term on every step (``gm_every=1``), or with a term that
        reads the training progress (which would recompile every step), fall back to
        :meth:`compile_networks`, with a warning.
        """
        blocked = sorted(
            set(self.objective.names_needing(Need.INPUT_GRAD))
            | set(self.objective.names_needing(Need.PROGRESS))
        )
        off_beat = self.gm_every > 1 and not self.objective.names_needing(Need.PROGRESS)
        if blocked and off_beat:
            # the input-gradient terms are the lazy ones: due every gm_every-th step only
            self._compiled_step = torch.compile(
                self.off_beat_step_forward, **{"dynamic": False, **compile_kwargs}
            )
            self._compiled_off_beat = True
            return
        if blocked:
            warnings.warn(
                f"compile_step: terms {blocked} need the teacher's input gradient or the "
                "training progress, which a compiled step cannot take; compiling the networks "
                "only (compile_networks)",
                stacklevel=2,
            )
            self.compile_networks(**compile_kwargs)
            return
        # static shapes: an epoch's short last batch compiles a second graph once, not a dynamic
        # one for every batch (CUDA graphs replay static shapes)
        self._compiled_step = torch.compile(
            self.step_forward, **{"dynamic": False, **compile_kwargs}
        )
        self._compiled_off_beat = False

    def step_losses(
        self, images: Tensor, targets: Tensor, step: int | None, indices: Tensor | None = None
    ) -> tuple[Tensor, dict[str, Tensor], Tensor | None, Tensor]:
        """A training step's losses, through the compiled step after :meth:`compile_step`:
        ``(student_logits, terms, teacher_logits, total)`` as :meth:`compute_losses` and
        :meth:`weighted_total` give them."""
        if self._compiled_step is None or (self._compiled_off_beat and self.gm_due(step)):
            logits, terms, teacher_logits = self.compute_losses(images, targets, step, indices)
            return logits, terms, teacher_logits, self.weighted_total(terms)
        if self.teacher is not None and self.objective.terms:
            self._teacher_runner(images.device)  # checked and rebuilt here, not in the graph
        order = self.off_beat_order if self._compiled_off_beat else self.term_order
        self._runner_checked = True
        try:
            total, logits, values, teacher_logits = self._compiled_step(
                images, targets, indices, self.weight_vector(images.device, order)
            )
        finally:
            self._runner_checked = False
        terms = {f"loss_{name}": v for name, v in zip(order, values, strict=True)}
        return logits, terms, teacher_logits, total

    def step_values(self, terms: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """What a training step logs besides ``train/loss``: each term (``train/loss_<term>``)
        and each term's extra metrics (``train/<term>/<key>``), detached."""
        values = {f"train/{k}": v.detach() for k, v in terms.items()}
        for name, term in self.objective.terms.items():
            for key, value in term.extra_metrics().items():
                values[f"train/{name}/{key}"] = value.detach()
        return values

    @staticmethod
    def step_counts(
        logits: Tensor, teacher_logits: Tensor | None, targets: Tensor
    ) -> dict[str, Tensor]:
        """The batch's correct predictions, student's and (when it ran) teacher's: what the
        trajectory progress of the weight callback reads."""
        out = {"student_correct": (logits.detach().argmax(1) == targets).sum()}
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
        """Switch the student (and the objective's parts) to ``mode``; the teacher stays in eval
        mode."""
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The student's and the objective's parameters (projectors, regressors, a learnable
        temperature): never the teacher's."""
        return list(self.student.parameters()) + list(self.objective.parameters())

    def configure_optimizers(self) -> dict[str, Any]:
        return self.optimizer_config(self.trainable_parameters())

    def optimizer_config(self, params: list[nn.Parameter]) -> dict[str, Any]:
        """The optimiser (SGD with this module's settings, or the configured factory) and its
        epoch-wise scheduler over ``params``: this module's trainable parameters in a single run,
        every member's in a population."""
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

        if not self.objective.terms or any(
            isinstance(c, GompertzWeightCallback) for c in self.trainer.callbacks
        ):
            return []
        return [GompertzWeightCallback()]

    def apply_compile(self, setting: bool | str | None, **compile_kwargs: Any) -> None:
        """The run's ``compile`` setting (:data:`COMPILE_SETTINGS`): ``"step"``
        :meth:`compile_step`; ``True`` or ``"networks"`` :meth:`compile_networks`; ``False`` /
        ``None`` nothing.

        Raises:
            ValueError: another value, named.
        """
        if setting not in COMPILE_SETTINGS:
            raise ValueError(f"compile must be one of {COMPILE_SETTINGS}, got compile={setting!r}")
        if setting == "step":
            self.compile_step(**compile_kwargs)
        elif setting:
            self.compile_networks(**compile_kwargs)

    def compile_networks(self, **compile_kwargs: Any) -> None:
        """``torch.compile`` the hot path: the student's and the teacher's ``forward_stages``.

        The teacher is compiled as it runs (BatchNorm folded if ``fold_teacher_bn``). With
        gradient matching on, the student stays eager, with a warning: compiled graphs have no
        double backward.
        """
        if self._lazy_terms:
            warnings.warn(
                "compile_networks: the student stays eager, since gradient matching needs a double "
                "backward through it, which compiled graphs lack; the teacher is compiled",
                stacklevel=2,
            )
        else:
            self.student.forward_stages = torch.compile(
                self.student.forward_stages, **compile_kwargs
            )
        self._compile_kwargs = dict(compile_kwargs)
        self._teacher_cache = None

    @classmethod
    def load_from_checkpoint(  # type: ignore[override]
        cls,
        checkpoint_path: Any,
        map_location: Any = None,
        hparams_file: Any = None,
        strict: bool | None = None,
        weights_only: bool = True,
        **kwargs: Any,
    ) -> DistillationModule:
        """A module as a checkpoint saved it: networks, objective (rebuilt from the spec recorded
        as the hyper-parameter ``objective``, its trainable parts and buffers restored) and
        metrics. Read with ``weights_only=True`` (no code in the file runs); keyword arguments
        override the recorded hyper-parameters (``objective=`` one built by hand)."""
        return super().load_from_checkpoint(
            checkpoint_path,
            map_location=map_location,
            hparams_file=hparams_file,
            strict=strict,
            weights_only=weights_only,
            **kwargs,
        )

    def __getstate__(self) -> dict[str, Any]:
        # The cached teacher runner and the compiled step are compiled functions, which do not
        # pickle.
        state = dict(super().__getstate__())
        state["_teacher_cache"] = None
        state["_compiled_step"] = None
        return state

    def _format(self, images: Tensor) -> Tensor:
        return (
            images.contiguous(memory_format=torch.channels_last) if self.channels_last else images
        )


def _objective_spec(objective: Objective) -> dict[str, Any] | None:
    """The objective's spec for the checkpoint, or ``None`` (with a warning) when a term was
    built with arguments that are not plain data: such a checkpoint needs ``objective=`` given
    to ``load_from_checkpoint``."""
    try:
        return objective.spec()
    except TypeError as error:
        warnings.warn(
            f"the objective cannot be recorded in checkpoints ({error}); pass objective= to "
            "DistillationModule.load_from_checkpoint",
            stacklevel=3,
        )
        return None


def _build(model: str | nn.Module, num_classes: int, role: str) -> nn.Module:
    if isinstance(model, nn.Module):
        if not callable(getattr(model, "forward_stages", None)):
            raise TypeError(
                f"the {role} must expose forward_stages(x); build it with gompertz_kd.models.create_model"
            )
        classes = _class_count(model)
        if classes is not None and classes != num_classes:
            raise ValueError(
                f"the {role} {type(model).__name__} predicts {classes} classes but the data set has "
                f"{num_classes}: build it with create_model(name, num_classes={num_classes}) or "
                f"pass num_classes={classes} if that is the data set's class count"
            )
        return model
    return create_model(model, num_classes=num_classes)


def _class_count(model: nn.Module) -> int | None:
    """How many classes ``model`` predicts: its ``num_classes``, else the width of its
    classifier; ``None`` when neither says."""
    classes = getattr(model, "num_classes", None)
    if isinstance(classes, int):
        return classes
    get_classifier = getattr(model, "get_classifier", None)
    head = get_classifier() if callable(get_classifier) else None
    return head.out_features if isinstance(head, nn.Linear) else None


def fold_batchnorm(model: nn.Module) -> nn.Module | None:
    """An eval-mode copy of ``model`` whose ``forward`` is ``model.forward_stages`` with every
    BatchNorm that follows a convolution folded into it (``torch.fx`` ``fuse``), parameters
    frozen. ``None`` (with a warning) when the model cannot be traced."""
    from torch.fx.experimental.optimization import fuse

    try:
        folded = fuse(ForwardStages(model).eval(), inplace=False)
    except Exception as error:  # tracing fails in many ways (control flow, untraceable ops)
        warnings.warn(
            f"fold_teacher_bn: {type(model).__name__} cannot be traced by torch.fx ({error}); "
            "the teacher runs with its BatchNorm layers as built",
            stacklevel=3,
        )
        return None
    return folded.requires_grad_(False).eval()


def _watched_tensors(module: nn.Module) -> tuple[Tensor, ...]:
    """The first and last parameter and buffer of ``module``: a move, a cast or a full
    ``load_state_dict`` changes each of them."""
    params, buffers = list(module.parameters()), list(module.buffers())
    return tuple(t for group in (params, buffers) if group for t in (group[0], group[-1]))


def _fingerprint(module: nn.Module, watched: tuple[Tensor, ...]) -> tuple:
    return (id(module),) + tuple((t.data_ptr(), t._version, t.dtype) for t in watched)


def _detached(t: Tensor, to_fp32: bool) -> Tensor:
    t = t.detach()
    return t.float() if to_fp32 else t
