"""Summarise finished runs: a Markdown table of accuracies over seeds, and training-curve plots.

(One file above 700 lines, on purpose: the report is imported alone, without torch or the rest of
gompertz_kd, on machines that only hold copied run directories; loading, the table and the plots
stay in this one module for that.)

The last stage of the data flow (run directory → report). It reads only what a run leaves
behind — ``results.json`` and the Lightning ``CSVLogger`` history it names — and imports nothing
else from gompertz_kd but the file names of :mod:`gompertz_kd.run_files` (no torch), so it
also works on runs copied off a cluster::

    python -m gompertz_kd.report multirun/2025-06-01/12-00-00 outputs/baseline --out reports/c100

finds every ``results.json`` under the given paths (a run directory holds one, a Hydra multirun
directory one per numbered sub-directory), groups the completed runs into configurations
(:func:`config_name`: the run's ``name`` plus its Hydra overrides without ``seed=``, ``paths.*``
and ``hydra.*``), prints the table and writes ``report.md`` with ``accuracy.png``,
``loss_terms.png`` and ``loss_weights.png`` into ``--out`` (default: the first path given).
Runs whose ``status`` is not ``"completed"`` are skipped with a warning and never counted.

Everything is importable for notebooks::

    runs = load_runs(["multirun/2025-06-01/12-00-00"])
    print(markdown_table(summarize(runs)))
    plot_weights(runs)          # a matplotlib Figure, displayed inline

Configurations keep the order in which they are first met: paths in the order given, and within
a path the run directories in natural order (``2/`` before ``10/``).
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import os
import re
import sys
import textwrap
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator

from gompertz_kd.markdown import splice_block
from gompertz_kd.run_files import HISTORY_FILE, RESULTS_FILE, TERM_ORDER
from gompertz_kd.run_files import STAGE_NAMES as _STAGES

__all__ = [
    "DEFAULT_GROUP_BY",
    "STAGE_NAMES",
    "MARK_END",
    "MARK_START",
    "History",
    "Run",
    "Stat",
    "SummaryRow",
    "config_name",
    "find_results",
    "load_runs",
    "main",
    "markdown_table",
    "mean_band",
    "paired_difference",
    "plot_accuracy",
    "plot_loss_terms",
    "plot_weights",
    "stage_spans",
    "summarize",
    "write_report",
]


log = logging.getLogger(__name__)

DEFAULT_HISTORY = HISTORY_FILE
DEFAULT_GROUP_BY: tuple[str, ...] = ("name", "overrides")
# Override prefixes that vary between seeds or machines but not between configurations.
_IGNORED_OVERRIDE_KEYS = ("seed",)
_IGNORED_OVERRIDE_PREFIXES = ("paths.", "hydra.")
STAGE_NAMES = dict(enumerate(_STAGES))
_STAGE_COLOURS = {0: "#bdbdbd", 1: "#9ecae1", 2: "#a1d99b"}
_LOSS_TERM = re.compile(r"^train/loss_[a-z0-9]+$")
_WEIGHT = re.compile(r"^[a-z0-9]+_weight$")
_KNOWN_ORDER = TERM_ORDER
_SELECTED_ON = {"val": "held-out val", "test": "test (optimistic)"}
PLOT_FILES = {
    "accuracy": "accuracy.png",
    "loss_terms": "loss_terms.png",
    "loss_weights": "loss_weights.png",
    "pbt_lineage": "pbt_lineage.png",
}
# The fixed schedules a PBT lineage is drawn beside (the schedule study's arms), peak 1.
PBT_REFERENCE_SCHEDULES = ("constant", "linear", "cosine", "gompertz")


# ---------------------------------------------------------------------------------------- loading
@dataclass(frozen=True)
class History:
    """A run's Lightning ``CSVLogger`` metrics, column by column.

    ``columns`` maps every header name (``"step"``, ``"epoch"``, ``"val/top1"``, ...) to a float
    array with one entry per CSV row, NaN where that row left the column empty. CSVLogger writes
    step rows (train losses, weights, ``schedule/*``) and epoch-end rows (``val/*``,
    ``train/top1``) separately, so most columns are mostly NaN.
    """

    columns: dict[str, np.ndarray]

    @classmethod
    def read_csv(cls, path: str | Path) -> History:
        """Parse a CSVLogger ``metrics.csv``; a value that is not a number reads as NaN."""
        with open(path, newline="") as file:
            reader = csv.DictReader(file)
            names = list(reader.fieldnames or [])
            rows = list(reader)
        return cls({n: np.array([_to_float(row.get(n)) for row in rows]) for n in names})

    def __contains__(self, name: object) -> bool:
        return name in self.columns and bool(np.isfinite(self.columns[name]).any())

    def names(self) -> list[str]:
        """Columns with at least one value."""
        return [n for n in self.columns if n in self]

    def series(self, name: str, x: str = "step") -> tuple[np.ndarray, np.ndarray]:
        """``(x, y)`` over the rows where both ``x`` and ``name`` are filled, in file order;
        two empty arrays when either column is absent."""
        if name not in self.columns or x not in self.columns:
            return np.empty(0), np.empty(0)
        xs, ys = self.columns[x], self.columns[name]
        keep = np.isfinite(xs) & np.isfinite(ys)
        return xs[keep], ys[keep]


# how a PBT member's configuration is marked (config_name); such rows pair with no seed
PBT_WINNER, PBT_MEMBER = "[PBT winner]", "[PBT member]"


def _to_float(value: str | None) -> float:
    try:
        return float(value) if value not in (None, "") else math.nan
    except ValueError:
        return math.nan


@dataclass(frozen=True)
class Run:
    """One completed run.

    Attributes:
        run_dir: the directory holding ``results.json``.
        config: its configuration identity (see :func:`config_name`); seeds of one configuration
            share it.
        seed: the run's seed (``None`` when results.json has none).
        results: the parsed ``results.json``, untouched.
        history: the CSVLogger metrics, or ``None`` when the file is missing (the run still
            counts in the table, but is left out of the plots).
    """

    run_dir: Path
    config: str
    seed: int | None
    results: dict[str, Any] = field(repr=False)
    history: History | None = field(default=None, repr=False)


def _natural_key(path: Path) -> list[Any]:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", path.as_posix())]


def find_results(paths: Iterable[str | Path]) -> list[Path]:
    """Every ``results.json`` under ``paths`` (a path may also be a results.json itself), each
    once, in the order of ``paths`` and naturally sorted within each.

    Raises:
        FileNotFoundError: a path does not exist, or no results.json is found under any of them.
    """
    paths = [Path(p) for p in paths]
    found: list[Path] = []
    seen: set[Path] = set()
    for path in paths:
        if not path.exists():
            raise FileNotFoundError(f"no such file or directory: {path}")
        hits = [path] if path.is_file() else sorted(path.rglob(RESULTS_FILE), key=_natural_key)
        for hit in hits:
            if hit.name == RESULTS_FILE and hit.resolve() not in seen:
                seen.add(hit.resolve())
                found.append(hit)
    if not found:
        where = ", ".join(str(p) for p in paths)
        raise FileNotFoundError(f"no {RESULTS_FILE} found under: {where}")
    return found


def _lookup(results: dict[str, Any], key: str) -> tuple[bool, Any]:
    """A top-level results.json field, else a dotted path into its resolved ``config``."""
    if key in results:
        return True, results[key]
    node: Any = results.get("config") or {}
    for part in key.removeprefix("config.").split("."):
        if not isinstance(node, dict) or part not in node:
            return False, None
        node = node[part]
    return True, node


def _kept_overrides(results: dict[str, Any]) -> list[str]:
    kept = []
    for override in results.get("overrides") or []:
        key, _, value = override.lstrip("+~").partition("=")
        if key in _IGNORED_OVERRIDE_KEYS or key.startswith(_IGNORED_OVERRIDE_PREFIXES):
            continue
        # The experiment's name already says which experiment it is.
        if key == "experiment" and value == results.get("name"):
            continue
        kept.append(override)
    return sorted(kept)


def config_name(results: dict[str, Any], group_by: Sequence[str] = DEFAULT_GROUP_BY) -> str:
    """The configuration a run belongs to: runs that differ only in seed share it.

    Each key of ``group_by`` contributes one part, joined by spaces:

    - ``"name"``: the run's ``name`` (e.g. ``c100_resnet50_mbv2_kd``);
    - ``"overrides"``: its Hydra overrides, sorted, without ``seed=``, ``paths.*``, ``hydra.*``
      and an ``experiment=`` equal to the name (e.g. ``schedule.b=3``);
    - any other top-level results.json field (``student``, ``dataset``, ...) or dotted path in
      the resolved config (``model.kd_scale``) as ``key=value`` (``key=?`` where missing).

    The default gives e.g. ``"c100_resnet50_mbv2 schedule.b=3"``. A member of a PBT run
    (:mod:`gompertz_kd.pbt`) is not a run of its overrides (the controller moved its weight), so
    its configuration is marked ``[PBT winner]`` (the run's winner; one per PBT run) or ``[PBT
    member]``.
    """
    parts = []
    record = results.get("pbt")
    if isinstance(record, dict):
        parts.append(PBT_WINNER if record.get("winner") else PBT_MEMBER)
    for key in group_by:
        if key == "name":
            parts.append(str(results.get("name") or "?"))
        elif key == "overrides":
            parts.extend(_kept_overrides(results))
        else:
            found, value = _lookup(results, key)
            parts.append(f"{key}={value if found else '?'}")
    return " ".join(parts)


def load_runs(paths: Iterable[str | Path], group_by: Sequence[str] = DEFAULT_GROUP_BY) -> list[Run]:
    """Load every completed run under ``paths`` (see :func:`find_results` for the order).

    A results.json that cannot be read or whose ``status`` is not ``"completed"`` is skipped with
    a logged warning; a missing history CSV is warned about and the run kept with
    ``history=None``. ``group_by`` is passed to :func:`config_name`.

    Raises:
        FileNotFoundError: as :func:`find_results`. An empty list means results.json files were
            found but none had completed.
    """
    runs = []
    for file in find_results(paths):
        run_dir = file.parent
        try:
            results = json.loads(file.read_text())
        except (OSError, json.JSONDecodeError) as err:
            log.warning("skipping %s: cannot read it (%s)", file, err)
            continue
        status = results.get("status") if isinstance(results, dict) else None
        if status != "completed":
            log.warning("skipping %s: status %r, not 'completed'", file, status)
            continue
        history = None
        # An explicit null means the run kept no CSV log (no CSVLogger configured).
        relative = results.get("history", DEFAULT_HISTORY)
        history_file = run_dir / relative if relative else None
        if history_file is not None and history_file.is_file():
            history = History.read_csv(history_file)
        else:
            log.warning(
                "%s: no history (%s); the run is left out of the plots",
                run_dir,
                history_file or "history is null in results.json",
            )
        runs.append(
            Run(
                run_dir=run_dir,
                config=config_name(results, group_by),
                seed=results.get("seed"),
                results=results,
                history=history,
            )
        )
    return runs


def _by_config(runs: Iterable[Run]) -> dict[str, list[Run]]:
    """Runs grouped by configuration, in order of first appearance, seeds ascending within."""
    groups: dict[str, list[Run]] = {}
    for run in runs:
        groups.setdefault(run.config, []).append(run)
    for group in groups.values():
        group.sort(key=lambda r: (r.seed is None, r.seed if r.seed is not None else 0))
    return groups


# ------------------------------------------------------------------------------------------ table
@dataclass(frozen=True)
class Stat:
    """Mean and sample standard deviation (``ddof=1``; ``None`` for fewer than two values) over
    the runs that report the quantity; ``n`` counts them, ``mean`` is NaN when ``n == 0``."""

    mean: float
    std: float | None
    n: int

    @classmethod
    def of(cls, values: Iterable[float | None]) -> Stat:
        xs = np.array([v for v in values if v is not None and math.isfinite(v)], dtype=float)
        if xs.size == 0:
            return cls(math.nan, None, 0)
        return cls(float(xs.mean()), float(xs.std(ddof=1)) if xs.size > 1 else None, int(xs.size))


@dataclass(frozen=True)
class SummaryRow:
    """One configuration aggregated over its seeds. Accuracies are fractions in ``[0, 1]``.

    Attributes:
        config: configuration identity; seeds: the seeds aggregated (``n_seeds`` = their count).
        test_top1, test_top5: test accuracy of the model after the last epoch.
        best_top1: test top-1 of the best epoch's checkpoint; the epoch was picked on the
            split(s) in ``selected_on`` (``"val"``: a held-out validation split; ``"test"``: the
            test split itself, optimistic); empty when no run recorded a best epoch.
        wall_time_min: wall time per run in minutes; images_per_s: training throughput.
        test_top1_by_seed: each run's last-epoch test top-1, by seed (for paired differences).
        best_val_top1: the best epoch's validation top-1 (what a search judges by).
        tested: whether every run evaluated the test split (a search's runs do not).
    """

    config: str
    seeds: tuple[int | None, ...]
    test_top1: Stat
    best_top1: Stat
    test_top5: Stat
    selected_on: tuple[str, ...]
    wall_time_min: Stat
    images_per_s: Stat
    test_top1_by_seed: tuple[tuple[int | None, float | None], ...] = ()
    best_val_top1: Stat = Stat.of(())
    tested: bool = True

    @property
    def n_seeds(self) -> int:
        return len(self.seeds)


def _get(results: dict[str, Any], *keys: str) -> float | None:
    node: Any = results
    for key in keys:
        if not isinstance(node, dict) or node.get(key) is None:
            return None
        node = node[key]
    return float(node)


def _selected_on(results: Iterable[dict[str, Any]]) -> tuple[str, ...]:
    picked = ((r.get("best") or {}).get("selected_on") for r in results)
    return tuple(sorted({str(s) for s in picked if s}))


def summarize(runs: Iterable[Run]) -> list[SummaryRow]:
    """One :class:`SummaryRow` per configuration, in order of first appearance."""
    rows = []
    for config, group in _by_config(runs).items():
        seeds = [r.seed for r in group]
        if len(set(seeds)) < len(seeds):
            log.warning("%s: seed repeated among %s; every run is counted", config, seeds)
        res = [r.results for r in group]
        wall = [_get(r, "wall_time_s") for r in res]
        rows.append(
            SummaryRow(
                config=config,
                seeds=tuple(seeds),
                test_top1=Stat.of(_get(r, "test", "top1") for r in res),
                best_top1=Stat.of(_get(r, "best", "top1") for r in res),
                test_top5=Stat.of(_get(r, "test", "top5") for r in res),
                selected_on=_selected_on(res),
                wall_time_min=Stat.of(w / 60.0 if w is not None else None for w in wall),
                images_per_s=Stat.of(_get(r, "train_images_per_s") for r in res),
                test_top1_by_seed=tuple(
                    (seed, _get(r, "test", "top1")) for seed, r in zip(seeds, res, strict=True)
                ),
                best_val_top1=Stat.of(_get(r, "best_val_top1") for r in res),
                tested=all(_get(r, "test", "top1") is not None for r in res),
            )
        )
    return rows


def _pct(stat: Stat) -> str:
    if stat.n == 0:
        return "—"
    std = "—" if stat.std is None else f"{100 * stat.std:.2f}"
    return f"{100 * stat.mean:.2f} ± {std}"


def _plain(stat: Stat, digits: int) -> str:
    return "—" if stat.n == 0 else f"{stat.mean:.{digits}f}"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


TABLE_HEADER = (
    "configuration",
    "n seeds",
    "top-1 % last epoch (test)",
    "top-1 % best epoch (test)",
    "best epoch picked on",
    "top-5 % last epoch (test)",
    "wall time / run (min)",
    "train images/s",
)
TABLE_NOTES = (
    "- *last epoch*: the model after the final epoch, evaluated on the test split.",
    "- *best epoch*: the checkpoint of the epoch picked as best, evaluated on the test split; "
    "the epoch was picked on the split in *best epoch picked on*: "
    "**held-out val** is a validation split carved out of the training data (an honest estimate); "
    "**test (optimistic)** means the epoch was picked on the test split itself, which biases "
    "the number upwards.",
    "- Accuracies in %, mean ± sample standard deviation (ddof = 1) over seeds; "
    "— where there is a single seed. Wall time and images/s are means per run.",
)


def paired_difference(row: SummaryRow, baseline: SummaryRow) -> Stat:
    """Last-epoch test top-1 of ``row`` minus ``baseline``'s, seed by seed, over the seeds both
    have (same seed: same student initialisation and data order, so the pairing removes that
    part of the spread): mean and sample std of the differences. PBT members pair with nothing
    (no values): a member's student may descend from another member's seed."""
    if row.config.startswith((PBT_WINNER, PBT_MEMBER)):
        return Stat.of(())
    base = {s: v for s, v in baseline.test_top1_by_seed if s is not None and v is not None}
    return Stat.of(v - base[s] for s, v in row.test_top1_by_seed if s in base and v is not None)


def _delta(stat: Stat) -> str:
    if stat.n == 0:
        return "—"
    std = "—" if stat.std is None else f"{100 * stat.std:.2f}"
    return f"{100 * stat.mean:+.2f} ± {std} (n={stat.n})"


def markdown_table(rows: Sequence[SummaryRow], baseline: str | None = None) -> str:
    """The summary as a GitHub-flavoured Markdown table followed by notes saying what each
    accuracy column means. Ends without a newline.

    ``baseline``: a configuration among ``rows``; adds a column with each row's paired
    difference to it (:func:`paired_difference`).

    Raises:
        ValueError: ``baseline`` is not one of the configurations.
    """
    header, notes, base = list(TABLE_HEADER), list(TABLE_NOTES), None
    if baseline is not None:
        base = next((row for row in rows if row.config == baseline), None)
        if base is None:
            configs = ", ".join(repr(row.config) for row in rows)
            raise ValueError(f"baseline {baseline!r} is not a configuration; there are {configs}")
        header.insert(3, f"Δ top-1 % last epoch vs `{_cell(baseline)}`")
        notes.append(
            f"- *Δ vs `{_cell(baseline)}`*: last-epoch test top-1 minus the baseline's, seed by "
            "seed (same seed: same initialisation and data order), mean ± sample std of the "
            "differences over the n seeds both have."
        )
    untested = not all(row.tested for row in rows)
    if untested:  # a search: judged on the held-out val split, the test split never evaluated
        header.insert(2, "top-1 % best epoch (val)")
        notes.insert(
            0,
            "- *best epoch (val)*: validation top-1 of the best epoch, on the split the run held "
            "out (what a hyper-parameter search judges by); runs without test numbers never "
            "evaluated the test split.",
        )
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = (
            f"`{_cell(row.config)}`",
            str(row.n_seeds),
            _pct(row.test_top1),
            _pct(row.best_top1),
            ", ".join(_SELECTED_ON.get(s, s) for s in row.selected_on) or "—",
            _pct(row.test_top5),
            _plain(row.wall_time_min, 1),
            _plain(row.images_per_s, 0),
        )
        if base is not None:
            delta = "—" if row is base else _delta(paired_difference(row, base))
            cells = (*cells[:3], delta, *cells[3:])
        if untested:
            cells = (*cells[:2], _pct(row.best_val_top1), *cells[2:])
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join([*lines, "", *notes])


# ------------------------------------------------------------------------------------------ plots
def mean_band(
    curves: Sequence[tuple[np.ndarray, np.ndarray]],
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Mean, min and max of several ``(x, y)`` curves on the union of their ``x`` values.

    At each ``x`` only the curves that have it count (a seed that stopped early does not drag
    the mean to NaN); a curve with ``x`` repeated keeps its last value there.
    Returns ``(x, mean, lo, hi)``, each of shape ``(len(union of x),)``.
    """
    xs = np.unique(np.concatenate([c[0] for c in curves])) if curves else np.empty(0)
    table = np.full((len(curves), xs.size), np.nan)
    for i, (x, y) in enumerate(curves):
        table[i, np.searchsorted(xs, x)] = y  # later duplicates overwrite earlier ones
    return xs, np.nanmean(table, axis=0), np.nanmin(table, axis=0), np.nanmax(table, axis=0)


def stage_spans(x: np.ndarray, stage: np.ndarray) -> list[tuple[float, float, int]]:
    """Contiguous ``(start, end, stage)`` ranges of a stage series sampled at ``x`` (sorted).

    A span runs from its first sample to the first sample of the next span (the last one to the
    last sample), so the spans tile ``[x[0], x[-1]]`` without gaps.
    """
    spans: list[tuple[float, float, int]] = []
    for i, (xi, si) in enumerate(zip(x, stage, strict=True)):
        if i == 0 or int(si) != spans[-1][2]:
            if spans:
                spans[-1] = (spans[-1][0], float(xi), spans[-1][2])
            spans.append((float(xi), float(xi), int(si)))
    if spans:
        spans[-1] = (spans[-1][0], float(x[-1]), spans[-1][2])
    return spans


def _new_figure(n_panels: int, panel_size: tuple[float, float] = (5.0, 3.4)) -> Figure:
    # A bare Figure on an Agg canvas: no pyplot state, nothing global switched, so it works the
    # same headless and inside a notebook (which displays the returned Figure).
    ncols = min(n_panels, 3)
    nrows = math.ceil(n_panels / ncols)
    fig = Figure(figsize=(panel_size[0] * ncols, panel_size[1] * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    fig.subplots(nrows, ncols, squeeze=False)
    for ax in fig.axes[n_panels:]:
        ax.set_visible(False)
    return fig


def _title(config: str) -> str:
    return "\n".join(textwrap.wrap(config, 48)) or "?"


def _save(fig: Figure, path: str | Path | None) -> Figure:
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110, bbox_inches="tight")  # keeps a legend placed outside
    return fig


def _with_history(runs: Iterable[Run]) -> dict[str, list[Run]]:
    groups = {c: [r for r in g if r.history is not None] for c, g in _by_config(runs).items()}
    return {c: g for c, g in groups.items() if g}


def _curves(group: Iterable[Run], column: str, x: str) -> list[tuple[np.ndarray, np.ndarray]]:
    """The non-empty ``(x, column)`` series of the runs (all with a history)."""
    curves = [r.history.series(column, x) for r in group if r.history is not None]
    return [c for c in curves if c[0].size]


def _ordered(names: Iterable[str], key_of) -> list[str]:
    def rank(name: str) -> tuple[int, str]:
        key = key_of(name)
        return (_KNOWN_ORDER.index(key) if key in _KNOWN_ORDER else len(_KNOWN_ORDER), name)

    return sorted(set(names), key=rank)


def plot_accuracy(
    runs: Iterable[Run], path: str | Path | None = None, column: str = "val/top1"
) -> Figure | None:
    """Validation top-1 (``column``, in %) against epoch, one line per configuration: the mean
    over seeds, shaded between the seeds' min and max. Saved as PNG to ``path`` if given.

    Returns the Figure, or ``None`` (nothing written) when no run has the column.
    """
    curves = {c: _curves(g, column, "epoch") for c, g in _with_history(runs).items()}
    curves = {c: v for c, v in curves.items() if v}
    if not curves:
        log.warning("no run has %r in its history; no accuracy plot", column)
        return None
    fig = _new_figure(1, (7.0, 4.5))
    ax = fig.axes[0]
    for config, group in curves.items():
        x, mean, lo, hi = mean_band(group)
        line = ax.plot(x, 100 * mean, label=f"{config} (n={len(group)})")[0]
        if len(group) > 1:
            ax.fill_between(x, 100 * lo, 100 * hi, color=line.get_color(), alpha=0.2, lw=0)
    ax.set(
        xlabel="epoch", ylabel=f"{column} (%)", title=f"{column}: mean over seeds, min–max shaded"
    )
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return _save(fig, path)


def plot_loss_terms(runs: Iterable[Run], path: str | Path | None = None) -> Figure | None:
    """The unweighted loss terms logged per step (``train/loss_ce``, ``train/loss_kd``,
    ``train/loss_wd``, ``train/loss_gm``: whichever are present) against step, one panel per
    configuration, mean over seeds with min–max shaded. Log y-axis when every value is positive.

    Returns the Figure, or ``None`` (nothing written) when no run logged a loss term.
    """
    panels = {}
    for config, group in _with_history(runs).items():
        terms = _ordered(
            (n for r in group for n in r.history.names() if _LOSS_TERM.match(n)),
            lambda n: n.removeprefix("train/loss_"),
        )
        if terms:
            panels[config] = (group, terms)
    if not panels:
        log.warning("no run logged train/loss_* terms; no loss-term plot")
        return None
    fig = _new_figure(len(panels))
    for ax, (config, (group, terms)) in zip(fig.axes, panels.items(), strict=False):
        positive = True
        for term in terms:
            series = _curves(group, term, "step")
            x, mean, lo, hi = mean_band(series)
            line = ax.plot(x, mean, lw=1, label=term.removeprefix("train/"))[0]
            if len(series) > 1:
                ax.fill_between(x, lo, hi, color=line.get_color(), alpha=0.2, lw=0)
            positive &= bool((lo > 0).all())
        if positive:
            ax.set_yscale("log")
        ax.set(title=_title(config), xlabel="step", ylabel="unweighted loss")
        ax.title.set_fontsize("small")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    return _save(fig, path)


def plot_weights(
    runs: Iterable[Run], path: str | Path | None = None, x: str = "step"
) -> Figure | None:
    """The loss weights (``ce_weight``, ``kd_weight``, ``wd_weight``, ``gm_weight``: whichever
    are logged) against ``x`` (``"step"`` or ``"schedule/progress"``), one panel per
    configuration, mean over seeds. The Gompertz stages from the ``schedule/stage`` column
    (0 lag, 1 growth, 2 saturation) are shaded; they are those of the configuration's first seed
    (under trajectory progress seeds may switch stage at different steps).

    Returns the Figure, or ``None`` (nothing written) when no run logged a weight.
    """
    panels = {}
    for config, group in _with_history(runs).items():
        weights = _ordered(
            (n for r in group for n in r.history.names() if _WEIGHT.match(n)),
            lambda n: n.removesuffix("_weight"),
        )
        if weights:
            panels[config] = (group, weights)
    if not panels:
        log.warning("no run logged *_weight columns; no loss-weight plot")
        return None
    fig = _new_figure(len(panels))
    for ax, (config, (group, weights)) in zip(fig.axes, panels.items(), strict=False):
        shaded: set[int] = set()  # this panel's stages only: the legend names what it shades
        staged = [r for r in group if "schedule/stage" in r.history]
        if staged:
            sx, stage = staged[0].history.series("schedule/stage", x)
            order = np.argsort(sx, kind="stable")
            for start, end, s in stage_spans(sx[order], stage[order]):
                ax.axvspan(start, end, color=_STAGE_COLOURS.get(s, "#eeeeee"), alpha=0.4, lw=0)
                shaded.add(s)
        for weight in weights:
            series = _curves(group, weight, x)
            wx, mean, _, _ = mean_band(series)
            ax.plot(wx, mean, lw=1.5, label=weight)
        ax.set(title=_title(config), xlabel=x, ylabel="weight")
        ax.title.set_fontsize("small")
        ax.grid(alpha=0.3)
        handles, _ = ax.get_legend_handles_labels()
        stage_handles = [
            Patch(color=_STAGE_COLOURS.get(s, "#eeeeee"), alpha=0.4, label=STAGE_NAMES.get(s, s))
            for s in sorted(shaded)
        ]
        ax.legend(handles=handles + stage_handles, fontsize="small")
    return _save(fig, path)


def pbt_lineages(runs: Iterable[Run]) -> dict[str, list[dict[str, Any]]]:
    """The PBT members among ``runs`` by population run directory: each member's
    ``results.json`` ``pbt`` record with its ``name``."""
    out: dict[str, list[dict[str, Any]]] = {}
    for run in runs:
        record = run.results.get("pbt")
        if not isinstance(record, dict):
            continue
        population = (run.results.get("population") or {}).get("run_dir") or str(
            Path(run.run_dir).parent.parent
        )
        name = Path(run.run_dir).name
        out.setdefault(population, []).append({**record, "name": name})
    return out


def plot_pbt_lineage(runs: Iterable[Run], path: str | Path | None = None) -> Figure | None:
    """Each PBT population's term weights over training progress, as multiples of the term's
    scale: every member's final lineage (thin), the winner's (thick), and the fixed schedules of
    the study (static, linear warm-up, cosine decay, the default Gompertz curve; dashed). One
    panel per population and term. ``None`` (nothing written) when no run is a PBT member."""
    from gompertz_kd.schedules import Piecewise, make_schedule

    panels = []
    for population, members in pbt_lineages(runs).items():
        terms = sorted({t for m in members for t in m.get("values", {})})
        panels += [(population, term, members) for term in terms]
    if not panels:
        return None
    fig = _new_figure(len(panels), (6.6, 3.4))  # room for the legend at the right
    grid = np.linspace(0.0, 1.0, 401)
    for ax, (population, term, members) in zip(fig.axes, panels, strict=False):
        for name in PBT_REFERENCE_SCHEDULES:
            shape = make_schedule(name)
            ax.plot(grid, [shape(float(t)) for t in grid], ls="--", lw=1, label=name)
        for member in sorted(members, key=lambda m: bool(m.get("winner"))):
            schedule = Piecewise(tuple(member["boundaries"]), tuple(member["values"][term]))
            winner = bool(member.get("winner"))
            ax.step(
                grid,
                [schedule(float(t)) for t in grid],
                where="post",
                color="black" if winner else "grey",
                lw=2.2 if winner else 0.8,
                alpha=1.0 if winner else 0.6,
                label=f"winner ({member['name']})" if winner else None,
            )
        ax.set(
            title=_title(f"{Path(population).name}: {term}"),
            xlabel="progress",
            ylabel=f"{term} weight / scale",
        )
        ax.title.set_fontsize("small")
        ax.grid(alpha=0.3)
        # outside the axes: the study's curves and the lineages fill the whole panel
        ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return _save(fig, path)


# ----------------------------------------------------------------------------------------- report
MARK_START = "<!-- report:start (generated by python -m gompertz_kd.report; do not edit) -->"
MARK_END = "<!-- report:end -->"


def write_report(
    runs: Sequence[Run],
    out: str | Path,
    skipped: int = 0,
    baseline: str | None = None,
    into: str | Path | None = None,
) -> Path:
    """Write ``report.md`` (table, notes, links to the plots) and the three PNGs into ``out``.

    ``skipped`` is the number of results.json files left out (for the report's header line);
    ``baseline`` adds a paired-difference column (:func:`markdown_table`). With ``into``, the
    same text (plot links relative to that file) also replaces the block between
    :data:`MARK_START` and :data:`MARK_END` in that Markdown file, leaving the hand-written text
    around it alone (the block is appended when the markers are missing).
    Returns the path of report.md.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = summarize(runs)
    table = markdown_table(rows, baseline)  # a bad baseline fails before anything is written
    plotted = {
        "val top-1 per epoch": plot_accuracy(runs, out / PLOT_FILES["accuracy"]),
        "loss terms": plot_loss_terms(runs, out / PLOT_FILES["loss_terms"]),
        "loss weights and Gompertz stages": plot_weights(runs, out / PLOT_FILES["loss_weights"]),
        "PBT weight lineages": plot_pbt_lineage(runs, out / PLOT_FILES["pbt_lineage"]),
    }
    files = dict(zip(plotted, PLOT_FILES.values(), strict=True))

    def body(link_dir: Path, heading: str) -> str:
        lines = [
            f"{len(runs)} completed runs in {len(rows)} configurations"
            + (
                f"; {skipped} results.json skipped (not completed or unreadable)."
                if skipped
                else "."
            ),
            "",
            table,
            "",
        ]
        for title, fig in plotted.items():
            if fig is not None:
                link = Path(os.path.relpath(out / files[title], link_dir)).as_posix()
                lines += [f"{heading} {title[0].upper()}{title[1:]}", "", f"![{title}]({link})", ""]
        return "\n".join(lines).rstrip("\n") + "\n"

    path = out / "report.md"
    path.write_text("# Results\n\n" + body(out, "##"))
    if into is not None:
        into = Path(into)
        splice_block(into, body(into.parent, "###"), MARK_START, MARK_END)
    return path


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m gompertz_kd.report",
        description="Summarise gompertz_kd runs: a Markdown table over seeds and training plots.",
    )
    parser.add_argument(
        "paths",
        nargs="+",
        type=Path,
        help=f"run or Hydra multirun directories (searched for {RESULTS_FILE} recursively)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="where report.md and the PNGs go (default: the first path given)",
    )
    parser.add_argument(
        "--group-by",
        nargs="+",
        default=list(DEFAULT_GROUP_BY),
        metavar="KEY",
        help="what makes a configuration (default: name overrides). Keys: name, overrides, a "
        "results.json field (dataset, student, teacher, ...) or a dotted config path "
        "(model.kd_scale)",
    )
    parser.add_argument(
        "--baseline",
        default=None,
        metavar="CONFIG",
        help="a configuration of the table: adds each row's seed-by-seed difference to it",
    )
    parser.add_argument(
        "--into",
        type=Path,
        default=None,
        metavar="FILE.md",
        help=f"also put the report between the markers {MARK_START!r} and {MARK_END!r} of this "
        "Markdown file (appended if missing); the plots then default to FILE/ beside it",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns 0, or exits with status 2 on a usage error (no
    results.json under the paths, no completed run, a --group-by key found in no run)."""
    parser = _parser()
    args = parser.parse_args(argv)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("warning: %(message)s"))
    log.addHandler(handler)
    log.propagate = False
    try:
        try:
            found = find_results(args.paths)
        except FileNotFoundError as err:
            parser.error(str(err))
        runs = load_runs(found, args.group_by)
        if not runs:
            parser.error(f"no completed run among the {len(found)} {RESULTS_FILE} files found")
        for key in args.group_by:
            if key not in DEFAULT_GROUP_BY and not any(_lookup(r.results, key)[0] for r in runs):
                parser.error(f"--group-by key {key!r} is in no {RESULTS_FILE}")
        first = args.paths[0]
        out = args.out
        if out is None:
            out = args.into.with_suffix("") if args.into is not None else first
            out = out.parent if out.is_file() else out
        try:
            report = write_report(
                runs, out, len(found) - len(runs), baseline=args.baseline, into=args.into
            )
        except ValueError as err:
            parser.error(f"--baseline: {err}")
    finally:
        log.removeHandler(handler)
        log.propagate = True
    print(markdown_table(summarize(runs), args.baseline))
    print(
        f"wrote {report} and its plots" + (f", and {args.into}" if args.into else ""),
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
