"""Every input a user can get wrong ends in one clear error naming the field, and no results.json."""

import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
from hydra import compose, initialize_config_dir

from gompertz_kd.checkpoints import CheckpointError
from gompertz_kd.config import CONFIG_DIR
from gompertz_kd.models import create_model
from gompertz_kd.train import _resume_checkpoint, _resume_path, build_module, train

from helpers import cpu_trainer, random_loader, tiny_kd_overrides


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
        ("compile=graph", ValueError, "compile='graph' must be one of false, true"),
        (
            "compile_mode=fast",
            ValueError,
            "compile_mode='fast' must be null or one of default, reduce-overhead",
        ),
        ("model.sync_every=0", ValueError, "sync_every must be an integer >= 1"),
        ("model.gm_fraction=0", ValueError, "gm_fraction must be a number in"),
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


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tiny_c10):
    """Files the checkpoint tests point at: a random resnet20 teacher (so that no run trains one),
    a real Lightning checkpoint of a resnet20 -> resnet8 ``method=kd`` run after one step, the same
    saved with the weights only, and a copy of it cut in half."""
    out = tmp_path_factory.mktemp("saved")
    files = {"teacher": out / "resnet20.pth", "kd_run": out / "kd_run.ckpt"}
    torch.save({"model": create_model("resnet20", 10).state_dict()}, files["teacher"])
    cfg = cfg_for(tiny_c10, out, "method=kd", f"teacher.ckpt={files['teacher']}")
    module = build_module(cfg, num_classes=10, teacher_ckpt=str(files["teacher"]))
    trainer = cpu_trainer(max_steps=1)
    trainer.fit(module, random_loader(n=4))
    trainer.save_checkpoint(files["kd_run"])
    files["weights_only"] = out / "weights_only.ckpt"
    trainer.save_checkpoint(files["weights_only"], weights_only=True)
    files["truncated"] = out / "truncated.ckpt"
    data = files["kd_run"].read_bytes()
    files["truncated"].write_bytes(data[: len(data) // 2])
    return files


def _make_bad_file(kind, path, saved):
    """Write the bad input ``kind`` at ``path``."""
    if kind == "text_file":
        path.write_text("hello: this is a config note, not weights\n")
    elif kind == "empty_file":
        path.write_bytes(b"")
    elif kind == "directory":
        path.mkdir()
    elif kind == "truncated":
        shutil.copy(saved["truncated"], path)
    elif kind == "other_class_count":
        torch.save({"model": create_model("resnet20", 100).state_dict()}, path)
    elif kind == "other_architecture":
        torch.save(create_model("resnet32", 10).state_dict(), path)
    elif kind in ("kd_run", "weights_only"):
        shutil.copy(saved[kind], path)
    elif kind == "teacher_weights":
        shutil.copy(saved["teacher"], path)
    else:
        raise AssertionError(kind)


@pytest.mark.parametrize(
    ("kind", "match"),
    [
        ("text_file", r"is a text file beginning 'hello: this.*not a PyTorch checkpoint"),
        ("empty_file", r"is an empty file \(0 bytes\), not a checkpoint"),
        ("directory", "is a directory, not a checkpoint file"),
        ("truncated", "is truncated or corrupt: torch could not read it as a zip archive"),
        ("other_class_count", r"does not fit the teacher resnet20 with 10 classes.*\(100, 64\)"),
        ("other_architecture", "does not fit the teacher resnet20.*unknown weights in the file"),
        # a distillation run's checkpoint: its student (resnet8) is what a teacher file gives
        ("kd_run", r"a run's checkpoint: the weights read are its student's, a resnet8\) does "),
    ],
    ids=[
        "text_file", "empty_file", "directory", "truncated", "other_class_count",
        "other_architecture", "distillation_run",
    ],
)  # fmt: skip
def test_bad_teacher_checkpoint_is_named(tiny_c10, tmp_path, saved, kind, match):
    path = tmp_path / "teacher.pth"
    _make_bad_file(kind, path, saved)
    with pytest.raises(CheckpointError, match=match) as err:
        train(cfg_for(tiny_c10, tmp_path, f"teacher.ckpt={path}"))
    message = str(err.value)
    assert message.startswith(f"teacher.ckpt={path} "), message
    assert message.endswith(
        "point teacher.ckpt at trained resnet20 weights for cifar10, or leave it null to train "
        "and cache the teacher"
    ), message
    assert not (tmp_path / "results.json").exists()


@pytest.mark.parametrize(
    ("kind", "overrides", "match"),
    [
        ("text_file", [], r"is a text file beginning 'hello: this.*not a PyTorch checkpoint"),
        ("empty_file", [], r"is an empty file \(0 bytes\), not a checkpoint"),
        ("directory", [], "is a directory, not a checkpoint file"),
        ("truncated", [], "is truncated or corrupt: torch could not read it as a zip archive"),
        ("teacher_weights", [], "holds model weights only, not a training checkpoint"),
        ("weights_only", [], "was saved with the weights only .*optimizer_states, lr_schedulers"),
        (
            "kd_run",
            ["model.student=resnet8x4"],
            r"another model or objective \(its run: student=resnet8, teacher=resnet20\): "
            r"shapes differ for student\.conv1\.weight: file \(16, 3, 3, 3\) vs model "
            r"\(32, 3, 3, 3\)",
        ),
        (
            "kd_run",
            ["method=crd"],
            r"another model or objective .*weights missing from the file "
            r"\(objective\.terms\.crd\.",
        ),
    ],
    ids=[
        "text_file", "empty_file", "directory", "truncated", "teacher_weights", "weights_only",
        "other_model", "other_objective",
    ],
)  # fmt: skip
def test_bad_resume_checkpoint_is_named(tiny_c10, tmp_path, saved, kind, overrides, match):
    path = tmp_path / "resume.ckpt"
    _make_bad_file(kind, path, saved)
    cfg = cfg_for(
        tiny_c10, tmp_path, "method=kd", f"teacher.ckpt={saved['teacher']}", *overrides,
        f"ckpt_path={path}",
    )  # fmt: skip
    with pytest.raises(CheckpointError, match=match) as err:
        train(cfg)
    assert str(err.value).startswith(f"ckpt_path={path} "), str(err.value)
    assert "without ckpt_path" in str(err.value)
    assert not (tmp_path / "results.json").exists()


def test_truncated_last_checkpoint_falls_back_to_the_newest_valid_one(
    tiny_c10, tmp_path, saved, caplog
):
    checkpoints = tmp_path / "checkpoints"
    checkpoints.mkdir()
    shutil.copy(saved["truncated"], checkpoints / "last.ckpt")
    shutil.copy(saved["kd_run"], checkpoints / "epoch=0-step=1.ckpt")
    cfg = cfg_for(
        tiny_c10, tmp_path, "method=kd", f"teacher.ckpt={saved['teacher']}", "ckpt_path=last"
    )
    with caplog.at_level("WARNING"):
        path, name, _ = _resume_checkpoint(cfg, tmp_path)
    assert path == checkpoints / "epoch=0-step=1.ckpt"
    assert f"ckpt_path=last ({checkpoints / 'last.ckpt'}) is truncated" in caplog.text
    assert "resuming from the newest valid checkpoint instead" in caplog.text


def test_truncated_checkpoint_named_by_path_names_the_setting_and_the_others(
    tiny_c10, tmp_path, saved
):
    checkpoints = tmp_path / "checkpoints"
    checkpoints.mkdir()
    shutil.copy(saved["truncated"], checkpoints / "last.ckpt")
    shutil.copy(saved["kd_run"], checkpoints / "epoch=0-step=1.ckpt")
    given = checkpoints / "last.ckpt"
    cfg = cfg_for(
        tiny_c10, tmp_path, "method=kd", f"teacher.ckpt={saved['teacher']}", f"ckpt_path={given}"
    )
    with pytest.raises(CheckpointError) as err:
        train(cfg)
    message = str(err.value)
    assert message.startswith(f"ckpt_path={given} is truncated")
    assert "the other checkpoints there: epoch=0-step=1.ckpt" in message
    assert not (tmp_path / "results.json").exists()


def test_the_runs_own_checkpoint_passes_the_resume_check(tiny_c10, tmp_path, saved):
    cfg = cfg_for(
        tiny_c10, tmp_path, "method=kd", f"teacher.ckpt={saved['teacher']}",
        f"ckpt_path={saved['kd_run']}",
    )  # fmt: skip
    module = build_module(cfg, num_classes=10, teacher_ckpt=str(saved["teacher"]))
    assert _resume_path(cfg, tmp_path, module.state_dict()) == str(saved["kd_run"])


@pytest.mark.parametrize(
    ("setting", "kind", "message"),
    [
        ("ckpt_path", "truncated", "is truncated or corrupt"),
        ("teacher.ckpt", "text_file", "is a text file beginning"),
    ],
    ids=["ckpt_path", "teacher.ckpt"],
)
def test_cli_bad_checkpoint_exits_nonzero_with_the_message(
    tiny_c10, tmp_path, saved, setting, kind, message
):
    path = tmp_path / "bad.ckpt"
    _make_bad_file(kind, path, saved)
    env = {**os.environ, "GOMPERTZ_KD_ROOT": str(tmp_path)}
    run = subprocess.run(
        [sys.executable, "-m", "gompertz_kd.run", "data=cifar10", "data.source=folder",
         f"data.root={tiny_c10}", "data.batch_size=4", "model=resnet20_resnet8", "method=kd",
         f"teacher.ckpt={saved['teacher']}", f"{setting}={path}", "print_config=false"],
        capture_output=True, text=True, timeout=180, env=env, cwd=tmp_path,
    )  # fmt: skip
    assert run.returncode != 0
    assert f"CheckpointError: {setting}={path} {message}" in run.stderr, run.stderr[-2000:]
    # torch's own error (KeyError(101), PytorchStreamReader...) is no longer what the run ends in
    assert not re.search(r"^(KeyError|RuntimeError)", run.stderr, re.MULTILINE), run.stderr[-2000:]
    assert not list(tmp_path.glob("logs/**/results.json"))


def test_gpu_requested_where_there_is_none_exits_nonzero_with_the_fix(tiny_c10, tmp_path):
    # a machine with a GPU hides it from this run, so the check runs there too
    env = {**os.environ, "GOMPERTZ_KD_ROOT": str(tmp_path), "CUDA_VISIBLE_DEVICES": ""}
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


@pytest.mark.parametrize(("compile_setting", "teacher_compile"), [("step", "step"), (True, False)])
def test_the_teachers_own_run_takes_the_whole_step_compile(
    tmp_path, compile_setting, teacher_compile
):
    from gompertz_kd.teachers import _teacher_run_config

    cfg = cfg_for(
        tmp_path, tmp_path, f"compile={str(compile_setting).lower()}", "model.sync_every=7"
    )
    teacher_cfg = _teacher_run_config(cfg, tmp_path / "teacher")
    assert teacher_cfg.compile == teacher_compile
    assert teacher_cfg.model.sync_every == 7  # the run's step settings reach the teacher's run
    assert teacher_cfg.model.teacher is None and teacher_cfg.model.student == cfg.model.teacher
