"""Population-based training of the distillation weight inside one population run.

PBT (Jaderberg et al., 2017) tunes a hyper-parameter *schedule* online: K members train side by
side and, every ``interval`` epochs, the worst copy the best and perturb what they copied. Here the
hyper-parameter is the weight of a method's distillation term(s), and the members are the members
of a population run (:mod:`gompertz_kd.population`): one teacher pass per batch serves them all,
so a PBT run costs about what one population costs.

What :class:`PBTController` does:

- At the start, each member's weight on each PBT term is drawn log-uniformly from ``[low,
  high]`` (a multiple of the term's configured ``scale``: ``1`` is the method's published
  weight); the term's schedule becomes a :class:`~gompertz_kd.schedules.Piecewise` the controller
  owns.
- At the end of every ``interval``-th epoch (never after the last), on the held-out val split
  only (``population.pbt.metric``, default ``val/top1``): truncation selection. The bottom
  ``quantile`` of the members, ranked by that epoch's score, each copy a member drawn from the top
  ``quantile``: its student, its objective's state (projectors, CRD banks, a learned temperature:
  everything a checkpoint holds), its optimiser state, its weight-callback state, its best score
  and its checkpoint files (replaced atomically), and its weight history. Then explore: each
  copied weight is multiplied by a factor drawn from ``factors`` or, with probability
  ``resample_probability``, drawn afresh from ``[low, high]``; clipped to ``[low, high]``. The
  defaults are Ray Tune's (quantile 0.25, factors 0.8 / 1.2, resample 0.25). A copy that would
  end with its source's weights, or with another copier's of the same source, takes another
  factor (:meth:`PBTController.explore`): every member sees the same batches, so it would be a
  twin for the rest of the run.
- The decisions draw from the controller's own random stream (seeded by ``seed``, default the
  smallest member init seed), and depend only on the val scores, which every process of a DDP
  run reduces alike; the controller checks that every rank decided as rank 0 did. Its state (the
  stream, every member's lineage) is in the population's checkpoints, so a resumed run takes the
  same decisions.

``population.pbt.controls`` adds control members: twins of the first members (the same overrides
and init seed) that keep the method's own weight and that the controller never ranks or copies.
The run's ``pbt.json`` weighs the winner against them on the test split (:meth:`PBTController.
evidence`): in one run, whether the found schedule beat the static weight (one sample; the
replay tests the schedule itself).

Every member's *lineage* (its weight as a step function of progress, and each copy: when, from
whom, with which factor; what a copy replaced, under ``replaced``) goes into its
``results.json`` under ``pbt``, and the run's
``pbt.json`` names the winner (the best member on the last epoch's val score) and its replay:
the winner's member overrides with its schedule written as ``method.terms.<term>.schedule=
"piecewise(...)"`` (the values are multiples of the term's scale, so the member's own overrides,
a scale among them, belong to the replay), and the command that trains it from scratch on other
seeds.
"""

from __future__ import annotations

import copy
import math
import os
import random
import re
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import lightning as L
import torch

from gompertz_kd.schedules import Piecewise

__all__ = [
    "CONTROL",
    "PBT_FILE",
    "PBTController",
    "PBTSettings",
    "RANKED_METRICS",
    "control_members",
]

# the member metrics PBT may rank by (``population.pbt.metric``) and which way is better
RANKED_METRICS = {"val/top1": "max", "val/top5": "max", "val/loss_ce": "min"}

PBT_FILE = "pbt.json"

# a control member's name: its PBT twin's base name, then this, then the seed suffix
CONTROL = "control"


@dataclass(frozen=True)
class PBTSettings:
    """``population.pbt``: the controller's settings (see the module docstring).

    Attributes:
        interval: epochs between exploit steps (>= 1, fewer than the run's epochs).
        quantile: the fraction of members replaced at each step, and the fraction they copy
            from; in ``(0, 0.5]``, and ``floor(K * quantile) >= 1``.
        factors: the perturbation factors, one drawn per copied weight (each > 0).
        resample_probability: the chance a copied weight is drawn afresh instead.
        low, high: bounds of a weight, as multiples of the term's ``scale`` (log-uniform draws;
            ``high`` is lowered to what convex mixing allows, a weight <= 1).
        terms: the terms whose weights PBT owns (default: every term of the method).
        seed: the controller's random stream (default: the smallest member init seed).
        metric: the member metric that ranks them, on the held-out val split: one of
            :data:`RANKED_METRICS` (accuracies rank high first, the loss low first).
        controls: how many control members train beside the PBT members: copies of the first
            ``controls`` members (same overrides, same init seed) that keep the method's own
            weight, never ranked, copied or copied from; the run's evidence against the static
            weight (:func:`control_members`, :meth:`PBTController.evidence`).
    """

    interval: int = 2
    quantile: float = 0.25
    factors: tuple[float, ...] = (0.8, 1.2)
    resample_probability: float = 0.25
    low: float = 0.25
    high: float = 4.0
    terms: tuple[str, ...] | None = None
    seed: int | None = None
    metric: str = "val/top1"
    controls: int = 0

    @classmethod
    def from_config(cls, node: Mapping[str, Any] | None) -> PBTSettings | None:
        """The settings a config node gives (``None`` when there is none).

        Raises:
            ValueError: an unknown key or a value out of range, naming ``population.pbt.<key>``.
        """
        if node is None:
            return None
        node = dict(node)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(node) - known)
        if unknown:
            raise ValueError(
                f"population.pbt has no setting {', '.join(unknown)}; its settings are "
                f"{', '.join(sorted(known))}"
            )
        try:
            if node.get("factors") is not None:
                node["factors"] = tuple(float(f) for f in node["factors"])
            if node.get("terms") is not None:
                terms = node["terms"]
                node["terms"] = (terms,) if isinstance(terms, str) else tuple(map(str, terms))
            for key in ("interval", "controls"):
                if key in node:
                    node[key] = _integer(node[key], key)
            for key in ("quantile", "resample_probability", "low", "high"):
                if key in node:
                    node[key] = float(node[key])
            if node.get("seed") is not None:
                node["seed"] = int(node["seed"])
        except (TypeError, ValueError) as error:
            raise ValueError(f"population.pbt: a setting is not a number ({error})") from None
        settings = cls(**{k: v for k, v in node.items() if v is not None or k in ("terms", "seed")})
        settings._check_values()
        return settings

    def _check_values(self) -> None:
        def need(ok: bool, key: str, expected: str) -> None:
            if not ok:
                raise ValueError(f"population.pbt.{key}={getattr(self, key)!r} must be {expected}")

        need(self.interval >= 1, "interval", "at least 1 (epochs between exploit steps)")
        need(self.controls >= 0, "controls", "a count of control members, 0 or more")
        need(0 < self.quantile <= 0.5, "quantile", "in (0, 0.5] (the bottom copies the top)")
        need(
            len(self.factors) > 0 and all(f > 0 for f in self.factors),
            "factors",
            "a non-empty list of positive factors",
        )
        need(0 <= self.resample_probability <= 1, "resample_probability", "in [0, 1]")
        need(self.low > 0, "low", "> 0 (weights are drawn log-uniformly)")
        need(self.high > self.low, "high", f"> low ({self.low})")
        need(
            self.metric in RANKED_METRICS,
            "metric",
            f"one of {', '.join(RANKED_METRICS)} (what members log on the val split)",
        )

    def better(self, score: float) -> float:
        """``score`` as a rank key, larger better whatever the metric's direction."""
        return score if RANKED_METRICS[self.metric] == "max" else -score

    def check_run(
        self,
        members: Sequence[str],
        objectives: Mapping[str, Any],
        max_epochs: int | None,
        val_split: int,
        check_val_every_n_epoch: int | None,
        progress_modes: Mapping[str, str],
        val_check_interval: float | int | None = None,
        limit_val_batches: float | int | None = None,
    ) -> list[str]:
        """Check the settings against the run before any teacher work; return the PBT terms.

        Raises:
            ValueError: the interval is not shorter than the run, too few members for the
                quantile, no held-out val split, validation not every interval, members whose
                objectives differ, a term the objective lacks, or a member whose weights follow
                the trajectory (PBT owns them as a function of the clock).
        """
        k = len(members)
        if k * self.quantile < 1:
            raise ValueError(
                f"population.pbt.quantile={self.quantile} with {k} members replaces "
                f"floor({k} * {self.quantile}) = 0 of them: use at least "
                f"{math.ceil(1 / self.quantile)} members (population.seeds) or a larger quantile"
            )
        if max_epochs is None or max_epochs < 1:
            raise ValueError("population.pbt needs a finite trainer.max_epochs")
        if self.interval >= max_epochs:
            raise ValueError(
                f"population.pbt.interval={self.interval} is not shorter than the run "
                f"(trainer.max_epochs={max_epochs}): no exploit step would ever happen; use an "
                f"interval below {max_epochs}"
            )
        if not val_split:
            raise ValueError(
                "population.pbt selects members on a held-out val split, and data.val_split=0 "
                "validates on the test split: set data.val_split (e.g. 5000)"
            )
        if val_check_interval not in (None, 1, 1.0):
            raise ValueError(
                f"population.pbt decides at epoch ends, and trainer.val_check_interval="
                f"{val_check_interval} validates inside epochs: leave it at 1.0"
            )
        if limit_val_batches is not None and float(limit_val_batches) == 0:
            raise ValueError(
                "population.pbt ranks members on the val split, and trainer.limit_val_batches=0 "
                "switches validation off: remove that setting"
            )
        if check_val_every_n_epoch is None:
            raise ValueError(
                "population.pbt needs trainer.check_val_every_n_epoch (an epoch count, e.g. 1)"
            )
        every = int(check_val_every_n_epoch)
        if self.interval % every:
            raise ValueError(
                f"population.pbt.interval={self.interval} is not a multiple of "
                f"trainer.check_val_every_n_epoch={every}: exploit steps read that epoch's val score"
            )
        names = {n: tuple(o.names) for n, o in objectives.items()}
        first = next(iter(names.values()))
        lead = next(iter(objectives.values()))
        for name, terms in names.items():
            if terms != first or _without_schedules(objectives[name]) != _without_schedules(lead):
                raise ValueError(
                    f"population.pbt: member {name!r} and member {members[0]!r} differ in their "
                    f"objective (terms {list(terms)} and {list(first)}, or their scales, mixing or "
                    "term settings): PBT members train one method (a member copies another's "
                    "whole state)"
                )
        if not first:
            raise ValueError("population.pbt: the members' method has no distillation term")
        terms = list(self.terms) if self.terms is not None else list(first)
        missing = [t for t in terms if t not in first]
        if missing or not terms:
            raise ValueError(f"population.pbt.terms={terms}: the method's terms are {list(first)}")
        if not math.isfinite(self.high):
            raise ValueError(f"population.pbt.high={self.high} must be finite")
        for term in terms:
            cap = _convex_cap(lead, term)
            if cap is not None and min(self.high, cap) <= self.low:
                raise ValueError(
                    f"population.pbt.low={self.low}: under convex mixing {term}_weight <= 1, so its "
                    f"multiple of the scale {lead.scales[term]} is at most {cap:g}; use a low below it"
                )
        for name, mode in progress_modes.items():
            if mode != "clock":
                raise ValueError(
                    f"population member {name!r} sets progress={mode}: PBT owns the weights as a "
                    "function of the clock; leave callbacks.gompertz_weight.progress=clock"
                )
        return terms


def control_members(
    population: Mapping[str, Any], members: Mapping[str, tuple[Sequence[str], int | None, str]]
) -> dict[str, tuple[list[str], int | None]]:
    """The control members of ``population.pbt.controls``: ``name -> (overrides, init seed)``.

    ``members`` maps each PBT member's name to ``(overrides, init seed, base name)`` in the
    population's order. Control ``i`` is the ``i``-th member's twin: the same overrides and init
    seed, named ``<base>_control_s<seed>`` (``<base>_control`` for a member without a seed
    suffix), trained beside the PBT members at the method's own weight: nothing the controller
    does touches it. Empty without PBT or controls.

    Raises:
        ValueError: a bad ``population.pbt`` (any setting), or more controls than members.
    """
    settings = PBTSettings.from_config(population.get("pbt"))
    if settings is None or not settings.controls:
        return {}
    if settings.controls > len(members):
        raise ValueError(
            f"population.pbt.controls={settings.controls}: a control is the twin of a PBT member "
            f"(its overrides and init seed), and there are {len(members)} members; use at most "
            f"{len(members)}"
        )
    out = {}
    for name, (overrides, seed, base) in list(members.items())[: settings.controls]:
        suffix = "" if name == base or seed is None else f"_s{seed}"
        control = f"{base}_{CONTROL}{suffix}"
        if control in members:
            raise ValueError(
                f"population.pbt.controls: the control of member {name!r} would be named "
                f"{control!r}, which a PBT member is already called; rename that member"
            )
        out[control] = (list(overrides), seed)
    return out


class PBTController(L.Callback):
    """Truncation selection and explore of the members' term weights (see the module docstring).

    Args:
        settings: the controller's :class:`PBTSettings`.
        members: the member names, in the population's order.
        terms: the terms whose weights the controller owns.
        seed: the random stream's seed.
        member_overrides: each member's own overrides (``population.members``), for the replay.
        run_overrides: the run's command-line overrides without its population settings, for the
            replay's command.
        name: the population's name (the replay's is ``<name>_replay``).
        summary_path: where the run's ``pbt.json`` goes: rewritten after every round with
            ``"status": "running"``, and by the population at the end as ``"completed"``.
        controls: the population's control members (``population.pbt.controls``), which train
            beside the members untouched; named in ``pbt.json`` with their test scores.

    Must come after :class:`~gompertz_kd.population.MemberCheckpoint` among the trainer's
    callbacks (it copies the best checkpoints that callback has just written).
    """

    def __init__(
        self,
        settings: PBTSettings,
        members: Sequence[str],
        terms: Sequence[str],
        seed: int,
        member_overrides: Mapping[str, Sequence[str]] | None = None,
        run_overrides: Sequence[str] = (),
        name: str = "pbt",
        summary_path: str | os.PathLike | None = None,
        controls: Sequence[str] = (),
    ) -> None:
        self.settings = settings
        self.members = list(members)
        self.terms = list(terms)
        self.seed = int(seed)
        self.member_overrides = {k: list(v) for k, v in (member_overrides or {}).items()}
        self.run_overrides = list(run_overrides)
        self.name = str(name)
        self.summary_path = None if summary_path is None else Path(summary_path)
        self.controls = list(controls)
        self.rng = random.Random(self.seed)
        # name -> {"boundaries": [...], "values": {term: [...]}, "origin": name, "events": [...]}
        self.lineage: dict[str, dict[str, Any]] = {}
        self.rounds: list[dict[str, Any]] = []
        # name -> the lineages a copy replaced (the member's own history before each copy)
        self.replaced: dict[str, list[dict[str, Any]]] = {}
        self.last_scores: dict[str, float] = {}
        self.last_epoch: int | None = None

    # ------------------------------------------------------------------ schedules
    def bounds(self, pl_module: Any, term: str) -> tuple[float, float]:
        """``(low, high)`` of ``term``'s weight multiple; ``high`` clipped to convex mixing's 1."""
        objective = next(iter(pl_module.members.values())).objective
        cap = _convex_cap(objective, term)
        return self.settings.low, self.settings.high if cap is None else min(
            self.settings.high, cap
        )

    def draw(self, pl_module: Any, term: str) -> float:
        low, high = self.bounds(pl_module, term)
        return _log_uniform(self.rng.random(), low, high)

    def schedule(self, name: str, term: str) -> Piecewise:
        """Member ``name``'s weight multiple on ``term`` as a function of progress."""
        own = self.lineage[name]
        return Piecewise(tuple(own["boundaries"]), tuple(own["values"][term]))

    def install(self, pl_module: Any) -> None:
        """Make every member's PBT terms follow its lineage's schedule."""
        for name in self.members:
            member = pl_module.members[name]
            for term in self.terms:
                member.objective.schedules[term] = self.schedule(name, term)
            member.set_progress(member.progress)

    def on_train_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        if not self.lineage:  # a fresh run: draw each member's starting weights, in member order
            for name in self.members:
                self.lineage[name] = {
                    "origin": name,
                    "boundaries": [],
                    "values": {t: [self.draw(pl_module, t)] for t in self.terms},
                    "events": [],
                }
        self.install(pl_module)

    # ------------------------------------------------------------------ exploit and explore
    def on_validation_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        if trainer.sanity_checking:
            return
        epoch = trainer.current_epoch
        scores = {}
        for name in self.members:
            value = trainer.callback_metrics.get(f"{name}/{self.settings.metric}")
            if value is None:
                raise ValueError(
                    f"population.pbt.metric: member {name!r} logged no {self.settings.metric!r} "
                    "this epoch (is validation switched off, limit_val_batches=0?)"
                )
            scores[name] = float(value)
        self.last_scores, self.last_epoch = scores, epoch
        done = epoch + 1
        if done % self.settings.interval or done >= int(trainer.max_epochs):
            return
        if any(r["epoch"] == done for r in self.rounds):
            return  # this epoch's step was taken before an interruption
        self.exploit(trainer, pl_module, scores, done)

    def decide(self, scores: Mapping[str, float]) -> list[tuple[str, str, dict[str, Any]]]:
        """One round's decisions, ``[(member, source, {term: explore})]``, drawn from the
        controller's stream: the bottom quantile (ties broken by member order) each copy a
        member drawn from the top quantile."""
        better = self.settings.better
        order = sorted(self.members, key=lambda n: (-better(scores[n]), self.members.index(n)))
        n = int(len(order) * self.settings.quantile)
        top, bottom = order[:n], order[-n:]
        out = []
        for name in bottom:
            source = top[self.rng.randrange(len(top))]
            explore = {}
            for term in self.terms:
                if self.rng.random() < self.settings.resample_probability:
                    explore[term] = {"how": "resample", "draw": self.rng.random()}
                else:
                    factor = self.settings.factors[self.rng.randrange(len(self.settings.factors))]
                    explore[term] = {"how": "perturb", "factor": factor}
            out.append((name, source, explore))
        return out

    def explore(
        self,
        decisions: Sequence[tuple[str, str, Mapping[str, Any]]],
        bounds: Mapping[str, tuple[float, float]],
    ) -> dict[str, dict[str, dict[str, Any]]]:
        """Each copier's new weights, ``{member: {term: {how, factor | draw, value}}}``: the
        source's weight times the drawn factor, or drawn afresh, clipped to ``bounds``.

        Every member sees the same batches, so a copy that ends with its source's weights (clipped
        back at a bound) or with another copier's of the same source (both drew the same factor)
        would be its twin, bit for bit, for the rest of the run: a member lost. Such a copy takes
        the first factor that gives distinct weights instead, else (where ``resample_probability``
        allows draws) a fresh draw from the controller's stream; the explore drawn first is kept
        under ``instead_of``."""
        taken: dict[str, list[tuple[float, ...]]] = {}
        out: dict[str, dict[str, dict[str, Any]]] = {}

        def weights(source: str, how: Mapping[str, Any]) -> tuple[float, ...]:
            return tuple(
                _explored(self.lineage[source]["values"][t][-1], how[t], *bounds[t])
                for t in self.terms
            )

        for name, source, drawn in decisions:
            seen = taken.setdefault(
                source, [tuple(self.lineage[source]["values"][t][-1] for t in self.terms)]
            )
            other_factors = (
                {**drawn, t: {"how": "perturb", "factor": f}}
                for t in self.terms
                for f in self.settings.factors
            )
            how = next((h for h in (drawn, *other_factors) if weights(source, h) not in seen), None)
            # a fresh draw only where the settings allow resampling (factors [1] and no
            # resampling ask for exploitation alone: twins, knowingly)
            for _ in range(8 if how is None and self.settings.resample_probability > 0 else 0):
                fresh = {t: {"how": "resample", "draw": self.rng.random()} for t in self.terms}
                if weights(source, fresh) not in seen:
                    how = fresh
                    break
            how = how or drawn  # none gives distinct weights: the draw stands
            values = dict(zip(self.terms, weights(source, how), strict=True))
            seen.append(tuple(values.values()))
            out[name] = {}
            for t in self.terms:
                out[name][t] = {**how[t], "value": values[t]}
                if how[t] != drawn[t]:
                    out[name][t]["instead_of"] = dict(drawn[t])
        return out

    def exploit(
        self, trainer: L.Trainer, pl_module: Any, scores: Mapping[str, float], done: int
    ) -> None:
        decisions = self.decide(scores)
        if trainer.world_size > 1:
            lead = trainer.strategy.broadcast(decisions, src=0)
            if not trainer.strategy.reduce_boolean_decision(lead == decisions, all=True):
                raise RuntimeError(
                    f"population.pbt: the processes took different decisions (rank "
                    f"{trainer.global_rank}: {decisions}; rank 0: {lead}): the val scores were not "
                    "reduced alike on every process"
                )
        progress = self.boundary(trainer)
        sources = {name: copy.deepcopy(self.lineage[source]) for name, source, _ in decisions}
        bounds = {term: self.bounds(pl_module, term) for term in self.terms}
        explored = self.explore(decisions, bounds)
        for name, source, _ in decisions:
            self.copy_member(trainer, pl_module, source, name)
            lineage = sources[name]
            event: dict[str, Any] = {
                "member": name,
                "epoch": done,
                "step": int(trainer.global_step),
                "progress": progress,
                "copied_from": source,
                "score": scores[name],
                "source_score": scores[source],
                "explore": {},
            }
            changed = False
            for term in self.terms:
                current = lineage["values"][term][-1]
                event["explore"][term] = explored[name][term]
                value = explored[name][term]["value"]
                changed |= value != current
                lineage["values"][term].append(value)
            if changed and (not lineage["boundaries"] or lineage["boundaries"][-1] < progress):
                lineage["boundaries"].append(progress)
            else:  # nothing moved (no explore gave it other weights): no new segment
                for term in self.terms:
                    lineage["values"][term].pop()
            lineage["events"].append(event)
            self.replaced.setdefault(name, []).append(
                {"until": progress, "epoch": done, **copy.deepcopy(self.lineage[name])}
            )
            self.lineage[name] = lineage
        self.rounds.append(
            {
                "epoch": done,
                "progress": progress,
                "scores": dict(scores),
                "copies": {name: source for name, source, _ in decisions},
            }
        )
        self.install(pl_module)
        if self.summary_path is not None and trainer.is_global_zero:
            # the rounds so far, for a long run's progress (status "running" until the end)
            write_summary(self.summary_path, {**self.summary(), "status": "running"})

    @staticmethod
    def boundary(trainer: L.Trainer) -> float:
        """The progress of the next training step (where a new weight starts)."""
        total = trainer.estimated_stepping_batches
        return min(int(trainer.global_step) / int(total), 1.0)

    def copy_member(self, trainer: L.Trainer, pl_module: Any, source: str, target: str) -> None:
        """``target`` becomes ``source``: weights, objective state, optimiser state, weight
        callback state, best score and checkpoint files."""
        from gompertz_kd.population import MemberCheckpoint, MemberWeightCallback

        members = pl_module.members
        with torch.no_grad():
            result = members[target].load_state_dict(pl_module.member_state(source), strict=False)
        wrong = list(result.unexpected_keys) + [
            k for k in result.missing_keys if not k.startswith("teacher.")
        ]
        if wrong:
            raise RuntimeError(f"population.pbt: copying {source!r} to {target!r} misses {wrong}")
        for optimizer in trainer.optimizers:
            for p_src, p_dst in zip(
                members[source].trainable_parameters(),
                members[target].trainable_parameters(),
                strict=True,
            ):
                state = optimizer.state.get(p_src)
                if not state:
                    optimizer.state.pop(p_dst, None)
                    continue
                optimizer.state[p_dst] = {
                    k: v.detach().clone() if torch.is_tensor(v) else copy.deepcopy(v)
                    for k, v in state.items()
                }
        weights = {c.member: c for c in trainer.callbacks if isinstance(c, MemberWeightCallback)}
        if source in weights and target in weights:
            weights[target].load_state_dict(copy.deepcopy(weights[source].state_dict()))
        if source in pl_module.best:
            pl_module.best[target] = dict(pl_module.best[source])
        else:
            pl_module.best.pop(target, None)
        if not trainer.is_global_zero:
            return
        for callback in trainer.callbacks:
            if isinstance(callback, MemberCheckpoint):
                for which in ("best", "last"):
                    _copy_checkpoint(
                        callback.path(source, which), callback.path(target, which), target
                    )

    def on_train_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        if self.last_epoch is None:
            raise ValueError(
                "population.pbt: no validation ran, so no member was ranked; PBT needs the val "
                "split validated every epoch (trainer.limit_val_batches, check_val_every_n_epoch)"
            )

    # ------------------------------------------------------------------ results
    def winner(self) -> str | None:
        """The member with the best score at the last validation (ties: member order)."""
        if not self.last_scores:
            return None
        better = self.settings.better
        return max(
            self.members, key=lambda n: (better(self.last_scores[n]), -self.members.index(n))
        )

    def member_record(self, name: str) -> dict[str, Any]:
        """What member ``name``'s ``results.json`` keeps under ``pbt``."""
        own = self.lineage[name]
        return {
            "origin": own["origin"],
            "boundaries": list(own["boundaries"]),
            "values": {t: list(v) for t, v in own["values"].items()},
            "schedules": {t: self.schedule(name, t).text() for t in self.terms},
            "events": copy.deepcopy(own["events"]),
            "last_val_score": self.last_scores.get(name),
            "winner": name == self.winner(),
            # what this member followed before each copy replaced its lineage (until: progress)
            "replaced": copy.deepcopy(self.replaced.get(name, [])),
        }

    def summary(self, results: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, Any]:
        """The run's ``pbt.json``: settings, rounds, every lineage, the winner and its replay;
        with the members' final ``results``, the test scores against the controls
        (:meth:`evidence`)."""
        winner = self.winner()
        replay = None
        if winner is not None:
            replay = self.replay(winner)
        return {
            "settings": {
                k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self.settings).items()
            },
            "seed": self.seed,
            "terms": self.terms,
            "members": self.members,
            "rounds": copy.deepcopy(self.rounds),
            "lineage": {n: self.member_record(n) for n in self.members},
            "last_epoch": self.last_epoch,
            "winner": winner,
            "replay": replay,
            "controls": list(self.controls),
            "evidence": None if results is None else self.evidence(results),
        }

    def evidence(self, results: Mapping[str, Mapping[str, Any]]) -> dict[str, Any] | None:
        """Test top-1 (``test``: the last epoch; ``best``: the best val epoch) of the winner, of
        every PBT member and of every control, with the winner's and the members' mean minus the
        controls' mean, in points. ``None`` without a winner or without test scores.

        One PBT run is one sample, and its winner was selected on val among the members (the
        controls were not): the replay (:meth:`replay`) is the test of the schedule itself."""
        winner = self.winner()
        if winner is None:
            return None
        out: dict[str, Any] = {"winner": winner, "controls": list(self.controls)}
        for which in ("test", "best"):
            members = {n: _top1(results, n, which) for n in self.members}
            controls = {n: _top1(results, n, which) for n in self.controls}
            if members[winner] is None:
                continue
            entry: dict[str, Any] = {
                "winner": members[winner],
                "members": members,
                "controls": controls,
            }
            kept = [v for v in controls.values() if v is not None]
            if kept:
                mean = sum(kept) / len(kept)
                scored = [v for v in members.values() if v is not None]
                entry["winner_minus_controls"] = 100 * (members[winner] - mean)
                entry["members_minus_controls"] = 100 * (sum(scored) / len(scored) - mean)
            out[which] = entry
        return out if "test" in out or "best" in out else None

    def replay(self, name: str, seeds: Sequence[int] = (0, 1, 2)) -> dict[str, Any]:
        """How member ``name``'s schedule trains from scratch: its piecewise schedules, its
        overrides with those schedules in place of the PBT terms' own, and the command that
        trains them at init ``seeds`` as population ``<name>_replay``."""
        owned = tuple(f"method.terms.{t}.schedule=" for t in self.terms)
        overrides = [
            o for o in self.member_overrides.get(name, []) if not o.lstrip("+~").startswith(owned)
        ]
        overrides += [
            f'method.terms.{t}.schedule="{self.schedule(name, t).text()}"' for t in self.terms
        ]
        members = "{replay: [" + ", ".join(_hydra_string(o) for o in overrides) + "]}"
        command = [
            "python", "-m", "gompertz_kd.run", *self.run_overrides,
            f"+population.members={members}",
            f"+population.seeds=[{','.join(str(int(s)) for s in seeds)}]",
            f"+population.name={self.name}_replay",
        ]  # fmt: skip
        return {
            "member": name,
            "schedules": {
                t: {
                    "name": "piecewise",
                    "boundaries": list(self.lineage[name]["boundaries"]),
                    "values": list(self.lineage[name]["values"][t]),
                }
                for t in self.terms
            },
            "overrides": overrides,
            "command": " ".join(_shell_word(w) for w in command),
        }

    # ------------------------------------------------------------------ checkpoint state
    def state_dict(self) -> dict[str, Any]:
        return {
            "rng": self.rng.getstate(),
            "lineage": copy.deepcopy(self.lineage),
            "rounds": copy.deepcopy(self.rounds),
            "last_scores": dict(self.last_scores),
            "last_epoch": self.last_epoch,
            "members": list(self.members),
            "terms": list(self.terms),
            "replaced": copy.deepcopy(self.replaced),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if list(state_dict["members"]) != self.members or list(state_dict["terms"]) != self.terms:
            raise ValueError(
                f"population.pbt: the checkpoint's members {state_dict['members']} and terms "
                f"{state_dict['terms']} are not this run's {self.members} and {self.terms}; "
                "resume with the population the checkpoint was written by"
            )
        version, internal, gauss = state_dict["rng"]
        self.rng.setstate((version, tuple(internal), gauss))
        self.lineage = copy.deepcopy(state_dict["lineage"])
        self.rounds = copy.deepcopy(state_dict["rounds"])
        self.replaced = copy.deepcopy(state_dict.get("replaced", {}))  # older checkpoints lack it
        self.last_scores = dict(state_dict["last_scores"])
        self.last_epoch = state_dict["last_epoch"]


def _explored(current: float, how: Mapping[str, Any], low: float, high: float) -> float:
    """A weight after one explore step: ``current`` times the factor, or a log-uniform draw in
    ``[low, high]`` (``how["draw"]`` in [0, 1)), clipped to ``[low, high]``."""
    if how["how"] == "resample":
        value = _log_uniform(how["draw"], low, high)
    else:
        value = current * how["factor"]
    return min(max(value, low), high)


def _log_uniform(u: float, low: float, high: float) -> float:
    """The point ``u`` (in [0, 1)) of the way from ``low`` to ``high`` on a log scale: a uniform
    ``u`` gives a log-uniform draw (bit for bit ``exp(random.uniform(log(low), log(high)))``)."""
    return math.exp(math.log(low) + u * (math.log(high) - math.log(low)))


def _integer(value: Any, key: str) -> int:
    if isinstance(value, bool) or float(value) != int(float(value)):
        raise ValueError(f"population.pbt.{key}={value!r} must be a whole number")
    return int(float(value))


def _top1(results: Mapping[str, Mapping[str, Any]], name: str, which: str) -> float | None:
    value = (results.get(name, {}).get(which) or {}).get("top1")
    return None if value is None else float(value)


def _convex_cap(objective: Any, term: str) -> float | None:
    """The largest multiple of ``term``'s scale convex mixing allows (its weight <= 1), or None."""
    if objective.mixing == "convex" and term == objective.mixing_term:
        return 1.0 / objective.scales[term]
    return None


def _without_schedules(objective: Any) -> tuple:
    """What must be equal between PBT members' objectives: everything but the schedules."""
    return (
        objective.mixing,
        objective.mixing_term,
        objective.ce_weight,
        tuple(
            (name, objective.scales[name], repr(term.spec()))
            for name, term in objective.terms.items()
        ),
    )


def _shell_word(word: str) -> str:
    """``word`` quoted for a POSIX shell, readably: bare, in single quotes, or (holding single
    quotes) in double quotes with ``"``, ``\\``, ``$`` and backquotes escaped."""
    if shlex.quote(word) == word or "'" not in word:
        return shlex.quote(word)
    return '"' + re.sub(r'(["\\$`])', r"\\\1", word) + '"'


def _hydra_string(text: str) -> str:
    """``text`` as a quoted string inside a Hydra override's list."""
    if "'" not in text:
        return f"'{text}'"
    return '"' + text.replace('"', '\\"') + '"'


def _copy_checkpoint(source: Path, target: Path, member: str) -> None:
    """``target`` replaced by ``source`` (renamed for ``member``) through a temporary file; a
    missing ``source`` removes ``target`` (its lineage had none)."""
    if not source.is_file():
        target.unlink(missing_ok=True)
        return
    payload = torch.load(source, map_location="cpu", weights_only=True)
    payload["member"] = member
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    torch.save(payload, partial)
    os.replace(partial, target)


def write_summary(path: Path, summary: Mapping[str, Any]) -> None:
    """Write ``pbt.json`` atomically."""
    from gompertz_kd.run_parts import write_json_atomically

    write_json_atomically(Path(path), dict(summary))
