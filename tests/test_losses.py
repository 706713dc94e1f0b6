import math

import numpy as np
import ot
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gompertz_kd.losses import (
    WassersteinFeatureLoss,
    channel_gaussian_stats,
    gaussian_wasserstein_loss,
    gradient_matching_loss,
    kd_loss,
    match_spatial,
    sliced_wasserstein_loss,
    true_class_input_gradient,
)


# ------------------------------------------------------------------ KD
def test_kd_loss_zero_for_identical_logits_positive_otherwise():
    logits = torch.randn(8, 10)
    assert kd_loss(logits, logits.clone(), 4.0).item() == pytest.approx(0.0, abs=1e-6)
    assert kd_loss(logits, torch.randn(8, 10), 4.0).item() > 0


def test_kd_loss_equals_formula_on_hand_made_logits():
    s = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    t = torch.tensor([[0.0, 2.0], [2.0, 0.0]])
    T = 2.0
    expected = 0.0
    for row_s, row_t in zip(s.tolist(), t.tolist(), strict=True):
        zs = [math.exp(v / T) for v in row_s]
        zt = [math.exp(v / T) for v in row_t]
        ps = [v / sum(zs) for v in zs]
        pt = [v / sum(zt) for v in zt]
        expected += sum(q * math.log(q / p) for p, q in zip(ps, pt, strict=True))
    expected = expected / 2 * T**2
    assert kd_loss(s, t, T).item() == pytest.approx(expected, rel=1e-6)


def test_kd_loss_rejects_bad_temperature():
    with pytest.raises(ValueError, match="temperature"):
        kd_loss(torch.zeros(1, 3), torch.zeros(1, 3), 0.0)


# ------------------------------------------------------------------ Wasserstein
def _maps_with_stats(mu, sigma, hw=4):
    """(1, C, hw, hw) maps whose per-channel population mean/std are exactly mu/sigma."""
    sign = torch.tensor([1.0, -1.0]).repeat(hw * hw // 2)
    mu, sigma = (
        torch.as_tensor(mu, dtype=torch.float64),
        torch.as_tensor(sigma, dtype=torch.float64),
    )
    x = mu[:, None] + sigma[:, None] * sign.double()[None, :]
    return x.reshape(1, -1, hw, hw)


def test_channel_stats_recover_known_gaussians():
    f = _maps_with_stats([0.5, -1.0], [2.0, 0.25])
    mu, sigma = channel_gaussian_stats(f)
    assert mu[0].tolist() == pytest.approx([0.5, -1.0])
    assert sigma[0].tolist() == pytest.approx([2.0, 0.25], abs=1e-5)


def test_channel_stats_agree_with_torch_on_channels_last_maps_values_and_gradients():
    f = (3.0 + 2.0 * torch.randn(4, 6, 3, 5, dtype=torch.float64)).contiguous(
        memory_format=torch.channels_last
    )
    mu, sigma = channel_gaussian_stats(f)
    torch.testing.assert_close(mu, f.mean(dim=(2, 3)))
    torch.testing.assert_close(sigma, torch.sqrt(f.var(dim=(2, 3), unbiased=False) + 1e-6))
    assert torch.autograd.gradcheck(
        lambda x: channel_gaussian_stats(x)[1].sum(), (f.clone().requires_grad_(True),)
    )


def test_gaussian_wasserstein_equals_closed_form_and_pot():
    mu_s, sig_s, mu_t, sig_t = [0.5, -1.0, 2.0], [2.0, 0.25, 1.0], [0.0, 1.0, 2.0], [1.0, 0.5, 3.0]
    f_s, f_t = _maps_with_stats(mu_s, sig_s), _maps_with_stats(mu_t, sig_t)
    closed = sum((a - b) ** 2 for a, b in zip(mu_s, mu_t, strict=True)) + sum(
        (a - b) ** 2 for a, b in zip(sig_s, sig_t, strict=True)
    )
    assert gaussian_wasserstein_loss(f_s, f_t, reduction="sum").item() == pytest.approx(
        closed, rel=1e-5
    )
    assert gaussian_wasserstein_loss(f_s, f_t, reduction="mean").item() == pytest.approx(
        closed / 3, rel=1e-5
    )
    # Independent reference: POT's Bures-Wasserstein distance between the diagonal Gaussians.
    w2 = ot.gaussian.bures_wasserstein_distance(
        np.array(mu_s), np.array(mu_t), np.diag(np.square(sig_s)), np.diag(np.square(sig_t))
    )
    assert float(w2) ** 2 == pytest.approx(closed, rel=1e-5)


def test_gaussian_wasserstein_zero_for_identical_positive_otherwise():
    f = torch.randn(4, 8, 5, 5)
    assert gaussian_wasserstein_loss(f, f.clone()).item() == pytest.approx(0.0, abs=1e-7)
    assert gaussian_wasserstein_loss(f, torch.randn(4, 8, 5, 5)).item() > 0
    # spatial sizes may differ; only channel statistics are compared
    assert gaussian_wasserstein_loss(f, torch.randn(4, 8, 2, 2)).item() > 0


def test_gaussian_wasserstein_rejects_channel_mismatch():
    with pytest.raises(ValueError, match="channels"):
        gaussian_wasserstein_loss(torch.randn(2, 3, 4, 4), torch.randn(2, 4, 4, 4))


def test_sliced_wasserstein_zero_for_identical_positive_otherwise_and_differentiable():
    torch.manual_seed(0)
    f_t = torch.randn(4, 6, 3, 3)
    f_s = f_t.clone().requires_grad_(True)
    assert sliced_wasserstein_loss(f_s, f_t).item() == pytest.approx(0.0, abs=1e-10)
    shifted = (f_t + 1.0).requires_grad_(True)
    loss = sliced_wasserstein_loss(shifted, f_t, n_projections=256)
    # a shift by the all-ones vector v moves every projection <theta, v>: E[<theta,v>^2] = |v|^2 / d = 1
    assert loss.item() == pytest.approx(1.0, rel=0.25)
    loss.backward()
    assert shifted.grad is not None and shifted.grad.abs().sum() > 0


def test_match_spatial_pools_larger_map():
    a, b = match_spatial(torch.randn(2, 3, 8, 8), torch.randn(2, 3, 2, 2))
    assert a.shape == b.shape == (2, 3, 2, 2)


def test_wasserstein_feature_loss_projects_and_selects_stages():
    loss_fn = WassersteinFeatureLoss(
        student_channels=[4, 6], teacher_channels=[8, 16, 32], pairs=[(-1, -1), (1, 0)]
    )
    assert [p[0].in_channels for p in loss_fn.projectors] == [6, 4]
    assert [p[0].out_channels for p in loss_fn.projectors] == [32, 16]
    student = [
        torch.randn(2, 4, 8, 8, requires_grad=True),
        torch.randn(2, 6, 4, 4, requires_grad=True),
    ]
    teacher = [torch.randn(2, 8, 8, 8), torch.randn(2, 16, 8, 8), torch.randn(2, 32, 2, 2)]
    loss = loss_fn(student, teacher)
    loss.backward()
    assert loss.item() > 0
    assert all(s.grad is not None for s in student)
    assert all(p.grad is not None for p in loss_fn.parameters())


def test_wasserstein_feature_loss_rejects_bad_pairs():
    with pytest.raises(ValueError, match="teacher stage 3 out of range"):
        WassersteinFeatureLoss([4], [8, 16], pairs=[(3, 0)])
    with pytest.raises(ValueError, match="variant"):
        WassersteinFeatureLoss([4], [8], variant="earth-mover")


# ------------------------------------------------------------------ gradient matching
def _tiny_net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 4 * 4, 5)
    ).double()


def test_gradient_matching_zero_for_same_network_positive_for_different():
    x = torch.randn(3, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 2, 4])
    net_a, net_b = _tiny_net(0), _tiny_net(1)
    g_a = true_class_input_gradient(net_a(x), x, y, create_graph=True)
    g_a2 = true_class_input_gradient(net_a(x), x, y, create_graph=False)
    g_b = true_class_input_gradient(net_b(x), x, y, create_graph=False)
    assert gradient_matching_loss(g_a, g_a2).item() == pytest.approx(0.0, abs=1e-12)
    assert gradient_matching_loss(g_a, g_b).item() > 0


def test_gradient_matching_equals_one_minus_cosine_and_ignores_scale():
    g_s = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    g_t = torch.tensor([[0.0, 3.0], [2.0, 2.0]])
    # row 0 orthogonal (1 - 0), row 1 parallel (1 - 1) -> mean 0.5
    assert gradient_matching_loss(g_s, g_t).item() == pytest.approx(0.5)


def test_input_gradient_matches_per_sample_cross_entropy_gradient():
    net = _tiny_net(0)
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([1, 3])
    g = true_class_input_gradient(net(x), x, y, create_graph=False)
    x0 = x[:1].detach().requires_grad_(True)
    (g0,) = torch.autograd.grad(F.cross_entropy(net(x0), y[:1]), x0)
    torch.testing.assert_close(g[:1], g0)


def test_gradient_matching_passes_gradcheck_through_double_backward():
    """d loss_gm / d student-parameters, with the input gradient built by autograd, is exact."""
    student, teacher = _tiny_net(0), _tiny_net(1)
    teacher.requires_grad_(False)
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    y = torch.tensor([0, 3])
    xt = x.clone().requires_grad_(True)
    g_t = true_class_input_gradient(teacher(xt), xt, y, create_graph=False)
    names = [n for n, _ in student.named_parameters()]

    def loss_of(*params):
        xs = x.clone().requires_grad_(True)
        logits = torch.func.functional_call(student, dict(zip(names, params, strict=True)), (xs,))
        g_s = true_class_input_gradient(logits, xs, y, create_graph=True)
        return gradient_matching_loss(g_s, g_t)

    params = tuple(p.detach().clone().requires_grad_(True) for p in student.parameters())
    assert torch.autograd.gradcheck(loss_of, params, eps=1e-6, atol=1e-5)
    assert all(p.grad is None for p in teacher.parameters())
