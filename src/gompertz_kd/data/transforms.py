"""CIFAR augmentation, two ways that draw from the same distribution.

* Per image, :func:`image_transform`: a torchvision-v2 pipeline applied to one uint8 ``(3, 32, 32)``
  tensor at a time (in DataLoader workers). It offers every policy, AutoAugment and RandAugment
  included.
* Batched, :class:`BatchTransform`: crop, flip, Cutout and normalisation done on a whole uint8
  batch ``(N, 3, 32, 32)`` in a handful of tensor ops on whatever device holds it, with no Python
  per image: the technique of the fastest CIFAR trainers. It offers ``none``, ``standard`` and
  ``cutout``.

The ``augment`` names:

* ``none``: normalisation only (also what validation and test use);
* ``standard``: the KD benchmark's: pad 4 pixels with zeros, crop 32x32 at a uniformly random
  offset, flip horizontally with probability 1/2;
* ``cutout``: ``standard`` then Cutout (DeVries & Taylor, 2017): after normalisation, zero a
  16x16 square (8x8 for CIFAR-100, the paper's sizes) centred on a uniformly random pixel and
  clipped at the border;
* ``autoaugment``: ``standard`` then AutoAugment with its CIFAR-10 policy (per image only);
* ``randaugment``: ``standard`` then RandAugment, 2 ops at magnitude 9 (per image only).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.transforms import v2

__all__ = [
    "AUGMENTS",
    "BATCHED_AUGMENTS",
    "CUTOUT_SIZE",
    "MEAN_STD",
    "PADDING",
    "BatchTransform",
    "Cutout",
    "batch_transform",
    "cutout_mask",
    "image_transform",
    "normalize",
    "random_crop_flip",
]

AUGMENTS = ("none", "standard", "cutout", "autoaugment", "randaugment")
BATCHED_AUGMENTS = ("none", "standard", "cutout")

# Per-channel mean and std of each training set (RGB, pixels scaled to [0, 1]), as the CIFAR KD
# benchmark normalises them (CRD/RepDistiller and mdistiller, dataset/cifar100.py; CIFAR-10 as in
# their CIFAR-10 loaders), so our runs see exactly the benchmark's inputs. The exact CIFAR-100
# statistics, (0.5071, 0.4865, 0.4409) / (0.2673, 0.2564, 0.2762), differ by under 3e-4.
MEAN_STD: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)),
}
PADDING = 4
# DeVries & Taylor (2017), "Improved Regularization of Convolutional Neural Networks with Cutout".
CUTOUT_SIZE = {"cifar10": 16, "cifar100": 8}


def image_transform(dataset: str, augment: str = "none") -> v2.Compose:
    """The per-image pipeline: uint8 ``(3, 32, 32)`` tensor -> normalised float32 ``(3, 32, 32)``.

    Random draws use torch's global RNG (seeded per DataLoader worker).
    """
    _check_augment(augment)
    mean, std = MEAN_STD[dataset]
    steps: list[nn.Module] = []
    if augment != "none":
        steps += [v2.RandomCrop(32, padding=PADDING), v2.RandomHorizontalFlip()]
    if augment == "autoaugment":
        steps.append(v2.AutoAugment(v2.AutoAugmentPolicy.CIFAR10))
    elif augment == "randaugment":
        steps.append(v2.RandAugment(num_ops=2, magnitude=9))
    steps += [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
    if augment == "cutout":
        steps.append(Cutout(CUTOUT_SIZE[dataset]))
    return v2.Compose(steps)


class Cutout(nn.Module):
    """Zero a ``size`` x ``size`` square centred on a uniformly random pixel of a ``(C, H, W)``
    tensor, clipped at the border, as DeVries & Taylor's code does. (``v2.RandomErasing`` keeps its
    patch inside the image, so it erases border pixels less often: a different distribution.)"""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    def forward(self, image: Tensor) -> Tensor:
        height, width = image.shape[-2:]
        cy = torch.randint(height, (1,))
        cx = torch.randint(width, (1,))
        mask = cutout_mask(cy, cx, self.size, height, width)[0]
        return image.masked_fill(mask, 0.0)


@dataclass(frozen=True)
class BatchTransform:
    """Batched augmentation + normalisation: uint8 ``(N, 3, H, W)`` -> float32 ``(N, 3, H, W)``.

    Attributes:
        mean, std: per-channel normalisation constants (pixels scaled to [0, 1]).
        padding: zero padding before the random ``H`` x ``W`` crop; 0 = no crop.
        flip: mirror each image with probability 1/2.
        cutout_size: side of the Cutout square; 0 = no Cutout.
    """

    mean: tuple[float, ...]
    std: tuple[float, ...]
    padding: int = 0
    flip: bool = False
    cutout_size: int = 0

    def __call__(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """All random draws come from ``generator`` (on ``images.device``), none from global RNG."""
        if self.padding or self.flip:
            images = random_crop_flip(images, self.padding, self.flip, generator)
        out = normalize(images, self.mean, self.std)
        if self.cutout_size:
            n, _, height, width = images.shape
            cy = torch.randint(height, (n,), generator=generator, device=images.device)
            cx = torch.randint(width, (n,), generator=generator, device=images.device)
            out.masked_fill_(cutout_mask(cy, cx, self.cutout_size, height, width), 0.0)
        return out


def batch_transform(dataset: str, augment: str = "none") -> BatchTransform:
    """The batched equivalent of :func:`image_transform` (same distribution of outputs).

    Raises:
        ValueError: ``augment`` has no batched form (AutoAugment, RandAugment).
    """
    _check_augment(augment)
    if augment not in BATCHED_AUGMENTS:
        raise ValueError(
            f"augment={augment!r} runs per image only, not on the batched tensor path: set "
            f"on_device=False (or leave it None), or pick one of {BATCHED_AUGMENTS}"
        )
    mean, std = MEAN_STD[dataset]
    augmented = augment != "none"
    return BatchTransform(
        mean,
        std,
        padding=PADDING if augmented else 0,
        flip=augmented,
        cutout_size=CUTOUT_SIZE[dataset] if augment == "cutout" else 0,
    )


def random_crop_flip(
    images: Tensor, padding: int, flip: bool = True, generator: torch.Generator | None = None
) -> Tensor:
    """Per image: crop ``H`` x ``W`` from the zero-padded ``(N, C, H, W)`` batch at an offset
    uniform in ``[0, 2 * padding]`` on each axis, then (if ``flip``) mirror with probability 1/2.
    One gather does both, so the cost does not depend on how many offsets occur."""
    n, c, height, width = images.shape
    device = images.device
    padded = F.pad(images, (padding, padding, padding, padding))
    padded_width = width + 2 * padding
    dy = torch.randint(2 * padding + 1, (n, 1, 1), generator=generator, device=device)
    dx = torch.randint(2 * padding + 1, (n, 1, 1), generator=generator, device=device)
    rows = torch.arange(height, device=device).view(1, height, 1) + dy
    cols = torch.arange(width, device=device).view(1, 1, width).expand(n, 1, width)
    if flip:
        mirrored = torch.rand((n, 1, 1), generator=generator, device=device) < 0.5
        cols = torch.where(mirrored, width - 1 - cols, cols)
    index = (rows * padded_width + cols + dx).view(n, 1, height * width)
    return padded.flatten(2).gather(2, index.expand(n, c, -1)).view(n, c, height, width)


def normalize(images: Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> Tensor:
    """uint8 ``(N, C, H, W)`` -> float32 ``(images / 255 - mean) / std``."""
    scale, shift = _affine(tuple(mean), tuple(std), images.device)
    return images.float().mul_(scale).sub_(shift)


@functools.lru_cache(maxsize=32)
def _affine(mean: tuple[float, ...], std: tuple[float, ...], device: torch.device):
    # cached so that a GPU batch does not copy these constants to the device each time
    scale = torch.tensor([1 / (255 * s) for s in std], device=device).view(1, -1, 1, 1)
    shift = torch.tensor([m / s for m, s in zip(mean, std, strict=True)], device=device)
    return scale, shift.view(1, -1, 1, 1)


def cutout_mask(cy: Tensor, cx: Tensor, size: int, height: int, width: int) -> Tensor:
    """Boolean ``(N, 1, H, W)`` mask of the ``size`` x ``size`` squares centred on ``(cy, cx)``
    (each ``(N,)``): rows ``[cy - size // 2, cy + size - size // 2)``, clipped at the border."""
    rows = torch.arange(height, device=cy.device).view(1, height, 1)
    cols = torch.arange(width, device=cx.device).view(1, 1, width)
    top = (cy - size // 2).view(-1, 1, 1)
    left = (cx - size // 2).view(-1, 1, 1)
    inside = (rows >= top) & (rows < top + size) & (cols >= left) & (cols < left + size)
    return inside.unsqueeze(1)


def _check_augment(augment: str) -> None:
    if augment not in AUGMENTS:
        raise ValueError(f"augment={augment!r} is not one of {AUGMENTS}")
