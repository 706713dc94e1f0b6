"""Gradient (Jacobian) matching: aligning the student's input gradients with the teacher's."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["gradient_matching_loss", "true_class_input_gradient"]


def true_class_input_gradient(
    logits: Tensor, inputs: Tensor, targets: Tensor, create_graph: bool
) -> Tensor:
    """Gradient of each image's cross-entropy on its true class with respect to that image.

    The per-image losses are summed before differentiating, so row ``i`` of the result is
    ``d CE(logits_i, y_i) / d x_i`` (exactly so when the network treats images independently, as
    in eval mode; a network in train mode couples images through BatchNorm's batch statistics).

    Args:
        logits: ``(N, K)``, computed from ``inputs`` with autograd on.
        inputs: ``(N, 3, H, W)`` with ``requires_grad=True``.
        targets: ``(N,)`` class indices.
        create_graph: ``True`` on the student side, so a loss on the gradient can be
            back-propagated (double backward); ``False`` on the teacher side.

    Returns:
        ``(N, 3, H, W)``.
    """
    loss = F.cross_entropy(logits, targets, reduction="sum")
    (grad,) = torch.autograd.grad(loss, inputs, create_graph=create_graph)
    return grad


def gradient_matching_loss(student_input_grad: Tensor, teacher_input_grad: Tensor) -> Tensor:
    """Jacobian matching (Srinivas & Fleuret, 2018): ``1 - cos(g_s, g_t)``, averaged over images.

    ``g_s`` and ``g_t`` are the student's and teacher's input gradients of the true-class
    cross-entropy (:func:`true_class_input_gradient`). Each is L2-normalised per image, so only
    the direction of the gradient is matched, not its scale (which differs between networks).

    Args:
        student_input_grad: ``(N, ...)``, differentiable (built with ``create_graph=True``).
        teacher_input_grad: ``(N, ...)``, treated as a constant.

    Returns:
        Scalar tensor in ``[0, 2]``; zero when every pair of gradients points the same way.
    """
    g_s = student_input_grad.flatten(1)
    g_t = teacher_input_grad.detach().flatten(1)
    cosine = F.cosine_similarity(g_s, g_t, dim=1, eps=1e-12)
    return (1.0 - cosine).mean()
