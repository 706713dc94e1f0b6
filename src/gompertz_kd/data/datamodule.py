"""CIFAR-10 / CIFAR-100 for every experiment: :class:`CIFARDataModule`."""

from __future__ import annotations

import os
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import DataLoader, DistributedSampler

from gompertz_kd.data.loaders import (
    EpochSampler,
    ImageDataset,
    ResumableDataLoader,
    TensorBatchLoader,
    collate,
    mix_seed,
)
from gompertz_kd.data.sources import (
    CLASSES,
    DATASETS,
    ImageArrays,
    check_folder,
    load_folder,
    load_torchvision,
    prepare_torchvision,
)
from gompertz_kd.data.transforms import (
    AUGMENTS,
    BATCHED_AUGMENTS,
    MEAN_STD,
    batch_transform,
    image_transform,
)

__all__ = ["SOURCES", "CIFARDataModule", "stratified_holdout"]

SOURCES = ("torchvision", "folder")


class CIFARDataModule(L.LightningDataModule):
    """CIFAR-10 or CIFAR-100, augmented and normalised, for Lightning.

    Every dataloader yields ``(images, labels)``: float32 ``(N, 3, 32, 32)`` normalised with the
    data set's own mean and std, and int64 ``(N,)`` class indices in CIFAR's canonical order. With
    ``with_indices`` the training loader yields ``(images, labels, indices)`` instead.

    Args:
        dataset: ``"cifar10"`` or ``"cifar100"``.
        root: where the data is. ``source="torchvision"``: the folder holding (or receiving) the
            official archive. ``source="folder"``: the folder holding ``train/`` and ``test/``.
        source: ``"torchvision"`` (the official archive, downloaded by ``prepare_data`` when
            ``download``) or ``"folder"`` (``root/{train,test}/<class>/*.png|jpg``; see
            :mod:`gompertz_kd.data.sources`).
        batch_size: training images per batch and rank.
        eval_batch_size: validation / test images per batch and rank; ``None`` = twice
            ``batch_size`` (evaluation keeps no activations for a backward pass, so it fits).
        num_workers: worker processes of the per-image path (the tensor path uses none). On a
            2-CPU machine 0 was fastest, as workers take cores from training; machines with
            cores to spare, and the heavier AutoAugment / RandAugment, want more.
        val_split: ``0`` validates on the test split, as the KD benchmark does; ``N > 0`` holds out
            ``N`` training images, stratified by class and chosen by ``seed``, unaugmented.
        augment: ``"standard"`` (pad-4 random crop + horizontal flip, the benchmark's),
            ``"none"``, ``"cutout"`` (standard + a 16x16 Cutout, 8x8 on CIFAR-100),
            ``"autoaugment"`` or ``"randaugment"`` (standard + that torchvision-v2 policy). See
            :mod:`gompertz_kd.data.transforms`.
        on_device: ``True``: the tensor path, the whole split held as one uint8 tensor on the
            training device, augmented batched (``none`` / ``standard`` / ``cutout`` only).
            ``False``: the per-image torchvision-v2 path in a DataLoader. ``None``: the tensor path
            where the augmentation has a batched form, on every accelerator. It is the faster on
            GPUs by design, and measured faster on CPUs too (``scripts/bench_data.py``, 2 vCPUs,
            batch 64: 131k images/s against 12k-15k alone; 2530 against at most 2071 images/s
            when feeding a ``resnet8`` training step that alone runs at 2656).
        seed: fixes the validation hold-out, the order of the images each epoch (with the epoch
            number) and the augmentation draws: the same seed gives the same batches.
        pin_memory: pin the per-image path's batches; ``None`` = when training on CUDA.
        download: let ``prepare_data`` download the official archive if it is missing.
        cache_dir: ``source="folder"``: where the decoded images are cached (one ``.npz`` per
            split, rebuilt when a file changes); ``None`` decodes the folder on every load.
            Nothing is written beside the data.
        with_indices: training batches also carry int64 ``(N,)`` ``indices`` (on the labels'
            device): each image's position in the training set, ``0 .. num_train_samples - 1``
            after the ``val_split`` hold-out, fixed per image whatever the epoch, order,
            augmentation, ``num_workers``, rank or resume (for losses that keep per-sample state,
            such as CRD's memory bank). Validation and test batches stay ``(images, labels)``.
            May also be set as an attribute, before the trainer asks for the training loader.

    Under DDP each rank takes a disjoint shard of every epoch: the DataModule passes a
    ``DistributedSampler`` itself (so Lightning injects none), which shuffles with ``seed + epoch``
    the same way on every rank and drops the last ``len % world_size`` images of each epoch's
    permutation rather than repeating some. Validation and test shards are not padded either
    (Lightning's ``UnrepeatedDistributedSampler``): every image is counted exactly once, and ranks
    may run one batch more or less than each other, which is safe because evaluation metrics are
    synchronised only at the end of the epoch.

    Raises:
        ValueError: an unknown ``dataset``, ``source`` or ``augment``, a ``val_split`` out of
            range, ``on_device=True`` with an augmentation that has no batched form, class folders
            that do not match ``dataset``.
        FileNotFoundError: the data is not under ``root`` (with what was looked for and the fix).
    """

    def __init__(
        self,
        dataset: str = "cifar10",
        root: str | os.PathLike = "data",
        source: str = "torchvision",
        batch_size: int = 64,
        eval_batch_size: int | None = None,
        num_workers: int = 2,
        val_split: int = 0,
        augment: str = "standard",
        on_device: bool | None = None,
        seed: int = 0,
        pin_memory: bool | None = None,
        download: bool = True,
        cache_dir: str | os.PathLike | None = None,
        with_indices: bool = False,
    ) -> None:
        super().__init__()
        _check_choice("dataset", dataset, DATASETS)
        _check_choice("source", source, SOURCES)
        _check_choice("augment", augment, AUGMENTS)
        _check_count("batch_size", batch_size, minimum=1)
        if eval_batch_size is not None:
            _check_count("eval_batch_size", eval_batch_size, minimum=1)
        _check_count("num_workers", num_workers, minimum=0)
        _check_count("val_split", val_split, minimum=0)
        if on_device and augment not in BATCHED_AUGMENTS:
            raise ValueError(
                f"on_device=True needs a batched augmentation, one of {BATCHED_AUGMENTS}; "
                f"augment={augment!r} runs per image only: set on_device=False or None"
            )
        self.save_hyperparameters(ignore=["root", "cache_dir"])
        # plain strings in checkpoints, not Path objects
        self.hparams["root"] = str(root)
        self.hparams["cache_dir"] = None if cache_dir is None else str(cache_dir)
        self.cache_dir = None if cache_dir is None else Path(cache_dir)
        self.dataset = dataset
        self.root = Path(root)
        self.source = source
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or 2 * batch_size
        self.num_workers = num_workers
        self.val_split = val_split
        self.augment = augment
        self.on_device = on_device
        self.seed = seed
        self.pin_memory = pin_memory
        self.download = download
        self.with_indices = with_indices
        self.train_arrays: ImageArrays | None = None
        self.val_arrays: ImageArrays | None = None
        self.test_arrays: ImageArrays | None = None
        self._loaded: dict[str, ImageArrays] = {}
        # where loaders built outside a Trainer put their batches (under one: the Trainer's device)
        self.device = torch.device("cpu")

    @classmethod
    def from_arrays(
        cls,
        dataset: str,
        train: ImageArrays,
        test: ImageArrays | None = None,
        device: torch.device | str = "cpu",
        **kwargs,
    ) -> CIFARDataModule:
        """A DataModule over images already in memory (benchmarks, notebooks): ``train`` is the
        training split (``val_split`` still holds out from it), ``test`` the test split; the
        other arguments as for the constructor. Loaders built outside a Trainer put batches on
        ``device``; under a Trainer, on its device."""
        module = cls(dataset, root="<in memory>", source="folder", **kwargs)
        module._loaded = {"train": train, **({"test": test} if test is not None else {})}
        module.device = torch.device(device)
        return module

    @property
    def classes(self) -> tuple[str, ...]:
        return CLASSES[self.dataset]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def mean(self) -> tuple[float, float, float]:
        return MEAN_STD[self.dataset][0]

    @property
    def std(self) -> tuple[float, float, float]:
        return MEAN_STD[self.dataset][1]

    @property
    def with_indices(self) -> bool:
        return self._with_indices

    @with_indices.setter
    def with_indices(self, value: bool) -> None:
        if not isinstance(value, bool):
            raise ValueError(f"with_indices must be True or False, got {value!r}")
        self._with_indices = value
        # set after construction too (by the training code): checkpoints and logs say what ran
        self.hparams["with_indices"] = value

    @property
    def num_train_samples(self) -> int:
        """Images in the training set this module trains on: the training split less the
        ``val_split`` held out (the range of ``indices`` with ``with_indices``).

        Raises:
            RuntimeError: before :meth:`setup` has loaded the training split (``setup("fit")``,
                or ``setup()``); counting without loading could disagree with what is loaded.
        """
        if self.train_arrays is None:
            raise RuntimeError(
                "num_train_samples is known once the training split is loaded: call "
                "prepare_data() and setup('fit') first (trainer.fit calls setup again, which "
                "then keeps what is loaded)"
            )
        return len(self.train_arrays)

    @property
    def uses_tensor_path(self) -> bool:
        """Whether batches come from the tensor path (``on_device`` resolved)."""
        if self.on_device is not None:
            return self.on_device
        return self.augment in BATCHED_AUGMENTS

    def prepare_data(self) -> None:
        """Download / extract the official archive, or build the folder cache (one process per
        node, before :meth:`setup` on every rank)."""
        if {"train", "test"} <= set(self._loaded):  # in memory (from_arrays)
            return
        if self.source == "torchvision":
            prepare_torchvision(self.dataset, self.root, self.download)
        elif self.cache_dir is not None:
            for split in ("train", "test"):
                load_folder(self.dataset, self.root, split, self.cache_dir)
        else:
            check_folder(self.dataset, self.root)

    def setup(self, stage: str | None = None) -> None:
        """Load the splits ``stage`` needs into memory (all of them for ``None``).

        Idempotent: a split already loaded is kept, so calling it before ``trainer.fit`` (which
        calls it again) loads nothing twice and yields the same splits and hold-out. The data
        must be in place by then: call :meth:`prepare_data` first if it may need downloading."""
        if stage in (None, "fit", "validate") and self.val_arrays is None:
            if self.val_split:
                train = self._load("train")
                if self.val_split >= len(train):
                    raise ValueError(
                        f"val_split={self.val_split} must be smaller than the {len(train)} "
                        "training images (0 validates on the test split)"
                    )
                kept, held_out = stratified_holdout(train.labels, self.val_split, self.seed)
                self.train_arrays = train.subset(kept)
                self.val_arrays = train.subset(held_out)
                del self._loaded["train"]  # the subsets are copies; free the full split
            else:
                self.val_arrays = self._load("test")
        if stage in (None, "fit") and self.train_arrays is None:
            self.train_arrays = self._load("train")
        if stage in (None, "test") and self.test_arrays is None:
            self.test_arrays = self._load("test")

    def train_dataloader(self):
        if self.train_arrays is None:
            self.setup("fit")
        return self._loader(self.train_arrays, train=True)

    def val_dataloader(self):
        if self.val_arrays is None:
            self.setup("validate")
        return self._loader(self.val_arrays, train=False)

    def test_dataloader(self):
        if self.test_arrays is None:
            self.setup("test")
        return self._loader(self.test_arrays, train=False)

    def _load(self, split: str) -> ImageArrays:
        if split not in self._loaded:  # the test split may serve as validation split too
            if self.source == "torchvision":
                arrays = load_torchvision(self.dataset, self.root, train=split == "train")
            else:
                arrays = load_folder(self.dataset, self.root, split, self.cache_dir)
            self._loaded[split] = arrays
        return self._loaded[split]

    def _consumed_train_batches(self) -> int:
        """Training batches of the current epoch the trainer has taken (Lightning's own count;
        the loader cannot count them itself because Lightning fetches one batch ahead)."""
        if self.trainer is None:
            return 0
        return self.trainer.fit_loop.epoch_loop.batch_progress.current.ready

    def _placement(self) -> tuple[int, int, torch.device]:
        """(rank, world size, device) from the trainer; one process on ``device`` without one."""
        trainer = self.trainer
        if trainer is None:
            return 0, 1, self.device
        return trainer.global_rank, trainer.world_size, trainer.strategy.root_device

    def _loader(self, arrays: ImageArrays, train: bool):
        rank, world_size, device = self._placement()
        sampler: DistributedSampler
        with_indices = train and self.with_indices
        if train:
            sampler = EpochSampler(
                arrays, num_replicas=world_size, rank=rank, shuffle=True, seed=self.seed,
                drop_last=True, tag=not self.uses_tensor_path,
            )  # fmt: skip
        else:
            sampler = UnrepeatedDistributedSampler(
                arrays, num_replicas=world_size, rank=rank, shuffle=False
            )
        batch_size = self.batch_size if train else self.eval_batch_size
        # A one-image training batch breaks BatchNorm (no variance): drop that batch only.
        drop_last = train and len(sampler) % batch_size == 1
        augment = self.augment if train else "none"
        seed = mix_seed(self.seed, rank)
        if self.uses_tensor_path:
            transform = batch_transform(self.dataset, augment)
            consumed = self._consumed_train_batches if train else None
            return TensorBatchLoader(
                arrays, batch_size, transform, sampler, seed, device, drop_last,
                consumed_batches=consumed, with_indices=with_indices,
            )  # fmt: skip
        pin_memory = device.type == "cuda" if self.pin_memory is None else self.pin_memory
        loader_args = dict(
            batch_size=batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            collate_fn=collate,
            drop_last=drop_last,
            pin_memory=pin_memory,
            persistent_workers=self.num_workers > 0,
            generator=torch.Generator().manual_seed(seed),
        )
        dataset = ImageDataset(arrays, image_transform(self.dataset, augment), seed, with_indices)
        if train:
            return ResumableDataLoader(
                dataset, consumed_batches=self._consumed_train_batches, **loader_args
            )
        return DataLoader(dataset, **loader_args)


def stratified_holdout(
    labels: torch.Tensor, count: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split indices into ``(kept, held_out)`` with ``count`` held out, each class in proportion
    to its share of ``labels`` (largest remainder, so the total is exact), drawn with ``seed``.
    Both index tensors are sorted."""
    counts = torch.bincount(labels)
    quota = counts.double() * count / len(labels)
    take = quota.floor().long()
    remainder = count - int(take.sum())
    if remainder:
        # stable sort: ties go to the lower class index
        order = torch.sort(quota - take, descending=True, stable=True).indices
        take[order[:remainder]] += 1
    generator = torch.Generator().manual_seed(seed)
    held_out = []
    for label, n in enumerate(take.tolist()):
        members = (labels == label).nonzero().flatten()
        held_out.append(members[torch.randperm(len(members), generator=generator)[:n]])
    held = torch.cat(held_out).sort().values
    mask = torch.ones(len(labels), dtype=torch.bool)
    mask[held] = False
    return mask.nonzero().flatten(), held


def _check_choice(field: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{field}={value!r} is not one of {choices}")


def _check_count(field: str, value: int, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{field} must be an integer >= {minimum}, got {value!r}")
