"""CIFAR ResNets of the KD benchmark: resnet8..110 (16-32-64 channels) and resnet8x4/32x4.

Layer structure and attribute names follow CRD/RepDistiller `models/resnet.py`, so published
teacher checkpoints load with `strict=True`. Depth 6n+2: a 3x3 stem, then three stages of n
basic blocks at 32x32, 16x16 and 8x8 (for a 32x32 input).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from gompertz_kd.models.output import StagedClassifier, run_stage


def _conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """Post-activation residual block: relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x)).

    (N, in_planes, H, W) -> (N, planes, H / stride, W / stride).
    """

    def __init__(
        self, in_planes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None
    ) -> None:
        super().__init__()
        self.conv1 = _conv3x3(in_planes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def preact(self, x: Tensor) -> Tensor:
        """The block's output before its final ReLU: ``bn2(...) + shortcut(x)``."""
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return out + shortcut

    def forward(self, x: Tensor) -> Tensor:
        # Not in place: x may be a stage feature the caller keeps.
        return F.relu(self.preact(x))


class CifarResNet(StagedClassifier):
    """ResNet-(6n+2) for 32x32 images.

    Args:
        depth: 6n + 2 (8, 14, 20, 32, 44, 56, 110).
        num_filters: channels of (stem, stage1, stage2, stage3), e.g. (16, 16, 32, 64).
        num_classes: K.

    `forward_stages` features (32x32 input): stem (C0, 32, 32), stage1 (C1, 32, 32),
    stage2 (C2, 16, 16), stage3 (C3, 8, 8), all post-ReLU; pooled (N, C3). Pre-activation maps:
    the stem's, then each stage's last block before its final ReLU.
    """

    def __init__(
        self, depth: int, num_filters: tuple[int, int, int, int], num_classes: int
    ) -> None:
        super().__init__()
        if (depth - 2) % 6 != 0:
            raise ValueError(f"CifarResNet depth must be 6n+2, got {depth}")
        blocks_per_stage = (depth - 2) // 6
        self.num_classes = num_classes
        self.in_planes = num_filters[0]

        self.conv1 = nn.Conv2d(3, num_filters[0], kernel_size=3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(num_filters[0])
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(num_filters[1], blocks_per_stage, stride=1)
        self.layer2 = self._make_layer(num_filters[2], blocks_per_stage, stride=2)
        self.layer3 = self._make_layer(num_filters[3], blocks_per_stage, stride=2)
        self.fc = nn.Linear(num_filters[3], num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _make_layer(self, planes: int, num_blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.in_planes != planes:
            downsample = nn.Sequential(
                nn.Conv2d(self.in_planes, planes, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )
        layers = [BasicBlock(self.in_planes, planes, stride, downsample)]
        self.in_planes = planes
        layers += [BasicBlock(planes, planes) for _ in range(1, num_blocks)]
        return nn.Sequential(*layers)

    def get_classifier(self) -> nn.Module:
        return self.fc

    def preact_batchnorms(self) -> list[nn.BatchNorm2d]:
        return [self.layer1[-1].bn2, self.layer2[-1].bn2, self.layer3[-1].bn2]

    def forward_stage_maps(self, x: Tensor) -> tuple[list[Tensor], Tensor, list[Tensor]]:
        """(N, 3, 32, 32) -> ([stem, stage1, stage2, stage3] maps, stage3 map (N, C3, 8, 8),
        pre-activation maps)."""
        f0 = self.relu(self.bn1(self.conv1(x)))
        f1, p1 = run_stage(self.layer1, f0)
        f2, p2 = run_stage(self.layer2, f1)
        f3, p3 = run_stage(self.layer3, f2)
        return [f0, f1, f2, f3], f3, [f0, p1, p2, p3]


_NARROW = (16, 16, 32, 64)
_WIDE = (32, 64, 128, 256)


def resnet8(num_classes: int) -> CifarResNet:
    return CifarResNet(8, _NARROW, num_classes)


def resnet14(num_classes: int) -> CifarResNet:
    return CifarResNet(14, _NARROW, num_classes)


def resnet20(num_classes: int) -> CifarResNet:
    return CifarResNet(20, _NARROW, num_classes)


def resnet32(num_classes: int) -> CifarResNet:
    return CifarResNet(32, _NARROW, num_classes)


def resnet44(num_classes: int) -> CifarResNet:
    return CifarResNet(44, _NARROW, num_classes)


def resnet56(num_classes: int) -> CifarResNet:
    return CifarResNet(56, _NARROW, num_classes)


def resnet110(num_classes: int) -> CifarResNet:
    return CifarResNet(110, _NARROW, num_classes)


def resnet8x4(num_classes: int) -> CifarResNet:
    return CifarResNet(8, _WIDE, num_classes)


def resnet32x4(num_classes: int) -> CifarResNet:
    return CifarResNet(32, _WIDE, num_classes)
