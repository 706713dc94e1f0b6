"""Loss terms on the relations inside a batch or inside a feature map: similarity-preserving KD
(SP), probabilistic knowledge transfer (PKT), neuron selectivity transfer (NST) and KD from the
singular value decomposition of feature maps (KDSVD).

Every teacher input is detached here: the teacher is a fixed target.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from gompertz_kd.losses.features import match_spatial

__all__ = [
    "align_singular_vectors",
    "kdsvd_loss",
    "nst_loss",
    "pkt_loss",
    "sp_loss",
    "truncated_svd",
]


def _same_batch(a: Tensor, b: Tensor, what: str) -> None:
    if a.shape[0] != b.shape[0]:
        raise ValueError(
            f"student and teacher {what} must have the same batch size, got "
            f"{tuple(a.shape)} and {tuple(b.shape)}"
        )


# ------------------------------------------------------------------ SP
def sp_loss(feature_s: Tensor, feature_t: Tensor) -> Tensor:
    """Similarity-preserving KD for one pair of feature maps.

    Each network's batch similarity (Gram) matrix ``G = F F^T`` of the flattened maps ``F``
    ``(b, C*H*W)``, each row scaled to unit L2 norm; the loss is ``||G_t - G_s||_F^2 / b^2``.

    Source: Tung & Mori, "Similarity-Preserving Knowledge Distillation", ICCV 2019;
    HobbitLong/RepDistiller ``distiller_zoo/SP.py`` (``Similarity``). Benchmark defaults: the
    last stage's map of each network (RepDistiller ``feat[-2]``), weight 3000, CE 1.

    Args:
        feature_s: ``(b, ...)``, any trailing shape (flattened).
        feature_t: ``(b, ...)``; detached. The trailing shapes may differ.

    Returns:
        Scalar tensor in ``[0, 4 / b]``; 0 when the two maps have the same row-normalised Gram
        matrix (e.g. identical maps).
    """
    _same_batch(feature_s, feature_t, "features")
    b = feature_s.shape[0]
    f_s = feature_s.flatten(1)
    f_t = feature_t.detach().flatten(1)
    gram_s = F.normalize(f_s @ f_s.t(), dim=1)
    gram_t = F.normalize(f_t @ f_t.t(), dim=1)
    return (gram_t - gram_s).square().sum() / (b * b)


# ------------------------------------------------------------------ PKT
def _conditional_similarities(embeddings: Tensor, eps: float) -> Tensor:
    """``(b, D) -> (b, b)``: cosine similarities mapped to ``[0, 1]``, each row summing to 1."""
    unit = embeddings / (embeddings.norm(dim=1, keepdim=True) + eps)
    similarity = (unit @ unit.t() + 1.0) / 2.0
    return similarity / similarity.sum(dim=1, keepdim=True)


def pkt_loss(embedding_s: Tensor, embedding_t: Tensor, eps: float = 1e-7) -> Tensor:
    """Probabilistic knowledge transfer: KL divergence teacher || student between the
    conditional probability distributions the cosine similarities of a batch define.

    For each network, ``p_ij = (1 + cos(e_i, e_j)) / 2`` normalised over ``j``; the loss is the
    mean over the ``b * b`` entries of ``p^t_ij * log((p^t_ij + eps) / (p^s_ij + eps))``.

    Source: Passalis & Tefas, "Learning Deep Representations with Probabilistic Knowledge
    Transfer", ECCV 2018; HobbitLong/RepDistiller ``distiller_zoo/PKT.py``
    (``cosine_similarity_loss``, ``eps = 1e-7``, the norm's ``eps`` too). Benchmark defaults: the
    pooled embeddings, weight 30000, CE 1. The reference also zeroes NaN entries of the
    normalised embeddings; a finite input gives none, so that step is left out.

    Args:
        embedding_s: ``(b, D_s)`` (extra dimensions are flattened).
        embedding_t: ``(b, D_t)``; detached. ``D_s`` and ``D_t`` may differ.
        eps: the reference's stabiliser.

    Returns:
        Scalar tensor; 0 (up to ``eps``) for embeddings with the same cosine similarities.
    """
    _same_batch(embedding_s, embedding_t, "embeddings")
    p_s = _conditional_similarities(embedding_s.flatten(1), eps)
    p_t = _conditional_similarities(embedding_t.detach().flatten(1), eps)
    return (p_t * torch.log((p_t + eps) / (p_s + eps))).mean()


# ------------------------------------------------------------------ NST
def _poly_kernel_mean(a: Tensor, b: Tensor) -> Tensor:
    """Mean of ``(<a_i, b_j>)^2`` over the batch and every pair of rows: ``(N, A, D), (N, B, D)``."""
    return torch.bmm(a, b.transpose(1, 2)).square().mean()


def nst_loss(feature_s: Tensor, feature_t: Tensor) -> Tensor:
    """Neuron selectivity transfer for one pair of maps: the squared maximum mean discrepancy,
    with the polynomial kernel ``k(x, y) = (x^T y)^2``, between the student's and the teacher's
    channels, each channel's spatial activation pattern scaled to unit L2 norm.

    ``MMD^2 = mean k(t, t') + mean k(s, s') - 2 mean k(s, t)``, each mean over the batch and
    every pair of channels: the squared distance between the two channel sets' mean embeddings
    in the kernel's feature space, so ``>= 0``.

    Source: Huang & Wang, "Like What You Like: Knowledge Distill via Neuron Selectivity
    Transfer", arXiv 1707.01219, 2017; HobbitLong/RepDistiller ``distiller_zoo/NST.py``
    (``NSTLoss``, with ``full_loss``: the teacher-teacher term included). The larger map is
    average-pooled to the smaller one's size (:func:`match_spatial`). Benchmark defaults: every
    stage map after the stem, the per-stage losses summed, weight 50, CE 1.

    Args:
        feature_s: ``(N, C_s, H_s, W_s)``.
        feature_t: ``(N, C_t, H_t, W_t)``; detached. The channel counts may differ.

    Returns:
        Scalar tensor, ``>= 0`` (up to rounding).
    """
    _same_batch(feature_s, feature_t, "features")
    f_s, f_t = match_spatial(feature_s, feature_t.detach())
    f_s = F.normalize(f_s.flatten(2), dim=2)
    f_t = F.normalize(f_t.flatten(2), dim=2)
    return (
        _poly_kernel_mean(f_t, f_t) + _poly_kernel_mean(f_s, f_s) - 2 * _poly_kernel_mean(f_s, f_t)
    )


# ------------------------------------------------------------------ KDSVD
class _LeadingSingular(torch.autograd.Function):
    """The first ``r`` right singular vectors and singular values of a batch of matrices, with
    a backward that uses only what they depend on.

    ``torch.linalg.svd``'s own backward divides by ``s_i^2 - s_j^2`` for *every* pair, so a
    matrix with a repeated singular value anywhere (a post-ReLU map with two dead channels has
    two zeros) gets a non-finite gradient even when the loss reads only the leading vectors.
    Here the derivative of ``v_i`` (``i < r``) is ``sum_j v_j v_j^T dG v_i / (l_i - l_j)`` over
    the other singular pairs, plus the null space of ``X`` (``(I - V V^T) dG v_i / l_i``), with
    ``G = X^T X``, ``l = s^2``; that of ``s_i`` is ``u_i^T dX v_i``. Pairs with ``l_i = l_j``
    (up to rounding) are left out: there the vector is not a function of ``X``.
    ``(N, m, n) -> ((N, n, r), (N, r))``.
    """

    @staticmethod
    def forward(ctx, x: Tensor, r: int) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        u, s, vh = torch.linalg.svd(x, full_matrices=False)
        v = vh.transpose(1, 2)
        ctx.r = r
        ctx.save_for_backward(x, u, s, v)
        return v[:, :, :r], s[:, :r]

    @staticmethod
    def backward(ctx, grad_v: Tensor, grad_s: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        x, u, s, v = ctx.saved_tensors
        r = ctx.r
        lam = s.square()  # (N, p)
        tol = torch.finfo(lam.dtype).eps * lam.amax(dim=1, keepdim=True).clamp_min(1e-30)
        diff = lam[:, :r, None] - lam[:, None, :]  # (N, r, p): l_i - l_j
        inverse = torch.where(diff.abs() > tol[:, :, None], 1.0 / diff, torch.zeros_like(diff))
        v_r = v[:, :, :r]
        a = v.transpose(1, 2) @ grad_v  # (N, p, r): v_j^T g_i
        grad_g = v @ (inverse.transpose(1, 2) * a) @ v_r.transpose(1, 2)
        lam_r = lam[:, :r]
        inv_lam = torch.where(lam_r > tol, 1.0 / lam_r, torch.zeros_like(lam_r))
        null = grad_v - v @ a  # the part of g_i outside the row space of X
        grad_g = grad_g + (null * inv_lam[:, None, :]) @ v_r.transpose(1, 2)
        grad_x = x @ (grad_g + grad_g.transpose(1, 2))
        grad_x = grad_x + (u[:, :, :r] * grad_s[:, None, :]) @ v_r.transpose(1, 2)
        return grad_x, None


def truncated_svd(feature: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The first ``k`` right singular vectors and singular values of each image's map.

    Each map ``(C, H, W)`` is read as the matrix ``X`` ``(H*W, C)`` (positions x channels);
    ``X = U S V^T``. As the reference: non-finite entries are zeroed, each of the ``k`` vectors
    is unit-normalised, and so is each image's vector of ``k`` singular values. The gradient
    stays finite when singular values other than the leading ``k`` repeat (dead channels of a
    post-ReLU map), where ``torch.linalg.svd``'s, and so the reference's, is not.

    Args:
        feature: ``(N, C, H, W)``, with ``k <= min(H*W, C)``.
        k: how many singular triplets.

    Returns:
        ``(V, S)``: ``(N, C, k)`` and ``(N, k)``.
    """
    n, c = feature.shape[:2]
    x = feature.reshape(n, c, -1).transpose(1, 2)
    if k > min(x.shape[1], x.shape[2]):
        raise ValueError(
            f"k={k} singular vectors need maps with at least k positions and "
            f"channels, got {tuple(feature.shape)}"
        )
    v, s = _LeadingSingular.apply(x, k)
    v = torch.where(torch.isfinite(v), v, torch.zeros_like(v))
    s = torch.where(torch.isfinite(s), s, torch.zeros_like(s))
    return F.normalize(v, dim=1), F.normalize(s, dim=1)


def align_singular_vectors(v_s: Tensor, v_t: Tensor) -> Tensor:
    """For each teacher vector, the student vector of largest absolute cosine with it, its
    sign flipped to agree: ``(N, C, k_s), (N, C, k_t) -> (N, C, k_t)``.

    Source: RepDistiller ``distiller_zoo/KDSVD.py`` (``align_rsv``). A singular vector's sign is
    arbitrary; this makes the student's agree with the teacher's.
    """
    cosine = v_s.transpose(1, 2) @ v_t  # (N, k_s, k_t)
    best = cosine.abs().amax(dim=1, keepdim=True)
    mask = torch.where(best == cosine.abs(), torch.sign(cosine), torch.zeros_like(cosine))
    return v_s @ mask


def kdsvd_loss(features_s: Sequence[Tensor], features_t: Sequence[Tensor], k: int = 1) -> Tensor:
    """KD with singular value decomposition: the radial-basis correlation between the
    singular vectors of consecutive stages, the student's against the teacher's.

    For each stage: the teacher's first ``k`` right singular vectors ``V_t`` and the student's
    first ``k + 3`` (:func:`truncated_svd`), the student's aligned to the teacher's
    (:func:`align_singular_vectors`), both scaled by the teacher's normalised singular values.
    For each pair of consecutive stages ``(l - 1, l)``, every channel ``i`` of stage ``l`` against
    every channel ``j`` of stage ``l - 1``: ``G_ij = exp(-(v^l_i - v^{l-1}_j)^2 / 8)`` per
    singular vector; the loss is the squared difference of the student's and the teacher's ``G``
    summed over all entries (non-finite entries dropped) and divided by the batch size, summed
    over the stage pairs.

    Source: Lee et al., "Self-supervised Knowledge Distillation Using Singular Value
    Decomposition", ECCV 2018; HobbitLong/RepDistiller ``distiller_zoo/KDSVD.py`` (``KDSVD``).
    Benchmark defaults: ``k = 1``, every stage map after the stem, weight 1, CE 1. The maps are
    compared over channels, so each student map needs its teacher map's channel count (the
    spatial sizes may differ).

    Args:
        features_s: the student maps, ``(N, C_l, H_l, W_l)`` each, at least two.
        features_t: the teacher maps, the same channel counts pairwise; detached.
        k: singular vectors of the teacher per stage.

    Returns:
        Scalar tensor, ``>= 0``.
    """
    if len(features_s) != len(features_t) or len(features_s) < 2:
        raise ValueError(
            "KDSVD needs equally many student and teacher maps, at least two, got "
            f"{len(features_s)} and {len(features_t)}"
        )
    batch = features_s[0].shape[0]
    total = features_s[0].new_zeros(())
    previous: tuple[Tensor, Tensor] | None = None
    for f_s, f_t in zip(features_s, features_t, strict=True):
        if f_s.shape[:2] != f_t.shape[:2]:
            raise ValueError(
                "KDSVD compares singular vectors over channels: paired maps need the same batch "
                f"size and channel count, got {tuple(f_s.shape)} and {tuple(f_t.shape)}"
            )
        v_t, s_t = truncated_svd(f_t.detach(), k)
        v_s, _ = truncated_svd(f_s, k + 3)
        v_s = align_singular_vectors(v_s, v_t)
        scale = s_t.unsqueeze(1)
        v_t, v_s = v_t * scale, v_s * scale
        if previous is not None:
            v_sb, v_tb = previous
            rbf_s = torch.exp(-(v_s.unsqueeze(2) - v_sb.unsqueeze(1)).square() / 8)
            rbf_t = torch.exp(-(v_t.unsqueeze(2) - v_tb.unsqueeze(1)).square() / 8)
            diff = (rbf_s - rbf_t).square()
            total = total + torch.where(torch.isfinite(diff), diff, torch.zeros_like(diff)).sum()
        previous = (v_s, v_t)
    return total / batch
