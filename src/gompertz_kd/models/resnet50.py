"""ResNet50 for CIFAR, as in CRD/RepDistiller `models/resnetv2.py`.

The ImageNet bottleneck network with a 3x3 stride-1 stem and no max-pool, so a 32x32 image
keeps 32x32 maps through stage 1. Attribute names match published checkpoints.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from gompertz_kd.models.output import StagedClassifier, run_stage


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (stride) -> 1x1 (x4 channels) residual block, ReLU after the sum.

    (N, in_planes, H, W) -> (N, 4 * planes, H / stride, W / stride).
    """

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        out_planes = self.expansion * planes
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_planes, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        # An empty Sequential is the identity; the checkpoints have no keys for it.
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != out_planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(out_planes),
            )

    def preact(self, x: Tensor) -> Tensor:
        """The block's output before its final ReLU: ``bn3(...) + shortcut(x)``."""
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return out + self.shortcut(x)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.preact(x))


class BottleneckResNet(StagedClassifier):
    """Bottleneck ResNet with a CIFAR stem (3x3 stride-1 conv, no max-pool).

    Args:
        num_blocks: blocks per stage, (3, 4, 6, 3) for ResNet50.
        num_classes: K.

    `forward_stages` features (32x32 input): stem (64, 32, 32), stage1 (256, 32, 32),
    stage2 (512, 16, 16), stage3 (1024, 8, 8), stage4 (2048, 4, 4), all post-ReLU;
    pooled (N, 2048). Pre-activation maps: the stem's, then each stage's last block before its
    final ReLU.
    """

    def __init__(self, num_blocks: tuple[int, int, int, int], num_classes: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.in_planes = 64

        self.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.layer1 = self._make_layer(64, num_blocks[0], stride=1)
        self.layer2 = self._make_layer(128, num_blocks[1], stride=2)
        self.layer3 = self._make_layer(256, num_blocks[2], stride=2)
        self.layer4 = self._make_layer(512, num_blocks[3], stride=2)
        self.linear = nn.Linear(512 * Bottleneck.expansion, num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _make_layer(self, planes: int, num_blocks: int, stride: int) -> nn.Sequential:
        layers = []
        for block_stride in [stride] + [1] * (num_blocks - 1):
            layers.append(Bottleneck(self.in_planes, planes, block_stride))
            self.in_planes = planes * Bottleneck.expansion
        return nn.Sequential(*layers)

    def get_classifier(self) -> nn.Module:
        return self.linear

    def preact_batchnorms(self) -> list[nn.BatchNorm2d]:
        return [layer[-1].bn3 for layer in (self.layer1, self.layer2, self.layer3, self.layer4)]

    def forward_stage_maps(self, x: Tensor) -> tuple[list[Tensor], Tensor, list[Tensor]]:
        """(N, 3, 32, 32) -> ([stem, stage1..stage4] maps, stage4 map (N, 2048, 4, 4),
        pre-activation maps)."""
        f0 = F.relu(self.bn1(self.conv1(x)))
        f1, p1 = run_stage(self.layer1, f0)
        f2, p2 = run_stage(self.layer2, f1)
        f3, p3 = run_stage(self.layer3, f2)
        f4, p4 = run_stage(self.layer4, f3)
        return [f0, f1, f2, f3, f4], f4, [f0, p1, p2, p3, p4]


def resnet50(num_classes: int) -> BottleneckResNet:
    return BottleneckResNet((3, 4, 6, 3), num_classes)
