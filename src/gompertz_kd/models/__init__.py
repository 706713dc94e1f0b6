"""Models: the CIFAR model zoo of the standard KD benchmark, plus any timm model.

    model = create_model("resnet32x4", num_classes=100)   # or "timm/resnet18"
    logits = model(x)                                      # (N, 100)
    out = model.forward_stages(x)                          # StageOutput(logits, features, pooled)

Zoo models load published CRD/RepDistiller and mdistiller teacher checkpoints
(`torch.load(f)["model"]`) with `load_state_dict(strict=True)`.
"""

from gompertz_kd.models.output import ForwardStages, StagedClassifier, StageOutput
from gompertz_kd.models.registry import create_model, feature_shapes, list_models
from gompertz_kd.models.timm_adapter import TimmClassifier, create_timm_model

__all__ = [
    "ForwardStages",
    "StageOutput",
    "StagedClassifier",
    "TimmClassifier",
    "create_model",
    "create_timm_model",
    "feature_shapes",
    "list_models",
]
