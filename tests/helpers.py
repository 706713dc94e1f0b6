"""Small builders shared by the tests."""

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset


def random_loader(
    n: int = 16, num_classes: int = 10, batch_size: int = 4, seed: int = 0
) -> DataLoader:
    """A loader of random 32x32 images and labels (tests make their own data)."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, 32, 32, generator=g)
    labels = torch.randint(0, num_classes, (n,), generator=g)
    return DataLoader(TensorDataset(images, labels), batch_size=batch_size, shuffle=False)


def cpu_trainer(**kwargs) -> L.Trainer:
    defaults = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    defaults.update(kwargs)
    return L.Trainer(**defaults)
