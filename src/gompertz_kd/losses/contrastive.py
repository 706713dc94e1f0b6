"""Contrastive representation distillation (CRD): the NCE loss, the embedding heads and the
memory banks of negatives."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ContrastMemory", "Embed", "crd_nce_loss", "draw_negatives"]


def crd_nce_loss(scores: Tensor, num_data: int, eps: float = 1e-7) -> Tensor:
    """CRD's NCE loss for one anchor side: the positive in column 0, ``K`` noise samples after it.

    With noise distribution ``P_n = 1 / num_data`` (uniform over the training set) and
    ``m = K``, the loss is ``-(sum_i log h(P_i0) + sum_ik log(1 - h(P_ik))) / N`` where
    ``h(P) = P / (P + m * P_n + eps)``, i.e. the NCE objective of the paper's Eq. 18.

    Source: Tian et al., "Contrastive Representation Distillation", ICLR 2020;
    HobbitLong/RepDistiller ``crd/criterion.py`` (``ContrastLoss``, ``eps = 1e-7``). The CRD term
    is the sum of this over the student-anchored and the teacher-anchored scores of
    :class:`ContrastMemory`, weighted 0.8 on CIFAR-100 (applied elsewhere).

    Args:
        scores: ``(N, K + 1)``, positive (unnormalised probability) scores, positive first.
        num_data: size of the training set (the memory bank).
        eps: the reference's stabiliser.

    Returns:
        Scalar tensor, ``>= 0``; summed over the ``K + 1`` columns, averaged over the batch.
    """
    if scores.dim() != 2 or scores.shape[1] < 2:
        raise ValueError(f"scores must be (N, K + 1) with K >= 1, got {tuple(scores.shape)}")
    noise = (scores.shape[1] - 1) / num_data  # m * P_n
    positive, negatives = scores[:, 0], scores[:, 1:]
    log_d1 = torch.log(positive / (positive + noise + eps))
    log_d0 = torch.log(noise / (negatives + noise + eps))
    return -(log_d1.sum() + log_d0.sum()) / scores.shape[0]


def draw_negatives(
    num_data: int,
    num_negatives: int,
    generator: torch.Generator,
    targets: Tensor,
    labels: Tensor | None = None,
    max_redraws: int = 64,
) -> Tensor:
    """``(N, K)`` memory-bank rows drawn uniformly with replacement, and, given the anchors'
    ``targets`` and the bank rows' ``labels``, only among rows of *other* classes.

    The second is CRD's ``mode='exact'`` (RepDistiller ``dataset/cifar100.py``: each negative
    drawn with replacement from the samples of the other classes), done by redrawing every
    entry whose row has the anchor's class until none has; a row whose label is unknown
    (``-1``) counts as another class's.

    Args:
        num_data: bank size; rows are drawn from ``[0, num_data)``.
        num_negatives: ``K``.
        generator: the random stream (on the device the rows are made on).
        targets: ``(N,)`` the anchors' classes (their count ``N`` sets the rows drawn).
        labels: ``(num_data,)`` each row's class, ``-1`` unknown; ``None``: uniform draw.
        max_redraws: rounds of redrawing before giving up.

    Returns:
        ``(N, K)`` int64 row indices.

    Raises:
        ValueError: after ``max_redraws`` rounds some anchor still has a negative of its own
            class (every known row is of that class).
    """
    n = targets.shape[0]
    device = generator.device
    rows = torch.randint(0, num_data, (n, num_negatives), generator=generator, device=device)
    if labels is None:
        return rows
    for _ in range(max_redraws):
        same = labels[rows] == targets.view(n, 1)
        if not bool(same.any()):
            return rows
        redraw = torch.randint(0, num_data, (n, num_negatives), generator=generator, device=device)
        rows = torch.where(same, redraw, rows)
    if bool((labels[rows] == targets.view(n, 1)).any()):
        raise ValueError(
            f"no negatives of other classes after {max_redraws} redraws: does the training set "
            "have more than one class?"
        )
    return rows


class Embed(nn.Module):
    """CRD's embedding head: linear map then L2 normalisation. ``(N, ...) -> (N, dim_out)``.

    RepDistiller ``crd/criterion.py`` (``Embed``), applied to the pooled features of each
    network (128-d by default). The reference divides by the norm without an epsilon;
    :func:`torch.nn.functional.normalize` adds ``1e-12``.
    """

    def __init__(self, dim_in: int, dim_out: int = 128) -> None:
        super().__init__()
        self.linear = nn.Linear(dim_in, dim_out)

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(self.linear(x.flatten(1)), dim=1)


class ContrastMemory(nn.Module):
    """CRD's two memory banks of embeddings, one row per training sample, and the NCE scores.

    Source: Tian et al., ICLR 2020; HobbitLong/RepDistiller ``crd/memory.py``
    (``ContrastMemory``), copied in mdistiller ``mdistiller/distillers/CRD.py``.

    - Banks ``memory_s`` and ``memory_t`` (buffers, so checkpoints hold them), ``(num_data,
      feature_dim)``, initialised uniform in ``[-b, b]`` with ``b = 1 / sqrt(feature_dim / 3)``.
    - The student embedding is scored against the teacher bank and vice versa:
      ``score = exp(<bank[j], e> / T) / Z`` for ``j`` = the sample itself (column 0) and its
      ``K`` negatives.
    - ``Z`` (buffers ``z_s``, ``z_t``; negative means unset) is fixed on the first call to
      ``mean(exp(<bank[j], e> / T)) * num_data`` of that batch, as in the reference.
    - After scoring, each bank's rows at ``indices`` move to
      ``normalise(momentum * row + (1 - momentum) * e)``, under ``torch.no_grad()``.

    The caller draws the negatives (:func:`draw_negatives`, so it can seed them); the
    reference's data set draws ``K`` indices uniformly, with replacement, among the samples of
    other classes (``mode='exact'``, RepDistiller ``dataset/cifar100.py``). Defaults: ``feature_dim = 128``, ``K = 16384``,
    ``T = 0.07``, ``momentum = 0.5`` (RepDistiller ``train_student.py``).

    Args:
        feature_dim: embedding size (of :class:`Embed`).
        num_data: training-set size; ``indices`` and ``negatives`` index ``[0, num_data)``.
        num_negatives: ``K``.
        temperature: ``T``.
        momentum: weight of the old bank row in the update.

    ``forward(embedding_s, embedding_t, indices, negatives) -> (scores_s, scores_t)``:
    embeddings ``(N, feature_dim)`` (unit rows), ``indices`` ``(N,)`` the samples' own bank
    rows, ``negatives`` ``(N, K)`` bank rows; scores ``(N, K + 1)``, positive first, each
    differentiable w.r.t. its own embedding only (the banks are constants).
    """

    def __init__(
        self,
        feature_dim: int,
        num_data: int,
        num_negatives: int = 16384,
        temperature: float = 0.07,
        momentum: float = 0.5,
    ) -> None:
        super().__init__()
        self.feature_dim = feature_dim
        self.num_data = num_data
        self.num_negatives = num_negatives
        self.temperature = temperature
        self.momentum = momentum
        bound = 1.0 / math.sqrt(feature_dim / 3)
        self.register_buffer("memory_s", torch.rand(num_data, feature_dim) * 2 * bound - bound)
        self.register_buffer("memory_t", torch.rand(num_data, feature_dim) * 2 * bound - bound)
        self.register_buffer("z_s", torch.tensor(-1.0))
        self.register_buffer("z_t", torch.tensor(-1.0))

    def forward(
        self, embedding_s: Tensor, embedding_t: Tensor, indices: Tensor, negatives: Tensor
    ) -> tuple[Tensor, Tensor]:
        n = embedding_s.shape[0]
        if embedding_s.shape != (n, self.feature_dim) or embedding_t.shape != (n, self.feature_dim):
            raise ValueError(
                f"embeddings must be (N, {self.feature_dim}), got {tuple(embedding_s.shape)} "
                f"and {tuple(embedding_t.shape)}"
            )
        if indices.shape != (n,) or negatives.shape != (n, self.num_negatives):
            raise ValueError(
                f"indices must be ({n},) and negatives ({n}, {self.num_negatives}), got "
                f"{tuple(indices.shape)} and {tuple(negatives.shape)}"
            )
        rows = torch.cat([indices.view(n, 1), negatives], dim=1)
        # exp(<., .> / 0.07) reaches 1.6e6, past float16's range: score in the banks' precision.
        with torch.autocast(device_type=embedding_s.device.type, enabled=False):
            e_s = embedding_s.to(self.memory_s.dtype)
            e_t = embedding_t.to(self.memory_t.dtype)
            scores_s = torch.exp(
                torch.bmm(self.memory_t[rows], e_s.unsqueeze(2)).squeeze(2) / self.temperature
            )
            scores_t = torch.exp(
                torch.bmm(self.memory_s[rows], e_t.unsqueeze(2)).squeeze(2) / self.temperature
            )
        with torch.no_grad():
            # torch.where instead of `if z < 0`: no device sync on every step.
            self.z_s.copy_(torch.where(self.z_s < 0, scores_s.mean() * self.num_data, self.z_s))
            self.z_t.copy_(torch.where(self.z_t < 0, scores_t.mean() * self.num_data, self.z_t))
            # Clones: a later in-place update of the buffers must not invalidate this graph.
            z_s, z_t = self.z_s.clone(), self.z_t.clone()
            self._update(self.memory_s, indices, e_s)
            self._update(self.memory_t, indices, e_t)
        return scores_s / z_s, scores_t / z_t

    def _update(self, memory: Tensor, indices: Tensor, embeddings: Tensor) -> None:
        mixed = memory[indices] * self.momentum + embeddings * (1.0 - self.momentum)
        memory.index_copy_(0, indices, F.normalize(mixed, dim=1))
