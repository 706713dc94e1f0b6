"""KDSVD: Lee et al., "Self-supervised Knowledge Distillation Using Singular Value
Decomposition" (ECCV 2018); reference HobbitLong/RepDistiller ``distiller_zoo/KDSVD.py``.

Benchmark defaults: ``k = 1`` singular vector of the teacher (``k + 3`` of the student, aligned
to it), every stage map after the stem (RepDistiller ``feat[1:-1]``), weight 1, CE 1. The
singular vectors live in channel space, so each paired student stage needs its teacher stage's
channel count: the benchmark runs KDSVD on pairs of one family (resnet32x4 -> resnet8x4,
resnet56 -> resnet20, resnet20 -> resnet8); another pair is refused when the term is bound.
"""

from __future__ import annotations

from torch import Tensor

from gompertz_kd import losses
from gompertz_kd.objectives.base import Need, Networks, Step, Term, paired_stages, positive

__all__ = ["KDSVD"]


class KDSVD(Term):
    """Radial-basis correlations of consecutive stages' singular vectors
    (:func:`gompertz_kd.losses.kdsvd_loss`).

    Args:
        k: singular vectors of the teacher per stage.
    """

    needs = frozenset({Need.FEATURES})

    def __init__(self, k: int = 1) -> None:
        super().__init__()
        self.k = int(positive("k", k))
        self.pairs: list[tuple[int, int]] = []

    def bind(self, networks: Networks) -> None:
        shapes_s, shapes_t = networks.feature_shapes("student"), networks.feature_shapes("teacher")
        self.pairs = paired_stages(len(shapes_s), len(shapes_t))
        widths = [(shapes_s[s][0], shapes_t[t][0]) for s, t in self.pairs]
        if any(c_s != c_t for c_s, c_t in widths) or len(self.pairs) < 2:
            raise ValueError(
                "KDSVD compares singular vectors over channels, so it needs at least two stage "
                "pairs of equal width (student, teacher), got "
                f"{widths}: use it on networks of one family, e.g. resnet20 -> resnet8"
            )
        for s, t in self.pairs:
            _, h, w = shapes_s[s]
            if (
                min(h * w, shapes_s[s][0]) < self.k + 3
                or min(shapes_t[t][1] * shapes_t[t][2], shapes_t[t][0]) < self.k
            ):
                raise ValueError(
                    f"KDSVD k={self.k}: stage maps too small for k + 3 singular vectors"
                )

    def forward(self, step: Step) -> Tensor:
        return losses.kdsvd_loss(
            [step.student.features[s] for s, _ in self.pairs],
            [step.teacher.features[t] for _, t in self.pairs],
            self.k,
        )
