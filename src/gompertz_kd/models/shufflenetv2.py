"""ShuffleNetV2 (1x) for CIFAR, as in CRD/RepDistiller `models/ShuffleNetv2.py` (`ShuffleV2`).

A 1x1 stem with no downsampling, three stages (116, 232, 464 channels) that each start with a
stride-2 `DownBlock`, then a 1x1 conv to 1024 channels (`conv2`) and `linear`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gompertz_kd.models.output import StagedClassifier
from gompertz_kd.models.shufflenetv1 import channel_shuffle


class BasicBlock(nn.Module):
    """Split channels in half, transform the second half, concat, shuffle.

    (N, C, H, W) -> (N, C, H, W).
    """

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        half = in_channels // 2
        self.conv1 = nn.Conv2d(half, half, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(half)
        self.conv2 = nn.Conv2d(half, half, kernel_size=3, padding=1, groups=half, bias=False)
        self.bn2 = nn.BatchNorm2d(half)
        self.conv3 = nn.Conv2d(half, half, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(half)

    def forward_with_preact(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(output, output with the transformed half taken before its ReLU)``, as the zoo's
        ``is_last`` block returns them."""
        half = x.shape[1] // 2
        kept, transformed = x[:, :half], x[:, half:]
        out = F.relu(self.bn1(self.conv1(transformed)))
        out = self.bn2(self.conv2(out))
        preact = self.bn3(self.conv3(out))
        output = channel_shuffle(torch.cat([kept, F.relu(preact)], 1), groups=2)
        return output, channel_shuffle(torch.cat([kept, preact], 1), groups=2)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_with_preact(x)[0]


class DownBlock(nn.Module):
    """Two stride-2 branches on the full input, concatenated and shuffled.

    (N, in_channels, H, W) -> (N, out_channels, H/2, W/2).
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        mid = out_channels // 2
        # left branch: depthwise 3x3 (stride 2) -> 1x1
        self.conv1 = nn.Conv2d(
            in_channels, in_channels, 3, stride=2, padding=1, groups=in_channels, bias=False
        )
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv2 = nn.Conv2d(in_channels, mid, kernel_size=1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        # right branch: 1x1 -> depthwise 3x3 (stride 2) -> 1x1
        self.conv3 = nn.Conv2d(in_channels, mid, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(mid)
        self.conv4 = nn.Conv2d(mid, mid, 3, stride=2, padding=1, groups=mid, bias=False)
        self.bn4 = nn.BatchNorm2d(mid)
        self.conv5 = nn.Conv2d(mid, mid, kernel_size=1, bias=False)
        self.bn5 = nn.BatchNorm2d(mid)

    def forward(self, x: Tensor) -> Tensor:
        left = self.bn1(self.conv1(x))
        left = F.relu(self.bn2(self.conv2(left)))
        right = F.relu(self.bn3(self.conv3(x)))
        right = self.bn4(self.conv4(right))
        right = F.relu(self.bn5(self.conv5(right)))
        return channel_shuffle(torch.cat([left, right], 1), groups=2)


class ShuffleNetV2(StagedClassifier):
    """ShuffleNetV2 for 32x32 images.

    Args:
        out_channels: channels of the three stages and of the last 1x1 conv,
            (116, 232, 464, 1024) at width 1.
        num_blocks: `BasicBlock`s per stage after its `DownBlock`, (3, 7, 3).
        num_classes: K.

    `forward_stages` features (32x32 input), post-ReLU: stem (24, 32, 32), stages (116, 16, 16),
    (232, 8, 8), (464, 4, 4); pooled (N, 1024) is after `conv2`'s BN-ReLU. Pre-activation maps:
    the stem's, then each stage's output with its last block's transformed half before its ReLU
    (no single BatchNorm precedes the whole map, so `preact_batchnorms` is not defined).
    """

    def __init__(
        self,
        out_channels: tuple[int, int, int, int],
        num_blocks: tuple[int, int, int],
        num_classes: int,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.conv1 = nn.Conv2d(3, 24, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        self.layer1 = self._make_layer(24, out_channels[0], num_blocks[0])
        self.layer2 = self._make_layer(out_channels[0], out_channels[1], num_blocks[1])
        self.layer3 = self._make_layer(out_channels[1], out_channels[2], num_blocks[2])
        self.conv2 = nn.Conv2d(out_channels[2], out_channels[3], kernel_size=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels[3])
        self.linear = nn.Linear(out_channels[3], num_classes)
        # The zoo keeps PyTorch's default initialisation for ShuffleNets.

    @staticmethod
    def _make_layer(in_channels: int, out_channels: int, num_blocks: int) -> nn.Sequential:
        blocks = [BasicBlock(out_channels) for _ in range(num_blocks)]
        return nn.Sequential(DownBlock(in_channels, out_channels), *blocks)

    def get_classifier(self) -> nn.Module:
        return self.linear

    @staticmethod
    def _run_stage(stage: nn.Sequential, x: Tensor) -> tuple[Tensor, Tensor]:
        for index in range(len(stage) - 1):
            x = stage[index](x)
        return stage[len(stage) - 1].forward_with_preact(x)

    def forward_stage_maps(self, x: Tensor) -> tuple[list[Tensor], Tensor, list[Tensor]]:
        """(N, 3, 32, 32) -> ([stem, stage1..stage3] maps, conv2 map (N, 1024, 4, 4),
        pre-activation maps)."""
        f0 = F.relu(self.bn1(self.conv1(x)))
        f1, p1 = self._run_stage(self.layer1, f0)
        f2, p2 = self._run_stage(self.layer2, f1)
        f3, p3 = self._run_stage(self.layer3, f2)
        return [f0, f1, f2, f3], F.relu(self.bn2(self.conv2(f3))), [f0, p1, p2, p3]


def shufflenet_v2(num_classes: int) -> ShuffleNetV2:
    """The benchmark's `ShuffleV2`: width 1, stages (116, 232, 464) x (3, 7, 3) blocks, 1024 head."""
    return ShuffleNetV2((116, 232, 464, 1024), (3, 7, 3), num_classes=num_classes)
