"""The population launcher: a Hydra sweep's jobs train as one population, each job its single run."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir

from gompertz_kd.config import CONFIG_DIR
from gompertz_kd.report import load_runs
from gompertz_kd.train import run_training
from hydra_plugins.gompertz_kd_population_launcher.population_launcher import population_of_jobs

from helpers import tiny_kd_overrides

TESTS = Path(__file__).parent


def base(root, cache, out=None):
    overrides = [
        o
        for o in tiny_kd_overrides(root, out or "unused", cache, max_epochs=2)
        if o != "method=gkd" and (out is not None or not o.startswith("paths.output_dir"))
    ]
    return [*overrides, "trainer.deterministic=true", "trainer.log_every_n_steps=1"]


def sweep(args, cwd):
    # this process's thread count: the in-process runs compared with must round alike
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    return subprocess.run(
        [sys.executable, "-m", "gompertz_kd.run", "-m", "hydra/launcher=population", *args],
        capture_output=True, text=True, timeout=600, cwd=cwd, env=env,
    )  # fmt: skip


def test_jobs_become_members_with_their_own_seeds():
    jobs = [
        ["experiment=quick", "method=kd", "seed=3", "hydra.job.chdir=false"],
        ["experiment=quick", "method=dkd", "seed=4"],
    ]
    shared, population = population_of_jobs(jobs, first_job=6)
    assert shared == ["experiment=quick", "seed=3"]  # the first job's seed orders the data
    assert population["name"] == "jobs_6-7"
    assert population["members"] == {
        "job6": {"overrides": ["experiment=quick", "method=kd"], "seed": 3},
        "job7": {"overrides": ["experiment=quick", "method=dkd"], "seed": 4},
    }
    shared, _ = population_of_jobs(jobs, first_job=0, data_seed=9)
    assert shared[-1] == "seed=9"
    shared, population = population_of_jobs([["method=kd"]], first_job=0)
    assert shared == ["method=kd"] and population["members"]["job0"]["seed"] is None


def test_a_sweep_trains_as_one_population_each_job_its_single_run(tiny_c10, cache, tmp_path):
    out = tmp_path / "sweep"
    proc = sweep(
        [*base(tiny_c10, cache), "method=kd,student", "seed=0,1", f"hydra.sweep.dir={out}"],
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    members = out / "0" / "members"  # one batch, numbered by its first job
    assert sorted(p.name for p in members.iterdir()) == ["job0", "job1", "job2", "job3"]
    results = json.loads((members / "job1" / "results.json").read_text())
    assert (results["seed"], results["data_seed"]) == (1, 0)
    assert results["overrides"][-2:] == ["method=kd", "seed=1"]
    assert len(results["overrides"]) == len(set(results["overrides"]))
    assert len(load_runs([out])) == 4
    # the kd job with seed 1: its single run with that initialisation on data seed 0
    single = run_training(
        _compose(
            [*base(tiny_c10, cache, tmp_path / "single"), "method=kd", "seed=1", "data.seed=0"]
        )
    )
    saved = torch.load(members / "job1" / "checkpoints" / "last.ckpt", weights_only=True)
    student = single.module.student.state_dict()
    differ = [
        k for k, v in student.items() if not torch.equal(saved["state_dict"][f"student.{k}"], v)
    ]
    assert not differ, differ[:5]
    assert results["test"] == single.results["test"]


@pytest.mark.slow  # for its time; `make test-full` runs it
def test_optuna_trials_train_in_batches_and_get_their_members_values(tiny_c10, cache, tmp_path):
    out = tmp_path / "optuna"
    proc = sweep(
        [*base(tiny_c10, cache), "hparams_search=gompertz_optuna", "method=gkd",
         "schedule=gompertz", "data.val_split=10", "test=false", "hydra.sweeper.n_trials=4",
         "hydra.sweeper.n_jobs=2", f"hydra.sweep.dir={out}"],
        tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    batches = {
        b.name: sorted(p.name for p in (b / "members").iterdir()) for b in out.glob("[0-9]*")
    }
    assert batches == {"0": ["job0", "job1"], "2": ["job2", "job3"]}
    trials = [json.loads(p.read_text()) for p in out.glob("*/members/*/results.json")]
    assert all(t["test"]["top1"] is None for t in trials)  # the search never reads the test split
    for t in trials:  # each trial ran its own sampled curve
        params = {
            o.split("=")[0]: float(o.split("=")[1]) for o in t["overrides"] if "schedule." in o
        }
        assert set(params) == {"schedule.b", "schedule.c", "schedule.w_max"}
        assert t["config"]["schedule"]["b"] == pytest.approx(params["schedule.b"])
    best = yaml.safe_load((out / "optimization_results.yaml").read_text())
    assert best["best_value"] == max(t["best_val_top1"] for t in trials)


def test_a_batch_whose_jobs_differ_in_the_recipe_fails_naming_it(tiny_c10, cache, tmp_path):
    out = tmp_path / "bad"
    proc = sweep(
        [*base(tiny_c10, cache), "method=kd", "trainer.max_epochs=1,2", f"hydra.sweep.dir={out}"],
        tmp_path,
    )
    assert proc.returncode != 0
    assert "changes trainer.max_epochs" in proc.stderr
    assert not list(out.glob("*/members/*/results.json"))


@pytest.mark.parametrize("search", ["study_gompertz_kd", "study_trajectory_kd"])
def test_the_studys_searches_run_on_val_as_populations(search):
    cfg = _compose(["experiment=c10cpu_long", f"hparams_search={search}"], hydra=True)
    assert cfg.hydra.launcher._target_.endswith("population_launcher.PopulationLauncher")
    assert cfg.test is False and cfg.optimized_metric == "val/top1"
    assert cfg.data.val_split == 5000 and cfg.trainer.max_epochs == 20
    assert cfg.method.terms.kd.scale == 1.0 and cfg.schedule._target_.endswith("Gompertz")
    params = dict(cfg.hydra.sweeper.params)
    if search == "study_gompertz_kd":
        assert set(params) == {"schedule.b", "schedule.c"} and cfg.schedule.w_max == 0.9
        assert cfg.hydra.sweeper.n_trials == 16
    else:
        assert cfg.callbacks.gompertz_weight.progress == "trajectory"
        assert len(str(params["callbacks.gompertz_weight.trajectory_target"]).split(",")) == 5


def _compose(overrides, hydra=False):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose("train", overrides=overrides, return_hydra_config=hydra)


def test_the_optuna_search_spreads_the_trials_of_a_batch():
    from hydra.utils import instantiate

    cfg = _compose(["hparams_search=gompertz_optuna"], hydra=True)
    sampler = instantiate(cfg.hydra.sweeper.sampler)
    assert sampler._constant_liar and sampler._n_startup_trials == 8
