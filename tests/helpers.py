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


def make_cifar_folder(
    root, dataset: str = "cifar10", train_per_class: int = 4, test_per_class: int = 2, seed: int = 0
):
    """Write a tiny CIFAR copy in image-folder layout (root/{train,test}/<class>/NNNN.png).

    Each class gets its own mean colour, so a network can learn the task in a few steps."""
    from pathlib import Path

    import numpy as np
    from PIL import Image

    from gompertz_kd.data import CLASSES

    root = Path(root)
    rng = np.random.default_rng(seed)
    for split, count in (("train", train_per_class), ("test", test_per_class)):
        for k, name in enumerate(CLASSES[dataset]):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            base = np.array(
                [(k * 25) % 256, (k * 70) % 256, (255 - k * 25) % 256], dtype=np.float64
            )
            for i in range(count):
                pixels = np.clip(base + rng.normal(0, 30, size=(32, 32, 3)), 0, 255).astype(
                    np.uint8
                )
                Image.fromarray(pixels).save(folder / f"{i:04d}.png")
    return root


class DumpStudentWeights(L.Callback):
    """Saves the student's weights of every process at the end of training (DDP tests)."""

    def on_train_end(self, trainer, pl_module):
        from pathlib import Path

        path = Path(trainer.default_root_dir) / f"student_rank{trainer.global_rank}.pt"
        torch.save(pl_module.student.state_dict(), path)


class SendSignalAt(L.Callback):
    """Sends a real signal to this process at the start of one training step (interruption tests)."""

    def __init__(self, step: int, signum: int = 15):
        self.step = step
        self.signum = signum

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        import os

        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.signum)
