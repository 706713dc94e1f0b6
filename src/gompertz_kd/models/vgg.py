"""VGG-BN for CIFAR as in CRD/RepDistiller `models/vgg.py`: vgg8, vgg11, vgg13, vgg16, vgg19.

No fully connected layers: five conv blocks (`block0`..`block4`), max-pools between the first
four, global average pool, one linear layer (`classifier`). These are the zoo's `*_bn`
variants (the benchmark always uses BatchNorm).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from gompertz_kd.models.output import StagedClassifier

# Output channels of each conv, per block.
_CONFIGS: dict[str, list[list[int]]] = {
    "vgg8": [[64], [128], [256], [512], [512]],
    "vgg11": [[64], [128], [256, 256], [512, 512], [512, 512]],
    "vgg13": [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
    "vgg16": [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]],
    "vgg19": [[64, 64], [128, 128], [256] * 4, [512] * 4, [512] * 4],
}


def _make_block(channels: list[int], in_channels: int) -> nn.Sequential:
    """conv-BN-ReLU repeated, ending on the last BN: the block's ReLU is applied by the caller
    so that the zoo's pre-activation tensor exists (keeps the checkpoint's module indices)."""
    layers: list[nn.Module] = []
    for out_channels in channels:
        layers += [
            nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        ]
        in_channels = out_channels
    return nn.Sequential(*layers[:-1])


class VGG(StagedClassifier):
    """VGG-BN with a single linear classifier.

    Args:
        channels: output channels of each conv, per block (five blocks).
        num_classes: K.

    `forward_stages` features (32x32 input), post-ReLU: (64, 32, 32), (128, 16, 16),
    (256, 8, 8), (512, 4, 4), (512, 4, 4); pooled (N, 512). Pre-activation maps: block0's
    post-ReLU map, then blocks 1-4 before their last ReLU. As in the zoo, a 64x64 input is
    pooled once more before block4 so that block4 still sees 4x4 maps.
    """

    def __init__(self, channels: list[list[int]], num_classes: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.block0 = _make_block(channels[0], 3)
        self.block1 = _make_block(channels[1], channels[0][-1])
        self.block2 = _make_block(channels[2], channels[1][-1])
        self.block3 = _make_block(channels[3], channels[2][-1])
        self.block4 = _make_block(channels[4], channels[3][-1])
        self.pool0 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool1 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool2 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool3 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.classifier = nn.Linear(channels[4][-1], num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.01)
                nn.init.zeros_(m.bias)

    def get_classifier(self) -> nn.Module:
        return self.classifier

    def preact_batchnorms(self) -> list[nn.BatchNorm2d]:
        return [self.block1[-1], self.block2[-1], self.block3[-1], self.block4[-1]]

    def forward_stage_maps(self, x: Tensor) -> tuple[list[Tensor], Tensor, list[Tensor]]:
        """(N, 3, 32, 32) -> ([block0..block4] maps, block4 map (N, 512, 4, 4), pre-activation
        maps)."""
        height = x.shape[2]
        f0 = F.relu(self.block0(x))
        p1 = self.block1(self.pool0(f0))
        f1 = F.relu(p1)
        p2 = self.block2(self.pool1(f1))
        f2 = F.relu(p2)
        p3 = self.block3(self.pool2(f2))
        f3 = F.relu(p3)
        p4 = self.block4(self.pool3(f3) if height == 64 else f3)
        f4 = F.relu(p4)
        return [f0, f1, f2, f3, f4], f4, [f0, p1, p2, p3, p4]


def vgg8(num_classes: int) -> VGG:
    return VGG(_CONFIGS["vgg8"], num_classes)


def vgg11(num_classes: int) -> VGG:
    return VGG(_CONFIGS["vgg11"], num_classes)


def vgg13(num_classes: int) -> VGG:
    return VGG(_CONFIGS["vgg13"], num_classes)


def vgg16(num_classes: int) -> VGG:
    return VGG(_CONFIGS["vgg16"], num_classes)


def vgg19(num_classes: int) -> VGG:
    return VGG(_CONFIGS["vgg19"], num_classes)
