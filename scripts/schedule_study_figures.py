"""The figures of docs/schedule_study.md that are not a report table, from the kept results:

    python scripts/schedule_study_figures.py [docs/results/schedule_study]

- the Optuna search: every trial (b, c, inflection t* = ln b / c, the weight at the start and
  the end of training, best val top-1), per batch of 8;
- the trajectory-target search: per target, progress at 10 / 25 / 50 % of training, where it
  first reaches 1, its final value and the mean KD weight (logged steps of ``metrics.csv``);
- per arm of the long populations: test top-1 per seed; (seed 0) the mean of each loss weight
  and best val top-1; each population's wall time (of its last segment when it was resumed);
- the Gompertz-CNN arms against KD on the same curve: the paired test top-1 difference per seed,
  and (seed 0) each loss term's mean logged value, unweighted, in the first and the last epoch;
- every DIST arm against static KD, the paired test top-1 difference per seed;
- landmarks of the default and the tuned Gompertz curve (w_max 0.9), on 1,001 points.
"""

from __future__ import annotations

import csv
import json
import math
import statistics
import sys
from pathlib import Path

from gompertz_kd.schedules import Gompertz


def _results(folder: Path) -> list[tuple[str, dict]]:
    runs = [(p.parent.name, json.loads(p.read_text())) for p in folder.glob("*/results.json")]
    return sorted(runs, key=lambda r: (len(r[0]), r[0]))


def _logged(run_dir: Path, column: str) -> list[tuple[int, float]]:
    with open(run_dir / "csv" / "metrics.csv") as f:
        return [(int(r["step"]), float(r[column])) for r in csv.DictReader(f) if r.get(column)]


def optuna_search(folder: Path) -> None:
    print("## Optuna search (b, c, t*, best val top-1 %)")
    runs = _results(folder)
    for batch in range(0, len(runs), 8):
        vals = []
        for name, r in runs[batch : batch + 8]:
            b, c = r["config"]["schedule"]["b"], r["config"]["schedule"]["c"]
            vals.append(100 * r["best_val_top1"])
            g = Gompertz(w_max=r["config"]["schedule"]["w_max"], b=b, c=c)
            print(
                f"{name}: b {b:.2f}, c {c:.2f}, t* {math.log(b) / c:.2f}, "
                f"w(0) {g(0.0):.2f}, w(1) {g(1.0):.2f}, val {vals[-1]:.2f}"
            )
        print(
            f"batch {batch // 8 + 1}: mean {statistics.mean(vals):.2f} ± "
            f"{statistics.stdev(vals):.2f}, {min(vals):.2f}–{max(vals):.2f}\n"
        )


def trajectory_search(folder: Path) -> None:
    print("## Trajectory-target search")
    for name, r in _results(folder):
        progress = _logged(folder / name, "schedule/progress")
        weight = _logged(folder / name, "kd_weight")
        last = progress[-1][0]
        at = {f: [p for s, p in progress if s <= f * last][-1] for f in (0.1, 0.25, 0.5)}
        full = next((s / last for s, p in progress if p >= 0.999), None)
        target = r["config"]["callbacks"]["gompertz_weight"]["trajectory_target"]
        print(
            f"target {target}: val {100 * r['best_val_top1']:.2f}; progress at 10/25/50 %: "
            f"{at[0.1]:.2f} / {at[0.25]:.2f} / {at[0.5]:.2f}; reaches 1 at "
            f"{'never' if full is None else f'{100 * full:.0f} %'}; final {progress[-1][1]:.2f}; "
            f"mean KD weight {statistics.mean(w for _, w in weight):.2f}"
        )
    print()


def mean_weights(folder: Path) -> None:
    """Seed 0 of every arm in ``folder``: the mean of each logged loss weight but CE's."""
    print(f"## {folder.name}, seed 0: mean loss weights (logged steps), best val top-1 %")
    for name, r in _results(folder):
        if name.endswith("_s0"):
            with open(folder / name / "csv" / "metrics.csv") as f:
                columns = next(csv.reader(f))
            weights = [c for c in columns if c.endswith("_weight") and c != "ce_weight"]
            means = ", ".join(
                f"{c} {statistics.mean(w for _, w in _logged(folder / name, c)):.2f}"
                for c in weights
            )
            print(f"{name}: {means or 'no KD term'}; val {100 * r['best_val_top1']:.2f}")
    print()


def per_seed(folder: Path) -> None:
    """Every arm's test top-1 % per init seed: last epoch, and the epoch picked on val."""
    print(f"## {folder.name}: test top-1 % per seed, last epoch (best epoch)")
    arms: dict[str, list[str]] = {}
    for name, r in _results(folder):
        arm = name.rsplit("_s", 1)[0]
        arms.setdefault(arm, []).append(
            f"s{r['seed']} {100 * r['test']['top1']:.2f} ({100 * r['best']['top1']:.2f})"
        )
    for arm, values in arms.items():
        print(f"{arm}: {', '.join(values)}")
    print()


def wall_times(folder: Path) -> None:
    """A population's wall time (its members share one run) and its members' share."""
    runs = _results(folder)
    if runs:
        seconds = runs[0][1]["wall_time_s"]
        print(
            f"## {folder.name}: {len(runs)} members, wall time {seconds / 60:.0f} min of the "
            f"last (resumed) segment, {seconds / 60 / len(runs):.1f} min per member\n"
        )


def _paired(root: Path, arm: tuple[str, str], baseline: tuple[str, str]) -> list[float]:
    """Test top-1 % (last epoch) of ``arm`` minus ``baseline``, both (study, member), per seed."""
    deltas = []
    for seed in (0, 1, 2):
        a, b = (
            json.loads((root / study / f"{name}_s{seed}" / "results.json").read_text())
            for study, name in (arm, baseline)
        )
        deltas.append(100 * (a["test"]["top1"] - b["test"]["top1"]))
    return deltas


def _print_paired(label: str, deltas: list[float]) -> None:
    print(
        f"{label}: {', '.join(f'{d:+.2f}' for d in deltas)}; "
        f"{statistics.mean(deltas):+.2f} ± {statistics.stdev(deltas):.2f}"
    )


def _term_epochs(run_dir: Path, terms: tuple[str, ...]) -> None:
    """Each unweighted loss term's mean over the logged steps of the first and the last epoch."""
    with open(run_dir / "csv" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    for term in terms:
        by_epoch: dict[int, list[float]] = {}
        for r in rows:
            if r.get(f"train/loss_{term}"):
                by_epoch.setdefault(int(r["epoch"]), []).append(float(r[f"train/loss_{term}"]))
        first, last = (statistics.mean(by_epoch[e]) for e in (min(by_epoch), max(by_epoch)))
        print(
            f"{run_dir.name} train/loss_{term} (unweighted, logged steps): "
            f"epoch {min(by_epoch)} {first:.3f}, epoch {max(by_epoch)} {last:.3f}"
        )


def cnn_against_kd(root: Path) -> None:
    """What Wasserstein + gradient matching add to KD under the same curve, seed by seed."""
    pairs = {"cnn_default": ("study_kd_long", "gompertz"), "cnn_tuned": ("study_tuned", "tuned")}
    print("## Gompertz-CNN minus Gompertz KD on the same curve (test top-1 %, last epoch)")
    for arm, kd in pairs.items():
        _print_paired(f"{arm} - {kd[1]}", _paired(root, ("study_cnn", arm), kd))
        _term_epochs(root / "study_cnn" / f"{arm}_s0", ("ce", "kd", "wd", "gm"))
    print()


def dist_against_kd(root: Path) -> None:
    """Every DIST arm against static KD (another population, same init and data seeds)."""
    print("## DIST arms minus static KD (study_kd_long), test top-1 %, last epoch")
    for arm in ("static", "linear", "cosine", "gompertz"):
        _print_paired(
            f"dist {arm} - kd static",
            _paired(root, ("study_dist", arm), ("study_kd_long", "static")),
        )
    print()


def curves() -> None:
    print("## Gompertz curves, w_max 0.9 (t: fraction of training)")
    grid = [i / 1000 for i in range(1001)]
    for b, c in ((10.0, 6.0), (2.4634, 7.0051)):
        g = Gompertz(w_max=0.9, b=b, c=c)
        w = [g(t) for t in grid]
        first = {
            level: next(t for t, v in zip(grid, w, strict=True) if v >= level)
            for level in (0.01, g.w_max / 2, 0.5, 0.85)
        }
        print(
            f"b {b}, c {c}: w(0) {w[0]:.3f}, w(1) {w[-1]:.3f}, reaches 0.01 / 0.5 / 0.85 at "
            f"{first[0.01]:.3f} / {first[0.5]:.3f} / {first[0.85]:.3f}, mean {statistics.mean(w):.2f}, "
            f"half its peak at {first[g.w_max / 2]:.3f}"
        )
    default = Gompertz(w_max=0.9, b=10.0, c=6.0)
    print(
        "default at progress 0.67 / 0.81 / 0.90:", [round(default(p), 3) for p in (0.67, 0.81, 0.9)]
    )


def main() -> None:
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "docs/results/schedule_study")
    optuna_search(root / "search_gompertz_kd")
    trajectory_search(root / "search_trajectory_kd")
    for study in (
        "study_kd_long",
        "study_dkd",
        "study_tuned",
        "study_cnn",
        "study_dist",
        "dist_data_seed1",
    ):
        if (root / study).is_dir():
            per_seed(root / study)
            mean_weights(root / study)
            wall_times(root / study)
    if (root / "study_cnn").is_dir():
        cnn_against_kd(root)
    if (root / "study_dist").is_dir():
        dist_against_kd(root)
    curves()


if __name__ == "__main__":
    main()
