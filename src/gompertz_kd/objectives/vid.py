"""VID: Ahn et al., "Variational Information Distillation for Knowledge Transfer" (CVPR 2019);
reference HobbitLong/RepDistiller ``distiller_zoo/VID.py``.

Benchmark defaults: every stage map after the stem (RepDistiller ``feat[1:-1]``), one regressor
per stage (three 1x1 convolutions, hidden width the teacher's channel count) with a learned
per-channel variance starting at 5 (``eps`` 1e-5), the per-stage losses summed, weight 1, CE 1.
The larger map of each pair is average-pooled to the smaller one's size first. With different
stage counts the deepest are paired.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from gompertz_kd import losses
from gompertz_kd.objectives.base import Need, Networks, Step, Term, paired_stages

__all__ = ["VID"]


class VID(Term):
    """Negative log-likelihood of each teacher stage map under a Gaussian regressed from the
    student's (:func:`gompertz_kd.losses.vid_loss`, :class:`~gompertz_kd.losses.VIDRegressor`).

    Args:
        init_pred_var: the predicted variance at initialisation.
        eps: floor of the predicted variance.
    """

    needs = frozenset({Need.FEATURES})

    def __init__(self, init_pred_var: float = 5.0, eps: float = 1e-5) -> None:
        super().__init__()
        self.init_pred_var = float(init_pred_var)
        self.eps = float(eps)
        if not self.init_pred_var > self.eps > 0:
            raise ValueError(
                f"need init_pred_var > eps > 0, got init_pred_var={init_pred_var}, eps={eps}"
            )
        self.pairs: list[tuple[int, int]] = []

    def bind(self, networks: Networks) -> None:
        shapes_s, shapes_t = networks.feature_shapes("student"), networks.feature_shapes("teacher")
        self.pairs = paired_stages(len(shapes_s), len(shapes_t))
        self.regressors = nn.ModuleList(
            losses.VIDRegressor(
                shapes_s[s][0], shapes_t[t][0], shapes_t[t][0], self.init_pred_var, self.eps
            )
            for s, t in self.pairs
        )

    def forward(self, step: Step) -> Tensor:
        total = []
        for regressor, (s, t) in zip(self.regressors, self.pairs, strict=True):
            f_s, f_t = losses.match_spatial(step.student.features[s], step.teacher.features[t])
            mean, variance = regressor(f_s)
            total.append(losses.vid_loss(mean, variance, f_t))
        return torch.stack(total).sum()
