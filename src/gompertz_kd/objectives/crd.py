"""CRD: Tian et al., "Contrastive Representation Distillation" (ICLR 2020); reference
HobbitLong/RepDistiller ``crd/criterion.py``, ``crd/memory.py``.

Benchmark defaults: 128-d embeddings (a linear layer + L2 normalisation on each network's pooled
embedding), K = 16384 negatives from a momentum (0.5) memory bank with one slot per training
image, drawn among the images of the *other* classes (RepDistiller's default ``--mode exact``),
NCE temperature 0.07, weight 0.8, CE 1. It needs each image's training-set index (the data module
yields it when a term asks) and the size of the training set.

Choices: the reference draws the negatives in its data loader with numpy's global RNG; here they
are drawn from a generator seeded by ``(seed, step)``, so a resumed run draws exactly the negatives
it would have drawn (the banks, the NCE normalisers and the bank rows' labels are buffers, in
checkpoints). ``mode="exact"`` knows a bank row's class once its image has been in a batch (the
buffer ``labels``, ``-1`` before): a row not yet written holds its random initialisation, not an
embedding of its image, so it serves as a negative of any class, as an other-class row would.
``mode="uniform"`` draws over the whole training set (the noise distribution of the CRD paper's
NCE; about 1/classes of the negatives share the anchor's class), what gompertz_kd did before
``exact`` existed: set it to resume a CRD run checkpointed then (those checkpoints have no
``labels``). The default is ``exact`` (here and in ``conf/method/crd.yaml``) because the
benchmark's published CRD results were trained with it, and on a 10-class set ``uniform`` makes
a tenth of the "negatives" images of the anchor's own class. Its cost: a redraw round (a gather of
the ``N * K`` rows' labels, one device sync) for as long as any drawn row has the anchor's class,
about ``log(N * K) / log(classes)`` rounds.
"""

from __future__ import annotations

import torch
from torch import Tensor

from gompertz_kd import losses
from gompertz_kd.objectives.base import Need, Networks, Step, Term, positive

__all__ = ["CRD", "NEGATIVE_MODES"]

NEGATIVE_MODES = ("exact", "uniform")


class CRD(Term):
    """NCE between student and teacher embeddings against a memory bank of negatives.

    Args:
        feature_dim: width of the contrastive embeddings.
        num_negatives: ``K`` negatives per image.
        temperature: NCE temperature.
        momentum: memory-bank momentum.
        seed: seed of the negatives' draw (mixed with the step number).
        mode: ``"exact"``: negatives from the other classes only (the benchmark's); ``"uniform"``:
            from the whole training set.
    """

    needs = frozenset({Need.POOLED, Need.INDICES, Need.TARGETS, Need.PROGRESS})

    def __init__(
        self,
        feature_dim: int = 128,
        num_negatives: int = 16384,
        temperature: float = 0.07,
        momentum: float = 0.5,
        seed: int = 0,
        mode: str = "exact",
    ) -> None:
        super().__init__()
        if mode not in NEGATIVE_MODES:
            raise ValueError(f"mode must be one of {NEGATIVE_MODES}, got mode={mode!r}")
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got momentum={momentum}")
        self.feature_dim = int(feature_dim)
        self.num_negatives = int(positive("num_negatives", num_negatives))
        self.temperature = positive("temperature", temperature)
        self.momentum = float(momentum)
        self.seed = int(seed)
        self.mode = mode
        self.num_data: int | None = None

    def bind(self, networks: Networks) -> None:
        if networks.num_train_samples is None:
            raise ValueError(
                "CRD keeps one memory slot per training image, so it needs the training set's size: "
                "pass num_train_samples= to DistillationModule (the training command passes the data "
                "module's)"
            )
        self.num_data = int(networks.num_train_samples)
        self.embed_s = losses.Embed(networks.pooled_dim("student"), self.feature_dim)
        self.embed_t = losses.Embed(networks.pooled_dim("teacher"), self.feature_dim)
        self.memory = losses.ContrastMemory(
            self.feature_dim, self.num_data, self.num_negatives, self.temperature, self.momentum
        )
        if self.mode == "exact":
            self.register_buffer("labels", torch.full((self.num_data,), -1, dtype=torch.long))

    def negatives(self, targets: Tensor, step: int | None) -> Tensor:
        """``(N, K)`` bank indices for anchors of classes ``targets`` ``(N,)``, the same for the
        same ``(seed, step)``: in ``"exact"`` mode none of a row known to be of the anchor's
        class (:func:`gompertz_kd.losses.draw_negatives`)."""
        generator = torch.Generator(device=targets.device).manual_seed(
            self.seed * 1_000_003 + (step or 0)
        )
        labels = self.labels if self.mode == "exact" else None
        return losses.draw_negatives(self.num_data, self.num_negatives, generator, targets, labels)

    def forward(self, step: Step) -> Tensor:
        embedding_s = self.embed_s(step.student.pooled)
        embedding_t = self.embed_t(step.teacher.pooled)
        if self.mode == "exact":
            self.labels.index_copy_(0, step.indices, step.targets.to(self.labels.dtype))
        negatives = self.negatives(step.targets, step.step)
        scores_s, scores_t = self.memory(embedding_s, embedding_t, step.indices, negatives)
        return losses.crd_nce_loss(scores_s, self.num_data) + losses.crd_nce_loss(
            scores_t, self.num_data
        )
