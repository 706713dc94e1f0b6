"""CIFAR-10 / CIFAR-100 data: the DataModule, its two sources and its two augmentation paths.

``CIFARDataModule("cifar100", root="data")`` reads the official archive (downloading it if
allowed); ``CIFARDataModule("cifar10", root="data/cifar10-jpeg", source="folder")`` reads an
image-folder copy. Either way ``trainer.fit(module, datamodule=dm)`` hands ``training_step``
float32 ``(N, 3, 32, 32)`` normalised images and int64 ``(N,)`` labels, and with
``with_indices=True`` also int64 ``(N,)`` indices of the images in the training set.
"""

from gompertz_kd.data.datamodule import SOURCES, CIFARDataModule, stratified_holdout
from gompertz_kd.data.loaders import (
    EpochSampler,
    ImageDataset,
    ResumableDataLoader,
    TensorBatchLoader,
)
from gompertz_kd.data.sources import CLASSES, DATASETS, ImageArrays, load_folder, load_torchvision
from gompertz_kd.data.synthetic import make_synthetic_folder
from gompertz_kd.data.transforms import (
    AUGMENTS,
    BATCHED_AUGMENTS,
    CUTOUT_SIZE,
    MEAN_STD,
    BatchTransform,
    Cutout,
    batch_transform,
    image_transform,
)

__all__ = [
    "AUGMENTS",
    "BATCHED_AUGMENTS",
    "CLASSES",
    "CUTOUT_SIZE",
    "DATASETS",
    "MEAN_STD",
    "SOURCES",
    "BatchTransform",
    "CIFARDataModule",
    "Cutout",
    "EpochSampler",
    "ImageArrays",
    "ImageDataset",
    "ResumableDataLoader",
    "TensorBatchLoader",
    "batch_transform",
    "image_transform",
    "load_folder",
    "load_torchvision",
    "make_synthetic_folder",
    "stratified_holdout",
]
