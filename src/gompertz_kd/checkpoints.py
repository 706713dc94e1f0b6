"""Reading model weights from checkpoint files, safely and with clear errors.

Teachers arrive in three shapes, all read with ``torch.load(..., weights_only=True)`` so that a
file can never run code while it is read:

- a gompertz_kd (Lightning) checkpoint of a student-only run — how :mod:`gompertz_kd` trains
  teachers; the weights are those under ``state_dict["student.*"]``;
- the benchmark zoo's files (CRD / RepDistiller, mdistiller): ``{"model": state_dict, ...}``;
- a bare ``state_dict`` (``torch.save(model.state_dict(), f)``).
"""

from __future__ import annotations

import collections
import pickle
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from gompertz_kd import schedules

__all__ = ["CheckpointError", "SAFE_GLOBALS", "load_weights", "read_state_dict"]

# Plain-data classes that gompertz_kd's own Lightning checkpoints hold (hyper-parameters and LR
# scheduler state). Nothing here runs code when unpickled.
SAFE_GLOBALS: list[type] = [
    collections.Counter,
    collections.OrderedDict,
    collections.defaultdict,
    schedules.Gompertz,
    schedules.Constant,
    schedules.LinearWarmup,
    schedules.CosineDecay,
    schedules.Logistic,
    schedules.Stage,
]
# Registered once for every weights-only load in the process, so that Lightning's own
# ``trainer.fit(ckpt_path=...)`` resumes gompertz_kd checkpoints without weights_only=False.
torch.serialization.add_safe_globals(SAFE_GLOBALS)


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used: unsafe, corrupt, or for another model."""


def read_state_dict(path: str | Path, prefix: str = "student.") -> dict[str, Tensor]:
    """Read a state dict from any of the supported checkpoint shapes.

    Args:
        path: checkpoint file.
        prefix: in a Lightning checkpoint, the sub-module whose weights to return.

    Raises:
        FileNotFoundError: the file does not exist.
        CheckpointError: the file is truncated or corrupt, needs arbitrary code to load, or holds
            no tensors under any of the known layouts.
    """
    path = Path(path).expanduser().resolve()
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"{path} was refused: loading it would need arbitrary Python objects, and a checkpoint "
            "file can run code while such objects are unpickled. If you trust the file, re-save "
            "its weights alone with `torch.save(model.state_dict(), 'weights.pt')` and point to "
            f"that file. (torch said: {str(err).splitlines()[0]})"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise CheckpointError(
            f"{path} could not be read ({type(err).__name__}: {err}); the file is truncated or "
            "not a PyTorch checkpoint. Download or copy it again."
        ) from None
    return _extract_state_dict(obj, path, prefix)


def _extract_state_dict(obj: object, path: Path, prefix: str) -> dict[str, Tensor]:
    if isinstance(obj, Mapping):
        if "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
            inner = obj["state_dict"]
            picked = {k[len(prefix) :]: v for k, v in inner.items() if k.startswith(prefix)}
            if picked:
                return picked
            obj = inner
        elif "model" in obj and isinstance(obj["model"], Mapping):
            obj = obj["model"]
        tensors = {k: v for k, v in obj.items() if isinstance(v, Tensor)}
        if tensors:
            # Weights saved from nn.DataParallel / DDP wrappers carry a "module." prefix.
            if all(k.startswith("module.") for k in tensors):
                tensors = {k[len("module.") :]: v for k, v in tensors.items()}
            return tensors
    raise CheckpointError(
        f"{path} holds no model weights under any known layout (a Lightning checkpoint, "
        '{"model": state_dict}, or a bare state_dict).'
    )


def load_weights(model: nn.Module, path: str | Path, description: str) -> None:
    """Load ``path`` into ``model`` strictly; on mismatch, say what differs.

    Args:
        model: the freshly built network.
        path: checkpoint file (see :func:`read_state_dict`).
        description: what ``model`` is, for messages, e.g. ``"teacher ResNet50 with 100 classes"``.

    Raises:
        FileNotFoundError, CheckpointError: see :func:`read_state_dict`; ``CheckpointError`` also
            when keys or shapes disagree, naming the first differences (a different class count
            shows up as the classifier's shape).
    """
    state = read_state_dict(path)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    if missing or unexpected or mismatched:
        problems = []
        if mismatched:
            problems.append("shapes differ for " + "; ".join(mismatched[:3]))
        if missing:
            problems.append(f"{len(missing)} weights missing from the file (e.g. {missing[:3]})")
        if unexpected:
            problems.append(
                f"{len(unexpected)} unknown weights in the file (e.g. {unexpected[:3]})"
            )
        raise CheckpointError(
            f"{Path(path).resolve()} does not fit the {description}: "
            + "; ".join(problems)
            + ". Check the architecture name and the class count the file was trained with."
        )
    model.load_state_dict(state, strict=True)
