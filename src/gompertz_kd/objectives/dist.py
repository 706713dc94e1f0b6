"""DIST: Huang et al., "Knowledge Distillation from A Stronger Teacher" (NeurIPS 2022);
reference hunto/DIST_KD ``losses/dist_kd.py``.

Benchmark defaults: beta 2 (inter-class relation), gamma 2 (intra-class relation), tau 4, CE 1.
"""

from __future__ import annotations

from torch import Tensor

from gompertz_kd import losses
from gompertz_kd.objectives.base import LogitTerm, Step, positive

__all__ = ["DIST"]


class DIST(LogitTerm):
    """``tau^2 * (beta * inter + gamma * intra)`` on Pearson correlations of the softened
    probabilities (:func:`gompertz_kd.losses.dist_loss`).

    Args:
        beta: weight of the inter-class relation (per sample, across classes).
        gamma: weight of the intra-class relation (per class, across the batch).
        temperature: ``tau > 0``.
        standardize: z-score both logits per sample first (Sun et al., CVPR 2024).
    """

    def __init__(
        self,
        beta: float = 2.0,
        gamma: float = 2.0,
        temperature: float = 4.0,
        standardize: bool = False,
    ) -> None:
        super().__init__(standardize)
        self.beta, self.gamma = float(beta), float(gamma)
        self.temperature = positive("temperature", temperature)

    def forward(self, step: Step) -> Tensor:
        return losses.dist_loss(*self.logits(step), self.beta, self.gamma, self.temperature)
