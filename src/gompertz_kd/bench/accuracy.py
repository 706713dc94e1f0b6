"""The accuracy section of ``python -m gompertz_kd.bench``: what the approximate options change
(folded BatchNorm, the bf16 teacher, gradient matching under bf16-mixed) and a finite-difference
estimate of the gradient-matching gradient against the exact double backward."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gompertz_kd import losses
from gompertz_kd.bench.harness import (
    Setup,
)
from gompertz_kd.module import DistillationModule

# ---------------------------------------------------------------------------------- sections


def _cosine(a: Tensor, b: Tensor) -> float:
    return F.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0).item()


@torch.no_grad()
def _relative(a: Tensor, b: Tensor) -> float:
    """``||a - b|| / ||b||``."""
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def accuracy_section(setup: Setup, fd_steps: Sequence[float]) -> list[tuple[str, str]]:
    """What each approximate option changes, on one batch (``(quantity, value)`` rows)."""
    rows: list[tuple[str, str]] = []
    images, targets = setup.fixed_batch()
    exact = setup.module(
        wd_scale=1.0, gm_scale=1.0, gm_every=1, teacher_precision="32", gm_precision=None
    )
    unfolded = setup.module(fold_teacher_bn=False, teacher_precision="32")
    student_logits = exact.student(images).detach()

    out32, grad32 = exact.teacher_forward(images, targets, input_gradient=True)
    out_unf, grad_unf = unfolded.teacher_forward(images, targets, input_gradient=True)
    fp64 = setup.nchw_teacher().double()
    x64 = images.double().requires_grad_(True)
    grad64 = losses.true_class_input_gradient(fp64(x64), x64, targets, create_graph=False)
    del fp64
    rows += [
        (
            "BatchNorm folding: teacher logits, max abs difference / max abs logit",
            f"{(out_unf.logits - out32.logits).abs().max().item() / out_unf.logits.abs().max().item():.1e}",
        ),
        (
            "teacher input gradient in fp32 against fp64, relative L2 error: BatchNorm unfolded "
            "/ folded",
            f"{_relative(grad_unf, grad64):.1e} / {_relative(grad32, grad64):.1e}",
        ),
    ]
    kd32 = losses.kd_loss(student_logits, out32.logits, 4.0)
    if setup.device.type == "cpu" or torch.cuda.is_bf16_supported():
        # gm_precision=None: the input-gradient pass in the teacher's precision too (the default
        # "32" would keep it, and so every row below, in fp32)
        bf16 = setup.module(
            wd_scale=1.0, gm_scale=1.0, gm_every=1, teacher_precision="bf16", gm_precision=None
        )
        out16, grad16 = bf16.teacher_forward(images, targets, input_gradient=True)
        kd16 = losses.kd_loss(student_logits, out16.logits, 4.0)
        x = images.detach().requires_grad_(True)
        g_s = losses.true_class_input_gradient(exact.student(x), x, targets, create_graph=False)
        gm32 = losses.gradient_matching_loss(g_s, grad32)
        gm16 = losses.gradient_matching_loss(g_s, grad16)
        with torch.no_grad():
            student_features = exact.student.forward_stages(images).features
            wd32 = exact.objective.terms["wd"].loss(student_features, out32.features)
            wd16 = exact.objective.terms["wd"].loss(student_features, out16.features)
        per_image = F.cosine_similarity(grad16.flatten(1), grad32.flatten(1), dim=1)
        rows += [
            (
                "bf16 teacher: logits, max abs difference / max abs logit",
                f"{(out16.logits - out32.logits).abs().max().item() / out32.logits.abs().max().item():.1e}",
            ),
            ("bf16 teacher: KD loss, relative error", f"{abs(kd16.item() / kd32.item() - 1):.1e}"),
            (
                "bf16 teacher: Wasserstein loss, relative error",
                f"{abs(wd16.item() / wd32.item() - 1):.1e}",
            ),
            (
                "bf16 teacher: input gradient, cosine to fp32 (mean / min over images)",
                f"{per_image.mean().item():.4f} / {per_image.min().item():.4f}",
            ),
            (
                "bf16 teacher: gradient-matching loss, absolute error",
                f"{abs(gm16.item() - gm32.item()):.1e} (of {gm32.item():.3f})",
            ),
        ]

    def gm_gradient(
        module: DistillationModule, autocast: bool, order: Tensor | None = None
    ) -> Tensor:
        x, y = (images, targets) if order is None else (images[order], targets[order])
        with torch.autocast(setup.device.type, dtype=torch.bfloat16, enabled=autocast):
            _, terms, _ = module.compute_losses(x, y)
        grads = torch.autograd.grad(terms["loss_gm"], list(module.student.parameters()))
        return torch.cat([g.flatten() for g in grads])

    reference = gm_gradient(exact, autocast=False)
    if setup.device.type == "cpu" or torch.cuda.is_bf16_supported():
        exact_bf16 = gm_gradient(exact, autocast=True)
        exact.gm_precision = "32"
        exact_fp32_gm = gm_gradient(exact, autocast=True)
        exact.gm_precision = None
        rows += [
            (
                "gradient matching under bf16-mixed against fp32: student gradient of loss_gm, "
                "cosine / relative L2 error",
                f"{_cosine(exact_bf16, reference):.4f} / {_relative(exact_bf16, reference):.1e}",
            ),
            (
                "the same with gm_precision=32",
                f"{_cosine(exact_fp32_gm, reference):.4f} / "
                f"{_relative(exact_fp32_gm, reference):.1e}",
            ),
        ]
    rows += gm_fraction_rows(setup, gm_gradient, reference, images.shape[0])
    student, params = exact.student, list(exact.student.parameters())
    for step in fd_steps:
        x = images.detach().requires_grad_(True)
        loss = finite_difference_gm(student, x, student(x), targets, grad32, step)
        estimate = torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)])
        rows.append(
            (
                f"finite-difference gradient matching (not offered), step {step:g}: student "
                "gradient cosine / relative L2 error",
                f"{_cosine(estimate, reference):.3f} / {_relative(estimate, reference):.1e}",
            )
        )
    return rows


def gm_fraction_rows(
    setup: Setup, gm_gradient: Callable[..., Tensor], reference: Tensor, batch: int
) -> list[tuple[str, str]]:
    """How far gradient matching on ``setup.gm_fraction`` of the batch is from the term on every
    image: the student gradient of ``loss_gm`` from the first rows (one step's estimate) and the
    mean of those estimates over the batch's disjoint parts (what is left once the sampling
    noise averages out: BatchNorm's statistics over a part instead of the batch)."""
    f = setup.gm_fraction
    out = []
    exact = setup.module(
        wd_scale=1.0, gm_scale=1.0, gm_every=1, teacher_precision="32", gm_precision=None
    )
    exact.student.eval()  # images no longer coupled through BatchNorm's batch statistics
    uncoupled = gm_gradient(exact, autocast=False)
    out.append(
        (
            "gradient matching with the student's BatchNorm on running statistics (eval mode) "
            "against batch statistics (train mode, the objective): student gradient of loss_gm, "
            "cosine / relative L2 error",
            f"{_cosine(uncoupled, reference):.4f} / {_relative(uncoupled, reference):.1e}",
        )
    )
    module = setup.module(
        wd_scale=1.0, gm_scale=1.0, gm_every=1, teacher_precision="32", gm_precision=None,
        gm_fraction=f,
    )  # fmt: skip
    rows_per_part = module.gm_rows(batch)
    one = gm_gradient(module, autocast=False)
    out += [
        (
            f"gradient matching on {f:g} of the batch ({rows_per_part} of {batch} images) against "
            "every image: student gradient of loss_gm, cosine / relative L2 error",
            f"{_cosine(one, reference):.4f} / {_relative(one, reference):.1e}",
        )
    ]
    if batch % rows_per_part == 0 and batch // rows_per_part > 1:
        parts = batch // rows_per_part
        mean = (
            sum(
                gm_gradient(module, False, torch.roll(torch.arange(batch), -p * rows_per_part))
                for p in range(parts)
            )
            / parts
        )
        out.append(
            (
                f"the same averaged over the batch's {parts} disjoint parts",
                f"{_cosine(mean, reference):.4f} / {_relative(mean, reference):.1e}",
            )
        )
    return out


def finite_difference_gm(
    student: nn.Module,
    inputs: Tensor,
    logits: Tensor,
    targets: Tensor,
    teacher_input_grad: Tensor,
    step: float,
) -> Tensor:
    """Gradient matching with its parameter gradient from a central finite difference, measured
    here to show why the module does not offer it.

    With ``F(x) = sum_i CE(f(x)_i, y_i)``, ``g_s = dF/dx`` and ``v = dL/dg_s``, the exact
    parameter gradient of ``L = gradient_matching_loss(g_s, g_t)`` is ``d/de dF(x + e v)/dtheta``
    at ``e = 0`` (the double backward). The estimate is
    ``(dF(x + e v)/dtheta - dF(x - e v)/dtheta) / (2 e)``, ``e = step * ||x|| / ||v||``: two more
    forward/backward passes, no second-order graph. On a smooth network it converges as ``step``
    shrinks; on a ReLU network every ReLU that changes sign between ``x - e v`` and ``x + e v``
    adds a jump the double backward does not see (it differentiates with the activation pattern
    fixed), and with thousands of units per image some always do.

    Returns a scalar whose value is the exact loss and whose parameter gradient is the estimate.
    """
    (student_grad,) = torch.autograd.grad(
        F.cross_entropy(logits, targets, reduction="sum"), inputs, retain_graph=True
    )
    student_grad = student_grad.detach().requires_grad_(True)
    value = losses.gradient_matching_loss(student_grad, teacher_input_grad)
    (direction,) = torch.autograd.grad(value, student_grad)
    scale = step * inputs.detach().norm() / direction.norm().clamp_min(1e-30)
    sides = []
    layers = [m for m in student.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for sign in (1.0, -1.0):
        for m in layers:  # batch statistics as in training, running statistics left alone
            m.track_running_stats = False
        try:
            shifted = student(inputs.detach() + sign * scale * direction)
        finally:
            for m in layers:
                m.track_running_stats = True
        sides.append(F.cross_entropy(shifted, targets, reduction="sum"))
    surrogate = (sides[0] - sides[1]) / (2 * scale)
    return value.detach() + (surrogate - surrogate.detach())
