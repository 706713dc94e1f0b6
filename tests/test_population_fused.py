"""Fused population members: students of one architecture trained as one network.

``fixtures/golden_population.json`` holds a looped population's weights and BatchNorm statistics
after a few SGD steps on fixed batches, recorded before fused members existed
(``python tests/test_population_fused.py --record``). The looped path must keep reproducing them;
the fused path must reproduce the looped one (the forward bit for bit, the weights after several
steps to float rounding).
"""

from __future__ import annotations

import copy
import json
import signal
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from gompertz_kd.callbacks import RunInterrupted
from gompertz_kd.config import CONFIG_DIR
from gompertz_kd.fused import FusedStudents
from gompertz_kd.module import DistillationModule
from gompertz_kd.population import PopulationModule

GOLDEN = Path(__file__).parent / "fixtures" / "golden_population.json"
STEPS = 3
NUM_CLASSES = 10
# name -> method config; gkd_gm needs the teacher's input gradient (a double backward: looped)
MEMBERS = {"kd": "kd", "gkd": "gkd", "fitnet": "fitnet", "gm": "gkd_gm", "alone": "student"}


def _objective(method: str):
    from gompertz_kd.run_parts import build_objective

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return build_objective(compose("train", overrides=[f"method={method}"]))


def build_members(names=tuple(MEMBERS), student: str = "resnet8") -> dict[str, DistillationModule]:
    """Members on the CPU pair, each initialised from its own seed; one random teacher."""
    members = {}
    for seed, name in enumerate(names):
        objective = _objective(MEMBERS[name])
        torch.manual_seed(100 + seed)
        members[name] = DistillationModule(
            student=student,
            teacher="resnet20" if objective.terms else None,
            num_classes=NUM_CLASSES,
            objective=objective,
            lr=0.01,
        )
    teachers = [m.teacher for m in members.values() if m.teacher is not None]
    calibrate(teachers[0])
    for t in teachers[1:]:
        t.load_state_dict(teachers[0].state_dict())
    return members


@torch.no_grad()
def calibrate(teacher: torch.nn.Module) -> None:
    """BatchNorm statistics of the random teacher from two random batches, so that its logits
    have the scale of a trained network's (a random network's explode, and so would rounding)."""
    for m in teacher.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None
    teacher.train()
    g = torch.Generator().manual_seed(99)
    for _ in range(2):
        teacher(torch.randn(16, 3, 32, 32, generator=g))
    teacher.eval()


def batches(n: int = STEPS, size: int = 8):
    g = torch.Generator().manual_seed(11)
    return [
        (
            torch.randn(size, 3, 32, 32, generator=g),
            torch.randint(0, NUM_CLASSES, (size,), generator=g),
        )
        for _ in range(n)
    ]


def train_steps(population: PopulationModule, data) -> None:
    """The population's step without Lightning: weights from progress, the members' losses (the
    teacher once), one backward of their sum, one SGD step."""
    optimizer = population.configure_optimizers()["optimizer"]
    population.train()
    for step, (images, targets) in enumerate(data):
        for member in population.members.values():
            member.set_progress(0.3 + 0.2 * step)
        optimizer.zero_grad(set_to_none=True)
        losses = population.member_losses(images, targets, step)
        total = sum(population.members[n].weighted_total(t) for n, (_, t, _) in losses.items())
        total.backward()
        optimizer.step()


def digest(population: PopulationModule) -> dict[str, dict[str, list[float]]]:
    """Per member, per student parameter and buffer: its sum and its sum of squares (float64)."""
    out = {}
    for name, member in population.members.items():
        state = member.student.state_dict()
        out[name] = {
            k: [float(v.double().sum()), float(v.double().square().sum())] for k, v in state.items()
        }
    return out


@pytest.fixture(autouse=True)
def one_thread():
    """Reductions split over threads round differently: the golden values are single-threaded."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def looped_population() -> PopulationModule:
    population = PopulationModule(build_members(), fuse=False)
    train_steps(population, batches())
    return population


def test_looped_population_reproduces_its_recorded_weights():
    expected = json.loads(GOLDEN.read_text())
    got = digest(looped_population())
    assert set(got) == set(expected)
    for name in expected:
        assert set(got[name]) == set(expected[name]), name
        for key, values in expected[name].items():
            assert got[name][key] == pytest.approx(values, rel=1e-5, abs=1e-6), (name, key)


if __name__ == "__main__" and "--record" in sys.argv:
    torch.set_num_threads(1)
    GOLDEN.write_text(json.dumps(digest(looped_population()), indent=1) + "\n")


def test_fused_forward_and_batchnorm_statistics_equal_each_members_own():
    members = build_members(("kd", "gkd", "fitnet"))
    students = [m.student for m in members.values()]
    alone = [copy.deepcopy(s) for s in students]
    fused = FusedStudents(students)
    images = members["kd"]._format(batches(1)[0][0])
    outs = fused(images)
    for own, out in zip(alone, outs, strict=True):
        want = own.forward_stages(images)
        assert torch.equal(want.logits, out.logits) and torch.equal(want.pooled, out.pooled)
        assert all(torch.equal(a, b) for a, b in zip(want.features, out.features, strict=True))
    for own, student in zip(alone, students, strict=True):
        want, got = own.state_dict(), student.state_dict()
        assert all(torch.equal(want[k], got[k]) for k in want)  # running statistics moved alike
        assert int(got["bn1.num_batches_tracked"]) == 1


def test_fused_population_trains_as_the_looped_one():
    """Same members, fused and looped, three SGD steps: the forward is bit-equal, the gradients
    of grouped convolutions differ in the last bits, so weights agree to float rounding; the
    gradient-matching member stays looped and ends bit-equal."""
    looped = looped_population()
    fused = PopulationModule(build_members(), fuse=True)
    train_steps(fused, batches())
    assert [names for names, _ in fused._fused] == [["kd", "gkd", "fitnet", "alone"]]
    for name in MEMBERS:
        want = looped.members[name].state_dict()
        got = fused.members[name].state_dict()
        assert set(want) == set(got)
        for key in want:
            if name == "gm":
                assert torch.equal(want[key], got[key]), (name, key)
            else:
                torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-6, msg=key)


def compiled_train_steps(population: PopulationModule, data) -> None:
    """:func:`train_steps` through the population's compiled step (:meth:`compile_step`)."""
    optimizer = population.configure_optimizers()["optimizer"]
    population.train()
    for step, (images, targets) in enumerate(data):
        for member in population.members.values():
            member.set_progress(0.3 + 0.2 * step)
        optimizer.zero_grad(set_to_none=True)
        _, weighted = population._compiled_losses(images, targets, None)
        sum(weighted.values()).backward()
        optimizer.step()


def test_population_step_forward_is_each_members_step_on_one_teacher_pass():
    population = PopulationModule(build_members(("kd", "fitnet", "alone")), fuse=False).train()
    images, targets = batches(1)[0]
    for member in population.members.values():
        member.set_progress(0.4)
    state = {n: copy.deepcopy(m.state_dict()) for n, m in population.members.items()}
    weights = [m.weight_vector(images.device) for m in population.members.values()]
    out = population.step_forward(images, targets, None, weights)
    for n, m in population.members.items():  # the same BatchNorm statistics for the eager pass
        m.load_state_dict(state[n])
    eager = population.member_losses(images, targets, None)
    for (name, member), (total, logits, values, _) in zip(
        population.members.items(), out, strict=True
    ):
        eager_logits, terms, _ = eager[name]
        torch.testing.assert_close(logits, eager_logits)
        assert member.term_order == ["ce", *member.objective.names]
        torch.testing.assert_close(
            values, torch.stack([terms[f"loss_{t}"] for t in member.term_order])
        )
        torch.testing.assert_close(total, member.weighted_total(terms), rtol=1e-6, atol=1e-7)


def test_population_compile_step_falls_back_for_input_gradient_members():
    population = PopulationModule(build_members(("kd", "gm")), fuse=False)
    with pytest.warns(UserWarning, match=r"member terms \['gm.gm'\]"):
        population.compile_step()
    assert population._compiled_step is None
    assert all(m._compile_kwargs == {} for m in population.members.values())


@pytest.mark.slow
def test_compiled_population_step_trains_like_the_eager_one():
    # (not FitNet: at its published weight 100 the compiled graph's last-bit differences grow
    # to 1e-3 in three steps, as they do for a single run's compiled step; its forward is
    # checked exactly above)
    eager = PopulationModule(build_members(("kd", "gkd", "alone")), fuse=False)
    compiled = PopulationModule(build_members(("kd", "gkd", "alone")), fuse=False)
    compiled.compile_step()
    train_steps(eager, batches())
    compiled_train_steps(compiled, batches())
    for name in eager.members:
        want, got = eager.members[name].state_dict(), compiled.members[name].state_dict()
        for key in want:
            torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.parametrize("fuse", ["yes", 1, None, "fused"])
def test_bad_fuse_value_is_refused(fuse):
    with pytest.raises(ValueError, match="population.fuse=.* must be auto, true or false"):
        PopulationModule(build_members(("kd", "alone")), fuse=fuse)


def test_fuse_true_refuses_students_whose_forward_mixes_channels():
    """ShuffleNetV2 splits and shuffles channels: widened, its members' blocks would mix."""
    members = build_members(("kd", "gkd"), student="ShuffleV2")
    population = PopulationModule(members, fuse=True)
    population.train()
    images, targets = batches(1)[0]
    with pytest.raises(ValueError, match="cannot run as one network"):
        population.member_losses(images, targets, 0)
    auto = PopulationModule(build_members(("kd", "gkd"), student="ShuffleV2"), fuse="auto")
    auto.train()
    auto.member_losses(images.to("cpu"), targets, 0)  # on the CPU auto loops: no check, no error
    assert auto._fused == []


@pytest.mark.slow
def test_fused_population_run_checkpoints_and_resumes_like_the_looped_one(
    tiny_c10, cache, tmp_path
):
    """population.fuse=true on the tiny recipe: members end as the looped run's to float
    rounding (ten steps of batch 4 amplify it: within 1e-3 of each tensor's scale), with the same results fields and checkpoint layout, and an interrupted fused run
    resumed from the population's last.ckpt ends bit-equal to an uninterrupted one."""
    from test_population import STEPS_PER_EPOCH, population

    members = {"kd": ["method=gkd", "schedule=gompertz"], "fitnet": ["method=fitnet"]}
    members["static"] = ["method=kd"]
    members["gm"] = ["method=gkd_gm", "schedule=gompertz"]
    looped = population(tiny_c10, tmp_path / "looped", cache, members, "+population.fuse=false")
    fused = population(tiny_c10, tmp_path / "fused", cache, members, "+population.fuse=true")
    assert [names for names, _ in fused.module._fused] == [["kd", "fitnet", "static"]]
    assert looped.module._fused == []
    for name in members:
        want, got = (
            looped.module.members[name].state_dict(),
            fused.module.members[name].state_dict(),
        )
        assert set(want) == set(got)
        for key in want if name != "fitnet" else []:
            # (FitNet's features grow fast at batch 4 and amplify rounding past any fixed bound;
            # its fused step is compared on fixed batches in the test above)
            scale = float(want[key].double().abs().max()) if want[key].numel() else 0.0
            diff = float((got[key].double() - want[key].double()).abs().max())
            assert diff <= 1e-3 * scale + 1e-6, (name, key, diff, scale)
        assert set(fused.results[name]) == set(looped.results[name])
        for which in ("best", "last"):
            paths = [
                r / "members" / name / "checkpoints" / f"{which}.ckpt"
                for r in (tmp_path / "looped", tmp_path / "fused")
            ]
            a, b = (torch.load(p, weights_only=True) for p in paths)
            assert set(a["state_dict"]) == set(b["state_dict"]) and a["member"] == b["member"]
    last = [
        torch.load(r / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
        for r in (tmp_path / "looped", tmp_path / "fused")
    ]
    assert set(last[0]) == set(last[1])

    run_dir = tmp_path / "interrupted"
    killer = [
        "+callbacks.kill._target_=helpers.SendSignalAt",
        f"+callbacks.kill.step={STEPS_PER_EPOCH + 2}",
        f"+callbacks.kill.signum={int(signal.SIGTERM)}",
    ]
    with pytest.raises(RunInterrupted):
        population(tiny_c10, run_dir, cache, members, "+population.fuse=true", *killer)
    resumed = population(
        tiny_c10, run_dir, cache, members, "+population.fuse=true", "ckpt_path=last"
    )
    for name in members:
        want, got = (
            fused.module.members[name].state_dict(),
            resumed.module.members[name].state_dict(),
        )
        assert all(torch.equal(want[k], got[k]) for k in want), name
        assert resumed.results[name]["test"] == fused.results[name]["test"]


@pytest.mark.slow
def test_bench_population_section_times_fused_and_compiled_against_looped():
    """``--sections population --compile`` with K = 4 resnet8 members: fused / looped and
    compiled / looped columns, and both populations' targets among the targets."""
    from gompertz_kd import bench

    argv = ["--teacher", "resnet20", "--student", "resnet8", "--num-classes", "10"]
    argv += ["--batch", "4", "--device", "cpu", "--repeats", "2", "--warmup", "0"]
    argv += ["--sections", "population", "--population", "schedules_kd", "--compile"]
    argv += ["--population-sizes", "4", "--population-singles", "0", "--train-images", "64"]
    report = bench.main(argv)
    lines = report.splitlines()
    header = next(r for r in lines if r.startswith("| pair | K |"))
    row = next(r for r in lines if r.startswith("| resnet20 → resnet8 | 4 |"))
    cells = dict(
        zip(
            [c.strip() for c in header.strip("|").split("|")],
            [c.strip() for c in row.strip("|").split("|")],
            strict=True,
        )
    )
    assert cells["fused members"] == "4" and float(cells["fused ms/step"]) > 0  # all four fused
    assert float(cells["fused / looped (median, min–max)"].split(" (")[0]) > 0
    assert float(cells["compiled ms/step"]) > 0
    assert float(cells["compiled / looped (median, min–max)"].split(" (")[0]) > 0
    assert any("compile=step: first step" in r for r in lines)
    targets = report.split("### Targets")[1].splitlines()
    for needle in ("fused population", "compiled population step"):
        target = next(r for r in targets if needle in r)
        assert "K = 4 resnet8" in target and ("| met |" in target or "**not met**" in target)


@pytest.mark.slow
def test_fused_member_skipping_non_finite_batches_is_left_alone(tiny_c10, cache, tmp_path):
    """model.nonfinite=skip: a fused member whose loss is never finite gets no update at all
    (its weights stay as the looped run leaves them: no weight decay, no momentum), and the
    member beside it trains on."""
    from test_population import population

    members = {
        "ok": ["method=kd"],
        "bad": ["method=kd", "method.mixing=additive", "method.terms.kd.scale=1e39"],
    }
    runs = {
        fuse: population(
            tiny_c10,
            tmp_path / fuse,
            cache,
            members,
            "model.nonfinite=skip",
            f"+population.fuse={fuse}",
        )
        for fuse in ("false", "true")
    }
    assert [names for names, _ in runs["true"].module._fused] == [["ok", "bad"]]
    looped, fused = (runs[f].module.members["bad"] for f in ("false", "true"))
    assert fused.skipped_batches == looped.skipped_batches == 10
    for (key, want), got in zip(
        looped.student.named_parameters(), fused.student.parameters(), strict=True
    ):
        assert torch.equal(want, got), key
    ok = [runs[f].module.members["ok"].student.state_dict() for f in ("false", "true")]
    assert all(torch.allclose(ok[0][k], ok[1][k], rtol=1e-3, atol=1e-5) for k in ok[0])
