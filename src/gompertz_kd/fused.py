"""Fused students: K networks of one architecture run as one network (HFTA-style).

Population members whose students share an architecture can run their forward and backward as
one wider network instead of K small ones: every ``Conv2d`` becomes one convolution with K times
the channels in K groups, every ``BatchNorm2d`` one BatchNorm over the K stacked channel blocks
(its statistics are per channel, so per member), every ``Linear`` K linear maps over the stacked
features. The image is repeated K times along the channels. Member ``k`` owns channel block ``k``
of every map: its logits, stage features and pooled embedding are slices of the fused network's.

The members stay the owners of their weights. Each step the fused network's parameters and
buffers are concatenated from the members' (a copy of K times the student's weights, small
beside the activations); the backward of that concatenation hands each member the gradient of
its own block, so one optimiser over the members' parameters (the population's) updates each
member exactly as SGD with momentum and weight decay updates it alone, and checkpoints, resume
and member results keep the per-member layout. BatchNorm running statistics are copied back to
the members after each training forward.

Exactness (CPU, fp32): the fused forward equals the members' own forwards bit for bit, and so do
the BatchNorm statistics; the gradients of the convolution weights differ in the last bits
(a grouped convolution's weight gradient sums in another order), so weights after N steps agree
with the looped population's to float rounding, not bit for bit. ``tests/test_population_fused.py``
checks both.

What fuses: a student built only from ``Conv2d``, ``BatchNorm2d`` and ``Linear`` layers (plus
layers without parameters) whose forward keeps each member's channels apart (no reshape that
mixes channels, no ``torch.cat``/``chunk`` along them: ShuffleNet's channel shuffle and split do
not fuse). :func:`fusable` checks the layers and :meth:`FusedStudents.check` the function on a
batch (the fused forward against each member's, in eval mode); a student that fails either runs
looped. Random layers (dropout) draw one mask for the fused map, so members get masks that
differ from those of their looped runs (as before, equal in distribution only).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn import functional as F

from gompertz_kd.models import ForwardStages, StageOutput

__all__ = ["FusedStudents", "fusable", "student_signature"]

_FUSED_LAYERS = (nn.Conv2d, nn.BatchNorm2d, nn.Linear)


def student_signature(student: nn.Module) -> tuple:
    """What must be equal for two students to fuse: the class, every module's type and every
    parameter's and buffer's name, shape and dtype."""
    return (
        type(student).__qualname__,
        tuple((n, type(m).__qualname__) for n, m in student.named_modules()),
        tuple((n, tuple(p.shape), p.dtype) for n, p in student.named_parameters()),
        tuple((n, tuple(b.shape), b.dtype) for n, b in student.named_buffers()),
    )


def fusable(student: nn.Module) -> str | None:
    """``None`` when ``student``'s layers can be fused, else why not (its first layer that
    cannot)."""
    if not callable(getattr(student, "forward_stages", None)):
        return f"{type(student).__name__} has no forward_stages"
    for name, module in student.named_modules():
        own = list(module.parameters(recurse=False)) + list(module.buffers(recurse=False))
        if isinstance(module, nn.Conv2d):
            if module.padding_mode != "zeros":
                return f"{name}: padding_mode={module.padding_mode!r}"
        elif isinstance(module, nn.BatchNorm2d):
            if not module.track_running_stats:
                return f"{name}: BatchNorm without running statistics"
        elif own and not isinstance(module, _FUSED_LAYERS):
            return f"{name}: {type(module).__name__} holds parameters"
    return None


class _StackedLinear(nn.Module):
    """K linear maps over the last dimension, split in K blocks: ``(..., K * in) -> (..., K *
    out)``, member ``k``'s weight ``weight[k]``. One ``F.linear`` per member: the same
    arithmetic as the member's own layer (heads are small; the convolutions are what fuse)."""

    def __init__(self, linear: nn.Linear, k: int) -> None:
        super().__init__()
        self.k = k
        self.weight = nn.Parameter(torch.empty((k, *linear.weight.shape), device="meta"))
        self.bias = (
            None
            if linear.bias is None
            else nn.Parameter(torch.empty((k, *linear.bias.shape), device="meta"))
        )

    def forward(self, x: Tensor) -> Tensor:
        blocks = x.chunk(self.k, dim=-1)
        return torch.cat(
            [
                F.linear(b, self.weight[i], None if self.bias is None else self.bias[i])
                for i, b in enumerate(blocks)
            ],
            dim=-1,
        )


def _widen(model: nn.Module, k: int) -> nn.Module:
    """A structure-only copy (on the meta device) of ``model`` with every layer K times wide."""
    wide = copy.deepcopy(model).to("meta")
    for parent in list(wide.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Conv2d):
                new = nn.Conv2d(
                    child.in_channels * k,
                    child.out_channels * k,
                    child.kernel_size,
                    child.stride,
                    child.padding,
                    child.dilation,
                    child.groups * k,
                    child.bias is not None,
                    device="meta",
                )
            elif isinstance(child, nn.BatchNorm2d):
                new = nn.BatchNorm2d(
                    child.num_features * k, child.eps, child.momentum, child.affine, device="meta"
                )
            elif isinstance(child, nn.Linear):
                new = _StackedLinear(child, k)
            else:
                continue
            setattr(parent, name, new)
    return ForwardStages(wide)


class FusedStudents:
    """The students of ``members`` (equal :func:`student_signature`, :func:`fusable`) run as one
    network. Holds no tensors of its own: each call reads the members' weights.

    Args:
        students: the members' students, in member order (member ``k`` is block ``k``).
        channels_last: the members' memory format for the repeated input.
    """

    def __init__(self, students: Sequence[nn.Module], channels_last: bool = True) -> None:
        if len(students) < 2:
            raise ValueError(f"fusing needs two or more students, got {len(students)}")
        signatures = {student_signature(s) for s in students}
        if len(signatures) != 1:
            raise ValueError("fused students must share one architecture")
        why = fusable(students[0])
        if why is not None:
            raise ValueError(f"{type(students[0]).__name__} cannot be fused: {why}")
        self.students = list(students)
        self.k = len(students)
        self.channels_last = channels_last
        self.network = _widen(students[0], self.k)
        # parameter name -> how the members' tensors combine: stacked (a new leading dim, the
        # linear maps) or concatenated along dim 0 (convolutions, BatchNorm)
        linear = {
            name.removeprefix("model.")
            for name, m in self.network.named_modules()
            if isinstance(m, _StackedLinear)
        }
        self._stacked = {
            n for n, _ in students[0].named_parameters() if n.rsplit(".", 1)[0] in linear
        }
        self._counters = {
            n for n, _ in students[0].named_buffers() if n.endswith("num_batches_tracked")
        }

    def __call__(self, images: Tensor) -> list[StageOutput]:
        """Every member's :class:`~gompertz_kd.models.StageOutput` on ``images`` ``(N, 3, H,
        W)``, from one forward of the fused network (in the members' train/eval mode, which
        must agree)."""
        training = self.students[0].training
        params: dict[str, Tensor] = {}
        for name in dict(self.students[0].named_parameters()):
            tensors = [_get(s, name) for s in self.students]
            join = torch.stack if name in self._stacked else torch.cat
            params[f"model.{name}"] = join(tensors)
        buffers: dict[str, Tensor] = {}
        for name in dict(self.students[0].named_buffers()):
            if name in self._counters:
                buffers[f"model.{name}"] = _get(self.students[0], name).clone()
            else:
                buffers[f"model.{name}"] = torch.cat([_get(s, name) for s in self.students])
        wide = images.repeat(1, self.k, 1, 1)
        if self.channels_last:
            wide = wide.contiguous(memory_format=torch.channels_last)
        self.network.train(training)
        out = functional_call(self.network, (params, buffers), (wide,))
        if training:
            with torch.no_grad():  # the updated running statistics back to their members
                for name, value in buffers.items():
                    name = name.removeprefix("model.")
                    for k, student in enumerate(self.students):
                        own = _get(student, name)
                        own.copy_(value if name in self._counters else value.view(self.k, -1)[k])
        return [self._member(out, k) for k in range(self.k)]

    def _member(self, out: StageOutput, k: int) -> StageOutput:
        return StageOutput(*(_block(value, k, self.k) for value in out))

    @torch.no_grad()
    def check(self, images: Tensor, rtol: float = 5e-2) -> str | None:
        """``None`` when the fused forward matches every member's own on ``images`` (eval mode:
        no statistics move; autocast off) to ``rtol`` of each output's largest value, else what
        differs. A forward that mixes members' channels is off by the values' own size; grouped
        and separate convolutions differ by far less (TF32 convolutions on GPUs included)."""
        modes = [s.training for s in self.students]
        images = images.float()
        try:
            for s in self.students:
                s.eval()
            with torch.autocast(images.device.type, enabled=False):
                try:
                    fused = self(images)
                except Exception as error:  # a forward that cannot run widened fails many ways
                    return f"the fused forward fails ({type(error).__name__}: {error})"
                owns = [student.forward_stages(images) for student in self.students]
            for k, own in enumerate(owns):
                for field, a, b in zip(own._fields, own, fused[k], strict=True):
                    for x, y in zip(_leaves(a), _leaves(b), strict=True):
                        scale = float(x.abs().max()) if x.numel() else 0.0
                        if x.shape != y.shape or not torch.allclose(
                            x, y, rtol=rtol, atol=rtol * scale
                        ):
                            return f"member {k}'s {field} differ from its own forward's"
        finally:
            for s, mode in zip(self.students, modes, strict=True):
                s.train(mode)
        return None


def _get(module: nn.Module, name: str) -> Tensor:
    owner, _, attr = name.rpartition(".")
    return getattr(module.get_submodule(owner) if owner else module, attr)


def _leaves(value) -> list[Tensor]:
    if value is None:
        return []
    if isinstance(value, Tensor):
        return [value]
    return [t for v in value for t in _leaves(v)]


def _block(value, k: int, blocks: int):
    """Member ``k``'s block of a fused output: dim 1 (channels, or the features of a pooled or
    logit vector) split in ``blocks`` equal parts; lists element-wise."""
    if value is None:
        return None
    if isinstance(value, Tensor):
        width = value.shape[1] // blocks
        return value[:, k * width : (k + 1) * width]
    return [_block(v, k, blocks) for v in value]
