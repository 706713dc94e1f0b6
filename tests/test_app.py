"""The Hydra application: every config composes and runs; CLI errors; sweeps; teacher cache; DDP."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from gompertz_kd.config import CONFIG_DIR
from gompertz_kd.teachers import teacher_cache_path
from gompertz_kd.train import train

from helpers import make_cifar_folder, tiny_kd_overrides

EXPERIMENTS = sorted(p.stem for p in (CONFIG_DIR / "experiment").glob("*.yaml"))
TESTS_DIR = Path(__file__).parent


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    return {
        "cifar10": make_cifar_folder(root / "c10", "cifar10", train_per_class=2, test_per_class=1),
        "cifar100": make_cifar_folder(
            root / "c100", "cifar100", train_per_class=1, test_per_class=1
        ),
    }


@pytest.fixture(scope="session")
def shared_teacher_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("teachers")


def compose_cfg(overrides):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose("train", overrides=overrides)


def tiny(root, out, cache, *extra):
    return [
        "data.source=folder",
        f"data.root={root}",
        "data.batch_size=4",
        "data.num_workers=0",
        f"paths.output_dir={out}",
        f"paths.teacher_cache={cache}",
        f"paths.data_cache={Path(cache).parent / 'data_cache'}",
        "print_config=false",
        "callbacks.rich_progress_bar=null",
        *extra,
    ]


def small_cli_run(root, cache):
    """Command-line overrides of a one-epoch resnet20 -> resnet8 KD run on tiny CIFAR-10 data;
    Hydra chooses the run directory (set hydra.run.dir / hydra.sweep.dir)."""
    return [o for o in tiny_kd_overrides(root, "unused", cache) if not o.startswith("paths.output")]


def run_cli(*args, cwd, timeout=300, env_extra=None):
    env = {**os.environ, "PYTHONPATH": str(TESTS_DIR), **(env_extra or {})}
    return subprocess.run(
        [sys.executable, "-m", "gompertz_kd.run", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def test_experiment_list_covers_the_paper_table():
    for prefix in ("c100_resnet50_mbv2", "c10_resnet50_mbv2"):
        for suffix in ("", "_student", "_kd", "_gkd", "_gkd_wd", "_gkd_gm"):
            assert prefix + suffix in EXPERIMENTS
    assert {"teacher_c100_resnet50", "teacher_c10_resnet50", "quick"} <= set(EXPERIMENTS)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_and_runs_fast_dev_run(
    experiment, tiny_data, shared_teacher_cache, tmp_path
):
    cfg = compose_cfg([f"experiment={experiment}"])
    root = tiny_data[cfg.data.dataset]
    # a held-out split, as in the c10cpu_* study, shrunk to fit the 20 tiny training images
    held_out = ["data.val_split=10"] if cfg.data.val_split else []
    cfg = compose_cfg(
        [
            f"experiment={experiment}",
            *tiny(root, tmp_path / "run", shared_teacher_cache, "++trainer.fast_dev_run=true"),
            *held_out,
        ]
    )
    results = train(cfg)
    written = json.loads((tmp_path / "run" / "results.json").read_text())
    assert written["status"] == "completed" and written["student"] == cfg.model.student
    assert 0.0 <= results["test"]["top1"] <= 1.0
    assert written["config"]["model"]["student"] == cfg.model.student


def test_cpu_study_experiments_share_one_recipe_and_differ_only_in_the_objective():
    study = [e for e in EXPERIMENTS if e.startswith("c10cpu") and e != "c10cpu_long"]
    assert len(study) == 9
    cfgs = {e: compose_cfg([f"experiment={e}"]) for e in study}
    # the long arm: the same recipe, 4x the epochs, the LR steps scaled with them
    long = compose_cfg(["experiment=c10cpu_long"])
    base = cfgs["c10cpu"]
    assert long.data == base.data and long.teacher == base.teacher
    assert (long.trainer.max_epochs, list(long.model.lr_milestones)) == (
        4 * base.trainer.max_epochs,
        [4 * m for m in base.model.lr_milestones],
    )
    recipe = {
        e: (c.data, c.trainer.max_epochs, c.model.student, c.model.lr, c.model.lr_milestones)
        for e, c in cfgs.items()
    }
    assert all(r == recipe["c10cpu"] for r in recipe.values())
    assert all(c.teacher == cfgs["c10cpu"].teacher for c in cfgs.values())
    assert cfgs["c10cpu_kd"].data.source == "folder" and cfgs["c10cpu_kd"].data.val_split > 0

    def terms(c):
        return {n: t.scale for n, t in c.method.terms.items() if t.scale > 0}

    assert terms(cfgs["c10cpu_student"]) == {}
    assert terms(cfgs["c10cpu_gkd_wd_gm"]) == {"kd": 1, "wd": 1, "gm": 1}
    assert cfgs["c10cpu"].method == cfgs["c10cpu_gkd_wd_gm"].method
    assert {e: c.schedule._target_.rsplit(".", 1)[1] for e, c in cfgs.items() if terms(c)} == {
        "c10cpu": "Gompertz",
        "c10cpu_kd": "Constant",
        "c10cpu_gkd": "Gompertz",
        "c10cpu_gkd_wd": "Gompertz",
        "c10cpu_gkd_gm": "Gompertz",
        "c10cpu_gkd_wd_gm": "Gompertz",
        "c10cpu_kd_linear": "LinearWarmup",
        "c10cpu_kd_cosine": "CosineDecay",
    }


def test_a_run_writes_only_below_its_run_dir_teacher_cache_and_data_cache(tmp_path, monkeypatch):
    data = make_cifar_folder(tmp_path / "data", "cifar10", train_per_class=2, test_per_class=1)
    before = {p: p.stat().st_mtime_ns for p in data.rglob("*")}
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    cfg = compose_cfg(
        [
            *tiny_kd_overrides(data, tmp_path / "run", tmp_path / "teachers"),
            f"paths.data_cache={tmp_path / 'data_cache'}",
            f"paths.log_dir={tmp_path / 'logs'}",
        ]
    )
    train(cfg)
    assert {p: p.stat().st_mtime_ns for p in data.rglob("*")} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "data_cache", "run", "teachers"]
    assert list((tmp_path / "data_cache").glob("*/cifar10-train-*.npz"))


def test_paper_experiment_is_the_full_objective_on_the_benchmark_recipe():
    cfg = compose_cfg(["experiment=c100_resnet50_mbv2"])
    assert (cfg.model.student, cfg.model.teacher, cfg.data.dataset) == (
        "MobileNetV2",
        "ResNet50",
        "cifar100",
    )
    terms = cfg.method.terms
    assert terms.kd.scale > 0 and terms.wd.scale > 0 and terms.gm.scale > 0
    assert {t.schedule for t in terms.values()} == {"shared"}
    assert cfg.schedule._target_ == "gompertz_kd.schedules.Gompertz"
    assert cfg.trainer.max_epochs == 240 and cfg.data.batch_size == 64
    assert list(cfg.model.lr_milestones) == [150, 180, 210] and terms.kd.term.temperature == 4.0
    kd = compose_cfg(["experiment=c100_resnet50_mbv2_kd"])
    assert kd.schedule._target_ == "gompertz_kd.schedules.Constant" and kd.schedule.value == 0.9
    assert kd.method.mixing == "convex"
    assert kd.method.terms.wd.scale == 0 and kd.method.terms.gm.scale == 0
    alone = compose_cfg(["experiment=c100_resnet50_mbv2_student"])
    assert dict(alone.method.terms) == {}


def test_schedule_typo_fails_at_composition():
    with pytest.raises(Exception, match="bb"):
        compose_cfg(["schedule.bb=3"])
    with pytest.raises(Exception, match="b"):
        compose_cfg(["schedule.b=fast"])


def test_cli_unknown_experiment_and_bad_value_exit_nonzero_with_clear_message(tmp_path):
    unknown = run_cli("experiment=nope", cwd=tmp_path, timeout=120)
    assert unknown.returncode != 0
    assert "experiment/nope" in unknown.stderr
    bad = run_cli("schedule.b=-1", f"hydra.run.dir={tmp_path / 'bad'}", cwd=tmp_path, timeout=120)
    assert bad.returncode != 0
    assert "b must be > 0, got b=-1" in bad.stderr
    assert not (tmp_path / "bad" / "results.json").exists()


def test_teacher_is_trained_once_then_reused_and_auto_train_off_is_a_clear_error(
    tiny_data, tmp_path
):
    cache = tmp_path / "teachers"
    base = tiny_kd_overrides(tiny_data["cifar10"], tmp_path / "a", cache)
    cfg = compose_cfg(base)
    first = train(cfg)
    cached = teacher_cache_path(cfg)
    assert cached.is_file()
    stamp = cached.stat().st_mtime_ns
    second = compose_cfg([*base, f"paths.output_dir={tmp_path / 'b'}", "teacher.auto_train=false"])
    again = train(second)
    assert cached.stat().st_mtime_ns == stamp
    # the first run's wall time leaves out training the teacher, recorded apart
    assert first["teacher_provision_s"] > again["teacher_provision_s"] >= 0
    # training the teacher first does not change the student's run: same seed, same result
    assert again["test"] == first["test"] and again["best_val_top1"] == first["best_val_top1"]
    assert len(list(cache.glob("*.run"))) == 1
    # a teacher that would need a different recipe is not in the cache
    other = compose_cfg([*base, "teacher.recipe.lr=0.1", "teacher.auto_train=false"])
    with pytest.raises(FileNotFoundError, match="teacher.auto_train=false"):
        train(other)
    missing = compose_cfg([*base, f"teacher.ckpt={tmp_path / 'nope.pt'}"])
    with pytest.raises(FileNotFoundError, match="teacher.ckpt="):
        train(missing)


def test_multirun_writes_one_results_json_per_job(tiny_data, tmp_path):
    sweep = tmp_path / "sweep"
    proc = run_cli(
        "-m",
        "seed=0,1",
        *small_cli_run(tiny_data["cifar10"], tmp_path / "teachers"),
        f"hydra.sweep.dir={sweep}",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = sorted(sweep.glob("*/results.json"))
    assert len(results) == 2
    seeds = sorted(json.loads(p.read_text())["seed"] for p in results)
    assert seeds == [0, 1]
    assert all(json.loads(p.read_text())["overrides"] for p in results)


def test_ddp_on_two_cpu_processes_ends_with_identical_student_weights(tiny_data, tmp_path):
    run_dir = tmp_path / "ddp"
    proc = run_cli(
        "trainer=ddp_cpu",
        "+callbacks.dump._target_=helpers.DumpStudentWeights",
        *small_cli_run(tiny_data["cifar10"], tmp_path / "teachers"),
        f"hydra.run.dir={run_dir}",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rank0 = torch.load(run_dir / "student_rank0.pt", weights_only=True)
    rank1 = torch.load(run_dir / "student_rank1.pt", weights_only=True)
    assert rank0.keys() == rank1.keys()
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    assert json.loads((run_dir / "results.json").read_text())["status"] == "completed"


@pytest.mark.parametrize(
    "launcher, target",
    [
        ("cpu_parallel", "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher"),
        ("slurm", "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"),
    ],
)
def test_launcher_configs_compose(launcher, target):
    # the launchers are optional plugins (installed with gompertz_kd, not on a bare GPU image)
    pytest.importorskip(target.rsplit(".", 2)[0])
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", overrides=[f"hydra/launcher={launcher}"], return_hydra_config=True)
    assert cfg.hydra.launcher._target_ == target


@pytest.mark.slow  # for its time; `make test-full` runs it
def test_optuna_search_tunes_gompertz_on_held_out_validation(tiny_data, tmp_path):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")  # a default dependency; skip without
    sweep = tmp_path / "optuna"
    proc = run_cli(
        "hparams_search=gompertz_optuna",
        "hydra.sweeper.n_trials=2",
        "hydra.sweeper.sampler.n_startup_trials=2",
        *small_cli_run(tiny_data["cifar10"], tmp_path / "teachers"),
        "data.val_split=10",
        f"hydra.sweep.dir={sweep}",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = [json.loads(p.read_text()) for p in sorted(sweep.glob("*/results.json"))]
    assert len(runs) == 2
    assert all(r["best"]["selected_on"] == "val" and r["best_val_top1"] is not None for r in runs)
    assert {o.split("=")[0] for o in runs[0]["overrides"]} >= {
        "schedule.b",
        "schedule.c",
        "schedule.w_max",
    }
    best = (sweep / "optimization_results.yaml").read_text()
    assert "best_params" in best and "schedule.b" in best
