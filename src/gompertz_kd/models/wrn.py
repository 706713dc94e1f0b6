"""Wide ResNets of the KD benchmark: wrn_16_1, wrn_16_2, wrn_40_1, wrn_40_2.

Pre-activation blocks, as in CRD/RepDistiller `models/wrn.py` (attribute names such as
`block1.layer.0.convShortcut` match published checkpoints). WRN-d-k: depth 6n+4, widths
(16, 16k, 32k, 64k).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from gompertz_kd.models.output import StagedClassifier


class BasicBlock(nn.Module):
    """Pre-activation block: conv2(relu(bn2(conv1(relu(bn1(x)))))) + shortcut.

    (N, in_planes, H, W) -> (N, out_planes, H / stride, W / stride). When the width changes
    the shortcut is a 1x1 conv applied to the activated input, as in the original WRN.
    """

    def __init__(
        self, in_planes: int, out_planes: int, stride: int, drop_rate: float = 0.0
    ) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, stride=1, padding=1, bias=False)
        self.drop_rate = drop_rate
        self.equal_in_out = in_planes == out_planes
        self.convShortcut = (
            None
            if self.equal_in_out
            else nn.Conv2d(in_planes, out_planes, 1, stride=stride, padding=0, bias=False)
        )

    def forward(self, x: Tensor) -> Tensor:
        activated = self.relu1(self.bn1(x))
        out = self.relu2(self.bn2(self.conv1(activated)))
        if self.drop_rate > 0:
            out = F.dropout(out, p=self.drop_rate, training=self.training)
        out = self.conv2(out)
        shortcut = x if self.convShortcut is None else self.convShortcut(activated)
        return shortcut + out


class NetworkBlock(nn.Module):
    """One stage: `num_layers` blocks, the first one changing width and stride."""

    def __init__(
        self, num_layers: int, in_planes: int, out_planes: int, stride: int, drop_rate: float
    ) -> None:
        super().__init__()
        first = BasicBlock(in_planes, out_planes, stride, drop_rate)
        rest = [BasicBlock(out_planes, out_planes, 1, drop_rate) for _ in range(1, num_layers)]
        self.layer = nn.Sequential(first, *rest)

    def forward(self, x: Tensor) -> Tensor:
        return self.layer(x)


class WideResNet(StagedClassifier):
    """WRN-depth-widen_factor for 32x32 images.

    Args:
        depth: 6n + 4 (16, 40, ...).
        widen_factor: k.
        num_classes: K.
        drop_rate: dropout between the two convs of each block (0 in the benchmark).

    `forward_stages` features (32x32 input), as the zoo returns them: the stem conv output
    (16, 32, 32) and the three stage outputs (16k, 32, 32), (32k, 16, 16), (64k, 8, 8). These
    are pre-activation (not ReLU'd): the next BN-ReLU lives in the following block / the head.
    pooled (N, 64k) is after the final BN-ReLU. The pre-activation maps are the same tensors.
    """

    def __init__(
        self, depth: int, widen_factor: int, num_classes: int, drop_rate: float = 0.0
    ) -> None:
        super().__init__()
        if (depth - 4) % 6 != 0:
            raise ValueError(f"WideResNet depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        channels = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.num_classes = num_classes

        self.conv1 = nn.Conv2d(3, channels[0], kernel_size=3, stride=1, padding=1, bias=False)
        self.block1 = NetworkBlock(n, channels[0], channels[1], 1, drop_rate)
        self.block2 = NetworkBlock(n, channels[1], channels[2], 2, drop_rate)
        self.block3 = NetworkBlock(n, channels[2], channels[3], 2, drop_rate)
        self.bn1 = nn.BatchNorm2d(channels[3])
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(channels[3], num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def get_classifier(self) -> nn.Module:
        return self.fc

    def preact_batchnorms(self) -> list[nn.BatchNorm2d]:
        # the BN that the next block (or the head) applies to each stage map before its ReLU
        return [self.block2.layer[0].bn1, self.block3.layer[0].bn1, self.bn1]

    def forward_stage_maps(self, x: Tensor) -> tuple[list[Tensor], Tensor, list[Tensor]]:
        """(N, 3, 32, 32) -> ([stem, stage1..stage3] maps, relu(bn1(stage3)) (N, 64k, 8, 8),
        the same maps as pre-activation maps)."""
        f0 = self.conv1(x)
        f1 = self.block1(f0)
        f2 = self.block2(f1)
        f3 = self.block3(f2)
        final = self.relu(self.bn1(f3))
        features = [f0, f1, f2, f3]
        return features, final, list(features)


def wrn_16_1(num_classes: int, drop_rate: float = 0.0) -> WideResNet:
    return WideResNet(16, 1, num_classes, drop_rate)


def wrn_16_2(num_classes: int, drop_rate: float = 0.0) -> WideResNet:
    return WideResNet(16, 2, num_classes, drop_rate)


def wrn_40_1(num_classes: int, drop_rate: float = 0.0) -> WideResNet:
    return WideResNet(40, 1, num_classes, drop_rate)


def wrn_40_2(num_classes: int, drop_rate: float = 0.0) -> WideResNet:
    return WideResNet(40, 2, num_classes, drop_rate)
