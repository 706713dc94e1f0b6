"""ReviewKD: Chen et al., "Distilling Knowledge via Knowledge Review" (CVPR 2021); reference
megvii-research/mdistiller ``mdistiller/distillers/ReviewKD.py``.

Benchmark defaults: attention-based fusion (ABF) of the student's stage maps, deep to shallow,
each fused map matched to the teacher's map of the same level by the hierarchical context loss
(pyramid levels 4, 2, 1); weight 1, CE 1, linear warm-up over the first 20 of 240 epochs (the
term's schedule in ``conf/method/reviewkd.yaml``). Levels: every stage map after the stem plus the
pooled embedding as a 1x1 map, as the reference takes them; with different stage counts the
deepest are paired.
"""

from __future__ import annotations

from torch import Tensor

from gompertz_kd import losses
from gompertz_kd.objectives.base import Need, Networks, Step, Term, paired_stages

__all__ = ["ReviewKD"]


class ReviewKD(Term):
    """Hierarchical context loss between ABF-fused student maps and the teacher's maps.

    Args:
        mid_channel: width of the fusion's hidden maps; ``None`` takes the reference's
            ``min(512, width of the student's deepest level)``.
    """

    needs = frozenset({Need.FEATURES, Need.POOLED})

    def __init__(self, mid_channel: int | None = None) -> None:
        super().__init__()
        self.mid_channel = mid_channel
        self.pairs: list[tuple[int, int]] = []

    @staticmethod
    def _levels(features: list, pooled: Tensor) -> list:
        return [*features, pooled[:, :, None, None]]

    def bind(self, networks: Networks) -> None:
        shapes_s = [*networks.feature_shapes("student"), (networks.pooled_dim("student"), 1, 1)]
        shapes_t = [*networks.feature_shapes("teacher"), (networks.pooled_dim("teacher"), 1, 1)]
        self.pairs = paired_stages(len(shapes_s), len(shapes_t))
        self.fusion = losses.ReviewFusion(
            student_channels=[shapes_s[s][0] for s, _ in self.pairs],
            teacher_channels=[shapes_t[t][0] for _, t in self.pairs],
            mid_channel=self.mid_channel or min(512, shapes_s[self.pairs[-1][0]][0]),
            spatial_sizes=[shapes_t[t][1] for _, t in self.pairs],
        )

    def forward(self, step: Step) -> Tensor:
        levels_s = self._levels(step.student.features, step.student.pooled)
        levels_t = self._levels(step.teacher.features, step.teacher.pooled)
        fused = self.fusion([levels_s[s] for s, _ in self.pairs])
        return losses.hcl_loss(fused, [levels_t[t] for _, t in self.pairs])
