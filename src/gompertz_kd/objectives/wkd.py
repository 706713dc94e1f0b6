"""WKD-L: Lv et al., "Wasserstein Distance Rivals Kullback-Leibler Divergence for Knowledge
Distillation" (NeurIPS 2024); reference JiamingLv/WKD.

The logit variant: the discrete (entropic) Wasserstein distance between each image's teacher and
student class distributions, with a ground cost between classes from the similarity of the
teacher classifier's class embeddings (its weight rows), solved by Sinkhorn (POT). The cost is
computed once, from the teacher's weights, when the module is built, and kept as a buffer.
"""

from __future__ import annotations

import torch
from torch import Tensor

from gompertz_kd import losses
from gompertz_kd.objectives.base import Need, Networks, Step, Term

__all__ = ["WKDL"]


class WKDL(Term):
    """Sinkhorn distance between softened class distributions
    (:func:`gompertz_kd.losses.wkd_logit_loss`).

    Args:
        temperature: softening temperature of both distributions.
        reg: entropic regularisation of Sinkhorn.
        iterations: Sinkhorn iterations.
        standardize: z-score both logits per sample first (Sun et al., CVPR 2024).
    """

    needs = frozenset({Need.LOGITS})

    def __init__(
        self,
        temperature: float = 2.0,
        reg: float = 0.05,
        iterations: int = 10,
        standardize: bool = False,
    ) -> None:
        super().__init__()
        self.temperature, self.reg, self.iterations = float(temperature), float(reg), int(iterations)
        self.standardize = bool(standardize)

    def bind(self, networks: Networks) -> None:
        weight = networks.teacher.get_classifier().weight.detach()
        self.register_buffer("cost", losses.wkd_cost_matrix(weight).to(torch.float32))

    def forward(self, step: Step) -> Tensor:
        logits_s, logits_t = step.student.logits, step.teacher.logits
        if self.standardize:
            logits_s, logits_t = losses.standardize_logits(logits_s), losses.standardize_logits(logits_t)
        return losses.wkd_logit_loss(
            logits_s, logits_t, self.cost, self.temperature, self.reg, self.iterations
        )
