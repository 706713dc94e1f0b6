"""The contract between a distillation method and the training step.

A *term* is an ``nn.Module`` that turns what one training step computed into one scalar loss:

    class MyTerm(Term):
        needs = frozenset({Need.LOGITS})            # what it reads from the step
        def forward(self, step: Step) -> Tensor:     # one unweighted scalar
            return my_loss(step.student.logits, step.teacher.logits)

Trainable parts (projectors, regressors, memory banks, a learnable temperature) are submodules,
built in :meth:`Term.bind` once the networks are known, so the optimiser and checkpoints find them
with no special case. Terms know nothing of epochs or weights: the
:class:`~gompertz_kd.objectives.Objective` gives each term a scale and a schedule.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

import torch
from torch import Tensor, nn

from gompertz_kd.losses import standardize_logits
from gompertz_kd.models import StageOutput
from gompertz_kd.models.registry import stage_output_shapes
from gompertz_kd.objectives.spec import Recorded

__all__ = [
    "LogitTerm",
    "Need",
    "Networks",
    "StagePairTerm",
    "Step",
    "Term",
    "paired_stages",
    "positive",
]


class Need(StrEnum):
    """What a term reads from a training step. The step computes only what some term needs:
    the teacher runs only if a term is on, its input gradient only for ``INPUT_GRAD``, and the
    data module yields sample indices only for ``INDICES``."""

    LOGITS = "logits"  # student and teacher logits (N, K)
    FEATURES = "features"  # stage feature maps of both networks, shallow to deep
    POOLED = "pooled"  # pooled embeddings (N, D) of both networks
    TARGETS = "targets"  # true class indices (N,)
    INPUT_GRAD = "input_grad"  # the teacher's input gradient; the images carry autograd
    INDICES = "indices"  # each image's index in the training set (N,)
    PROGRESS = "progress"  # training progress in [0, 1] and the step number


@dataclass
class Step:
    """What one training step hands every term.

    Attributes:
        student: the student's :class:`~gompertz_kd.models.StageOutput` (with autograd).
        teacher: the teacher's, detached (fp32), or ``None`` when no term is on.
        images: ``(N, 3, H, W)`` the batch as the networks saw it; it requires grad when a term
            needs ``INPUT_GRAD`` (the student's input gradient is built from it).
        targets: ``(N,)`` class indices.
        indices: ``(N,)`` training-set indices, or ``None`` unless a term needs them.
        teacher_input_grad: ``(N, 3, H, W)`` gradient of the teacher's true-class cross-entropy
            w.r.t. the images, or ``None`` unless a term needs it.
        progress: training progress in ``[0, 1]``.
        step: the optimiser step (``None`` outside training).
    """

    student: StageOutput
    teacher: StageOutput | None
    images: Tensor
    targets: Tensor
    indices: Tensor | None = None
    teacher_input_grad: Tensor | None = None
    progress: float = 0.0
    step: int | None = None


@dataclass
class Networks:
    """What a term may know of the networks when it builds its trainable parts.

    Attributes:
        student, teacher: the built networks (the teacher frozen).
        num_classes: classes of the data set.
        num_train_samples: images in the training set (memory banks), ``None`` when unknown.
    """

    student: nn.Module
    teacher: nn.Module
    num_classes: int
    num_train_samples: int | None = None
    _shapes: dict[str, tuple[list[tuple[int, int, int]], int]] = field(
        default_factory=dict, repr=False
    )

    def _probe(self, role: str) -> tuple[list[tuple[int, int, int]], int]:
        if role not in self._shapes:
            self._shapes[role] = stage_output_shapes(getattr(self, role))
        return self._shapes[role]

    def feature_shapes(self, role: str) -> list[tuple[int, int, int]]:
        """``(C, H, W)`` of each stage map of ``"student"`` or ``"teacher"`` for a 32x32 image."""
        return self._probe(role)[0]

    def pooled_dim(self, role: str) -> int:
        """Width ``D`` of the pooled embedding of ``"student"`` or ``"teacher"``."""
        return self._probe(role)[1]


class Term(Recorded, nn.Module):
    """A distillation loss term: declares :attr:`needs`, returns one unweighted scalar.

    Subclasses set ``needs`` and implement :meth:`forward`; those with trainable or stateful parts
    build them in :meth:`bind`, which the module calls once, after building the networks and
    before the optimiser or a checkpoint sees the parameters. A term remembers its constructor
    arguments (:meth:`spec`), which checkpoints record so that they rebuild it; give it plain
    data, schedules or other terms as arguments.
    """

    needs: frozenset[Need] = frozenset({Need.LOGITS})

    def bind(self, networks: Networks) -> None:
        """Build the parts that depend on the networks' shapes (default: nothing)."""

    def forward(self, step: Step) -> Tensor:
        raise NotImplementedError

    def extra_metrics(self) -> dict[str, Tensor]:
        """Values worth logging besides the loss (e.g. a learned temperature), by short name;
        logged as ``train/<term>/<name>``."""
        return {}


def paired_stages(count_s: int, count_t: int, skip_stem: bool = True) -> list[tuple[int, int]]:
    """``(student_stage, teacher_stage)`` pairs, deepest first aligned: with ``skip_stem`` the
    first map (the stem) of each network is left out."""
    first = 1 if skip_stem else 0
    n = min(count_s, count_t) - first
    return [(count_s - n + i, count_t - n + i) for i in range(n)]


class StagePairTerm(Term):
    """A term summed over pairs of stage maps (:func:`paired_stages`, the benchmark's
    ``feat[1:-1]``): subclasses give :meth:`pair_loss` on one ``(student, teacher)`` pair."""

    needs = frozenset({Need.FEATURES})

    def __init__(self) -> None:
        super().__init__()
        self.pairs: list[tuple[int, int]] = []

    def bind(self, networks: Networks) -> None:
        self.pairs = paired_stages(
            len(networks.feature_shapes("student")), len(networks.feature_shapes("teacher"))
        )

    def pair_loss(self, student: Tensor, teacher: Tensor) -> Tensor:
        """The loss on one pair of maps ``(N, C_s, H_s, W_s)``, ``(N, C_t, H_t, W_t)``."""
        raise NotImplementedError

    def forward(self, step: Step) -> Tensor:
        return torch.stack(
            [
                self.pair_loss(step.student.features[s], step.teacher.features[t])
                for s, t in self.pairs
            ]
        ).sum()


class LogitTerm(Term):
    """A term on the two networks' logits, with the logit standardisation of Sun et al., "Logit
    Standardization in Knowledge Distillation" (CVPR 2024) as an option of every such term: each
    row of logits is z-scored before the term sees it, so the student matches the teacher's logit
    relations rather than their range.

    Args:
        standardize: z-score both networks' logits per sample first.
    """

    needs = frozenset({Need.LOGITS})

    def __init__(self, standardize: bool = False) -> None:
        super().__init__()
        self.standardize = bool(standardize)

    def logits(self, step: Step) -> tuple[Tensor, Tensor]:
        """``(student, teacher)`` logits ``(N, K)``, standardised if asked."""
        logits_s, logits_t = step.student.logits, step.teacher.logits
        if self.standardize:
            return standardize_logits(logits_s), standardize_logits(logits_t)
        return logits_s, logits_t


def positive(name: str, value: float) -> float:
    """``value`` as a float, or ``ValueError`` naming ``name`` unless it is > 0."""
    if not value > 0:
        raise ValueError(f"{name} must be > 0, got {name}={value}")
    return float(value)
