"""Gradient matching of Gompertz-CNN (Yang & Qin, arXiv 2510.21649): "aligning the student's
backward behaviour with the teacher's".

Our choice where the abstract is vague: Jacobian matching (Srinivas & Fleuret, ICML 2018) on the
input gradient of each image's true-class cross-entropy, ``1 - cos(g_s, g_t)``. It needs the
teacher's input gradient (one extra backward of the teacher to the image) and a double backward
through the student, so it is the most expensive term; ``model.gm_every=k`` computes it on every
k-th step with its weight times k.
"""

from __future__ import annotations

from torch import Tensor

from gompertz_kd import losses
from gompertz_kd.objectives.base import Need, Step, Term

__all__ = ["GradientMatching"]


class GradientMatching(Term):
    """``1 - cos(dCE_s/dx, dCE_t/dx)`` averaged over images
    (:func:`gompertz_kd.losses.gradient_matching_loss`)."""

    needs = frozenset({Need.LOGITS, Need.TARGETS, Need.INPUT_GRAD})

    def forward(self, step: Step) -> Tensor:
        student_grad = losses.true_class_input_gradient(
            step.student.logits, step.images, step.targets, create_graph=True
        )
        return losses.gradient_matching_loss(student_grad, step.teacher_input_grad)
