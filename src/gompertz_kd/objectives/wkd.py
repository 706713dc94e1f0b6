"""WKD-L: Lv et al., "Wasserstein Distance Rivals Kullback-Leibler Divergence for Knowledge
Distillation" (NeurIPS 2024); reference JiamingLv/WKD ``mdistiller/distillers/WKD.py``.

The logit variant, split as the reference splits it (``wkd_logit_loss_with_speration``), into two
terms so that each has its own weight and schedule:

- ``wkdl`` (:class:`WKDL`): the discrete (entropic) Wasserstein distance between each image's
  teacher and student distributions over the *non-target* classes, with a ground cost between
  classes from the similarity of the teacher classifier's class embeddings (its weight rows),
  solved by Sinkhorn (POT). Reference CIFAR-100 values: T 8, weight 800, Sinkhorn eps 0.05 with
  10 iterations, sharpening 1, the weight cosine-decayed to 0 over the last 90 of 240 epochs
  (``conf/method/wkdl.yaml``: schedule ``cosine(start=0.625)``).
- ``wkdt`` (:class:`WKDTarget`): the target-class term ``-p_t[y] log p_s[y]``, weight 1.

Choices: the cost is computed once from the teacher's classifier when the module is built (after
its weights are loaded) and kept as a buffer; the reference's CIFAR config loads a precomputed
CKA similarity of class features instead, which we do not ship.
"""

from __future__ import annotations

import torch
from torch import Tensor

from gompertz_kd import losses
from gompertz_kd.objectives.base import LogitTerm, Need, Networks, Step, Term, positive

__all__ = ["WKDL", "WKDTarget"]


class WKDL(LogitTerm):
    """Sinkhorn distance between softened class distributions
    (:func:`gompertz_kd.losses.wkd_logit_loss`), the target class left out unless
    ``exclude_target=False``.

    Args:
        temperature: softening temperature of both distributions.
        reg: entropic regularisation of Sinkhorn.
        iterations: Sinkhorn iterations.
        sharpen: ``kappa`` of the cost ``1 - exp(-kappa * (1 - cos))`` (0: plain cosine distance).
        exclude_target: compare the non-target classes only, as the reference does.
        standardize: z-score both logits per sample first (Sun et al., CVPR 2024).
    """

    needs = frozenset({Need.LOGITS, Need.TARGETS})

    def __init__(
        self,
        temperature: float = 8.0,
        reg: float = 0.05,
        iterations: int = 10,
        sharpen: float = 1.0,
        exclude_target: bool = True,
        standardize: bool = False,
    ) -> None:
        super().__init__(standardize)
        self.temperature = positive("temperature", temperature)
        self.reg = positive("reg", reg)
        self.iterations = int(positive("iterations", iterations))
        self.sharpen = float(sharpen)
        self.exclude_target = bool(exclude_target)

    def bind(self, networks: Networks) -> None:
        weight = networks.teacher.get_classifier().weight.detach()
        cost = losses.wkd_cost_matrix(weight, self.sharpen).to(torch.float32)
        self.register_buffer("cost", cost)

    def forward(self, step: Step) -> Tensor:
        logits_s, logits_t = self.logits(step)
        return losses.wkd_logit_loss(
            logits_s,
            logits_t,
            self.cost,
            self.temperature,
            self.reg,
            self.iterations,
            targets=step.targets if self.exclude_target else None,
        )


class WKDTarget(Term):
    """WKD-L's target-class term (:func:`gompertz_kd.losses.wkd_target_loss`)."""

    needs = frozenset({Need.LOGITS, Need.TARGETS})

    def forward(self, step: Step) -> Tensor:
        return losses.wkd_target_loss(step.student.logits, step.teacher.logits, step.targets)
