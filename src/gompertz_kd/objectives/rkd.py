"""RKD: Park et al., "Relational Knowledge Distillation" (CVPR 2019); reference
HobbitLong/RepDistiller ``distiller_zoo/RKD.py``.

Benchmark defaults: distance weight 25, angle weight 50 (inside the loss), term weight 1, CE 1,
on the pooled embeddings.
"""

from __future__ import annotations

from torch import Tensor

from gompertz_kd import losses
from gompertz_kd.objectives.base import Need, Step, Term

__all__ = ["RKD"]


class RKD(Term):
    """Distance- and angle-wise relations of the pooled embeddings
    (:func:`gompertz_kd.losses.rkd_loss`)."""

    needs = frozenset({Need.POOLED})

    def __init__(self, distance_weight: float = 25.0, angle_weight: float = 50.0) -> None:
        super().__init__()
        self.distance_weight = float(distance_weight)
        self.angle_weight = float(angle_weight)

    def forward(self, step: Step) -> Tensor:
        return losses.rkd_loss(
            step.student.pooled, step.teacher.pooled, self.distance_weight, self.angle_weight
        )
