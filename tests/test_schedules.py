import math

import pytest
import torch

from gompertz_kd import schedules
from gompertz_kd.schedules import (
    Constant,
    CosineDecay,
    Gompertz,
    LinearWarmup,
    Logistic,
    Piecewise,
    Schedule,
    Stage,
    gompertz,
    make_schedule,
)


def test_gompertz_start_equals_w_max_times_e_to_minus_b():
    assert gompertz(0.0, w_max=2.0, b=3.0, c=5.0) == pytest.approx(2.0 * math.exp(-3.0))


def test_gompertz_hand_computed_value():
    # 0.5 * exp(-4 * exp(-2 * 0.25)) = 0.5 * exp(-2.42612264) = 0.5 * 0.08837885
    assert gompertz(0.25, w_max=0.5, b=4.0, c=2.0) == pytest.approx(0.0441894229, rel=1e-8)


def test_gompertz_end_and_limit():
    assert gompertz(1.0, w_max=1.0, b=10.0, c=6.0) == pytest.approx(math.exp(-10 * math.exp(-6)))
    # c large: saturates to w_max well before t = 1
    assert gompertz(1.0, w_max=0.9, b=10.0, c=50.0) == pytest.approx(0.9, abs=1e-12)


def test_gompertz_monotone_and_bounded_on_tensor():
    t = torch.linspace(0, 1, 1001, dtype=torch.float64)
    w = gompertz(t, w_max=1.5, b=8.0, c=7.0)
    assert isinstance(w, torch.Tensor) and w.shape == t.shape
    assert torch.all(w[1:] > w[:-1])
    assert torch.all((w > 0) & (w < 1.5))


def test_gompertz_tensor_matches_float():
    t = torch.tensor([0.0, 0.3, 0.7, 1.0], dtype=torch.float64)
    w = gompertz(t, 1.0, 5.0, 4.0)
    for ti, wi in zip(t.tolist(), w.tolist(), strict=True):
        assert wi == pytest.approx(gompertz(ti, 1.0, 5.0, 4.0))


def test_inflection_is_where_slope_peaks_and_weight_is_w_max_over_e():
    s = Gompertz(w_max=2.0, b=10.0, c=6.0)
    assert s.inflection == pytest.approx(math.log(10.0) / 6.0)
    assert s(s.inflection) == pytest.approx(2.0 / math.e)
    t = torch.linspace(0, 1, 20001, dtype=torch.float64)
    slope = torch.diff(gompertz(t, 2.0, 10.0, 6.0))
    assert t[int(slope.argmax())].item() == pytest.approx(s.inflection, abs=1e-3)


def test_stages_cut_at_peak_acceleration_and_deceleration():
    s = Gompertz(w_max=1.0, b=10.0, c=6.0)
    assert 0 < s.lag_end < s.inflection < s.growth_end < 1
    t = torch.linspace(0, 1, 20001, dtype=torch.float64)
    curvature = torch.diff(gompertz(t, 1.0, 10.0, 6.0), n=2)
    assert t[int(curvature.argmax()) + 1].item() == pytest.approx(s.lag_end, abs=1e-3)
    assert t[int(curvature.argmin()) + 1].item() == pytest.approx(s.growth_end, abs=1e-3)
    assert s.stage(0.0) is Stage.LAG
    assert s.stage(s.inflection) is Stage.GROWTH
    assert s.stage(1.0) is Stage.SATURATION


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"w_max": 1.0, "b": 0.0, "c": 1.0}, "b"),
        ({"w_max": 1.0, "b": -2.0, "c": 1.0}, "b"),
        ({"w_max": 1.0, "b": 1.0, "c": 0.0}, "c"),
        ({"w_max": -0.1, "b": 1.0, "c": 1.0}, "w_max"),
    ],
)
def test_invalid_gompertz_parameters_name_the_parameter(kwargs, name):
    with pytest.raises(ValueError, match=rf"^{name} must be .*{name}="):
        gompertz(0.5, **kwargs)
    with pytest.raises(ValueError, match=rf"^{name} must be"):
        Gompertz(**kwargs)


EVERY_SCHEDULE = (Gompertz(), Constant(), LinearWarmup(), CosineDecay(), Logistic(), Piecewise())


@pytest.mark.parametrize("t", [-0.01, 1.01, float("nan")])
def test_progress_outside_unit_interval_is_rejected(t):
    with pytest.raises(ValueError, match="progress must be in \\[0, 1\\]"):
        gompertz(t, 1.0, 1.0, 1.0)
    for schedule in EVERY_SCHEDULE:
        with pytest.raises(ValueError, match="progress"):
            schedule(t)
    with pytest.raises(ValueError, match="progress"):
        gompertz(torch.tensor([0.2, t]), 1.0, 1.0, 1.0)


def test_ablation_schedules_values():
    assert Constant(0.9)(0.0) == Constant(0.9)(1.0) == 0.9
    warm = LinearWarmup(w_max=2.0, t0=0.25)
    assert [warm(t) for t in (0.0, 0.125, 0.25, 0.8)] == pytest.approx([0.0, 1.0, 2.0, 2.0])
    cos = CosineDecay(w_max=1.0, w_min=0.2)
    assert [cos(0.0), cos(0.5), cos(1.0)] == pytest.approx([1.0, 0.6, 0.2])
    logi = Logistic(w_max=1.0, k=10.0, t_mid=0.3)
    assert logi(0.3) == pytest.approx(0.5)
    assert logi(0.0) == pytest.approx(1 / (1 + math.exp(3.0)))


@pytest.mark.parametrize(
    ("cls", "kwargs", "name"),
    [
        (Constant, {"value": -1.0}, "value"),
        (LinearWarmup, {"t0": 0.0}, "t0"),
        (LinearWarmup, {"w_max": -1.0}, "w_max"),
        (CosineDecay, {"w_max": 0.1, "w_min": 0.5}, "w_max"),
        (Logistic, {"k": 0.0}, "k"),
        (Logistic, {"t_mid": 2.0}, "t_mid"),
    ],
)
def test_ablation_schedules_reject_bad_parameters(cls, kwargs, name):
    with pytest.raises(ValueError, match=rf"^{name} must be"):
        cls(**kwargs)


def test_every_schedule_satisfies_the_protocol():
    for schedule in EVERY_SCHEDULE:
        assert isinstance(schedule, Schedule)
        assert 0 <= schedule(0.5) <= schedule.peak
    assert set(schedules.__all__) >= {"gompertz", "Gompertz", "Constant", "LinearWarmup"}


def test_piecewise_is_a_step_function_of_progress():
    schedule = Piecewise(boundaries=(0.25, 0.5), values=(1.0, 1.2, 0.96))
    assert [schedule(t) for t in (0.0, 0.2499, 0.25, 0.49, 0.5, 1.0)] == [
        1,
        1,
        1.2,
        1.2,
        0.96,
        0.96,
    ]
    assert schedule.peak == 1.2
    assert Piecewise()(0.7) == 1.0  # one segment: a constant


def test_piecewise_written_three_ways_is_one_schedule(tmp_path):
    want = Piecewise(boundaries=(0.25, 0.5), values=(1.0, 1.2, 0.96))
    assert make_schedule("piecewise(1.0, 0.25:1.2, 0.5:0.96)") == want
    assert make_schedule(want.text()) == want
    assert (
        make_schedule({"name": "piecewise", "boundaries": [0.25, 0.5], "values": [1, 1.2, 0.96]})
        == want
    )
    path = tmp_path / "schedule.json"
    path.write_text('{"name": "piecewise", "boundaries": [0.25, 0.5], "values": [1.0, 1.2, 0.96]}')
    assert make_schedule(f"piecewise(file={path})") == want


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("piecewise(1, 0.5:2, 0.4:1)", "boundaries must be strictly increasing inside"),
        ("piecewise(1, 1.0:2)", "boundaries must be strictly increasing inside"),
        ("piecewise(1, 0.5:-2)", "values must be all >= 0"),
        ("piecewise(1, 2)", "write piecewise"),
        ("piecewise(file=/no/such/file.json)", "no schedule file"),
        ({"name": "piecewise", "boundaries": [0.5], "values": [1.0]}, "one more value than"),
    ],
)
def test_bad_piecewise_schedules_name_the_problem(spec, message):
    with pytest.raises(ValueError, match=message):
        make_schedule(spec, "method.terms.kd.schedule")
