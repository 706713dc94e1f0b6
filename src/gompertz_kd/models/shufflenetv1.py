"""ShuffleNetV1 (groups 3) for CIFAR, as in CRD/RepDistiller `models/ShuffleNetv1.py` (`ShuffleV1`).

A 1x1 stem with no downsampling, then three stages (240, 480, 960 channels) whose first block
halves the resolution and concatenates an average-pooled shortcut.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gompertz_kd.models.output import StagedClassifier, run_stage


def channel_shuffle(x: Tensor, groups: int) -> Tensor:
    """(N, C, H, W) -> (N, C, H, W) with channels reordered [g, C/g] -> [C/g, g]."""
    n, c, h, w = x.shape
    return x.reshape(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


class Bottleneck(nn.Module):
    """Grouped 1x1 -> shuffle -> depthwise 3x3 (stride) -> grouped 1x1, then add or concat.

    (N, in_planes, H, W) -> (N, out_planes, H, W) at stride 1, or
    (N, in_planes + out_planes, H/2, W/2) at stride 2 (the shortcut is concatenated).
    """

    def __init__(self, in_planes: int, out_planes: int, stride: int, groups: int) -> None:
        super().__init__()
        self.stride = stride
        mid_planes = out_planes // 4
        # The 24-channel stem output is too narrow to split into groups.
        self.first_groups = 1 if in_planes == 24 else groups
        self.conv1 = nn.Conv2d(in_planes, mid_planes, 1, groups=self.first_groups, bias=False)
        self.bn1 = nn.BatchNorm2d(mid_planes)
        self.conv2 = nn.Conv2d(
            mid_planes, mid_planes, 3, stride=stride, padding=1, groups=mid_planes, bias=False
        )
        self.bn2 = nn.BatchNorm2d(mid_planes)
        self.conv3 = nn.Conv2d(mid_planes, out_planes, 1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.shortcut = nn.AvgPool2d(3, stride=2, padding=1) if stride == 2 else nn.Identity()

    def preact(self, x: Tensor) -> Tensor:
        """The block's output before its final ReLU."""
        out = F.relu(self.bn1(self.conv1(x)))
        out = channel_shuffle(out, self.first_groups)
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        shortcut = self.shortcut(x)
        return torch.cat([out, shortcut], 1) if self.stride == 2 else out + shortcut

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.preact(x))


class ShuffleNetV1(StagedClassifier):
    """ShuffleNetV1 for 32x32 images.

    Args:
        out_planes: output channels of the three stages, (240, 480, 960) for groups 3.
        num_blocks: blocks per stage, (4, 8, 4).
        groups: group count of the 1x1 convs.
        num_classes: K.

    `forward_stages` features (32x32 input), post-ReLU: stem (24, 32, 32), stages (240, 16, 16),
    (480, 8, 8), (960, 4, 4); pooled (N, 960). Pre-activation maps: the stem's, then each
    stage's last block before its final ReLU.
    """

    def __init__(
        self,
        out_planes: tuple[int, int, int],
        num_blocks: tuple[int, int, int],
        groups: int,
        num_classes: int,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.in_planes = 24
        self.conv1 = nn.Conv2d(3, 24, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        self.layer1 = self._make_layer(out_planes[0], num_blocks[0], groups)
        self.layer2 = self._make_layer(out_planes[1], num_blocks[1], groups)
        self.layer3 = self._make_layer(out_planes[2], num_blocks[2], groups)
        self.linear = nn.Linear(out_planes[2], num_classes)
        # The zoo keeps PyTorch's default initialisation for ShuffleNets.

    def _make_layer(self, out_planes: int, num_blocks: int, groups: int) -> nn.Sequential:
        # The first block concatenates its input, so its own branch makes only the difference.
        layers = [Bottleneck(self.in_planes, out_planes - self.in_planes, stride=2, groups=groups)]
        layers += [
            Bottleneck(out_planes, out_planes, stride=1, groups=groups)
            for _ in range(1, num_blocks)
        ]
        self.in_planes = out_planes
        return nn.Sequential(*layers)

    def get_classifier(self) -> nn.Module:
        return self.linear

    def preact_batchnorms(self) -> list[nn.BatchNorm2d]:
        return [self.layer1[-1].bn3, self.layer2[-1].bn3, self.layer3[-1].bn3]

    def forward_stage_maps(self, x: Tensor) -> tuple[list[Tensor], Tensor, list[Tensor]]:
        """(N, 3, 32, 32) -> ([stem, stage1..stage3] maps, stage3 map (N, 960, 4, 4),
        pre-activation maps)."""
        f0 = F.relu(self.bn1(self.conv1(x)))
        f1, p1 = run_stage(self.layer1, f0)
        f2, p2 = run_stage(self.layer2, f1)
        f3, p3 = run_stage(self.layer3, f2)
        return [f0, f1, f2, f3], f3, [f0, p1, p2, p3]


def shufflenet_v1(num_classes: int) -> ShuffleNetV1:
    """The benchmark's `ShuffleV1`: groups 3, stages (240, 480, 960) x (4, 8, 4) blocks."""
    return ShuffleNetV1((240, 480, 960), (4, 8, 4), groups=3, num_classes=num_classes)
