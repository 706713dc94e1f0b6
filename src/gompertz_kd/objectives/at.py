"""AT: Zagoruyko & Komodakis, "Paying More Attention to Attention" (ICLR 2017); reference
HobbitLong/RepDistiller ``distiller_zoo/AT.py``.

Benchmark defaults: p 2, weight 1000, CE 1, every stage map after the stem (RepDistiller's
``feat[1:-1]``); the per-stage losses are summed. When the two networks have different stage
counts, the deepest ones are paired.
"""

from __future__ import annotations

import torch
from torch import Tensor

from gompertz_kd import losses
from gompertz_kd.objectives.base import Need, Networks, Step, Term

__all__ = ["AT", "paired_stages"]


def paired_stages(count_s: int, count_t: int, skip_stem: bool = True) -> list[tuple[int, int]]:
    """``(student_stage, teacher_stage)`` pairs, deepest first aligned: with ``skip_stem`` the
    first map (the stem) of each network is left out."""
    first = 1 if skip_stem else 0
    n = min(count_s, count_t) - first
    return [(count_s - n + i, count_t - n + i) for i in range(n)]


class AT(Term):
    """Sum over stage pairs of :func:`gompertz_kd.losses.at_loss`.

    Args:
        p: power of the activations in the attention map.
    """

    needs = frozenset({Need.FEATURES})

    def __init__(self, p: float = 2.0) -> None:
        super().__init__()
        self.p = p
        self.pairs: list[tuple[int, int]] = []

    def bind(self, networks: Networks) -> None:
        self.pairs = paired_stages(
            len(networks.feature_shapes("student")), len(networks.feature_shapes("teacher"))
        )

    def forward(self, step: Step) -> Tensor:
        return torch.stack(
            [
                losses.at_loss(step.student.features[s], step.teacher.features[t], self.p)
                for s, t in self.pairs
            ]
        ).sum()
