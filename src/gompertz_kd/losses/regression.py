"""Loss terms that regress the teacher's feature maps from the student's: variational information
distillation (VID) and overhaul feature distillation (OFD), with the small modules that own their
trainable parts.

Every teacher input is detached here: the teacher is a fixed target.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["OFDConnector", "VIDRegressor", "ofd_loss", "ofd_margin", "vid_loss"]


# ------------------------------------------------------------------ VID
def vid_loss(mean_s: Tensor, variance: Tensor, feature_t: Tensor) -> Tensor:
    """VID's negative log-likelihood of the teacher's map under a Gaussian predicted from the
    student's, up to the constant ``log(2 pi) / 2``:
    ``mean(0.5 * ((mu - t)^2 / sigma^2 + log sigma^2))`` over all ``N*C*H*W`` elements.

    Source: Ahn et al., "Variational Information Distillation for Knowledge Transfer", CVPR
    2019; HobbitLong/RepDistiller ``distiller_zoo/VID.py`` (``VIDLoss``). Benchmark defaults:
    every stage map after the stem, the per-stage losses summed, weight 1, CE 1.

    Args:
        mean_s: ``(N, C, H, W)``, the predicted mean (:class:`VIDRegressor` of the student map).
        variance: ``(C,)`` per-channel predicted variance, ``> 0``.
        feature_t: ``(N, C, H, W)`` the teacher map; detached.

    Returns:
        Scalar tensor (may be negative: a variance below 1 has a negative log).
    """
    if mean_s.shape != feature_t.shape or variance.shape != mean_s.shape[1:2]:
        raise ValueError(
            f"VID needs a mean (N, C, H, W), a variance (C,) and a teacher map of the mean's "
            f"shape, got {tuple(mean_s.shape)}, {tuple(variance.shape)} and "
            f"{tuple(feature_t.shape)}"
        )
    var = variance.view(1, -1, 1, 1)
    return (0.5 * ((mean_s - feature_t.detach()).square() / var + torch.log(var))).mean()


class VIDRegressor(nn.Module):
    """VID's Gaussian from a student map: the mean by three 1x1 convolutions (no bias, ReLU
    between), the variance per channel ``softplus(log_scale) + eps``.

    RepDistiller ``VIDLoss``: hidden width = the teacher's channel count there, and
    ``log_scale`` starts at ``log(exp(init_pred_var - eps) - 1)``, so the variance starts at
    ``init_pred_var`` (5 in the benchmark, ``eps = 1e-5``).
    ``(N, C_s, H, W) -> ((N, C_t, H, W) mean, (C_t,) variance)``.

    Args:
        in_channels: ``C_s``.
        mid_channels: hidden width.
        out_channels: ``C_t``.
        init_pred_var: the variance at initialisation, ``> eps``.
        eps: floor of the variance.
    """

    def __init__(
        self,
        in_channels: int,
        mid_channels: int,
        out_channels: int,
        init_pred_var: float = 5.0,
        eps: float = 1e-5,
    ) -> None:
        super().__init__()
        if not init_pred_var > eps > 0:
            raise ValueError(
                f"need init_pred_var > eps > 0, got init_pred_var={init_pred_var}, eps={eps}"
            )
        self.regressor = nn.Sequential(
            nn.Conv2d(in_channels, mid_channels, kernel_size=1, bias=False),
            nn.ReLU(),
            nn.Conv2d(mid_channels, mid_channels, kernel_size=1, bias=False),
            nn.ReLU(),
            nn.Conv2d(mid_channels, out_channels, kernel_size=1, bias=False),
        )
        self.eps = float(eps)
        self.log_scale = nn.Parameter(
            torch.full((out_channels,), math.log(math.expm1(init_pred_var - eps)))
        )

    def variance(self) -> Tensor:
        """``(C_t,)`` the predicted variance, ``softplus(log_scale) + eps``."""
        return F.softplus(self.log_scale) + self.eps

    def forward(self, feature_s: Tensor) -> tuple[Tensor, Tensor]:
        return self.regressor(feature_s), self.variance()


# ------------------------------------------------------------------ OFD
def ofd_margin(mean: Tensor, std: Tensor) -> Tensor:
    """OFD's margin per channel: the expected value of a pre-ReLU response ``x ~ N(m, s^2)``
    given that it is negative, ``m - s * phi(m / s) / Phi(-m / s)``, or ``-3 s`` where
    ``Phi(-m / s) <= 0.001`` (hardly ever negative).

    Source: Heo et al., "A Comprehensive Overhaul of Feature Distillation", ICCV 2019;
    megvii-research/mdistiller ``mdistiller/distillers/OFD.py`` (``init_ofd_modules``), which
    takes ``m`` and ``s`` from the BatchNorm before each ReLU: its bias and the absolute value
    of its weight.

    Args:
        mean: ``(C,)`` the BatchNorm's bias.
        std: ``(C,)`` its weight (the absolute value is taken).

    Returns:
        ``(C,)`` margins, all ``<= 0``.
    """
    s = std.abs()
    ratio = mean / s
    tail = torch.special.ndtr(-ratio)
    density = torch.exp(-0.5 * ratio.square()) / math.sqrt(2 * math.pi)
    expected = mean - s * density / tail.clamp_min(1e-3)
    return torch.where(tail > 1e-3, expected, -3 * s)


def ofd_loss(connected_s: Tensor, feature_t: Tensor, margin: Tensor) -> Tensor:
    """OFD's partial L2 distance for one pair of pre-ReLU maps.

    The teacher target is ``max(t, margin)``; an element contributes ``(s - target)^2`` unless
    both ``s <= target`` and ``target <= 0`` (a student response already below a negative
    target is as good as the target after the ReLU). Summed over channels and positions,
    averaged over the batch, as the benchmark's ``feat_loss`` (``.mean(dim=0).sum()``): so the
    published weight 0.001 applies to a loss of order ``C * H * W``.

    Source: Heo et al., ICCV 2019; mdistiller ``OFD.py`` (``ofd_loss_single``). The teacher map
    is average-pooled to the student's size first (as there). Benchmark defaults: every stage
    after the stem, pre-ReLU, a 1x1 conv + BN connector on the student, stage ``i`` of ``n``
    weighted ``1 / 2^(n - 1 - i)`` (the deepest 1), weight 0.001, CE 1.

    Args:
        connected_s: ``(N, C, H, W)`` the student's pre-ReLU map after :class:`OFDConnector`.
        feature_t: ``(N, C, H_t, W_t)`` the teacher's pre-ReLU map; detached.
        margin: ``(C,)`` (:func:`ofd_margin` of the teacher's BatchNorm).

    Returns:
        Scalar tensor, ``>= 0``.
    """
    if connected_s.shape[:2] != feature_t.shape[:2] or margin.shape != connected_s.shape[1:2]:
        raise ValueError(
            f"OFD needs student and teacher maps with the same batch size and channels and a "
            f"margin per channel, got {tuple(connected_s.shape)}, {tuple(feature_t.shape)} and "
            f"{tuple(margin.shape)}"
        )
    target = feature_t.detach()
    if target.shape[-2:] != connected_s.shape[-2:]:
        target = F.adaptive_avg_pool2d(target, connected_s.shape[-2:])
    target = torch.maximum(target, margin.view(1, -1, 1, 1).to(target.dtype))
    mask = (connected_s > target) | (target > 0)
    return ((connected_s - target).square() * mask).sum() / connected_s.shape[0]


class OFDConnector(nn.Sequential):
    """OFD's connector from a student map to the teacher's channels: a ``k x k`` convolution
    (no bias, same padding) and a BatchNorm. ``(N, C_s, H, W) -> (N, C_t, H, W)``.

    mdistiller ``build_feature_connector``: the convolution's weights drawn from
    ``N(0, 2 / (k * k * C_t))``, the BatchNorm at weight 1, bias 0.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 1) -> None:
        conv = nn.Conv2d(
            in_channels,
            out_channels,
            kernel_size=kernel_size,
            padding=(kernel_size - 1) // 2,
            bias=False,
        )
        nn.init.normal_(
            conv.weight, 0.0, math.sqrt(2.0 / (kernel_size * kernel_size * out_channels))
        )
        super().__init__(OrderedDict(conv=conv, bn=nn.BatchNorm2d(out_channels)))
