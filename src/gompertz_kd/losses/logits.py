"""Loss terms on logits: Hinton KD (optionally on standardised logits), DKD, DIST, and CTKD's
adversarially learned temperature.

Every teacher input is detached here: the teacher is a fixed target. A learnable temperature
still receives its gradient through both softened distributions, as in CTKD.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "LearnableTemperature",
    "dist_loss",
    "dkd_loss",
    "dkd_parts",
    "kd_loss",
    "non_target_index",
    "pearson_correlation",
    "reverse_gradient",
    "standardize_logits",
]


def _check_temperature(temperature: float | Tensor) -> None:
    # A tensor temperature comes from LearnableTemperature, positive by construction; checking it
    # would force a device sync on every step.
    if not isinstance(temperature, Tensor) and temperature <= 0:
        raise ValueError(f"temperature must be > 0, got temperature={temperature!r}")


def standardize_logits(logits: Tensor, eps: float = 1e-7) -> Tensor:
    """Z-score of each row, ``(z - mean(z)) / (std(z) + eps)``.

    Source: Sun et al., "Logit Standardization in Knowledge Distillation", CVPR 2024; reference
    sunshangquan/logit-standardization-KD, ``mdistiller/distillers/KD.py`` (``normalize``). As
    there, ``std`` is the Bessel-corrected standard deviation over the classes (torch's default)
    and ``eps = 1e-7`` is added to it, outside the square root.

    Args:
        logits: ``(N, K)``, ``K >= 2``.
        eps: keeps constant rows finite (they map to zeros).

    Returns:
        ``(N, K)``: every row has mean 0 and standard deviation ``std / (std + eps)``, i.e. 1 up
        to ``eps``.
    """
    mean = logits.mean(dim=1, keepdim=True)
    std = logits.std(dim=1, keepdim=True)
    return (logits - mean) / (std + eps)


def kd_loss(
    logits_s: Tensor,
    logits_t: Tensor,
    temperature: float | Tensor,
    standardize: bool = False,
) -> Tensor:
    """Hinton KD: ``T^2 * KL(softmax(z_t / T) || softmax(z_s / T))``, averaged over the batch.

    Source: Hinton et al., "Distilling the Knowledge in a Neural Network", 2015; mdistiller
    ``mdistiller/distillers/KD.py``. Benchmark defaults (mdistiller ``engine/cfg.py``): ``T = 4``,
    ``ce_weight = 0.1``, ``kd_weight = 0.9``.

    Args:
        logits_s: ``(N, K)`` student logits.
        logits_t: ``(N, K)`` teacher logits; detached (a constant target).
        temperature: ``T > 0``, a float or a scalar tensor. A tensor (CTKD's
            :class:`LearnableTemperature`) gets its gradient through both softened
            distributions and the ``T^2`` factor, as in zhengli97/CTKD ``distiller_zoo/KD.py``.
            The ``T^2`` factor keeps gradient magnitudes comparable across temperatures.
        standardize: apply :func:`standardize_logits` to both logits before dividing by ``T``
            (Sun et al., CVPR 2024). The ``T^2`` factor is kept, as in the reference ``kd_loss``
            (logit-standardization-KD ``mdistiller/distillers/KD.py``); ``T`` then plays the role
            of the paper's "base temperature" (their README's CIFAR-100 commands:
            ``--base-temp 2 --kd-weight 9``, base temperature 3 for some pairs).

    Returns:
        Scalar tensor, ``>= 0``, zero iff the two softened distributions agree on every row.
    """
    _check_temperature(temperature)
    logits_t = logits_t.detach()
    if standardize:
        logits_s, logits_t = standardize_logits(logits_s), standardize_logits(logits_t)
    log_p_s = F.log_softmax(logits_s / temperature, dim=1)
    log_p_t = F.log_softmax(logits_t / temperature, dim=1)
    kl = F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True)
    return kl * temperature**2


def non_target_index(targets: Tensor, num_classes: int) -> Tensor:
    """``(N, K-1)``: each row's class indices without its target, in order. Gathering with it
    drops the target column at a static shape, without the device sync (and, compiled, the graph
    break) of boolean-mask indexing."""
    k = int(num_classes)
    rest = torch.arange(k - 1, device=targets.device).expand(targets.shape[0], k - 1)
    return rest + (rest >= targets.view(-1, 1)).long()


def _split_target(logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """``(log(p_target), log(1 - p_target))`` as ``(N, 2)``, and the non-target logits ``(N, K-1)``."""
    others = logits.gather(1, non_target_index(targets, logits.shape[1]))
    # log(1 - p_target) from the non-target logits directly: no cancellation when p_target -> 1.
    log_total = torch.logsumexp(logits, dim=1)
    log_target = logits.gather(1, targets.view(-1, 1)).squeeze(1) - log_total
    log_rest = torch.logsumexp(others, dim=1) - log_total
    return torch.stack([log_target, log_rest], dim=1), others


def dkd_parts(
    logits_s: Tensor,
    logits_t: Tensor,
    targets: Tensor,
    temperature: float | Tensor,
    standardize: bool = False,
) -> tuple[Tensor, Tensor]:
    """The two parts of Decoupled KD: target-class KD and non-target-class KD, each ``* T^2``.

    Source: Zhao et al., "Decoupled Knowledge Distillation", CVPR 2022; mdistiller
    ``mdistiller/distillers/DKD.py`` (``dkd_loss``).

    - TCKD: ``KL(b_t || b_s)`` between the binary distributions ``b = (p_target, 1 - p_target)``.
    - NCKD: ``KL(p~_t || p~_s)`` between the softmaxes over the ``K - 1`` non-target classes.

    With these, Hinton's KD per sample is ``KD = TCKD + (1 - p_target^teacher) * NCKD`` (the
    paper's Eq. 5); DKD replaces the coupling weight by a free ``beta``. The reference masks the
    target out by subtracting 1000 from its logit; here the target column is dropped, the same
    value without the float32 residue.

    Args:
        logits_s: ``(N, K)`` student logits, ``K >= 2``.
        logits_t: ``(N, K)`` teacher logits; detached.
        targets: ``(N,)`` class indices.
        temperature: ``T > 0`` (float or scalar tensor), as in :func:`kd_loss`.
        standardize: z-score both logits first (:func:`standardize_logits`), as the
            logit-standardization-KD reference does for DKD.

    Returns:
        ``(tckd, nckd)``, two scalars, each a batch mean, each ``>= 0``.
    """
    _check_temperature(temperature)
    logits_t = logits_t.detach()
    if standardize:
        logits_s, logits_t = standardize_logits(logits_s), standardize_logits(logits_t)
    log_b_s, others_s = _split_target(logits_s / temperature, targets)
    log_b_t, others_t = _split_target(logits_t / temperature, targets)
    tckd = F.kl_div(log_b_s, log_b_t, reduction="batchmean", log_target=True)
    nckd = F.kl_div(
        F.log_softmax(others_s, dim=1),
        F.log_softmax(others_t, dim=1),
        reduction="batchmean",
        log_target=True,
    )
    scale = temperature**2
    return tckd * scale, nckd * scale


def dkd_loss(
    logits_s: Tensor,
    logits_t: Tensor,
    targets: Tensor,
    alpha: float,
    beta: float,
    temperature: float | Tensor,
    standardize: bool = False,
) -> Tensor:
    """Decoupled KD: ``alpha * TCKD + beta * NCKD`` (see :func:`dkd_parts`).

    Source: Zhao et al., CVPR 2022; mdistiller ``mdistiller/distillers/DKD.py``. Defaults
    (mdistiller ``engine/cfg.py``): ``alpha = 1``, ``beta = 8``, ``T = 4``, ``ce_weight = 1``;
    ``beta`` is tuned per teacher-student pair in ``configs/cifar100/dkd/*.yaml``. The reference
    multiplies the whole term by ``min(epoch / 20, 1)``; that warm-up is a schedule and lives
    with the objective, not here.

    Args:
        logits_s, logits_t, targets, temperature, standardize: as in :func:`dkd_parts`.
        alpha: weight of TCKD.
        beta: weight of NCKD.

    Returns:
        Scalar tensor, ``>= 0`` for non-negative weights.
    """
    tckd, nckd = dkd_parts(logits_s, logits_t, targets, temperature, standardize)
    return alpha * tckd + beta * nckd


def pearson_correlation(a: Tensor, b: Tensor, eps: float = 1e-8) -> Tensor:
    """Pearson correlation of each row of ``a`` with the same row of ``b``.

    The cosine similarity of the mean-centred rows, with ``eps`` added to the product of the
    norms as in DIST's reference (hunto/image_classification_sota
    ``lib/models/losses/dist_kd.py``); a constant row therefore correlates 0 with anything.

    Args:
        a: ``(N, D)``.
        b: ``(N, D)``.
        eps: added to the denominator.

    Returns:
        ``(N,)``, in ``[-1, 1]``.
    """
    a = a - a.mean(dim=1, keepdim=True)
    b = b - b.mean(dim=1, keepdim=True)
    return (a * b).sum(dim=1) / (a.norm(dim=1) * b.norm(dim=1) + eps)


def dist_loss(
    logits_s: Tensor,
    logits_t: Tensor,
    beta: float,
    gamma: float,
    temperature: float,
) -> Tensor:
    """DIST: ``T^2 * (beta * inter + gamma * intra)`` on the softened probabilities.

    ``inter = mean_i (1 - pearson(p_s[i, :], p_t[i, :]))`` compares each sample's class
    distribution; ``intra = mean_c (1 - pearson(p_s[:, c], p_t[:, c]))`` compares each class's
    scores across the batch (so it needs ``N >= 2``; with ``N = 1`` it is the constant 1).

    Source: Huang et al., "Knowledge Distillation from A Stronger Teacher", NeurIPS 2022;
    hunto/DIST_KD, whose classification loss is hunto/image_classification_sota
    ``lib/models/losses/dist_kd.py``. Early versions of that file have no temperature; later
    ones (``DIST(beta, gamma, tau)``, as reproduced e.g. in huawei-noah/Efficient-Computing
    ``Distillation/VanillaKD/losses/dist.py``) soften with ``tau`` and multiply both terms by
    ``tau^2``, which is what this does; ``T = 1`` is the temperature-free form. Reference
    defaults ``beta = gamma = 1``, ``T = 1`` (ImageNet); the CIFAR-100 values are in the
    classification code's ``configs/strategies/distill/dist_cifar.yaml``, not checked here.
    ``eps = 1e-8`` inside the correlation, as in the reference.

    Args:
        logits_s: ``(N, K)`` student logits.
        logits_t: ``(N, K)`` teacher logits; detached.
        beta: weight of the inter-class (per-sample) relation.
        gamma: weight of the intra-class (per-class) relation.
        temperature: ``T > 0``.

    Returns:
        Scalar tensor in ``[0, 2 * T^2 * (beta + gamma)]``; 0 when the probabilities are
        perfectly correlated both ways.
    """
    _check_temperature(temperature)
    p_s = F.softmax(logits_s / temperature, dim=1)
    p_t = F.softmax(logits_t.detach() / temperature, dim=1)
    inter = 1.0 - pearson_correlation(p_s, p_t).mean()
    intra = 1.0 - pearson_correlation(p_s.t(), p_t.t()).mean()
    return temperature**2 * (beta * inter + gamma * intra)


class _ReverseGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, strength: float) -> Tensor:
        ctx.strength = strength
        return x.clone()

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return -ctx.strength * grad, None


def reverse_gradient(x: Tensor, strength: float) -> Tensor:
    """Identity forward; the backward pass multiplies the incoming gradient by ``-strength``.

    The gradient reversal layer (Ganin & Lempitsky, 2015) that CTKD puts in front of its
    temperature, so the temperature ascends the distillation loss the student descends.
    Reference: zhengli97/CTKD ``models/temp_global.py`` (``GradientReversalFunction``), whose
    backward multiplies by ``lambda_`` and whose training script passes ``lambda_ <= 0``; here
    the sign is built in and ``strength = -lambda_ >= 0``.

    Args:
        x: any tensor.
        strength: a Python number; ``0`` blocks the gradient, ``1`` reverses it exactly.

    Returns:
        ``x`` (a copy), same shape.
    """
    return _ReverseGradient.apply(x, float(strength))


class LearnableTemperature(nn.Module):
    """CTKD's global learnable temperature: ``T = t_min + t_range * sigmoid(raw)``.

    Source: Li et al., "Curriculum Temperature for Knowledge Distillation", AAAI 2023;
    zhengli97/CTKD ``models/temp_global.py`` (``Global_T``: one scalar parameter initialised to
    1) and ``helper/loops.py`` (``temp = t_start + t_end * sigmoid(global_T)``, so ``t_end`` is
    the width of the range, not its end). Defaults as ``scripts/run_cifar_distill.sh``:
    ``t_start = 1``, ``t_end = 20``, the reversal strength cosine-ramped from 0 to 1 over the
    first 10 epochs (``--decay_max 0 --decay_min -1 --decay_loops 10``); that ramp is a
    schedule and is passed in as ``strength``.

    Args:
        init: initial value of the raw (pre-sigmoid) parameter, not of ``T``; the reference's 1
            starts at ``T = 1 + 20 * sigmoid(1) ~= 15.6``.
        t_min: lower end of the temperature range (``t_start``).
        t_range: width of the range (``t_end``); ``T`` stays in ``(t_min, t_min + t_range)``.

    ``forward(strength)`` returns the current temperature, a scalar tensor whose gradient reaches
    ``raw`` reversed and scaled by ``strength`` (:func:`reverse_gradient`).
    """

    def __init__(self, init: float = 1.0, t_min: float = 1.0, t_range: float = 20.0) -> None:
        super().__init__()
        if t_min <= 0 or t_range <= 0:
            raise ValueError(f"t_min and t_range must be > 0, got {t_min!r} and {t_range!r}")
        self.t_min = float(t_min)
        self.t_range = float(t_range)
        self.raw = nn.Parameter(torch.tensor(float(init)))

    def forward(self, strength: float) -> Tensor:
        return self.t_min + self.t_range * torch.sigmoid(reverse_gradient(self.raw, strength))
