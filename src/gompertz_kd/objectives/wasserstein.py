"""The Wasserstein feature term of Gompertz-CNN (Yang & Qin, arXiv 2510.21649).

The paper's abstract names "a Wasserstein-distance loss between teacher and student features"
without a formula. Our choice (README, "Choices where the paper is vague"): the closed-form
2-Wasserstein distance between per-channel Gaussians of the last stage maps (WKD-F style), after
a learnable 1x1 projector of the student to the teacher's width; ``variant="sliced"`` uses the
sliced distance between the batch feature distributions instead (POT).
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import Tensor

from gompertz_kd import losses
from gompertz_kd.objectives.base import Need, Networks, Step, Term

__all__ = ["Wasserstein"]


class Wasserstein(Term):
    """:class:`gompertz_kd.losses.WassersteinFeatureLoss` between chosen stage pairs.

    Args:
        pairs: ``(teacher_stage, student_stage)`` pairs; negative indices count from the deepest.
        variant: ``"gaussian"`` (closed form) or ``"sliced"``.
        reduction: channel reduction of the Gaussian variant, ``"mean"`` or ``"sum"``.
        projections: random directions of the sliced variant.
    """

    needs = frozenset({Need.FEATURES})

    def __init__(
        self,
        pairs: Iterable[Iterable[int]] = ((-1, -1),),
        variant: str = "gaussian",
        reduction: str = "mean",
        projections: int = 64,
    ) -> None:
        super().__init__()
        # checked now, when the config is read, not when the module binds the term
        losses.check_feature_options(variant, reduction)
        self.pairs = [tuple(int(i) for i in p) for p in pairs]
        self.variant = variant
        self.reduction = reduction
        self.projections = int(projections)
        self.loss: losses.WassersteinFeatureLoss | None = None

    def bind(self, networks: Networks) -> None:
        self.loss = losses.WassersteinFeatureLoss(
            student_channels=[c for c, _, _ in networks.feature_shapes("student")],
            teacher_channels=[c for c, _, _ in networks.feature_shapes("teacher")],
            pairs=self.pairs,
            variant=self.variant,
            reduction=self.reduction,
            n_projections=self.projections,
        )

    def forward(self, step: Step) -> Tensor:
        return self.loss(step.student.features, step.teacher.features)
