import math

import lightning as L
import pytest
import torch

from gompertz_kd.callbacks import GompertzWeightCallback
from gompertz_kd.module import DistillationModule, NonFiniteLossError, benchmark_lr
from gompertz_kd.schedules import Constant, Gompertz, LinearWarmup

from helpers import cpu_trainer, random_loader


def small_module(**kwargs) -> DistillationModule:
    defaults = dict(student="resnet8", teacher="resnet14", num_classes=10)
    defaults.update(kwargs)
    return DistillationModule(**defaults)


def batch(n=4, num_classes=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, num_classes, (n,), generator=g)


def test_full_objective_gradients_reach_student_and_projector_never_teacher():
    module = small_module(kd_scale=1.0, wd_scale=1.0, gm_scale=1.0)
    module.train()
    module.set_progress(0.7)
    images, targets = batch()
    _, terms, _ = module.compute_losses(images, targets)
    assert set(terms) == {"loss_ce", "loss_kd", "loss_wd", "loss_gm"}
    assert all(torch.isfinite(v) and v.item() > 0 for v in terms.values())
    module.weighted_total(terms).backward()
    assert all(p.grad is None for p in module.teacher.parameters())
    assert all(not p.requires_grad for p in module.teacher.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.student.parameters())
    assert all(p.grad is not None for p in module.wasserstein.parameters())


def test_teacher_stays_in_eval_mode_and_out_of_the_optimizer():
    module = small_module(wd_scale=1.0)
    module.train()
    assert module.student.training and not module.teacher.training
    assert module.wasserstein.training
    optimizer = module.configure_optimizers()["optimizer"]
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert not in_optimizer & {id(p) for p in module.teacher.parameters()}
    expected = {id(p) for p in module.student.parameters()} | {
        id(p) for p in module.wasserstein.parameters()
    }
    assert in_optimizer == expected


def test_teacher_batchnorm_statistics_do_not_move_during_training():
    module = small_module()
    before = {k: v.clone() for k, v in module.teacher.state_dict().items()}
    cpu_trainer(max_steps=2).fit(module, random_loader())
    after = module.teacher.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_default_recipe_is_the_benchmark():
    module = small_module(student="MobileNetV2", teacher=None)
    cfg = module.configure_optimizers()
    opt, sched = cfg["optimizer"], cfg["lr_scheduler"]["scheduler"]
    assert isinstance(opt, torch.optim.SGD)
    group = opt.param_groups[0]
    assert (group["lr"], group["momentum"], group["weight_decay"]) == (0.01, 0.9, 5e-4)
    assert dict(sched.milestones) == {150: 1, 180: 1, 210: 1} and sched.gamma == 0.1
    assert benchmark_lr("resnet8") == 0.05 and benchmark_lr("ShuffleV2") == 0.01
    assert module.temperature == 4.0


def test_a_few_optimizer_steps_lower_the_total_loss_on_a_fixed_batch():
    torch.manual_seed(0)
    module = small_module(kd_scale=1.0, wd_scale=1.0, gm_scale=1.0, lr=0.05)
    module.train()
    module.set_progress(0.5)
    optimizer = module.configure_optimizers()["optimizer"]
    images, targets = batch(n=8)
    totals = []
    for _ in range(8):
        optimizer.zero_grad()
        _, terms, _ = module.compute_losses(images, targets)
        total = module.weighted_total(terms)
        total.backward()
        optimizer.step()
        totals.append(total.item())
    assert totals[-1] < 0.8 * totals[0]


def test_weights_follow_each_terms_schedule_and_scale():
    module = small_module(
        schedule=Gompertz(w_max=1.0, b=5.0, c=4.0),
        kd_scale=0.9,
        wd_scale=2.0,
        gm_scale=0.5,
        gm_schedule=LinearWarmup(w_max=1.0, t0=0.5),
        ce_weight=0.1,
    )
    w = module.loss_weights_at(0.25)
    g = math.exp(-5.0 * math.exp(-1.0))
    assert w == pytest.approx(
        {"ce_weight": 0.1, "kd_weight": 0.9 * g, "wd_weight": 2.0 * g, "gm_weight": 0.25}
    )


def test_zero_scale_switches_a_term_off_entirely():
    module = small_module(kd_scale=1.0, wd_scale=0.0, gm_scale=0.0)
    assert module.wasserstein is None
    images, targets = batch()
    _, terms, _ = module.compute_losses(images, targets)
    assert set(terms) == {"loss_ce", "loss_kd"}
    assert set(module.loss_weights) == {"ce_weight", "kd_weight"}


def test_convex_mixing_is_one_minus_alpha():
    module = small_module(mixing="convex", schedule=Constant(0.9))
    assert module.loss_weights_at(0.3) == pytest.approx({"ce_weight": 0.1, "kd_weight": 0.9})
    with pytest.raises(ValueError, match="kd_weight <= 1"):
        small_module(mixing="convex", kd_scale=2.0)


def test_student_alone_has_no_distillation_terms():
    module = small_module(teacher=None)
    assert module.teacher is None and module.loss_weights == {"ce_weight": 1.0}
    images, targets = batch()
    logits, terms, teacher_logits = module.compute_losses(images, targets)
    assert set(terms) == {"loss_ce"} and teacher_logits is None and logits.shape == (4, 10)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"mixing": "blend"}, "mixing"),
        ({"temperature": 0.0}, "temperature"),
        ({"kd_scale": -1.0}, "kd_scale"),
        ({"num_classes": 1}, "num_classes"),
        ({"student": "resnet9000"}, "resnet9000"),
    ],
)
def test_bad_arguments_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        small_module(**kwargs)


def test_channels_last_gives_the_same_losses():
    torch.manual_seed(0)
    plain = small_module(wd_scale=1.0)
    fast = small_module(wd_scale=1.0, channels_last=True)
    fast.load_state_dict(plain.state_dict())
    plain.eval(), fast.eval()
    images, targets = batch()
    _, terms_plain, _ = plain.compute_losses(images, targets)
    _, terms_fast, _ = fast.compute_losses(images, targets)
    for name in terms_plain:
        torch.testing.assert_close(terms_fast[name], terms_plain[name], rtol=1e-4, atol=1e-5)


def test_default_weight_callback_is_added_once():
    module = small_module()
    own = GompertzWeightCallback(granularity="epoch")
    trainer = cpu_trainer(max_epochs=1, callbacks=[own])
    trainer.fit(module, random_loader(n=4))
    found = [c for c in trainer.callbacks if isinstance(c, GompertzWeightCallback)]
    assert found == [own]
    trainer = cpu_trainer(max_steps=1)
    trainer.fit(small_module(), random_loader(n=4))
    assert sum(isinstance(c, GompertzWeightCallback) for c in trainer.callbacks) == 1


def test_resnet50_to_mobilenetv2_full_objective_one_step_logs_every_term_and_weight():
    """The issue's acceptance check: ResNet50 -> MobileNetV2 on 100 classes, full objective."""
    module = DistillationModule(
        student="MobileNetV2",
        teacher="ResNet50",
        num_classes=100,
        kd_scale=1.0,
        wd_scale=1.0,
        gm_scale=1.0,
    )
    trainer = cpu_trainer(max_steps=1, limit_val_batches=0)
    trainer.fit(module, random_loader(n=4, num_classes=100, batch_size=4))
    logged = trainer.logged_metrics
    for name in ("train/loss", "train/loss_ce", "train/loss_kd", "train/loss_wd", "train/loss_gm"):
        assert name in logged and torch.isfinite(logged[name]), name
    for name in (
        "ce_weight",
        "kd_weight",
        "wd_weight",
        "gm_weight",
        "schedule/progress",
        "schedule/stage",
    ):
        assert name in logged, name
    assert logged["kd_weight"].item() == pytest.approx(Gompertz()(0.0))
    assert logged["schedule/stage"].item() == 0


def test_validation_and_test_log_top1_top5_over_every_image():
    module = small_module(teacher=None)
    module.eval()
    loader = random_loader(n=10, batch_size=4)  # 3 batches, the last one short
    images = torch.cat([b[0] for b in loader])
    targets = torch.cat([b[1] for b in loader])
    with torch.no_grad():
        logits = module(images)
    top1 = (logits.argmax(1) == targets).float().mean().item()
    top5 = (logits.topk(5, dim=1).indices == targets[:, None]).any(1).float().mean().item()
    trainer = cpu_trainer()
    val = trainer.validate(module, loader, verbose=False)[0]
    test = trainer.test(module, loader, verbose=False)[0]
    assert val["val/top1"] == pytest.approx(top1) and test["test/top1"] == pytest.approx(top1)
    assert val["val/top5"] == pytest.approx(top5) and test["test/top5"] == pytest.approx(top5)
    assert "val/loss_ce" in val and "test/loss_ce" in test


class _NaNAtStep(L.Callback):
    """Makes the KD term NaN on one training step."""

    def __init__(self, step):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        original = type(pl_module).compute_losses

        def patched(module, images, targets):
            logits, terms, teacher = original(module, images, targets)
            if trainer.global_step == self.step:
                terms["loss_kd"] = terms["loss_kd"] * float("nan")
            return logits, terms, teacher

        pl_module.compute_losses = patched.__get__(pl_module)


def test_non_finite_loss_stops_with_the_term_step_and_checkpoint():
    module = small_module()
    trainer = cpu_trainer(max_steps=4, callbacks=[_NaNAtStep(2)])
    with pytest.raises(NonFiniteLossError, match=r"step 2 .*loss_kd=nan.*Last good checkpoint"):
        trainer.fit(module, random_loader(n=16))


def test_non_finite_loss_can_be_skipped_and_counted():
    class Snapshots(L.Callback):
        states = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.states.append({k: v.clone() for k, v in pl_module.student.named_parameters()})

    module = small_module(nonfinite="skip")
    snapshots = Snapshots()
    trainer = cpu_trainer(max_epochs=1, callbacks=[_NaNAtStep(1), snapshots])
    trainer.fit(module, random_loader(n=16))
    assert module.skipped_batches == 1
    assert trainer.logged_metrics["train/skipped_batches"].item() == 1
    before, after_skip, after_next = snapshots.states[1], snapshots.states[2], snapshots.states[3]
    assert all(
        torch.equal(before[k], after_skip[k]) for k in before
    )  # the skipped step changed nothing
    assert any(not torch.equal(after_skip[k], after_next[k]) for k in before)  # training went on


@pytest.mark.slow
def test_compiled_networks_give_the_same_losses():
    torch.manual_seed(0)
    plain = small_module(wd_scale=1.0)
    compiled = small_module(wd_scale=1.0)
    compiled.load_state_dict(plain.state_dict())
    compiled.compile_networks()
    plain.eval(), compiled.eval()
    images, targets = batch()
    _, terms_plain, _ = plain.compute_losses(images, targets)
    _, terms_compiled, _ = compiled.compute_losses(images, targets)
    for name in terms_plain:
        torch.testing.assert_close(terms_compiled[name], terms_plain[name], rtol=1e-4, atol=1e-5)
