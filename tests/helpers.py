"""Small builders shared by the tests."""

from pathlib import Path

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
    """A tiny generated CIFAR copy in image-folder layout (root/{train,test}/<class>/NNNN.png)."""
    from gompertz_kd.data import make_synthetic_folder

    return make_synthetic_folder(root, dataset, train_per_class, test_per_class, seed)


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


class SendSignalInValidation(L.Callback):
    """Sends a real signal to this process during the validation of epoch ``epoch``."""

    def __init__(self, epoch: int, signum: int = 15):
        self.epoch = epoch
        self.signum = signum

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        import os

        if not trainer.sanity_checking and trainer.current_epoch == self.epoch and batch_idx == 0:
            os.kill(os.getpid(), self.signum)


def tiny_kd_overrides(root, out, teacher_cache, max_epochs: int = 1) -> list[str]:
    """Hydra overrides of a short resnet20 -> resnet8 KD run on the tiny CIFAR-10 folder ``root``:
    batch 4, a one-epoch teacher cached in ``teacher_cache``, the decoded data cached beside it
    (``data_cache``), the run written to ``out``, no config printout or progress bar."""
    return [
        "data=cifar10",
        "data.source=folder",
        f"data.root={root}",
        "data.batch_size=4",
        "model=resnet20_resnet8",
        "method=gkd",
        "teacher.recipe.max_epochs=1",
        f"trainer.max_epochs={max_epochs}",
        f"paths.output_dir={out}",
        f"paths.teacher_cache={teacher_cache}",
        f"paths.data_cache={Path(teacher_cache).parent / 'data_cache'}",
        "print_config=false",
        "callbacks.rich_progress_bar=null",
    ]


class KillAt(L.Callback):
    """SIGKILLs this process, no handler running (crash tests): at the start of training step
    ``step`` (``where="step"``), or in the middle of the first checkpoint write at or after that
    step (``where="save"``: half the bytes reach the ``.partial`` file, then the kill). With
    ``seed``, only in the run seeded with it (one job of a sweep)."""

    def __init__(self, step: int, where: str = "step", seed: int | None = None):
        if where not in ("step", "save"):
            raise ValueError(f"where must be 'step' or 'save', got {where!r}")
        self.step, self.where, self.seed = step, where, seed

    def _armed(self) -> bool:
        return self.seed is None or torch.initial_seed() == self.seed

    def setup(self, trainer, pl_module, stage):
        if self.where != "save" or not self._armed():
            return
        import io
        import os
        import signal

        from gompertz_kd.checkpoints import AtomicCheckpointIO

        original, kill = AtomicCheckpointIO._write, self

        def write(checkpoint, partial):
            if trainer.global_step >= kill.step:
                buffer = io.BytesIO()
                torch.save(checkpoint, buffer)
                data = buffer.getvalue()
                with open(partial, "wb") as f:
                    f.write(data[: len(data) // 2])
                    f.flush()
                    os.fsync(f.fileno())
                os.kill(os.getpid(), signal.SIGKILL)
            original(checkpoint, partial)

        AtomicCheckpointIO._write = staticmethod(write)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        import os
        import signal

        if self.where == "step" and self._armed() and trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)
