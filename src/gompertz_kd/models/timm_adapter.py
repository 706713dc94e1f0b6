"""Any timm model as a 32x32 classifier with `forward_stages`.

ImageNet stems shrink the input by 4 before the first stage (a stride-2 conv and a stride-2
max-pool, or a stride-4 patchify conv); on a 32x32 CIFAR image that leaves 8x8 maps before any
real work. `create_timm_model` therefore swaps the stem conv for a 3x3 stride-1 conv and the stem
max-pool for `nn.Identity`, the same change that turns torchvision's ResNet into the CIFAR one.
"""

from __future__ import annotations

from typing import Any

import timm
from torch import Tensor, nn

from gompertz_kd.models.output import StageOutput


class TimmClassifier(nn.Module):
    """A timm model exposing the `gompertz_kd.models` interface.

    `forward`, `forward_features` and `forward_head` delegate to the wrapped model;
    `forward_stages` uses timm's `forward_intermediates`, so `features` are the outputs of the
    stages in `model.feature_info` (shallow to deep, (N, C_i, H_i, W_i)). The wrapped model's
    state_dict keys are prefixed with `model.`.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.num_classes: int = model.num_classes

    def get_classifier(self) -> nn.Module:
        return self.model.get_classifier()

    def forward_features(self, x: Tensor) -> Tensor:
        """(N, 3, H, W) -> final unpooled features (N, D, h, w) (or tokens for transformers)."""
        return self.model.forward_features(x)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """Final features -> (N, D) pooled embedding if `pre_logits`, else (N, K) logits."""
        return self.model.forward_head(x, pre_logits=pre_logits)

    def forward(self, x: Tensor) -> Tensor:
        """(N, 3, H, W) -> logits (N, num_classes)."""
        return self.model(x)

    def forward_stages(self, x: Tensor) -> StageOutput:
        """(N, 3, H, W) -> `StageOutput` (logits, stage features, pooled) from one backbone pass."""
        final, features = self.model.forward_intermediates(x)
        pooled = self.model.forward_head(final, pre_logits=True)
        # The head is run twice rather than applying the classifier to `pooled`: some timm heads
        # (e.g. MobileNetV3) apply dropout after the pre-logits point, others before it.
        logits = self.model.forward_head(final)
        return StageOutput(logits=logits, features=list(features), pooled=pooled)


def adapt_stem_to_32x32(model: nn.Module) -> None:
    """Make a timm model's stem keep full resolution, in place.

    The conv named by `model.pretrained_cfg["first_conv"]` becomes a 3x3 stride-1 padding-1
    conv with the same in/out channels and bias setting; any `nn.MaxPool2d` between it and the
    first stage at reduction >= 4 (per `model.feature_info`) becomes `nn.Identity`.

    Raises:
        ValueError: the model names no first conv, or it is not an `nn.Conv2d`.
    """
    stem_name = model.pretrained_cfg.get("first_conv")
    stem = model.get_submodule(stem_name) if stem_name else None
    if not isinstance(stem, nn.Conv2d):
        raise ValueError(
            f"cannot adapt the stem of {type(model).__name__}: pretrained_cfg['first_conv'] is "
            f"{stem_name!r}, which is not an nn.Conv2d; pass adapt_stem=False"
        )
    new_stem = nn.Conv2d(
        stem.in_channels,
        stem.out_channels,
        kernel_size=3,
        stride=1,
        padding=1,
        bias=stem.bias is not None,
        device=stem.weight.device,
        dtype=stem.weight.dtype,
    )
    nn.init.kaiming_normal_(new_stem.weight, mode="fan_out", nonlinearity="relu")
    if new_stem.bias is not None:
        nn.init.zeros_(new_stem.bias)
    model.set_submodule(stem_name, new_stem)

    # A stride-1 stem (e.g. VGG) has no stem pooling to undo.
    if stem.stride == (1, 1):
        return
    names = [name for name, _ in model.named_modules()]
    first_stage = next(
        (info["module"] for info in getattr(model, "feature_info", []) if info["reduction"] >= 4),
        None,
    )
    end = names.index(first_stage) if first_stage in names else len(names)
    start = names.index(stem_name)
    for name in names[start + 1 : end]:
        if isinstance(model.get_submodule(name), nn.MaxPool2d):
            model.set_submodule(name, nn.Identity())


def create_timm_model(
    name: str,
    num_classes: int,
    *,
    pretrained: bool = False,
    adapt_stem: bool = True,
    **kwargs: Any,
) -> TimmClassifier:
    """`timm.create_model(name, pretrained=..., num_classes=..., **kwargs)`, adapted to 32x32.

    Args:
        name: a timm model name, e.g. "resnet18".
        num_classes: K.
        pretrained: passed to timm (needs the weights locally or network access). The adapted
            stem conv is freshly initialised either way.
        adapt_stem: replace the stem as described in `adapt_stem_to_32x32`; turn off for models
            whose first conv must keep its stride (e.g. ViT patch embeddings).
        **kwargs: passed to `timm.create_model`.

    Raises:
        ValueError: `name` is not a timm model, or the stem cannot be adapted.
    """
    if not timm.is_model(name):
        raise ValueError(
            f"unknown timm model {name!r}; see timm.list_models() for the available names"
        )
    model = timm.create_model(name, pretrained=pretrained, num_classes=num_classes, **kwargs)
    if adapt_stem:
        adapt_stem_to_32x32(model)
    return TimmClassifier(model)
