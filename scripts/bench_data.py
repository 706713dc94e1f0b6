"""Images per second of each CIFARDataModule path, against the training speed of a small student.

    .venv/bin/python scripts/bench_data.py [--root data/cifar10-jpeg] [--batch-size 64]

Measures, on this machine:

1. the data paths alone: the per-image torchvision-v2 path with 0, 1 and 2 workers, and the tensor
   path (``on_device=True``), each with ``augment="standard"``;
2. one SGD training step of a small student (``resnet8``) on random batches, NCHW and
   channels_last;
3. both together, a data path feeding the training step, which is what a run sees: on a small CPU
   the per-image workers take cores from the training threads.

Data: the real CIFAR-10 copy in image-folder layout (``--root``, default
``$GOMPERTZ_KD_CIFAR10_FOLDER`` or ``data/cifar10-jpeg``) when it is there, else synthetic uint8
images (said in the output). Every number is the median of ``--repeats`` timed runs after a warm-up;
the candidates of each section are timed round-robin, so load from other processes (the load
average is printed) spreads over all of them rather than skewing one.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.nn.functional as F

from gompertz_kd.data import CIFARDataModule
from gompertz_kd.models import create_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    default_root = os.environ.get("GOMPERTZ_KD_CIFAR10_FOLDER", "data/cifar10-jpeg")
    parser.add_argument("--root", default=default_root)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--batches", type=int, default=60, help="batches per timed run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--student", default="resnet8")
    args = parser.parse_args()

    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"torch {torch.__version__}, {torch.get_num_threads()} compute threads"
    )
    print(f"load average before: {os.getloadavg()[0]:.2f} (other processes skew the numbers)")
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(args.root)
        if (root / "train").is_dir():
            print(f"data: real CIFAR-10 folder copy at {root}")
        else:
            print(f"data: SYNTHETIC uint8 images ({root} not found)")
            root = _synthetic_folder(Path(scratch))
        bench = _Bench(args.batches, args.repeats, args.batch_size)

        def datamodule(on_device: bool, num_workers: int = 0) -> CIFARDataModule:
            dm = CIFARDataModule(
                "cifar10", root=root, source="folder", batch_size=args.batch_size,
                num_workers=num_workers, on_device=on_device, cache_dir=Path(scratch) / "cache",
            )  # fmt: skip
            dm.setup("fit")
            return dm

        paths = {f"per-image v2, num_workers={w}": (False, w) for w in (0, 1, 2)}
        paths["tensor path (on_device=True)"] = (True, 0)
        loaders = {
            name: _forever(datamodule(on_device, workers).train_dataloader())
            for name, (on_device, workers) in paths.items()
        }

        print(f"\n[1] data path alone (augment='standard', batch {args.batch_size}), images/s")
        bench.report({name: lambda b=batches: next(b) for name, batches in loaders.items()})

        print(f"\n[2] training step of {args.student} (SGD, random batches), images/s")
        images = torch.randn(args.batch_size, 3, 32, 32)
        labels = torch.randint(0, 10, (args.batch_size,))
        steps = {fmt: _train_step(args.student, fmt == "channels_last") for fmt in _FORMATS}
        step_rates = bench.report(
            {fmt: lambda s=step: s(images, labels) for fmt, step in steps.items()}
        )

        fastest = max(step_rates, key=step_rates.get)
        print(f"\n[3] data path feeding the {args.student} step ({fastest}, the faster), images/s")
        step = steps[fastest]
        bench.report({name: lambda b=batches: step(*next(b)) for name, batches in loaders.items()})
    print(f"\nload average after: {os.getloadavg()[0]:.2f}")


_FORMATS = ("NCHW", "channels_last")


class _Bench:
    def __init__(self, batches: int, repeats: int, batch_size: int) -> None:
        self.batches, self.repeats, self.batch_size = batches, repeats, batch_size

    def report(self, candidates: dict[str, Callable[[], object]]) -> dict[str, float]:
        """Print and return the median images/s of each candidate (one batch per call).

        Each is warmed up for ``batches`` calls; the timed runs then go round-robin, so a burst
        of load from elsewhere does not land on one candidate only.
        """
        for fn in candidates.values():
            for _ in range(self.batches):
                fn()
        rates: dict[str, list[float]] = {name: [] for name in candidates}
        for _ in range(self.repeats):
            for name, fn in candidates.items():
                start = time.perf_counter()
                for _ in range(self.batches):
                    fn()
                rates[name].append(self.batches * self.batch_size / (time.perf_counter() - start))
        medians = {name: statistics.median(r) for name, r in rates.items()}
        for name, rate in medians.items():
            print(f"  {name:34s} {rate:9.0f}")
        return medians


def _forever(loader) -> Iterator:
    while True:
        yield from loader


def _train_step(student: str, channels_last: bool) -> Callable:
    model = create_model(student, num_classes=10).train()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)

    def step(images: torch.Tensor, labels: torch.Tensor) -> None:
        loss = F.cross_entropy(model(images.contiguous(memory_format=fmt)), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def _synthetic_folder(scratch: Path, per_class: int = 500) -> Path:
    """A CIFAR-10-shaped folder of random PNGs (only used when the real copy is absent)."""
    from PIL import Image

    from gompertz_kd.data import CLASSES

    generator = torch.Generator().manual_seed(0)
    for split, count in (("train", per_class), ("test", per_class // 5)):
        for name in CLASSES["cifar10"]:
            folder = scratch / split / name
            folder.mkdir(parents=True)
            images = torch.randint(
                0, 256, (count, 3, 32, 32), dtype=torch.uint8, generator=generator
            )
            for i, image in enumerate(images):
                Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / f"{i:04d}.png")
    return scratch


if __name__ == "__main__":
    main()
