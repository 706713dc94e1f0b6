"""CIFARDataModule(with_indices=True): training batches carry each image's training-set index."""

from types import SimpleNamespace

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn

from gompertz_kd.config import CONFIG_DIR
from gompertz_kd.data import MEAN_STD, CIFARDataModule, ImageArrays, sources, stratified_holdout

from helpers import cpu_trainer, make_cifar_folder

PATHS = pytest.mark.parametrize("on_device", [True, False], ids=["tensor", "per_image"])
VAL_SPLIT = 10  # of the 40 training images of the tiny folder


@pytest.fixture(scope="module")
def tiny_c10(tmp_path_factory):
    """40 training images (4 per class), 10 test images."""
    return make_cifar_folder(tmp_path_factory.mktemp("c10"), "cifar10", 4, 1)


def _folder_dm(root, **kwargs) -> CIFARDataModule:
    args = dict(root=root, source="folder", batch_size=8, num_workers=0, val_split=VAL_SPLIT)
    return CIFARDataModule(**{**args, **kwargs})


def _arrays(n: int) -> ImageArrays:
    """Random images with real-looking labels (10 classes): labels are not the indices."""
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=generator)
    return ImageArrays(images, torch.arange(n) % 10)


def _dm_with(train: ImageArrays, **kwargs) -> CIFARDataModule:
    """A DataModule whose splits are already in memory (no source is read)."""
    dm = CIFARDataModule(**{"num_workers": 0, "batch_size": 8, **kwargs})
    dm.train_arrays = dm.val_arrays = dm.test_arrays = train
    return dm


def _rank(rank: int, world_size: int) -> SimpleNamespace:
    """What the DataModule reads from a trainer, for one simulated DDP rank."""
    strategy = SimpleNamespace(root_device=torch.device("cpu"))
    return SimpleNamespace(global_rank=rank, world_size=world_size, strategy=strategy)


def _pixels(images: torch.Tensor) -> torch.Tensor:
    """Normalised (augment="none") CIFAR-10 images back to uint8 pixels."""
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in MEAN_STD["cifar10"])
    return ((images * std + mean) * 255).round().to(torch.uint8)


def _epochs(loader, count: int = 2) -> list[list[tuple[torch.Tensor, ...]]]:
    return [list(loader) for _ in range(count)]


# ---------------------------------------------------------------------------------------------
# what the indices are


@PATHS
def test_indices_name_each_kept_training_image_once_per_epoch(tiny_c10, on_device):
    dm = _folder_dm(tiny_c10, augment="none", on_device=on_device, with_indices=True)
    dm.setup("fit")
    assert dm.uses_tensor_path is on_device
    assert dm.num_train_samples == 40 - VAL_SPLIT
    full = sources.load_folder("cifar10", tiny_c10, "train")
    kept, held_out = stratified_holdout(full.labels, VAL_SPLIT, seed=dm.seed)
    for epoch in _epochs(dm.train_dataloader()):
        seen = []
        for images, targets, indices in epoch:
            assert indices.dtype == torch.int64 and indices.shape == targets.shape
            assert indices.device == targets.device
            # the image and label at that index of the training set, which is the full split
            # less the held-out images
            assert torch.equal(_pixels(images), dm.train_arrays.images[indices])
            assert torch.equal(_pixels(images), full.images[kept[indices]])
            assert torch.equal(targets, full.labels[kept[indices]])
            assert not set(kept[indices].tolist()) & set(held_out.tolist())
            seen += indices.tolist()
        assert sorted(seen) == list(range(dm.num_train_samples))
    assert seen != sorted(seen)  # shuffled, yet each index still names its own image
    for images, targets, *rest in dm.val_dataloader():
        assert rest == [] and len(images) == len(targets)


@pytest.mark.parametrize(
    ("on_device", "augment", "workers"),
    [(True, "cutout", 0), (False, "standard", 0), (False, "standard", 2)],
)
def test_indices_change_nothing_else_in_the_batches(on_device, augment, workers):
    train = _arrays(44)

    def batches(with_indices: bool, num_workers: int):
        dm = _dm_with(
            train, on_device=on_device, augment=augment, seed=3, num_workers=num_workers,
            with_indices=with_indices,
        )  # fmt: skip
        return _epochs(dm.train_dataloader())

    without = batches(False, 0)
    with_ = batches(True, workers)
    assert {len(batch) for epoch in without for batch in epoch} == {2}
    for epoch_without, epoch_with in zip(without, with_, strict=True):
        assert len(epoch_without) == len(epoch_with)
        for (images, targets), (images_i, targets_i, indices) in zip(
            epoch_without, epoch_with, strict=True
        ):
            assert torch.equal(images, images_i) and torch.equal(targets, targets_i)
            assert torch.equal(targets, train.labels[indices])
    if workers:  # the indices do not depend on the worker count either
        in_process = batches(True, 0)
        for a, b in zip(sum(with_, []), sum(in_process, []), strict=True):
            assert torch.equal(a[2], b[2])


@PATHS
def test_two_ranks_cover_every_index_once_per_epoch(on_device):
    train = _arrays(40)
    loaders = []
    for rank in (0, 1):
        dm = _dm_with(train, on_device=on_device, augment="none", seed=1, with_indices=True)
        dm.trainer = _rank(rank, 2)
        loaders.append(dm.train_dataloader())
    for _ in range(2):
        shards = []
        for loader in loaders:
            shard = []
            for images, targets, indices in loader:
                assert torch.equal(_pixels(images), train.images[indices])
                assert torch.equal(targets, train.labels[indices])
                shard += indices.tolist()
            shards.append(shard)
        assert len(shards[0]) == len(shards[1]) == 20
        assert sorted(shards[0] + shards[1]) == list(range(40))


@PATHS
def test_a_resumed_epoch_continues_with_the_same_indices(on_device):
    train = _arrays(40)

    def loader(consumed: int = 0):
        dm = _dm_with(train, on_device=on_device, seed=3, with_indices=True)
        dm._consumed_train_batches = lambda: consumed
        return dm.train_dataloader()

    reference = loader()
    epoch1 = _epochs(reference)[1]
    assert loader(consumed=2).state_dict()["batches"] == 2
    restarted = loader()  # a fresh loader, as after a restart mid-epoch 1
    restarted.load_state_dict({"epoch": 1, "batches": 2})
    restarted.sampler.set_epoch(1)  # as Lightning does before the resumed epoch
    rest = list(restarted)
    assert len(rest) == len(epoch1) - 2
    for got, want in zip(rest, epoch1[2:], strict=True):
        assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))


# ---------------------------------------------------------------------------------------------
# the DataModule's API and a real Trainer


def test_num_train_samples_needs_setup_and_setup_is_idempotent(tiny_c10):
    dm = _folder_dm(tiny_c10)
    with pytest.raises(RuntimeError, match="setup\\('fit'\\)"):
        dm.num_train_samples  # noqa: B018
    dm.setup("fit")
    train, val = dm.train_arrays, dm.val_arrays
    assert dm.num_train_samples == 30
    dm.setup("fit")  # as trainer.fit does after an early call
    dm.setup(None)
    assert dm.train_arrays is train and dm.val_arrays is val and dm.num_train_samples == 30
    whole = _folder_dm(tiny_c10, val_split=0)
    whole.setup("fit")
    assert whole.num_train_samples == 40


def test_with_indices_is_checked_and_recorded_in_hparams():
    dm = CIFARDataModule()
    assert dm.with_indices is False and dm.hparams["with_indices"] is False
    dm.with_indices = True
    assert dm.hparams["with_indices"] is True
    with pytest.raises(ValueError, match="with_indices must be True or False, got 'yes'"):
        CIFARDataModule(with_indices="yes")


@pytest.mark.parametrize("data", ["cifar10", "cifar100", "cifar10_folder", "cifar100_folder"])
def test_every_data_config_defaults_to_no_indices(data):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(f"data/{data}")  # the data group alone: what train.yaml puts around it
    cfg = OmegaConf.merge({"paths": {"data_dir": "data", "data_cache": None}, "seed": 0}, cfg)
    assert cfg.data.with_indices is False
    assert instantiate(cfg.data).with_indices is False  # the key is the constructor's argument


class _IndexProbe(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(3 * 32 * 32, 10)
        self.seen: list[tuple[int, list[int], list[int]]] = []
        self.val_batch_lengths: set[int] = set()

    def training_step(self, batch, batch_idx):
        images, targets, indices = batch
        self.seen.append((self.current_epoch, indices.tolist(), targets.tolist()))
        return F.cross_entropy(self.net(images.flatten(1)), targets)

    def validation_step(self, batch, batch_idx):
        self.val_batch_lengths.add(len(batch))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


class _SaveAt(L.Callback):
    """Saves a checkpoint after the training step that makes ``global_step == step``."""

    def __init__(self, step: int, path) -> None:
        self.step, self.path = step, path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            trainer.save_checkpoint(self.path)


@PATHS
def test_trainer_gets_indices_set_late_and_resumes_them(tiny_c10, tmp_path, on_device):
    def module_and_data():
        dm = _folder_dm(tiny_c10, on_device=on_device, seed=2)
        dm.setup("fit")  # early, as the training code does to size a memory bank
        dm.with_indices = True  # after construction, before the trainer asks for loaders
        return _IndexProbe(), dm

    ckpt = tmp_path / "mid.ckpt"
    full, dm = module_and_data()
    train = dm.train_arrays
    cpu_trainer(max_epochs=2, callbacks=[_SaveAt(6, ckpt)]).fit(full, datamodule=dm)
    assert dm.train_arrays is train  # Lightning's own setup call kept what was loaded
    assert [len(i) for _, i, _ in full.seen] == [8, 8, 8, 6] * 2 and full.val_batch_lengths == {2}
    for epoch in (0, 1):
        indices = sum((i for e, i, _ in full.seen if e == epoch), [])
        assert sorted(indices) == list(range(dm.num_train_samples))
    for _, indices, targets in full.seen:
        assert train.labels[indices].tolist() == targets

    resumed, dm = module_and_data()
    cpu_trainer(max_epochs=2).fit(resumed, datamodule=dm, ckpt_path=ckpt)
    assert resumed.seen == full.seen[6:]  # the rest of epoch 1, same indices in the same order
