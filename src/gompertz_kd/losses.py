"""The distillation loss terms of Gompertz-CNN, as pure functions of tensors.

The objective the :class:`~gompertz_kd.module.DistillationModule` optimises is

    total = ce_weight * loss_ce + kd_weight(t) * loss_kd + wd_weight(t) * loss_wd
            + gm_weight(t) * loss_gm

where each weight comes from its own schedule (:mod:`gompertz_kd.schedules`). The functions here
know nothing of weights, epochs or schedules: they map tensors to a scalar loss.

- :func:`kd_loss` — Hinton's knowledge distillation on temperature-softened logits.
- :func:`gaussian_wasserstein_loss` / :func:`sliced_wasserstein_loss` and the
  :class:`WassersteinFeatureLoss` module that owns the student-side projectors — the Wasserstein
  distance between teacher and student features.
- :func:`true_class_input_gradient` and :func:`gradient_matching_loss` — gradient (Jacobian)
  matching, aligning the student's input gradients with the teacher's.
"""

from __future__ import annotations

from collections.abc import Sequence

import ot
import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "FeatureProjector",
    "WassersteinFeatureLoss",
    "channel_gaussian_stats",
    "gaussian_wasserstein_loss",
    "gradient_matching_loss",
    "kd_loss",
    "match_spatial",
    "sliced_wasserstein_loss",
    "true_class_input_gradient",
]

_STD_EPS = 1e-6  # keeps sqrt differentiable where a channel is constant over space


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """Hinton KD: ``T^2 * KL(softmax(z_t / T) || softmax(z_s / T))``, averaged over the batch.

    Args:
        student_logits: ``(N, K)``.
        teacher_logits: ``(N, K)``; treated as a constant target (detach it if it carries grad).
        temperature: ``T > 0``. The ``T^2`` factor keeps gradient magnitudes comparable across
            temperatures (Hinton et al., 2015).

    Returns:
        Scalar tensor, ``>= 0``, zero iff the two softened distributions agree on every row.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got temperature={temperature!r}")
    log_p_s = F.log_softmax(student_logits / temperature, dim=1)
    log_p_t = F.log_softmax(teacher_logits / temperature, dim=1)
    kl = F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True)
    return kl * temperature**2


def channel_gaussian_stats(features: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and standard deviation of each channel over spatial positions.

    Args:
        features: ``(N, C, H, W)``.

    Returns:
        ``(mu, sigma)``, each ``(N, C)``; ``sigma`` is the population standard deviation.
    """
    flat = features.flatten(2)
    mu = flat.mean(dim=2)
    # Two passes by hand: torch.var over a short last dimension is ~100x slower on CPUs
    # (16 ms against 0.2 ms for a (32, 2048, 16) map, docs/benchmarks.md), same value.
    var = (flat - mu.unsqueeze(2)).square().mean(dim=2)
    return mu, torch.sqrt(var + _STD_EPS)


def gaussian_wasserstein_loss(
    student_features: Tensor, teacher_features: Tensor, reduction: str = "mean"
) -> Tensor:
    """Squared 2-Wasserstein distance between per-channel Gaussians (WKD-F style).

    Each channel of each image is summarised by a 1-D Gaussian ``N(mu, sigma^2)`` over its
    spatial positions; for Gaussians with diagonal covariance the squared 2-Wasserstein distance
    has the closed form ``||mu_s - mu_t||^2 + ||sigma_s - sigma_t||^2``.

    Args:
        student_features: ``(N, C, H, W)``, already projected to the teacher's channel count.
        teacher_features: ``(N, C, H', W')``; the spatial sizes may differ (statistics are per
            channel), the channel counts may not.
        reduction: ``"mean"`` divides by ``C`` (a width-independent scale, so one weight fits
            every teacher); ``"sum"`` is the plain closed form summed over channels. Either way
            the result is averaged over the batch.

    Returns:
        Scalar tensor, ``>= 0``.
    """
    if student_features.shape[:2] != teacher_features.shape[:2]:
        raise ValueError(
            "student and teacher features must agree in batch and channels, got "
            f"{tuple(student_features.shape)} and {tuple(teacher_features.shape)}"
        )
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got reduction={reduction!r}")
    mu_s, sigma_s = channel_gaussian_stats(student_features)
    mu_t, sigma_t = channel_gaussian_stats(teacher_features)
    per_channel = (mu_s - mu_t).square() + (sigma_s - sigma_t).square()  # (N, C)
    per_image = per_channel.mean(dim=1) if reduction == "mean" else per_channel.sum(dim=1)
    return per_image.mean()


def sliced_wasserstein_loss(
    student_features: Tensor,
    teacher_features: Tensor,
    n_projections: int = 64,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Squared sliced 2-Wasserstein distance between the batch feature distributions.

    Every spatial position of every image is one sample in ``R^C``; the student's and teacher's
    batches are two empirical distributions of ``N*H*W`` points, compared along ``n_projections``
    random directions (POT's ``sliced_wasserstein_distance``). Unlike the Gaussian form this
    sees correlations between channels, at the cost of a stochastic estimate.

    Args:
        student_features: ``(N, C, H, W)``.
        teacher_features: ``(N, C, H, W)``, same shape (use :func:`match_spatial` first).
        n_projections: number of random directions.
        generator: source of the directions; ``None`` uses torch's global RNG (seeded runs
            stay reproducible).

    Returns:
        Scalar tensor, ``>= 0``.
    """
    if student_features.shape != teacher_features.shape:
        raise ValueError(
            "student and teacher features must have the same shape, got "
            f"{tuple(student_features.shape)} and {tuple(teacher_features.shape)}"
        )
    channels = student_features.shape[1]
    samples_s = student_features.permute(0, 2, 3, 1).reshape(-1, channels)
    samples_t = teacher_features.permute(0, 2, 3, 1).reshape(-1, channels)
    directions = torch.randn(
        channels,
        n_projections,
        generator=generator,
        device=student_features.device,
        dtype=student_features.dtype,
    )
    directions = directions / directions.norm(dim=0, keepdim=True)
    distance = ot.sliced_wasserstein_distance(samples_s, samples_t, projections=directions, p=2)
    return distance.square()


def match_spatial(student_features: Tensor, teacher_features: Tensor) -> tuple[Tensor, Tensor]:
    """Average-pool whichever map is larger so both have the smaller one's ``(H, W)``."""
    size_s, size_t = student_features.shape[-2:], teacher_features.shape[-2:]
    if size_s == size_t:
        return student_features, teacher_features
    target = (min(size_s[0], size_t[0]), min(size_s[1], size_t[1]))
    if size_s != target:
        student_features = F.adaptive_avg_pool2d(student_features, target)
    if size_t != target:
        teacher_features = F.adaptive_avg_pool2d(teacher_features, target)
    return student_features, teacher_features


class FeatureProjector(nn.Sequential):
    """Student-side adapter to the teacher's channel count: 1x1 conv + BN + ReLU.

    The ReLU matches the non-negative (post-ReLU) stage outputs of the zoo's teachers.
    ``(N, C_s, H, W) -> (N, C_t, H, W)``.
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )


class WassersteinFeatureLoss(nn.Module):
    """Wasserstein distance between chosen teacher and student stages, with learnable projectors.

    Args:
        student_channels: channel count of each student stage (``features`` of
            ``forward_stages``, shallow to deep).
        teacher_channels: the same for the teacher.
        pairs: ``(teacher_stage, student_stage)`` index pairs to match (negative indices count
            from the deepest stage). Default: the last stage of each.
        variant: ``"gaussian"`` (closed form, :func:`gaussian_wasserstein_loss`) or ``"sliced"``
            (:func:`sliced_wasserstein_loss`).
        reduction: channel reduction of the Gaussian variant (``"mean"`` or ``"sum"``).
        n_projections: directions of the sliced variant.

    ``forward(student_features, teacher_features)`` takes the two stage lists and returns the
    mean of the per-pair losses (a scalar). Teacher features are treated as constants.
    """

    def __init__(
        self,
        student_channels: Sequence[int],
        teacher_channels: Sequence[int],
        pairs: Sequence[Sequence[int]] = ((-1, -1),),
        variant: str = "gaussian",
        reduction: str = "mean",
        n_projections: int = 64,
    ) -> None:
        super().__init__()
        if variant not in ("gaussian", "sliced"):
            raise ValueError(f"variant must be 'gaussian' or 'sliced', got variant={variant!r}")
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' or 'sum', got reduction={reduction!r}")
        if not pairs:
            raise ValueError("pairs must name at least one (teacher_stage, student_stage) pair")
        self.pairs: list[tuple[int, int]] = []
        for pair in pairs:
            if len(pair) != 2:
                raise ValueError(
                    f"each entry of pairs must be (teacher_stage, student_stage), got {pair!r}"
                )
            t_idx, s_idx = int(pair[0]), int(pair[1])
            for name, idx, n in (
                ("teacher", t_idx, len(teacher_channels)),
                ("student", s_idx, len(student_channels)),
            ):
                if not -n <= idx < n:
                    raise ValueError(
                        f"pairs: {name} stage {idx} out of range, the {name} has {n} stages"
                    )
            self.pairs.append((t_idx, s_idx))
        self.variant = variant
        self.reduction = reduction
        self.n_projections = n_projections
        self.projectors = nn.ModuleList(
            FeatureProjector(student_channels[s], teacher_channels[t]) for t, s in self.pairs
        )

    def forward(
        self, student_features: Sequence[Tensor], teacher_features: Sequence[Tensor]
    ) -> Tensor:
        losses = []
        for (t_idx, s_idx), projector in zip(self.pairs, self.projectors, strict=True):
            f_s = projector(student_features[s_idx])
            f_s, f_t = match_spatial(f_s, teacher_features[t_idx].detach())
            if self.variant == "gaussian":
                losses.append(gaussian_wasserstein_loss(f_s, f_t, self.reduction))
            else:
                losses.append(sliced_wasserstein_loss(f_s, f_t, self.n_projections))
        return torch.stack(losses).mean()


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
