"""Population-based training of the distillation weight (gompertz_kd.pbt) on the tiny recipe."""

import copy
import csv
import importlib.util
import json
import math
import os
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
from gompertz_kd.pbt import PBTController, PBTSettings
from gompertz_kd.population import run_population
from gompertz_kd.report import load_runs, pbt_lineages, write_report
from gompertz_kd.schedules import Piecewise

from helpers import tiny_kd_overrides

TESTS = Path(__file__).resolve().parent

DIST = "{dist: ['method=dist']}"
STEPS_PER_EPOCH = 3  # 20 tiny training images, 8 held out for val, batch 4


def base(root, out, cache, epochs=2):
    overrides = [
        o for o in tiny_kd_overrides(root, out, cache, max_epochs=epochs) if o != "method=gkd"
    ]
    return [
        *overrides,
        "data.val_split=8",
        "trainer.deterministic=true",
        "trainer.log_every_n_steps=1",
    ]


def compose_cfg(extra):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose("train", overrides=extra)


def pbt_run(root, out, cache, *extra, epochs=2, members="{dist: ['method=dist']}", seeds="[0,1]"):
    """A PBT population of DIST members on the tiny recipe, as the command line runs it."""
    overrides = [*base(root, out, cache, epochs), *extra]
    cfg = compose_cfg(
        [
            *overrides,
            "+population.name=pbt_test",
            f"+population.members={members}",
            f"+population.seeds={seeds}",
            "+population.pbt.interval=1",
            "+population.pbt.quantile=0.5",
        ]
    )
    return run_population(cfg, base_overrides=overrides)


def column(path, name):
    with open(path, newline="") as f:
        return [(int(r["step"]), float(r[name])) for r in csv.DictReader(f) if r.get(name)]


@pytest.mark.parametrize("fuse", ["false", "true"])
def test_a_copied_member_takes_everything_from_its_source(tiny_c10, cache, tmp_path, fuse):
    # factors [1] and no resampling: after the copy the two members are the same member, so
    # they must end bit-equal (student, BatchNorm statistics, momentum, term state)
    run = pbt_run(
        tiny_c10, tmp_path / "run", cache,
        "+population.pbt.factors=[1.0]", "+population.pbt.resample_probability=0",
        f"+population.fuse={fuse}",
    )  # fmt: skip
    (event,) = [e for n in ("dist_s0", "dist_s1") for e in run.results[n]["pbt"]["events"]]
    loser = next(n for n in ("dist_s0", "dist_s1") if run.results[n]["pbt"]["events"])
    winner = event["copied_from"]
    assert winner != loser and event["epoch"] == 1 and event["step"] == STEPS_PER_EPOCH
    assert event["score"] <= event["source_score"]
    a, b = (run.module.members[n].state_dict() for n in (loser, winner))
    if fuse == "false":
        assert all(torch.equal(a[k], b[k]) for k in a)
    else:  # one fused network: the copy feeds the members' own tensors, which it reads each step
        assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-6) for k in a)
    # its weight history is its source's, and it trained with its source's weight after the copy
    record = run.results[loser]["pbt"]
    assert record["values"] == run.results[winner]["pbt"]["values"]
    run_dir = tmp_path / "run" / "members"
    weights = dict(column(run_dir / loser / "csv" / "metrics.csv", "dist_weight"))
    source = dict(column(run_dir / winner / "csv" / "metrics.csv", "dist_weight"))
    after = [s for s in weights if s >= STEPS_PER_EPOCH]
    assert after and all(weights[s] == source[s] for s in after)
    assert weights[0] != source[0]  # they started from their own draws
    # the copied member's best checkpoint is its source's (renamed), written whole
    best = torch.load(run_dir / loser / "checkpoints" / "best.ckpt", weights_only=True)
    assert best["member"] == loser
    summary = json.loads((tmp_path / "run" / "pbt.json").read_text())
    assert summary["winner"] in (loser, winner) and len(summary["rounds"]) == 1
    assert summary["rounds"][0]["copies"] == {loser: winner}
    assert not list(run_dir.glob("*/checkpoints/*.partial"))


def test_explore_perturbs_the_copied_weight_and_the_replay_schedule_is_its_history(
    tiny_c10, cache, tmp_path
):
    run = pbt_run(tiny_c10, tmp_path / "run", cache, "+population.pbt.resample_probability=0",
                  epochs=3)  # fmt: skip
    summary = json.loads((tmp_path / "run" / "pbt.json").read_text())
    assert [r["epoch"] for r in summary["rounds"]] == [1, 2]
    for name, record in summary["lineage"].items():
        boundaries, values = record["boundaries"], record["values"]["dist"]
        assert len(values) == len(boundaries) + 1
        for event in record["events"]:
            explore = event["explore"]["dist"]
            assert 0.25 <= explore["value"] <= 4.0
            if explore["how"] == "resample":  # no factor gave the copy weights of its own
                assert explore["instead_of"]["how"] == "perturb"
                continue
            assert explore["factor"] in (0.8, 1.2)
            # the weight before the copy's boundary is the source's then; after it, times factor
            # (no boundary: the clipped value did not move, so the history holds it unchanged)
            if event["member"] != name:
                continue  # an ancestor's copy, checked in its own lineage's terms below
            if event["progress"] in boundaries:
                i = boundaries.index(event["progress"])
                want = min(max(values[i] * explore["factor"], 0.25), 4.0)
                assert values[i + 1] == pytest.approx(want) == explore["value"]
            else:
                assert explore["value"] in values
        # since its last copy, the logged weight is the lineage's schedule at each step's progress
        # (before it, the member followed the lineage it then replaced)
        logged = column(tmp_path / "run" / "members" / name / "csv" / "metrics.csv", "dist_weight")
        schedule = Piecewise(tuple(boundaries), tuple(values))
        total = 3 * STEPS_PER_EPOCH
        since = max((e["step"] for e in record["events"] if e["member"] == name), default=0)
        assert [s for s, _ in logged if s >= since]
        for step, weight in (x for x in logged if x[0] >= since):
            assert weight == pytest.approx(schedule(step / total), rel=1e-6), (name, step)
    assert any(r["events"] for r in summary["lineage"].values())
    replay = summary["replay"]
    winner = summary["lineage"][summary["winner"]]
    assert replay["overrides"] == [
        "method=dist",
        f'method.terms.dist.schedule="{winner["schedules"]["dist"]}"',
    ]
    assert run.results[summary["winner"]]["pbt"]["winner"] is True
    # the report draws every lineage from the members' results.json alone
    runs = load_runs([tmp_path / "run" / "members"])
    marks = sorted(r.config.split("]")[0] + "]" for r in runs)
    assert marks == ["[PBT member]", "[PBT winner]"]  # a member is no run of its overrides
    assert set(pbt_lineages(runs)) == {str(tmp_path / "run")}
    write_report(runs, tmp_path / "report")
    assert (tmp_path / "report" / "pbt_lineage.png").stat().st_size > 0
    assert "PBT weight lineages" in (tmp_path / "report" / "report.md").read_text()
    # docs/pbt.md's table script reads the same files: the winner's schedule is its lineage's
    pbt_table = _load_pbt_table()
    winner_row, members_row = pbt_table.pbt_rows(tmp_path / "run")
    shown = pbt_table._short(winner["schedules"]["dist"])  # its numbers at 6 digits
    assert f"winner `{summary['winner']}`" in winner_row and f"`{shown}`" in winner_row
    assert "all 2 members" in members_row and "2 rounds" in members_row


def test_control_members_train_untouched_beside_the_pbt_members(tiny_c10, cache, tmp_path):
    # one control: the twin of dist_s0 (its overrides and init seed) at DIST's own weight
    run = pbt_run(tiny_c10, tmp_path / "run", cache, "+population.pbt.controls=1", epochs=3)
    assert list(run.results) == ["dist_s0", "dist_s1", "dist_control_s0"]
    summary = json.loads((tmp_path / "run" / "pbt.json").read_text())
    assert summary["members"] == ["dist_s0", "dist_s1"]
    assert summary["controls"] == ["dist_control_s0"]
    assert all("dist_control_s0" not in r["scores"] for r in summary["rounds"])
    assert all("dist_control_s0" not in r["copies"].values() for r in summary["rounds"])
    control = run.results["dist_control_s0"]
    assert "pbt" not in control and control["seed"] == 0 and control["name"] == "dist_control"
    logged = column(tmp_path / "run" / "members" / "dist_control_s0" / "csv" / "metrics.csv",
                    "dist_weight")  # fmt: skip
    assert logged and {w for _, w in logged} == {1.0}  # DIST's published weight, every step
    # the control is the plain member: bit-equal to dist_s0 trained in a population without PBT
    overrides = base(tiny_c10, tmp_path / "plain", cache, 3)
    cfg = compose_cfg([*overrides, "+population.members={dist: ['method=dist']}",
                       "+population.seeds=[0]"])  # fmt: skip
    plain = run_population(cfg, base_overrides=overrides)
    a = run.module.members["dist_control_s0"].state_dict()
    b = plain.module.members["dist_s0"].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert control["test"] == plain.results["dist_s0"]["test"]
    # pbt.json weighs the winner against the control on the test split
    test = summary["evidence"]["test"]
    winner = summary["winner"]
    assert test["winner"] == run.results[winner]["test"]["top1"]
    assert test["controls"] == {"dist_control_s0": control["test"]["top1"]}
    gap = 100 * (run.results[winner]["test"]["top1"] - control["test"]["top1"])
    assert test["winner_minus_controls"] == pytest.approx(gap)
    rows = _load_pbt_table().pbt_rows(tmp_path / "run")
    assert len(rows) == 3 and "1 in-run controls" in rows[2] and f"{gap:+.2f} points" in rows[2]
    # the controls change nothing for the PBT members: the same decisions, the same students
    alone = pbt_run(tiny_c10, tmp_path / "alone", cache, epochs=3)
    assert json.loads((tmp_path / "alone" / "pbt.json").read_text())["rounds"] == summary["rounds"]
    for name in summary["members"]:
        want = alone.module.members[name].state_dict()
        got = run.module.members[name].state_dict()
        assert all(torch.equal(want[k], got[k]) for k in want), name
    # a copied member keeps what it followed before the copy
    copied = [n for n in summary["members"] if summary["lineage"][n]["events"]]
    for name in copied:
        replaced = summary["lineage"][name]["replaced"]
        assert replaced and replaced[0]["origin"] == name and replaced[0]["epoch"] == 1
        own = [e for e in summary["lineage"][name]["events"] if e["member"] == name]
        assert replaced[-1]["until"] == own[-1]["progress"]  # the copy that made its lineage
        assert replaced[0]["until"] == summary["rounds"][0]["progress"]
        # what it followed until then: its own starting draw, logged on its first steps
        logged = dict(column(tmp_path / "run" / "members" / name / "csv" / "metrics.csv",
                             "dist_weight"))  # fmt: skip
        assert replaced[0]["values"]["dist"][0] == pytest.approx(logged[0], rel=1e-6)


@pytest.mark.parametrize(
    ("members", "seeds", "controls", "want"),
    [
        ({"kd": ["method=kd"]}, [3, 4], 2, ["kd_s3", "kd_s4", "kd_control_s3", "kd_control_s4"]),
        ({"kd": ["method=kd"]}, None, 1, ["kd", "kd_control"]),
        ({"a": {"overrides": ["method=kd"], "seed": 5}, "b": {"overrides": ["method=kd"], "seed": 6}},
         None, 1, ["a", "b", "a_control"]),
    ],
)  # fmt: skip
def test_control_members_are_named_after_their_twins(members, seeds, controls, want):
    from omegaconf import OmegaConf

    from gompertz_kd.population import member_names

    population = OmegaConf.create(
        {"members": members, "seeds": seeds, "pbt": {"controls": controls}}
    )
    names = member_names(population)
    assert list(names) == want
    twin = {n: v for n, v in names.items() if "control" not in n}
    for name, (overrides, seed) in names.items():
        if "control" in name:  # the same overrides and init seed as the member it twins
            assert (overrides, seed) in twin.values()
    assert list(member_names(population, with_controls=False)) == [n for n in want if n in twin]


def test_a_control_named_like_a_member_or_a_fractional_count_is_refused():
    from omegaconf import OmegaConf

    from gompertz_kd.population import member_names

    clash = {"kd": ["method=kd"], "kd_control": ["method=kd"]}
    with pytest.raises(ValueError, match="would be named 'kd_control_s0'.*rename that member"):
        member_names(OmegaConf.create({"members": clash, "seeds": [0], "pbt": {"controls": 1}}))
    with pytest.raises(ValueError, match="controls=1.5 must be a whole number"):
        member_names(
            OmegaConf.create({"members": {"kd": []}, "seeds": [0], "pbt": {"controls": 1.5}})
        )


def test_resuming_a_population_of_other_members_is_refused_naming_them():
    from gompertz_kd.checkpoints import CheckpointError
    from gompertz_kd.population import check_checkpoint_members

    state = {f"members.{n}.student.fc.weight": torch.zeros(1) for n in ("kd_s0", "kd_s1")}
    resume = (Path("last.ckpt"), "last.ckpt", {"state_dict": state})
    check_checkpoint_members(resume, ["kd_s0", "kd_s1"])  # the same members: fine
    check_checkpoint_members(None, ["kd_s0"])  # nothing to resume
    run = ["kd_s0", "kd_s1", "kd_control_s0", "kd_control_s1"]
    with pytest.raises(CheckpointError, match=r"without the PBT control members .*controls=0"):
        check_checkpoint_members(resume, run, ["kd_control_s0", "kd_control_s1"])
    with pytest.raises(CheckpointError, match=r"holds the population members \['kd_s0', 'kd_s1'\]"):
        check_checkpoint_members(resume, ["kd_s0", "kd_s2"])


def _load_pbt_table():
    spec = importlib.util.spec_from_file_location(
        "pbt_table", TESTS.parent / "scripts" / "pbt_table.py"
    )
    pbt_table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pbt_table)
    return pbt_table


def test_pbt_table_pairs_a_replay_with_each_study_arm_by_seed(tmp_path):
    def member(folder, name, arm, seed, top1):
        path = tmp_path / folder / name / "results.json"
        path.parent.mkdir(parents=True)
        results = {"status": "completed", "name": arm, "seed": seed, "test": {"top1": top1}}
        path.write_text(json.dumps(results))

    for seed, top1 in ((0, 0.82), (1, 0.81), (2, 0.83)):
        member("replay", f"replay_s{seed}", "replay", seed, top1)
    for seed, top1 in ((0, 0.80), (1, 0.81)):  # seed 2 missing: not paired
        member("study", f"static_s{seed}", "static", seed, top1)
    member("study", "linear_s5", "linear", 5, 0.9)  # no seed in common: no row
    pbt_table = _load_pbt_table()
    lines = pbt_table.paired_rows([tmp_path / "replay"], [tmp_path / "study"])
    assert lines[2:] == ["| `replay` − `static` | 0, 1 | +2.00, +0.00 | +1.00 ± 1.41 |"]
    assert pbt_table._short("piecewise(0.5125153079429632, 0.2:0.41001224635437056)") == (
        "piecewise(0.512515, 0.2:0.410012)"
    )
    # a static arm tried after a run is shown and paired, labelled as what it is, not a replay
    member("static_low", "dist_w03_s0", "dist_w03", 0, 0.83)
    rows = pbt_table.arm_rows(tmp_path / "static_low", "from scratch")
    assert rows == ["| from scratch `dist_w03` | 1 | 83.00 | — | seeds 0 |"]
    paired = pbt_table.paired_rows([tmp_path / "static_low"], [tmp_path / "study"])
    assert paired[2:] == ["| `dist_w03` − `static` | 0 | +3.00 | +3.00 |"]


def test_factor_arithmetic_of_one_round():
    settings = PBTSettings(quantile=0.5, resample_probability=0.0, factors=(0.8, 1.2))
    controller = PBTController(settings, ["a", "b", "c", "d"], ["kd"], seed=3)
    decisions = controller.decide({"a": 0.1, "b": 0.9, "c": 0.5, "d": 0.2})
    # the bottom half (d, a: lowest scores) copy from the top half (b, c)
    assert [d[0] for d in decisions] == ["d", "a"]
    assert all(d[1] in ("b", "c") for d in decisions)
    assert all(d[2]["kd"]["factor"] in (0.8, 1.2) for d in decisions)
    again = PBTController(settings, ["a", "b", "c", "d"], ["kd"], seed=3)
    assert again.decide({"a": 0.1, "b": 0.9, "c": 0.5, "d": 0.2}) == decisions
    state = controller.state_dict()
    after = controller.decide({"a": 0.3, "b": 0.2, "c": 0.1, "d": 0.0})
    again.load_state_dict(state)
    assert again.decide({"a": 0.3, "b": 0.2, "c": 0.1, "d": 0.0}) == after


def test_a_copy_never_becomes_a_twin_of_its_source_or_of_another_copier():
    # every member sees the same batches: equal weights on one student would train in lockstep
    settings = PBTSettings(quantile=0.5, factors=(0.8, 1.2), low=0.25, high=4.0)
    controller = PBTController(settings, ["a", "b", "c", "d", "e", "f"], ["kd"], seed=0)
    for name, value in zip("abcdef", (0.25, 2.0, 1.0, 1.0, 1.0, 1.0), strict=True):
        controller.lineage[name] = {"origin": name, "boundaries": [], "values": {"kd": [value]}}
    perturb = {"kd": {"how": "perturb", "factor": 0.8}}
    bounds = {"kd": (0.25, 4.0)}
    out = controller.explore([("c", "b", perturb), ("d", "b", perturb), ("e", "b", perturb)],
                             bounds)  # fmt: skip
    # the first keeps its draw; the second takes the other factor; the third, with both taken,
    # a fresh draw; each records what it drew first
    assert out["c"]["kd"] == {"how": "perturb", "factor": 0.8, "value": pytest.approx(1.6)}
    assert out["d"]["kd"]["factor"] == 1.2 and out["d"]["kd"]["value"] == pytest.approx(2.4)
    assert out["d"]["kd"]["instead_of"] == {"how": "perturb", "factor": 0.8}
    assert out["e"]["kd"]["how"] == "resample" and 0.25 <= out["e"]["kd"]["value"] <= 4.0
    assert out["e"]["kd"]["value"] not in (2.0, pytest.approx(1.6), pytest.approx(2.4))
    # clipped back onto its source's weight at the lower bound: the factor that moves it
    out = controller.explore([("f", "a", perturb)], bounds)
    assert out["f"]["kd"]["factor"] == 1.2 and out["f"]["kd"]["value"] == pytest.approx(0.3)
    # copiers of different sources may share a weight (their students differ)
    out = controller.explore(
        [("e", "b", perturb), ("f", "c", {"kd": {"how": "perturb", "factor": 1.6}})], bounds
    )
    assert out["e"]["kd"]["value"] == pytest.approx(out["f"]["kd"]["value"]) == pytest.approx(1.6)
    assert "instead_of" not in out["e"]["kd"] and "instead_of" not in out["f"]["kd"]
    # factor 1 and no resampling ask for exploitation alone: the twin is kept
    exploit_only = PBTController(PBTSettings(quantile=0.5, factors=(1.0,), resample_probability=0),
                                 ["a", "b", "c", "d", "e", "f"], ["kd"], seed=0)  # fmt: skip
    exploit_only.lineage = copy.deepcopy(controller.lineage)
    one = {"kd": {"how": "perturb", "factor": 1.0}}
    assert exploit_only.explore([("f", "b", one)], bounds)["f"]["kd"] == {**one["kd"], "value": 2.0}
    # the same decisions from the same state explore alike (a resumed run repeats them)
    again = PBTController(settings, ["a", "b", "c", "d", "e", "f"], ["kd"], seed=0)
    again.lineage = copy.deepcopy(controller.lineage)
    triple = [("c", "b", perturb), ("d", "b", perturb), ("e", "b", perturb)]
    state = controller.state_dict()
    first = controller.explore(triple, bounds)
    again.load_state_dict(state)
    assert again.explore(triple, bounds) == first


def test_a_loss_metric_ranks_low_first():
    settings = PBTSettings(quantile=0.5, metric="val/loss_ce")
    controller = PBTController(settings, ["a", "b", "c", "d"], ["kd"], seed=3)
    decisions = controller.decide({"a": 0.1, "b": 0.9, "c": 0.5, "d": 0.2})
    assert [d[0] for d in decisions] == ["c", "b"]  # the highest losses copy
    assert all(d[1] in ("a", "d") for d in decisions)
    controller.last_scores = {"a": 0.1, "b": 0.9, "c": 0.5, "d": 0.05}
    assert controller.winner() == "d"


@pytest.mark.parametrize("where", ["step", "validation"])
def test_interrupted_pbt_run_resumes_exactly(tiny_c10, cache, tmp_path, where):
    full = pbt_run(tiny_c10, tmp_path / "full", cache, epochs=3)
    run_dir = tmp_path / "interrupted"
    if where == "step":  # in epoch 2, after the first exploit
        killer = [
            "+callbacks.kill._target_=helpers.SendSignalAt",
            f"+callbacks.kill.step={STEPS_PER_EPOCH + 1}",
        ]
    else:  # during the validation whose scores decide the second exploit
        killer = [
            "+callbacks.kill._target_=helpers.SendSignalInValidation",
            "+callbacks.kill.epoch=1",
        ]
    killer.append(f"+callbacks.kill.signum={int(signal.SIGTERM)}")
    with pytest.raises(RunInterrupted):
        pbt_run(tiny_c10, run_dir, cache, *killer, epochs=3)
    # the rounds so far are in pbt.json, marked interrupted (a signal in validation stops the run
    # after the next training batch: that validation's exploit ran)
    interim = json.loads((run_dir / "pbt.json").read_text())
    rounds = [1] if where == "step" else [1, 2]
    assert interim["status"] == "interrupted" and [r["epoch"] for r in interim["rounds"]] == rounds
    resumed = pbt_run(tiny_c10, run_dir, cache, "ckpt_path=last", epochs=3)
    for name in full.module.members:
        want = full.module.members[name].state_dict()
        got = resumed.module.members[name].state_dict()
        assert all(torch.equal(want[k], got[k]) for k in want), name
        assert resumed.results[name]["pbt"] == full.results[name]["pbt"]
    a = json.loads((tmp_path / "full" / "pbt.json").read_text())
    b = json.loads((run_dir / "pbt.json").read_text())
    assert a["rounds"] == b["rounds"] and a["lineage"] == b["lineage"]
    assert a["status"] == b["status"] == "completed"
    assert resumed.module.best == full.module.best


def test_hard_killed_pbt_run_resumes_from_the_epoch_end_checkpoint_exactly(
    tiny_c10, cache, tmp_path
):
    # SIGKILL mid epoch 3, no handler and no mid-epoch checkpoint: the resume starts from the
    # checkpoint written at the end of epoch 2, which must already hold that epoch's exploit step
    full = pbt_run(tiny_c10, tmp_path / "full", cache, epochs=3)
    run_dir = tmp_path / "killed"
    overrides = [o for o in base(tiny_c10, run_dir, cache, 3) if not o.startswith("paths.output")]
    spec = [
        f"+population.members={DIST}", "+population.seeds=[0,1]", "+population.name=pbt_test",
        "+population.pbt.interval=1", "+population.pbt.quantile=0.5",
        f"hydra.run.dir={run_dir}",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(TESTS), "OMP_NUM_THREADS": str(torch.get_num_threads())}
    killer = [
        "+callbacks.kill._target_=helpers.KillAt",
        f"+callbacks.kill.step={2 * STEPS_PER_EPOCH + 1}",
    ]
    proc = subprocess.run(
        [sys.executable, "-m", "gompertz_kd.run", *overrides, *spec, *killer],
        capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env,
    )  # fmt: skip
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    (controller,) = [v for k, v in state["callbacks"].items() if k == "PBTController"]
    assert [r["epoch"] for r in controller["rounds"]] == [1, 2]
    resumed = pbt_run(tiny_c10, run_dir, cache, "ckpt_path=last", epochs=3)
    for name in full.module.members:
        want = full.module.members[name].state_dict()
        got = resumed.module.members[name].state_dict()
        assert all(torch.equal(want[k], got[k]) for k in want), name
        assert resumed.results[name]["pbt"] == full.results[name]["pbt"]


@pytest.mark.parametrize(
    ("extra", "seeds", "members", "message"),
    [
        (["+population.pbt.interval=2"], "[0,1]", None, "interval=2 is not shorter than the run"),
        (["+population.pbt.quantile=0.6"], "[0,1]", None, "quantile=0.6 must be in"),
        (["+population.pbt.quantile=0.25"], "[0,1,2]", None, "use at least 4 members"),
        (["data.val_split=0"], "[0,1]", None, "set data.val_split"),
        (["+population.pbt.often=1"], "[0,1]", None, "population.pbt has no setting often"),
        (["+population.pbt.terms=[kd]"], "[0,1]", None, "population.pbt.terms=\\['kd'\\]"),
        ([], "[0,1]", "{dist: ['method=dist'], kd: ['method=kd']}", "PBT members train one method"),
        (["+population.pbt.low=0"], "[0,1]", None, "low=0.0 must be > 0"),
        (["+population.pbt.metric=val/acc"], "[0,1]", None, "metric='val/acc' must be one of"),
        (["+population.pbt.controls=3"], "[0,1]", None, "controls=3: .* use at most 2"),
        (["+population.pbt.controls=-1"], "[0,1]", None, "controls=-1 must be a count"),
        (["+trainer.val_check_interval=0.5"], "[0,1]", None, "val_check_interval=0.5"),
        (["+trainer.limit_val_batches=0"], "[0,1]", None, "limit_val_batches=0"),
        (
            [], "[0,1]", "{dist: ['method=dist'], big: ['method=dist', 'method.terms.dist.scale=2']}",
            "differ in their objective",
        ),
        (
            ["+population.pbt.low=1.5"], "[0,1]", "{kd: ['method=kd'], kd2: ['method=kd']}",
            "at most 1.11111",
        ),
        (
            ["callbacks.gompertz_weight.progress=trajectory"], "[0,1]", None,
            "PBT owns the weights as a function of the clock",
        ),
    ],
)  # fmt: skip
def test_bad_pbt_settings_fail_before_any_teacher_work(tiny_c10, tmp_path, extra, seeds, members,
                                                       message):  # fmt: skip
    cache = tmp_path / "never_filled"
    overrides = [*base(tiny_c10, tmp_path / "run", cache), *extra]
    pbt = [o for o in overrides if o.startswith("+population.pbt.")]
    rest = [o for o in overrides if not o.startswith("+population.pbt.")]
    defaults = {"interval": "1", "quantile": "0.5"}
    given = {o.split("=", 1)[0].rsplit(".", 1)[1] for o in pbt}
    pbt += [f"+population.pbt.{k}={v}" for k, v in defaults.items() if k not in given]
    cfg = compose_cfg(
        [*rest, *pbt, "+population.name=bad",
         f"+population.members={members or DIST}",
         *([f"+population.seeds={seeds}"] if members is None else [])]
    )  # fmt: skip
    with pytest.raises(ValueError, match=message):
        run_population(cfg, base_overrides=rest)
    assert not cache.exists() or not list(cache.iterdir())


@pytest.mark.parametrize("name", ["pbt_kd", "pbt_dist", "pbt_dkd"])
def test_pbt_configs_are_valid_for_the_long_recipe(name):
    from gompertz_kd.population import compose_members, pbt_controller
    from gompertz_kd.run_parts import check_config

    overrides = ["experiment=c10cpu_long", f"population={name}"]
    cfg = compose_cfg(overrides)
    members = compose_members(cfg, overrides)
    objectives = {n: check_config(member) for n, (member, _) in members.items()}
    controller = pbt_controller(cfg, members, objectives)  # every check of a real run
    assert controller.settings.interval < cfg.trainer.max_epochs and len(controller.members) >= 8
    assert math.floor(len(controller.members) * controller.settings.quantile) >= 1
    assert controller.controls == [f"{name[4:]}_control_s0", f"{name[4:]}_control_s1"]
    assert list(members) == [*controller.members, *controller.controls]
    assert controller.seed == 0 and controller.terms == list(next(iter(objectives.values())).names)


@pytest.mark.parametrize("name", ["pbt_kd", "pbt_dist"])
def test_the_replay_command_trains_the_winners_weights_from_scratch(name):
    # the lineage's values are multiples of the term's scale: the replay must keep the member's
    # own overrides (pbt_kd's scale 0.9 among them), or it trains other weights
    from gompertz_kd.population import compose_members, member_names, pbt_controller
    from gompertz_kd.run_parts import check_config

    overrides = ["experiment=c10cpu_long", f"population={name}", "trainer.max_epochs=4"]
    cfg = compose_cfg(overrides)
    members = compose_members(cfg, overrides)
    objectives = {n: check_config(member) for n, (member, _) in members.items()}
    controller = pbt_controller(cfg, members, objectives, overrides)
    winner = list(members)[1]
    controller.lineage[winner] = {
        "origin": winner,
        "boundaries": [0.25, 0.5],
        "values": {t: [0.5, 1.1, 0.7] for t in controller.terms},
        "events": [],
    }
    replay = controller.replay(winner, seeds=[5, 6])
    command = shlex.split(replay["command"])
    assert command[:3] == ["python", "-m", "gompertz_kd.run"] and "trainer.max_epochs=4" in command
    args = command[3:]
    replayed = compose_members(compose_cfg(args), args)
    assert [(n, seed) for n, (_, seed) in replayed.items()] == [("replay_s5", 5), ("replay_s6", 6)]
    assert member_names(compose_cfg(args).population)["replay_s5"][0] == replay["overrides"]
    objective = check_config(replayed["replay_s5"][0])
    original = objectives[winner]
    for term in controller.terms:
        assert objective.scales[term] == original.scales[term]
    for progress in (0.0, 0.24, 0.25, 0.6, 1.0):
        want = {
            f"{t}_weight": original.scales[t] * controller.schedule(winner, t)(progress)
            for t in controller.terms
        }
        got = objective.weights_at(progress)
        assert {k: got[k] for k in want} == pytest.approx(want), progress


@pytest.mark.slow  # for its time; `make test-full` runs it
def test_pbt_under_ddp_takes_one_decision_on_every_rank(tiny_c10, cache, tmp_path):
    run_dir = tmp_path / "ddp"
    overrides = [o for o in base(tiny_c10, run_dir, cache) if not o.startswith("paths.output_dir")]
    proc = subprocess.run(
        [sys.executable, "-m", "gompertz_kd.run", *overrides, "trainer=ddp_cpu",
         "+population.members={dist: ['method=dist']}", "+population.seeds=[0,1]",
         "+population.pbt.interval=1", "+population.pbt.quantile=0.5",
         f"hydra.run.dir={run_dir}"],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((run_dir / "pbt.json").read_text())
    assert len(summary["rounds"]) == 1 and summary["winner"] in ("dist_s0", "dist_s1")


@pytest.mark.parametrize(
    "word", ["a=b", "{r: ['x=\"p(1, 0.1:2)\"', 'y']}", "a$b'c`d\\e\"f", "+p.seeds=[0,1]", "it's"]
)
def test_a_replay_command_word_reads_back_in_a_shell(word):
    from gompertz_kd.pbt import _shell_word

    quoted = _shell_word(word)
    out = subprocess.run(["bash", "-c", f"printf %s {quoted}"], capture_output=True, text=True)
    assert out.stdout == word, quoted


def test_pbt_table_leaves_out_runs_without_a_test_score():
    pbt_table = _load_pbt_table()
    assert pbt_table._pct([0.5, None, 0.7]) == "60.00 ± 14.14"
    assert pbt_table._pct([None]) == "—"


def test_pbt_table_refuses_a_run_that_is_not_completed(tmp_path):
    pbt_table = _load_pbt_table()
    (tmp_path / "pbt.json").write_text(json.dumps({"status": "running", "winner": "a"}))
    with pytest.raises(SystemExit, match="running, not completed"):
        pbt_table.pbt_rows(tmp_path)
