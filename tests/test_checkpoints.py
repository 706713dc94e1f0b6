import pickle

import pytest
import torch

from gompertz_kd.checkpoints import (
    CheckpointError,
    load_weights,
    read_checkpoint,
    read_state_dict,
    weight_differences,
)
from gompertz_kd.models import create_model
from gompertz_kd.module import DistillationModule

from helpers import cpu_trainer, random_loader


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sb = b.state_dict()
    return all(torch.equal(v, sb[k]) for k, v in a.state_dict().items())


@pytest.mark.parametrize("layout", ["bare", "zoo", "module_prefix"])
def test_foreign_state_dict_layouts_load(tmp_path, layout):
    source = create_model("resnet8", num_classes=10)
    state = source.state_dict()
    payload = {
        "bare": state,
        "zoo": {"model": state, "epoch": 240, "best_acc": 0.9},
        "module_prefix": {f"module.{k}": v for k, v in state.items()},
    }[layout]
    path = tmp_path / "teacher.pth"
    torch.save(payload, path)
    module = DistillationModule(
        student="resnet8", teacher="resnet8", num_classes=10, teacher_ckpt=str(path)
    )
    assert _same_weights(module.teacher, source)


def test_own_lightning_checkpoint_of_a_student_only_run_loads_as_teacher(tmp_path):
    teacher_run = DistillationModule(student="resnet8", teacher=None, num_classes=10)
    trainer = cpu_trainer(max_steps=1)
    trainer.fit(teacher_run, random_loader(n=4))
    path = tmp_path / "teacher.ckpt"
    trainer.save_checkpoint(path)
    module = DistillationModule(
        student="resnet8", teacher="resnet8", num_classes=10, teacher_ckpt=str(path)
    )
    assert _same_weights(module.teacher, teacher_run.student)


def test_wrong_class_count_names_file_and_shapes(tmp_path):
    path = tmp_path / "c100.pth"
    torch.save({"model": create_model("resnet8", num_classes=100).state_dict()}, path)
    with pytest.raises(CheckpointError) as err:
        DistillationModule(
            student="resnet8", teacher="resnet8", num_classes=10, teacher_ckpt=str(path)
        )
    message = str(err.value)
    assert (
        str(path) in message
        and "fc.weight" in message
        and "(100, 64)" in message
        and "(10, 64)" in message
    )


def test_wrong_architecture_is_a_clear_error(tmp_path):
    path = tmp_path / "wrn.pth"
    torch.save(create_model("wrn_16_1", num_classes=10).state_dict(), path)
    with pytest.raises(
        CheckpointError, match="does not fit the teacher resnet8 with 10 classes.*missing"
    ):
        DistillationModule(
            student="resnet8", teacher="resnet8", num_classes=10, teacher_ckpt=str(path)
        )


def test_missing_and_truncated_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        read_state_dict(tmp_path / "nope.pth")
    path = tmp_path / "cut.pth"
    torch.save(create_model("resnet8", num_classes=10).state_dict(), path)
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(CheckpointError, match="truncated"):
        read_state_dict(path)


@pytest.mark.parametrize(
    ("content", "match"),
    [
        # 'h' is pickle's BINGET: torch.load used to end in KeyError(101), the memo index 'e'
        (b"hello world\n", r"is a text file beginning 'hello world\\n', not a PyTorch checkpoint"),
        # 'm' made torch's weights-only unpickler call the file unsafe
        (b"model: resnet8\n", "is a text file beginning 'model: resnet8"),
        (bytes(range(200, 256)), r"is a binary file beginning b'\\xc8"),
        (b"", r"is an empty file \(0 bytes\), not a checkpoint"),
    ],
    ids=["text_h", "text_m", "binary", "empty"],
)
def test_a_file_that_is_no_checkpoint_says_what_it_is(tmp_path, content, match):
    path = tmp_path / "teacher.pth"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=match) as err:
        DistillationModule(
            student="resnet8", teacher="resnet8", num_classes=10, teacher_ckpt=str(path)
        )
    assert str(err.value).startswith(str(path))


def test_a_directory_is_named_with_the_checkpoints_inside(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.ckpt").write_bytes(b"PK\x03\x04")
    match = r"is a directory, not a checkpoint file \(it holds checkpoints/last.ckpt\); use a file"
    with pytest.raises(CheckpointError, match=match):
        read_checkpoint(tmp_path, name="teacher.ckpt=dir", fix="use a file")


def test_weight_differences_name_keys_and_shapes():
    expected = create_model("resnet8", num_classes=10).state_dict()
    state = dict(create_model("resnet8", num_classes=100).state_dict())
    state["extra.weight"] = state.pop("layer1.0.conv1.weight")
    problems = weight_differences(state, expected)
    assert problems == [
        "shapes differ for fc.weight: file (100, 64) vs model (10, 64); "
        "fc.bias: file (100,) vs model (10,)",
        "1 weights missing from the file (layer1.0.conv1.weight)",
        "1 unknown weights in the file (extra.weight)",
    ]
    assert weight_differences(expected, expected) == []


class _Exploit:
    def __reduce__(self):
        import pathlib

        return (pathlib.Path.touch, (pathlib.Path(_Exploit.target),))


def test_crafted_pickle_is_refused_and_does_not_execute(tmp_path):
    _Exploit.target = str(tmp_path / "pwned")
    path = tmp_path / "evil.pth"
    with path.open("wb") as f:
        pickle.dump({"model": _Exploit()}, f)
    with pytest.raises(CheckpointError, match="refused"):
        read_state_dict(path)
    assert not (tmp_path / "pwned").exists()


def test_load_weights_into_a_plain_model(tmp_path):
    source = create_model("resnet8", num_classes=10)
    path = tmp_path / "w.pt"
    torch.save(source.state_dict(), path)
    target = create_model("resnet8", num_classes=10)
    load_weights(target, path, "resnet8")
    assert _same_weights(target, source)
