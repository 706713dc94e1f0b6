"""NST: Huang & Wang, "Like What You Like: Knowledge Distill via Neuron Selectivity Transfer"
(arXiv 1707.01219, 2017); reference HobbitLong/RepDistiller ``distiller_zoo/NST.py``.

Benchmark defaults: every stage map after the stem (RepDistiller ``feat[1:-1]``), the per-stage
losses summed, weight 50, CE 1. With different stage counts the deepest are paired.
"""

from __future__ import annotations

import torch
from torch import Tensor

from gompertz_kd import losses
from gompertz_kd.objectives.at import paired_stages
from gompertz_kd.objectives.base import Need, Networks, Step, Term

__all__ = ["NST"]


class NST(Term):
    """Sum over stage pairs of :func:`gompertz_kd.losses.nst_loss` (squared MMD, polynomial
    kernel of degree 2)."""

    needs = frozenset({Need.FEATURES})

    def __init__(self) -> None:
        super().__init__()
        self.pairs: list[tuple[int, int]] = []

    def bind(self, networks: Networks) -> None:
        self.pairs = paired_stages(
            len(networks.feature_shapes("student")), len(networks.feature_shapes("teacher"))
        )

    def forward(self, step: Step) -> Tensor:
        return torch.stack(
            [
                losses.nst_loss(step.student.features[s], step.teacher.features[t])
                for s, t in self.pairs
            ]
        ).sum()
