"""SP, PKT, NST, VID, OFD and KDSVD against hand computations, their identities, float64
gradchecks.

Every expected value is written out with Python floats and explicit loops, not with the code
under test, so a wrong formula in gompertz_kd.losses fails here.
"""

from __future__ import annotations

import math

import pytest
import torch

from gompertz_kd.losses import (
    OFDConnector,
    VIDRegressor,
    align_singular_vectors,
    kdsvd_loss,
    nst_loss,
    ofd_loss,
    ofd_margin,
    pkt_loss,
    sp_loss,
    truncated_svd,
    vid_loss,
)

D = torch.float64


def _gradcheck(fn, *inputs, fast_mode=False):
    return torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6, fast_mode=fast_mode)


def _flat(x):
    """``(b, ...)`` tensor -> list of rows (Python floats)."""
    return [row.flatten().tolist() for row in x]


def _dot(a, b):
    return sum(p * q for p, q in zip(a, b, strict=True))


def _unit(v, eps=0.0):
    norm = math.sqrt(_dot(v, v))
    return [x / max(norm, 1e-12) for x in v] if eps == 0 else [x / (norm + eps) for x in v]


# ------------------------------------------------------------------ SP
def test_sp_loss_equals_hand_computed_row_normalised_gram_difference():
    torch.manual_seed(0)
    f_s, f_t = torch.randn(3, 2, 2, 2, dtype=D), torch.randn(3, 5, 1, 1, dtype=D)

    def gram(rows):
        g = [[_dot(a, b) for b in rows] for a in rows]
        return [_unit(r) for r in g]

    g_s, g_t = gram(_flat(f_s)), gram(_flat(f_t))
    expected = sum((g_t[i][j] - g_s[i][j]) ** 2 for i in range(3) for j in range(3)) / 9
    assert sp_loss(f_s, f_t).item() == pytest.approx(expected, rel=1e-12)


def test_sp_loss_is_zero_for_identical_or_rescaled_features_and_passes_gradcheck():
    torch.manual_seed(1)
    f = torch.randn(4, 3, 2, 2, dtype=D)
    assert sp_loss(f, f.clone()).item() == pytest.approx(0.0, abs=1e-15)
    # each row of G is L2-normalised: a global rescale of either side leaves it unchanged
    assert sp_loss(5.0 * f, f).item() == pytest.approx(0.0, abs=1e-14)
    t = torch.randn(4, 6, 1, 1, dtype=D)
    assert _gradcheck(lambda a: sp_loss(a, t), f.clone().requires_grad_(True))


# ------------------------------------------------------------------ PKT
def _conditional(rows, eps):
    unit = [[x / (math.sqrt(_dot(r, r)) + eps) for x in r] for r in rows]
    sim = [[(_dot(a, b) + 1.0) / 2.0 for b in unit] for a in unit]
    return [[v / sum(r) for v in r] for r in sim]


def test_pkt_loss_equals_hand_computed_kl_of_cosine_distributions():
    e_s = torch.tensor([[1.0, 0.0], [0.6, 0.8], [-1.0, 1.0]], dtype=D)
    e_t = torch.tensor([[0.0, 1.0, 1.0], [2.0, 0.0, 1.0], [1.0, 1.0, 0.0]], dtype=D)
    eps = 1e-7
    p_s, p_t = _conditional(e_s.tolist(), eps), _conditional(e_t.tolist(), eps)
    expected = (
        sum(
            p_t[i][j] * math.log((p_t[i][j] + eps) / (p_s[i][j] + eps))
            for i in range(3)
            for j in range(3)
        )
        / 9
    )
    assert pkt_loss(e_s, e_t).item() == pytest.approx(expected, rel=1e-12)


def test_pkt_loss_is_zero_for_identical_embeddings_positive_otherwise_and_passes_gradcheck():
    torch.manual_seed(2)
    e = torch.randn(5, 4, dtype=D)
    assert pkt_loss(e, e.clone()).item() == pytest.approx(0.0, abs=1e-15)
    assert pkt_loss(3.0 * e, e).item() == pytest.approx(0.0, abs=1e-12)  # cosines only
    other = torch.randn(5, 7, dtype=D)
    assert pkt_loss(e, other).item() > 0
    assert _gradcheck(lambda a: pkt_loss(a, other), e.clone().requires_grad_(True))


# ------------------------------------------------------------------ NST
def _nst_by_hand(f_s, f_t):
    """Per image: channels as unit vectors over positions, MMD^2 with k(x, y) = (x . y)^2."""
    total, n = 0.0, len(f_s)
    for img in range(n):
        s = [_unit(c.flatten().tolist()) for c in f_s[img]]
        t = [_unit(c.flatten().tolist()) for c in f_t[img]]

        def mean_k(a, b):
            return sum(_dot(x, y) ** 2 for x in a for y in b) / (len(a) * len(b))

        total += mean_k(t, t) + mean_k(s, s) - 2 * mean_k(s, t)
    return total / n


def test_nst_loss_equals_hand_computed_mmd_and_pools_the_larger_map():
    torch.manual_seed(3)
    f_s = torch.randn(2, 3, 4, 4, dtype=D)
    f_t = torch.randn(2, 5, 2, 2, dtype=D)
    pooled = torch.tensor(
        [
            [
                [
                    [
                        sum(f_s[n, c, 2 * i + a, 2 * j + b].item() for a in (0, 1) for b in (0, 1))
                        / 4
                        for j in range(2)
                    ]
                    for i in range(2)
                ]
                for c in range(3)
            ]
            for n in range(2)
        ],
        dtype=D,
    )
    expected = _nst_by_hand(pooled, f_t)
    assert nst_loss(f_s, f_t).item() == pytest.approx(expected, rel=1e-10)


def test_nst_loss_is_a_nonnegative_mmd_zero_for_identical_maps_and_passes_gradcheck():
    torch.manual_seed(4)
    for _ in range(20):
        f_s = torch.randn(3, 4, 3, 3, dtype=D)
        f_t = torch.randn(3, 6, 3, 3, dtype=D).relu()
        assert nst_loss(f_s, f_t).item() >= -1e-12
    f = torch.randn(2, 4, 3, 3, dtype=D)
    assert nst_loss(f, f.clone()).item() == pytest.approx(0.0, abs=1e-14)
    # the same channels in another order: the same set of neurons, the same distribution
    assert nst_loss(f[:, [2, 0, 3, 1]], f).item() == pytest.approx(0.0, abs=1e-14)
    t = torch.randn(2, 3, 3, 3, dtype=D)
    assert _gradcheck(lambda a: nst_loss(a, t), f.clone().requires_grad_(True))


# ------------------------------------------------------------------ VID
def test_vid_loss_equals_hand_computed_gaussian_negative_log_likelihood():
    torch.manual_seed(5)
    mean = torch.randn(2, 3, 2, 2, dtype=D)
    target = torch.randn(2, 3, 2, 2, dtype=D)
    variance = torch.tensor([0.5, 2.0, 5.0], dtype=D)
    total, count = 0.0, 0
    for n in range(2):
        for c in range(3):
            v = variance[c].item()
            for i in range(2):
                for j in range(2):
                    d = mean[n, c, i, j].item() - target[n, c, i, j].item()
                    total += 0.5 * (d * d / v + math.log(v))
                    count += 1
    assert vid_loss(mean, variance, target).item() == pytest.approx(total / count, rel=1e-12)
    with pytest.raises(ValueError, match="variance"):
        vid_loss(mean, variance[:2], target)


def test_vid_regressor_starts_at_its_initial_variance_and_passes_gradcheck():
    torch.manual_seed(6)
    regressor = VIDRegressor(2, 3, 3, init_pred_var=5.0, eps=1e-5).double()
    x = torch.randn(2, 2, 2, 2, dtype=D)
    mean, variance = regressor(x)
    assert mean.shape == (2, 3, 2, 2)
    assert variance.tolist() == pytest.approx([5.0] * 3, rel=1e-6)  # float32 init
    # softplus(log_scale) + eps, by hand
    raw = regressor.log_scale[0].item()
    assert variance[0].item() == pytest.approx(math.log1p(math.exp(raw)) + 1e-5, rel=1e-12)
    target = torch.randn(2, 3, 2, 2, dtype=D)
    # the likelihood is minimised by the variance of the residuals: the gradient says so
    names = [n for n, _ in regressor.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_(True) for p in regressor.parameters())

    def loss(*ps):
        out = torch.func.functional_call(regressor, dict(zip(names, ps, strict=True)), (x,))
        return vid_loss(*out, target)

    assert _gradcheck(loss, *params, fast_mode=True)
    assert _gradcheck(
        lambda m, v: vid_loss(m, v, target),
        mean.detach().clone().requires_grad_(True),
        torch.tensor([0.5, 1.0, 3.0], dtype=D, requires_grad=True),
    )
    with pytest.raises(ValueError, match="init_pred_var"):
        VIDRegressor(2, 3, 3, init_pred_var=0.0)


# ------------------------------------------------------------------ OFD
def _phi_cdf(x):
    return 0.5 * math.erfc(-x / math.sqrt(2))


def test_ofd_margin_is_the_expected_negative_response_or_minus_three_sigma():
    mean = torch.tensor([0.0, 1.0, -0.5, 4.0], dtype=D)
    std = torch.tensor([1.0, -2.0, 0.5, 1.0], dtype=D)  # the sign of a BN weight is dropped
    expected = []
    for m, s in zip(mean.tolist(), std.tolist(), strict=True):
        s = abs(s)
        tail = _phi_cdf(-m / s)
        if tail > 0.001:
            density = math.exp(-((m / s) ** 2) / 2) / math.sqrt(2 * math.pi)
            expected.append(-s * density / tail + m)
        else:  # m = 4 s: P(x < 0) = 3e-5
            expected.append(-3 * s)
    got = ofd_margin(mean, std)
    assert got.tolist() == pytest.approx(expected, rel=1e-12)
    assert got[0].item() == pytest.approx(-math.sqrt(2 / math.pi))  # E[x | x < 0], x ~ N(0, 1)
    assert (got <= 0).all()


def test_ofd_loss_equals_hand_computed_partial_l2_with_teacher_pooled_to_the_student():
    source = torch.tensor([[[[1.0, -2.0], [-0.5, 0.3]], [[-3.0, 0.2], [0.1, -0.1]]]], dtype=D)
    # teacher 4x4, pooled to 2x2 by 2x2 blocks: the constant blocks pool to themselves
    blocks = [[[0.5, -1.0], [-0.2, 2.0]], [[-4.0, -0.05], [1.0, -0.3]]]
    teacher = torch.tensor(
        [[[[blocks[c][i // 2][j // 2] for j in range(4)] for i in range(4)] for c in range(2)]],
        dtype=D,
    )
    margin = torch.tensor([-0.4, -1.0], dtype=D)
    total = 0.0
    for c in range(2):
        for i in range(2):
            for j in range(2):
                s = source[0, c, i, j].item()
                target = max(blocks[c][i][j], margin[c].item())
                if s > target or target > 0:
                    total += (s - target) ** 2
    # summed over channels and positions, averaged over the batch (the benchmark's reduction):
    # the same image twice costs what it costs once
    got = ofd_loss(torch.cat([source, source]), torch.cat([teacher, teacher]), margin)
    assert got.item() == pytest.approx(total, rel=1e-12)
    # a student at or below a negative target costs nothing there
    below = torch.minimum(source, torch.full_like(source, -5.0))
    negative_t = -torch.ones(1, 2, 2, 2, dtype=D)
    assert ofd_loss(below, negative_t, margin).item() == 0.0
    with pytest.raises(ValueError, match="margin per channel"):
        ofd_loss(source, teacher, margin[:1])


def test_ofd_loss_and_connector_pass_gradcheck():
    torch.manual_seed(7)
    source = torch.randn(2, 3, 2, 2, dtype=D, requires_grad=True)
    teacher = torch.randn(2, 3, 2, 2, dtype=D)
    margin = torch.tensor([-0.5, -0.2, -1.0], dtype=D)
    assert _gradcheck(lambda a: ofd_loss(a, teacher, margin), source)
    connector = OFDConnector(2, 3).double()
    assert type(connector.conv) is torch.nn.Conv2d and connector.conv.kernel_size == (1, 1)
    assert connector.conv.bias is None
    assert connector.bn.weight.tolist() == [1.0] * 3 and connector.bn.bias.tolist() == [0.0] * 3
    assert OFDConnector(2, 3, kernel_size=3)(torch.randn(1, 2, 4, 4)).shape == (1, 3, 4, 4)


# ------------------------------------------------------------------ KDSVD
def test_truncated_svd_finds_known_singular_vectors_up_to_sign_and_normalises():
    # X (positions x channels) = sum_i sigma_i u_i v_i^T with orthonormal u, v known by construction
    sigma, v = [3.0, 2.0, 0.5], [[0.0, 1.0, 0.0], [0.6, 0.0, 0.8], [0.8, 0.0, -0.6]]
    u = [[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0], [0.0, 1.0, 0.0, 0.0]]
    x = [[sum(sigma[i] * u[i][p] * v[i][c] for i in range(3)) for c in range(3)] for p in range(4)]
    feature = torch.tensor(x, dtype=D).t().reshape(1, 3, 2, 2)  # (N, C, H, W)
    vectors, values = truncated_svd(feature, 2)
    for i in range(2):
        got = vectors[0, :, i].tolist()
        sign = 1.0 if _dot(got, v[i]) > 0 else -1.0
        assert [sign * g for g in got] == pytest.approx(v[i], abs=1e-12)
    norm = math.hypot(3.0, 2.0)
    assert values[0].tolist() == pytest.approx([3.0 / norm, 2.0 / norm])
    with pytest.raises(ValueError, match="k=5"):
        truncated_svd(feature, 5)


def test_align_singular_vectors_picks_the_closest_student_vector_with_the_teachers_sign():
    v_s = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 0.8, -0.6], [0.0, 0.6, 0.8]]], dtype=D)
    # columns are the vectors: (1, 0, 0), (0, 0.8, 0.6), (0, -0.6, 0.8); the teacher's has
    # cosines 0.1, -0.12, -0.98 with them: column 2 wins, its sign flipped
    v_t = torch.tensor([[[0.1], [0.6], [-0.7]]], dtype=D)
    got = align_singular_vectors(v_s, v_t)
    assert got[0, :, 0].tolist() == pytest.approx([0.0, 0.6, -0.8])


def _kdsvd_by_hand(features_s, features_t, k):
    """The loss from the singular vectors `truncated_svd` returns, every other step by loops."""
    total, previous, batch = 0.0, None, features_s[0].shape[0]
    for f_s, f_t in zip(features_s, features_t, strict=True):
        v_t, s_t = truncated_svd(f_t, k)
        v_s, _ = truncated_svd(f_s, k + 3)
        channels = f_s.shape[1]
        stage = []
        for n in range(batch):
            aligned = []
            for j in range(k):  # teacher vector j: the student vector of largest |cos|, signed
                t_col = [v_t[n, c, j].item() for c in range(channels)]
                cosines = [
                    _dot([v_s[n, c, i].item() for c in range(channels)], t_col)
                    for i in range(k + 3)
                ]
                best = max(range(k + 3), key=lambda i: abs(cosines[i]))
                sign = math.copysign(1.0, cosines[best])
                aligned.append([sign * v_s[n, c, best].item() for c in range(channels)])
            scale = [s_t[n, j].item() for j in range(k)]
            vs = [[aligned[j][c] * scale[j] for j in range(k)] for c in range(channels)]
            vt = [[v_t[n, c, j].item() * scale[j] for j in range(k)] for c in range(channels)]
            stage.append((vs, vt))
        if previous is not None:
            for n in range(batch):
                (vs, vt), (ps, pt) = stage[n], previous[n]
                for i in range(len(vs)):
                    for j in range(len(ps)):
                        for m in range(k):
                            rs = math.exp(-((vs[i][m] - ps[j][m]) ** 2) / 8)
                            rt = math.exp(-((vt[i][m] - pt[j][m]) ** 2) / 8)
                            total += (rs - rt) ** 2
        previous = stage
    return total / batch


def test_kdsvd_loss_equals_the_hand_computed_rbf_correlation_difference():
    torch.manual_seed(8)
    features_s = [torch.randn(2, 4, 3, 3, dtype=D), torch.randn(2, 5, 2, 2, dtype=D)]
    features_t = [torch.randn(2, 4, 4, 4, dtype=D), torch.randn(2, 5, 3, 3, dtype=D)]
    expected = _kdsvd_by_hand(features_s, features_t, 1)
    assert kdsvd_loss(features_s, features_t, 1).item() == pytest.approx(expected, rel=1e-10)
    assert expected > 0
    wide_s = [torch.randn(2, 6, 3, 3, dtype=D), torch.randn(2, 7, 3, 3, dtype=D)]
    wide_t = [torch.randn(2, 6, 3, 3, dtype=D), torch.randn(2, 7, 2, 2, dtype=D)]
    assert kdsvd_loss(wide_s, wide_t, 2).item() == pytest.approx(
        _kdsvd_by_hand(wide_s, wide_t, 2), rel=1e-10
    )


def test_kdsvd_loss_is_zero_for_identical_maps_refuses_unequal_widths_and_passes_gradcheck():
    torch.manual_seed(9)
    features = [torch.randn(2, 4, 3, 3, dtype=D), torch.randn(2, 5, 2, 2, dtype=D)]
    assert kdsvd_loss(features, [f.clone() for f in features]).item() == pytest.approx(
        0.0, abs=1e-20
    )
    with pytest.raises(ValueError, match="same batch size and channel count"):
        kdsvd_loss(features, [features[0], torch.randn(2, 6, 2, 2, dtype=D)])
    with pytest.raises(ValueError, match="at least two"):
        kdsvd_loss(features[:1], features[:1])
    targets = [torch.randn(2, 4, 3, 3, dtype=D), torch.randn(2, 5, 2, 2, dtype=D)]
    inputs = [f.clone().requires_grad_(True) for f in features]
    assert _gradcheck(lambda a, b: kdsvd_loss([a, b], targets), *inputs)


def test_truncated_svd_gradient_is_finite_with_repeated_trailing_singular_values():
    """Dead channels of a post-ReLU map repeat the singular value 0; the leading vectors are
    still smooth functions of the map, and their gradient stays finite (torch.linalg.svd's own
    backward divides by the differences of every pair of singular values)."""
    torch.manual_seed(11)
    x = torch.randn(2, 6, 4, 4, dtype=D).relu()
    x[:, 3:] = 0.0  # three dead channels: singular values (..., 0, 0, 0)
    x.requires_grad_(True)
    weights = torch.randn(2, 6, 1, dtype=D)
    vectors, _ = truncated_svd(x, 1)
    (vectors * weights).abs().sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    # and it is the true derivative where the map is generic (float64 gradcheck, r up to p)
    generic = torch.randn(2, 5, 2, 2, dtype=D, requires_grad=True)

    def signed(a, k):
        v, s = truncated_svd(a, k)
        return (
            v
            * torch.sign(v[:, :1]).detach()
            * torch.randn(2, 5, k, dtype=D, generator=torch.Generator().manual_seed(1))
        ).sum() + s.sum()

    assert _gradcheck(lambda a: signed(a, 2), generic)
    assert _gradcheck(lambda a: signed(a, 4), generic)  # every singular vector of a 4x5 matrix


# ------------------------------------------------------------------ shared contract
@pytest.mark.parametrize(
    "loss_of",
    [
        lambda s, t: sp_loss(s, t),
        lambda s, t: pkt_loss(s.flatten(1), t.flatten(1)),
        lambda s, t: nst_loss(s, t),
        lambda s, t: vid_loss(s, torch.ones(s.shape[1], dtype=D), t),
        lambda s, t: ofd_loss(s, t, -torch.ones(s.shape[1], dtype=D)),
        lambda s, t: kdsvd_loss([s, s * s], [t, t.sin()]),
    ],
    ids=["sp", "pkt", "nst", "vid", "ofd", "kdsvd"],
)
def test_every_loss_treats_the_teacher_as_a_constant(loss_of):
    torch.manual_seed(10)
    s = torch.randn(3, 4, 3, 3, dtype=D, requires_grad=True)
    t = torch.randn(3, 4, 3, 3, dtype=D, requires_grad=True)
    loss = loss_of(s, t)
    assert loss.dim() == 0
    loss.backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None
