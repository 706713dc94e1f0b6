"""The benchmark methods' loss terms against hand computations, plus float64 gradchecks.

Every expected value is written out with Python floats / explicit loops, not with the code under
test, so a wrong formula in gompertz_kd.losses fails here.
"""

from __future__ import annotations

import copy
import math

import ot
import pytest
import torch
import torch.nn.functional as F

from gompertz_kd.losses import (
    ContrastMemory,
    Embed,
    HintRegressor,
    LearnableTemperature,
    ReviewFusion,
    at_loss,
    crd_nce_loss,
    dist_loss,
    dkd_loss,
    dkd_parts,
    fitnet_loss,
    hcl_loss,
    kd_loss,
    pearson_correlation,
    reverse_gradient,
    rkd_loss,
    standardize_logits,
    wkd_cost_matrix,
    wkd_logit_loss,
    wkd_target_loss,
)

D = torch.float64


def _softmax(row, temperature=1.0):
    exps = [math.exp(v / temperature) for v in row]
    return [e / sum(exps) for e in exps]


def _kl(p, q):
    """KL(p || q) of two lists."""
    return sum(a * math.log(a / b) for a, b in zip(p, q, strict=True) if a > 0)


def _zscore(row):
    mean = sum(row) / len(row)
    std = math.sqrt(sum((v - mean) ** 2 for v in row) / (len(row) - 1))
    return [(v - mean) / (std + 1e-7) for v in row]


def _gradcheck(fn, *inputs, fast_mode=False):
    return torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6, fast_mode=fast_mode)


def _params_gradcheck(module, loss_of_output, *args):
    """gradcheck of ``loss_of_output(module(*args))`` w.r.t. the module's parameters.

    Fast mode (a random projection of the Jacobian) keeps the many-parameter modules quick.
    """
    names = [n for n, _ in module.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_(True) for p in module.parameters())

    def fn(*ps):
        out = torch.func.functional_call(module, dict(zip(names, ps, strict=True)), args)
        return loss_of_output(out)

    return _gradcheck(fn, *params, fast_mode=True)


S = [[1.0, 0.0, -1.0, 2.0], [0.5, 0.3, 0.1, -0.4], [2.0, 1.0, 0.0, 0.0]]
T = [[0.0, 2.0, 1.0, 1.0], [1.5, -0.5, 0.2, 0.0], [3.0, -1.0, 0.5, 1.0]]
Y = [3, 0, 1]


# ------------------------------------------------------------------ KD and standardisation
def test_standardize_logits_is_the_per_row_z_score_with_sample_std_and_eps():
    got = standardize_logits(torch.tensor(S, dtype=D))
    for row_got, row in zip(got.tolist(), S, strict=True):
        assert row_got == pytest.approx(_zscore(row), rel=1e-12)
    # a constant row stays finite (eps), all zeros
    assert standardize_logits(torch.full((1, 3), 5.0)).tolist() == [[0.0, 0.0, 0.0]]


def test_kd_loss_takes_new_keyword_names_and_standardizes_both_sides_keeping_t_squared():
    temperature = 2.0
    expected = 0.0
    for row_s, row_t in zip(S, T, strict=True):
        p_s = _softmax(_zscore(row_s), temperature)
        p_t = _softmax(_zscore(row_t), temperature)
        expected += _kl(p_t, p_s)
    expected = expected / len(S) * temperature**2
    got = kd_loss(
        logits_s=torch.tensor(S, dtype=D),
        logits_t=torch.tensor(T, dtype=D),
        temperature=temperature,
        standardize=True,
    )
    assert got.item() == pytest.approx(expected, rel=1e-10)
    # standardisation makes the loss blind to a per-sample shift and scale of either side
    s, t = torch.tensor(S, dtype=D), torch.tensor(T, dtype=D)
    scaled = kd_loss(3.0 * s + 1.0, 0.5 * t - 2.0, temperature, standardize=True)
    assert scaled.item() == pytest.approx(expected, rel=1e-6)
    assert kd_loss(3.0 * s, t, temperature).item() != pytest.approx(
        kd_loss(s, t, temperature).item(), rel=1e-3
    )


def test_kd_loss_and_standardize_pass_gradcheck_including_a_tensor_temperature():
    torch.manual_seed(0)
    s = torch.randn(3, 5, dtype=D, requires_grad=True)
    t = torch.randn(3, 5, dtype=D)
    temperature = torch.tensor(3.0, dtype=D, requires_grad=True)
    assert _gradcheck(lambda a, tau: kd_loss(a, t, tau), s, temperature)
    assert _gradcheck(lambda a: kd_loss(a, t, 2.0, standardize=True), s)
    assert _gradcheck(lambda a: standardize_logits(a).square().sum(), s)


# ------------------------------------------------------------------ DKD
def _dkd_by_hand(row_s, row_t, y, temperature):
    p_s, p_t = _softmax(row_s, temperature), _softmax(row_t, temperature)
    b_s, b_t = [p_s[y], 1 - p_s[y]], [p_t[y], 1 - p_t[y]]
    tckd = _kl(b_t, b_s)
    q_s = [p / (1 - p_s[y]) for j, p in enumerate(p_s) if j != y]
    q_t = [p / (1 - p_t[y]) for j, p in enumerate(p_t) if j != y]
    nckd = _kl(q_t, q_s)
    return tckd * temperature**2, nckd * temperature**2, p_t[y]


def test_dkd_parts_and_loss_equal_hand_computed_target_and_non_target_kl():
    temperature = 4.0
    hand = [_dkd_by_hand(rs, rt, y, temperature) for rs, rt, y in zip(S, T, Y, strict=True)]
    tckd_hand = sum(h[0] for h in hand) / len(hand)
    nckd_hand = sum(h[1] for h in hand) / len(hand)
    s, t, y = torch.tensor(S, dtype=D), torch.tensor(T, dtype=D), torch.tensor(Y)
    tckd, nckd = dkd_parts(s, t, y, temperature)
    assert tckd.item() == pytest.approx(tckd_hand, rel=1e-10)
    assert nckd.item() == pytest.approx(nckd_hand, rel=1e-10)
    got = dkd_loss(s, t, y, alpha=1.0, beta=8.0, temperature=temperature)
    assert got.item() == pytest.approx(tckd_hand + 8.0 * nckd_hand, rel=1e-10)


def test_dkd_reformulates_kd_per_sample_as_tckd_plus_one_minus_teacher_target_prob_nckd():
    """Zhao et al., Eq. 5: KD = TCKD + (1 - p_t^teacher) * NCKD (alpha = beta = 1 parts)."""
    temperature = 2.0
    for row_s, row_t, y in zip(S, T, Y, strict=True):
        s, t = torch.tensor([row_s], dtype=D), torch.tensor([row_t], dtype=D)
        tckd, nckd = dkd_parts(s, t, torch.tensor([y]), temperature)
        p_t_target = _softmax(row_t, temperature)[y]
        kd = kd_loss(s, t, temperature)
        assert kd.item() == pytest.approx((tckd + (1 - p_t_target) * nckd).item(), rel=1e-10)


def test_dkd_is_zero_for_identical_logits_and_passes_gradcheck():
    s, y = torch.tensor(S, dtype=D), torch.tensor(Y)
    tckd, nckd = dkd_parts(s, s.clone(), y, 4.0)
    assert tckd.item() == pytest.approx(0.0, abs=1e-12)
    assert nckd.item() == pytest.approx(0.0, abs=1e-12)
    t = torch.tensor(T, dtype=D)
    assert _gradcheck(lambda a: dkd_loss(a, t, y, 1.0, 8.0, 4.0), s.clone().requires_grad_(True))
    assert _gradcheck(
        lambda a: dkd_loss(a, t, y, 1.0, 2.0, 2.0, standardize=True),
        s.clone().requires_grad_(True),
    )


# ------------------------------------------------------------------ DIST
def _pearson_by_hand(a, b):
    ma, mb = sum(a) / len(a), sum(b) / len(b)
    cov = sum((x - ma) * (z - mb) for x, z in zip(a, b, strict=True))
    na = math.sqrt(sum((x - ma) ** 2 for x in a))
    nb = math.sqrt(sum((z - mb) ** 2 for z in b))
    return cov / (na * nb + 1e-8)


def test_pearson_correlation_one_for_correlated_minus_one_for_anticorrelated_rows():
    a = torch.tensor([[1.0, 2.0, 3.0], [0.0, 1.0, 0.0]], dtype=D)
    b = torch.tensor([[2.0, 4.0, 6.5], [5.0, 1.0, 5.0]], dtype=D)
    got = pearson_correlation(a, b).tolist()
    assert got == pytest.approx(
        [_pearson_by_hand(r, q) for r, q in zip(a.tolist(), b.tolist(), strict=True)]
    )
    assert pearson_correlation(a, 3.0 * a + 1.0).tolist() == pytest.approx([1.0, 1.0])
    assert pearson_correlation(a, -a).tolist() == pytest.approx([-1.0, -1.0])


def test_dist_loss_equals_hand_computed_inter_and_intra_relations():
    temperature, beta, gamma = 4.0, 2.0, 3.0
    p_s = [_softmax(r, temperature) for r in S]
    p_t = [_softmax(r, temperature) for r in T]
    inter = 1 - sum(_pearson_by_hand(a, b) for a, b in zip(p_s, p_t, strict=True)) / len(S)
    columns = range(len(S[0]))
    intra = 1 - sum(
        _pearson_by_hand([r[c] for r in p_s], [r[c] for r in p_t]) for c in columns
    ) / len(S[0])
    expected = temperature**2 * (beta * inter + gamma * intra)
    got = dist_loss(torch.tensor(S, dtype=D), torch.tensor(T, dtype=D), beta, gamma, temperature)
    assert got.item() == pytest.approx(expected, rel=1e-10)


def test_dist_loss_zero_when_perfectly_correlated_and_maximal_when_anticorrelated():
    s = torch.tensor(S, dtype=D)
    # not exactly 0: the reference's eps = 1e-8 sits next to squared norms of order 1e-2
    assert dist_loss(s, s.clone(), 1.0, 1.0, 1.0).item() == pytest.approx(0.0, abs=1e-5)
    # Two classes with swapped logits: p_t = (1 - p_s[0], 1 - p_s[1]) per row, so every row and
    # every column is perfectly anti-correlated: inter = intra = 1 - (-1) = 2.
    two = torch.tensor([[1.0, -1.0], [0.2, 0.7], [-2.0, 0.5]], dtype=D)
    got = dist_loss(two, two.flip(1), beta=1.0, gamma=1.0, temperature=2.0)
    assert got.item() == pytest.approx(2.0**2 * (2.0 + 2.0), rel=1e-6)


def test_dist_and_pearson_pass_gradcheck():
    torch.manual_seed(1)
    s = torch.randn(4, 5, dtype=D, requires_grad=True)
    t = torch.randn(4, 5, dtype=D)
    assert _gradcheck(lambda a: dist_loss(a, t, 1.0, 2.0, 4.0), s)
    assert _gradcheck(lambda a: pearson_correlation(a, t).sum(), s)


# ------------------------------------------------------------------ AT
def _attention_by_hand(fmap):
    """fmap: nested list [C][H][W] of one image -> unit vector over H*W of mean_c f^2."""
    channels, height, width = len(fmap), len(fmap[0]), len(fmap[0][0])
    flat = [
        sum(fmap[c][i][j] ** 2 for c in range(channels)) / channels
        for i in range(height)
        for j in range(width)
    ]
    norm = math.sqrt(sum(v * v for v in flat))
    return [v / norm for v in flat]


def test_at_loss_equals_hand_computation_and_pools_the_larger_map():
    torch.manual_seed(2)
    f_s = torch.randn(2, 3, 4, 4, dtype=D)
    f_t = torch.randn(2, 5, 2, 2, dtype=D)
    # average-pool the student's 4x4 to 2x2 by hand: mean of each 2x2 block
    pooled = [
        [
            [
                [
                    sum(f_s[n, c, 2 * i + a, 2 * j + b].item() for a in (0, 1) for b in (0, 1)) / 4
                    for j in range(2)
                ]
                for i in range(2)
            ]
            for c in range(3)
        ]
        for n in range(2)
    ]
    total = 0.0
    for n in range(2):
        a_s = _attention_by_hand(pooled[n])
        a_t = _attention_by_hand(f_t[n].tolist())
        total += sum((x - z) ** 2 for x, z in zip(a_s, a_t, strict=True))
    expected = total / (2 * 4)
    assert at_loss(f_s, f_t).item() == pytest.approx(expected, rel=1e-10)
    assert at_loss(f_s, f_s.clone()).item() == pytest.approx(0.0, abs=1e-15)
    assert _gradcheck(lambda a: at_loss(a, f_t[:1]), f_s[:1, :2].clone().requires_grad_(True))


# ------------------------------------------------------------------ RKD
def _smooth_l1(a, b):
    d = abs(a - b)
    return 0.5 * d * d if d < 1 else d - 0.5


def test_rkd_loss_equals_hand_computed_distance_and_angle_terms():
    e_s = [[0.0, 0.0], [1.0, 0.0], [0.0, 2.0]]
    e_t = [[0.0, 0.0, 1.0], [3.0, 0.0, 0.0], [1.0, 1.0, 1.0]]
    n = 3

    def distances(points):
        d = [[math.dist(points[i], points[j]) for j in range(n)] for i in range(n)]
        mean = sum(d[i][j] for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
        return [[v / mean for v in row] for row in d]

    def angles(points):
        out = []
        for i in range(n):
            for j in range(n):
                for k in range(n):
                    u = [a - b for a, b in zip(points[j], points[i], strict=True)]
                    v = [a - b for a, b in zip(points[k], points[i], strict=True)]
                    nu, nv = math.hypot(*u), math.hypot(*v)
                    out.append(
                        0.0
                        if nu == 0 or nv == 0
                        else sum(a * b for a, b in zip(u, v, strict=True)) / (nu * nv)
                    )
        return out

    d_s, d_t = distances(e_s), distances(e_t)
    loss_d = sum(_smooth_l1(d_s[i][j], d_t[i][j]) for i in range(n) for j in range(n)) / n**2
    loss_a = sum(_smooth_l1(a, b) for a, b in zip(angles(e_s), angles(e_t), strict=True)) / n**3
    got = rkd_loss(torch.tensor(e_s, dtype=D), torch.tensor(e_t, dtype=D), 25.0, 50.0)
    assert got.item() == pytest.approx(25.0 * loss_d + 50.0 * loss_a, rel=1e-6)


def test_rkd_loss_invariant_to_similarity_transforms_and_passes_gradcheck():
    torch.manual_seed(3)
    e_t = torch.randn(5, 4, dtype=D)
    # distances are normalised by their mean and angles ignore scale: a scaled, shifted copy matches
    copy_s = 3.0 * e_t + 1.5
    assert rkd_loss(copy_s, e_t).item() == pytest.approx(0.0, abs=1e-10)
    e_s = torch.randn(5, 3, dtype=D, requires_grad=True)
    assert _gradcheck(lambda a: rkd_loss(a, e_t, 25.0, 50.0), e_s)


# ------------------------------------------------------------------ FitNets
def test_fitnet_loss_is_the_elementwise_mean_squared_error_and_names_both_shapes():
    a = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]], dtype=D)
    b = torch.tensor([[[[0.0, 2.0], [5.0, 3.0]]]], dtype=D)
    assert fitnet_loss(a, b).item() == pytest.approx((1 + 0 + 4 + 1) / 4)
    with pytest.raises(ValueError, match=r"\(2, 3, 4, 4\) and \(2, 5, 4, 4\)"):
        fitnet_loss(torch.zeros(2, 3, 4, 4), torch.zeros(2, 5, 4, 4))
    assert _gradcheck(lambda x: fitnet_loss(x, b), a.clone().requires_grad_(True))


@pytest.mark.parametrize(
    ("student", "teacher", "conv"),
    [
        ((4, 8, 8), (6, 4, 4), torch.nn.Conv2d),  # twice as tall: 3x3 stride 2
        ((4, 4, 4), (6, 8, 8), torch.nn.ConvTranspose2d),  # half as tall: 4x4 transposed
        ((4, 8, 8), (6, 8, 8), torch.nn.Conv2d),  # same size: 1x1
        ((4, 6, 6), (6, 4, 4), torch.nn.Conv2d),  # otherwise: valid 3x3
    ],
)
def test_hint_regressor_maps_the_student_map_to_the_teacher_shape(student, teacher, conv):
    regressor = HintRegressor(student, teacher).double()
    assert type(regressor.conv) is conv
    out = regressor(torch.randn(2, *student, dtype=D))
    assert out.shape == (2, *teacher)
    assert (out >= 0).all()  # ends in ReLU


def test_hint_regressor_rejects_unsupported_sizes_and_passes_parameter_gradcheck():
    with pytest.raises(ValueError, match="student shape"):
        HintRegressor((4, 3, 3), (6, 8, 8))
    torch.manual_seed(4)
    regressor = HintRegressor((2, 4, 4), (3, 2, 2)).double()
    x = torch.randn(3, 2, 4, 4, dtype=D)
    target = torch.randn(3, 3, 2, 2, dtype=D)
    assert _params_gradcheck(regressor, lambda out: fitnet_loss(out, target), x)


# ------------------------------------------------------------------ CRD
def test_crd_nce_loss_equals_hand_computed_nce_objective():
    scores = [[0.5, 0.01, 0.02], [0.2, 0.1, 0.001]]
    num_data = 10
    noise = 2 / num_data  # K * P_n with K = 2
    total = 0.0
    for row in scores:
        total += math.log(row[0] / (row[0] + noise + 1e-7))
        total += sum(math.log(noise / (v + noise + 1e-7)) for v in row[1:])
    expected = -total / 2
    got = crd_nce_loss(torch.tensor(scores, dtype=D), num_data)
    assert got.item() == pytest.approx(expected, rel=1e-12)
    x = torch.tensor(scores, dtype=D, requires_grad=True)
    assert _gradcheck(lambda a: crd_nce_loss(a, num_data), x)


def test_embed_is_linear_then_unit_norm():
    torch.manual_seed(11)
    embed = Embed(6, 4).double()
    x = torch.randn(3, 6, 1, 1, dtype=D)
    out = embed(x)
    raw = x.flatten(1) @ embed.linear.weight.t() + embed.linear.bias
    torch.testing.assert_close(out, raw / raw.norm(dim=1, keepdim=True))
    assert _params_gradcheck(embed, lambda o: o.sin().sum(), x)


def test_contrast_memory_scores_normalises_and_updates_its_banks_as_the_reference():
    torch.manual_seed(5)
    dim, num_data, k, temp, momentum = 4, 10, 3, 0.5, 0.25
    memory = ContrastMemory(dim, num_data, k, temp, momentum).double()
    state = memory.state_dict()
    assert {"memory_s", "memory_t", "z_s", "z_t"} <= set(state)
    bound = 1 / math.sqrt(dim / 3)
    assert memory.memory_s.abs().max() <= bound and memory.memory_t.abs().max() <= bound
    assert memory.z_s.item() < 0 and memory.z_t.item() < 0  # unset
    bank_s, bank_t = memory.memory_s.clone(), memory.memory_t.clone()
    e_s = F.normalize(torch.randn(2, dim, dtype=D), dim=1)
    e_t = F.normalize(torch.randn(2, dim, dtype=D), dim=1)
    indices = torch.tensor([7, 2])
    negatives = torch.tensor([[0, 1, 3], [9, 9, 4]])
    scores_s, scores_t = memory(e_s, e_t, indices, negatives)

    def raw_scores(bank, e):
        rows = [[indices[i].item(), *negatives[i].tolist()] for i in range(2)]
        return [
            [
                math.exp(sum(bank[r, d].item() * e[i, d].item() for d in range(dim)) / temp)
                for r in row
            ]
            for i, row in enumerate(rows)
        ]

    raw_s, raw_t = raw_scores(bank_t, e_s), raw_scores(bank_s, e_t)  # student vs teacher bank
    z_s = sum(map(sum, raw_s)) / 8 * num_data
    z_t = sum(map(sum, raw_t)) / 8 * num_data
    assert memory.z_s.item() == pytest.approx(z_s) and memory.z_t.item() == pytest.approx(z_t)
    assert scores_s.tolist()[0] == pytest.approx([v / z_s for v in raw_s[0]])
    assert scores_t.tolist()[1] == pytest.approx([v / z_t for v in raw_t[1]])
    # momentum update of the rows at `indices`, renormalised; every other row untouched
    for i, row in enumerate(indices.tolist()):
        for bank_before, bank_after, e in (
            (bank_s, memory.memory_s, e_s),
            (bank_t, memory.memory_t, e_t),
        ):
            mixed = [
                momentum * bank_before[row, d].item() + (1 - momentum) * e[i, d].item()
                for d in range(dim)
            ]
            norm = math.sqrt(sum(v * v for v in mixed))
            assert bank_after[row].tolist() == pytest.approx([v / norm for v in mixed])
    untouched = [r for r in range(num_data) if r not in (7, 2)]
    torch.testing.assert_close(memory.memory_s[untouched], bank_s[untouched])
    # Z is fixed after the first call
    memory(e_s, e_t, indices, negatives)
    assert memory.z_s.item() == pytest.approx(z_s)
    with pytest.raises(ValueError, match="negatives"):
        memory(e_s, e_t, indices, negatives[:, :2])


def test_contrast_memory_scores_pass_gradcheck_wrt_both_embeddings():
    torch.manual_seed(6)
    memory = ContrastMemory(3, 8, 2, 0.5, 0.5).double()
    indices, negatives = torch.tensor([1, 4]), torch.tensor([[0, 2], [6, 7]])
    e_s = F.normalize(torch.randn(2, 3, dtype=D), dim=1).requires_grad_(True)
    e_t = F.normalize(torch.randn(2, 3, dtype=D), dim=1).requires_grad_(True)
    memory(e_s.detach(), e_t.detach(), indices, negatives)  # fixes Z

    def loss(a, b):
        # a fresh copy per call: the forward updates the banks
        scores_s, scores_t = copy.deepcopy(memory)(a, b, indices, negatives)
        return crd_nce_loss(scores_s, 8) + crd_nce_loss(scores_t, 8)

    assert _gradcheck(loss, e_s, e_t)


# ------------------------------------------------------------------ ReviewKD
def test_hcl_loss_equals_hand_computed_pyramid_and_sums_the_pairs():
    torch.manual_seed(7)
    a_s, a_t = torch.randn(2, 3, 4, 4, dtype=D), torch.randn(2, 3, 4, 4, dtype=D)
    b_s, b_t = torch.randn(2, 5, 1, 1, dtype=D), torch.randn(2, 5, 1, 1, dtype=D)

    def mse(x, y):
        xs, ys = x.flatten().tolist(), y.flatten().tolist()
        return sum((p - q) ** 2 for p, q in zip(xs, ys, strict=True)) / len(xs)

    def pool(x, level):  # average over equal blocks, by hand
        block = x.shape[-1] // level
        return torch.tensor(
            [
                [
                    [
                        [
                            sum(
                                x[n, c, i * block + a, j * block + b].item()
                                for a in range(block)
                                for b in range(block)
                            )
                            / block**2
                            for j in range(level)
                        ]
                        for i in range(level)
                    ]
                    for c in range(x.shape[1])
                ]
                for n in range(x.shape[0])
            ],
            dtype=D,
        )

    # 4x4 maps: level 4 skipped (not smaller), levels 2 and 1 with weights 1/2 and 1/4
    pair_a = (
        mse(a_s, a_t)
        + 0.5 * mse(pool(a_s, 2), pool(a_t, 2))
        + 0.25 * mse(pool(a_s, 1), pool(a_t, 1))
    ) / 1.75
    pair_b = mse(b_s, b_t)  # 1x1 maps: no pooled levels
    got = hcl_loss([a_s, b_s], [a_t, b_t])
    assert got.item() == pytest.approx(pair_a + pair_b, rel=1e-10)
    # gradcheck on a smaller pair of the same structure
    small_s = (a_s[:1, :2].clone().requires_grad_(True), b_s[:1, :3].clone().requires_grad_(True))
    small_t = [a_t[:1, :2], b_t[:1, :3]]
    assert _gradcheck(lambda x, y: hcl_loss([x, y], small_t), *small_s)


def test_review_fusion_runs_deepest_first_and_fuses_the_residual_by_attention():
    torch.manual_seed(8)
    fusion = ReviewFusion([2, 3], [4, 5], mid_channel=3, spatial_sizes=[4, 1]).double()
    assert fusion.fusions[1].attention is None and fusion.fusions[0].attention is not None
    f0 = torch.randn(2, 2, 4, 4, dtype=D)
    f1 = torch.randn(2, 3, 1, 1, dtype=D)
    out0, out1 = fusion([f0, f1])
    assert out0.shape == (2, 4, 4, 4) and out1.shape == (2, 5, 1, 1)
    # the same chain written out step by step
    deep, shallow = fusion.fusions[1], fusion.fusions[0]
    x1 = deep.reduce(f1)
    torch.testing.assert_close(out1, deep.project(x1))
    x0 = shallow.reduce(f0)
    up = x1.expand(-1, -1, 4, 4)  # nearest upsampling of a 1x1 map
    w = shallow.attention(torch.cat([x0, up], dim=1))
    torch.testing.assert_close(out0, shallow.project(x0 * w[:, 0:1] + up * w[:, 1:2]))


def test_review_fusion_resizes_to_the_teacher_size_and_passes_parameter_gradcheck():
    torch.manual_seed(10)
    fusion = ReviewFusion([2, 2], [2, 3], mid_channel=2, spatial_sizes=[(2, 2), 1]).double()
    maps = [torch.randn(2, 2, 4, 4, dtype=D), torch.randn(2, 2, 1, 1, dtype=D)]
    assert [tuple(o.shape) for o in fusion(maps)] == [(2, 2, 2, 2), (2, 3, 1, 1)]
    targets = [torch.randn(2, 2, 2, 2, dtype=D), torch.randn(2, 3, 1, 1, dtype=D)]
    assert _params_gradcheck(fusion, lambda outs: hcl_loss(outs, targets), maps)
    with pytest.raises(ValueError, match="same non-zero length"):
        ReviewFusion([2, 2], [2], 2, [1, 1])


# ------------------------------------------------------------------ CTKD
def test_reverse_gradient_is_identity_forward_and_scaled_negative_backward():
    x = torch.tensor([1.0, -2.0, 3.0], dtype=D, requires_grad=True)
    y = reverse_gradient(x, 0.3)
    assert y.tolist() == x.tolist()
    (y * torch.tensor([1.0, 2.0, 3.0], dtype=D)).sum().backward()
    assert x.grad.tolist() == pytest.approx([-0.3, -0.6, -0.9])


def test_learnable_temperature_maps_sigmoid_into_its_range_and_reverses_its_gradient():
    module = LearnableTemperature(init=1.0, t_min=1.0, t_range=20.0).double()
    sig = 1 / (1 + math.exp(-1.0))
    temperature = module(0.5)
    assert temperature.item() == pytest.approx(1.0 + 20.0 * sig)
    temperature.backward()
    assert module.raw.grad.item() == pytest.approx(-0.5 * 20.0 * sig * (1 - sig))
    # with strength -1 the "reversal" is the plain derivative, so gradcheck sees the true mapping
    raw = torch.tensor(0.3, dtype=D, requires_grad=True)
    assert _params_gradcheck(module, lambda t: t, -1.0) and _gradcheck(
        lambda r: torch.func.functional_call(module, {"raw": r}, (-1.0,)), raw
    )


def test_a_learnable_temperature_ascends_the_kd_loss_the_student_descends():
    torch.manual_seed(9)
    module = LearnableTemperature(init=0.0).double()
    s = torch.randn(4, 6, dtype=D, requires_grad=True)
    t = torch.randn(4, 6, dtype=D)
    kd_loss(s, t, module(1.0)).backward()
    plain = LearnableTemperature(init=0.0).double()
    kd_loss(s.detach(), t, plain(-1.0)).backward()  # strength -1: ordinary gradient
    assert module.raw.grad.item() == pytest.approx(-plain.raw.grad.item())


# ------------------------------------------------------------------ WKD-L
def test_wkd_cost_matrix_is_one_minus_cosine_sharpened():
    w = [[1.0, 0.0], [1.0, 1.0], [0.0, -2.0]]

    def cos(a, b):
        return sum(x * y for x, y in zip(a, b, strict=True)) / (math.hypot(*a) * math.hypot(*b))

    plain = [[1 - cos(a, b) for b in w] for a in w]
    got = wkd_cost_matrix(torch.tensor(w, dtype=D), sharpen=0.0)
    assert got.tolist() == [pytest.approx(row, abs=1e-12) for row in plain]
    sharp = wkd_cost_matrix(torch.tensor(w, dtype=D), sharpen=2.0)
    expected = [[1 - math.exp(-2.0 * c) for c in row] for row in plain]
    assert sharp.tolist() == [pytest.approx(row, abs=1e-12) for row in expected]


def test_wkd_target_loss_is_teacher_weighted_log_likelihood_of_the_target():
    expected = -sum(
        _softmax(rt)[y] * math.log(_softmax(rs)[y]) for rs, rt, y in zip(S, T, Y, strict=True)
    ) / len(S)
    got = wkd_target_loss(torch.tensor(S, dtype=D), torch.tensor(T, dtype=D), torch.tensor(Y))
    assert got.item() == pytest.approx(expected, rel=1e-12)


def _reference_sinkhorn_distance(p_s, p_t, cost, reg, iterations):
    """The reference's loop (JiamingLv/WKD `sinkhorn`) without its 1e-8 stabilisers."""
    n = len(p_s)
    kernel = [[math.exp(-cost[i][j] / reg) for j in range(n)] for i in range(n)]
    u = [1.0 / n] * n
    for _ in range(iterations):
        v = [p_t[j] / sum(kernel[i][j] * u[i] for i in range(n)) for j in range(n)]
        u = [p_s[i] / sum(kernel[i][j] * v[j] for j in range(n)) for i in range(n)]
    return sum(u[i] * kernel[i][j] * v[j] * cost[i][j] for i in range(n) for j in range(n))


COST = [
    [0.0, 0.2, 0.7, 0.9],
    [0.2, 0.0, 0.5, 0.4],
    [0.7, 0.5, 0.0, 0.3],
    [0.9, 0.4, 0.3, 0.0],
]


def test_wkd_logit_loss_reproduces_the_reference_sinkhorn_iterations():
    temperature, reg, iterations = 2.0, 0.1, 10
    expected = sum(
        _reference_sinkhorn_distance(
            _softmax(rs, temperature), _softmax(rt, temperature), COST, reg, iterations
        )
        for rs, rt in zip(S, T, strict=True)
    ) / len(S)
    s, t, cost = torch.tensor(S, dtype=D), torch.tensor(T, dtype=D), torch.tensor(COST, dtype=D)
    got = wkd_logit_loss(s, t, cost, temperature, reg, iterations)
    assert got.item() == pytest.approx(expected, rel=1e-9)


def test_wkd_logit_loss_with_targets_drops_the_target_class_and_its_costs():
    temperature, reg, iterations = 2.0, 0.1, 10
    expected = 0.0
    for rs, rt, y in zip(S, T, Y, strict=True):
        keep = [j for j in range(4) if j != y]
        sub_cost = [[COST[i][j] for j in keep] for i in keep]
        p_s = _softmax([rs[j] for j in keep], temperature)
        p_t = _softmax([rt[j] for j in keep], temperature)
        expected += _reference_sinkhorn_distance(p_s, p_t, sub_cost, reg, iterations)
    expected /= len(S)
    got = wkd_logit_loss(
        torch.tensor(S, dtype=D),
        torch.tensor(T, dtype=D),
        torch.tensor(COST, dtype=D),
        temperature,
        reg,
        iterations,
        targets=torch.tensor(Y),
    )
    assert got.item() == pytest.approx(expected, rel=1e-9)


def test_wkd_logit_loss_converges_to_pot_sinkhorn2_pair_by_pair():
    temperature, reg = 1.0, 0.2
    s, t, cost = torch.tensor(S, dtype=D), torch.tensor(T, dtype=D), torch.tensor(COST, dtype=D)
    per_pair = [
        ot.sinkhorn2(
            torch.softmax(s[i] / temperature, 0),
            torch.softmax(t[i] / temperature, 0),
            cost,
            reg,
            numItermax=10_000,
            stopThr=1e-13,
        ).item()
        for i in range(len(S))
    ]
    got = wkd_logit_loss(s, t, cost, temperature, reg, num_iters=2000)
    assert got.item() == pytest.approx(sum(per_pair) / len(per_pair), rel=1e-8)


def test_wkd_logit_loss_passes_gradcheck_and_rejects_a_wrong_cost_shape():
    t, cost = torch.tensor(T, dtype=D), torch.tensor(COST, dtype=D)
    s = torch.tensor(S, dtype=D, requires_grad=True)
    assert _gradcheck(lambda a: wkd_logit_loss(a, t, cost, 2.0, 0.1, 10), s)
    assert _gradcheck(lambda a: wkd_logit_loss(a, t, cost, 4.0, 0.05, 10, torch.tensor(Y)), s)
    assert _gradcheck(lambda a: wkd_target_loss(a, t, torch.tensor(Y)), s)
    with pytest.raises(ValueError, match="cost must be"):
        wkd_logit_loss(s, t, cost[:3, :3], 2.0)


# ------------------------------------------------------------------ shared contract
@pytest.mark.parametrize(
    "loss_of",
    [
        lambda s, t: kd_loss(s, t, 4.0),
        lambda s, t: dkd_loss(s, t, torch.tensor(Y), 1.0, 8.0, 4.0),
        lambda s, t: dist_loss(s, t, 1.0, 1.0, 4.0),
        lambda s, t: wkd_logit_loss(s, t, torch.tensor(COST, dtype=D), 4.0),
        lambda s, t: wkd_target_loss(s, t, torch.tensor(Y)),
        lambda s, t: rkd_loss(s, t),
        lambda s, t: at_loss(s.view(3, 1, 2, 2), t.view(3, 1, 2, 2)),
        lambda s, t: fitnet_loss(s, t),
        lambda s, t: hcl_loss([s[:, :, None, None]], [t[:, :, None, None]]),
    ],
    ids=["kd", "dkd", "dist", "wkd", "wkd_target", "rkd", "at", "fitnet", "hcl"],
)
def test_every_loss_treats_the_teacher_as_a_constant(loss_of):
    s = torch.tensor(S, dtype=D, requires_grad=True)
    t = torch.tensor(T, dtype=D, requires_grad=True)
    loss = loss_of(s, t)
    assert loss.dim() == 0
    loss.backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None


def test_non_target_gather_equals_boolean_mask_indexing_in_values_and_gradients():
    # DKD and WKD drop the target column by gathering (a static shape, no device sync); the
    # boolean-mask indexing it replaced is the reference, bit for bit
    from gompertz_kd.losses.logits import _split_target, non_target_index
    from gompertz_kd.losses.wasserstein import wkd_cost_matrix, wkd_logit_loss

    g = torch.Generator().manual_seed(7)
    n, k = 16, 10
    targets = torch.randint(0, k, (n,), generator=g)
    targets[:2] = torch.tensor([0, k - 1])  # both edges
    keep = ~F.one_hot(targets, k).bool()
    classes = torch.arange(k).expand(n, k)[keep].view(n, k - 1)
    assert torch.equal(non_target_index(targets, k), classes)

    logits = torch.randn(n, k, generator=g, requires_grad=True)
    parts, others = _split_target(logits, targets)
    assert torch.equal(others, logits[keep].view(n, k - 1))
    (grad,) = torch.autograd.grad((parts.sum() + others.square().sum()), logits)
    ref = logits.detach().clone().requires_grad_(True)
    ref_others = ref[keep].view(n, k - 1)
    log_total = torch.logsumexp(ref, dim=1)
    ref_parts = torch.stack(
        [ref.gather(1, targets.view(-1, 1)).squeeze(1) - log_total,
         torch.logsumexp(ref_others, dim=1) - log_total], dim=1,
    )  # fmt: skip
    assert torch.equal(parts, ref_parts)
    (ref_grad,) = torch.autograd.grad((ref_parts.sum() + ref_others.square().sum()), ref)
    assert torch.equal(grad, ref_grad)

    logits_t = torch.randn(n, k, generator=g)
    cost = wkd_cost_matrix(torch.randn(k, 8, generator=g))
    loss = wkd_logit_loss(logits, logits_t, cost, temperature=2.0, reg=0.05, num_iters=5,
                          targets=targets)  # fmt: skip
    z_s, z_t = logits[keep].view(n, k - 1) / 2.0, logits_t[keep].view(n, k - 1) / 2.0
    costs = cost.clamp_min(0.0)[classes.unsqueeze(2), classes.unsqueeze(1)]
    from ot.batch import solve_batch

    ref = solve_batch(costs.transpose(1, 2), reg=0.05, a=F.softmax(z_t, 1), b=F.softmax(z_s, 1),
                      max_iter=5, tol=0.0, method="log_sinkhorn", grad="autodiff")  # fmt: skip
    assert torch.equal(loss, ref.value_linear.mean())
