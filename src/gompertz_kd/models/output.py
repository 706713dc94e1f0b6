"""What every model returns from `forward_stages`, and the small base the zoo models share.

Every model in `gompertz_kd.models` is a plain classifier (`model(x) -> logits`) laid out like a
timm model (`forward_head(forward_features(x))`), plus one method for distillation:

    out = model.forward_stages(x)    # one forward pass
    out.logits    # (N, K)
    out.features  # [(N, C_i, H_i, W_i), ...] stage feature maps, shallow to deep
    out.pooled    # (N, D) the embedding the classifier sees
    out.preact_features  # the stage maps before their last ReLU (OFD), or None

`model(x)` equals `model.forward_stages(x).logits`.
"""

from __future__ import annotations

from typing import NamedTuple

import torch.nn.functional as F
from torch import Tensor, nn


class StageOutput(NamedTuple):
    """Logits, stage features and pooled embedding from a single forward pass.

    Attributes:
        logits: (N, num_classes) classifier output, identical to `model(x)`.
        features: stage feature maps, shallow to deep, each (N, C_i, H_i, W_i). For the CIFAR zoo
            these are the tensors the benchmark's `model(x, is_feat=True)` returns, without its
            last (pooled) entry.
        pooled: (N, D) the globally pooled embedding fed to the classifier (the zoo's last
            `is_feat` entry).
        preact_features: the same maps taken before the ReLU that ends each stage (the
            benchmark's `is_feat=True, preact=True`), one per entry of `features` (the stem's
            is the post-ReLU stem map, as in the zoo); a map that has no ReLU after it is the
            same tensor as in `features`. `None` for models that do not define them (timm).
            They are tensors the forward computes anyway: no extra work, no extra parameters.
    """

    logits: Tensor
    features: list[Tensor]
    pooled: Tensor
    preact_features: list[Tensor] | None = None


class StagedClassifier(nn.Module):
    """Base of the CIFAR zoo models: a backbone that yields stage maps, then pool + linear.

    Subclasses implement `forward_stage_maps` and `get_classifier`, and, for OFD's teacher
    margins, `preact_batchnorms`; everything else follows.
    The head is a global average pool: at 32x32 input it is exactly the zoo's fixed-size
    `AvgPool2d(8)` / `avg_pool2d(x, 4)` / `AvgPool2d(2, ceil_mode=True)`, and it also accepts
    larger inputs instead of failing at the classifier.
    """

    num_classes: int

    def forward_stage_maps(self, x: Tensor) -> tuple[list[Tensor], Tensor, list[Tensor]]:
        """(N, 3, H, W) -> (stage feature maps, shallow to deep; final map (N, D, h, w) for the
        head; the stage maps before their last ReLU, see `StageOutput.preact_features`)."""
        raise NotImplementedError

    def preact_batchnorms(self) -> list[nn.BatchNorm2d]:
        """The BatchNorm whose output is (the residual branch of) each pre-activation stage map
        after the stem, one per `preact_features[1:]` entry: the benchmark's
        `get_bn_before_relu()`, from whose affine parameters OFD derives the teacher's margins.

        Raises:
            NotImplementedError: the model does not define them.
        """
        raise NotImplementedError(f"{type(self).__name__} does not define preact_batchnorms()")

    def get_classifier(self) -> nn.Module:
        """The final linear layer, (N, D) -> (N, num_classes)."""
        raise NotImplementedError

    def forward_features(self, x: Tensor) -> Tensor:
        """(N, 3, H, W) -> final unpooled feature map (N, D, h, w)."""
        return self.forward_stage_maps(x)[1]

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """(N, D, h, w) -> (N, D) pooled embedding if `pre_logits`, else (N, num_classes) logits."""
        pooled = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return pooled if pre_logits else self.get_classifier()(pooled)

    def forward(self, x: Tensor) -> Tensor:
        """(N, 3, H, W) -> logits (N, num_classes)."""
        return self.forward_head(self.forward_features(x))

    def forward_stages(self, x: Tensor) -> StageOutput:
        """(N, 3, H, W) -> `StageOutput` (logits, stage features, pooled) from one pass."""
        features, final, preact = self.forward_stage_maps(x)
        pooled = self.forward_head(final, pre_logits=True)
        return StageOutput(
            logits=self.get_classifier()(pooled),
            features=features,
            pooled=pooled,
            preact_features=preact,
        )


def run_stage(stage: nn.Sequential, x: Tensor) -> tuple[Tensor, Tensor]:
    """``(output, pre-activation)`` of a stage whose last block splits its forward as
    ``relu(block.preact(x))``: every block but the last runs as usual (indexing, not slicing,
    so that ``torch.fx`` sees the registered blocks)."""
    for index in range(len(stage) - 1):
        x = stage[index](x)
    preact = stage[len(stage) - 1].preact(x)
    return F.relu(preact), preact


class ForwardStages(nn.Module):
    """A module whose ``forward`` is ``model.forward_stages``: what ``torch.fx`` traces (the
    teacher's BatchNorm folding) and ``torch.func.functional_call`` runs (a second student pass
    on copied buffers, fused population members) when they need the staged forward."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> StageOutput:
        return self.model.forward_stages(x)
