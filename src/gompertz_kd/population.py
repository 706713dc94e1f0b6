"""Population runs: many students learn from one teacher pass.

(One file above 700 lines, on purpose: the module, its two callbacks, the member configuration
and the run are one concept that a reader follows top to bottom; each part is a section below.)

A *population* trains K *members* in one run. Each member is a student with its own objective
(method, scales, schedules, progress mode) and its own initialisation seed, built exactly as a
single run of the same configuration builds its :class:`~gompertz_kd.module.DistillationModule`.
All members see the same batches in the same order (one DataModule, one data seed). Per batch the
frozen teacher runs once, computing what the members' terms need (its outputs; its input gradient
when a gradient-matching member is due), and every member trains on it. The members' parameters
are disjoint, so one backward of the summed member losses and one optimiser give each member
exactly the gradients and updates it would get alone (on the CPU in fp32: bit for bit; see
``tests/test_population.py``).

From the command line a population is a config of the ``population`` group::

    python -m gompertz_kd.run experiment=c10cpu population=schedules_kd
    python -m gompertz_kd.run experiment=c10cpu population=schedules_kd 'population.seeds=[0,1,2]'

``population.members`` maps each member's name to the Hydra overrides that make it, applied on top
of the run's own command line (``[method=dkd, schedule=gompertz]``); ``population.seeds`` replicates
every member over initialisation seeds (``<name>_s<seed>``); the run's ``seed`` is the data seed.
A member written ``{overrides: [...], seed: N}`` has its own initialisation seed. A Hydra sweep
trains as populations with ``hydra/launcher=population`` (one member per job; see
``hydra_plugins/gompertz_kd_population_launcher``).
Members must share the data, the networks and the recipe (``data``, ``model``, ``trainer``,
``teacher``): what differs is the objective, its schedules and progress mode, and the seed.

Each member gets what a single run gets, under ``<run dir>/members/<name>/``: ``results.json``
(the single-run schema plus ``population`` and ``data_seed``), ``csv/metrics.csv`` (its columns of
the population's log, prefix removed) and ``checkpoints/{best,last}.ckpt`` (the student and the
objective's parts; the shared teacher is in the teacher cache). ``python -m gompertz_kd.report``
reads members like runs. In the population's own log every name is prefixed by the member's
(``kd_gompertz/train/loss``). The population's ``checkpoints/last.ckpt`` holds every member, the
optimiser and every member's weight-callback state, so ``ckpt_path=last`` resumes all members
exactly.

Members whose students share an architecture can train as one network (``population.fuse``:
``auto``, the default, fuses on CUDA and loops on the CPU, where the fused network was measured
slower; ``true``; ``false``): see :mod:`gompertz_kd.fused` and :class:`PopulationModule`. Fused or
looped, each member keeps its own terms, weights, schedules, checkpoints and results.

Members share the data order, so replicate seeds vary the initialisation only: their spread
understates the seed-to-seed spread of independent runs, which also vary the data order.
Networks with random layers (dropout) draw from one global random stream shared by all members, so
such members match their single runs in distribution, not bit for bit.
"""

from __future__ import annotations

import copy
import csv
import logging
import os
import re
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn
from torch.nn import functional as F

from gompertz_kd.callbacks import GompertzWeightCallback, RunTimer
from gompertz_kd.checkpoints import CheckpointError
from gompertz_kd.config import CONFIG_DIR
from gompertz_kd.fused import FusedStudents, fusable, student_signature
from gompertz_kd.module import DeferredFiniteCheck, DistillationModule, NonFiniteLossError
from gompertz_kd.objectives import Need
from gompertz_kd.pbt import PBT_FILE, PBTController, PBTSettings, control_members, write_summary
from gompertz_kd.run_files import HISTORY_FILE, RESULTS_FILE
from gompertz_kd.run_parts import (
    TrainingRun,
    build,
    build_module,
    build_trainer,
    check_config,
    compile_options,
    fit,
    git_commit,
    instantiate_group,
    resume_checkpoint,
    task_overrides,
    write_json_atomically,
)
from gompertz_kd.teachers import provision_teacher
from gompertz_kd.train import run_training

__all__ = [
    "MEMBERS_DIR",
    "MemberCheckpoint",
    "MemberWeightCallback",
    "PopulationModule",
    "compose_members",
    "member_names",
    "run_population",
]

log = logging.getLogger(__name__)

MEMBERS_DIR = "members"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_\-]*$")
# The config groups every member shares with the population; a member may change none of them.
SHARED_GROUPS = ("data", "model", "trainer", "teacher")
# What must agree between members for one teacher pass and one optimiser to serve them all.
_SHARED_OPTIONS = (
    "fold_teacher_bn",
    "teacher_precision",
    "gm_precision",
    "gm_every",
    "gm_fraction",
    "channels_last",
    "sync_every",
)
_OPTIMIZER_OPTIONS = ("lr", "momentum", "weight_decay", "lr_milestones", "lr_gamma")


class PopulationModule(L.LightningModule):
    """K :class:`~gompertz_kd.module.DistillationModule` members trained on one teacher pass.

    Args:
        members: name -> member, each built as a single run builds it. The members with a
            teacher are given one shared teacher (the first one's); members without terms
            (the student alone) run no teacher.
        fuse: run the training forward and backward of members whose students share an
            architecture as one network (:mod:`gompertz_kd.fused`): ``True``, ``False``, or
            ``"auto"`` (default), which fuses on CUDA and loops on the CPU, where the grouped
            convolutions of a fused network are slower than the members' own
            (``docs/benchmarks.md``). Members whose terms need the teacher's input gradient
            (gradient matching: a double backward through the student) stay looped, as do
            students whose layers or forward cannot be widened (``True`` then raises), a lone
            student of its architecture, and compiled students (under ``"auto"``). Validation
            and test forwards stay looped.

    Raises:
        ValueError: no members, a bad name, members with different class counts, members
            whose teacher or optimiser settings differ (they share one pass and one optimiser),
            or a ``fuse`` that is none of ``"auto"``, ``True``, ``False``.
    """

    def __init__(
        self, members: Mapping[str, DistillationModule], fuse: str | bool = "auto"
    ) -> None:
        super().__init__()
        self.fuse = check_fuse(fuse)
        members = dict(members)
        check_member_names(list(members))
        classes = {name: int(m.hparams.num_classes) for name, m in members.items()}
        if len(set(classes.values())) > 1:
            raise ValueError(
                f"population members have different class counts {classes}: members share the "
                "data, so every student must predict its classes"
            )
        self.num_classes = next(iter(classes.values()))
        distilling = [name for name, m in members.items() if m.teacher is not None]
        self.lead = distilling[0] if distilling else None
        for name, member in members.items():
            _check_same(members, name, _SHARED_OPTIONS, lambda m, k: getattr(m, k), "model")
            _check_same(
                members, name, _OPTIMIZER_OPTIONS, lambda m, k: m.hparams.get(k), "model optimiser"
            )
            if member.teacher is not None and name != self.lead:
                lead_teacher = members[self.lead].teacher
                if type(member.teacher) is not type(lead_teacher):
                    raise ValueError(
                        f"population member {name!r} distils from a {type(member.teacher).__name__}"
                        f" teacher, member {self.lead!r} from a {type(lead_teacher).__name__}: "
                        "members share one teacher"
                    )
                member.teacher = lead_teacher  # one module, run once per batch
                member._teacher_cache = None
        self.members = nn.ModuleDict(members)
        # per member: {"top1": best validation top-1, "epoch": its epoch}
        self.best: dict[str, dict[str, float | int]] = {}
        # the fused groups (member names, their network), decided at the first training batch
        # (the device and the images decide), and the fused members skipped at this step
        self._fused: list[tuple[list[str], FusedStudents]] | None = None
        self._skipped_fused: list[str] = []
        # model.sync_every > 1: the members' finite-loss flags since the last host check
        self.sync_every = int(next(iter(members.values())).sync_every)
        self._finite_check = DeferredFiniteCheck(self.sync_every)
        # compile=step: the whole population's training forward as one graph (compile_step)
        self._compiled_step: Callable[..., Any] | None = None

    # ------------------------------------------------------------------ fused members
    def fusion_groups(self) -> list[list[str]]:
        """The members that may fuse, grouped by architecture (groups of two or more): those
        without an input-gradient term whose student :func:`~gompertz_kd.fused.fusable`."""
        groups: dict[tuple, list[str]] = {}
        for name, member in self.members.items():
            if member._lazy_terms or fusable(member.student) is not None:
                continue
            groups.setdefault(student_signature(member.student), []).append(name)
        return [names for names in groups.values() if len(names) > 1]

    def fused_groups(self, images: Tensor) -> list[tuple[list[str], FusedStudents]]:
        """The fused groups this population trains with (decided once, on the first training
        batch ``images``): each group's names and :class:`~gompertz_kd.fused.FusedStudents`.

        Raises:
            ValueError: ``fuse=True`` and a group's fused forward does not match its members', or
                compiled members.
        """
        if self._fused is not None:
            return self._fused
        fuse = self.fuse
        compiled = self._compiled_step is not None or any(
            m._compile_kwargs is not None for m in self.members.values()
        )
        if fuse is True and compiled:
            raise ValueError(
                "population.fuse=true with compile=true: compiling compiles each member's student, "
                "a fused group runs one eager network; set population.fuse=false or auto"
            )
        if fuse == "auto":
            fuse = images.device.type == "cuda" and not compiled
        self._fused = []
        if fuse:
            for names in self.fusion_groups():
                first = self.members[names[0]]
                fused = FusedStudents(
                    [self.members[n].student for n in names], channels_last=first.channels_last
                )
                problem = fused.check(first._format(images[:2]))
                if problem is not None:
                    if self.fuse is True:
                        raise ValueError(
                            f"population.fuse=true: members {names} cannot run as one network "
                            f"({problem}); set population.fuse=false or auto"
                        )
                    log.warning("members %s train looped: %s", names, problem)
                    continue
                self._fused.append((names, fused))
            if self._fused:
                log.info("fused members: %s", "; ".join(", ".join(n) for n, _ in self._fused))
        return self._fused

    def fused_outputs(self, images: Tensor) -> dict[str, Any]:
        """The fused members' student outputs on a training batch: ``name -> StageOutput``."""
        out = {}
        for names, fused in self.fused_groups(images):
            formatted = self.members[names[0]]._format(images)
            out.update(zip(names, fused(formatted), strict=True))
        return out

    # ------------------------------------------------------------------ training
    def teacher_passes(
        self, images: Tensor, targets: Tensor, step: int
    ) -> dict[bool, tuple[Any, Tensor | None]]:
        """The teacher's outputs on a batch, computed once for every member due to use them:
        ``{False: (outputs, None)}`` for the members without an input-gradient term due, and
        ``{True: (outputs, input_gradient)}`` for those with one. One pass serves both when its
        precision is the same; otherwise each runs."""
        if self.lead is None:
            return {}
        lead = self.members[self.lead]
        wanted = {
            member.gm_due(step)
            for member in self.members.values()
            if member.teacher is not None and member.due_terms(step)
        }
        images = lead._format(images)
        passes: dict[bool, tuple[Any, Tensor | None]] = {}
        if True in wanted:
            passes[True] = lead.teacher_forward(images, targets, input_gradient=True)
        if False in wanted:
            same = lead.gm_precision is None or lead.gm_precision == lead.teacher_precision
            if True in passes and same:
                passes[False] = (passes[True][0], None)
            else:
                passes[False] = lead.teacher_forward(images)
        return passes

    def member_losses(
        self, images: Tensor, targets: Tensor, step: int, indices: Tensor | None = None
    ) -> dict[str, tuple[Tensor, dict[str, Tensor], Tensor | None]]:
        """Every member's :meth:`~gompertz_kd.module.DistillationModule.compute_losses` on one
        batch, the teacher run once for all (:meth:`teacher_passes`), the students of fused
        members as one network (:meth:`fused_outputs`, in training mode): ``name -> (student
        logits, unweighted terms, teacher logits)``."""
        passes = self.teacher_passes(images, targets, step)
        students = self.fused_outputs(images) if self.training else {}
        out = {}
        for name, member in self.members.items():
            shared = None
            if member.teacher is not None and member.due_terms(step):
                shared = passes[member.gm_due(step)]
            out[name] = member.compute_losses(
                images, targets, step, indices, teacher=shared, student=students.get(name)
            )
        return out

    # ------------------------------------------------------------------ compiled step
    def step_forward(
        self, images: Tensor, targets: Tensor, indices: Tensor | None, weights: list[Tensor]
    ) -> list[tuple[Tensor, Tensor, Tensor, Tensor | None]]:
        """The population's training forward as a function of tensors alone, what
        :meth:`compile_step` compiles: the teacher's pass once, then every member's student,
        terms and weighted total (each member's
        :meth:`~gompertz_kd.module.DistillationModule.step_forward` on the shared teacher pass).

        Args:
            images, targets, indices: the batch.
            weights: per member, its ``(1 + T,)`` weights in its ``term_order``.

        Returns:
            per member, ``(total, student_logits, values, teacher_logits)``.
        """
        passes = self.teacher_passes(images, targets, None)
        out = []
        for (_, member), member_weights in zip(self.members.items(), weights, strict=True):
            shared = passes.get(False) if member.teacher is not None else None
            logits, terms, teacher_logits = member.compute_losses(
                images, targets, None, indices, teacher=shared
            )
            values = torch.stack([terms[f"loss_{name}"] for name in member.term_order])
            out.append(((member_weights * values).sum(), logits, values, teacher_logits))
        return out

    def compile_step(self, **compile_kwargs: Any) -> None:
        """``torch.compile`` the whole population's training forward as one graph
        (:meth:`step_forward`; on a GPU, ``mode="reduce-overhead"`` replays it as CUDA graphs).
        The weights enter as tensors, so the members' schedules do not recompile it. Members are
        then not fused (the compiled graph runs their own networks). A member whose terms need
        the teacher's input gradient or the training progress makes the population fall back to
        compiling each member's networks, with a warning (as a single run does)."""
        blocked = sorted(
            {
                f"{name}.{term}"
                for name, member in self.members.items()
                for need in (Need.INPUT_GRAD, Need.PROGRESS)
                for term in member.objective.names_needing(need)
            }
        )
        if blocked:
            warnings.warn(
                f"compile_step: member terms {blocked} need the teacher's input gradient or the "
                "training progress, which a compiled step cannot take; compiling each member's "
                "networks only",
                stacklevel=2,
            )
            for member in self.members.values():
                member.compile_networks(**compile_kwargs)
            return
        # static shapes, as DistillationModule.compile_step
        self._compiled_step = torch.compile(
            self.step_forward, **{"dynamic": False, **compile_kwargs}
        )

    def apply_compile(self, setting: bool | str | None, **compile_kwargs: Any) -> None:
        """The run's ``compile`` setting: ``"step"`` :meth:`compile_step`; ``True`` or
        ``"networks"`` each member's networks; ``False`` / ``None`` nothing."""
        if setting == "step":
            self.compile_step(**compile_kwargs)
        elif setting:
            for member in self.members.values():
                member.compile_networks(**compile_kwargs)

    def _compiled_losses(
        self, images: Tensor, targets: Tensor, indices: Tensor | None
    ) -> tuple[dict[str, tuple[Tensor, dict[str, Tensor], Tensor | None]], dict[str, Tensor]]:
        if self.lead is not None:  # the teacher runner is checked here, not in the graph
            self.members[self.lead]._teacher_runner(images.device)
            self.members[self.lead]._runner_checked = True
        try:
            results = self._compiled_step(
                images,
                targets,
                indices,
                [m.weight_vector(images.device) for m in self.members.values()],
            )
        finally:
            if self.lead is not None:
                self.members[self.lead]._runner_checked = False
        losses, weighted = {}, {}
        for (name, member), (total, logits, values, teacher_logits) in zip(
            self.members.items(), results, strict=True
        ):
            terms = {f"loss_{t}": v for t, v in zip(member.term_order, values, strict=True)}
            losses[name] = (logits, terms, teacher_logits)
            weighted[name] = total
        return losses, weighted

    def training_step(self, batch: tuple[Tensor, ...], batch_idx: int) -> dict[str, Any] | None:
        images, targets, *rest = batch
        indices = rest[0] if rest else None
        batch_size = targets.shape[0]
        if self._compiled_step is not None:
            losses, weighted = self._compiled_losses(images, targets, indices)
        else:
            losses = self.member_losses(images, targets, self.global_step, indices)
            weighted = {n: m.weighted_total(losses[n][1]) for n, m in self.members.items()}
        bad = torch.stack([~torch.isfinite(t.detach()) for t in weighted.values()])
        if self.sync_every > 1:  # no host sync in the step: read the flags every k steps
            self._defer_finite_check(bad)
            non_finite = dict.fromkeys(weighted, False)
        else:
            # one host sync for all members (not one each); summed over ranks so all decide alike
            bad = bad.float()
            if self.trainer.world_size > 1:
                bad = self.trainer.strategy.reduce(bad, reduce_op="sum")
            non_finite = dict(zip(weighted, (bool(b) for b in bad.tolist()), strict=True))
        totals, out = [], {}
        fused = {n for names, _ in self._fused or [] for n in names}
        self._skipped_fused = []
        for name, member in self.members.items():
            logits, terms, teacher_logits = losses[name]
            total = weighted[name]
            if non_finite[name]:
                self._non_finite(name, member, terms)
                if name in fused:
                    self._skipped_fused.append(name)
                continue
            self.log(f"{name}/train/loss", total, batch_size=batch_size)
            self.log_dict(
                {f"{name}/{k}": v for k, v in member.step_values(terms).items()},
                batch_size=batch_size,
            )
            member.train_metrics.update(logits.detach(), targets)
            self.log_dict(
                {f"{name}/{k}": metric for k, metric in member.train_metrics.items()},
                on_step=False,
                on_epoch=True,
                batch_size=batch_size,
            )
            out[name] = member.step_counts(logits, teacher_logits, targets)
            totals.append(total)
        if not totals:
            return None
        # disjoint parameters: the sum's gradient is each member's own, as if it trained alone
        out["loss"] = torch.stack(totals).sum()
        return out

    def _defer_finite_check(self, bad: Tensor) -> None:
        if self._finite_check.add(bad, self.global_step):
            self.check_finite()

    def check_finite(self) -> None:
        """Read the members' device-side flags of ``model.sync_every > 1`` (one host sync, on
        every rank together) and raise :class:`~gompertz_kd.module.NonFiniteLossError` naming the
        members whose loss was not finite since the last check. A no-op with ``sync_every=1``."""
        pending = self._finite_check.take()
        if pending is None:
            return
        pending = pending.float()
        if self.trainer.world_size > 1:
            pending = self.trainer.strategy.reduce(pending, reduce_op="sum")
        bad = [n for n, b in zip(self.members, pending.tolist(), strict=True) if b]
        if bad:
            raise NonFiniteLossError(
                f"population members {bad}: non-finite loss at a step between "
                f"{self._finite_check.since} and {self.trainer.global_step} (epoch {self.current_epoch};"
                f" the loss is checked every {self.sync_every} steps, model.sync_every). No "
                "checkpoint was written after it. Lower their learning rate or term scale, or set "
                "model.sync_every=1 to find the step and term"
            )

    def on_train_epoch_end(self) -> None:
        self.check_finite()

    def on_after_backward(self) -> None:
        # A skipped member trained looped gets no gradient (None: SGD leaves it alone, no decay,
        # no momentum); fused, the backward hands it zeros: put it back as it would be.
        for name in self._skipped_fused:
            for p in self.members[name].trainable_parameters():
                p.grad = None

    def _non_finite(self, name: str, member: DistillationModule, terms: Mapping[str, Tensor]):
        bad = ", ".join(f"{k}={v.item():g}" for k, v in terms.items() if not torch.isfinite(v)) or (
            "the weighted sum (every term finite; a weight is not)"
        )
        if member.nonfinite == "skip":
            member.skipped_batches += 1
            self.log(
                f"{name}/train/skipped_batches",
                float(member.skipped_batches),
                on_step=True,
                on_epoch=False,
            )
            return
        checkpoint = getattr(self.trainer.checkpoint_callback, "last_model_path", "")
        raise NonFiniteLossError(
            f"population member {name!r}: non-finite loss at step {self.trainer.global_step} "
            f"(epoch {self.current_epoch}): {bad}. Last good checkpoint: "
            f"{checkpoint or 'none saved yet'}. Lower that member's learning rate or term scale, "
            "or set model.nonfinite=skip to skip its bad batches (the others train on)."
        )

    # ------------------------------------------------------------------ evaluation
    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def _evaluate(self, batch: tuple[Tensor, Tensor], split: str) -> None:
        images, targets = batch
        batch_size = targets.shape[0]
        for name, member in self.members.items():
            logits = member(images)
            self.log(
                f"{name}/{split}/loss_ce",
                F.cross_entropy(logits, targets),
                sync_dist=True,
                batch_size=batch_size,
            )
            metrics = member.val_metrics if split == "val" else member.test_metrics
            metrics.update(logits, targets)
            self.log_dict(
                {f"{name}/{k}": metric for k, metric in metrics.items()},
                on_step=False,
                on_epoch=True,
                batch_size=batch_size,
            )

    # ------------------------------------------------------------------ plumbing
    def train(self, mode: bool = True) -> PopulationModule:
        super().train(mode)
        for member in self.members.values():
            member.train(mode)  # keeps each teacher in eval mode
        return self

    def configure_optimizers(self) -> dict[str, Any]:
        params = [p for member in self.members.values() for p in member.trainable_parameters()]
        return next(iter(self.members.values())).optimizer_config(params)

    def configure_callbacks(self) -> list[L.Callback]:
        """A default weight callback for each member with terms that the trainer lacks one for."""
        driven = {c.member for c in self.trainer.callbacks if isinstance(c, MemberWeightCallback)}
        return [
            MemberWeightCallback(GompertzWeightCallback(), name)
            for name, member in self.members.items()
            if member.objective.terms and name not in driven
        ]

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self._trainer is not None:  # never a checkpoint over an unchecked non-finite step
            self.check_finite()
        # The shared teacher is saved once, under the lead member; restored for all on load.
        state = checkpoint["state_dict"]
        for prefix in self._teacher_copies():
            for key in [k for k in state if k.startswith(prefix)]:
                del state[key]
        checkpoint["population_best"] = copy.deepcopy(self.best)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint["state_dict"]
        lead = f"members.{self.lead}.teacher."
        for prefix in self._teacher_copies():
            for key in [k for k in state if k.startswith(lead)]:
                state.setdefault(prefix + key[len(lead) :], state[key])
        self.best = dict(checkpoint.get("population_best", {}))

    def _teacher_copies(self) -> list[str]:
        return [
            f"members.{name}.teacher."
            for name, member in self.members.items()
            if member.teacher is not None and name != self.lead
        ]

    def member_state(self, name: str) -> dict[str, Tensor]:
        """Member ``name``'s weights without the shared teacher: student, objective, metrics."""
        state = self.members[name].state_dict()
        return {k: v.detach().clone() for k, v in state.items() if not k.startswith("teacher.")}


class _MemberView:
    """What :class:`~gompertz_kd.callbacks.GompertzWeightCallback` sees of one member: its
    weights, stages and hyper-parameters, and the population's logger with the member's prefix."""

    def __init__(self, population: PopulationModule, name: str) -> None:
        self.population = population
        self.name = name
        self.member = population.members[name]
        self.teacher = self.member.teacher
        self.hparams = self.member.hparams

    def set_progress(self, progress: float) -> dict[str, float]:
        return self.member.set_progress(progress)

    def stage_at(self, progress: float):
        return self.member.stage_at(progress)

    def log_dict(self, values: Mapping[str, Any], **kwargs: Any) -> None:
        self.population.log_dict({f"{self.name}/{k}": v for k, v in values.items()}, **kwargs)


class MemberWeightCallback(L.Callback):
    """One member's :class:`~gompertz_kd.callbacks.GompertzWeightCallback` inside a population:
    the same progress (clock or the member's own trajectory), logged under the member's name,
    its state saved in the population's checkpoints under its own key."""

    def __init__(self, callback: GompertzWeightCallback, member: str) -> None:
        self.callback = callback
        self.member = member

    @property
    def state_key(self) -> str:
        return f"{self.callback.state_key}[member={self.member}]"

    def on_fit_start(self, trainer: L.Trainer, pl_module: PopulationModule) -> None:
        self.callback.on_fit_start(trainer, _MemberView(pl_module, self.member))

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: PopulationModule) -> None:
        self.callback.on_train_epoch_start(trainer, _MemberView(pl_module, self.member))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.callback.on_train_batch_start(
            trainer, _MemberView(pl_module, self.member), batch, batch_idx
        )

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        own = outputs.get(self.member) if isinstance(outputs, dict) else None
        self.callback.on_train_batch_end(
            trainer, _MemberView(pl_module, self.member), own, batch, batch_idx
        )

    def state_dict(self) -> dict[str, Any]:
        return self.callback.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.callback.load_state_dict(state_dict)


class MemberCheckpoint(L.Callback):
    """Each member's ``best.ckpt`` (highest ``<member>/val/top1``) and ``last.ckpt`` under
    ``<dirpath>/<member>/checkpoints/``: the member's student and objective weights, its
    hyper-parameters, epoch and step. Written through a temporary name and a rename."""

    def __init__(self, dirpath: str | os.PathLike, monitor: str = "val/top1") -> None:
        self.dirpath = Path(dirpath)
        self.monitor = monitor

    def path(self, member: str, which: str) -> Path:
        return self.dirpath / member / "checkpoints" / f"{which}.ckpt"

    def on_validation_end(self, trainer: L.Trainer, pl_module: PopulationModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        for name in pl_module.members:
            score = trainer.callback_metrics.get(f"{name}/{self.monitor}")
            if score is None:
                continue
            best = pl_module.best.get(name)
            if best is None or float(score) > float(best["top1"]):
                pl_module.best[name] = {"top1": float(score), "epoch": trainer.current_epoch}
                self.save(trainer, pl_module, name, "best")

    def on_train_end(self, trainer: L.Trainer, pl_module: PopulationModule) -> None:
        if trainer.is_global_zero:
            for name in pl_module.members:
                self.save(trainer, pl_module, name, "last")

    def save(self, trainer: L.Trainer, pl_module: PopulationModule, name: str, which: str) -> None:
        path = self.path(name, which)
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "state_dict": pl_module.member_state(name),
            "hyper_parameters": dict(pl_module.members[name].hparams),
            "epoch": trainer.current_epoch,
            "global_step": trainer.global_step,
            "member": name,
            "pytorch-lightning_version": L.__version__,
        }
        partial = path.with_name(path.name + ".partial")
        torch.save(payload, partial)
        os.replace(partial, path)


# ---------------------------------------------------------------------- configuration
def check_fuse(fuse: Any) -> str | bool:
    """``population.fuse``: ``"auto"``, ``True`` or ``False`` (Hydra reads ``true``/``false`` as
    booleans; the strings are accepted too).

    Raises:
        ValueError: any other value.
    """
    if isinstance(fuse, str):
        fuse = {"true": True, "false": False, "auto": "auto"}.get(fuse.lower(), fuse)
    if not (fuse == "auto" or fuse is True or fuse is False):
        raise ValueError(
            f"population.fuse={fuse!r} must be auto, true or false (true: members whose students "
            "share an architecture train as one network; auto: on CUDA only)"
        )
    return fuse


def check_member_names(names: Sequence[str]) -> None:
    """Reject an empty population, duplicate names and names that are no folder or log prefix."""
    if not names:
        raise ValueError(
            "the population has no members: give population.members a mapping of member names "
            "to overrides, e.g. {kd: [method=kd], gompertz: [method=gkd, schedule=gompertz]}"
        )
    seen = set()
    for name in names:
        if not isinstance(name, str) or not _NAME.match(name):
            raise ValueError(
                f"population member name {name!r}: use letters, digits, '_' and '-' (it names a "
                "folder and prefixes the member's logged metrics)"
            )
        if name in seen:
            raise ValueError(f"population member name {name!r} appears twice; names must differ")
        seen.add(name)


def member_names(
    population: DictConfig, with_controls: bool = True
) -> dict[str, tuple[list[str], int | None]]:
    """``name -> (overrides, init seed)`` of every member, replicated over ``seeds`` when given
    (``<name>_s<seed>``; ``None``: the run's seed). A member given as ``{overrides: [...], seed:
    N}`` has its own init seed and is not replicated (the population launcher's jobs). A PBT
    population's control members (``population.pbt.controls``,
    :func:`~gompertz_kd.pbt.control_members`) come last (left out with ``with_controls=False``)."""
    members = population.get("members")
    if not members:
        check_member_names([])
    if not isinstance(members, Mapping):
        raise ValueError(
            "population.members must map member names to lists of overrides, got "
            f"{OmegaConf.to_container(members) if isinstance(members, DictConfig) else members!r}"
        )
    seeds = population.get("seeds")
    seeds = None if seeds is None else [int(s) for s in seeds]
    if seeds is not None and len(set(seeds)) != len(seeds):
        raise ValueError(f"population.seeds={seeds} repeats a seed; each seed once")
    if seeds is not None and not seeds:
        check_member_names([])
    out: dict[str, tuple[list[str], int | None]] = {}
    names: list[str] = []
    bases: dict[str, str] = {}
    for base, overrides in members.items():
        own_seed = None
        if isinstance(
            overrides, Mapping
        ):  # {overrides: [...], seed: N}: a member with its own seed
            unknown = sorted(set(map(str, overrides)) - {"overrides", "seed"})
            if unknown:
                raise ValueError(
                    f"population member {base!r} has keys {unknown}: a member is a list of "
                    "overrides, or {overrides: [...], seed: N} for one with its own seed"
                )
            own_seed = overrides.get("seed")
            if own_seed is not None and seeds is not None:
                raise ValueError(
                    f"population member {base!r} has its own seed and population.seeds "
                    "replicates every member; use one of the two"
                )
            overrides = overrides.get("overrides")
        if overrides is None:
            overrides = []
        if isinstance(overrides, str) or not isinstance(overrides, Sequence | list):
            overrides = list(overrides) if not isinstance(overrides, str) else [overrides]
        overrides = [str(o) for o in overrides]
        for o in overrides:
            if o.split("=", 1)[0].lstrip("+~").split(".")[0] in ("seed", "population"):
                raise ValueError(
                    f"population member {base!r} sets {o!r}: a member's seed comes from "
                    "population.seeds, and a member cannot hold a population"
                )
        if own_seed is not None:
            names.append(str(base))
            out[str(base)] = (overrides, int(own_seed))
            bases[str(base)] = str(base)
            continue
        for seed in seeds if seeds is not None else [None]:
            name = str(base) if seed is None else f"{base}_s{seed}"
            names.append(name)
            out[name] = (overrides, seed)
            bases[name] = str(base)
    controls = (
        control_members(population, {n: (*out[n], bases[n]) for n in out}) if with_controls else {}
    )
    names += list(controls)
    check_member_names(names)
    return {**out, **controls}


def shared_overrides(base_overrides: Sequence[str]) -> list[str]:
    """The population run's overrides every member composes from: all but the population's own
    settings, Hydra's, ``ckpt_path`` and ``seed``."""
    return [
        o
        for o in base_overrides
        if not o.lstrip("+~").startswith(("population", "hydra.", "ckpt_path=", "seed="))
    ]


def compose_members(
    cfg: DictConfig, base_overrides: Sequence[str]
) -> dict[str, tuple[DictConfig, int]]:
    """Each member's full run config: ``train`` composed from ``base_overrides`` (the population
    run's command line, without its population settings) plus the member's overrides and seed.

    Raises:
        ValueError: a member changes a group members share (data, model, trainer, teacher).
    """
    kept = shared_overrides(base_overrides)
    specs = member_names(cfg.population)

    def compose_all() -> dict[str, tuple[DictConfig, int]]:
        out = {}
        for name, (overrides, seed) in specs.items():
            seed = int(cfg.seed) if seed is None else seed
            try:
                member = compose("train", overrides=[*kept, *overrides, f"seed={seed}"])
            except Exception as error:
                raise ValueError(
                    f"population member {name!r}: its overrides {overrides} do not compose: {error}"
                ) from error
            out[name] = (member, seed)
        return out

    if GlobalHydra.instance().is_initialized():
        members = compose_all()
    else:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            members = compose_all()
    for name, (member, _) in members.items():
        for group in SHARED_GROUPS:
            own = OmegaConf.to_container(member[group], resolve=False)
            shared = OmegaConf.to_container(cfg[group], resolve=False)
            if own != shared:
                changed = _first_difference(own, shared, group)
                raise ValueError(
                    f"population member {name!r} changes {changed}: members share the data, the "
                    f"networks and the recipe ({', '.join(SHARED_GROUPS)}); vary the method, its "
                    "schedules and the seed, or run that configuration in another population (a sweep "
                    "under hydra/launcher=population: sweep it separately)"
                )
    return members


def _first_difference(a: Any, b: Any, path: str) -> str:
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        for key in sorted(set(a) | set(b), key=str):
            if a.get(key) != b.get(key):
                return _first_difference(a.get(key), b.get(key), f"{path}.{key}")
    return f"{path} ({a!r}, the population's {b!r})"


def _check_same(members, name, keys, read, where) -> None:
    first_name, first = next(iter(members.items()))
    for key in keys:
        if read(members[name], key) != read(first, key):
            raise ValueError(
                f"population members {first_name!r} and {name!r} differ in {where} option {key} "
                f"({read(first, key)!r} vs {read(members[name], key)!r}): members share one teacher "
                "pass and one optimiser"
            )


# ---------------------------------------------------------------------- the run
def run_population(
    cfg: DictConfig,
    base_overrides: Sequence[str] | None = None,
    train_teacher: Callable[[DictConfig], Any] = run_training,
) -> TrainingRun:
    """Train the population of ``cfg.population``; write each member's results and return a
    :class:`~gompertz_kd.run_parts.TrainingRun` whose ``results`` maps member names to theirs.

    ``base_overrides``: the overrides the members are composed from (default: the command line of
    the Hydra run; give them when composing the config yourself, e.g. in a notebook).
    ``train_teacher``: the run that trains a missing teacher (a single run of the teacher's
    recipe). ``cfg.population.fuse`` (``auto``, default; ``true``; ``false``): see
    :class:`PopulationModule`.

    Raises:
        ValueError: a bad population (members, names, seeds, ``fuse``), before any work.
    """
    fuse = check_fuse(cfg.population.get("fuse", "auto"))
    start = time.time()
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if base_overrides is None:
        if not HydraConfig.initialized():
            raise ValueError(
                "a population composes its members from the run's overrides: run it with "
                "`python -m gompertz_kd.run ... population=NAME`, or call "
                "run_population(cfg, base_overrides=[...]) with the overrides cfg was composed from"
            )
        base_overrides = task_overrides()
    members_cfg = compose_members(cfg, base_overrides)
    objectives = {name: check_config(member) for name, (member, _) in members_cfg.items()}
    check_config(cfg)
    pbt = pbt_controller(cfg, members_cfg, objectives, base_overrides)
    if pbt is not None:
        pbt.summary_path = output_dir / PBT_FILE
    resume = resume_checkpoint(cfg, output_dir)
    check_checkpoint_members(resume, list(members_cfg), [] if pbt is None else pbt.controls)
    distils = any(o.terms for o in objectives.values())
    L.seed_everything(cfg.seed, workers=True)
    datamodule = build(cfg.data)
    num_train_samples = None
    if any(Need.INDICES in o.needs for o in objectives.values()):
        datamodule.with_indices = True
        datamodule.setup("fit")
        num_train_samples = datamodule.num_train_samples
    provision_start = time.time()
    teacher_ckpt = provision_teacher(cfg, train_teacher) if distils else None
    teacher_provision_s = time.time() - provision_start

    members: dict[str, DistillationModule] = {}
    for name, (member_cfg, seed) in members_cfg.items():
        # as a single run of this member: seeded, then built (the student's init, its parts')
        L.seed_everything(seed, workers=True)
        members[name] = build_module(
            member_cfg,
            num_classes=datamodule.num_classes,
            teacher_ckpt=teacher_ckpt,
            objective=objectives[name],
            num_train_samples=num_train_samples,
        )
    module = PopulationModule(members, fuse=fuse)
    if cfg.get("compile"):
        module.apply_compile(cfg.compile, **compile_options(cfg))
    L.seed_everything(cfg.seed, workers=True)

    callbacks = [
        c
        for c in instantiate_group(cfg.get("callbacks"))
        if not isinstance(c, GompertzWeightCallback)
    ]
    for c in callbacks:
        if isinstance(c, ModelCheckpoint):
            c.monitor = None  # the population's checkpoint is for resuming; members keep bests
            c.save_top_k = 1
    for name, (member_cfg, _) in members_cfg.items():
        node = (member_cfg.get("callbacks") or {}).get("gompertz_weight")
        if objectives[name].terms and node is not None:
            callbacks.append(MemberWeightCallback(build(node), name))
    member_checkpoints = MemberCheckpoint(output_dir / MEMBERS_DIR)
    callbacks.append(member_checkpoints)
    if pbt is not None:
        callbacks.append(pbt)  # after the member checkpoints: it copies the bests they write
    loggers = instantiate_group(cfg.get("logger"))
    trainer = build_trainer(cfg, callbacks, loggers)
    expected = module.state_dict()
    for prefix in module._teacher_copies():  # the shared teacher is saved once
        expected = {k: v for k, v in expected.items() if not k.startswith(prefix)}
    try:
        fit(cfg, trainer, module, datamodule, loggers, resume, expected)
    except BaseException:
        if pbt is not None and pbt.rounds and trainer.is_global_zero:
            # stopped (a signal, an error): not a live run's file; a hard kill leaves "running"
            write_summary(output_dir / PBT_FILE, {**pbt.summary(), "status": "interrupted"})
        raise

    results = _member_results(
        cfg, members_cfg, trainer, module, datamodule, member_checkpoints, output_dir,
        start, teacher_provision_s, pbt,
    )  # fmt: skip
    if pbt is not None and trainer.is_global_zero:
        summary = pbt.summary(results)
        write_summary(output_dir / PBT_FILE, {**summary, "status": "completed"})
        log_evidence(summary["evidence"], output_dir / PBT_FILE)
    return TrainingRun(results=results, module=module, trainer=trainer)


def check_checkpoint_members(
    resume: tuple[Path, str, Mapping[str, Any]] | None,
    names: Sequence[str],
    controls: Sequence[str] = (),
) -> None:
    """Refuse to resume a population from a checkpoint of other members, naming them.

    Raises:
        CheckpointError: the checkpoint's members are not ``names`` (with the fix when the
            difference is the PBT control members, ``population.pbt.controls``).
    """
    if resume is None:
        return
    _, name, ckpt = resume
    saved = list(
        dict.fromkeys(k.split(".", 2)[1] for k in ckpt["state_dict"] if k.startswith("members."))
    )
    missing = [n for n in names if n not in saved]
    unknown = [n for n in saved if n not in names]
    if not missing and not unknown:
        return
    fix = "resume with the population the checkpoint was written by, or start afresh"
    if missing and set(missing) <= set(controls) and not unknown:
        fix = (
            f"it was written without the PBT control members {missing}: resume with "
            f"population.pbt.controls={len(controls) - len(missing)}"
        )
    raise CheckpointError(
        f"{name} holds the population members {saved}, and this run has {list(names)}: {fix}"
    )


def log_evidence(evidence: Mapping[str, Any] | None, path: Path) -> None:
    """One line: the PBT winner's test top-1 against the control members'."""
    test = (evidence or {}).get("test")
    if not test:
        return
    kept = [v for v in test["controls"].values() if v is not None]
    line = f"PBT winner {evidence['winner']}: test top-1 {100 * test['winner']:.2f} %"
    if kept:
        line += (
            f"; {len(kept)} control(s) at the method's own weight {100 * sum(kept) / len(kept):.2f} %"
            f" ({test['winner_minus_controls']:+.2f} points; members' mean "
            f"{test['members_minus_controls']:+.2f}). One PBT run is one sample: replay the "
            f"winner's schedule on other seeds (replay.command in {path}) to test it"
        )
    log.info(line)


def pbt_controller(
    cfg: DictConfig,
    members_cfg: Mapping[str, tuple[DictConfig, int]],
    objectives: Mapping,
    base_overrides: Sequence[str] = (),
) -> PBTController | None:
    """The :class:`~gompertz_kd.pbt.PBTController` of ``population.pbt`` (``None`` without one),
    its settings checked against the run before any teacher work; ``base_overrides`` (the run's
    command line) go into the winner's replay command."""
    settings = PBTSettings.from_config(cfg.population.get("pbt"))
    if settings is None:
        return None
    owned = member_names(cfg.population, with_controls=False)
    modes = {
        name: str(
            OmegaConf.select(
                members_cfg[name][0], "callbacks.gompertz_weight.progress", default="clock"
            )
        )
        for name in owned
    }
    terms = settings.check_run(
        list(owned),
        {name: objectives[name] for name in owned},
        cfg.trainer.get("max_epochs"),
        int(cfg.data.get("val_split", 0) or 0),
        cfg.trainer.get("check_val_every_n_epoch"),
        modes,
        cfg.trainer.get("val_check_interval"),
        cfg.trainer.get("limit_val_batches"),
    )
    seed = settings.seed
    if seed is None:
        seed = min(int(members_cfg[name][1]) for name in owned)
    return PBTController(
        settings,
        list(owned),
        terms,
        seed,
        member_overrides={n: o for n, (o, _) in owned.items()},
        controls=[n for n in members_cfg if n not in owned],
        run_overrides=shared_overrides(base_overrides),
        name=str(cfg.population.get("name") or "pbt"),
    )


def _member_results(  # fmt: skip
    cfg,
    members_cfg,
    trainer,
    module,
    datamodule,
    checkpoints,
    output_dir,
    start,
    provision_s,
    pbt=None,
) -> dict[str, dict[str, Any]]:
    names = list(module.members)
    final = _test_members(trainer, module, datamodule) if cfg.get("test") else {}
    best: dict[str, dict[str, Any]] = {}
    if cfg.get("test") and all(checkpoints.path(n, "best").is_file() for n in names):
        last = {n: module.member_state(n) for n in names}
        for n in names:
            state = torch.load(checkpoints.path(n, "best"), map_location="cpu", weights_only=True)
            module.members[n].load_state_dict(state["state_dict"], strict=False)
        tested = _test_members(trainer, module, datamodule)
        for n in names:
            module.members[n].load_state_dict(last[n], strict=False)
            best[n] = {
                **tested[n],
                "epoch": module.best.get(n, {}).get("epoch"),
                "selected_on": "test" if int(cfg.data.get("val_split", 0)) == 0 else "val",
            }
    timer = next((c for c in trainer.callbacks if isinstance(c, RunTimer)), None)
    population_csv = next((lg for lg in trainer.loggers if isinstance(lg, CSVLogger)), None)
    wall = time.time() - start - provision_s + (timer.resumed_seconds if timer else 0.0)
    out = {}
    for name, (member_cfg, seed) in members_cfg.items():
        member = module.members[name]
        member_dir = output_dir / MEMBERS_DIR / name
        member_dir.mkdir(parents=True, exist_ok=True)
        history = None
        if population_csv is not None and trainer.is_global_zero:
            source = Path(population_csv.log_dir) / "metrics.csv"
            if source.is_file():
                split_history(source, name, names, member_dir / HISTORY_FILE)
                history = HISTORY_FILE
        stage = member.stage_at(member.progress)
        own = members_cfg_overrides(cfg, name)
        base = str(member_cfg.get("name") or _base_name(name, cfg.population))
        best_score = module.best.get(name, {}).get("top1")
        results = {
            "status": "completed",
            "name": base,
            "overrides": _recorded_overrides(task_overrides(), own),
            "seed": seed,
            "data_seed": int(cfg.seed),
            "dataset": cfg.data.dataset,
            "teacher": member.hparams.get("teacher"),
            "student": cfg.model.student,
            "test": final.get(name, {"top1": None, "top5": None}),
            "best": best.get(
                name, {"top1": None, "top5": None, "epoch": None, "selected_on": None}
            ),
            "best_val_top1": best_score,
            "epochs": trainer.current_epoch,
            "history": history,
            "final_weights": dict(member.loss_weights),
            "final_stage": stage.name.lower() if stage is not None else None,
            # the population's time: every member trained in it, side by side
            "wall_time_s": wall,
            "teacher_provision_s": provision_s,
            "train_images_per_s": timer.images_per_second if timer else None,
            "git_commit": git_commit(),
            "run_dir": str(member_dir),
            "population": {
                "name": str(cfg.population.get("name") or "population"),
                "run_dir": str(output_dir),
                "members": names,
            },
            "config": OmegaConf.to_container(member_cfg, resolve=True),
        }
        if pbt is not None and name in pbt.members:
            results["pbt"] = pbt.member_record(name)
        if trainer.is_global_zero:
            write_json_atomically(member_dir / RESULTS_FILE, results)
        out[name] = results
    log.info("Population of %d members written to %s", len(names), output_dir / MEMBERS_DIR)
    return out


def _recorded_overrides(run: Sequence[str], member: Sequence[str]) -> list[str]:
    """A member's command line as its single run would record it: the run's overrides (without
    its population and data seed) and the member's own (which repeat them under a launcher)."""
    kept = [o for o in run if not o.lstrip("+~").startswith(("population", "seed="))]
    return [*(o for o in kept if o not in member), *member]


def members_cfg_overrides(cfg: DictConfig, name: str) -> list[str]:
    overrides, seed = member_names(cfg.population)[name]
    return [*overrides, *([] if seed is None else [f"seed={seed}"])]


def _base_name(name: str, population: DictConfig) -> str:
    """A replicated member's name without its ``_s<seed>`` suffix (the report groups seeds by it)."""
    if population.get("seeds") is not None:
        return re.sub(r"_s-?\d+$", "", name)
    return name


def _test_members(trainer, module, datamodule) -> dict[str, dict[str, float]]:
    metrics = trainer.test(module, datamodule=datamodule, verbose=False)[0]
    return {
        n: {"top1": float(metrics[f"{n}/test/top1"]), "top5": float(metrics[f"{n}/test/top5"])}
        for n in module.members
    }


def split_history(source: Path, name: str, names: Sequence[str], target: Path) -> None:
    """Member ``name``'s history from the population's ``metrics.csv``: its own columns with the
    prefix removed, plus the shared ones (epoch, step, learning rate), rows where it logged."""
    with open(source, newline="") as f:
        reader = csv.DictReader(f)
        fields = list(reader.fieldnames or [])
        rows = list(reader)
    prefix = f"{name}/"
    others = tuple(f"{n}/" for n in names if n != name)
    own = [c for c in fields if c.startswith(prefix)]
    shared = [c for c in fields if not c.startswith(prefix) and not c.startswith(others)]
    columns = shared + [c[len(prefix) :] for c in own]
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    with open(partial, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        for row in rows:
            values = [row.get(c, "") for c in shared] + [row.get(c, "") for c in own]
            if any(row.get(c) for c in own) or any(
                row.get(c) for c in shared if c not in ("epoch", "step")
            ):
                writer.writerow(values)
    os.replace(partial, target)
