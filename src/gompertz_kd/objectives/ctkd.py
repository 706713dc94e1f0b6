"""CTKD: Li et al., "Curriculum Temperature for Knowledge Distillation" (AAAI 2023); reference
zhengli97/CTKD.

KD whose temperature is learned adversarially: a global temperature parameter receives the KD
loss's gradient through a gradient-reversal layer, so the student minimises the loss while the
temperature maximises it; the reversal strength lambda rises over training (the curriculum). Here
lambda is a schedule of progress (``lambda_schedule``), like any weight in gompertz_kd.
"""

from __future__ import annotations

from torch import Tensor

from gompertz_kd import losses
from gompertz_kd.objectives.base import LogitTerm, Need, Networks, Step
from gompertz_kd.schedules import make_schedule

__all__ = ["CTKD"]


class CTKD(LogitTerm):
    """KD at a learnable temperature trained through gradient reversal.

    Args:
        lambda_schedule: the reversal strength over progress (a schedule spec).
        t_start, t_range: the temperature is ``t_start + t_range * sigmoid(raw)`` (reference:
            1 and 20).
        init: initial value of the raw parameter (reference: 1, i.e. T = 15.6 at the start).
        standardize: z-score both logits per sample first (Sun et al., CVPR 2024).
    """

    needs = frozenset({Need.LOGITS, Need.PROGRESS})

    def __init__(
        self,
        lambda_schedule: object = "cosine",
        t_start: float = 1.0,
        t_range: float = 20.0,
        init: float = 1.0,
        standardize: bool = False,
    ) -> None:
        super().__init__(standardize)
        self.lambda_schedule = make_schedule(lambda_schedule, "lambda_schedule")
        self.t_start, self.t_range, self.init = float(t_start), float(t_range), float(init)
        self._last_temperature: Tensor | None = None

    def bind(self, networks: Networks) -> None:
        self.temperature = losses.LearnableTemperature(self.init, self.t_start, self.t_range)

    def forward(self, step: Step) -> Tensor:
        logits_s, logits_t = self.logits(step)
        temperature = self.temperature(self.lambda_schedule(step.progress))
        self._last_temperature = temperature.detach()
        return losses.kd_loss(logits_s, logits_t, temperature)

    def extra_metrics(self) -> dict[str, Tensor]:
        return {} if self._last_temperature is None else {"temperature": self._last_temperature}
