"""NST: Huang & Wang, "Like What You Like: Knowledge Distill via Neuron Selectivity Transfer"
(arXiv 1707.01219, 2017); reference HobbitLong/RepDistiller ``distiller_zoo/NST.py``.

Benchmark defaults: every stage map after the stem (RepDistiller ``feat[1:-1]``), the per-stage
losses summed, weight 50, CE 1. With different stage counts the deepest are paired.
"""

from __future__ import annotations

from torch import Tensor

from gompertz_kd import losses
from gompertz_kd.objectives.base import StagePairTerm

__all__ = ["NST"]


class NST(StagePairTerm):
    """Sum over stage pairs of :func:`gompertz_kd.losses.nst_loss` (squared MMD, polynomial
    kernel of degree 2)."""

    def pair_loss(self, student: Tensor, teacher: Tensor) -> Tensor:
        return losses.nst_loss(student, teacher)
