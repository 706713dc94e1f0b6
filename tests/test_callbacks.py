import lightning as L
import pytest
import torch

from gompertz_kd.callbacks import GompertzWeightCallback
from gompertz_kd.module import DistillationModule
from gompertz_kd.objectives import gompertz_cnn
from gompertz_kd.schedules import Gompertz, gompertz

from helpers import cpu_trainer, random_loader


class WeightRecorder(L.Callback):
    """Records the weights the module trains each step with (runs after the weight callback)."""

    def __init__(self):
        self.steps: list[int] = []
        self.weights: list[dict[str, float]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.steps.append(trainer.global_step)
        self.weights.append(dict(pl_module.loss_weights))


class StopAfterEpochs(L.Callback):
    def __init__(self, epochs: int):
        self.epochs = epochs

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch + 1 >= self.epochs:
            trainer.should_stop = True


SCHEDULE = Gompertz(w_max=1.0, b=4.0, c=5.0)


def module(**kwargs):
    return DistillationModule(
        student="resnet8",
        teacher="resnet14",
        num_classes=10,
        objective=gompertz_cnn(schedule=SCHEDULE, **kwargs),
    )


def run(callback, recorder, max_epochs=2, extra=(), ckpt_path=None, **trainer_kwargs):
    torch.manual_seed(0)  # every run starts from the same networks
    m = module()
    trainer = cpu_trainer(
        max_epochs=max_epochs, callbacks=[callback, recorder, *extra], **trainer_kwargs
    )
    trainer.fit(m, random_loader(n=16, batch_size=4), ckpt_path=ckpt_path)
    return trainer, m


def test_step_granularity_sets_gompertz_weight_of_global_step_over_total_steps():
    recorder = WeightRecorder()
    run(GompertzWeightCallback(granularity="step"), recorder)
    assert recorder.steps == list(range(8))
    expected = [gompertz(s / 8, 1.0, 4.0, 5.0) for s in range(8)]
    assert [w["kd_weight"] for w in recorder.weights] == pytest.approx(expected)


def test_epoch_granularity_holds_the_weight_for_an_epoch():
    recorder = WeightRecorder()
    run(GompertzWeightCallback(granularity="epoch"), recorder)
    expected = [gompertz(0.0, 1.0, 4.0, 5.0)] * 4 + [gompertz(0.5, 1.0, 4.0, 5.0)] * 4
    assert [w["kd_weight"] for w in recorder.weights] == pytest.approx(expected)


@pytest.mark.parametrize("progress", ["clock", "trajectory"])
def test_resuming_from_a_checkpoint_continues_the_exact_weights(tmp_path, progress):
    full = WeightRecorder()
    run(GompertzWeightCallback(progress=progress, ema_momentum=0.5), full, max_epochs=3)

    first = WeightRecorder()
    trainer, _ = run(
        GompertzWeightCallback(progress=progress, ema_momentum=0.5),
        first,
        max_epochs=3,
        extra=[StopAfterEpochs(1)],
    )
    ckpt = tmp_path / "half.ckpt"
    trainer.save_checkpoint(ckpt)
    second = WeightRecorder()
    fresh = GompertzWeightCallback(progress=progress, ema_momentum=0.5)
    run(fresh, second, max_epochs=3, ckpt_path=ckpt)

    assert first.steps + second.steps == full.steps
    resumed = first.weights + second.weights
    for got, want in zip(resumed, full.weights, strict=True):
        assert got == pytest.approx(want)
    if progress == "trajectory":
        assert fresh.ema_updates == 12
        assert len({w["kd_weight"] for w in full.weights}) > 1  # the trajectory did move the weight


def test_trajectory_progress_formula_and_monotone():
    cb = GompertzWeightCallback(progress="trajectory", ema_momentum=0.5)
    assert cb.trajectory_value(10) == 0.0
    # one update: bias-corrected EMAs equal the batch values; (0.55 - 0.1) / (1.0 - 0.1) = 0.5
    assert cb.update_trajectory(0.55, 1.0, num_classes=10) == pytest.approx(0.5)
    # a bad batch lowers the raw value to (0.25 - 0.1) / 0.9, but monotone keeps 0.5
    assert cb.trajectory_value(10) == pytest.approx(0.5)
    assert cb.update_trajectory(0.1, 1.0, num_classes=10) == pytest.approx(0.5)
    assert cb.trajectory_value(10) == pytest.approx(0.15 / 0.9)

    free = GompertzWeightCallback(progress="trajectory", ema_momentum=0.5, monotone=False)
    free.update_trajectory(0.55, 1.0, 10)
    assert free.update_trajectory(0.1, 1.0, 10) == pytest.approx(0.15 / 0.9)

    target = GompertzWeightCallback(progress="trajectory", ema_momentum=0.0, trajectory_target=0.5)
    assert target.update_trajectory(0.55, 1.0, 10) == pytest.approx(1.0)

    restored = GompertzWeightCallback(progress="trajectory", ema_momentum=0.5)
    restored.load_state_dict(cb.state_dict())
    assert restored.update_trajectory(0.9, 0.9, 10) == cb.update_trajectory(0.9, 0.9, 10)


class ProgressRecorder(L.Callback):
    """The trajectory progress after each step (runs after the weight callback's update)."""

    def __init__(self, callback):
        self.callback = callback
        self.after: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.after.append(self.callback.trajectory_progress)


def test_trajectory_mode_drives_weights_from_student_accuracy_in_training():
    recorder = WeightRecorder()
    callback = GompertzWeightCallback(progress="trajectory", ema_momentum=0.5, monotone=False)
    progress = ProgressRecorder(callback)
    run(callback, recorder, max_epochs=2, extra=(progress,))
    assert callback.ema_updates == 8
    # the weight of each step is the schedule at the progress after the previous step: the first
    # at 0, every later one at what the student's accuracy had reached
    assert recorder.weights[0]["kd_weight"] == pytest.approx(SCHEDULE(0.0))
    for step in range(1, 8):
        want = SCHEDULE(progress.after[step - 1])
        assert recorder.weights[step]["kd_weight"] == pytest.approx(want), step
    assert len({round(p, 6) for p in progress.after}) > 1  # the trajectory moved
    assert all(0.0 <= p <= 1.0 for p in progress.after)


def test_trajectory_mode_needs_a_teacher():
    m = DistillationModule(student="resnet8", teacher=None, num_classes=10)
    trainer = cpu_trainer(max_steps=1, callbacks=[GompertzWeightCallback(progress="trajectory")])
    with pytest.raises(ValueError, match="no teacher"):
        trainer.fit(m, random_loader(n=4))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"granularity": "batch"}, "granularity"),
        ({"progress": "vibes"}, "progress"),
        ({"ema_momentum": 1.0}, "ema"),
    ],
)
def test_bad_callback_arguments_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GompertzWeightCallback(**kwargs)


def test_weights_and_stage_are_logged():
    m = module(wd_scale=0.5)
    trainer = cpu_trainer(max_steps=3)
    trainer.fit(m, random_loader(n=16))
    logged = trainer.logged_metrics
    assert logged["kd_weight"].item() == pytest.approx(SCHEDULE(2 / 3))
    assert logged["wd_weight"].item() == pytest.approx(0.5 * SCHEDULE(2 / 3))
    assert logged["schedule/progress"].item() == pytest.approx(2 / 3)
    assert logged["schedule/stage"].item() == int(SCHEDULE.stage(2 / 3))
    assert torch.isfinite(logged["train/loss_wd"])


def test_run_timer_carries_a_mid_epoch_part_and_the_fit_time_through_a_checkpoint(monkeypatch):
    from types import SimpleNamespace

    import gompertz_kd.callbacks as callbacks

    clock = iter([100.0, 101.0, 103.0, 104.0, 110.0])  # fit start, epoch start, batch end, ...
    monkeypatch.setattr(callbacks.time, "perf_counter", lambda: next(clock))
    trainer = SimpleNamespace(world_size=1)
    batch = (torch.zeros(4, 3), torch.zeros(4))
    first = callbacks.RunTimer()
    first.on_fit_start(trainer, None)  # 100
    first.on_train_epoch_start(trainer, None)  # 101
    first.on_train_batch_end(trainer, None, None, batch, 0)  # 103
    state = first.state_dict()  # mid-epoch, read at 104: 2 s of training for 4 images
    assert state == {"train_seconds": 2.0, "train_images": 4, "fit_seconds": 4.0}
    assert first.train_seconds == 0.0  # reading the state changes nothing
    resumed = callbacks.RunTimer()
    resumed.load_state_dict(state)
    assert resumed.resumed_seconds == 4.0 and resumed.images_per_second == 2.0
    resumed.on_fit_start(trainer, None)  # 110: the fit time before it is carried apart
    assert resumed.resumed_seconds == 4.0
    older = callbacks.RunTimer()
    older.load_state_dict({"train_seconds": 1.0, "train_images": 2})  # before fit_seconds
    assert older.resumed_seconds == 0.0
