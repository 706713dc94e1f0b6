"""MobileNetV2 of the KD benchmark: width 0.5, expansion 6 (RepDistiller's `mobile_half`).

As in CRD/RepDistiller `models/mobilenetv2.py`: a stride-2 3x3 stem, seven stages of inverted
residual blocks (`blocks.0`..`blocks.6`), a 1x1 conv to 1280 channels (`conv2`) and
`classifier.0`. Attribute names match published checkpoints.
"""

from __future__ import annotations

from torch import Tensor, nn

from gompertz_kd.models.output import StagedClassifier


def _conv_bn_relu(
    in_channels: int, out_channels: int, kernel_size: int, stride: int
) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, stride, kernel_size // 2, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class InvertedResidual(nn.Module):
    """1x1 expand -> 3x3 depthwise (stride) -> 1x1 linear projection, residual when shapes match.

    (N, in_channels, H, W) -> (N, out_channels, H / stride, W / stride). The expansion conv is
    kept even at expand_ratio 1, as in the zoo (its checkpoints have weights for it).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden = in_channels * expand_ratio
        self.use_residual = stride == 1 and in_channels == out_channels
        self.conv = nn.Sequential(
            nn.Conv2d(in_channels, hidden, 1, 1, 0, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, out_channels, 1, 1, 0, bias=False),
            nn.BatchNorm2d(out_channels),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv(x) if self.use_residual else self.conv(x)


# (expansion, channels at width 1, blocks, first stride) per stage; expansion None -> `expansion`.
_STAGES: list[tuple[int | None, int, int, int]] = [
    (1, 16, 1, 1),
    (None, 24, 2, 1),
    (None, 32, 3, 2),
    (None, 64, 4, 2),
    (None, 96, 3, 1),
    (None, 160, 3, 2),
    (None, 320, 1, 1),
]


class MobileNetV2(StagedClassifier):
    """MobileNetV2 for 32x32 images.

    Args:
        num_classes: K.
        expansion: expansion ratio T of the inverted residual blocks (6 in the benchmark).
        width_mult: channel multiplier (0.5 in the benchmark).

    `forward_stages` features (32x32 input, T=6, width 0.5): stem (16, 16, 16) post-ReLU, then the
    outputs of blocks 1, 2, 4 and 6: (12, 16, 16), (16, 8, 8), (48, 4, 4), (160, 2, 2). Those four
    are linear-bottleneck outputs (no ReLU), exactly what the zoo returns. pooled (N, 1280) is
    after `conv2`'s ReLU. The pre-activation maps are the same tensors: no ReLU follows a
    linear bottleneck.
    """

    def __init__(self, num_classes: int, expansion: int = 6, width_mult: float = 0.5) -> None:
        super().__init__()
        self.num_classes = num_classes
        in_channels = int(32 * width_mult)
        self.conv1 = _conv_bn_relu(3, in_channels, 3, stride=2)

        self.blocks = nn.ModuleList()
        for stage_expansion, channels, num_blocks, stride in _STAGES:
            out_channels = int(channels * width_mult)
            layers = []
            for block_stride in [stride] + [1] * (num_blocks - 1):
                ratio = expansion if stage_expansion is None else stage_expansion
                layers.append(InvertedResidual(in_channels, out_channels, block_stride, ratio))
                in_channels = out_channels
            self.blocks.append(nn.Sequential(*layers))

        last_channels = int(1280 * width_mult) if width_mult > 1.0 else 1280
        self.conv2 = _conv_bn_relu(in_channels, last_channels, 1, stride=1)
        self.classifier = nn.Sequential(nn.Linear(last_channels, num_classes))

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.01)
                nn.init.zeros_(m.bias)

    def get_classifier(self) -> nn.Module:
        return self.classifier

    def preact_batchnorms(self) -> list[nn.BatchNorm2d]:
        return [self.blocks[i][-1].conv[-1] for i in (1, 2, 4, 6)]

    def forward_stage_maps(self, x: Tensor) -> tuple[list[Tensor], Tensor, list[Tensor]]:
        """(N, 3, 32, 32) -> ([stem, block1, block2, block4, block6] maps, conv2 map
        (N, 1280, 2, 2), the same maps as pre-activation maps)."""
        f0 = self.conv1(x)
        f1 = self.blocks[1](self.blocks[0](f0))
        f2 = self.blocks[2](f1)
        f3 = self.blocks[4](self.blocks[3](f2))
        f4 = self.blocks[6](self.blocks[5](f3))
        features = [f0, f1, f2, f3, f4]
        return features, self.conv2(f4), list(features)


def mobilenetv2_half(num_classes: int) -> MobileNetV2:
    """The benchmark's MobileNetV2 (`mobile_half`): expansion 6, width 0.5."""
    return MobileNetV2(num_classes, expansion=6, width_mult=0.5)
