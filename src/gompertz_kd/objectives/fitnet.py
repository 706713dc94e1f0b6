"""FitNet: Romero et al., "FitNets: Hints for Thin Deep Nets" (ICLR 2015); reference
HobbitLong/RepDistiller ``distiller_zoo/FitNet.py`` and ``models/util.py`` (ConvReg).

Benchmark defaults: the hint at the middle stage (RepDistiller's ``hint_layer=2``: stage map 2
of both networks), weight 100, CE 1. The reference trains the regressor in a separate first stage
in its original paper; the benchmark trains it jointly, as here.
"""

from __future__ import annotations

from torch import Tensor

from gompertz_kd import losses
from gompertz_kd.objectives.base import Need, Networks, Step, Term

__all__ = ["FitNet"]


class FitNet(Term):
    """MSE between a regressed student stage map and the teacher's (:func:`fitnet_loss`).

    Args:
        hint_stage: teacher stage whose map is the hint (index into ``features``; negative counts
            from the deepest). Default 2, the benchmark's middle stage.
        guided_stage: student stage regressed onto it (default: ``hint_stage``).
    """

    needs = frozenset({Need.FEATURES})

    def __init__(self, hint_stage: int = 2, guided_stage: int | None = None) -> None:
        super().__init__()
        self.hint_stage = int(hint_stage)
        self.guided_stage = self.hint_stage if guided_stage is None else int(guided_stage)
        self.regressor: losses.HintRegressor | None = None

    def bind(self, networks: Networks) -> None:
        shapes_s, shapes_t = networks.feature_shapes("student"), networks.feature_shapes("teacher")
        for role, index, shapes in (
            ("hint_stage", self.hint_stage, shapes_t),
            ("guided_stage", self.guided_stage, shapes_s),
        ):
            if not -len(shapes) <= index < len(shapes):
                raise ValueError(
                    f"FitNet {role}={index} is out of range: that network has {len(shapes)} stages"
                )
        self.regressor = losses.HintRegressor(
            shapes_s[self.guided_stage], shapes_t[self.hint_stage]
        )

    def forward(self, step: Step) -> Tensor:
        regressed = self.regressor(step.student.features[self.guided_stage])
        return losses.fitnet_loss(regressed, step.teacher.features[self.hint_stage])
