"""SP: Tung & Mori, "Similarity-Preserving Knowledge Distillation" (ICCV 2019); reference
HobbitLong/RepDistiller ``distiller_zoo/SP.py``.

Benchmark defaults: the last stage's map of each network (RepDistiller ``feat[-2]``, the map
before pooling), weight 3000, CE 1.
"""

from __future__ import annotations

from torch import Tensor

from gompertz_kd import losses
from gompertz_kd.objectives.base import Need, Step, Term

__all__ = ["SP"]


class SP(Term):
    """Batch similarity matrices of one stage pair (:func:`gompertz_kd.losses.sp_loss`).

    Args:
        student_stage, teacher_stage: the maps compared (index into ``features``; negative
            counts from the deepest). Default: the last stage of each.
    """

    needs = frozenset({Need.FEATURES})

    def __init__(self, student_stage: int = -1, teacher_stage: int = -1) -> None:
        super().__init__()
        self.student_stage = int(student_stage)
        self.teacher_stage = int(teacher_stage)

    def forward(self, step: Step) -> Tensor:
        return losses.sp_loss(
            step.student.features[self.student_stage], step.teacher.features[self.teacher_stage]
        )
