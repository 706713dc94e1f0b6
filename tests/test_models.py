"""gompertz_kd.models: the CIFAR zoo against the published layouts, and the timm adapter.

The zoo tests compare against `cifar_zoo_layouts.json` (state_dict keys/shapes/dtypes, parameter
counts, `is_feat` feature shapes and forward FLOPs of the CRD/RepDistiller models), never against
the models themselves.
"""

import copy
import json
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from gompertz_kd.models import (
    StageOutput,
    TimmClassifier,
    create_model,
    feature_shapes,
    list_models,
)

ZOO_NAMES = [
    "resnet8",
    "resnet14",
    "resnet20",
    "resnet32",
    "resnet44",
    "resnet56",
    "resnet110",
    "resnet8x4",
    "resnet32x4",
    "wrn_16_1",
    "wrn_16_2",
    "wrn_40_1",
    "wrn_40_2",
    "vgg8",
    "vgg11",
    "vgg13",
    "vgg16",
    "vgg19",
    "MobileNetV2",
    "ShuffleV1",
    "ShuffleV2",
    "ResNet50",
]
NUM_CLASSES = [10, 100]
ZOO_CASES = [(name, k) for name in ZOO_NAMES for k in NUM_CLASSES]


# The layouts of the benchmark zoo (RepDistiller / mdistiller), committed beside the tests.
FIXTURE_PATH = Path(__file__).parent / "fixtures" / "cifar_zoo_layouts.json"


@pytest.fixture(scope="module")
def layouts() -> dict:
    return json.loads(FIXTURE_PATH.read_text())


@pytest.fixture(scope="module", params=ZOO_CASES, ids=[f"{n}@{k}" for n, k in ZOO_CASES])
def zoo_case(request, layouts):
    """(model in eval mode, its fixture entry, num_classes), built once per case."""
    name, num_classes = request.param
    torch.manual_seed(0)
    model = create_model(name, num_classes).eval()
    return model, layouts[f"{name}@{num_classes}"], num_classes


def _fixture_state_dict(entry: dict) -> dict[str, torch.Tensor]:
    """Random tensors shaped like the published checkpoint (BN variances kept positive)."""
    state = {}
    for key, shape, dtype in entry["state_dict"]:
        if dtype == "int64":
            state[key] = torch.randint(0, 1000, shape, dtype=torch.int64)
        elif key.endswith("running_var"):
            state[key] = torch.rand(shape) + 0.5
        else:
            state[key] = torch.randn(shape, dtype=getattr(torch, dtype))
    return state


def test_list_models_is_the_zoo():
    assert sorted(list_models()) == sorted(ZOO_NAMES)


def test_fixture_covers_every_zoo_case(layouts):
    assert {f"{n}@{k}" for n, k in ZOO_CASES} <= set(layouts)


def test_state_dict_layout_matches_published_checkpoints(zoo_case):
    model, entry, _ = zoo_case
    got = [
        [k, list(v.shape), str(v.dtype).removeprefix("torch.")]
        for k, v in model.state_dict().items()
    ]
    assert [row[0] for row in got] == [row[0] for row in entry["state_dict"]]  # keys, in order
    assert got == entry["state_dict"]  # and shapes, dtypes
    assert sum(p.numel() for p in model.parameters()) == entry["num_params"]


def test_forward_stages_shapes_flops_and_logits(zoo_case):
    model, entry, num_classes = zoo_case
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        out = model.forward_stages(x)

    assert isinstance(out, StageOutput)
    shapes = [list(f.shape[1:]) for f in out.features] + [list(out.pooled.shape[1:])]
    assert shapes == entry["feature_shapes_is_feat"]
    assert all(f.shape[0] == 2 for f in out.features)
    assert out.logits.shape == (2, num_classes)
    # FlopCounterMode counts 2 x multiply-adds of convs and linears, like the fixture; pooling,
    # BN and ReLU are counted by neither, so the numbers agree exactly.
    assert counter.get_total_flops() == 2 * entry["forward_flops_per_image"]

    with torch.no_grad():
        logits = model(x)
    torch.testing.assert_close(logits, out.logits, rtol=0, atol=0)


def test_published_checkpoint_layout_loads_strict(zoo_case):
    model, entry, _ = zoo_case
    model = copy.deepcopy(model)
    state = _fixture_state_dict(entry)

    model.load_state_dict(state, strict=True)

    loaded = model.state_dict()
    for key, value in state.items():
        torch.testing.assert_close(loaded[key], value, rtol=0, atol=0)


# For each stage feature: is it post-ReLU in the zoo? (WRN returns pre-activation sums and
# the raw stem conv; MobileNetV2 returns linear-bottleneck outputs after its ReLU'd stem.)
POST_RELU = {
    "resnet8": [True] * 4,
    "ResNet50": [True] * 5,
    "vgg8": [True] * 5,
    "ShuffleV1": [True] * 4,
    "ShuffleV2": [True] * 4,
    "wrn_16_1": [False] * 4,
    "MobileNetV2": [True, False, False, False, False],
}


@pytest.mark.parametrize("name", list(POST_RELU))
def test_features_are_the_tensors_the_zoo_returns(name):
    model = create_model(name, 10).eval()
    with torch.no_grad():
        out = model.forward_stages(torch.randn(2, 3, 32, 32))
    assert [bool(f.min() >= 0) for f in out.features] == POST_RELU[name]
    assert out.pooled.min() >= 0  # every zoo embedding is pooled after a ReLU


@pytest.mark.parametrize("name", list(POST_RELU))
def test_preact_features_are_the_maps_before_each_stages_relu(name):
    """OFD's pre-activation maps: the stem as in `features`; a post-ReLU stage map is exactly
    the ReLU of its pre-activation map (which does go negative); a map with no ReLU after it
    is the same tensor."""
    model = create_model(name, 10).eval()
    with torch.no_grad():
        out = model.forward_stages(torch.randn(2, 3, 32, 32))
    assert len(out.preact_features) == len(out.features)
    torch.testing.assert_close(out.preact_features[0], out.features[0], rtol=0, atol=0)
    for post_relu, feature, preact in zip(
        POST_RELU[name][1:], out.features[1:], out.preact_features[1:], strict=True
    ):
        assert preact.shape == feature.shape
        if post_relu:
            torch.testing.assert_close(preact.relu(), feature, rtol=0, atol=0)
            if name != "ShuffleV2":  # half of its channels are passed through, post-ReLU
                assert preact.min() < 0
        else:
            assert preact is feature


@pytest.mark.parametrize("name", [n for n in POST_RELU if n != "ShuffleV2"])
def test_preact_batchnorms_one_per_stage_after_the_stem_of_its_width(name):
    model = create_model(name, 10)
    shapes = feature_shapes(model)
    bns = model.preact_batchnorms()
    assert all(isinstance(bn, nn.BatchNorm2d) for bn in bns)
    assert [bn.num_features for bn in bns] == [c for c, _, _ in shapes[1:]]
    names = {id(m) for m in model.modules()}
    assert all(id(bn) in names for bn in bns)  # the model's own layers, no new ones


def test_shufflev2_and_timm_models_say_they_have_no_preact_batchnorms():
    with pytest.raises(NotImplementedError, match="ShuffleNetV2"):
        create_model("ShuffleV2", 10).preact_batchnorms()
    out = create_model("timm/resnet18", 10).eval().forward_stages(torch.randn(1, 3, 32, 32))
    assert out.preact_features is None


def test_vgg_pools_once_more_at_64x64_like_the_zoo():
    model = create_model("vgg8", 10).eval()
    shapes = feature_shapes(model, (3, 64, 64))
    assert shapes == [(64, 64, 64), (128, 32, 32), (256, 16, 16), (512, 8, 8), (512, 4, 4)]


def test_stage_features_carry_gradients_to_the_stem():
    model = create_model("resnet8", 10)
    out = model.forward_stages(torch.randn(2, 3, 32, 32))
    out.features[1].sum().backward()
    assert model.conv1.weight.grad is not None and model.conv1.weight.grad.abs().sum() > 0
    assert model.fc.weight.grad is None  # the head is not on that path


def test_feature_shapes_dry_run_restores_mode_and_leaves_bn_stats(layouts):
    model = create_model("wrn_16_2", 100).train()
    model.block1.eval()  # e.g. a frozen part: its mode must survive too
    running_mean = model.bn1.running_mean.clone()

    shapes = feature_shapes(model)

    expected = [tuple(s) for s in layouts["wrn_16_2@100"]["feature_shapes_is_feat"][:-1]]
    assert shapes == expected
    assert model.training and model.block2.training and not model.block1.training
    torch.testing.assert_close(model.bn1.running_mean, running_mean, rtol=0, atol=0)
    assert feature_shapes(model.eval()) == expected and not model.training


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError) as info:
        create_model("resnet9000", 10)
    message = str(info.value)
    assert "resnet9000" in message
    assert all(name in message for name in ZOO_NAMES)
    assert "timm/<name>" in message


def test_unknown_timm_name_is_a_clear_value_error():
    with pytest.raises(ValueError, match="no_such_net"):
        create_model("timm/no_such_net", 10)


@pytest.mark.parametrize("name", ["resnet8", "timm/resnet18"])
@pytest.mark.parametrize("num_classes", [0, -3])
def test_num_classes_below_one_is_rejected(name, num_classes):
    with pytest.raises(ValueError, match="num_classes"):
        create_model(name, num_classes)


# Spatial size of each forward_intermediates stage for a 32x32 input once the stem keeps full
# resolution (unadapted, resnet18 would give [16, 8, 4, 2, 1]).
TIMM_SPATIAL = {
    "timm/resnet18": [32, 32, 16, 8, 4],
    "timm/mobilenetv3_small_050": [32, 16, 8, 4, 2],
}


@pytest.mark.parametrize("name", list(TIMM_SPATIAL))
def test_timm_model_adapted_to_32x32(name):
    model = create_model(name, 10).eval()
    assert isinstance(model, TimmClassifier)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = model.forward_stages(x)
        logits = model(x)

    assert out.logits.shape == (2, 10)
    assert out.features and all(f.ndim == 4 and f.shape[0] == 2 for f in out.features)
    assert out.features[0].shape[-1] >= 16
    assert [f.shape[-1] for f in out.features] == TIMM_SPATIAL[name]
    assert out.pooled.ndim == 2 and out.pooled.shape[0] == 2
    torch.testing.assert_close(logits, out.logits)
    assert feature_shapes(model) == [tuple(f.shape[1:]) for f in out.features]


def test_timm_resnet_stem_is_3x3_stride_1_without_maxpool():
    backbone = create_model("timm/resnet18", 10).model
    assert backbone.conv1.kernel_size == (3, 3) and backbone.conv1.stride == (1, 1)
    assert backbone.conv1.padding == (1, 1) and backbone.conv1.bias is None
    assert (backbone.conv1.in_channels, backbone.conv1.out_channels) == (3, 64)
    assert isinstance(backbone.maxpool, nn.Identity)


def test_timm_stem_can_be_left_alone():
    backbone = create_model("timm/resnet18", 10, adapt_stem=False).model
    assert backbone.conv1.stride == (2, 2)
    assert isinstance(backbone.maxpool, nn.MaxPool2d)
