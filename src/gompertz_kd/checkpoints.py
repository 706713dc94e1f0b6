"""Reading model weights from checkpoint files, safely and with clear errors.

Teachers arrive in three shapes, all read with ``torch.load(..., weights_only=True)`` so that a
file can never run code while it is read:

- a gompertz_kd (Lightning) checkpoint of a student-only run — how :mod:`gompertz_kd` trains
  teachers; the weights are those under ``state_dict["student.*"]``;
- the benchmark zoo's files (CRD / RepDistiller, mdistiller): ``{"model": state_dict, ...}``;
- a bare ``state_dict`` (``torch.save(model.state_dict(), f)``).
"""

from __future__ import annotations

import codecs
import collections
import logging
import os
import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from torch import Tensor, nn

from gompertz_kd import schedules

__all__ = [
    "AtomicCheckpointIO",
    "CheckpointError",
    "SAFE_GLOBALS",
    "TRAINING_STATE",
    "check_training_checkpoint_fits",
    "check_weights",
    "load_weights",
    "newest_valid_checkpoint",
    "read_checkpoint",
    "read_state_dict",
    "read_training_checkpoint",
    "weight_differences",
]

log = logging.getLogger(__name__)

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


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer, made crash-safe: the file is written beside its target as
    ``<name>.partial``, flushed to disk (fsync), then renamed over the target (``os.replace``,
    atomic within a directory) and the directory entry flushed too. A run killed at any moment
    (SIGKILL, power loss) leaves either the previous complete checkpoint or the new one, plus at
    most a ``.partial`` file that nothing reads.

    Lightning 2.6's own ``_atomic_save`` writes to the system temporary directory and then moves
    the file with ``shutil.move``: a copy, not atomic, when the run directory is on another file
    system; and it does not fsync.
    """

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        if storage_options is not None:
            raise TypeError(
                f"{type(self).__name__} takes no storage_options, got {storage_options!r}"
            )
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + ".partial")
        self._write(checkpoint, partial)
        os.replace(partial, path)
        _fsync_directory(path.parent)

    @staticmethod
    def _write(checkpoint: Mapping, partial: Path) -> None:
        with open(partial, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())


def _fsync_directory(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # a platform or file system without directory handles
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used: unsafe, corrupt, or for another model."""


# What torch.save writes: a zip archive (the format since PyTorch 1.6; Lightning's too), or, with
# `_use_new_zipfile_serialization=False`, a pickle stream (protocol 2 and up starts with 0x80).
_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")
_PICKLE_PROTOCOLS = range(2, 6)


def read_checkpoint(
    path: str | Path, name: str | None = None, fix: str | None = None, mmap: bool = False
) -> object:
    """The object saved in ``path``, read with ``torch.load(map_location="cpu",
    weights_only=True)``; every way the file can be unusable ends in one message that says what
    the file is.

    Args:
        path: checkpoint file.
        name: how messages call the file, e.g. ``"teacher.ckpt=/x/r56.pth"`` (default: its path).
        fix: what the user should do, appended to every message.
        mmap: map a zip-format file's tensors instead of reading them (for a look at the keys and
            shapes of a large checkpoint).

    Raises:
        FileNotFoundError: nothing exists at ``path``.
        CheckpointError: ``path`` is a directory, an empty file, a text or other non-PyTorch file,
            truncated or corrupt, or needs arbitrary code to load.
    """
    path = Path(path).expanduser().resolve()
    name = name or str(path)

    def error(problem: str) -> CheckpointError:
        return CheckpointError(f"{name} {problem}" + (f"; {fix}" if fix else ""))

    if path.is_dir():
        inside = _checkpoints_in(path)
        hint = f" (it holds {', '.join(inside)})" if inside else ""
        raise error(f"is a directory, not a checkpoint file{hint}")
    if not path.is_file():
        raise FileNotFoundError(f"{name}: checkpoint not found ({path})")
    with path.open("rb") as f:
        start = f.read(64)
    if not start:
        raise error("is an empty file (0 bytes), not a checkpoint")
    is_zip = start.startswith(_ZIP_MAGIC)
    if not (is_zip or (start[0] == 0x80 and len(start) > 1 and start[1] in _PICKLE_PROTOCOLS)):
        # torch.load would take such a file for a legacy pickle and fail with an opcode error
        # (a text file starting with "h" ends in KeyError(104)), or call it unsafe: say what it is.
        raise error(f"is {_describe_bytes(start)}, not a PyTorch checkpoint")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap and is_zip)
    except pickle.UnpicklingError as err:
        if "Weights only load failed" not in str(err):  # a broken stream, not a refused one
            raise error(f"is truncated or corrupt ({_first_line(err)})") from None
        raise error(
            "was refused: loading it would need arbitrary Python objects, and a checkpoint file "
            "can run code while such objects are unpickled. If you trust the file, re-save its "
            "weights alone with `torch.save(model.state_dict(), 'weights.pt')` and point to that "
            f"file. (torch said: {_first_line(err)})"
        ) from None
    except Exception as err:  # torch raises any kind of error on a damaged archive
        what = "zip archive" if is_zip else "pickle stream"
        said = ": ".join(filter(None, (type(err).__name__, _first_line(err))))
        raise error(
            f"is truncated or corrupt: torch could not read it as a {what} ({said}). A copy or "
            "download that did not finish, or a run killed while writing it, leaves such a file"
        ) from None


def _describe_bytes(start: bytes) -> str:
    try:
        # incremental: a character cut at the end of `start` is not a decoding error
        text = codecs.getincrementaldecoder("utf-8")().decode(start)
    except UnicodeDecodeError:
        text = None
    if text is not None and all(c.isprintable() or c in "\t\r\n" for c in text):
        return f"a text file beginning {text[:40]!r}"
    return f"a binary file beginning {start[:16]!r}"


def _first_line(err: BaseException) -> str:
    """The gist of a torch error: the unpickler's own complaint if there is one, else the first
    sentence (torch's messages run on with advice that does not apply here)."""
    text = str(err).strip()
    unpickler = re.search(r"WeightsUnpickler error:\s*(.+)", text)
    line = unpickler.group(1) if unpickler else (text.splitlines() or [""])[0]
    return line.split(". ")[0].rstrip(".")


def _checkpoints_in(directory: Path, limit: int = 3) -> list[str]:
    """A few checkpoint files in ``directory`` or its ``checkpoints/`` folder, newest first."""
    found = [
        p
        for pattern in ("*.ckpt", "*.pt", "*.pth", "checkpoints/*.ckpt")
        for p in directory.glob(pattern)
        if p.is_file()
    ]
    found.sort(key=lambda p: p.stat().st_mtime, reverse=True)
    return [str(p.relative_to(directory)) for p in found[:limit]]


def read_state_dict(
    path: str | Path, prefix: str = "student.", name: str | None = None, fix: str | None = None
) -> dict[str, Tensor]:
    """Read a state dict from any of the supported checkpoint shapes.

    Args:
        path: checkpoint file.
        prefix: in a Lightning checkpoint, the sub-module whose weights to return.
        name, fix: how messages call the file and what they advise (see :func:`read_checkpoint`).

    Raises:
        FileNotFoundError: the file does not exist.
        CheckpointError: see :func:`read_checkpoint`; also when the file holds no tensors under any
            of the known layouts.
    """
    obj = read_checkpoint(path, name=name, fix=fix)
    return _extract_state_dict(obj, name or str(Path(path).expanduser().resolve()), prefix, fix)


def _extract_state_dict(obj: object, name: str, prefix: str, fix: str | None) -> dict[str, Tensor]:
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
        f"{name} holds no model weights under any known layout (a Lightning checkpoint, "
        '{"model": state_dict}, or a bare state_dict)' + (f"; {fix}" if fix else ".")
    )


def weight_differences(
    file_state: Mapping[str, object], expected: Mapping[str, object], limit: int = 3
) -> list[str]:
    """What keeps ``file_state`` from loading strictly where ``expected`` is the state dict (only
    keys and shapes are compared, so ``expected`` may live on the meta device).

    Returns:
        One phrase per kind of difference, naming the first ``limit`` keys, e.g. ``["shapes differ
        for fc.weight: file (100, 64) vs model (10, 64)", "2 weights missing from the file
        (objective.terms.crd.embed_s.linear.weight, ...)"]``; empty when the file fits.
    """
    missing = [k for k in expected if k not in file_state]
    unexpected = [k for k in file_state if k not in expected]
    mismatched = [
        f"{k}: file {tuple(file_state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if isinstance(v, Tensor)
        and isinstance(file_state.get(k), Tensor)
        and file_state[k].shape != v.shape
    ]

    def first(keys: list[str]) -> str:
        return ", ".join(keys[:limit]) + (", ..." if len(keys) > limit else "")

    problems = []
    if mismatched:
        problems.append("shapes differ for " + "; ".join(mismatched[:limit]))
    if missing:
        problems.append(f"{len(missing)} weights missing from the file ({first(missing)})")
    if unexpected:
        problems.append(f"{len(unexpected)} unknown weights in the file ({first(unexpected)})")
    return problems


def check_weights(
    model: nn.Module,
    path: str | Path,
    description: str,
    name: str | None = None,
    fix: str | None = None,
) -> dict[str, Tensor]:
    """Read ``path``'s weights and check that they load strictly into ``model``, leaving ``model``
    untouched (it may live on the meta device: only keys and shapes are compared).

    Args:
        model: the network the weights are for.
        path: checkpoint file (see :func:`read_state_dict`).
        description: what ``model`` is, for messages, e.g. ``"teacher ResNet50 with 100 classes"``.
        name, fix: how messages call the file and what they advise (see :func:`read_checkpoint`);
            without ``fix``, a mismatch says to check the architecture and class count.

    Returns:
        The weights read.

    Raises:
        FileNotFoundError, CheckpointError: see :func:`read_state_dict`; ``CheckpointError`` also
            when keys or shapes disagree, naming the first differences (a different class count
            shows up as the classifier's shape).
    """
    name = name or str(Path(path).expanduser().resolve())
    obj = read_checkpoint(path, name=name, fix=fix)
    state = _extract_state_dict(obj, name, "student.", fix)
    problems = weight_differences(state, model.state_dict())
    if problems:
        raise CheckpointError(
            f"{name}{_run_origin(obj)} does not fit the {description}: "
            + "; ".join(problems)
            + (
                f"; {fix}"
                if fix
                else ". Check the architecture name and the class count the file was trained with."
            )
        )
    return state


def _run_origin(obj: object) -> str:
    """For a gompertz_kd checkpoint, whose weights are read: " (a run's checkpoint: the weights
    read are its student's, a resnet8)"; else ""."""
    hparams = obj.get("hyper_parameters") if isinstance(obj, Mapping) else None
    student = hparams.get("student") if isinstance(hparams, Mapping) else None
    if not isinstance(student, str):
        return ""
    return f" (a run's checkpoint: the weights read are its student's, a {student})"


def load_weights(
    model: nn.Module,
    path: str | Path,
    description: str,
    name: str | None = None,
    fix: str | None = None,
) -> None:
    """Load ``path`` into ``model`` strictly; on mismatch, say what differs.

    Args and raises: see :func:`check_weights`.
    """
    model.load_state_dict(check_weights(model, path, description, name=name, fix=fix), strict=True)


# ---------------------------------------------------------------------- training checkpoints
def newest_valid_checkpoint(directory: Path) -> tuple[Path, str, Mapping[str, Any]]:
    """What ``ckpt_path=last`` resumes from: ``directory/last.ckpt``, or, when that is missing or
    damaged (a hard kill on a file system without atomic renames, a full disk), the valid
    checkpoint of ``directory`` with the highest step, with a warning naming both. ``.partial``
    files (writes a kill interrupted) are never read.

    Raises:
        FileNotFoundError: no checkpoint in ``directory``.
        CheckpointError: checkpoints there, none of them usable (each one's problem named).
    """
    last = directory / "last.ckpt"
    others = sorted(p for p in directory.glob("*.ckpt") if p.is_file() and p != last)
    if not last.is_file() and not others:
        raise FileNotFoundError(
            f"ckpt_path=last: no checkpoint at {last}. Resume inside the interrupted run's "
            "directory (hydra.run.dir=<that run dir>) or give ckpt_path=<file>."
        )
    problems = []
    if last.is_file():
        name = f"ckpt_path=last ({last})"
        try:
            return last, name, read_training_checkpoint(last, name)
        except CheckpointError as error:
            problems.append(str(error))
    else:
        problems.append(f"{last} is missing")
    valid = []
    for path in others:
        name = f"ckpt_path=last ({path})"
        try:
            ckpt = read_training_checkpoint(path, name)
        except CheckpointError as error:
            problems.append(str(error))
            continue
        valid.append((int(ckpt["global_step"]), path.stat().st_mtime, path, name, ckpt))
    if not valid:
        raise CheckpointError(
            f"ckpt_path=last: no usable checkpoint in {directory}: "
            + " | ".join(problems)
            + ". Start afresh without ckpt_path (in a new run directory)"
        )
    step, _, path, name, ckpt = max(valid, key=lambda v: (v[0], v[1]))
    log.warning(
        "ckpt_path=last: %s; resuming from the newest valid checkpoint instead, %s (step %d)",
        problems[0],
        path,
        step,
    )
    return path, name, ckpt


# What Lightning's trainer.fit(ckpt_path=...) restores from; a weights-only save lacks the last two.
TRAINING_STATE = ("state_dict", "epoch", "global_step", "optimizer_states", "lr_schedulers")


def read_training_checkpoint(path: Path, name: str) -> Mapping[str, Any]:
    """The checkpoint at ``path``, read with mmap (keys, shapes and counters are all the checks
    need, whatever its size), refused before training starts when Lightning would fail on it
    midway or with torch's own words: not a checkpoint, truncated, or weights only.

    Raises:
        CheckpointError: ``<name> is ...``, what is wrong and what to do.
    """
    others = [p.name for p in sorted(path.parent.glob("*.ckpt")) if p != path and p.is_file()]
    elsewhere = f" (the other checkpoints there: {', '.join(others[:3])})" if others else ""
    fix = (
        "give a checkpoint that a run of this config wrote" + elsewhere + ", or start afresh "
        "without ckpt_path"
    )
    ckpt = read_checkpoint(path, name=name, fix=fix, mmap=True)
    if not isinstance(ckpt, Mapping):
        raise CheckpointError(
            f"{name} holds a {type(ckpt).__name__}, not a Lightning training checkpoint; {fix}"
        )
    lacking = [key for key in TRAINING_STATE if key not in ckpt]
    if "state_dict" in lacking:
        weights = "model" in ckpt or (
            ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values())
        )
        if weights:
            raise CheckpointError(
                f"{name} holds model weights only, not a training checkpoint: there is no epoch, "
                "optimiser or LR-scheduler state to resume. To distil from it, set "
                f"teacher.ckpt={path}; to train, start afresh without ckpt_path"
            )
        raise CheckpointError(
            f"{name} is not a Lightning training checkpoint: it has no "
            f"{', '.join(lacking)} (its keys: {', '.join(map(str, list(ckpt)[:6]))}); {fix}"
        )
    if lacking:
        raise CheckpointError(
            f"{name} was saved with the weights only (ModelCheckpoint save_weights_only=true, or "
            f"trainer.save_checkpoint(weights_only=True)): it has no {', '.join(lacking)} to "
            "resume from. Start afresh without ckpt_path (to distil from its student, set "
            f"teacher.ckpt={path})"
        )
    return ckpt


def check_training_checkpoint_fits(
    ckpt: Mapping[str, Any], name: str, expected: Mapping[str, Any]
) -> None:
    """Refuse a resume checkpoint of another model or objective: keys or shapes that differ from
    ``expected``, the run's module's ``state_dict()``.

    Raises:
        CheckpointError: naming the first differences and the run that wrote the file.
    """
    problems = weight_differences(ckpt["state_dict"], expected)
    if problems:
        hparams = ckpt.get("hyper_parameters") or {}
        written_by = ", ".join(
            f"{key}={hparams[key]}" for key in ("student", "teacher") if key in hparams
        )
        raise CheckpointError(
            f"{name} is a checkpoint of another model or objective"
            + (f" (its run: {written_by})" if written_by else "")
            + ": "
            + "; ".join(problems)
            + "; resume with the config of the run that wrote it, or start afresh without "
            "ckpt_path"
        )
