"""OFD: Heo et al., "A Comprehensive Overhaul of Feature Distillation" (ICCV 2019); reference
megvii-research/mdistiller ``mdistiller/distillers/OFD.py``.

Benchmark defaults: every stage map after the stem, taken before its last ReLU (the models'
``preact_features``); a connector (1x1 conv + BN) from each student stage to the teacher's
channels; the teacher's target clipped below at a per-channel margin, the expected negative
response of the BatchNorm before that ReLU (:func:`gompertz_kd.losses.ofd_margin`); the partial
L2 distance, stage ``i`` of ``n`` weighted ``1 / 2^(n - 1 - i)``; weight 0.001, CE 1.

Choices: the margins are computed once, from the teacher's weights when the term is bound, and
kept as buffers (so checkpoints hold them). With different stage counts the deepest are paired,
the margins with them (mdistiller indexes the margins from the shallowest stage, the same for
its pairs of equal stage counts).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from gompertz_kd import losses
from gompertz_kd.objectives.base import Need, Networks, Step, Term, paired_stages

__all__ = ["OFD"]


class OFD(Term):
    """Partial L2 between connected student pre-ReLU maps and the teacher's, clipped at its
    margins (:func:`gompertz_kd.losses.ofd_loss`).

    Args:
        kernel_size: the connector convolution's kernel (1 in the benchmark).
    """

    needs = frozenset({Need.FEATURES})

    def __init__(self, kernel_size: int = 1) -> None:
        super().__init__()
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd and >= 1, got kernel_size={kernel_size}")
        self.kernel_size = int(kernel_size)
        self.pairs: list[tuple[int, int]] = []

    def bind(self, networks: Networks) -> None:
        shapes_s, shapes_t = networks.feature_shapes("student"), networks.feature_shapes("teacher")
        self.pairs = paired_stages(len(shapes_s), len(shapes_t))
        try:
            batchnorms = networks.teacher.preact_batchnorms()
        except (AttributeError, NotImplementedError) as error:
            raise ValueError(
                f"OFD needs the teacher's BatchNorm before each stage's ReLU "
                f"(preact_batchnorms()), which {type(networks.teacher).__name__} does not "
                "define; use a zoo teacher other than ShuffleV2"
            ) from error
        # preact_batchnorms() has one entry per stage after the stem: teacher stage t is t - 1
        self.connectors = nn.ModuleList(
            losses.OFDConnector(shapes_s[s][0], shapes_t[t][0], self.kernel_size)
            for s, t in self.pairs
        )
        for i, (_, t) in enumerate(self.pairs):
            bn = batchnorms[t - 1]
            with torch.no_grad():
                margin = losses.ofd_margin(bn.bias.detach().float(), bn.weight.detach().float())
            self.register_buffer(f"margin{i}", margin)

    def margins(self) -> list[Tensor]:
        """The teacher's margin ``(C_t,)`` of each stage pair."""
        return [getattr(self, f"margin{i}") for i in range(len(self.pairs))]

    def forward(self, step: Step) -> Tensor:
        preact_s, preact_t = step.student.preact_features, step.teacher.preact_features
        if preact_s is None or preact_t is None:
            raise ValueError("OFD needs both networks' pre-activation maps (preact_features)")
        n = len(self.pairs)
        total = []
        for i, (connector, margin, (s, t)) in enumerate(
            zip(self.connectors, self.margins(), self.pairs, strict=True)
        ):
            loss = losses.ofd_loss(connector(preact_s[s]), preact_t[t], margin)
            total.append(loss / 2 ** (n - 1 - i))
        return torch.stack(total).sum()
