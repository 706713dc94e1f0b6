"""The two ways batches are made from an in-memory split, and how each rank picks its share.

* :class:`ImageDataset` in a :class:`ResumableDataLoader`: the classic path, one image at a time
  through a torchvision-v2 pipeline, optionally in worker processes.
* :class:`TensorBatchLoader`: the fast path. The whole split is one uint8 tensor on the training
  device; each batch is gathered from it by index and augmented in a few batched tensor ops, so it
  needs no workers and no host-to-device copies.

Both take their indices from a ``DistributedSampler`` (rank ``r`` of ``w`` gets every ``w``-th
index of a permutation seeded by ``seed + epoch``, the same on every rank), so the two paths visit
the images in the same order, and Lightning, which sees a ``DistributedSampler`` already in place,
injects none of its own. With ``with_indices=True`` both also yield those sampler indices, each
image's position in the split, as a third element of every batch (what CRD's memory bank keys on).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler, get_worker_info

from gompertz_kd.data.sources import ImageArrays
from gompertz_kd.data.transforms import BatchTransform

__all__ = [
    "EpochSampler",
    "ImageDataset",
    "ResumableDataLoader",
    "TensorBatchLoader",
    "collate",
    "mix_seed",
]


def mix_seed(*values: int) -> int:
    """A well-mixed 63-bit seed from several integers (seed, rank, epoch, ...)."""
    return int(np.random.SeedSequence(list(values)).generate_state(1, np.uint64)[0] >> 1)


class EpochSampler(DistributedSampler):
    """``DistributedSampler`` that also moves to the next epoch by itself after each pass.

    Lightning calls ``set_epoch`` before every epoch, which gives the same numbers; the automatic
    step keeps a plain ``for epoch ...: for batch in loader`` loop from repeating one order.

    With ``tag=True`` it yields ``(epoch, position, index)`` instead of ``index``, so that
    :class:`ImageDataset` can seed each batch's augmentation from where the batch sits in the
    epoch. :meth:`resume` makes the pass of a given epoch leave out its first positions; it is
    applied when that pass starts, which a ``DataLoader`` does lazily, at its first batch.
    ``pass_epoch`` is the epoch of the pass in progress (or of the next one, before any).
    """

    def __init__(self, *args: Any, tag: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.tag = tag
        self.pass_epoch = self.epoch
        self._resume: tuple[int, int] | None = None

    def resume(self, epoch: int, positions: int) -> None:
        """Start the pass of ``epoch`` after its first ``positions`` indices."""
        self._resume = (epoch, positions)

    def __iter__(self) -> Iterator[Any]:
        indices = list(super().__iter__())
        epoch = self.pass_epoch = self.epoch
        self.epoch += 1
        skip = 0
        if self._resume is not None and self._resume[0] == epoch:
            skip = self._resume[1]
        self._resume = None
        if self.tag:
            return iter([(epoch, pos, i) for pos, i in enumerate(indices) if pos >= skip])
        return iter(indices[skip:])


class ImageDataset(Dataset):
    """One split with a per-image transform: ``dataset[i] = (transform(images[i]), labels[i])``,
    or ``(transform(images[i]), labels[i], i)`` (``i`` an int64 0-d tensor) with ``with_indices``.

    The DataLoader fetches a batch at a time through ``__getitems__``. Keys tagged by
    :class:`EpochSampler` (``tag=True``), ``(epoch, position, index)``, seed the batch's random
    draws from ``(seed, epoch, position of its first image)``: a batch is the same whichever
    process makes it (any ``num_workers``) and whether or not the run was resumed before it. Plain
    indices draw from this dataset's own RNG stream in the main process (seeded by ``seed``,
    swapped in around each batch, the global RNG untouched) or from the worker's RNG in a worker.
    """

    def __init__(
        self, arrays: ImageArrays, transform, seed: int = 0, with_indices: bool = False
    ) -> None:
        self.arrays = arrays
        self.transform = transform
        self.seed = seed
        self.with_indices = with_indices
        self._rng_state = torch.Generator().manual_seed(seed).get_state()

    def __len__(self) -> int:
        return len(self.arrays)

    def __getitem__(self, index: int) -> tuple[Tensor, ...]:
        image = self.transform(self.arrays.images[index]).as_subclass(Tensor)
        if self.with_indices:
            return image, self.arrays.labels[index], torch.as_tensor(index, dtype=torch.int64)
        return image, self.arrays.labels[index]

    def __getitems__(self, keys: Sequence[Any]) -> list[tuple[Tensor, ...]]:
        if keys and isinstance(keys[0], tuple):
            epoch, position, _ = keys[0]
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(mix_seed(self.seed, epoch, position))
                return [self[index] for _, _, index in keys]
        with self._own_rng():
            return [self[i] for i in keys]

    @contextmanager
    def _own_rng(self):
        if get_worker_info() is not None:
            yield
            return
        outer = torch.get_rng_state()
        torch.set_rng_state(self._rng_state)
        try:
            yield
        finally:
            self._rng_state = torch.get_rng_state()
            torch.set_rng_state(outer)


class ResumableDataLoader(DataLoader):
    """The per-image path's ``DataLoader``, resumable mid-epoch like :class:`TensorBatchLoader`.

    It needs an :class:`EpochSampler` with ``tag=True`` over an :class:`ImageDataset`, whose
    augmentation is then a function of ``(seed, epoch, position)``; :meth:`state_dict` records
    how many batches of the epoch training has used, and after :meth:`load_state_dict` the
    next pass of that epoch starts right after them (nothing is decoded twice).

    Args:
        consumed_batches: the trainer's count of batches used in the current epoch.
        Everything else: as :class:`torch.utils.data.DataLoader`.
    """

    def __init__(
        self, *args: Any, consumed_batches: Callable[[], int] | None = None, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        if not isinstance(self.sampler, EpochSampler) or not self.sampler.tag:
            raise TypeError("ResumableDataLoader needs an EpochSampler(..., tag=True)")
        self.consumed_batches = consumed_batches

    def state_dict(self) -> dict[str, int]:
        """``{"epoch", "batches"}``: where training is in this epoch (saved in checkpoints)."""
        consumed = self.consumed_batches() if self.consumed_batches is not None else 0
        return {"epoch": int(self.sampler.pass_epoch), "batches": int(consumed)}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        batches = int(state_dict["batches"])
        self.sampler.resume(int(state_dict["epoch"]), batches * self.batch_size)


def collate(samples: Sequence[tuple[Tensor, ...]]) -> tuple[Tensor, ...]:
    """Stack ``(image, label)`` pairs, or ``(image, label, index)`` triples, into the tuple
    :class:`TensorBatchLoader` yields."""
    return tuple(torch.stack(column) for column in zip(*samples, strict=True))


class TensorBatchLoader:
    """Finished batches ``(float32 (B, 3, H, W) normalised, int64 (B,))`` on ``device``, or
    ``(images, labels, indices)`` with ``with_indices``.

    Args:
        arrays: the split; its tensors are copied to ``device`` once.
        batch_size: images per batch; the last batch of a pass may be smaller.
        drop_last: drop a last batch smaller than ``batch_size``.
        consumed_batches: how many batches of the current epoch training has used (the trainer's
            count, which excludes batches Lightning prefetched), saved by :meth:`state_dict`.
        transform: batched augmentation and normalisation.
        sampler: which indices this rank visits, in order; ``sampler.epoch`` (read at the start of
            each pass) also seeds the augmentation, with ``seed``.
        seed: seed of the augmentation draws (mix the rank in, so ranks draw differently).
        device: where the split lives and batches are made.
        with_indices: also yield each image's position in ``arrays``, int64 ``(B,)`` on
            ``device`` (the sampler's indices, so fixed per image whatever the order or rank).

    The augmentation of a pass is a function of ``(seed, sampler.epoch)`` alone, so an epoch is
    reproduced exactly, also after resuming.
    """

    # Lightning reads these like a DataLoader's: ``sampler.set_epoch`` each epoch, both to tell
    # whether a loader shuffles.
    sampler: DistributedSampler
    batch_sampler = None

    def __init__(
        self,
        arrays: ImageArrays,
        batch_size: int,
        transform: BatchTransform,
        sampler: DistributedSampler,
        seed: int = 0,
        device: torch.device | str = "cpu",
        drop_last: bool = False,
        consumed_batches: Callable[[], int] | None = None,
        with_indices: bool = False,
    ) -> None:
        self.device = torch.device(device)
        self.drop_last = drop_last
        self.consumed_batches = consumed_batches
        self._resume: dict[str, int] | None = None
        self._epoch = sampler.epoch
        self.images = arrays.images.to(self.device)
        self.labels = arrays.labels.to(self.device)
        self.batch_size = batch_size
        self.transform = transform
        self.sampler = sampler
        self.seed = seed
        self.with_indices = with_indices

    def __len__(self) -> int:
        if self.drop_last:
            return len(self.sampler) // self.batch_size
        return math.ceil(len(self.sampler) / self.batch_size)

    def __iter__(self) -> Iterator[tuple[Tensor, ...]]:
        # the sampler moves its own epoch on once iterated: remember the one this pass uses
        epoch = self._epoch = self.sampler.epoch
        skip = 0
        if self._resume is not None and self._resume["epoch"] == epoch:
            skip = self._resume["batches"]
        self._resume = None
        order = torch.tensor(list(self.sampler), dtype=torch.int64, device=self.device)
        generator = torch.Generator(self.device).manual_seed(mix_seed(self.seed, epoch))
        for number, index in enumerate(order.split(self.batch_size)):
            if self.drop_last and len(index) < self.batch_size:
                break
            with _one_cpu_thread(self.device):
                # batches already trained on before a resume are drawn (so the augmentation
                # generator advances exactly as it did) but not yielded
                batch = self.transform(self.images[index], generator), self.labels[index]
            if number >= skip:
                yield (*batch, index) if self.with_indices else batch

    def state_dict(self) -> dict[str, int]:
        """Where training is in this epoch: ``{"epoch", "batches"}`` (batches already trained on).

        Lightning saves this in every checkpoint; with :meth:`load_state_dict` a run resumed from
        a checkpoint taken mid-epoch sees exactly the rest of that epoch's batches."""
        consumed = self.consumed_batches() if self.consumed_batches is not None else 0
        return {"epoch": int(self._epoch), "batches": int(consumed)}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self._resume = {"epoch": int(state_dict["epoch"]), "batches": int(state_dict["batches"])}


@contextmanager
def _one_cpu_thread(device: torch.device):
    """Make a batch on the CPU with one intra-op thread. These ops are too small to gain from
    more, and on a small VM waking the other threads costs milliseconds (measured on 2 vCPUs:
    0.3 ms per batch of 64 with one thread, 7 to 16 ms with two)."""
    threads = torch.get_num_threads()
    if device.type != "cpu" or threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
