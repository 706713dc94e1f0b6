"""Where the CIFAR images come from: the official torchvision archive, or an image-folder copy.

Both sources end in the same :class:`ImageArrays`: uint8 images ``(N, 3, 32, 32)`` and int64 labels
``(N,)`` in CIFAR's canonical label order. Augmentation happens later (:mod:`.transforms`).

* ``torchvision``: the official python-pickle archive (``cifar-10-python.tar.gz`` /
  ``cifar-100-python.tar.gz``), downloaded and md5-checked by torchvision, read from
  ``root/cifar-10-batches-py/`` or ``root/cifar-100-python/``.
* ``folder``: ``root/train/<class>/*.png|jpg|jpeg`` and ``root/test/<class>/*``, class folders named
  exactly as CIFAR's labels. Given a ``cache_dir``, the decoded split is cached there as one
  ``.npz`` (in ``cache_dir/<root folder name>-<hash of root>/``), keyed on the file list with sizes
  and modification times, so later runs load in well under a second and any added, removed or
  rewritten file rebuilds it. Nothing is ever written beside the data: data folders are often
  shared or read-only. Without a ``cache_dir`` the folder is decoded on every load (seconds).
"""

from __future__ import annotations

import hashlib
import os
import pickle
import tarfile
import tempfile
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torchvision
from PIL import Image
from torch import Tensor
from torchvision.datasets import cifar as tv_cifar
from torchvision.datasets.utils import extract_archive

__all__ = [
    "CLASSES",
    "DATASETS",
    "IMAGE_SUFFIXES",
    "ImageArrays",
    "check_folder",
    "folder_cache_dir",
    "load_folder",
    "load_torchvision",
    "prepare_torchvision",
]

# Label names in CIFAR's own label order (``batches.meta`` / ``meta`` of the official archives),
# which for both data sets is also alphabetical.
CLASSES: dict[str, tuple[str, ...]] = {
    "cifar10": (
        "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
    ),
    "cifar100": (
        "apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle",
        "bottle", "bowl", "boy", "bridge", "bus", "butterfly", "camel", "can", "castle",
        "caterpillar", "cattle", "chair", "chimpanzee", "clock", "cloud", "cockroach", "couch",
        "crab", "crocodile", "cup", "dinosaur", "dolphin", "elephant", "flatfish", "forest", "fox",
        "girl", "hamster", "house", "kangaroo", "keyboard", "lamp", "lawn_mower", "leopard", "lion",
        "lizard", "lobster", "man", "maple_tree", "motorcycle", "mountain", "mouse", "mushroom",
        "oak_tree", "orange", "orchid", "otter", "palm_tree", "pear", "pickup_truck", "pine_tree",
        "plain", "plate", "poppy", "porcupine", "possum", "rabbit", "raccoon", "ray", "road",
        "rocket", "rose", "sea", "seal", "shark", "shrew", "skunk", "skyscraper", "snail", "snake",
        "spider", "squirrel", "streetcar", "sunflower", "sweet_pepper", "table", "tank",
        "telephone", "television", "tiger", "tractor", "train", "trout", "tulip", "turtle",
        "wardrobe", "whale", "willow_tree", "wolf", "woman", "worm",
    ),
}  # fmt: skip
DATASETS = tuple(CLASSES)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
IMAGE_SHAPE = (3, 32, 32)

_TORCHVISION = {"cifar10": torchvision.datasets.CIFAR10, "cifar100": torchvision.datasets.CIFAR100}
# Part of the cache key: bump it when the cached arrays change meaning.
_CACHE_FORMAT = 1


@dataclass(frozen=True)
class ImageArrays:
    """One split held in memory.

    Attributes:
        images: uint8 ``(N, 3, 32, 32)``, RGB, unnormalised.
        labels: int64 ``(N,)``, class indices in CIFAR's canonical order.
    """

    images: Tensor
    labels: Tensor

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.shape[1:] != IMAGE_SHAPE:
            raise ValueError(
                f"images must be uint8 (N, 3, 32, 32), got {self.images.dtype} {tuple(self.images.shape)}"
            )
        if self.labels.dtype != torch.int64 or self.labels.shape != self.images.shape[:1]:
            raise ValueError(
                f"labels must be int64 (N,) with N = {len(self.images)}, got "
                f"{self.labels.dtype} {tuple(self.labels.shape)}"
            )

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices: Tensor) -> ImageArrays:
        return ImageArrays(self.images[indices], self.labels[indices])


# ---------------------------------------------------------------------------------------------
# torchvision: the official archive


def prepare_torchvision(dataset: str, root: str | os.PathLike, download: bool = True) -> None:
    """Make sure the official archive of ``dataset`` is extracted under ``root``.

    Does nothing when the extracted files are there and pass their md5 checks. Otherwise extracts
    ``root/<archive>.tar.gz`` if it is there and intact (no network needed), else downloads it
    (only with ``download=True``; torchvision checks its md5).

    Raises:
        FileNotFoundError: the download was needed and failed (e.g. offline); the message says
            what was looked for, where, and how to fix it.
    """
    cls = _TORCHVISION[dataset]
    root = Path(root)
    if _torchvision_intact(cls, root):
        return
    archive = root / cls.filename
    try:
        if tv_cifar.check_integrity(str(archive), cls.tgz_md5):
            extract_archive(str(archive), str(root))
        elif download:
            cls(root=str(root), train=True, download=True)
    # urllib raises URLError / HTTPError / socket and SSL errors (all OSError), torchvision a
    # RuntimeError for a bad md5, tarfile its own errors for a truncated archive.
    except (OSError, RuntimeError, tarfile.TarError, EOFError, zipfile.BadZipFile) as err:
        raise FileNotFoundError(
            _torchvision_missing_message(dataset, root, f"downloading it failed ({err})")
        ) from None


def load_torchvision(dataset: str, root: str | os.PathLike, train: bool) -> ImageArrays:
    """Read one split of the extracted official archive under ``root`` (no download).

    Raises:
        FileNotFoundError: the files are missing, fail their md5 check, or cannot be unpickled.
    """
    cls = _TORCHVISION[dataset]
    root = Path(root)
    if not _torchvision_intact(cls, root):
        folder = root / cls.base_folder
        reason = (
            f"{folder} exists but its files are incomplete or fail their md5 check (a partial or "
            "corrupt copy: delete it and prepare again)"
            if folder.exists()
            else f"{folder} does not exist"
        )
        raise FileNotFoundError(_torchvision_missing_message(dataset, root, reason))
    try:
        split = cls(root=str(root), train=train, download=False)
    except (OSError, RuntimeError, pickle.UnpicklingError, EOFError, KeyError, ValueError) as err:
        raise FileNotFoundError(
            _torchvision_missing_message(dataset, root, f"reading it failed ({err!r})")
        ) from None
    if tuple(split.classes) != CLASSES[dataset]:
        raise FileNotFoundError(
            _torchvision_missing_message(
                dataset, root, f"its label names are not {dataset}'s: {list(split.classes)[:5]}..."
            )
        )
    images = torch.from_numpy(np.ascontiguousarray(split.data.transpose(0, 3, 1, 2)))
    return ImageArrays(images, torch.as_tensor(split.targets, dtype=torch.int64))


def _torchvision_intact(cls: type, root: Path) -> bool:
    """torchvision's own ``_check_integrity`` plus the metadata file, without building a dataset."""
    folder = root / cls.base_folder
    files = [*cls.train_list, *cls.test_list, [cls.meta["filename"], cls.meta["md5"]]]
    return all(tv_cifar.check_integrity(str(folder / name), md5) for name, md5 in files)


def _torchvision_missing_message(dataset: str, root: Path, reason: str) -> str:
    cls = _TORCHVISION[dataset]
    return (
        f"{dataset} (source='torchvision') was not found: it is read from the official python "
        f"archive {cls.filename} (md5 {cls.tgz_md5}, from {cls.url}) extracted to "
        f"{root / cls.base_folder}, and {reason}. Fix it in one of two ways: put the official "
        f"archive (or its extracted {cls.base_folder}/ folder) under root={str(root)!r} and run "
        "again (or allow the download with download=True where there is internet); or use "
        "source='folder' with root pointing at a copy in image-folder layout, "
        "root/train/<class>/*.png|jpg and root/test/<class>/*.png|jpg."
    )


# ---------------------------------------------------------------------------------------------
# folder: root/{train,test}/<class>/*.png|jpg with a decoded uint8 cache


def load_folder(
    dataset: str,
    root: str | os.PathLike,
    split: str,
    cache_dir: str | os.PathLike | None = None,
) -> ImageArrays:
    """Read ``root/<split>/<class>/*`` (``split`` is ``"train"`` or ``"test"``), through the cache
    in ``cache_dir`` when one is given (see :func:`folder_cache_dir`).

    Files in each class folder are taken in name order; hidden files and files with other
    suffixes are ignored. Every image must decode to 32x32 (grey images are converted to RGB).

    Raises:
        FileNotFoundError: ``root/<split>`` is missing.
        ValueError: the class folders are not exactly ``dataset``'s class names, a class folder
            holds no image, or an image cannot be decoded or is not 32x32.
    """
    root = Path(root)
    files = _list_folder(dataset, root, split)
    if cache_dir is None:
        return _decode(files)
    key = _cache_key(dataset, split, files)
    name = f"{dataset}-{split}-{key[:20]}.npz"
    directory = folder_cache_dir(root, cache_dir)
    cached = _read_cache(directory / name)
    if cached is not None:
        return cached
    arrays = _decode(files)
    _write_cache(directory, name, f"{dataset}-{split}-", arrays)
    return arrays


def check_folder(dataset: str, root: str | os.PathLike) -> None:
    """Raise the errors of :func:`load_folder` for a missing or misnamed ``root/{train,test}``
    without decoding any image."""
    for split in ("train", "test"):
        _list_folder(dataset, Path(root), split)


def folder_cache_dir(root: str | os.PathLike, cache_dir: str | os.PathLike) -> Path:
    """The folder under ``cache_dir`` that holds the decoded copy of the data in ``root``:
    ``<root folder name>-<hash of the resolved root>``, so that copies in different places never
    share (or delete) each other's cache."""
    root = Path(root).resolve()
    root_hash = hashlib.sha256(str(root).encode()).hexdigest()[:12]
    return Path(cache_dir) / f"{root.name or 'root'}-{root_hash}"


@dataclass(frozen=True)
class _ImageFile:
    path: Path
    label: int
    size: int
    mtime_ns: int


def _list_folder(dataset: str, root: Path, split: str) -> list[_ImageFile]:
    split_dir = root / split
    if not split_dir.is_dir():
        raise FileNotFoundError(_folder_missing_message(dataset, root, split_dir))
    found = sorted(e.name for e in os.scandir(split_dir) if e.is_dir() and e.name[0] != ".")
    expected = CLASSES[dataset]
    if set(found) != set(expected):
        unexpected = sorted(set(found) - set(expected))
        missing = [c for c in expected if c not in found]
        raise ValueError(
            f"the class folders of {split_dir} do not match dataset={dataset!r}: "
            f"unexpected {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}, "
            f"missing {missing[:8]}{'...' if len(missing) > 8 else ''}. Class folders must be "
            f"named exactly as {dataset}'s labels ({', '.join(expected[:4])}, ...); check "
            "dataset= (cifar10 or cifar100) and that root= is the folder holding train/ and test/."
        )
    files = []
    for label, name in enumerate(expected):
        entries = sorted(
            (
                e
                for e in os.scandir(split_dir / name)
                if e.is_file() and e.name[0] != "." and e.name.lower().endswith(IMAGE_SUFFIXES)
            ),
            key=lambda e: e.name,
        )
        if not entries:
            raise ValueError(
                f"class folder {split_dir / name} holds no image ({'/'.join(IMAGE_SUFFIXES)})"
            )
        for e in entries:
            st = e.stat()
            files.append(_ImageFile(Path(e.path), label, st.st_size, st.st_mtime_ns))
    return files


def _folder_missing_message(dataset: str, root: Path, split_dir: Path) -> str:
    hint = ""
    if root.is_dir():
        nested = [p.parent for p in sorted(root.glob(f"*/{split_dir.name}")) if p.is_dir()]
        if nested:
            hint = f" (did you mean root={str(nested[0])!r}?)"
    return (
        f"{dataset} (source='folder') was not found: it is read from {split_dir}/<class>/*.png|jpg, "
        f"which does not exist{hint}. Fix it in one of two ways: point root at the folder that "
        "holds train/ and test/ (for the shared CIFAR-10 copy, unpack it with "
        "`python -m zipfile -e cifar10-jpeg.zip data/` and use root='data/cifar10-jpeg'); or use "
        "source='torchvision' with the official archive under root."
    )


def _cache_key(dataset: str, split: str, files: list[_ImageFile]) -> str:
    digest = hashlib.sha256(f"{_CACHE_FORMAT}\n{dataset}\n{split}\n".encode())
    for f in files:
        digest.update(f"{f.label}/{f.path.name}\t{f.size}\t{f.mtime_ns}\n".encode())
    return digest.hexdigest()


def _decode(files: list[_ImageFile]) -> ImageArrays:
    # PIL rather than torchvision.io, whose image decoding is deprecated since torchvision 0.29.
    images = np.empty((len(files), 32, 32, 3), dtype=np.uint8)
    for i, f in enumerate(files):
        try:
            with Image.open(f.path) as image:
                pixels = np.asarray(image.convert("RGB"))
        except (OSError, ValueError, Image.DecompressionBombError) as err:
            raise ValueError(f"cannot decode image {f.path}: {err}") from None
        if pixels.shape != (32, 32, 3):
            raise ValueError(
                f"image {f.path} is {pixels.shape[:2]} pixels; CIFAR images are 32x32 "
                "(fix or remove the file)"
            )
        images[i] = pixels
    labels = torch.tensor([f.label for f in files], dtype=torch.int64)
    return ImageArrays(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), labels)


def _read_cache(path: Path) -> ImageArrays | None:
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as npz:
            return ImageArrays(torch.from_numpy(npz["images"]), torch.from_numpy(npz["labels"]))
    except (OSError, ValueError, KeyError, zipfile.BadZipFile):
        return None  # unreadable cache: rebuilt by the caller


def _write_cache(cache_dir: Path, name: str, stale_prefix: str, arrays: ImageArrays) -> None:
    """Write atomically (temporary file, then rename) and delete the caches of earlier versions of
    the same split there. A cache that cannot be written is a warning, not an error."""
    tmp = None
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=cache_dir, prefix=f".{name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            np.savez(f, images=arrays.images.numpy(), labels=arrays.labels.numpy())
        os.chmod(tmp, 0o644)  # mkstemp makes it private; others may share this cache
        os.replace(tmp, cache_dir / name)
    except OSError as error:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        warnings.warn(
            f"could not write the decoded-image cache to {cache_dir} ({error}); the folder will "
            "be decoded again next time. Point data.cache_dir at a writable folder, or set it "
            "to null to skip caching",
            stacklevel=3,
        )
        return
    for old in cache_dir.glob(f"{stale_prefix}*.npz"):
        if old.name != name:
            old.unlink(missing_ok=True)
