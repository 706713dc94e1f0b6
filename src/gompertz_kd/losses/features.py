"""Loss terms on intermediate features and embeddings: FitNets, attention transfer, relational KD
and ReviewKD, with the small modules that own their trainable parts.

Every teacher input is detached here: the teacher is a fixed target.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "HintRegressor",
    "ReviewFusion",
    "at_loss",
    "fitnet_loss",
    "hcl_loss",
    "match_spatial",
    "rkd_loss",
]


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


# ------------------------------------------------------------------ FitNets
def fitnet_loss(regressed_s: Tensor, feature_t: Tensor) -> Tensor:
    """FitNets hint loss: mean squared error between the regressed student map and the teacher's.

    Source: Romero et al., "FitNets: Hints for Thin Deep Nets", ICLR 2015; HobbitLong/RepDistiller
    ``distiller_zoo/FitNet.py`` (``HintLoss``, ``nn.MSELoss()``). Defaults (RepDistiller /
    mdistiller ``engine/cfg.py``): hint at stage 2 (``HINT_LAYER = 2``), weight 100, CE weight 1.
    RepDistiller trains in one stage; the paper's separate hint pre-training stage is not used.

    Args:
        regressed_s: ``(N, C, H, W)``, the student map after :class:`HintRegressor`.
        feature_t: the teacher map, the same shape; detached.

    Returns:
        Scalar tensor, ``>= 0``: the mean over all ``N*C*H*W`` elements.

    Raises:
        ValueError: the shapes differ.
    """
    if regressed_s.shape != feature_t.shape:
        raise ValueError(
            "regressed student and teacher features must have the same shape, got "
            f"{tuple(regressed_s.shape)} and {tuple(feature_t.shape)}"
        )
    return F.mse_loss(regressed_s, feature_t.detach())


class HintRegressor(nn.Sequential):
    """FitNets' regressor from a student map to the teacher map's shape: conv + BN + ReLU.

    RepDistiller's ``ConvReg`` (``models/util.py``), the convolution chosen by the heights:
    student twice as tall -> 3x3 stride-2 conv; half as tall -> 4x4 stride-2 transposed conv;
    otherwise (at least as tall) a valid conv with kernel ``(1 + H_s - H_t, 1 + W_s - W_t)``,
    i.e. 1x1 for equal sizes. ``(N, C_s, H_s, W_s) -> (N, C_t, H_t, W_t)``.

    Args:
        student_shape: ``(C_s, H_s, W_s)`` of the student map.
        teacher_shape: ``(C_t, H_t, W_t)`` of the teacher map.

    Raises:
        ValueError: the student map is smaller than the teacher's other than by exactly half.
    """

    def __init__(self, student_shape: Sequence[int], teacher_shape: Sequence[int]) -> None:
        c_s, h_s, w_s = (int(v) for v in student_shape)
        c_t, h_t, w_t = (int(v) for v in teacher_shape)
        if h_s == 2 * h_t:
            conv: nn.Module = nn.Conv2d(c_s, c_t, kernel_size=3, stride=2, padding=1)
        elif 2 * h_s == h_t:
            conv = nn.ConvTranspose2d(c_s, c_t, kernel_size=4, stride=2, padding=1)
        elif h_s >= h_t and w_s >= w_t:
            conv = nn.Conv2d(c_s, c_t, kernel_size=(1 + h_s - h_t, 1 + w_s - w_t))
        else:
            raise ValueError(
                f"no hint regressor from student shape {(c_s, h_s, w_s)} "
                f"to teacher shape {(c_t, h_t, w_t)}"
            )
        super().__init__(OrderedDict(conv=conv, bn=nn.BatchNorm2d(c_t), relu=nn.ReLU()))


# ------------------------------------------------------------------ attention transfer
def _attention_map(features: Tensor, p: int) -> Tensor:
    """``(N, C, H, W) -> (N, H*W)``: channel mean of ``f^p``, each row scaled to unit L2 norm."""
    return F.normalize(features.pow(p).mean(dim=1).flatten(1), dim=1)


def at_loss(feature_s: Tensor, feature_t: Tensor, p: int = 2) -> Tensor:
    """Attention transfer for one pair of maps: mean squared difference of the attention maps.

    Source: Zagoruyko & Komodakis, "Paying More Attention to Attention", ICLR 2017;
    HobbitLong/RepDistiller ``distiller_zoo/AT.py`` (``Attention.at_loss``) and mdistiller
    ``mdistiller/distillers/AT.py``. The attention map is ``f.pow(p).mean(1)`` flattened and
    L2-normalised per image; the loss is the mean over ``N * H * W`` of the squared difference.
    The method sums this over stages (mdistiller: every stage after the stem) and weights the sum
    by 1000 with ``p = 2``; the caller does both.

    If the spatial sizes differ, the larger map is average-pooled to the smaller one's size
    (:func:`match_spatial`); the reference pools to ``(H, H)`` of the smaller map, the same for
    the square maps of the CIFAR networks.

    Args:
        feature_s: ``(N, C_s, H_s, W_s)``.
        feature_t: ``(N, C_t, H_t, W_t)``; detached. The channel counts may differ.
        p: the power (2 in the paper).

    Returns:
        Scalar tensor in ``[0, 4 / (H * W)]``.
    """
    if feature_s.shape[0] != feature_t.shape[0]:
        raise ValueError(
            "student and teacher features must have the same batch size, got "
            f"{tuple(feature_s.shape)} and {tuple(feature_t.shape)}"
        )
    f_s, f_t = match_spatial(feature_s, feature_t.detach())
    return (_attention_map(f_s, p) - _attention_map(f_t, p)).square().mean()


# ------------------------------------------------------------------ relational KD
def _pairwise_distances(embeddings: Tensor, eps: float = 1e-12) -> Tensor:
    """``(N, D) -> (N, N)`` Euclidean distances with an exact-zero diagonal."""
    squared = embeddings.square().sum(dim=1)
    gram = embeddings @ embeddings.t()
    # The clamp keeps sqrt differentiable where rounding makes a distance zero or negative.
    dist = (squared.unsqueeze(1) + squared.unsqueeze(0) - 2 * gram).clamp_min(eps).sqrt()
    eye = torch.eye(len(embeddings), dtype=torch.bool, device=embeddings.device)
    return dist.masked_fill(eye, 0.0)


def _angle_cosines(embeddings: Tensor) -> Tensor:
    """``(N, D) -> (N*N*N,)``: ``cos`` of the angle at ``e_i`` between ``e_j`` and ``e_k``."""
    diff = embeddings.unsqueeze(0) - embeddings.unsqueeze(1)  # [i, j] = e_j - e_i
    unit = F.normalize(diff, p=2, dim=2)
    return torch.bmm(unit, unit.transpose(1, 2)).flatten()


def rkd_loss(
    embedding_s: Tensor,
    embedding_t: Tensor,
    distance_weight: float = 25.0,
    angle_weight: float = 50.0,
) -> Tensor:
    """Relational KD: ``distance_weight * L_distance + angle_weight * L_angle`` over the batch.

    Source: Park et al., "Relational Knowledge Distillation", CVPR 2019; HobbitLong/RepDistiller
    ``distiller_zoo/RKD.py`` (``RKDLoss``), also mdistiller ``mdistiller/distillers/RKD.py``.

    - Distance: pairwise Euclidean distances, each network's divided by the mean of its
      non-zero distances, compared with smooth-L1 (mean over the ``N*N`` entries).
    - Angle: for every triple ``(i, j, k)`` the cosine between the unit vectors ``e_j - e_i`` and
      ``e_k - e_i``, compared with smooth-L1 (mean over ``N^3`` entries; the degenerate ``j = i``
      or ``k = i`` entries are 0 on both sides, as in the reference).

    Defaults: weights 25 and 50, on the pooled embeddings, term weight 1 (RepDistiller,
    mdistiller ``engine/cfg.py``).

    Args:
        embedding_s: ``(N, D_s)`` (extra dimensions are flattened), ``N >= 2``.
        embedding_t: ``(N, D_t)``; detached. ``D_s`` and ``D_t`` may differ.
        distance_weight: weight of the distance term.
        angle_weight: weight of the angle term.

    Returns:
        Scalar tensor, ``>= 0``.
    """
    if embedding_s.shape[0] != embedding_t.shape[0] or embedding_s.shape[0] < 2:
        raise ValueError(
            "student and teacher embeddings need the same batch size, at least 2, got "
            f"{tuple(embedding_s.shape)} and {tuple(embedding_t.shape)}"
        )
    student = embedding_s.flatten(1)
    teacher = embedding_t.detach().flatten(1)
    d_t = _pairwise_distances(teacher)
    d_t = d_t / d_t[d_t > 0].mean()
    d_s = _pairwise_distances(student)
    d_s = d_s / d_s[d_s > 0].mean()
    loss_distance = F.smooth_l1_loss(d_s, d_t)
    loss_angle = F.smooth_l1_loss(_angle_cosines(student), _angle_cosines(teacher))
    return distance_weight * loss_distance + angle_weight * loss_angle


# ------------------------------------------------------------------ ReviewKD
def hcl_loss(
    features_s: Sequence[Tensor],
    features_t: Sequence[Tensor],
    levels: Sequence[int] = (4, 2, 1),
) -> Tensor:
    """ReviewKD's hierarchical context loss, summed over the pairs of maps.

    For each pair: the MSE of the full maps with weight 1, plus, for each ``level`` smaller than
    the map's height, the MSE of both maps average-pooled to ``level x level`` with weights
    ``1/2, 1/4, ...`` in the order given; the pair's loss is that weighted sum divided by the sum
    of the weights. The pairs' losses are summed (not averaged).

    Source: Chen et al., "Distilling Knowledge via Knowledge Review", CVPR 2021; mdistiller
    ``mdistiller/distillers/ReviewKD.py`` (``hcl_loss``). Defaults: levels ``(4, 2, 1)``,
    CIFAR-100 weight 5 (``configs/cifar100/reviewkd.yaml``; 1 in ``engine/cfg.py``), CE weight 1,
    and a linear warm-up over 20 epochs, which is a schedule and lives elsewhere.

    Args:
        features_s: the fused student maps (:class:`ReviewFusion`), each ``(N, C_i, H_i, W_i)``.
        features_t: the teacher maps, the same shapes pairwise; detached.
        levels: pooled sizes, used only where smaller than the map's height.

    Returns:
        Scalar tensor, ``>= 0``.
    """
    if len(features_s) != len(features_t) or not features_s:
        raise ValueError(
            f"need equally many student and teacher maps, at least one, "
            f"got {len(features_s)} and {len(features_t)}"
        )
    total = features_s[0].new_zeros(())
    for f_s, f_t in zip(features_s, features_t, strict=True):
        f_t = f_t.detach()
        if f_s.shape != f_t.shape:
            raise ValueError(
                f"paired maps must have the same shape, got {tuple(f_s.shape)} "
                f"and {tuple(f_t.shape)}"
            )
        loss = F.mse_loss(f_s, f_t)
        weight, weight_sum = 1.0, 1.0
        for level in levels:
            if level >= f_s.shape[2]:
                continue
            weight /= 2.0
            pooled_s = F.adaptive_avg_pool2d(f_s, (level, level))
            pooled_t = F.adaptive_avg_pool2d(f_t, (level, level))
            loss = loss + weight * F.mse_loss(pooled_s, pooled_t)
            weight_sum += weight
        total = total + loss / weight_sum
    return total


class _AttentionFusion(nn.Module):
    """One ABF block: reduce the student map, fuse it with the deeper level's residual by two
    learned spatial attention maps, resize, and project to the teacher's channels."""

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, fuse: bool):
        super().__init__()
        self.reduce = nn.Sequential(
            nn.Conv2d(in_channels, mid_channels, kernel_size=1, bias=False),
            nn.BatchNorm2d(mid_channels),
        )
        self.project = nn.Sequential(
            nn.Conv2d(mid_channels, out_channels, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
        )
        self.attention = (
            nn.Sequential(nn.Conv2d(2 * mid_channels, 2, kernel_size=1), nn.Sigmoid())
            if fuse
            else None
        )
        # The reference's initialisation (mdistiller ReviewKD.py, ABF).
        nn.init.kaiming_uniform_(self.reduce[0].weight, a=1)
        nn.init.kaiming_uniform_(self.project[0].weight, a=1)

    def forward(
        self, x: Tensor, residual: Tensor | None, out_size: tuple[int, int]
    ) -> tuple[Tensor, Tensor]:
        x = self.reduce(x)
        if self.attention is not None:
            if residual is None:
                raise ValueError("a fusing level needs the residual of the level below")
            residual = F.interpolate(residual, size=x.shape[-2:], mode="nearest")
            weights = self.attention(torch.cat([x, residual], dim=1))
            x = x * weights[:, :1] + residual * weights[:, 1:]
        if tuple(x.shape[-2:]) != out_size:
            x = F.interpolate(x, size=out_size, mode="nearest")
        return self.project(x), x


class ReviewFusion(nn.Module):
    """ReviewKD's attention-based fusion (ABF) chain: student maps in, teacher-shaped maps out.

    Source: Chen et al., CVPR 2021; mdistiller ``mdistiller/distillers/ReviewKD.py`` (``ABF`` and
    ``ReviewKD.forward_train``). The levels are processed deepest first: the deepest level is
    reduced to ``mid_channel`` channels and projected; each shallower level is reduced, fused
    with the (nearest-upsampled) reduced map of the level below by a 1x1 conv + sigmoid that
    gives one spatial weight map for each, resized to the output size and projected by a 3x3
    conv + BN to the teacher's channels. The fused map of a level is the residual passed up.

    Input convention (as in the reference): lists from shallow to deep. The caller passes the
    stage outputs it distils (mdistiller: stages 1..3, not the stem) and appends the pooled
    embedding as a ``(N, C, 1, 1)`` map as the deepest level, both for the student (input) and
    the teacher (target of :func:`hcl_loss`; mdistiller uses the teacher's pre-activation stage
    maps). Reference CIFAR-100 setting for resnet32x4 -> resnet8x4: student and teacher channels
    ``[64, 128, 256, 256]``, sizes ``[32, 16, 8, 1]``, ``mid_channel = min(512, channels[-1])``.

    Args:
        student_channels: channels of each student level, shallow to deep.
        teacher_channels: channels of each teacher level (the outputs), shallow to deep.
        mid_channel: channels of the fused (residual) maps.
        spatial_sizes: the teacher maps' sizes, shallow to deep, each an int (square) or an
            ``(H, W)`` pair; the outputs are resized to these.

    ``forward(features_s)`` takes the list of student maps and returns the list of fused maps,
    shallow to deep, level ``i`` shaped ``(N, teacher_channels[i], *spatial_sizes[i])``.
    """

    def __init__(
        self,
        student_channels: Sequence[int],
        teacher_channels: Sequence[int],
        mid_channel: int,
        spatial_sizes: Sequence[int | Sequence[int]],
    ) -> None:
        super().__init__()
        n = len(student_channels)
        if n == 0 or len(teacher_channels) != n or len(spatial_sizes) != n:
            raise ValueError(
                "student_channels, teacher_channels and spatial_sizes need the same non-zero "
                f"length, got {len(student_channels)}, {len(teacher_channels)} and "
                f"{len(spatial_sizes)}"
            )
        self.spatial_sizes: list[tuple[int, int]] = [
            (int(s[0]), int(s[1])) if isinstance(s, Sequence) else (int(s), int(s))
            for s in spatial_sizes
        ]
        # Level i (shallow to deep); every level but the deepest fuses with the one below.
        self.fusions = nn.ModuleList(
            _AttentionFusion(c_s, mid_channel, c_t, fuse=i < n - 1)
            for i, (c_s, c_t) in enumerate(zip(student_channels, teacher_channels, strict=True))
        )

    def forward(self, features_s: Sequence[Tensor]) -> list[Tensor]:
        if len(features_s) != len(self.fusions):
            raise ValueError(f"expected {len(self.fusions)} student maps, got {len(features_s)}")
        outputs: list[Tensor] = [features_s[0]] * len(features_s)
        residual: Tensor | None = None
        for level in reversed(range(len(features_s))):
            outputs[level], residual = self.fusions[level](
                features_s[level], residual, self.spatial_sizes[level]
            )
        return outputs
