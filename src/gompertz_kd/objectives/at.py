"""AT: Zagoruyko & Komodakis, "Paying More Attention to Attention" (ICLR 2017); reference
HobbitLong/RepDistiller ``distiller_zoo/AT.py``.

Benchmark defaults: p 2, weight 1000, CE 1, every stage map after the stem (RepDistiller's
``feat[1:-1]``); the per-stage losses are summed. When the two networks have different stage
counts, the deepest ones are paired.
"""

from __future__ import annotations

from torch import Tensor

from gompertz_kd import losses
from gompertz_kd.objectives.base import StagePairTerm, paired_stages

__all__ = ["AT", "paired_stages"]


class AT(StagePairTerm):
    """Sum over stage pairs of :func:`gompertz_kd.losses.at_loss`.

    Args:
        p: power of the activations in the attention map.
    """

    def __init__(self, p: float = 2.0) -> None:
        super().__init__()
        self.p = p

    def pair_loss(self, student: Tensor, teacher: Tensor) -> Tensor:
        return losses.at_loss(student, teacher, self.p)
