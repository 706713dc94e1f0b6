"""The method zoo: every method trains a step on both pairs, owns its parts, follows any schedule."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from torch.utils.data import DataLoader, TensorDataset

from gompertz_kd import losses
from gompertz_kd.callbacks import GompertzWeightCallback
from gompertz_kd.config import CONFIG_DIR
from gompertz_kd.module import DistillationModule
from gompertz_kd.objectives import KD, Need, Objective, gompertz_cnn
from gompertz_kd.schedules import SCHEDULES, Constant, Gompertz, make_schedule
from gompertz_kd.train import build_objective, train

from helpers import cpu_trainer, tiny_kd_overrides

METHODS = sorted(p.stem for p in (CONFIG_DIR / "method").glob("*.yaml"))
DISTILLING = [m for m in METHODS if m != "student"]
# the benchmark's baselines and what each adds to the objective
PUBLISHED = {
    "kd": {"kd": 0.9},
    "dkd": {"dkd": 1.0},
    "dist": {"dist": 1.0},
    "fitnet": {"fitnet": 100.0},
    "at": {"at": 1000.0},
    "rkd": {"rkd": 1.0},
    "crd": {"crd": 0.8},
    "reviewkd": {"reviewkd": 1.0},
    "ctkd": {"ctkd": 0.9},
    "wkdl": {"wkdl": 800.0, "wkdt": 1.0},
    "sp": {"sp": 3000.0},
    "pkt": {"pkt": 30000.0},
    "nst": {"nst": 50.0},
    "vid": {"vid": 1.0},
    "ofd": {"ofd": 0.001},
    "kdsvd": {"kdsvd": 1.0},
}
PAIRS = {"resnet20_resnet8": 10, "resnet50_mbv2": 100}
# KDSVD compares singular vectors over channels: it needs stages of equal width (one family)
SAME_WIDTH_ONLY = {"kdsvd"}


def compose_cfg(overrides):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose("train", overrides=overrides)


def objective_of(method: str, *overrides: str) -> Objective:
    return build_objective(compose_cfg([f"method={method}", *overrides]))


def indexed_loader(n=8, num_classes=10, batch_size=4, seed=0) -> DataLoader:
    """Random images, labels and each image's index, as a data module asked for indices yields."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, 32, 32, generator=g)
    labels = torch.randint(0, num_classes, (n,), generator=g)
    return DataLoader(TensorDataset(images, labels, torch.arange(n)), batch_size=batch_size)


def test_every_published_baseline_has_a_method_config():
    extra = {"student", "gompertz_cnn", "gkd", "gkd_wd", "gkd_gm", "dist_warmup"}
    assert set(PUBLISHED) | extra == set(METHODS)
    for method, scales in PUBLISHED.items():
        objective = objective_of(method)
        assert objective.scales == scales, method


@pytest.mark.parametrize(
    ("method", "pair"),
    [
        (m, p)
        for p in PAIRS
        for m in DISTILLING
        if not (m in SAME_WIDTH_ONLY and p == "resnet50_mbv2")
    ],
)
def test_every_method_trains_a_step_logs_its_terms_and_owns_its_parts(method, pair, tmp_path):
    cfg = compose_cfg([f"method={method}", f"model={pair}"])
    num_classes = PAIRS[pair]
    objective = build_objective(cfg)
    torch.manual_seed(0)
    module = DistillationModule(
        student=cfg.model.student,
        teacher=cfg.model.teacher,
        num_classes=num_classes,
        objective=objective,
        num_train_samples=8,
    )
    trainer = cpu_trainer(max_steps=1, default_root_dir=tmp_path)
    trainer.fit(module, indexed_loader(num_classes=num_classes))

    logged = trainer.logged_metrics
    for name in objective.names:
        assert torch.isfinite(logged[f"train/loss_{name}"]), name
        assert f"{name}_weight" in logged, name
    assert "ce_weight" in logged and torch.isfinite(logged["train/loss"])

    # the objective's trainable parts train, the teacher never does
    optimizer = trainer.optimizers[0]
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    own = {id(p) for p in objective.parameters()}
    assert own <= in_optimizer
    assert not in_optimizer & {id(p) for p in module.teacher.parameters()}
    # ... and every parameter and buffer of the objective is in the checkpoint
    trainer.save_checkpoint(tmp_path / "step.ckpt")
    saved = torch.load(tmp_path / "step.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    expected = {f"objective.{k}" for k in objective.state_dict()}
    assert expected <= set(saved)
    for key, value in objective.state_dict().items():
        assert torch.equal(saved[f"objective.{key}"], value), key


def test_methods_with_trainable_parts_have_them():
    trainable = {}
    for method in DISTILLING:
        objective = objective_of(method, "model=resnet20_resnet8")
        DistillationModule("resnet8", "resnet20", 10, objective=objective, num_train_samples=8)
        trainable[method] = sum(p.numel() for p in objective.parameters()) > 0
    assert {m for m, has in trainable.items() if has} == {
        "fitnet",
        "crd",
        "reviewkd",
        "ctkd",
        "gompertz_cnn",
        "gkd_wd",
        "vid",
        "ofd",
    }


SCHEDULE_SPECS = [
    *SCHEDULES,
    "gompertz(b=4, c=9)",
    "linear(t0=0.5)",
    "piecewise(0.5, 0.3:2, 0.8:1)",
]


@functools.cache
def method_cfg(method: str):
    return compose_cfg([f"method={method}", "model=resnet20_resnet8"])


def every_term_under(schedule: str) -> Objective:
    """One objective holding every method's terms, each under ``schedule``: any term composes
    with any other and follows any schedule."""
    terms = {}
    for method in DISTILLING:
        built = build_objective(method_cfg(method))
        for name in built.names:
            terms[name] = {"term": built.terms[name], "scale": built.scales[name]}
    return Objective({n: {**t, "schedule": schedule} for n, t in terms.items()})


@pytest.mark.parametrize("schedule", SCHEDULE_SPECS)
def test_every_term_follows_any_schedule(schedule):
    """The weight each term trains with, and logs, is scale * schedule(progress)."""
    objective = every_term_under(schedule)
    assert set(objective.names) == {
        "kd", "dkd", "dist", "fitnet", "at", "rkd", "crd", "reviewkd", "ctkd", "wkdl", "wkdt", "wd",
        "gm", "sp", "pkt", "nst", "vid", "ofd", "kdsvd",
    }  # fmt: skip
    module = DistillationModule(
        "resnet8", "resnet20", 10, objective=objective, num_train_samples=12
    )
    shape = make_schedule(schedule)
    for progress in (0.0, 0.3, 0.75, 1.0):
        weights = module.set_progress(progress)
        for name, scale in objective.scales.items():
            assert weights[f"{name}_weight"] == pytest.approx(scale * shape(progress)), name
    # the callback sets and logs them during training: the last of 3 steps is at progress 2/3
    module.set_progress(0.0)
    trainer = cpu_trainer(max_steps=3, callbacks=[GompertzWeightCallback()])
    trainer.fit(module, indexed_loader(n=12))
    for name, scale in objective.scales.items():
        assert trainer.logged_metrics[f"{name}_weight"].item() == pytest.approx(
            scale * shape(2 / 3), rel=1e-6
        ), name
        assert torch.isfinite(trainer.logged_metrics[f"train/loss_{name}"]), name


def test_dist_warmup_is_dist_with_the_schedule_studys_linear_warmup():
    warm = compose_cfg(["method=dist_warmup"]).method
    assert warm == compose_cfg(["method=dist", "method.terms.dist.schedule=linear"]).method
    objective = objective_of("dist_warmup")
    weights = [objective.weights_at(p)["dist_weight"] for p in (0.0, 0.05, 0.1, 0.5, 1.0)]
    assert weights == pytest.approx([0.0, 0.5, 1.0, 1.0, 1.0])  # DIST's full scale after 10 %
    assert objective_of("dist").weights_at(0.0)["dist_weight"] == 1.0  # the published recipe


def test_shared_schedule_is_the_runs_schedule_group():
    objective = objective_of("gkd", "schedule=constant", "schedule.value=0.7")
    assert objective.schedules["kd"] == Constant(0.7)
    assert objective.weights_at(0.2) == pytest.approx({"ce_weight": 0.3, "kd_weight": 0.7})


def test_a_method_weight_can_follow_the_gompertz_curve_from_the_command_line():
    objective = objective_of("dkd", "method.terms.dkd.schedule=gompertz")
    assert objective.schedules["dkd"] == Gompertz(w_max=1.0, b=10.0, c=6.0)
    assert objective.weights_at(0.5)["dkd_weight"] == pytest.approx(Gompertz()(0.5))
    warm = objective_of("dkd")
    assert warm.weights_at(0.0)["dkd_weight"] == 0.0
    assert warm.weights_at(0.5)["dkd_weight"] == 1.0


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ({"kd": {"term": KD(), "scale": -1}}, r"method.terms.kd.scale must be >= 0"),
        ({"kd": {"term": KD(), "schedule": "gomp"}}, r"method.terms.kd.schedule: unknown"),
        ({"KD": {"term": KD()}}, "lower-case"),
        ({"ce": {"term": KD()}}, "not 'ce'"),
        ({"kd": {"term": "KD"}}, "must be a mapping with 'term'"),
        ({"kd": {"term": KD(), "weight": 2}}, "unknown key"),
    ],
)
def test_bad_objective_specs_name_the_field(spec, match):
    with pytest.raises(ValueError, match=match):
        Objective(spec)


def test_convex_mixing_needs_its_term_and_a_weight_at_most_one():
    with pytest.raises(ValueError, match="mixing_term"):
        Objective({"kd": {"term": KD()}}, mixing="convex", mixing_term="dkd")
    with pytest.raises(ValueError, match="kd_weight <= 1"):
        Objective({"kd": {"term": KD(), "scale": 2.0, "schedule": "constant"}}, mixing="convex")


def test_teacher_runs_only_for_what_the_terms_need(monkeypatch):
    """No input gradient unless a term needs it; no teacher pass at all without terms."""
    calls = []
    module = DistillationModule("resnet8", "resnet14", 10, objective=gompertz_cnn())
    original = module.teacher_forward

    def spy(images, targets=None, input_gradient=False):
        calls.append(input_gradient)
        return original(images, targets, input_gradient)

    monkeypatch.setattr(module, "teacher_forward", spy)
    images, targets = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    module.compute_losses(images, targets)
    assert calls == [False]
    gm = DistillationModule("resnet8", "resnet14", 10, objective=gompertz_cnn(gm_scale=1.0))
    gm_calls = []
    gm_original = gm.teacher_forward

    def gm_spy(images, targets=None, input_gradient=False):
        gm_calls.append(input_gradient)
        return gm_original(images, targets, input_gradient)

    monkeypatch.setattr(gm, "teacher_forward", gm_spy)
    _, terms, _ = gm.compute_losses(images, targets)
    assert "loss_gm" in terms and gm_calls == [True]
    alone = DistillationModule("resnet8", None, 10)
    _, terms, teacher_logits = alone.compute_losses(images, targets)
    assert set(terms) == {"loss_ce"} and teacher_logits is None


def test_crd_refuses_to_run_without_indices_or_a_training_set_size():
    with pytest.raises(ValueError, match="num_train_samples"):
        DistillationModule("resnet8", "resnet14", 10, objective=objective_of("crd"))
    module = DistillationModule(
        "resnet8", "resnet14", 10, objective=objective_of("crd"), num_train_samples=8
    )
    assert Need.INDICES in module.objective.needs
    with pytest.raises(ValueError, match="with_indices=True"):
        module.compute_losses(torch.randn(2, 3, 32, 32), torch.tensor([0, 1]))


def test_draw_negatives_exact_takes_rows_of_other_classes_only_uniform_any():
    labels = torch.tensor([0, 1, 2, 0, 1, 2, -1, 0, 1, 2])
    targets = torch.tensor([0, 1, 2, 2])
    rows = losses.draw_negatives(10, 500, torch.Generator().manual_seed(3), targets, labels)
    assert rows.shape == (4, 500) and rows.min() >= 0 and rows.max() < 10
    assert not (labels[rows] == targets[:, None]).any()
    assert (rows == 6).any()  # a row of unknown class (-1) serves any anchor
    again = losses.draw_negatives(10, 500, torch.Generator().manual_seed(3), targets, labels)
    assert torch.equal(rows, again)  # the same stream, the same negatives
    uniform = losses.draw_negatives(10, 500, torch.Generator().manual_seed(3), targets)
    assert torch.equal(
        uniform, torch.randint(0, 10, (4, 500), generator=torch.Generator().manual_seed(3))
    )
    assert (labels[uniform] == targets[:, None]).any()  # uniform does draw the anchor's class
    with pytest.raises(ValueError, match="other classes"):
        losses.draw_negatives(3, 4, torch.Generator(), torch.tensor([1]), torch.ones(3).long())


def test_crd_exact_mode_learns_the_rows_classes_and_never_draws_the_anchors_class():
    objective = objective_of("crd", "method.terms.crd.term.num_negatives=64")
    crd = objective.terms["crd"]
    assert crd.mode == "exact"  # the benchmark's default, in the config
    module = DistillationModule(
        "resnet8", "resnet14", 10, objective=objective, num_train_samples=12
    )
    assert torch.equal(crd.labels, torch.full((12,), -1))
    assert "objective.terms.crd.labels" in module.state_dict()
    loader = indexed_loader(n=12, batch_size=6)
    for images, targets, indices in loader:
        module.compute_losses(images, targets, step=0, indices=indices)
        negatives = crd.negatives(targets, step=1)
        assert not (crd.labels[negatives] == targets[:, None]).any()
    labels = torch.cat([t for _, t, _ in loader])
    assert torch.equal(crd.labels, labels)  # every row's class, once its image was seen
    with pytest.raises(ValueError, match="mode must be one of"):
        objective_of("crd", "method.terms.crd.term.mode=exactly")


def test_crd_uniform_mode_keeps_the_earlier_state_dict():
    objective = objective_of("crd", "method.terms.crd.term.mode=uniform")
    module = DistillationModule(
        "resnet8", "resnet14", 10, objective=objective, num_train_samples=12
    )
    assert not any(k.endswith("crd.labels") for k in module.state_dict())


@pytest.mark.parametrize("method", ["sp", "pkt", "nst", "vid", "ofd", "kdsvd", "crd"])
def test_the_feature_methods_run_the_cpu_recipe_end_to_end_in_fast_dev_run(
    method, tiny_c10, cache, tmp_path
):
    """`experiment=c10cpu method=<name>` composed from the configs as the command line does,
    one training batch, validation and test through `train(cfg)` on tiny data."""
    overrides = [
        o
        for o in tiny_kd_overrides(tiny_c10, tmp_path / "run", cache)
        if not o.startswith(("method=", "data=", "model=", "teacher.recipe"))
    ]
    cfg = compose_cfg(
        ["experiment=c10cpu", f"method={method}", *overrides, "data.val_split=10",
         "++trainer.fast_dev_run=true"]
    )  # fmt: skip
    results = train(cfg)
    assert 0.0 <= results["test"]["top1"] <= 1.0
    written = json.loads((tmp_path / "run" / "results.json").read_text())
    assert written["status"] == "completed"
    target = written["config"]["method"]["terms"][method]["term"]["_target_"]
    assert target.rsplit(".", 1)[1].lower() == method


def test_kdsvd_refuses_a_pair_of_unequal_widths_when_bound():
    with pytest.raises(
        ValueError, match=r"KDSVD compares singular vectors over channels.*\(12, 256\)"
    ):
        DistillationModule("MobileNetV2", "ResNet50", 100, objective=objective_of("kdsvd"))


def test_ofd_margins_come_from_the_teachers_batchnorm_and_are_checkpointed():
    objective = objective_of("ofd", "model=resnet20_resnet8")
    module = DistillationModule("resnet8", "resnet20", 10, objective=objective)
    term = objective.terms["ofd"]
    assert term.pairs == [(1, 1), (2, 2), (3, 3)]
    bns = module.teacher.preact_batchnorms()
    for margin, bn in zip(term.margins(), bns, strict=True):
        torch.testing.assert_close(margin, losses.ofd_margin(bn.bias, bn.weight))
    assert {"margin0", "margin1", "margin2"} <= {k.split(".")[-1] for k in objective.state_dict()}
    # the connectors map each student stage to the teacher's width, 1x1, and train
    assert [c.conv.out_channels for c in term.connectors] == [16, 32, 64]
    assert all(c.conv.kernel_size == (1, 1) for c in term.connectors)


def test_ofd_reads_the_same_preactivations_through_the_folded_teacher():
    """The teacher's BatchNorm folded (the default) or not: the same OFD loss."""
    images, targets = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    values = []
    for fold in (True, False):
        torch.manual_seed(0)
        module = DistillationModule(
            "resnet8", "resnet20", 10, objective=objective_of("ofd"), fold_teacher_bn=fold
        )
        module.train()
        values.append(module.compute_losses(images, targets)[1]["loss_ofd"].item())
    assert values[0] == pytest.approx(values[1], rel=1e-5)


def test_ofd_refuses_a_teacher_without_preactivation_batchnorms():
    with pytest.raises(ValueError, match="preact_batchnorms"):
        DistillationModule("resnet8", "ShuffleV2", 10, objective=objective_of("ofd"))


def test_ctkd_learns_its_temperature_and_logs_it(tmp_path):
    objective = objective_of("ctkd", "model=resnet20_resnet8")
    module = DistillationModule("resnet8", "resnet14", 10, objective=objective)
    before = objective.terms["ctkd"].temperature.state_dict()
    before = {k: v.clone() for k, v in before.items()}
    trainer = cpu_trainer(max_steps=3, default_root_dir=tmp_path)
    trainer.fit(module, indexed_loader(n=12))
    after = objective.terms["ctkd"].temperature.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert "train/ctkd/temperature" in trainer.logged_metrics


# ---------------------------------------------------------------------------- command line
@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("model.student=resnet9000", "model.student=resnet9000: unknown model 'resnet9000'"),
        ("model.teacher=timm/notanet", "model.teacher=timm/notanet: timm has no model"),
        ("method.terms.kd.schedule=gomp", "method.terms.kd.schedule: unknown schedule 'gomp'"),
        ("method.terms.kd.scale=-1", "method.terms.kd.scale must be >= 0"),
        ("schedule.b=3", "schedule.b=3 sets the shared schedule, but no term of this method"),
    ],
)
def test_bad_names_fail_in_seconds_before_any_teacher_is_trained(
    tiny_c10, tmp_path, override, match
):
    teachers = tmp_path / "teachers"
    args = [
        o
        for o in tiny_kd_overrides(tiny_c10, "unused", teachers)
        if not o.startswith(("paths.output", "method="))
    ]
    env = {**os.environ, "GOMPERTZ_KD_ROOT": str(tmp_path)}
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "gompertz_kd.run", *args, "method=kd", override],
        capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path,
    )  # fmt: skip
    elapsed = time.perf_counter() - start
    assert done.returncode != 0
    assert match in done.stderr, done.stderr[-1500:]
    assert not teachers.exists() or not any(teachers.iterdir())
    assert not list(Path(tmp_path).glob("logs/**/results.json"))
    assert elapsed < 60, f"took {elapsed:.0f} s"


@pytest.mark.parametrize("experiment", ["c100_resnet50_mbv2", "c10_resnet50_mbv2", "c10cpu"])
def test_a_recipe_with_any_method_is_one_row_of_the_comparison_table(experiment):
    """`-m experiment=<recipe> method=kd,dkd,...`: the method changes, the recipe does not."""
    default = compose_cfg([f"experiment={experiment}"])
    assert set(default.method.terms) == {"kd", "wd", "gm"}  # the paper's Gompertz-CNN
    for method in METHODS:
        cfg = compose_cfg([f"experiment={experiment}", f"method={method}"])
        assert (cfg.data, cfg.model, cfg.trainer, cfg.teacher) == (
            default.data,
            default.model,
            default.trainer,
            default.teacher,
        ), method
        assert set(build_objective(cfg).names) == {
            n for n, t in cfg.method.terms.items() if t.scale > 0
        }
