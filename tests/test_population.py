"""Population runs: K students on one teacher pass, each member exactly its single run."""

import csv
import json
import signal
import subprocess
import sys

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from gompertz_kd.callbacks import RunInterrupted
from gompertz_kd.config import CONFIG_DIR
from gompertz_kd.module import DistillationModule, NonFiniteLossError
from gompertz_kd.objectives import gompertz_cnn
from gompertz_kd.population import (
    PopulationModule,
    check_member_names,
    member_names,
    run_population,
)
from gompertz_kd.report import load_runs
from gompertz_kd.train import run_training

from helpers import tiny_kd_overrides

STEPS_PER_EPOCH = 5  # 20 tiny training images, batch 4


def base(root, out, cache):
    overrides = [o for o in tiny_kd_overrides(root, out, cache, max_epochs=2) if o != "method=gkd"]
    return [*overrides, "trainer.deterministic=true", "trainer.log_every_n_steps=1"]


def compose_cfg(extra):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose("train", overrides=extra)


def population(root, out, cache, members, *extra):
    """A population run of ``members`` (name -> overrides) on the tiny recipe, as the command
    line ``... *extra +population.members={...}`` runs it."""
    overrides = [*base(root, out, cache), *extra]
    spec = (
        "{" + ", ".join(f"{k}: [{', '.join(repr(o) for o in v)}]" for k, v in members.items()) + "}"
    )
    cfg = compose_cfg([*overrides, "+population.name=test", f"+population.members={spec}"])
    return run_population(cfg, base_overrides=overrides)


MEMBERS = {
    "kd": ["method=gkd", "schedule=gompertz"],
    "fitnet": ["method=fitnet"],
    "gm": ["method=gkd_gm", "schedule=gompertz", "model.gm_every=1"],
}


def test_each_member_ends_bit_equal_to_its_single_run(tiny_c10, cache, tmp_path):
    """KD, methods with trainable parts (FitNet's regressor; CRD's embeddings, memory bank and
    batches that carry indices) and gradient matching, side by side on one teacher pass: each
    member's weights equal its own single run's, bit for bit."""
    members = {k: v for k, v in MEMBERS.items() if k != "gm"}
    members["gm"] = ["method=gkd_gm", "schedule=gompertz"]
    members["crd"] = ["method=crd", "method.terms.crd.term.num_negatives=64"]
    run = population(tiny_c10, tmp_path / "population", cache, members, "model.gm_every=2")
    for name, overrides in members.items():
        single = run_training(
            compose_cfg([*base(tiny_c10, tmp_path / name, cache), *overrides, "model.gm_every=2"])
        )
        want, got = single.module.state_dict(), run.module.members[name].state_dict()
        assert set(want) == set(got)
        differ = [k for k in want if not torch.equal(want[k], got[k])]
        assert not differ, (name, differ[:5])
        assert run.results[name]["test"] == single.results["test"], name
        assert run.results[name]["final_weights"] == single.results["final_weights"]
    # one teacher module serves every member
    teachers = {id(m.teacher) for m in run.module.members.values()}
    assert len(teachers) == 1


def test_replicated_seeds_vary_the_initialisation_only(tiny_c10, cache, tmp_path):
    run = population(
        tiny_c10, tmp_path / "population", cache, {"kd": MEMBERS["kd"]}, "+population.seeds=[0,1]"
    )
    assert list(run.results) == ["kd_s0", "kd_s1"]
    assert run.results["kd_s1"]["seed"] == 1 and run.results["kd_s1"]["data_seed"] == 0
    assert run.results["kd_s1"]["name"] == "kd"
    # member kd_s1 is the single run initialised with seed 1 on the data order of seed 0
    single = run_training(
        compose_cfg(
            [*base(tiny_c10, tmp_path / "single", cache), *MEMBERS["kd"], "seed=1", "data.seed=0"]
        )
    )
    want, got = single.module.student.state_dict(), run.module.members["kd_s1"].student.state_dict()
    assert all(torch.equal(want[k], got[k]) for k in want)
    s0 = run.module.members["kd_s0"].student.state_dict()
    assert not all(torch.equal(s0[k], got[k]) for k in s0)


def test_interrupted_population_resumes_every_member_exactly(tiny_c10, cache, tmp_path):
    members = {"kd": MEMBERS["kd"], "fitnet": MEMBERS["fitnet"], "static": ["method=kd"]}
    full = population(tiny_c10, tmp_path / "full", cache, members)
    run_dir = tmp_path / "interrupted"
    killer = [
        "+callbacks.kill._target_=helpers.SendSignalAt",
        f"+callbacks.kill.step={STEPS_PER_EPOCH + 2}",  # mid second epoch
        f"+callbacks.kill.signum={int(signal.SIGTERM)}",
    ]
    with pytest.raises(RunInterrupted):
        population(tiny_c10, run_dir, cache, members, *killer)
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert not list(run_dir.glob("members/*/results.json"))
    resumed = population(tiny_c10, run_dir, cache, members, "ckpt_path=last")
    for name in members:
        want = full.module.members[name].state_dict()
        got = resumed.module.members[name].state_dict()
        assert all(torch.equal(want[k], got[k]) for k in want), name
        assert resumed.results[name]["test"] == full.results[name]["test"]
    # the shared teacher is saved once in the population's checkpoint
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert {k.split(".")[1] for k in state if ".teacher." in k} == {"kd"}


def test_members_write_what_single_runs_write_and_the_report_reads_them(tiny_c10, cache, tmp_path):
    run = population(
        tiny_c10, tmp_path / "run", cache, {"kd": MEMBERS["kd"], "alone": ["method=student"]}
    )
    for name in ("kd", "alone"):
        member_dir = tmp_path / "run" / "members" / name
        results = json.loads((member_dir / "results.json").read_text())
        assert results["population"]["members"] == ["kd", "alone"]
        assert results["history"] == "csv/metrics.csv" and results["run_dir"] == str(member_dir)
        assert (member_dir / "checkpoints" / "best.ckpt").is_file()
        assert (member_dir / "checkpoints" / "last.ckpt").is_file()
        header = (member_dir / "csv" / "metrics.csv").read_text().splitlines()[0].split(",")
        assert "train/loss" in header and "val/top1" in header
        assert not any(c.startswith(("kd/", "alone/")) for c in header)
    kd_header = (tmp_path / "run" / "members" / "kd" / "csv" / "metrics.csv").read_text()
    assert "kd_weight" in kd_header.splitlines()[0]
    runs = load_runs([tmp_path / "run"])
    assert sorted(r.results["name"] for r in runs) == ["alone", "kd"]
    # a member's checkpoint loads into a module built like the member (teacher apart)
    ckpt = torch.load(
        tmp_path / "run" / "members" / "kd" / "checkpoints" / "last.ckpt", weights_only=True
    )
    assert ckpt["member"] == "kd" and not any(k.startswith("teacher.") for k in ckpt["state_dict"])
    student = run.module.members["kd"].student.state_dict()
    assert all(torch.equal(ckpt["state_dict"][f"student.{k}"], v) for k, v in student.items())


@pytest.mark.parametrize(
    "members, extra, message",
    [
        ("{}", [], "the population has no members"),
        ("{a: ['method=kd']}", ["+population.seeds=[0,0]"], "repeats a seed"),
        ("{a: ['method=kd'], b: ['data=cifar100']}", [], "member 'b' changes data"),
        ("{a: ['method=kd'], b: ['seed=3']}", [], "a member's seed comes from population.seeds"),
        ("{a: ['method=kd'], b: ['method=dkd']}", ["+population.fuse=yes"], "must be auto, true"),
    ],
)
def test_bad_populations_fail_before_any_work(tiny_c10, tmp_path, members, extra, message):
    cache = tmp_path / "teachers"
    overrides = base(tiny_c10, tmp_path / "run", cache)
    cfg = compose_cfg([*overrides, f"+population.members={members}", *extra])
    with pytest.raises(ValueError, match=message):
        run_population(cfg, base_overrides=overrides)
    assert not cache.exists() or not any(cache.iterdir())  # no teacher was trained


@pytest.mark.parametrize("names", [["a", "a"], ["a/b"], ["a.b"], [""], ["-a"]])
def test_bad_member_names_are_refused(names):
    with pytest.raises(ValueError, match="appears twice|use letters, digits|no members"):
        check_member_names(names)


def test_members_with_another_class_count_are_refused():
    with pytest.raises(ValueError, match="different class counts"):
        PopulationModule(
            {
                f"c{k}": DistillationModule(
                    student="resnet8", teacher="resnet14", num_classes=k, objective=gompertz_cnn()
                )
                for k in (10, 100)
            }
        )


POPULATION_CONFIGS = sorted(p.stem for p in (CONFIG_DIR / "population").glob("*.yaml"))


def test_population_configs_compose_their_members():
    assert {
        "schedules_kd",
        "paper_table",
        "study_kd",
        "study_dkd",
        "study_tuned",
        "study_cnn",
        "study_dist",
    } <= set(POPULATION_CONFIGS)
    for name in POPULATION_CONFIGS:
        cfg = compose_cfg([f"population={name}"])
        members = member_names(cfg.population)
        assert len(members) >= 3 and all(o for o, _ in members.values())
    cfg = compose_cfg(["population=schedules_kd", "population.seeds=[0,1,2]"])
    assert len(member_names(cfg.population)) == 12
    assert OmegaConf.select(cfg, "population.name") == "schedules_kd"


@pytest.mark.parametrize("name", POPULATION_CONFIGS)
def test_every_population_config_composes_and_builds_its_members(name):
    from gompertz_kd.population import compose_members
    from gompertz_kd.train import check_config

    experiment = "c100_resnet50_mbv2" if name == "paper_table" else "c10cpu_long"
    overrides = [f"experiment={experiment}", f"population={name}"]
    cfg = compose_cfg(overrides)
    members = compose_members(cfg, overrides)
    objectives = {n: check_config(c) for n, (c, _) in members.items()}
    if len(cfg.population.members) > 1:  # one member replicated over seeds: one objective
        assert len(set(map(repr, (o.weights_at(0.05) for o in objectives.values())))) > 1


@pytest.mark.slow  # for its time; `make test-full` runs it
def test_cli_population_multirun_writes_every_member_of_every_job(tiny_c10, cache, tmp_path):
    sweep = tmp_path / "sweep"
    overrides = [o for o in base(tiny_c10, sweep, cache) if not o.startswith("paths.output_dir")]
    proc = subprocess.run(
        [sys.executable, "-m", "gompertz_kd.run", "-m", *overrides, "population=schedules_kd",
         "trainer.max_epochs=1", "seed=0,1", f"hydra.sweep.dir={sweep}"],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    for job, seed in (("0", 0), ("1", 1)):
        written = sorted(p.parent.name for p in (sweep / job).glob("members/*/results.json"))
        assert written == ["kd_cosine", "kd_gompertz", "kd_linear", "kd_static"]
        results = json.loads((sweep / job / "members" / "kd_linear" / "results.json").read_text())
        assert "schedule=linear" in results["overrides"] and results["data_seed"] == seed
    assert len(load_runs([sweep])) == 8


@pytest.mark.slow  # for its time; `make test-full` runs it
def test_population_trains_under_ddp_on_two_cpu_processes(tiny_c10, cache, tmp_path):
    run_dir = tmp_path / "ddp"
    overrides = [o for o in base(tiny_c10, run_dir, cache) if not o.startswith("paths.output_dir")]
    members = "{kd: ['method=gkd', 'schedule=gompertz'], fitnet: ['method=fitnet']}"
    proc = subprocess.run(
        [sys.executable, "-m", "gompertz_kd.run", *overrides, "trainer=ddp_cpu",
         "trainer.max_epochs=1", f"+population.members={members}", f"hydra.run.dir={run_dir}"],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("kd", "fitnet"):
        results = json.loads((run_dir / "members" / name / "results.json").read_text())
        assert results["status"] == "completed" and results["test"]["top1"] is not None


def test_trajectory_member_follows_its_own_student(tiny_c10, cache, tmp_path):
    """Progress modes are per member: a trajectory member beside a clock member ends as its own
    single run, logged weights included."""
    trajectory = [
        "method=gkd",
        "schedule=gompertz",
        "callbacks.gompertz_weight.progress=trajectory",
    ]
    run = population(
        tiny_c10, tmp_path / "population", cache, {"clock": MEMBERS["kd"], "traj": trajectory}
    )
    single = run_training(compose_cfg([*base(tiny_c10, tmp_path / "single", cache), *trajectory]))
    want, got = single.module.state_dict(), run.module.members["traj"].state_dict()
    assert all(torch.equal(want[k], got[k]) for k in want)

    def logged(path, column):
        with open(path) as f:
            return [r[column] for r in csv.DictReader(f) if r.get(column)]

    member = logged(
        tmp_path / "population" / "members" / "traj" / "csv" / "metrics.csv", "kd_weight"
    )
    alone = logged(tmp_path / "single" / "csv" / "metrics.csv", "kd_weight")
    assert member == alone and len(set(member)) > 1
    clock = logged(
        tmp_path / "population" / "members" / "clock" / "csv" / "metrics.csv", "kd_weight"
    )
    assert clock != member


def test_non_finite_member_is_skipped_or_named(tiny_c10, cache, tmp_path):
    members = {
        "ok": ["method=kd"],
        "bad": ["method=kd", "method.mixing=additive", "method.terms.kd.scale=1e39"],
    }
    run = population(tiny_c10, tmp_path / "skip", cache, members, "model.nonfinite=skip")
    assert run.module.members["bad"].skipped_batches == 10  # every step of 2 epochs
    assert run.module.members["ok"].skipped_batches == 0
    single = run_training(
        compose_cfg(
            [*base(tiny_c10, tmp_path / "single", cache), "method=kd", "model.nonfinite=skip"]
        )
    )
    want, got = single.module.student.state_dict(), run.module.members["ok"].student.state_dict()
    assert all(torch.equal(want[k], got[k]) for k in want)  # the bad member does not touch it
    with pytest.raises(NonFiniteLossError, match="population member 'bad': non-finite loss"):
        population(tiny_c10, tmp_path / "stop", cache, members)


def test_sync_every_reads_the_members_flags_every_k_steps(tiny_c10, cache, tmp_path):
    # no host sync in the step: the same training as checking every step ...
    members = {"kd": ["method=kd"], "fitnet": ["method=fitnet"]}
    every = population(tiny_c10, tmp_path / "every", cache, members)
    deferred = population(tiny_c10, tmp_path / "deferred", cache, members, "model.sync_every=4")
    for name in members:
        want = every.module.members[name].state_dict()
        got = deferred.module.members[name].state_dict()
        assert all(torch.equal(want[k], got[k]) for k in want), name
    # ... and a bad member is named at the next check, before any checkpoint after its step
    bad = {
        "ok": ["method=kd"],
        "bad": ["method=kd", "method.mixing=additive", "method.terms.kd.scale=1e39"],
    }
    with pytest.raises(NonFiniteLossError, match=r"population members \['bad'\]: non-finite"):
        population(tiny_c10, tmp_path / "bad", cache, bad, "model.sync_every=3")
    assert not list((tmp_path / "bad").glob("checkpoints/*.ckpt"))


def test_cli_population_run(tiny_c10, cache, tmp_path):
    run_dir = tmp_path / "cli"
    overrides = [o for o in base(tiny_c10, run_dir, cache) if not o.startswith("paths.output_dir")]
    proc = subprocess.run(
        [sys.executable, "-m", "gompertz_kd.run", *overrides, "population=schedules_kd",
         "trainer.max_epochs=1", f"hydra.run.dir={run_dir}"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    written = sorted(p.parent.name for p in run_dir.glob("members/*/results.json"))
    assert written == ["kd_cosine", "kd_gompertz", "kd_linear", "kd_static"]
    results = json.loads((run_dir / "members" / "kd_linear" / "results.json").read_text())
    assert "schedule=linear" in results["overrides"]


def test_the_entry_point_chooses_the_run_and_the_single_run_refuses_a_population(tmp_path):
    from gompertz_kd import run

    cfg = compose_cfg(
        [f"paths.output_dir={tmp_path / 'run'}", "+population.members={a: ['method=kd']}"]
    )
    with pytest.raises(ValueError, match="holds a population"):
        run_training(cfg)
    assert not (tmp_path / "run").exists()
    bad = compose_cfg(["+population.members={a: ['method=kd']}", "+population.fuse=often"])
    with pytest.raises(ValueError, match="population.fuse='often' must be auto, true or false"):
        run.run_config(bad)  # the population's own checks: run_config chose the population
