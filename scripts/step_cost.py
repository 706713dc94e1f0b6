"""Time one training step of each objective variant, side by side in one process.

    .venv/bin/python scripts/step_cost.py --teacher ResNet50 --student MobileNetV2 --batch 32

Prints the median wall time (after warm-up) of: teacher forward alone, student step alone, and a
training step (forward, backward, SGD update) of CE+KD, +Wasserstein, +gradient matching and the
full objective, each also as a multiple of the CE+KD step. Variants are interleaved round-robin so
that load from other processes on a shared machine hits them alike.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from gompertz_kd.module import DistillationModule

VARIANTS = {
    "student alone": {"teacher": None},
    "CE+KD": {},
    "CE+KD+WD": {"wd_scale": 1.0},
    "CE+KD+GM": {"gm_scale": 1.0},
    "full (KD+WD+GM)": {"wd_scale": 1.0, "gm_scale": 1.0},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default="ResNet50")
    parser.add_argument("--student", default="MobileNetV2")
    parser.add_argument("--num-classes", type=int, default=100)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--channels-last", action="store_true")
    args = parser.parse_args()

    torch.manual_seed(0)
    images = torch.randn(args.batch, 3, 32, 32)
    targets = torch.randint(0, args.num_classes, (args.batch,))
    modules, optimizers = {}, {}
    for name, overrides in VARIANTS.items():
        kwargs = dict(
            student=args.student,
            teacher=args.teacher,
            num_classes=args.num_classes,
            channels_last=args.channels_last,
        )
        kwargs.update(overrides)
        module = DistillationModule(**kwargs)
        module.train()
        module.set_progress(0.5)
        modules[name] = module
        optimizers[name] = module.configure_optimizers()["optimizer"]

    teacher = modules["CE+KD"].teacher
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    teacher_input = images.contiguous(memory_format=fmt)

    def teacher_forward() -> None:
        with torch.no_grad():
            teacher(teacher_input)

    def step(name: str):
        def run() -> None:
            module, optimizer = modules[name], optimizers[name]
            optimizer.zero_grad(set_to_none=True)
            _, terms, _ = module.compute_losses(images, targets)
            module.weighted_total(terms).backward()
            optimizer.step()

        return run

    jobs = {"teacher forward (no grad)": teacher_forward, **{n: step(n) for n in VARIANTS}}
    for _ in range(args.warmup):
        for job in jobs.values():
            job()
    times: dict[str, list[float]] = {n: [] for n in jobs}
    for _ in range(args.repeats):
        for name, job in jobs.items():
            start = time.perf_counter()
            job()
            times[name].append(time.perf_counter() - start)

    print(
        f"# {args.teacher} -> {args.student}, {args.num_classes} classes, batch {args.batch}, fp32, "
        f"channels_last={args.channels_last}"
    )
    print(
        f"# torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}"
    )
    kd = statistics.median(times["CE+KD"])
    print(f"{'variant':28s} {'median s':>9s} {'spread s':>9s} {'x CE+KD':>8s} {'img/s':>8s}")
    for name, values in times.items():
        med = statistics.median(values)
        spread = max(values) - min(values)
        print(f"{name:28s} {med:9.3f} {spread:9.3f} {med / kd:8.2f} {args.batch / med:8.1f}")


if __name__ == "__main__":
    main()
