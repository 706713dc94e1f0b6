"""PKT: Passalis & Tefas, "Learning Deep Representations with Probabilistic Knowledge Transfer"
(ECCV 2018); reference HobbitLong/RepDistiller ``distiller_zoo/PKT.py``.

Benchmark defaults: the pooled embeddings (RepDistiller ``feat[-1]``), weight 30000, CE 1.
"""

from __future__ import annotations

from torch import Tensor

from gompertz_kd import losses
from gompertz_kd.objectives.base import Need, Step, Term, positive

__all__ = ["PKT"]


class PKT(Term):
    """KL divergence between the batch's cosine-similarity distributions of the pooled
    embeddings (:func:`gompertz_kd.losses.pkt_loss`).

    Args:
        eps: the reference's stabiliser.
    """

    needs = frozenset({Need.POOLED})

    def __init__(self, eps: float = 1e-7) -> None:
        super().__init__()
        self.eps = positive("eps", eps)

    def forward(self, step: Step) -> Tensor:
        return losses.pkt_loss(step.student.pooled, step.teacher.pooled, self.eps)
