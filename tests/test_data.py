"""CIFARDataModule: both sources, both augmentation paths, sharding, reproducibility, errors."""

import json
import os
import pickle
import subprocess
import sys
import tarfile
import urllib.error
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from scipy import stats
from torch import nn
from torchvision.datasets import CIFAR10, CIFAR100
from torchvision.datasets import cifar as tv_cifar

from gompertz_kd.data import (
    AUGMENTS,
    BATCHED_AUGMENTS,
    CLASSES,
    CUTOUT_SIZE,
    MEAN_STD,
    CIFARDataModule,
    EpochSampler,
    ImageArrays,
    ResumableDataLoader,
    batch_transform,
    image_transform,
    sources,
    stratified_holdout,
)

from helpers import cpu_trainer

# ---------------------------------------------------------------------------------------------
# builders


def _official_layout(root: Path, dataset: str, per_file: int = 6) -> dict[str, ImageArrays]:
    """Write the official python-pickle layout with random images; returns what was written."""
    cls = CIFAR10 if dataset == "cifar10" else CIFAR100
    label_key = "labels" if dataset == "cifar10" else "fine_labels"
    folder = root / cls.base_folder
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    written = {}
    for split, files in (("train", cls.train_list), ("test", cls.test_list)):
        parts = []
        for name, _ in files:
            data = rng.integers(0, 256, (per_file, 3072), dtype=np.uint8)
            labels = rng.integers(0, len(CLASSES[dataset]), per_file).tolist()
            with open(folder / name, "wb") as f:
                pickle.dump({"data": data, label_key: labels, "batch_label": name}, f)
            parts.append((data, labels))
        images = np.concatenate([d for d, _ in parts]).reshape(-1, 3, 32, 32)
        labels = sum((lab for _, lab in parts), [])
        written[split] = ImageArrays(torch.from_numpy(images), torch.tensor(labels))
    with open(folder / cls.meta["filename"], "wb") as f:
        pickle.dump({cls.meta["key"]: list(CLASSES[dataset])}, f)
    return written


@pytest.fixture
def no_checksums(monkeypatch):
    """The written files cannot match the official md5 sums: bypass the check in this test only."""
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda fpath, md5=None: os.path.isfile(fpath))


def _save(image: torch.Tensor, path: Path, **kwargs) -> None:
    """Write a uint8 (3, H, W) image; the suffix picks the format."""
    Image.fromarray(image.permute(1, 2, 0).numpy()).save(path, **kwargs)


def _class_image(label: int, index: int) -> torch.Tensor:
    """A 32x32 image that tells its class and index: every pixel is (label, index, 7*row)."""
    image = torch.empty(3, 32, 32, dtype=torch.uint8)
    image[0] = 10 * label + 5
    image[1] = 20 * index + 3
    image[2] = (7 * torch.arange(32)).view(32, 1).to(torch.uint8)
    return image


def _image_folder(root: Path, dataset: str = "cifar10", train: int = 3, test: int = 2) -> Path:
    """root/{train,test}/<class>/NNNN.png with :func:`_class_image` pixels."""
    for split, count in (("train", train), ("test", test)):
        for label, name in enumerate(CLASSES[dataset]):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                _save(_class_image(label, i), folder / f"{i:04d}.png")
    return root


def _arrays(n: int, seed: int = 0) -> ImageArrays:
    """Random images whose label is their index (to read back which images a loader visited)."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=generator)
    return ImageArrays(images, torch.arange(n))


def _rank(rank: int, world_size: int) -> SimpleNamespace:
    """What the DataModule reads from a trainer, for one simulated DDP rank."""
    strategy = SimpleNamespace(root_device=torch.device("cpu"))
    return SimpleNamespace(global_rank=rank, world_size=world_size, strategy=strategy)


def _dm_with(train: ImageArrays, test: ImageArrays | None = None, **kwargs) -> CIFARDataModule:
    """A DataModule whose splits are already in memory (no source is read)."""
    dm = CIFARDataModule(**{"num_workers": 0, **kwargs})
    dm.train_arrays, dm.val_arrays = train, test if test is not None else train
    dm.test_arrays = dm.val_arrays
    return dm


def _visited(loader) -> list[int]:
    return [int(i) for _, labels in loader for i in labels]


def _pixels(images: torch.Tensor, dataset: str = "cifar10") -> torch.Tensor:
    """Normalised float images back to integer pixel values."""
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in MEAN_STD[dataset])
    return ((images * std + mean) * 255).round().to(torch.int64)


# ---------------------------------------------------------------------------------------------
# source="torchvision"


@pytest.mark.parametrize("dataset", ["cifar10", "cifar100"])
def test_torchvision_source_reads_official_layout(tmp_path, no_checksums, dataset):
    written = _official_layout(tmp_path, dataset)
    dm = CIFARDataModule(dataset, root=tmp_path, augment="none", batch_size=4, download=False)
    dm.prepare_data()
    dm.setup()
    assert dm.num_classes == len(CLASSES[dataset])
    for arrays, expected in (
        (dm.train_arrays, written["train"]),
        (dm.test_arrays, written["test"]),
    ):
        assert torch.equal(arrays.images, expected.images)
        assert torch.equal(arrays.labels, expected.labels)
    images, labels = next(iter(dm.test_dataloader()))
    assert torch.equal(_pixels(images, dataset), written["test"].images[:8].long())
    assert torch.equal(labels, written["test"].labels[:8])


def test_torchvision_source_extracts_archive_placed_under_root(tmp_path, no_checksums):
    staging = tmp_path / "staging"
    written = _official_layout(staging, "cifar10")
    root = tmp_path / "root"
    root.mkdir()
    with tarfile.open(root / CIFAR10.filename, "w:gz") as tar:
        tar.add(staging / CIFAR10.base_folder, arcname=CIFAR10.base_folder)
    dm = CIFARDataModule(root=root, download=False)
    dm.prepare_data()
    dm.setup("test")
    assert torch.equal(dm.test_arrays.images, written["test"].images)


def test_torchvision_source_missing_data_is_one_clear_error(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(tv_cifar, "download_and_extract_archive", offline)
    dm = CIFARDataModule("cifar100", root=tmp_path, download=True)
    with pytest.raises(FileNotFoundError) as info:
        dm.prepare_data()
    message = str(info.value)
    for needle in ("cifar-100-python.tar.gz", str(tmp_path), "source='folder'", "name resolution"):
        assert needle in message
    assert info.value.__cause__ is None and info.value.__suppress_context__

    with pytest.raises(FileNotFoundError, match="cifar-100-python does not exist"):
        CIFARDataModule("cifar100", root=tmp_path, download=False).setup()


def test_torchvision_source_corrupt_files_are_a_clear_error(tmp_path, monkeypatch):
    _official_layout(tmp_path, "cifar10")
    with pytest.raises(FileNotFoundError, match="md5 check .*source='folder'"):
        CIFARDataModule(root=tmp_path, download=False).setup()

    monkeypatch.setattr(tv_cifar, "check_integrity", lambda fpath, md5=None: os.path.isfile(fpath))
    (tmp_path / CIFAR10.base_folder / "data_batch_3").write_bytes(b"not a pickle")
    with pytest.raises(FileNotFoundError, match="reading it failed"):
        CIFARDataModule(root=tmp_path, download=False).setup()


# ---------------------------------------------------------------------------------------------
# source="folder"


def test_folder_source_labels_counts_and_pixels(tmp_path):
    root = _image_folder(tmp_path)
    dm = CIFARDataModule(root=root, source="folder")
    dm.prepare_data()
    dm.setup()
    assert len(dm.train_arrays) == 30 and len(dm.test_arrays) == 20
    assert torch.bincount(dm.train_arrays.labels).tolist() == [3] * 10
    for k in range(30):  # canonical label order, files in name order, lossless pixels
        label, index = divmod(k, 3)
        assert dm.train_arrays.labels[k] == label
        assert torch.equal(dm.train_arrays.images[k], _class_image(label, index))


def test_in_memory_arrays_give_the_batches_the_folder_gives(tmp_path):
    """``from_arrays`` (benchmarks, notebooks): the same hold-out and batches as the same images
    read from a folder, nothing read from disk, batches on the given device."""
    root = _image_folder(tmp_path)
    options = dict(batch_size=4, val_split=10, seed=3, num_workers=0)
    folder = CIFARDataModule(root=root, source="folder", **options)
    folder.prepare_data()
    folder.setup()
    train, test = (
        sources.load_folder("cifar10", root, "train"),
        sources.load_folder("cifar10", root, "test"),
    )
    memory = CIFARDataModule.from_arrays("cifar10", train, test, device="cpu", **options)
    memory.prepare_data()  # nothing to prepare: no folder "<in memory>" is looked for
    memory.setup()
    assert torch.equal(memory.val_arrays.images, folder.val_arrays.images)
    for loader in ("train_dataloader", "val_dataloader", "test_dataloader"):
        for (x, y), (x2, y2) in zip(
            getattr(memory, loader)(), getattr(folder, loader)(), strict=True
        ):
            assert torch.equal(x, x2) and torch.equal(y, y2) and x.device.type == "cpu"


def test_folder_source_reads_jpeg_and_ignores_other_files(tmp_path):
    root = _image_folder(tmp_path, train=1, test=1)
    cat = root / "train" / "cat"
    _save(_class_image(3, 1), cat / "0001.jpg", quality=95)
    (cat / ".hidden.png").write_bytes(b"")
    (cat / "notes.txt").write_text("not an image")
    arrays = sources.load_folder("cifar10", root, "train")
    assert torch.bincount(arrays.labels).tolist() == [1, 1, 1, 2, 1, 1, 1, 1, 1, 1]
    jpeg = arrays.images[4].int()
    assert (jpeg - _class_image(3, 1).int()).abs().float().mean() < 3  # lossy, but that image


def _cached(cache, split="train"):
    return sorted(cache.glob(f"*/cifar10-{split}-*.npz"))


def test_folder_cache_is_reused_and_nothing_is_written_beside_the_data(tmp_path, monkeypatch):
    root = _image_folder(tmp_path / "data")
    before = sorted(p for p in root.rglob("*"))
    cache = tmp_path / "cache"
    first = sources.load_folder("cifar10", root, "train", cache)
    cached = _cached(cache)
    assert len(cached) == 1 and not list(cached[0].parent.glob("*.tmp"))
    assert cached[0].parent == sources.folder_cache_dir(root, cache)
    assert sorted(p for p in root.rglob("*")) == before

    def no_decoding(files):
        raise AssertionError("decoded again although the cache is valid")

    monkeypatch.setattr(sources, "_decode", no_decoding)
    second = sources.load_folder("cifar10", root, "train", cache)
    assert torch.equal(second.images, first.images) and torch.equal(second.labels, first.labels)


def test_folder_without_cache_dir_writes_nothing(tmp_path, monkeypatch):
    root = _image_folder(tmp_path / "data")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    arrays = sources.load_folder("cifar10", root, "test")
    assert len(arrays) == 20
    assert sorted(p.relative_to(tmp_path).parts[0] for p in tmp_path.iterdir()) == ["data"]
    assert not [p for p in root.rglob("*") if "cache" in p.name]


def test_folder_cache_rebuilds_when_files_change(tmp_path):
    root, cache = _image_folder(tmp_path / "data"), tmp_path / "cache"
    sources.load_folder("cifar10", root, "train", cache)
    (old_cache,) = _cached(cache)

    changed = root / "train" / "dog" / "0001.png"
    _save(torch.zeros(3, 32, 32, dtype=torch.uint8), changed)
    os.utime(changed, ns=(1, 1))  # a new mtime even on coarse-clock file systems
    _save(_class_image(9, 7), root / "train" / "truck" / "0003.png")
    arrays = sources.load_folder("cifar10", root, "train", cache)

    assert len(arrays) == 31 and int(arrays.labels[-1]) == 9
    assert torch.equal(arrays.images[16], torch.zeros(3, 32, 32, dtype=torch.uint8))
    assert not old_cache.exists()  # the stale cache of this split is removed
    assert len(_cached(cache)) == 1


def test_folder_copies_in_different_places_keep_separate_caches(tmp_path):
    cache = tmp_path / "cache"
    a = _image_folder(tmp_path / "a" / "cifar10")
    b = _image_folder(tmp_path / "b" / "cifar10", train=2)
    sources.load_folder("cifar10", a, "train", cache)
    sources.load_folder("cifar10", b, "train", cache)
    assert len(_cached(cache)) == 2
    assert len(sources.load_folder("cifar10", a, "train", cache)) == 30


def test_folder_unwritable_cache_warns_and_still_loads(tmp_path):
    root = _image_folder(tmp_path / "data")
    blocker = tmp_path / "cache"
    blocker.write_text("")  # a file in the way: the cache folder cannot be made
    with pytest.warns(UserWarning, match="data.cache_dir"):
        arrays = sources.load_folder("cifar10", root, "test", blocker)
    assert len(arrays) == 20


def test_folder_corrupt_cache_is_rebuilt(tmp_path):
    root, cache = _image_folder(tmp_path / "data"), tmp_path / "cache"
    first = sources.load_folder("cifar10", root, "test", cache)
    (cached,) = _cached(cache, "test")
    cached.write_bytes(b"truncated")
    assert torch.equal(sources.load_folder("cifar10", root, "test", cache).images, first.images)


def test_folder_class_names_must_match_dataset(tmp_path):
    root = _image_folder(tmp_path, train=1, test=1)
    with pytest.raises(ValueError, match="do not match dataset='cifar100'.*missing \\['apple'"):
        CIFARDataModule("cifar100", root=root, source="folder").setup()

    (root / "train" / "cat").rename(root / "train" / "kitten")
    with pytest.raises(ValueError, match="unexpected \\['kitten'\\], missing \\['cat'\\]"):
        CIFARDataModule(root=root, source="folder").setup()


def test_folder_missing_is_a_clear_error_with_a_hint(tmp_path):
    _image_folder(tmp_path / "cifar10-jpeg", train=1, test=1)
    with pytest.raises(FileNotFoundError) as info:
        CIFARDataModule(root=tmp_path, source="folder").prepare_data()
    message = str(info.value)
    assert str(tmp_path / "train") in message
    assert f"did you mean root='{tmp_path / 'cifar10-jpeg'}'" in message
    assert "source='torchvision'" in message


@pytest.mark.parametrize("problem", ["corrupt", "wrong size", "empty class"])
def test_folder_bad_images_are_a_clear_error(tmp_path, problem):
    root = _image_folder(tmp_path, train=1, test=1)
    bird = root / "train" / "bird" / "0000.png"
    if problem == "corrupt":
        bird.write_bytes(b"\x89PNG broken")
        expected = f"cannot decode image {bird}"
    elif problem == "wrong size":
        _save(torch.zeros(3, 64, 64, dtype=torch.uint8), bird)
        expected = "is \\(64, 64\\) pixels; CIFAR images are 32x32"
    else:
        bird.unlink()
        expected = "class folder .*bird holds no image"
    with pytest.raises(ValueError, match=expected):
        sources.load_folder("cifar10", root, "train")


# ---------------------------------------------------------------------------------------------
# augmentation


@pytest.mark.parametrize("dataset", ["cifar10", "cifar100"])
@pytest.mark.parametrize("augment", AUGMENTS)
def test_augmentation_shapes_and_value_ranges(dataset, augment):
    images = _arrays(16).images
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in MEAN_STD[dataset])
    low, high = (0 - mean) / std, (1 - mean) / std
    outputs = [torch.stack([image_transform(dataset, augment)(image) for image in images])]
    if augment in BATCHED_AUGMENTS:
        outputs.append(batch_transform(dataset, augment)(images, torch.Generator()))
    for out in outputs:
        assert out.shape == (16, 3, 32, 32) and out.dtype == torch.float32
        assert ((out >= low - 1e-5) & (out <= high + 1e-5)).all()
        if augment == "none":
            assert torch.allclose(out, (images / 255 - mean) / std, atol=1e-5)
        if augment == "cutout":  # a square of exact zeros (the mean colour), maybe clipped
            cut_pixels = (out == 0).all(1).flatten(1).sum(1)
            assert (cut_pixels >= (CUTOUT_SIZE[dataset] // 2) ** 2).all()
            assert (cut_pixels <= CUTOUT_SIZE[dataset] ** 2).all()


def test_batched_augmentation_without_flip_is_a_pure_crop():
    images = _arrays(64).images
    transform = batch_transform("cifar10", "standard")
    unflipped = type(transform)(transform.mean, transform.std, padding=4, flip=False)
    out = _pixels(unflipped(images, torch.Generator().manual_seed(0)))
    padded = F.pad(images, (4, 4, 4, 4)).long()
    for image, source in zip(out, padded, strict=True):
        offsets = [
            (dy, dx)
            for dy in range(9)
            for dx in range(9)
            if torch.equal(source[:, dy : dy + 32, dx : dx + 32], image)
        ]
        assert len(offsets) == 1


def _coordinate_image() -> torch.Tensor:
    """Red encodes the row, green the column (both nonzero, so padding is distinguishable)."""
    image = torch.full((3, 32, 32), 100, dtype=torch.uint8)
    image[0] = (1 + 7 * torch.arange(32)).view(32, 1).to(torch.uint8)
    image[1] = (1 + 7 * torch.arange(32)).view(1, 32).to(torch.uint8)
    return image


def _crop_flip_cell(images: torch.Tensor) -> torch.Tensor:
    """Recover (dy, dx, flip) of each augmented coordinate image as one cell index in [0, 162)."""
    pixels = _pixels(images)
    dy = (pixels[:, 0, 16, 16] - 1) // 7 - 12
    col, next_col = (pixels[:, 1, 16, 16] - 1) // 7, (pixels[:, 1, 16, 17] - 1) // 7
    flipped = next_col < col
    dx = torch.where(flipped, col - 11, col - 12)
    assert ((dy >= 0) & (dy <= 8) & (dx >= 0) & (dx <= 8)).all()
    return (dy * 9 + dx) * 2 + flipped.long()


def test_both_paths_draw_the_same_crop_and_flip_distribution():
    draws = 162 * 60
    image = _coordinate_image()
    per_image = image_transform("cifar10", "standard")
    torch.manual_seed(1)
    slow = torch.stack([per_image(image) for _ in range(draws)])
    fast = batch_transform("cifar10", "standard")(
        image.expand(draws, -1, -1, -1), torch.Generator().manual_seed(1)
    )
    counts = [torch.bincount(_crop_flip_cell(x), minlength=162).numpy() for x in (slow, fast)]
    assert stats.chi2_contingency(np.stack(counts)).pvalue > 1e-3  # same distribution
    for c in counts:  # and it is uniform over the 81 offsets x 2 flips
        assert stats.chisquare(c).pvalue > 1e-3
    # the same first and second moments per pixel
    assert torch.allclose(slow.mean(0), fast.mean(0), atol=0.08)
    assert torch.allclose(slow.std(0), fast.std(0), atol=0.08)


def test_both_paths_draw_the_same_cutout_distribution():
    draws = 4000
    image = torch.full((3, 32, 32), 200, dtype=torch.uint8)  # never normalises to exactly 0
    per_image = image_transform("cifar10", "cutout")
    torch.manual_seed(2)
    slow = torch.stack([per_image(image) for _ in range(draws)])
    fast = batch_transform("cifar10", "cutout")(
        image.expand(draws, -1, -1, -1), torch.Generator().manual_seed(2)
    )
    cut_slow, cut_fast = ((x == 0).all(1).float().mean(0) for x in (slow, fast))
    assert (cut_slow - cut_fast).abs().max() < 0.05
    # a pixel at least 8 from every border is cut with probability (16/32)^2
    assert abs(cut_fast[12:20, 12:20].mean() - 0.25) < 0.02
    assert abs(cut_slow[12:20, 12:20].mean() - 0.25) < 0.02
    # corners are cut less often, since the square is clipped rather than kept inside
    assert cut_fast[0, 0] < 0.1 and cut_slow[0, 0] < 0.1


# ---------------------------------------------------------------------------------------------
# batches, sharding, reproducibility


@pytest.mark.parametrize("on_device", [True, False])
def test_two_ranks_see_disjoint_shards_and_evaluation_counts_every_image_once(on_device):
    train, test = _arrays(103), _arrays(37, seed=1)
    train_seen, test_seen = [], []
    for rank in (0, 1):
        dm = _dm_with(train, test, batch_size=8, on_device=on_device, seed=3)
        dm.trainer = _rank(rank, 2)
        train_seen.append(_visited(dm.train_dataloader()))
        test_seen.append(_visited(dm.test_dataloader()))
    assert len(train_seen[0]) == len(train_seen[1]) == 51  # equal steps per rank, 1 image dropped
    assert not set(train_seen[0]) & set(train_seen[1])
    assert len(set(train_seen[0]) | set(train_seen[1])) == 102
    assert sorted(test_seen[0] + test_seen[1]) == list(range(37))


def test_both_paths_visit_the_same_order():
    train = _arrays(50)
    orders = [_visited(_dm_with(train, on_device=d, batch_size=16).train_dataloader()) for d in (True, False)]  # fmt: skip
    assert orders[0] == orders[1] and sorted(orders[0]) == list(range(50))


@pytest.mark.parametrize("on_device", [True, False])
def test_same_seed_same_batches(on_device):
    train = _arrays(40)

    def two_epochs(seed: int) -> list[torch.Tensor]:
        loader = _dm_with(train, on_device=on_device, batch_size=16, seed=seed).train_dataloader()
        return [torch.cat([images for images, _ in loader]) for _ in range(2)]

    rng_before = torch.get_rng_state()
    first, again, other = two_epochs(0), two_epochs(0), two_epochs(1)
    assert torch.equal(torch.get_rng_state(), rng_before)  # the global RNG is left alone
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not torch.equal(first[0], other[0])
    assert not torch.equal(first[0], first[1])  # each epoch is a new order and new draws


def test_per_image_workers_are_reproducible():
    train = _arrays(24)

    def batches() -> torch.Tensor:
        dm = _dm_with(train, on_device=False, batch_size=4, num_workers=2, seed=5)
        return torch.cat([images for images, _ in dm.train_dataloader()])

    assert torch.equal(batches(), batches())


def test_per_image_batches_do_not_depend_on_the_worker_count():
    train = _arrays(24)

    def batches(workers: int) -> torch.Tensor:
        dm = _dm_with(train, on_device=False, batch_size=4, num_workers=workers, seed=5)
        loader = dm.train_dataloader()
        return torch.cat([torch.cat([images for images, _ in loader]) for _ in range(2)])

    assert torch.equal(batches(0), batches(2))


def test_per_image_loader_resumes_after_the_batches_already_used():
    train = _arrays(40)

    def loader(consumed: int = 0) -> ResumableDataLoader:
        dm = _dm_with(train, on_device=False, batch_size=4, seed=3)
        dm._consumed_train_batches = lambda: consumed
        return dm.train_dataloader()

    reference = loader()
    epoch0 = list(reference)
    epoch1 = [images for images, _ in reference]
    state = loader(consumed=3).state_dict()
    assert state == {"epoch": 0, "batches": 3}
    # a fresh loader, as after a restart, that has run epoch 0 already up to the interruption
    restarted = loader()
    restarted.load_state_dict({"epoch": 1, "batches": 3})
    restarted.sampler.set_epoch(1)  # as Lightning does before the resumed epoch
    rest = [images for images, _ in restarted]
    assert len(rest) == len(epoch1) - 3
    assert all(torch.equal(a, b) for a, b in zip(rest, epoch1[3:], strict=True))
    assert len(list(restarted)) == len(epoch0)  # the next epoch is whole again


def test_fast_path_replays_an_epoch_after_set_epoch():
    loader = _dm_with(_arrays(32), on_device=True, batch_size=8).train_dataloader()
    epoch0, epoch1 = (torch.cat([x for x, _ in loader]) for _ in range(2))
    loader.sampler.set_epoch(0)
    assert torch.equal(torch.cat([x for x, _ in loader]), epoch0)
    assert isinstance(loader.sampler, EpochSampler) and loader.sampler.epoch == 1
    assert not torch.equal(epoch0, epoch1)


def test_batches_are_float_normalised_and_int64_labels():
    dm = _dm_with(_arrays(20), batch_size=8, eval_batch_size=None)
    assert dm.eval_batch_size == 16
    for loader in (dm.train_dataloader(), dm.val_dataloader()):
        images, labels = next(iter(loader))
        assert images.dtype == torch.float32 and images.shape[1:] == (3, 32, 32)
        assert labels.dtype == torch.int64 and labels.shape == images.shape[:1]
        assert type(images) is torch.Tensor
    assert len(dm.train_dataloader()) == 3 and len(dm.val_dataloader()) == 2


# ---------------------------------------------------------------------------------------------
# validation split and configuration errors


def test_val_split_is_stratified_disjoint_and_fixed_by_seed():
    labels = torch.arange(10).repeat_interleave(20)
    kept, held = stratified_holdout(labels, 30, seed=0)
    assert len(held) == 30 and torch.bincount(labels[held]).tolist() == [3] * 10
    assert sorted(torch.cat([kept, held]).tolist()) == list(range(200))
    assert torch.equal(stratified_holdout(labels, 30, seed=0)[1], held)
    assert not torch.equal(stratified_holdout(labels, 30, seed=1)[1], held)
    assert len(stratified_holdout(labels, 15, seed=0)[1]) == 15  # remainders still exact


def test_datamodule_val_split_holds_out_training_images(tmp_path):
    dm = CIFARDataModule(root=_image_folder(tmp_path, train=4), source="folder", val_split=10)
    dm.setup("fit")
    assert len(dm.train_arrays) == 30 and len(dm.val_arrays) == 10
    assert torch.bincount(dm.val_arrays.labels).tolist() == [1] * 10
    with pytest.raises(ValueError, match="val_split=40 must be smaller than the 40"):
        CIFARDataModule(root=tmp_path, source="folder", val_split=40).setup("fit")


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"dataset": "cifar1000"}, "dataset='cifar1000'"),
        ({"source": "imagenet"}, "source='imagenet'"),
        ({"augment": "mixup"}, "augment='mixup'"),
        ({"val_split": -1}, "val_split must be an integer >= 0"),
        ({"val_split": 0.1}, "val_split must be an integer >= 0"),
        ({"batch_size": 0}, "batch_size must be an integer >= 1"),
        ({"augment": "randaugment", "on_device": True}, "on_device=True needs a batched"),
    ],
)
def test_configuration_errors_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field.replace("(", "\\(")):
        CIFARDataModule(**kwargs)


def test_on_device_default_picks_the_tensor_path_where_it_can():
    assert CIFARDataModule().uses_tensor_path
    assert CIFARDataModule(augment="cutout").uses_tensor_path
    assert not CIFARDataModule(augment="autoaugment").uses_tensor_path
    assert not CIFARDataModule(on_device=False).uses_tensor_path
    dm = CIFARDataModule("cifar100")
    assert dm.num_classes == 100
    assert dm.mean == (0.5071, 0.4867, 0.4408)  # the KD benchmark's constants


# ---------------------------------------------------------------------------------------------
# with a Trainer


class _Probe(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(3 * 32 * 32, 10)
        self.train_batches: list[tuple] = []
        self.val_images = 0

    def training_step(self, batch, batch_idx):
        images, labels = batch
        self.train_batches.append((images.dtype, tuple(images.shape), labels.dtype, self.current_epoch, labels.tolist()))  # fmt: skip
        return F.cross_entropy(self.net(images.flatten(1)), labels)

    def validation_step(self, batch, batch_idx):
        self.val_images += len(batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


@pytest.mark.parametrize("on_device", [True, False])
def test_trainer_fit_sees_normalised_batches(tmp_path, on_device):
    dm = CIFARDataModule(
        root=_image_folder(tmp_path), source="folder", batch_size=8, on_device=on_device,
        num_workers=0,
    )  # fmt: skip
    probe = _Probe()
    cpu_trainer(max_epochs=2).fit(probe, datamodule=dm)
    assert {b[:3] for b in probe.train_batches} == {
        (torch.float32, (8, 3, 32, 32), torch.int64),
        (torch.float32, (6, 3, 32, 32), torch.int64),
    }
    assert len(probe.train_batches) == 8 and probe.val_images == 2 * 20
    orders = [sum((b[4] for b in probe.train_batches if b[3] == e), []) for e in (0, 1)]
    assert orders[0] != orders[1]  # Lightning's set_epoch reshuffles


# ---------------------------------------------------------------------------------------------
# the real CIFAR-10 copy

_REAL = Path(os.environ.get("GOMPERTZ_KD_CIFAR10_FOLDER", Path(__file__).parents[1] / "data/cifar10-jpeg"))  # fmt: skip


@pytest.mark.slow
@pytest.mark.skipif(not (_REAL / "train").is_dir(), reason=f"no CIFAR-10 folder copy at {_REAL}")
def test_real_cifar10_folder_copy():
    dm = CIFARDataModule("cifar10", root=_REAL, source="folder")
    dm.prepare_data()
    dm.setup()
    assert len(dm.train_arrays) == 50_000 and len(dm.test_arrays) == 10_000
    assert torch.bincount(dm.train_arrays.labels).tolist() == [5000] * 10
    assert torch.bincount(dm.test_arrays.labels).tolist() == [1000] * 10
    assert sorted(p.name for p in (_REAL / "train").iterdir() if p.is_dir()) == list(dm.classes)
    pixels = dm.train_arrays.images.float() / 255  # decoded in RGB order: the data set's own mean
    assert torch.allclose(pixels.mean((0, 2, 3)), torch.tensor(dm.mean), atol=0.005)
    images, labels = next(iter(dm.train_dataloader()))
    assert images.shape == (64, 3, 32, 32) and labels.dtype == torch.int64


_DDP_SCRIPT = """
import json, sys, torch, lightning as L, torch.nn.functional as F
from gompertz_kd.data import CIFARDataModule, ImageArrays

class Indexed(CIFARDataModule):  # labels are image indices, to read back who saw what
    def prepare_data(self):
        pass
    def setup(self, stage=None):
        g = torch.Generator().manual_seed(0)
        images = lambda n: torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
        self.train_arrays = ImageArrays(images(103), torch.arange(103))
        self.val_arrays = ImageArrays(images(37), torch.arange(37))

class Probe(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Linear(3072, 103)
        self.seen = {"train": [], "val": []}
    def training_step(self, batch, batch_idx):
        self.seen["train"] += batch[1].tolist()
        return F.cross_entropy(self.net(batch[0].flatten(1)), batch[1])
    def validation_step(self, batch, batch_idx):
        self.seen["val"] += batch[1].tolist()
    def on_fit_end(self):
        with open(f"{sys.argv[2]}/rank{self.global_rank}.json", "w") as f:
            json.dump(self.seen, f)
    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)

if __name__ == "__main__":
    on_device = sys.argv[1] == "1"
    dm = Indexed(batch_size=8, on_device=on_device, num_workers=0 if on_device else 1)
    L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=1, logger=False,
              enable_checkpointing=False, enable_progress_bar=False, num_sanity_val_steps=0,
              enable_model_summary=False).fit(Probe(), datamodule=dm)
"""


@pytest.mark.slow
@pytest.mark.parametrize("on_device", [True, False])
def test_real_ddp_two_processes_disjoint_and_counted_once(tmp_path, on_device):
    script = tmp_path / "ddp_probe.py"
    script.write_text(_DDP_SCRIPT)
    cmd = [sys.executable, str(script), str(int(on_device)), str(tmp_path)]
    subprocess.run(cmd, check=True, timeout=300, capture_output=True, cwd=tmp_path)
    seen = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert len(seen[0]["train"]) == len(seen[1]["train"]) == 51  # no second sampler injected
    assert not set(seen[0]["train"]) & set(seen[1]["train"])
    assert sorted(seen[0]["val"] + seen[1]["val"]) == list(range(37))


@pytest.mark.parametrize("on_device", [True, False])
def test_a_one_image_last_training_batch_is_dropped(tmp_path, on_device):
    """BatchNorm cannot train on a single image; a remainder of one is dropped, larger ones kept."""
    from gompertz_kd.data import CIFARDataModule

    from helpers import make_cifar_folder

    root = make_cifar_folder(tmp_path / "c10", "cifar10", train_per_class=1, test_per_class=1)
    sizes = {}
    for batch_size in (3, 4):  # 10 images: remainder 1 with 3, remainder 2 with 4
        dm = CIFARDataModule(
            "cifar10",
            root,
            source="folder",
            batch_size=batch_size,
            num_workers=0,
            on_device=on_device,
        )
        dm.setup("fit")
        sizes[batch_size] = [len(labels) for _, labels in dm.train_dataloader()]
    assert sizes[3] == [3, 3, 3]
    assert sizes[4] == [4, 4, 2]


def test_synthetic_folder_is_readable_by_the_folder_source_and_reproducible(tmp_path):
    from gompertz_kd.data import make_synthetic_folder

    a = make_synthetic_folder(tmp_path / "a", "cifar100", train_per_class=2, test_per_class=1)
    b = make_synthetic_folder(tmp_path / "b", "cifar100", train_per_class=2, test_per_class=1)
    train = sources.load_folder("cifar100", a, "train")
    assert len(train) == 200 and torch.bincount(train.labels).tolist() == [2] * 100
    assert torch.equal(train.images, sources.load_folder("cifar100", b, "train").images)
    other = make_synthetic_folder(tmp_path / "c", "cifar100", 2, 1, seed=1)
    assert not torch.equal(train.images, sources.load_folder("cifar100", other, "train").images)
    with pytest.raises(ValueError, match="dataset='imagenet'"):
        make_synthetic_folder(tmp_path / "d", "imagenet")
