"""One factory for every model: the CIFAR KD zoo by name, any timm model as `timm/<name>`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from gompertz_kd.models import mobilenetv2, resnet, resnet50, shufflenetv1, shufflenetv2, vgg, wrn
from gompertz_kd.models.timm_adapter import create_timm_model

TIMM_PREFIX = "timm/"

# Zoo names as the CRD/RepDistiller benchmark spells them -> builder(num_classes, **kwargs).
_ZOO: dict[str, Callable[..., nn.Module]] = {
    "resnet8": resnet.resnet8,
    "resnet14": resnet.resnet14,
    "resnet20": resnet.resnet20,
    "resnet32": resnet.resnet32,
    "resnet44": resnet.resnet44,
    "resnet56": resnet.resnet56,
    "resnet110": resnet.resnet110,
    "resnet8x4": resnet.resnet8x4,
    "resnet32x4": resnet.resnet32x4,
    "ResNet50": resnet50.resnet50,
    "wrn_16_1": wrn.wrn_16_1,
    "wrn_16_2": wrn.wrn_16_2,
    "wrn_40_1": wrn.wrn_40_1,
    "wrn_40_2": wrn.wrn_40_2,
    "vgg8": vgg.vgg8,
    "vgg11": vgg.vgg11,
    "vgg13": vgg.vgg13,
    "vgg16": vgg.vgg16,
    "vgg19": vgg.vgg19,
    "MobileNetV2": mobilenetv2.mobilenetv2_half,
    "ShuffleV1": shufflenetv1.shufflenet_v1,
    "ShuffleV2": shufflenetv2.shufflenet_v2,
}


def list_models() -> list[str]:
    """Names of the CIFAR zoo models (any `timm/<name>` is accepted besides these)."""
    return list(_ZOO)


def create_model(name: str, num_classes: int, **kwargs: Any) -> nn.Module:
    """Build a classifier `model(x) -> (N, num_classes)` that also has `forward_stages`.

    Args:
        name: a zoo name from `list_models()` (e.g. "resnet32x4", "ShuffleV1"), or
            "timm/<timm model name>" (e.g. "timm/resnet18"), whose stem is adapted to 32x32.
        num_classes: K >= 1.
        **kwargs: passed to the zoo builder (e.g. `drop_rate` for WRNs) or to
            `timm.create_model` (e.g. `pretrained`, `drop_rate`; plus `adapt_stem`).

    Raises:
        ValueError: unknown name, or num_classes < 1.
    """
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if name.startswith(TIMM_PREFIX):
        return create_timm_model(name[len(TIMM_PREFIX) :], num_classes, **kwargs)
    if name not in _ZOO:
        raise ValueError(
            f"unknown model {name!r}; valid zoo names: {', '.join(_ZOO)}; "
            f"or '{TIMM_PREFIX}<name>' for any timm model"
        )
    return _ZOO[name](num_classes, **kwargs)


def feature_shapes(
    model: nn.Module, input_size: tuple[int, int, int] = (3, 32, 32)
) -> list[tuple[int, int, int]]:
    """(C, H, W) of each `model.forward_stages(x).features` map for one image of `input_size`
    (one probe pass, see `stage_output_shapes`)."""
    return stage_output_shapes(model, input_size)[0]


def stage_output_shapes(
    model: nn.Module, input_size: tuple[int, int, int] = (3, 32, 32)
) -> tuple[list[tuple[int, int, int]], int]:
    """(C, H, W) of each `forward_stages(x).features` map and the width D of `pooled`, for one
    image of `input_size`.

    Runs one forward pass in eval mode (so BatchNorm statistics are untouched) without
    gradients, on the model's device and dtype, then restores every submodule's train/eval
    mode (per module, so e.g. a frozen BN inside a training model stays frozen).
    """
    parameter = next(model.parameters(), torch.empty(0))
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            out = model.forward_stages(parameter.new_zeros(1, *input_size))
    finally:
        for module, training in modes:
            module.training = training
    return [tuple(f.shape[1:]) for f in out.features], int(out.pooled.shape[1])
