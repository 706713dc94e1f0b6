"""What a distillation step costs, side by side: ``python -m gompertz_kd.bench``.

    python -m gompertz_kd.bench --teacher ResNet50 --student MobileNetV2 --batch 32 \\
        --precision 32-true --device cpu --compile --output docs/benchmarks.md

Sections (``--sections``, default all but ``throughput``):

- ``steps``: images/second and peak memory of the teacher's forward alone, a student training
  step alone, the static KD, Gompertz KD, +Wasserstein, +gradient matching and full Gompertz-CNN
  steps (a plain PyTorch loop fed by the tensor data path), the Gompertz KD step under Lightning,
  and the options of :class:`~gompertz_kd.module.DistillationModule` that change the cost
  (folded BatchNorm, bf16 teacher, channels_last, gradient matching every k steps); then the
  ratios the targets are stated in.
- ``methods``: one training step of every distillation method, each objective built from its
  ``conf/method/<name>.yaml`` (all but ``student``; ``--methods`` picks some) exactly as a
  training run builds it, timed in the same plain loop and reported as a ratio to the
  ``method=kd`` step, with the objective's own parameters and buffers.
- ``accuracy``: what the options change: folded BatchNorm and the bf16 teacher against the
  fp32 teacher as built (logits, KD, Wasserstein and gradient-matching losses, input
  gradients); gradient matching under bf16-mixed; and a finite-difference estimate of the
  gradient-matching gradient against the exact double backward, for several step sizes (why
  the module offers none).
- ``data``: images/second of each data path (tensor path, per-image DataLoader with 0 and 2
  workers) on synthetic uint8 CIFAR images, next to the training throughput it must feed.
- ``compile``: ``torch.compile`` (``--compile``): compile time and compiled against eager KD step.
- ``throughput``: per batch size (``--batches``), the end-to-end Lightning step of the
  ``c100_resnet50_mbv2`` objective, eager and (with ``--compile``) compiled, and the estimated
  time of a full run (``--epochs`` epochs of ``--train-images`` images). The GPU check's section.

Every timed case runs ``--warmup`` rounds first; then ``--repeats`` rounds visit every case of a
section in turn (round-robin), so a burst of load from another process hits all of them alike.
Ratios are taken within each round and summarised by their median and spread (min-max), which
cancels most of the slow drift of a shared machine. Minor page faults per step are counted
around each timed call. Peak memory is measured after all timing: on CUDA
``max_memory_allocated``, on Linux CPUs the rise of the peak resident set size over a single
call (glibc set to return freed memory), i.e. what the step allocates above what was live.
The networks are randomly initialised unless ``--teacher-ckpt`` names trained weights.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import inspect
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from torch import Tensor, nn

from gompertz_kd import losses
from gompertz_kd.bench_population import (
    POPULATION_CASES,
    PopulationCase,
    PopulationRow,
    population_rows,
    population_table,
)
from gompertz_kd.callbacks import GompertzWeightCallback
from gompertz_kd.config import CONFIG_DIR
from gompertz_kd.data import (
    EpochSampler,
    ImageArrays,
    ImageDataset,
    TensorBatchLoader,
    batch_transform,
    image_transform,
)
from gompertz_kd.data.loaders import collate
from gompertz_kd.models import create_model
from gompertz_kd.module import DistillationModule
from gompertz_kd.objectives import CRD, Need, Objective, gompertz_cnn
from gompertz_kd.schedules import Constant, Gompertz
from gompertz_kd.train import build_objective

# keywords of DistillationModule-building cases that describe the Gompertz-CNN objective
_GOMPERTZ_CNN_ARGS = set(inspect.signature(gompertz_cnn).parameters)

__all__ = [
    "Case",
    "PeakMemory",
    "Result",
    "finite_difference_gm",
    "main",
    "method_names",
    "methods_section",
    "run_round_robin",
    "summarize",
    "write_report",
]

SECTIONS = ("steps", "methods", "population", "accuracy", "data", "compile", "throughput")
DEFAULT_SECTIONS = ("steps", "methods", "population", "accuracy", "data", "compile")
# the methods section: one config per method; the ratios are to the baseline's step, and the
# student alone is no distillation method (no teacher, nothing to compare)
METHOD_DIR = CONFIG_DIR / "method"
BASELINE_METHOD = "kd"
STUDENT_METHOD = "student"
# model options (conf/model/default.yaml) that change what a method's step computes; the
# methods section takes them from the composed config, as a training run does
METHOD_MODEL_OPTIONS = ("gm_every", "gm_precision", "teacher_precision", "fold_teacher_bn")
PRECISIONS = ("32-true", "bf16-mixed")
MARK_START = "<!-- bench:start (generated by python -m gompertz_kd.bench; do not edit) -->"
MARK_END = "<!-- bench:end -->"


# ---------------------------------------------------------------------------------- timing
@dataclass
class Result:
    """Timings of one case: seconds per step of each repeat, images per step, peak memory."""

    name: str
    images_per_step: int
    seconds: list[float] = field(default_factory=list)
    faults: list[float] = field(default_factory=list)  # minor page faults per step
    peak_mib: float | None = None
    note: str = ""

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def images_per_second(self) -> float:
        return self.images_per_step / self.median

    def spread(self) -> str:
        """Min-max of the repeats as a percentage of the median."""
        lo, hi = min(self.seconds), max(self.seconds)
        return f"{100 * (lo / self.median - 1):+.0f}/{100 * (hi / self.median - 1):+.0f}%"


@dataclass
class Case:
    """A timed unit of work. ``run()`` does ``steps`` steps and returns their wall seconds (a
    case that times itself, like a Lightning fit, leaves out its own setup)."""

    name: str
    run: Callable[[], float]
    images_per_step: int
    steps: int = 1
    memory: Callable[[], None] | None = None  # one step, for the memory probe
    note: str = ""
    count_faults: bool = True  # False where run() also does untimed set-up


def summarize(values: Sequence[float]) -> tuple[float, float, float]:
    """``(median, min, max)`` of ``values``."""
    return statistics.median(values), min(values), max(values)


def run_round_robin(
    cases: Sequence[Case],
    repeats: int,
    warmup: int,
    deadline: float | None = None,
    min_repeats: int = 3,
) -> dict[str, Result]:
    """Time every case ``warmup + repeats`` times, visiting them in turn; keep the last
    ``repeats`` (seconds per step). Past ``deadline`` (a ``time.perf_counter()`` value) no new
    round starts once ``min_repeats`` are done: a loaded machine gets fewer rounds, not an
    unbounded run."""
    results = {c.name: Result(c.name, c.images_per_step, note=c.note) for c in cases}
    for round_ in range(warmup + repeats):
        done = round_ - warmup
        if deadline is not None and done >= min_repeats and time.perf_counter() > deadline:
            break
        for case in cases:
            faults = _minor_faults()
            seconds = case.run()
            faults = _minor_faults() - faults
            if round_ >= warmup:
                results[case.name].seconds.append(seconds / case.steps)
                if case.count_faults and faults >= 0:
                    results[case.name].faults.append(faults / case.steps)
    return results


def _minor_faults() -> int:
    """Minor page faults of this process so far (-1 where unknown): each is a fresh page the
    kernel had to map and zero, the price of memory the allocator handed back and took again."""
    try:
        import resource
    except ImportError:  # not on POSIX
        return -1
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def timed(fn: Callable[[], Any], device: torch.device, steps: int = 1) -> Callable[[], float]:
    """``fn`` called ``steps`` times, returning the wall seconds (device synchronised)."""

    def run() -> float:
        _sync(device)
        start = time.perf_counter()
        for _ in range(steps):
            fn()
        _sync(device)
        return time.perf_counter() - start

    return run


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PeakMemory:
    """Peak memory one call allocates above what was live before it, in MiB.

    CUDA: ``torch.cuda.max_memory_allocated``. CPU (Linux, glibc): the rise of the resident set
    size's high-water mark (``/proc/self/status`` ``VmHWM``, reset through
    ``/proc/self/clear_refs``) after glibc has been told to hand freed memory back to the system
    (``mallopt``/``malloc_trim``), so the baseline is close to the live set. That changes the
    allocator's behaviour, so it runs after every timing. ``None`` where neither works.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._libc = None
        if device.type == "cpu" and sys.platform.startswith("linux"):
            try:
                libc = ctypes.CDLL("libc.so.6")
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
            except OSError:
                return
            m_trim_threshold, m_mmap_threshold = -1, -3
            libc.mallopt(m_mmap_threshold, 128 * 1024)
            libc.mallopt(m_trim_threshold, 128 * 1024)
            self._libc = libc

    def __call__(self, fn: Callable[[], Any]) -> float | None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            base = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            fn()
            torch.cuda.synchronize(self.device)
            return (torch.cuda.max_memory_allocated(self.device) - base) / 2**20
        if self._libc is None:
            return None
        self._libc.malloc_trim(0)
        base = _status_kib("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        fn()
        return (_status_kib("VmHWM") - base) / 1024


def _status_kib(field_name: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    raise OSError(f"{field_name} not in /proc/self/status")


# ---------------------------------------------------------------------------------- set-up
@dataclass
class Setup:
    """What every section shares: the networks, the device, the precision, a data path."""

    teacher: str
    student: str
    num_classes: int
    batch: int
    device: torch.device
    precision: str
    channels_last: bool
    teacher_ckpt: str | None
    gm_every: int
    shared_teacher: nn.Module = field(init=False)
    # when the current section should stop starting new rounds (see run_round_robin)
    deadline: float | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        torch.manual_seed(0)
        probe = DistillationModule(
            student=self.student,
            teacher=self.teacher,
            num_classes=self.num_classes,
            teacher_ckpt=self.teacher_ckpt,
            channels_last=self.channels_last,
        )
        self.shared_teacher = probe.teacher.to(self.device)

    def autocast(self) -> contextlib.AbstractContextManager:
        return torch.autocast(
            self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16-mixed"
        )

    def module(
        self, teacher: nn.Module | None | str = "shared", **kwargs: Any
    ) -> DistillationModule:
        """A fresh student (seeded, so every case starts from the same weights) with the shared
        teacher (``teacher="shared"``), another built teacher, or none."""
        torch.manual_seed(0)
        objective = {k: kwargs.pop(k) for k in list(kwargs) if k in _GOMPERTZ_CNN_ARGS}
        objective.setdefault("schedule", Gompertz())
        options = dict(
            student=self.student,
            teacher=self.shared_teacher if teacher == "shared" else teacher,
            num_classes=self.num_classes,
            channels_last=self.channels_last,
            gm_every=self.gm_every,
        )
        options.update(kwargs)
        if options["teacher"] is not None and "objective" not in options:
            options["objective"] = gompertz_cnn(**objective)
        module = DistillationModule(**options).to(self.device)
        module.train()
        module.set_progress(0.5)
        return module

    def nchw_teacher(self) -> nn.Module:
        """A contiguous-format copy of the shared teacher."""
        teacher = create_model(self.teacher, num_classes=self.num_classes).to(self.device)
        teacher.load_state_dict(self.shared_teacher.state_dict())
        return teacher.eval().requires_grad_(False)

    def arrays(self, count: int | None = None) -> ImageArrays:
        count = count or max(2048, 8 * self.batch)
        generator = torch.Generator().manual_seed(0)
        images = torch.randint(0, 256, (count, 3, 32, 32), dtype=torch.uint8, generator=generator)
        labels = torch.randint(0, self.num_classes, (count,), generator=generator)
        return ImageArrays(images, labels)

    def tensor_loader(
        self, arrays: ImageArrays | None = None, with_indices: bool = False
    ) -> TensorBatchLoader:
        """The fast data path: uint8 split on the device, standard augmentation batched; with
        ``with_indices`` the batches also carry each image's index (for CRD's memory bank)."""
        arrays = arrays or self.arrays()
        sampler = EpochSampler(arrays, num_replicas=1, rank=0, shuffle=True, seed=0, drop_last=True)
        return TensorBatchLoader(
            arrays,
            self.batch,
            batch_transform("cifar100", "standard"),
            sampler,
            seed=0,
            device=self.device,
            drop_last=True,
            with_indices=with_indices,
        )

    def fixed_batch(self) -> tuple[Tensor, Tensor]:
        images, labels = next(iter(self.tensor_loader()))
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        return images.contiguous(memory_format=fmt), labels


def _forever(loader) -> Iterator:
    while True:
        yield from loader


class PlainLoop:
    """The training step of a module without Lightning: batch from the data path (with each
    image's index when a term needs it), weights from the schedule, losses, backward, SGD step.
    The floor Lightning is compared against."""

    def __init__(self, setup: Setup, module: DistillationModule) -> None:
        self.setup = setup
        self.module = module
        self.optimizer = module.configure_optimizers()["optimizer"]
        with_indices = Need.INDICES in module.objective.needs
        self.batches = _forever(setup.tensor_loader(with_indices=with_indices))
        self.step_index = 0
        self.last_total: Tensor | None = None  # detached; read after timing (no sync per step)

    def __call__(self) -> None:
        images, targets, *rest = next(self.batches)
        indices = rest[0] if rest else None
        module = self.module
        module.set_progress((self.step_index % 1000) / 1000)
        self.optimizer.zero_grad(set_to_none=True)
        with self.setup.autocast():
            _, terms, _ = module.compute_losses(images, targets, self.step_index, indices)
            total = module.weighted_total(terms)
        total.backward()
        self.optimizer.step()
        self.last_total = total.detach()
        self.step_index += 1


class _StepTimer(L.Callback):
    """Wall time between the starts of consecutive training batches: everything a step costs
    under Lightning, the next batch's fetch and every hook included."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.starts: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        _sync(self.device)
        self.starts.append(time.perf_counter())


def lightning_case(
    setup: Setup, name: str, module: DistillationModule, steps: int, scratch: Path
) -> Case:
    """A case that fits ``module`` for ``steps + 2`` steps with a fresh Trainer per call and
    times the middle ``steps`` (the first one pays for lazy set-up)."""
    loader = setup.tensor_loader()

    def fit(max_steps: int) -> list[float]:
        timer = _StepTimer(setup.device)
        trainer = L.Trainer(
            accelerator=setup.device.type,
            devices=1,
            precision=setup.precision,
            max_steps=max_steps,
            logger=L.pytorch.loggers.CSVLogger(scratch, name="bench"),
            callbacks=[timer, GompertzWeightCallback()],
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            limit_val_batches=0,
            benchmark=setup.device.type == "cuda",
        )
        trainer.fit(module, train_dataloaders=loader)
        return timer.starts

    def run() -> float:
        starts = fit(steps + 2)
        return starts[-1] - starts[1]

    return Case(
        name, run, setup.batch, steps, memory=lambda: fit(1), note="Lightning", count_faults=False
    )


# ---------------------------------------------------------------------------------- sections
def steps_section(
    setup: Setup,
    repeats: int,
    warmup: int,
    scratch: Path,
    memory: list[tuple[Result, Callable[[], Any]]],
) -> dict[str, Result]:
    """Every step variant of the issue, plus the options that change their cost."""
    dev, batch, k = setup.device, setup.batch, setup.gm_every
    images, targets = setup.fixed_batch()
    student_only = setup.module(teacher=None)
    student_loop = PlainLoop(setup, student_only)
    student_optimizer = student_loop.optimizer

    def student_step() -> None:
        student_optimizer.zero_grad(set_to_none=True)
        with setup.autocast():
            _, terms, _ = student_only.compute_losses(images, targets)
        student_only.weighted_total(terms).backward()
        student_optimizer.step()

    kd = setup.module(gm_every=1)
    unfolded = setup.module(fold_teacher_bn=False)

    def teacher_fwd(module: DistillationModule, inputs: Tensor = images) -> Callable[[], None]:
        def run() -> None:
            with setup.autocast():
                module.teacher_forward(inputs)

        return run

    def teacher_grad(module: DistillationModule) -> Callable[[], None]:
        def run() -> None:
            with setup.autocast():
                module.teacher_forward(images, targets, input_gradient=True)

        return run

    cases = [
        Case("teacher forward", timed(teacher_fwd(kd), dev), batch),
        Case("teacher forward, BatchNorm unfolded", timed(teacher_fwd(unfolded), dev), batch),
    ]
    if setup.channels_last:
        nchw_teacher = setup.nchw_teacher()
        nchw = setup.module(teacher=nchw_teacher, channels_last=False, fold_teacher_bn=False)
        nchw_images = images.contiguous()
        cases.append(
            Case(
                "teacher forward, BatchNorm unfolded, NCHW",
                timed(teacher_fwd(nchw, nchw_images), dev),
                batch,
            )
        )
    bf16_teacher = None
    if setup.precision == "32-true":
        bf16_teacher = setup.module(teacher_precision="bf16")
        cases.append(Case("teacher forward, bf16", timed(teacher_fwd(bf16_teacher), dev), batch))
    cases += [
        Case("teacher input gradient", timed(teacher_grad(kd), dev), batch),
        Case(
            "teacher input gradient, BatchNorm unfolded", timed(teacher_grad(unfolded), dev), batch
        ),
    ]
    if bf16_teacher is not None:
        cases.append(
            Case("teacher input gradient, bf16", timed(teacher_grad(bf16_teacher), dev), batch)
        )
    cases.append(Case("student step", timed(student_step, dev), batch, memory=student_step))

    # The Wasserstein term on its own: projector, pooling, statistics, forward and backward.
    wd = setup.module(wd_scale=1.0)
    student_features = [f.detach() for f in wd.student.forward_stages(images).features]
    teacher_features = wd.teacher_forward(images)[0].features
    deepest = teacher_features[-1]

    def wd_term() -> None:
        features = [f.requires_grad_(True) for f in student_features]
        with setup.autocast():
            loss = wd.objective.terms["wd"].loss(features, teacher_features)
        loss.backward()

    def statistics_of(fn: Callable[[Tensor], Any]) -> Callable[[], None]:
        return lambda: fn(deepest.requires_grad_(False))

    cases += [
        Case("Wasserstein term alone (forward + backward)", timed(wd_term, dev), batch),
        Case(
            "channel statistics of the teacher's last map",
            timed(statistics_of(losses.channel_gaussian_stats), dev),
            batch,
        ),
        Case(
            "the same with torch.var",
            timed(statistics_of(_torch_var_statistics), dev),
            batch,
            note="before",
        ),
    ]

    def loop_case(name: str, steps: int = 1, note: str = "", **options: Any) -> Case:
        loop = PlainLoop(setup, setup.module(**options))
        return Case(name, timed(loop, dev, steps), batch, steps, memory=loop, note=note)

    exact = {"gm_every": 1}
    cases += [
        loop_case("static KD step", schedule=Constant(0.9), mixing="convex", **exact),
        loop_case("Gompertz KD step", **exact),
        loop_case("+ Wasserstein", wd_scale=1.0, **exact),
        loop_case("+ gradient matching", gm_scale=1.0, **exact),
        loop_case("full Gompertz-CNN step", wd_scale=1.0, gm_scale=1.0, **exact),
        loop_case(
            "+ gradient matching, BatchNorm unfolded",
            gm_scale=1.0,
            fold_teacher_bn=False,
            note="before",
            **exact,
        ),
        loop_case(f"+ gradient matching, every {k} steps", k, gm_scale=1.0, gm_every=k),
        loop_case(f"full, every {k} steps", k, wd_scale=1.0, gm_scale=1.0, gm_every=k),
    ]
    if setup.precision == "32-true":
        cases += [
            loop_case(
                "Gompertz KD step, bf16 teacher", teacher_precision="bf16", note="approximate"
            ),
            loop_case(
                f"full, every {k} steps, bf16 teacher",
                k,
                wd_scale=1.0,
                gm_scale=1.0,
                gm_every=k,
                teacher_precision="bf16",
                note="approximate",
            ),
        ]
    if setup.channels_last:
        cases.append(
            loop_case(
                "Gompertz KD step, NCHW, BatchNorm unfolded",
                teacher=nchw_teacher,
                channels_last=False,
                fold_teacher_bn=False,
                note="before",
            )
        )
    cases.append(
        lightning_case(
            setup, "Gompertz KD step, Lightning", setup.module(**exact), steps=2, scratch=scratch
        )
    )
    # Cases a ratio compares run next to each other, so that load changes within a round
    # touch both sides alike.
    first = [
        "teacher forward",
        "student step",
        "Gompertz KD step",
        "Gompertz KD step, Lightning",
        "static KD step",
        "+ Wasserstein",
        "Wasserstein term alone (forward + backward)",
        "+ gradient matching",
        f"+ gradient matching, every {k} steps",
        "full Gompertz-CNN step",
        f"full, every {k} steps",
    ]
    cases.sort(key=lambda c: first.index(c.name) if c.name in first else len(first))
    results = run_round_robin(cases, repeats, warmup, setup.deadline)
    memory += [(results[c.name], c.memory or c.run) for c in cases]
    return results


def checkpoint_cost(
    setup: Setup, scratch: Path, results: dict[str, Result]
) -> tuple[float, float, float]:
    """``(seconds per checkpoint save, its MiB, seconds per Gompertz KD step)``: the median of 3
    atomic saves of a Gompertz KD module's training state, as the Trainer writes it."""
    from gompertz_kd.checkpoints import AtomicCheckpointIO

    module = setup.module()
    loop = PlainLoop(setup, module)
    loop()  # momentum buffers exist, as in a checkpoint taken during training
    state = {
        "state_dict": module.state_dict(),
        "optimizer_states": [loop.optimizer.state_dict()],
        "epoch": 0,
        "global_step": 1,
    }
    path = scratch / "bench.ckpt"
    io, seconds = AtomicCheckpointIO(), []
    for _ in range(3):
        start = time.perf_counter()
        io.save_checkpoint(state, path)
        seconds.append(time.perf_counter() - start)
    mib = path.stat().st_size / 2**20
    path.unlink()
    return statistics.median(seconds), mib, results["Gompertz KD step"].median


def _torch_var_statistics(features: Tensor) -> tuple[Tensor, Tensor]:
    """:func:`gompertz_kd.losses.channel_gaussian_stats` as it was, with ``torch.var``."""
    flat = features.flatten(2)
    return flat.mean(dim=2), torch.sqrt(flat.var(dim=2, unbiased=False) + 1e-6)


def ratios(results: dict[str, Result], k: int) -> dict[str, tuple[float, float, float]]:
    """The ratios the targets are stated in, per round, as ``(median, min, max)``."""

    def per_round(fn: Callable[[int], float]) -> tuple[float, float, float]:
        n = len(next(iter(results.values())).seconds)
        return summarize([fn(i) for i in range(n)])

    def t(name: str, i: int) -> float:
        return results[name].seconds[i]

    out = {}
    base = lambda i: t("student step", i) + t("teacher forward", i)  # noqa: E731
    out["overhead, plain loop: KD step / (student step + teacher forward)"] = per_round(
        lambda i: t("Gompertz KD step", i) / base(i)
    )
    out["overhead, Lightning: KD step / (student step + teacher forward)"] = per_round(
        lambda i: t("Gompertz KD step, Lightning", i) / base(i)
    )
    out["Lightning KD step / plain-loop KD step"] = per_round(
        lambda i: t("Gompertz KD step, Lightning", i) / t("Gompertz KD step", i)
    )
    out["Wasserstein term alone / KD step"] = per_round(
        lambda i: t("Wasserstein term alone (forward + backward)", i) / t("Gompertz KD step", i)
    )
    out["static KD step / Gompertz KD step"] = per_round(
        lambda i: t("static KD step", i) / t("Gompertz KD step", i)
    )
    for name in (
        "+ Wasserstein",
        "+ gradient matching",
        "+ gradient matching, BatchNorm unfolded",
        f"+ gradient matching, every {k} steps",
        "full Gompertz-CNN step",
        f"full, every {k} steps",
        f"full, every {k} steps, bf16 teacher",
    ):
        if name in results:
            out[f"{name} / KD step"] = per_round(
                lambda i, n=name: t(n, i) / t("Gompertz KD step", i)
            )
    speedups = [
        (
            "BatchNorm folding, teacher forward",
            "teacher forward, BatchNorm unfolded",
            "teacher forward",
        ),
        (
            "BatchNorm folding, teacher input gradient",
            "teacher input gradient, BatchNorm unfolded",
            "teacher input gradient",
        ),
        (
            "channels_last, teacher forward",
            "teacher forward, BatchNorm unfolded, NCHW",
            "teacher forward, BatchNorm unfolded",
        ),
        ("bf16 teacher, forward", "teacher forward", "teacher forward, bf16"),
        ("bf16 teacher, input gradient", "teacher input gradient", "teacher input gradient, bf16"),
        (
            "two-pass channel statistics",
            "the same with torch.var",
            "channel statistics of the teacher's last map",
        ),
        ("bf16 teacher, KD step", "Gompertz KD step", "Gompertz KD step, bf16 teacher"),
        (
            "channels_last + folding, KD step",
            "Gompertz KD step, NCHW, BatchNorm unfolded",
            "Gompertz KD step",
        ),
    ]
    for label, slow, fast in speedups:
        if slow in results and fast in results:
            out[f"speed-up of {label}"] = per_round(lambda i, s=slow, f=fast: t(s, i) / t(f, i))
    return out


def method_names(selected: Sequence[str] | None = None) -> list[str]:
    """The distillation methods of ``conf/method`` (every file but the student alone), the
    baseline first; ``selected`` keeps only those (the baseline always stays).

    Raises:
        ValueError: a selected name with no ``conf/method/<name>.yaml``.
    """
    known = sorted(p.stem for p in METHOD_DIR.glob("*.yaml") if p.stem != STUDENT_METHOD)
    if selected:
        unknown = sorted(set(selected) - set(known))
        if unknown:
            raise ValueError(f"--methods: no method config {unknown}; choose from {known}")
        known = [m for m in known if m in selected or m == BASELINE_METHOD]
    return sorted(known, key=lambda m: m != BASELINE_METHOD)


def method_configs(names: Sequence[str]) -> dict[str, Any]:
    """``{name: cfg}``: ``conf/`` composed with ``method=<name>``, as ``python -m
    gompertz_kd.run method=<name>`` composes it (the shared schedule, the seed and the model's
    options at their defaults)."""
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return {name: compose("train", overrides=[f"method={name}"]) for name in names}


def method_title(name: str) -> str:
    """The method's name as its config's first comment line gives it (``# WKD-L (Lv et al.,
    ...`` -> ``WKD-L``), or ``name`` when the file has none."""
    for line in (METHOD_DIR / f"{name}.yaml").read_text().splitlines():
        if line.startswith("# "):
            return re.split(r" \(|:|,", line[2:], maxsplit=1)[0].strip() or name
        if line.strip():
            break
    return name


@dataclass
class MethodRow:
    """One row of the methods table: the step of ``method=<method>`` and its objective."""

    method: str
    terms: str  # the term classes that are on, e.g. "KD + Wasserstein + GradientMatching"
    result: Result
    ratio: tuple[float, float, float]  # to the baseline's step, per round: (median, min, max)
    parameters: int  # the objective's trainable parameters (projectors, regressors, ...)
    buffers: int  # its other state (CRD's memory banks)


@dataclass
class MethodsResult:
    """The methods section: a row per method (the baseline first), footnotes (markdown
    bullets) on what dominates a method's cost, and the model options every method ran with."""

    rows: list[MethodRow]
    footnotes: list[str]
    model_options: dict[str, Any]


def methods_section(
    setup: Setup,
    repeats: int,
    warmup: int,
    num_train_samples: int,
    memory: list[tuple[Result, Callable[[], Any]]],
    selected: Sequence[str] | None = None,
) -> MethodsResult:
    """One training step (forward, every term, backward, SGD step) of every method, each built
    from its config as a training run builds it, on the shared teacher; round-robin, and each
    step's ratio to the baseline's step taken within the round.

    ``num_train_samples`` sizes the per-image memories (CRD's banks); the batches carry each
    image's index where a term needs it. Every method runs at its configured values (CRD at its
    K): a slow case makes a loaded machine run fewer rounds (``setup.deadline``), never a
    smaller objective.

    ``selected``: method names (default: every one, :func:`method_names`).
    """
    names = method_names(selected)
    configs = method_configs(names)
    loops: dict[str, PlainLoop] = {}
    cases: list[Case] = []
    options: dict[str, Any] = {}
    for name, cfg in configs.items():
        options = {key: cfg.model[key] for key in METHOD_MODEL_OPTIONS}
        module = setup.module(
            objective=build_objective(cfg), num_train_samples=num_train_samples, **options
        )
        loops[name] = loop = PlainLoop(setup, module)
        cases.append(Case(name, timed(loop, setup.device), setup.batch, memory=loop))
    results = run_round_robin(cases, repeats, warmup, setup.deadline)
    memory += [(results[c.name], c.memory) for c in cases]
    base = results[BASELINE_METHOD].seconds
    rows, footnotes = [], []
    for name, loop in loops.items():
        objective: Objective = loop.module.objective
        result = results[name]
        if loop.last_total is not None and not torch.isfinite(loop.last_total):
            result.note = "non-finite loss (random weights); timed anyway"
        rows.append(
            MethodRow(
                method=name,
                terms=" + ".join(type(t).__name__ for t in objective.terms.values()),
                result=result,
                ratio=summarize([s / b for s, b in zip(result.seconds, base, strict=True)]),
                parameters=sum(p.numel() for p in objective.parameters()),
                buffers=sum(b.numel() for b in objective.buffers()),
            )
        )
        for term_name, term in objective.terms.items():
            if isinstance(term, CRD):
                result.note = (result.note + "; " if result.note else "") + "see below"
                footnotes.append(_crd_footnote(name, term_name, term, setup.batch))
    return MethodsResult(rows, footnotes, options)


def _crd_footnote(method: str, term_name: str, term: CRD, batch: int) -> str:
    """What CRD's memory banks cost per step at its configured ``K``."""
    bank = term.memory.memory_s
    rows = 2 * batch * (term.num_negatives + 1)
    mib = rows * term.feature_dim * bank.element_size() / 2**20
    dtype = str(bank.dtype).removeprefix("torch.")
    return (
        f"- `method={method}` runs at its configured K = {term.num_negatives} negatives "
        f"(`method.terms.{term_name}.term.num_negatives`): each step gathers 2 banks × {batch} "
        f"images × (K + 1) = {rows} rows of {term.feature_dim} {dtype} from its memory banks "
        f"({term.num_data} slots each; {mib:.0f} MiB) and scores each against the image's "
        "embedding, on top of a forward of both networks."
    )


def methods_table(rows: Sequence[MethodRow]) -> list[str]:
    lines = [
        "| method | config | terms | ms/step (median) | spread (min/max) | × KD step (median) "
        "| min–max over rounds | objective parameters | objective buffers | peak MiB | note |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row in rows:
        r, (med, lo, hi) = row.result, row.ratio
        lines.append(
            f"| {method_title(row.method)} | `method={row.method}` | {row.terms} | "
            f"{1000 * r.median:.1f} | {r.spread()} | {med:.2f} | {lo:.2f}–{hi:.2f} | "
            f"{row.parameters:,} | {row.buffers:,} | {_fmt_mib(r.peak_mib)} | {r.note} |"
        )
    return lines


@torch.no_grad()
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
        bf16 = setup.module(wd_scale=1.0, gm_scale=1.0, gm_every=1, teacher_precision="bf16")
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

    def gm_gradient(module: DistillationModule, autocast: bool) -> Tensor:
        with torch.autocast(setup.device.type, dtype=torch.bfloat16, enabled=autocast):
            _, terms, _ = module.compute_losses(images, targets)
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


def data_section(
    setup: Setup, repeats: int, batches: int, workers: Sequence[int]
) -> dict[str, Result]:
    """Images/second of each data path alone, round-robin."""
    arrays = setup.arrays(count=max(4096, 4 * batches * setup.batch))
    loaders = {"tensor path (on_device=True)": _forever(setup.tensor_loader(arrays))}
    for w in workers:
        sampler = EpochSampler(arrays, num_replicas=1, rank=0, shuffle=True, seed=0, drop_last=True)
        loader = torch.utils.data.DataLoader(
            ImageDataset(arrays, image_transform("cifar100", "standard"), seed=0),
            batch_size=setup.batch,
            sampler=sampler,
            num_workers=w,
            collate_fn=collate,
            drop_last=True,
            pin_memory=setup.device.type == "cuda",
            persistent_workers=w > 0,
        )
        if setup.device.type == "cuda":
            loaders[f"per-image DataLoader, num_workers={w}"] = (
                (x.to(setup.device, non_blocking=True), y.to(setup.device, non_blocking=True))
                for x, y in _forever(loader)
            )
        else:
            loaders[f"per-image DataLoader, num_workers={w}"] = _forever(loader)
    cases = [
        Case(name, timed(lambda it=it: next(it), setup.device, batches), setup.batch, batches)
        for name, it in loaders.items()
    ]
    return run_round_robin(cases, repeats, warmup=1, deadline=setup.deadline)


def compile_section(
    setup: Setup, repeats: int, memory: list[tuple[Result, Callable[[], Any]]]
) -> tuple[float, dict[str, Result]]:
    """Compile time of the Gompertz KD step and its compiled against eager speed."""
    eager = PlainLoop(setup, setup.module(gm_every=1))
    compiled_module = setup.module(gm_every=1)
    compiled_module.compile_networks()
    compiled = PlainLoop(setup, compiled_module)
    eager()
    eager_seconds = timed(eager, setup.device)()
    with _cold_compile():
        first = timed(compiled, setup.device)()
    compile_seconds = first - eager_seconds
    cases = [
        Case("Gompertz KD step, eager", timed(eager, setup.device), setup.batch, memory=eager),
        Case(
            "Gompertz KD step, torch.compile",
            timed(compiled, setup.device),
            setup.batch,
            memory=compiled,
        ),
    ]
    results = run_round_robin(cases, repeats, warmup=1, deadline=setup.deadline)
    memory += [(results[c.name], c.memory) for c in cases]
    return compile_seconds, results


# The c100_resnet50_mbv2 objective: KD + Wasserstein + exact gradient matching every step.
FULL_OBJECTIVE = dict(wd_scale=1.0, gm_scale=1.0, gm_every=1, mixing="convex")


def throughput_modules(setup: Setup, compile_too: bool) -> dict[str, DistillationModule]:
    """The modules of the throughput section, built once and reused for every batch size (so
    a compiled one compiles once per new shape, not once per module)."""
    modules = {
        "kd": setup.module(gm_every=1),
        "evaluator": setup.module(teacher=None).eval(),
        "eager": setup.module(**FULL_OBJECTIVE),
    }
    if setup.precision == "bf16-mixed":
        modules["gm_bf16"] = setup.module(**FULL_OBJECTIVE, gm_precision=None)
    if compile_too:
        modules["compiled"] = setup.module(**FULL_OBJECTIVE)
        with _quiet_compile_warning():
            modules["compiled"].compile_networks()
    return modules


def throughput_section(
    setup: Setup,
    repeats: int,
    modules: dict[str, DistillationModule],
    scratch: Path,
    memory: list[tuple[Result, Callable[[], Any]]],
) -> dict[str, Result]:
    """End-to-end Lightning steps of the ``c100_resnet50_mbv2`` objective, eager and compiled
    (with exact gradient matching the compiled module's student stays eager), plus the
    teacher's forward and the student's evaluation forward for context."""
    images, _ = setup.fixed_batch()
    kd, evaluator = modules["kd"], modules["evaluator"]

    def teacher_fwd() -> None:
        with setup.autocast():
            kd.teacher_forward(images)

    def student_eval() -> None:
        with torch.no_grad(), setup.autocast():
            evaluator(images)

    cases = [
        Case("teacher forward", timed(teacher_fwd, setup.device), setup.batch),
        Case("student evaluation forward", timed(student_eval, setup.device), setup.batch),
        lightning_case(setup, "c100_resnet50_mbv2 step, Lightning", modules["eager"], 3, scratch),
    ]
    if "gm_bf16" in modules:
        cases.append(
            lightning_case(
                setup,
                "c100_resnet50_mbv2 step, Lightning, gm_precision=null (bf16)",
                modules["gm_bf16"],
                3,
                scratch,
            )
        )
    if "compiled" in modules:
        case = lightning_case(
            setup,
            "c100_resnet50_mbv2 step, Lightning, torch.compile",
            modules["compiled"],
            3,
            scratch,
        )
        start = time.perf_counter()
        with _cold_compile():
            case.memory()  # compiles for this shape
        case.note = f"first fit {time.perf_counter() - start:.0f} s (compiles)"
        cases.append(case)
    results = run_round_robin(cases, repeats, warmup=1, deadline=setup.deadline)
    memory += [(results[c.name], c.memory or c.run) for c in cases]
    return results


@contextlib.contextmanager
def _cold_compile() -> Iterator[None]:
    """Compile without inductor's on-disk caches, which earlier runs would have filled."""
    import torch._functorch.config
    import torch._inductor.config

    with (
        torch._inductor.config.patch(fx_graph_cache=False),
        torch._functorch.config.patch(enable_autograd_cache=False),
    ):
        yield


@contextlib.contextmanager
def _quiet_compile_warning() -> Iterator[None]:
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="compile_networks: the student stays eager")
        yield


# ---------------------------------------------------------------------------------- report
def machine_lines(device: torch.device) -> list[str]:
    cpu = _lscpu_model() or platform.processor() or platform.machine()
    lines = [
        f"- machine: {cpu}, {os.cpu_count()} logical CPUs, {torch.get_num_threads()} torch threads"
        f"{_cpu_bf16_flags()}, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}",
        f"- torch {torch.__version__}, lightning {L.__version__}, Python {platform.python_version()}",
    ]
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        lines.append(
            f"- GPU: {props.name}, {props.total_memory / 2**30:.0f} GiB, compute capability "
            f"{props.major}.{props.minor}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}"
        )
    return lines


def _lscpu_model() -> str | None:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    for line in out.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return None


def _cpu_bf16_flags() -> str:
    try:
        flags = next(
            line.split(":", 1)[1].split()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("flags")
        )
    except (OSError, StopIteration):
        return ""
    have = [f for f in ("avx512_bf16", "amx_bf16", "amx_tile") if f in flags]
    return f" (CPU bf16 support: {', '.join(have) or 'none'})"


def _fmt_mib(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0f}"


def results_table(results: dict[str, Result]) -> list[str]:
    lines = [
        "| case | images/s | ms/step (median) | spread (min/max) | peak MiB | page faults/step "
        "| note |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in results.values():
        faults = f"{statistics.median(r.faults):.0f}" if r.faults else "n/a"
        lines.append(
            f"| {r.name} | {r.images_per_second:.0f} | {1000 * r.median:.1f} | {r.spread()} | "
            f"{_fmt_mib(r.peak_mib)} | {faults} | {r.note} |"
        )
    return lines


def ratio_table(values: dict[str, tuple[float, float, float]]) -> list[str]:
    lines = ["| ratio | median | min–max over rounds |", "|---|---:|---:|"]
    for name, (med, lo, hi) in values.items():
        lines.append(f"| {name} | {med:.3f} | {lo:.3f}–{hi:.3f} |")
    return lines


@dataclass
class Target:
    text: str
    measured: str
    met: str
    changed: str


def targets(
    steps: dict[str, Result] | None,
    rat: dict[str, tuple[float, float, float]] | None,
    data: dict[str, Result] | None,
    compile_result: tuple[float, dict[str, Result]] | None,
    setup: Setup,
) -> list[Target]:
    """Each target of the issue with its measured value (median over rounds)."""
    k = setup.gm_every
    out: list[Target] = []

    def yes(ok: bool) -> str:
        return "met" if ok else "**not met**"

    if rat is not None and steps is not None:
        plain = rat["overhead, plain loop: KD step / (student step + teacher forward)"][0]
        light = rat["overhead, Lightning: KD step / (student step + teacher forward)"][0]
        out.append(
            Target(
                "framework overhead ≤ 5 % over student step + teacher forward (Lightning included)",
                f"Lightning {100 * (light - 1):+.1f} %, plain loop {100 * (plain - 1):+.1f} %",
                yes(light <= 1.05),
                "nothing needed: the KD step was already the sum of its parts; measured with the "
                "tensor data path and a CSV logger",
            )
        )
        wd = rat["+ Wasserstein / KD step"][0]
        wd_alone = rat["Wasserstein term alone / KD step"][0]
        var_speedup = rat["speed-up of two-pass channel statistics"][0]
        out.append(
            Target(
                "Wasserstein term ≤ 5 % of the KD step",
                f"the term alone {100 * wd_alone:.1f} %; step with it {100 * (wd - 1):+.1f} % "
                "(the difference of two noisy steps)",
                yes(wd_alone <= 0.05),
                f"channel statistics computed in two passes instead of torch.var, "
                f"{var_speedup:.0f}× faster on the teacher's last map (the same value)",
            )
        )
        gm = rat["+ gradient matching / KD step"][0]
        gm_k = rat[f"+ gradient matching, every {k} steps / KD step"][0]
        gm_old = rat["+ gradient matching, BatchNorm unfolded / KD step"][0]
        full = rat["full Gompertz-CNN step / KD step"][0]
        full_k = rat[f"full, every {k} steps / KD step"][0]
        out.append(
            Target(
                "gradient matching ≤ 1.6× the KD step",
                f"every step {gm:.2f}× (BatchNorm unfolded, as before: {gm_old:.2f}×); every {k} "
                f"steps {gm_k:.2f}×. Full objective: {full:.2f}×, every {k} steps {full_k:.2f}×",
                f"{yes(gm <= 1.6)} every step (the default); {yes(gm_k <= 1.6)} with gm_every={k}",
                "teacher BatchNorm folded (new default, exact); gm_every option (exact on the "
                "steps it runs, weight ×k); finite differences measured and rejected (see accuracy)",
            )
        )
        tf = steps["teacher forward"]
        parts = [f"{tf.images_per_second:.0f} img/s folded"]
        if "speed-up of bf16 teacher, forward" in rat:
            parts.append(f"bf16 {rat['speed-up of bf16 teacher, forward'][0]:.2f}× faster")
        if "speed-up of channels_last, teacher forward" in rat:
            parts.append(
                f"channels_last {rat['speed-up of channels_last, teacher forward'][0]:.2f}×"
            )
        parts.append(f"folding {rat['speed-up of BatchNorm folding, teacher forward'][0]:.2f}×")
        out.append(
            Target(
                "teacher without autograd state where not needed, fastest precision, channels_last",
                "; ".join(parts),
                "met (no_grad unless gradient matching is due; bf16 is the opt-in "
                "teacher_precision=bf16 on fp32 runs)",
                "no_grad forward (kept); BatchNorm folded (new default); teacher_precision option",
            )
        )
    if data is not None and steps is not None:
        fastest = max(r.images_per_second for r in data.values())
        tensor = data["tensor path (on_device=True)"].images_per_second
        train = max(
            steps["student step"].images_per_second, steps["Gompertz KD step"].images_per_second
        )
        out.append(
            Target(
                "the data path never limits training",
                f"tensor path {tensor:.0f} img/s = {tensor / train:.0f}× the fastest training step "
                f"here ({train:.0f} img/s; {100 * train / tensor:.2f} % of step time)",
                yes(fastest >= 10 * train),
                "nothing needed (the data issue's tensor path)",
            )
        )
    if compile_result is not None:
        compile_s, res = compile_result
        speed = (
            res["Gompertz KD step, eager"].median / res["Gompertz KD step, torch.compile"].median
        )
        out.append(
            Target(
                "torch.compile as an option, effect and compile time measured",
                f"compile {compile_s:.0f} s; compiled KD step {speed:.2f}× eager",
                "measured",
                "compile=true (exists); the teacher is compiled as it runs (folded); with exact "
                "gradient matching the student stays eager (no double backward when compiled)",
            )
        )
    return out


def render(
    args: argparse.Namespace,
    setup: Setup,
    sections: dict[str, Any],
    load: tuple[float, float],
    wall: float,
) -> str:
    lines = [
        f"Command: `{_command(args)}`",
        "",
        *machine_lines(setup.device),
        f"- {setup.teacher} → {setup.student}, {setup.num_classes} classes, batch "
        f"{args.batches if 'throughput' in sections else setup.batch}, "
        f"{setup.precision}, {setup.device.type}, channels_last={setup.channels_last}, "
        f"up to {args.repeats} rounds after {args.warmup} warm-up (rounds run: "
        f"{_rounds_run(sections)}), gm_every={setup.gm_every} where the case says so",
        f"- teacher weights: {setup.teacher_ckpt or 'random initialisation'}",
        f"- load average (1 min) before / after: {load[0]:.2f} / {load[1]:.2f}; wall time "
        f"{wall / 60:.1f} min",
        "",
    ]
    if "steps" in sections:
        results, rat = sections["steps"]
        lines += [
            "### Steps",
            "",
            *results_table(results),
            "",
            "### Ratios",
            "",
            *ratio_table(rat),
            "",
        ]
    if "checkpoint" in sections:
        save_s, mib, step_s = sections["checkpoint"]
        lines += [
            "### Checkpoint cost",
            "",
            "One training checkpoint of the Gompertz KD module (student, teacher, objective, SGD "
            "state) written as runs write it (`AtomicCheckpointIO`: `.partial` file, fsync, "
            f"atomic rename), median of 3: {save_s:.2f} s for {mib:.0f} MiB, "
            f"{save_s / step_s:.1f} Gompertz KD steps' time. What "
            "`callbacks.interval_checkpoint.every_n_minutes=N` costs in training time: "
            + ", ".join(f"N = {n}: {100 * save_s / (60 * n):.2f} %" for n in (1, 5, 10, 30))
            + "; `every_n_steps=N`: "
            + ", ".join(f"N = {n}: {100 * save_s / (n * step_s):.1f} %" for n in (100, 500, 2000))
            + ".",
            "",
        ]
    if "population" in sections:
        lines += [
            "### Populations: K members on one teacher pass",
            "",
            "A population step (the teacher once; every member's student, terms, one backward of "
            "the summed losses, one SGD step) timed round-robin with each member's single-run "
            "step (its own teacher pass each), the ratio taken within each round. Members from "
            "`conf/population/<name>.yaml`, built as training runs build them (seed replicas "
            "beyond its size). Member-images/s: K × batch / step time. See "
            "`gompertz_kd.bench_population`.",
            "",
            *population_table(sections["population"]),
            "",
        ]
    if "methods" in sections:
        methods = sections["methods"]
        model_options = ", ".join(
            f"{k}={'null' if v is None else v}" for k, v in methods.model_options.items()
        )
        lines += [
            "### Methods: one training step each, as a ratio to the KD step",
            "",
            "Each objective built from `conf/method/<name>.yaml` as a training run with "
            "`method=<name>` builds it (the published defaults; the model options of "
            f"`conf/model`: {model_options}), on the pair above with a training set of "
            f"{args.train_images} images (per-image memories) and batches that carry each "
            "image's index; the plain loop of the steps table (forward, every term, backward, "
            "SGD step), every method in each round; the ratio to the `method=kd` step is taken "
            "within each round. Parameters and buffers: the objective's own (projectors, "
            "regressors, memory banks), not the networks'.",
            "",
            *methods_table(methods.rows),
            "",
            *methods.footnotes,
            "",
        ]
    if "accuracy" in sections:
        lines += [
            "### Accuracy of the approximate options",
            "",
            "| quantity | value |",
            "|---|---|",
        ]
        lines += [f"| {q} | {v} |" for q, v in sections["accuracy"]]
        lines.append("")
    if "data" in sections:
        lines += ["### Data paths (synthetic uint8 images, standard augmentation)", ""]
        lines += results_table(sections["data"])
        if "steps" in sections:
            steps = sections["steps"][0]
            lines += ["", "Training throughput the data path feeds (from the steps table):", ""]
            for name in ("student step", "Gompertz KD step", "full Gompertz-CNN step"):
                lines.append(f"- {name}: {steps[name].images_per_second:.0f} img/s")
        lines.append("")
    if "compile" in sections:
        compile_s, res = sections["compile"]
        lines += [
            "### torch.compile",
            "",
            f"Compile time of the Gompertz KD step (first compiled step minus an eager step, "
            f"inductor's on-disk caches off): "
            f"{compile_s:.0f} s.",
            "",
            *results_table(res),
            "",
        ]
    if "throughput" in sections:
        for batch, (res, estimate) in sections["throughput"].items():
            lines += [f"### End-to-end, batch {batch}", "", *results_table(res), "", *estimate, ""]
    tg = sections.get("targets")
    if tg:
        lines += [
            "### Targets",
            "",
            "| target | measured | status | what was changed |",
            "|---|---|---|---|",
        ]
        lines += [f"| {t.text} | {t.measured} | {t.met} | {t.changed} |" for t in tg]
        lines.append("")
    return "\n".join(lines)


def _rounds_run(sections: dict[str, Any]) -> str:
    """How many timed rounds each section got (fewer than asked under ``--budget``)."""
    counts = []
    for name, value in sections.items():
        results = {
            "steps": lambda v: v[0],
            "methods": lambda v: {row.method: row.result for row in v.rows},
            "data": lambda v: v,
            "compile": lambda v: v[1],
        }.get(name)
        if results is not None:
            first = next(iter(results(value).values()))
            counts.append(f"{name} {len(first.seconds)}")
    if "throughput" in sections:
        for batch, (res, _) in sections["throughput"].items():
            counts.append(f"batch {batch} {len(next(iter(res.values())).seconds)}")
    return ", ".join(counts) or "none"


def estimate_lines(
    res: dict[str, Result], epochs: int, train_images: int, test_images: int
) -> list[str]:
    lines = []
    evaluation = res["student evaluation forward"].images_per_second
    for name, r in res.items():
        if not name.startswith("c100_resnet50_mbv2 step"):
            continue
        seconds = epochs * (train_images / r.images_per_second + test_images / evaluation)
        lines.append(
            f"- estimated full run ({epochs} epochs × {train_images} training + {test_images} "
            f"test images), {name.removeprefix('c100_resnet50_mbv2 step, ')}: "
            f"{seconds / 3600:.1f} h"
        )
    return lines


def _command(args: argparse.Namespace) -> str:
    return "python -m gompertz_kd.bench " + " ".join(args.argv)


def write_report(path: Path, body: str) -> None:
    """Put ``body`` between the markers in ``path`` (created with just the markers if missing),
    leaving the hand-written text around them alone."""
    block = f"{MARK_START}\n{body.rstrip()}\n{MARK_END}"
    text = path.read_text() if path.exists() else f"# Benchmarks\n\n{MARK_START}\n{MARK_END}\n"
    if MARK_START in text and MARK_END in text:
        head, rest = text.split(MARK_START, 1)
        tail = rest.split(MARK_END, 1)[1]
        text = head + block + tail
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


# ---------------------------------------------------------------------------------- main
def _population(args: argparse.Namespace, setup: Setup, memory: list) -> list[PopulationRow]:
    """The population section: ``--population`` at ``--population-sizes`` on this pair, or the
    standard cases (:data:`~gompertz_kd.bench_population.POPULATION_CASES`) each on its pair."""
    if args.population:
        sizes = tuple(int(k) for k in args.population_sizes.split(",") if k)
        compared = {int(k) for k in args.population_singles.split(",") if k}
        case = PopulationCase(
            setup.teacher, setup.student, setup.num_classes, args.population, sizes
        )
        rows = []
        for size in sizes:
            _progress(f"population {args.population}, K={size}")
            rows += population_rows(
                setup, case, [size], args.repeats, args.warmup, args.train_images, memory,
                compare=size in compared,
            )  # fmt: skip
        return rows
    rows = []
    for case in POPULATION_CASES:
        _progress(f"population {case.population}, {case.teacher} -> {case.student}")
        pair = Setup(
            teacher=case.teacher,
            student=case.student,
            num_classes=case.num_classes,
            batch=setup.batch,
            device=setup.device,
            precision=setup.precision,
            channels_last=setup.channels_last,
            teacher_ckpt=None,
            gm_every=setup.gm_every,
        )
        pair.deadline = setup.deadline
        rows += population_rows(
            pair, case, case.sizes, args.repeats, args.warmup, args.train_images, memory
        )
    return rows


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m gompertz_kd.bench", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--teacher", default="ResNet50")
    parser.add_argument("--student", default="MobileNetV2")
    parser.add_argument("--num-classes", type=int, default=100)
    parser.add_argument("--teacher-ckpt", default=None, help="trained teacher weights")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument(
        "--batches", default=None, help="throughput section: comma-separated batch sizes"
    )
    parser.add_argument("--precision", choices=PRECISIONS, default="32-true")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-channels-last", action="store_true")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--gm-every", type=int, default=4)
    parser.add_argument("--fd-steps", default="1e-1,1e-2,1e-3,1e-4")
    parser.add_argument("--data-batches", type=int, default=20, help="batches per data timing")
    parser.add_argument("--workers", default="0,2", help="per-image DataLoader worker counts")
    parser.add_argument(
        "--sections",
        default=",".join(DEFAULT_SECTIONS),
        help=f"comma-separated, from {','.join(SECTIONS)} (default: all but throughput)",
    )
    parser.add_argument(
        "--methods",
        default="",
        help="methods section: comma-separated conf/method names (default: every one but "
        f"{STUDENT_METHOD}; {BASELINE_METHOD}, the baseline, always runs)",
    )
    parser.add_argument(
        "--population",
        default=None,
        help="population section: a conf/population name timed on the pair above at "
        "--population-sizes (default: the cases of bench_population.POPULATION_CASES, each on "
        "its own pair)",
    )
    parser.add_argument(
        "--population-sizes", default="1,6", help="with --population: member counts K to time"
    )
    parser.add_argument(
        "--population-singles",
        default="6",
        help="with --population: the largest K also timed as single steps (the ratio)",
    )
    parser.add_argument("--compile", action="store_true", help="run the torch.compile parts")
    parser.add_argument("--epochs", type=int, default=240)
    parser.add_argument(
        "--train-images",
        type=int,
        default=50_000,
        help="training-set size: of the full-run estimate, and of the methods' per-image "
        "memories (CRD's banks)",
    )
    parser.add_argument("--test-images", type=int, default=10_000)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument(
        "--budget",
        type=float,
        default=0,
        help="seconds; on a loaded machine sections then run fewer rounds (at least 3) to "
        "finish in about this time (0: always --repeats)",
    )
    parser.add_argument("--output", default=None, help="markdown file to write the report into")
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    sections = tuple(s for s in args.sections.split(",") if s)
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}; choose from {SECTIONS}")
    if "compile" in sections and not args.compile:
        sections = tuple(s for s in sections if s != "compile")
    args.section_list = sections
    args.method_list = [m for m in args.methods.split(",") if m]
    try:
        method_names(args.method_list)
    except ValueError as error:
        parser.error(str(error))
    return args


def main(argv: Sequence[str] | None = None) -> str:
    """Run the benchmark; print the report and return it (also written to ``--output``)."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    start, load_before = time.perf_counter(), os.getloadavg()[0]
    device = torch.device(args.device)
    setup = Setup(
        teacher=args.teacher,
        student=args.student,
        num_classes=args.num_classes,
        batch=args.batch,
        device=device,
        precision=args.precision,
        channels_last=not args.no_channels_last,
        teacher_ckpt=args.teacher_ckpt,
        gm_every=args.gm_every,
    )
    sections: dict[str, Any] = {}
    memory: list[tuple[Result, Callable[[], Any]]] = []  # probed after every timing
    with tempfile.TemporaryDirectory() as scratch_dir, _quiet_lightning():
        scratch = Path(scratch_dir)

        def budget(share: float) -> None:
            setup.deadline = start + share * args.budget if args.budget else None

        if "steps" in args.section_list:
            budget(0.45)
            _progress("steps")
            results = steps_section(setup, args.repeats, args.warmup, scratch, memory)
            sections["steps"] = (results, ratios(results, setup.gm_every))
            sections["checkpoint"] = checkpoint_cost(setup, scratch, results)
        if "methods" in args.section_list:
            budget(0.6)
            _progress("methods")
            sections["methods"] = methods_section(
                setup, args.repeats, args.warmup, args.train_images, memory, args.method_list
            )
        if "population" in args.section_list:
            budget(0.7)
            sections["population"] = _population(args, setup, memory)
        if "accuracy" in args.section_list:
            _progress("accuracy")
            fd_steps = [float(s) for s in args.fd_steps.split(",") if s]
            sections["accuracy"] = accuracy_section(setup, fd_steps)
        if "data" in args.section_list:
            budget(0.65)
            _progress("data")
            workers = [int(w) for w in args.workers.split(",") if w]
            sections["data"] = data_section(setup, args.repeats, args.data_batches, workers)
        if "compile" in args.section_list:
            budget(0.85)
            _progress("compile")
            sections["compile"] = compile_section(setup, args.repeats, memory)
        if "throughput" in args.section_list:
            sections["throughput"] = {}
            modules = throughput_modules(setup, args.compile)
            budget(0.9)
            for batch in [int(b) for b in (args.batches or str(args.batch)).split(",")]:
                _progress(f"throughput, batch {batch}")
                setup.batch = batch
                res = throughput_section(setup, args.repeats, modules, scratch, memory)
                estimate = estimate_lines(res, args.epochs, args.train_images, args.test_images)
                sections["throughput"][batch] = (res, estimate)
                print("\n".join(results_table(res) + estimate), flush=True)
        if memory:
            _progress("peak memory")
            probe = PeakMemory(device)
            for result, fn in memory:
                result.peak_mib = probe(fn)
    steps = sections.get("steps")
    sections["targets"] = targets(
        steps[0] if steps else None,
        steps[1] if steps else None,
        sections.get("data"),
        sections.get("compile"),
        setup,
    )
    report = render(
        args, setup, sections, (load_before, os.getloadavg()[0]), time.perf_counter() - start
    )
    print(report)
    if args.output:
        write_report(Path(args.output), report)
    return report


def _progress(section: str) -> None:
    print(f"[bench] {section} (load average {os.getloadavg()[0]:.2f})", file=sys.stderr, flush=True)


@contextlib.contextmanager
def _quiet_lightning() -> Iterator[None]:
    """Lightning's start-up chatter would bury the report (one Trainer per timed round)."""
    import logging
    import warnings

    loggers = [logging.getLogger(n) for n in ("lightning.pytorch", "lightning.fabric")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", module="lightning")
            warnings.filterwarnings("ignore", message=".*does not have many workers.*")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


if __name__ == "__main__":
    main()
