"""Every input a user can get wrong ends in one clear error naming the field, and no results.json."""

import os
import subprocess
import sys

import pytest
import torch
from hydra import compose, initialize_config_dir

from gompertz_kd.checkpoints import CheckpointError
from gompertz_kd.config import CONFIG_DIR
from gompertz_kd.models import create_model
from gompertz_kd.train import train

from helpers import make_cifar_folder, tiny_kd_overrides


@pytest.fixture(scope="module")
def tiny_c10(tmp_path_factory):
    return make_cifar_folder(
        tmp_path_factory.mktemp("c10"), "cifar10", train_per_class=2, test_per_class=1
    )


def cfg_for(root, out, *extra):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose("train", overrides=[*tiny_kd_overrides(root, out, out / "teachers"), *extra])


@pytest.mark.parametrize(
    ("override", "error", "match"),
    [
        ("schedule.b=0", ValueError, "b must be > 0, got b=0"),
        ("schedule.c=-1", ValueError, "c must be > 0"),
        ("schedule.w_max=-0.5", ValueError, "w_max must be >= 0"),
        ("model.lr=0", ValueError, "model.lr=0 must be > 0"),
        ("model.lr=-0.1", ValueError, "model.lr=-0.1 must be > 0"),
        ("trainer.max_epochs=0", ValueError, "trainer.max_epochs=0 must be >= 1"),
        ("data.batch_size=0", ValueError, "data.batch_size=0 must be >= 1"),
        ("teacher.recipe.lr=0", ValueError, "teacher.recipe.lr=0 must be > 0"),
        (
            "model.student=resnet9000",
            ValueError,
            "unknown model 'resnet9000'; valid zoo names: resnet8",
        ),
        ("data.dataset=cifar1000", ValueError, "dataset='cifar1000' is not one of"),
        ("data=cifar100", ValueError, "do not match dataset='cifar100'"),
        ("teacher.auto_train=false", FileNotFoundError, "teacher.auto_train=false"),
    ],
)
def test_bad_value_is_named_and_leaves_no_results(tiny_c10, tmp_path, override, error, match):
    if override == "data=cifar100":
        cfg = cfg_for(
            tiny_c10, tmp_path, "data=cifar100", "data.source=folder", f"data.root={tiny_c10}"
        )
    else:
        cfg = cfg_for(tiny_c10, tmp_path, override)
    with pytest.raises(error, match=match):
        train(cfg)
    assert not (tmp_path / "results.json").exists()


def test_missing_data_root_says_where_and_how_to_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="train"):
        train(cfg_for(tmp_path / "nowhere", tmp_path))
    assert not (tmp_path / "results.json").exists()


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (
            lambda p: torch.save({"model": create_model("resnet20", 100).state_dict()}, p),
            r"\(100, 64\)",
        ),
        (lambda p: torch.save(create_model("resnet32", 10).state_dict(), p), "missing|unknown"),
        (lambda p: p.write_bytes(b"PK\x03\x04 truncated"), "truncated"),
    ],
    ids=["other_class_count", "other_architecture", "truncated"],
)
def test_bad_teacher_checkpoint_is_named(tiny_c10, tmp_path, make, match):
    path = tmp_path / "teacher.pth"
    make(path)
    with pytest.raises(CheckpointError, match=match):
        train(cfg_for(tiny_c10, tmp_path, f"teacher.ckpt={path}"))
    assert not (tmp_path / "results.json").exists()


def test_gpu_requested_where_there_is_none_exits_nonzero_with_the_fix(tiny_c10, tmp_path):
    env = {**os.environ, "GOMPERTZ_KD_ROOT": str(tmp_path)}
    gpu = subprocess.run(
        [sys.executable, "-m", "gompertz_kd.run", "trainer=gpu", "data=cifar10", "data.source=folder",
         f"data.root={tiny_c10}", "model=resnet20_resnet8", "method=student"],
        capture_output=True, text=True, timeout=180, env=env, cwd=tmp_path,
    )  # fmt: skip
    assert gpu.returncode != 0
    assert (
        "trainer.accelerator=gpu but no CUDA GPU is visible here; use trainer=cpu" in gpu.stderr
    ), gpu.stderr[-1500:]
    assert not list(tmp_path.glob("logs/**/results.json"))


@pytest.mark.parametrize("role", ["student", "teacher"])
def test_built_network_with_another_class_count_is_refused(role):
    from gompertz_kd.module import DistillationModule

    networks = {"student": "resnet8", "teacher": "resnet8", role: create_model("resnet8", 100)}
    with pytest.raises(
        ValueError, match=rf"the {role} CifarResNet predicts 100 classes but the data set has 10"
    ):
        DistillationModule(**networks, num_classes=10)


def test_built_network_with_the_data_sets_class_count_is_accepted():
    from gompertz_kd.module import DistillationModule

    student, teacher = create_model("resnet8", 10), create_model("resnet14", 10)
    module = DistillationModule(student=student, teacher=teacher, num_classes=10)
    assert module.student is student
