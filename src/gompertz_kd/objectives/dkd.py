"""DKD: Zhao et al., "Decoupled Knowledge Distillation" (CVPR 2022); reference
megvii-research/mdistiller ``mdistiller/distillers/DKD.py``.

Benchmark defaults: alpha 1 (target-class KD), beta 8 (non-target-class KD), T 4, CE weight 1.
The reference's linear warm-up of the loss over the first 20 of 240 epochs is not in the loss:
``conf/method/dkd.yaml`` gives the term the schedule ``linear(t0=0.0833)`` (20/240 of training).
"""

from __future__ import annotations

from torch import Tensor

from gompertz_kd import losses
from gompertz_kd.objectives.base import LogitTerm, Need, Step, positive

__all__ = ["DKD"]


class DKD(LogitTerm):
    """``alpha * TCKD + beta * NCKD`` (:func:`gompertz_kd.losses.dkd_loss`).

    Args:
        alpha: weight of the binary target/non-target KL (TCKD).
        beta: weight of the KL among the non-target classes (NCKD).
        temperature: ``T > 0``.
        standardize: z-score both logits per sample first (Sun et al., CVPR 2024).
    """

    needs = frozenset({Need.LOGITS, Need.TARGETS})

    def __init__(
        self,
        alpha: float = 1.0,
        beta: float = 8.0,
        temperature: float = 4.0,
        standardize: bool = False,
    ) -> None:
        super().__init__(standardize)
        self.alpha, self.beta = float(alpha), float(beta)
        self.temperature = positive("temperature", temperature)

    def forward(self, step: Step) -> Tensor:
        logits_s, logits_t = self.logits(step)
        return losses.dkd_loss(
            logits_s, logits_t, step.targets, self.alpha, self.beta, self.temperature
        )
