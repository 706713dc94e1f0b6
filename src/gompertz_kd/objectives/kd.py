"""KD: Hinton et al., "Distilling the Knowledge in a Neural Network" (2015).

Benchmark defaults (CRD / mdistiller CIFAR-100 tables): temperature 4, ``0.1 * CE + 0.9 * KD``
(``conf/method/kd.yaml``). ``standardize=True`` is the logit standardisation of Sun et al.,
"Logit Standardization in Knowledge Distillation" (CVPR 2024; reference
sunshangquan/logit-standardization-KD): z-scored logits, ``T^2`` kept.
"""

from __future__ import annotations

from torch import Tensor

from gompertz_kd import losses
from gompertz_kd.objectives.base import LogitTerm, Step, positive

__all__ = ["KD"]


class KD(LogitTerm):
    """``T^2 * KL(softmax(z_t / T) || softmax(z_s / T))`` (:func:`gompertz_kd.losses.kd_loss`).

    Args:
        temperature: ``T > 0``.
        standardize: z-score both logits per sample first (Sun et al., CVPR 2024).
    """

    def __init__(self, temperature: float = 4.0, standardize: bool = False) -> None:
        super().__init__(standardize)
        self.temperature = positive("temperature", temperature)

    def forward(self, step: Step) -> Tensor:
        return losses.kd_loss(*self.logits(step), self.temperature)
