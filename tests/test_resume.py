"""Interruption and resume: a run stopped by a signal and resumed ends exactly as an uninterrupted one."""

import csv
import json
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from gompertz_kd.callbacks import RunInterrupted
from gompertz_kd.config import CONFIG_DIR
from gompertz_kd.train import run_training

from helpers import tiny_kd_overrides

STEPS_PER_EPOCH = 5  # 20 tiny training images, batch 4


@pytest.fixture(scope="module")
def uninterrupted(tiny_c10, cache, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("full")
    return run_training(compose_cfg(overrides(tiny_c10, run_dir, cache))), run_dir


def overrides(root, out, cache):
    return [
        *tiny_kd_overrides(root, out, cache, max_epochs=3),
        "trainer.deterministic=true",
        "trainer.log_every_n_steps=1",
    ]


def compose_cfg(extra):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose("train", overrides=extra)


def logged(run_dir, column):
    with open(run_dir / "csv" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get(column)]
    return {int(r["step"]): float(r[column]) for r in rows}


def test_per_image_data_path_resumes_mid_epoch_exactly(tiny_c10, cache, tmp_path):
    per_image = ["data.on_device=false", "data.augment=standard"]
    full_dir, run_dir = tmp_path / "full", tmp_path / "interrupted"
    full = run_training(compose_cfg([*overrides(tiny_c10, full_dir, cache), *per_image]))
    killer = [
        "+callbacks.kill._target_=helpers.SendSignalAt",
        f"+callbacks.kill.step={STEPS_PER_EPOCH + 2}",
        f"+callbacks.kill.signum={int(signal.SIGTERM)}",
    ]
    with pytest.raises(RunInterrupted):
        run_training(compose_cfg([*overrides(tiny_c10, run_dir, cache), *per_image, *killer]))
    resumed = run_training(
        compose_cfg([*overrides(tiny_c10, run_dir, cache), *per_image, "ckpt_path=last"])
    )
    want, got = full.module.student.state_dict(), resumed.module.student.state_dict()
    assert all(torch.equal(want[k], got[k]) for k in want)
    assert logged(run_dir, "train/loss") == logged(full_dir, "train/loss")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_interrupted_and_resumed_run_matches_the_uninterrupted_one(
    tiny_c10, cache, uninterrupted, tmp_path, signum
):
    full, full_dir = uninterrupted

    run_dir = tmp_path / "interrupted"
    stop_at = STEPS_PER_EPOCH + 2  # mid second epoch
    killer = [
        "+callbacks.kill._target_=helpers.SendSignalAt",
        f"+callbacks.kill.step={stop_at}",
        f"+callbacks.kill.signum={int(signum)}",
    ]
    with pytest.raises(RunInterrupted) as stop:
        run_training(compose_cfg([*overrides(tiny_c10, run_dir, cache), *killer]))
    assert stop.value.signum == signum and stop.value.step == stop_at + 1
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert not (run_dir / "results.json").exists()
    assert signal.getsignal(signal.SIGINT) is not None  # handlers restored

    # the interrupted part's fit time travels in the checkpoint into the results' wall time
    path = run_dir / "checkpoints" / "last.ckpt"
    state = torch.load(path, weights_only=False)
    assert 0 < state["callbacks"]["RunTimer"]["fit_seconds"] < 600
    state["callbacks"]["RunTimer"]["fit_seconds"] = 1e6  # marked, to be found in the results
    torch.save(state, path)
    resumed = run_training(compose_cfg([*overrides(tiny_c10, run_dir, cache), "ckpt_path=last"]))
    assert 1e6 < resumed.results["wall_time_s"] < 1e6 + 600
    want, got = full.module.student.state_dict(), resumed.module.student.state_dict()
    assert all(torch.equal(want[k], got[k]) for k in want)
    assert resumed.results["test"] == full.results["test"]
    assert logged(run_dir, "kd_weight") == logged(full_dir, "kd_weight")
    assert logged(run_dir, "train/loss") == logged(full_dir, "train/loss")
    assert json.loads((run_dir / "results.json").read_text())["status"] == "completed"
    assert resumed.results["train_images_per_s"] is not None


def test_sigterm_during_validation_stops_after_the_next_batch_and_resumes_exactly(
    tiny_c10, cache, uninterrupted, tmp_path
):
    """Lightning's own SIGTERM flag would end the run inside validation with no checkpoint; the
    stop waits for the next training batch instead."""
    full, full_dir = uninterrupted
    run_dir = tmp_path / "interrupted"
    killer = [
        "+callbacks.kill._target_=helpers.SendSignalInValidation",
        "+callbacks.kill.epoch=0",
        f"+callbacks.kill.signum={int(signal.SIGTERM)}",
    ]
    with pytest.raises(RunInterrupted) as stop:
        run_training(compose_cfg([*overrides(tiny_c10, run_dir, cache), *killer]))
    assert stop.value.step == STEPS_PER_EPOCH + 1  # the first batch of the next epoch
    resumed = run_training(compose_cfg([*overrides(tiny_c10, run_dir, cache), "ckpt_path=last"]))
    want, got = full.module.student.state_dict(), resumed.module.student.state_dict()
    assert all(torch.equal(want[k], got[k]) for k in want)
    assert resumed.results["test"] == full.results["test"]


def test_cli_exits_with_signal_code_and_prints_the_resume_command(tiny_c10, cache, tmp_path):
    run_dir = tmp_path / "run"
    args = [
        *[o for o in overrides(tiny_c10, "unused", cache) if not o.startswith("paths.output")],
        f"hydra.run.dir={run_dir}",
    ]
    env_path = {"PYTHONPATH": str(Path(__file__).parent)}
    import os

    env = {**os.environ, **env_path}
    first = subprocess.run(
        [
            sys.executable,
            "-m",
            "gompertz_kd.run",
            *args,
            "+callbacks.kill._target_=helpers.SendSignalAt",
            "+callbacks.kill.step=3",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=tmp_path,
    )
    assert first.returncode == 128 + signal.SIGTERM, first.stderr[-2000:]
    out = first.stdout + first.stderr
    assert "Resume with" in out and "ckpt_path=last" in out
    assert not (run_dir / "results.json").exists()
    line = next(
        x.strip() for x in out.splitlines() if x.strip().startswith("python -m gompertz_kd.run")
    )
    resume = shlex.split(line)[3:]
    assert "+callbacks.kill.step=3" in resume  # the same run, continued: drop the killer ourselves
    resume = [a for a in resume if not a.startswith("+callbacks.kill")]
    second = subprocess.run(
        [sys.executable, "-m", "gompertz_kd.run", *resume],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=tmp_path,
    )
    assert second.returncode == 0, second.stderr[-2000:]
    assert json.loads((run_dir / "results.json").read_text())["status"] == "completed"


def test_two_seeded_deterministic_quick_runs_are_bitwise_equal(tiny_c10, cache, tmp_path):
    """`quick`, shortened to tiny data, twice with the same seed: the same metrics, bit for bit."""

    def run(name):
        out = tmp_path / name
        cfg = compose_cfg(
            [
                "experiment=quick",
                *[
                    o
                    for o in overrides(tiny_c10, out, cache)
                    if not o.startswith(("data=", "model=", "method="))
                ],
            ]
        )
        results = run_training(cfg).results
        return results, (out / "csv" / "metrics.csv").read_text()

    (first, first_csv), (second, second_csv) = run("a"), run("b")
    assert first["test"] == second["test"] and first["best"] == second["best"]
    assert first_csv == second_csv


@pytest.mark.slow  # for its time; `make test-full` runs it
def test_rerunning_the_same_config_writes_a_new_directory(tiny_c10, cache, tmp_path):
    import os

    env = {**os.environ, "GOMPERTZ_KD_ROOT": str(tmp_path)}
    args = [o for o in overrides(tiny_c10, "unused", cache) if not o.startswith("paths.output")]
    for _ in range(2):
        done = subprocess.run(
            [sys.executable, "-m", "gompertz_kd.run", *args, "++trainer.fast_dev_run=true"],
            capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr[-2000:]
    runs = sorted(p.parent for p in (tmp_path / "logs").glob("train/runs/*/results.json"))
    assert len(runs) == 2 and runs[0] != runs[1]


@pytest.mark.parametrize("method", ["crd", "fitnet"])
def test_method_with_trainable_parts_resumes_mid_epoch_exactly(tiny_c10, cache, tmp_path, method):
    """CRD's memory bank and NCE normalisers, FitNet's regressor: all in the checkpoint, so a run
    stopped mid-epoch resumes to the uninterrupted run's weights, bit for bit."""
    extra = [f"method={method}"]

    def overrides_for(out):
        return [o for o in overrides(tiny_c10, out, cache) if not o.startswith("method=")]

    if method == "crd":
        extra.append("method.terms.crd.term.num_negatives=256")  # small bank draws, fast
    full_dir, run_dir = tmp_path / "full", tmp_path / "interrupted"
    full = run_training(compose_cfg([*overrides_for(full_dir), *extra]))
    killer = [
        "+callbacks.kill._target_=helpers.SendSignalAt",
        f"+callbacks.kill.step={STEPS_PER_EPOCH + 2}",
    ]
    with pytest.raises(RunInterrupted):
        run_training(compose_cfg([*overrides_for(run_dir), *extra, *killer]))
    resumed = run_training(compose_cfg([*overrides_for(run_dir), *extra, "ckpt_path=last"]))
    want, got = full.module.state_dict(), resumed.module.state_dict()
    assert any(k.startswith(f"objective.terms.{method}.") for k in want)
    assert set(want) == set(got)
    assert all(torch.equal(want[k], got[k]) for k in want), [
        k for k in want if not torch.equal(want[k], got[k])
    ]
    assert logged(run_dir, f"train/loss_{method}") == logged(full_dir, f"train/loss_{method}")
