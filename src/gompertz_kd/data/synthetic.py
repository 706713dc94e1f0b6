"""A small generated stand-in for CIFAR in image-folder layout, for smoke runs without the data.

``make_synthetic_folder(root)`` writes ``root/{train,test}/<class>/NNNN.png`` (the layout of
``data.source=folder``): 32x32 noise around one colour per class, so a network learns the task in
a few steps. The images are not CIFAR: accuracies measured on them say nothing about a method.
Notebooks fall back to it when no CIFAR copy is present; the test suite builds its data with it.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

from gompertz_kd.data.sources import CLASSES

__all__ = ["make_synthetic_folder"]


def make_synthetic_folder(
    root: str | os.PathLike,
    dataset: str = "cifar10",
    train_per_class: int = 4,
    test_per_class: int = 2,
    seed: int = 0,
) -> Path:
    """Write ``train_per_class`` training and ``test_per_class`` test PNGs for every class of
    ``dataset`` (``"cifar10"`` or ``"cifar100"``) under ``root`` and return ``root``.

    Class ``k`` has the mean colour ``(25k, 70k, 255 - 25k) mod 256`` with Gaussian noise of
    std 30 per pixel; the same ``seed`` writes the same images.
    """
    if dataset not in CLASSES:
        raise ValueError(f"dataset={dataset!r} is not one of {sorted(CLASSES)}")
    root = Path(root)
    rng = np.random.default_rng(seed)
    for split, count in (("train", train_per_class), ("test", test_per_class)):
        for k, name in enumerate(CLASSES[dataset]):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            base = np.array([(k * 25) % 256, (k * 70) % 256, (255 - k * 25) % 256], dtype=float)
            for i in range(count):
                pixels = np.clip(base + rng.normal(0, 30, size=(32, 32, 3)), 0, 255)
                Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{i:04d}.png")
    return root
