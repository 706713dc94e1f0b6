"""Hard kills (SIGKILL: no handler runs) at chosen moments, steps and checkpoint writes: every
file left is complete or marked partial, and resuming with ckpt_path=last ends bit-equal to an
uninterrupted run."""

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from gompertz_kd.checkpoints import AtomicCheckpointIO, CheckpointError, newest_valid_checkpoint
from gompertz_kd.config import CONFIG_DIR
from gompertz_kd.report import load_runs
from gompertz_kd.train import run_training

from helpers import tiny_kd_overrides

TESTS = Path(__file__).resolve().parent


def overrides(root, out, cache):
    """3 epochs of 5 steps, a mid-epoch checkpoint every 2 steps."""
    return [
        *tiny_kd_overrides(root, out, cache, max_epochs=3),
        "trainer.deterministic=true",
        "callbacks.interval_checkpoint.every_n_steps=2",
    ]


def compose_cfg(extra):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose("train", overrides=extra)


def cli(args, cwd):
    # the helpers on the path, and this process's thread count: the in-process runs these are
    # compared with must do the same arithmetic (a thread count changes the rounding)
    env = {"PYTHONPATH": str(TESTS), "OMP_NUM_THREADS": str(torch.get_num_threads())}
    import os

    return subprocess.run(
        [sys.executable, "-m", "gompertz_kd.run", *args],
        capture_output=True, text=True, timeout=300, cwd=cwd, env={**os.environ, **env},
    )  # fmt: skip


def kill(step, where="step", seed=None):
    out = ["+callbacks.kill._target_=helpers.KillAt", f"+callbacks.kill.step={step}"]
    out.append(f"+callbacks.kill.where={where}")
    if seed is not None:
        out.append(f"+callbacks.kill.seed={seed}")
    return out


@pytest.mark.slow  # for its time; `make test-full` runs it
def test_killed_anywhere_and_resumed_ends_bit_equal_to_the_uninterrupted_run(
    tiny_c10, cache, tmp_path
):
    full = run_training(compose_cfg(overrides(tiny_c10, tmp_path / "full", cache)))
    run_dir = tmp_path / "killed"
    base = overrides(tiny_c10, run_dir, cache)
    checkpoints = run_dir / "checkpoints"
    # five hard kills: at steps, inside an interval write, inside an epoch-end write
    attempts = [kill(3), kill(6, "save"), kill(9), kill(10, "save"), kill(13)]
    for i, killer in enumerate(attempts):
        resume = ["ckpt_path=last"] if i else []
        proc = cli([*base, *resume, *killer], tmp_path)
        assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
        assert not (run_dir / "results.json").exists()
        # whatever exists under a checkpoint's name is complete
        for path in checkpoints.glob("*.ckpt"):
            newest_valid_checkpoint(checkpoints)  # raises if none is usable
            torch.load(path, map_location="cpu", weights_only=False)
        if "save" in killer[-1]:
            assert list(checkpoints.glob("*.partial")), "the kill was inside a write"
    # a damaged newest checkpoint (a file system without atomic rename): fall back, with a warning
    last = checkpoints / "last.ckpt"
    data = last.read_bytes()
    last.write_bytes(data[: len(data) // 3])
    proc = cli([*base, "ckpt_path=last"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resuming from the newest valid checkpoint instead" in proc.stdout + proc.stderr
    results = json.loads((run_dir / "results.json").read_text())
    assert results["status"] == "completed"
    want = full.module.student.state_dict()
    got = torch.load(checkpoints / "last.ckpt", map_location="cpu", weights_only=False)
    got = {
        k.removeprefix("student."): v
        for k, v in got["state_dict"].items()
        if k.startswith("student.")
    }
    assert set(want) == set(got)
    assert all(torch.equal(want[k], got[k]) for k in want), [
        k for k in want if not torch.equal(want[k], got[k])
    ][:5]
    assert results["test"] == full.results["test"]


def test_no_usable_checkpoint_names_each_problem(tmp_path):
    (tmp_path / "last.ckpt").write_text("not a checkpoint")
    (tmp_path / "epoch_000.ckpt").write_bytes(b"")
    (tmp_path / "last.ckpt.partial").write_bytes(b"PK\x03\x04")
    with pytest.raises(CheckpointError, match="no usable checkpoint") as error:
        newest_valid_checkpoint(tmp_path)
    assert "last.ckpt" in str(error.value) and "epoch_000.ckpt" in str(error.value)
    assert "partial" not in str(error.value)  # never read


def test_atomic_save_leaves_the_old_file_when_the_write_fails(tmp_path):
    path = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"step": 1}, path)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        io.save_checkpoint({"step": 2, "bad": Unpicklable()}, path)
    assert torch.load(path, weights_only=True) == {"step": 1}


def test_killed_teacher_training_is_resumed_by_the_next_run_never_loaded(tiny_c10, tmp_path):
    """The teacher trains for 2 epochs inside the first student run and is killed at its step 7;
    the next run resumes it from its interval checkpoint: the cached teacher equals one trained
    without interruption."""
    base = [
        *overrides(tiny_c10, tmp_path / "student", tmp_path / "teachers"),
        "teacher.recipe.max_epochs=2",
        "teacher.recipe.batch_size=4",
        "trainer.max_epochs=1",
    ]
    proc = cli([*base, *kill(7)], tmp_path)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert not list((tmp_path / "teachers").glob("*.pt"))  # no teacher file from a killed run
    proc = cli(base, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Resuming the interrupted teacher training" in proc.stdout + proc.stderr
    resumed = torch.load(next((tmp_path / "teachers").glob("*.pt")), weights_only=True)["model"]

    clean = [
        *overrides(tiny_c10, tmp_path / "student2", tmp_path / "teachers2"),
        "teacher.recipe.max_epochs=2",
        "teacher.recipe.batch_size=4",
        "trainer.max_epochs=1",
    ]
    run_training(compose_cfg(clean))
    want = torch.load(next((tmp_path / "teachers2").glob("*.pt")), weights_only=True)["model"]
    assert all(torch.equal(want[k], resumed[k]) for k in want)


@pytest.mark.slow  # for its time; `make test-full` runs it
def test_sweep_killed_between_jobs_never_counts_the_killed_job(tiny_c10, cache, tmp_path):
    sweep = tmp_path / "sweep"
    base = [
        o
        for o in overrides(tiny_c10, tmp_path / "unused", cache)
        if not o.startswith("paths.output_dir")
    ]
    args = ["-m", *base, "trainer.max_epochs=1", "seed=0,1", f"hydra.sweep.dir={sweep}"]
    proc = cli([*args, *kill(3, seed=1)], tmp_path)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and p.name.isdigit())
    assert [p.name for p in jobs] == ["0", "1"]
    assert json.loads((jobs[0] / "results.json").read_text())["status"] == "completed"
    assert not (jobs[1] / "results.json").exists()
    assert len(load_runs([sweep])) == 1  # the report counts the finished job only
    # the sweep run again finishes both
    again = tmp_path / "again"
    proc = cli([*args[:-1], f"hydra.sweep.dir={again}"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(load_runs([again])) == 2


def test_interval_checkpoints_and_epoch_ends_keep_one_last_checkpoint(tiny_c10, cache, tmp_path):
    # the mid-epoch writes and the epoch-end ModelCheckpoint write the same last.ckpt: no
    # last-v1.ckpt beside it, and the file a user resumes (or takes as a teacher) is the final one
    cfg = compose_cfg(
        [
            *overrides(tiny_c10, tmp_path, cache)[:-1],
            "callbacks.interval_checkpoint.every_n_steps=3",
        ]
    )
    run_training(cfg)
    names = sorted(p.name for p in (tmp_path / "checkpoints").glob("*.ckpt"))
    assert [n for n in names if n.startswith("last")] == ["last.ckpt"], names
    last = torch.load(
        tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False
    )
    assert last["global_step"] == 15 and last["epoch"] == 2
