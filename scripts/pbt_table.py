"""docs/pbt.md's tables from kept results alone: each PBT run (its winner and its members, test
top-1 read once at the end) beside the schedule study's fixed arms of the same method.

    python scripts/pbt_table.py --pbt docs/results/pbt/dist_r0 [more runs] \
        --study docs/results/schedule_study/study_dist [--replay docs/results/pbt/dist_replay] \
        [--arm docs/results/pbt/dist_static_low]

A PBT run directory holds ``pbt.json`` and ``members/<name>/results.json`` (or the members'
directories directly); a run with control members (``population.pbt.controls``) gets a third
row, the controls at the method's own weight and the winner's gap to them. The study and replay
directories hold members' directories; ``--arm`` names other from-scratch arms (a static weight
tried after a run, say), shown and paired like replays but labelled as what they are. With
``--replay`` or ``--arm``, and ``--study``, a second table pairs each of them with each study arm
by init seed (same data seed and teacher): the per-seed differences of last-epoch test top-1.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
from pathlib import Path


def _runs(folder: Path) -> dict[str, dict]:
    out = {}
    for path in sorted(folder.glob("**/results.json")):
        results = json.loads(path.read_text())
        if results.get("status") == "completed":
            out[path.parent.name] = results
    return out


def _pct(values: list[float | None]) -> str:
    values = [v for v in values if v is not None]  # a run without a test pass, test=false
    if not values:
        return "—"
    mean = 100 * statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.2f}"
    return f"{mean:.2f} ± {100 * statistics.stdev(values):.2f}"


def _top1(results: dict, which: str) -> float | None:
    value = (results.get(which) or {}).get("top1")
    return None if value is None else float(value)


def pbt_rows(folder: Path) -> list[str]:
    summary = json.loads((folder / "pbt.json").read_text())
    status = summary.get("status", "completed")  # files before the status field: completed runs
    if status != "completed":
        raise SystemExit(f"{folder}: the PBT run is {status}, not completed (pbt.json status)")
    if summary.get("winner") is None:
        raise SystemExit(f"{folder}: pbt.json names no winner (no validation ran)")
    runs = _runs(folder)
    winner = runs[summary["winner"]]
    members = [r for n, r in runs.items() if n in summary["members"]]
    controls = [r for n, r in runs.items() if n in summary.get("controls", [])]
    record = winner["pbt"]
    copies = sum(len(r["copies"]) for r in summary["rounds"])
    rows = [
        f"| PBT `{folder.name}`: winner `{summary['winner']}` (val {100 * record['last_val_score']:.2f}) "
        f"| 1 | {_pct([_top1(winner, 'test')])} | {_pct([_top1(winner, 'best')])} "
        f"| `{_short(record['schedules'][summary['terms'][0]])}` |",
        f"| PBT `{folder.name}`: all {len(members)} members | {len(members)} "
        f"| {_pct([_top1(r, 'test') for r in members])} "
        f"| {_pct([_top1(r, 'best') for r in members])} | {len(summary['rounds'])} rounds, "
        f"{copies} copies |",
    ]
    if controls:
        test = (summary.get("evidence") or {}).get("test") or {}
        gap = test.get("winner_minus_controls")
        note = "" if gap is None else f"; winner − controls {gap:+.2f} points"
        rows.append(
            f"| PBT `{folder.name}`: {len(controls)} in-run controls (own weight) | {len(controls)} "
            f"| {_pct([_top1(r, 'test') for r in controls])} "
            f"| {_pct([_top1(r, 'best') for r in controls])} | seeds "
            f"{', '.join(str(r['seed']) for r in controls)}{note} |"
        )
    return rows


def _short(schedule: str) -> str:
    """A schedule's text with its numbers at 6 significant digits (``pbt.json`` has them exact)."""
    return re.sub(r"\d+\.\d{7,}", lambda m: f"{float(m.group()):.6g}", schedule)


def _arms(folder: Path) -> dict[str, list[dict]]:
    arms: dict[str, list[dict]] = {}
    for name, results in _runs(folder).items():
        arms.setdefault(results.get("name") or name, []).append(results)
    return arms


def paired_rows(replays: list[Path], studies: list[Path]) -> list[str]:
    """Each replay (or other from-scratch) arm minus each study arm, seed by seed (the seeds both
    have)."""
    lines = [
        "| from-scratch arm − study arm (paired by init seed) | seeds | per seed (points) "
        "| mean ± sd |",
        "|---|---|---|---|",
    ]
    for replay in replays:
        for r_name, r_group in _arms(replay).items():
            mine = {r["seed"]: _top1(r, "test") for r in r_group}
            for study in studies:
                for s_name, s_group in _arms(study).items():
                    theirs = {r["seed"]: _top1(r, "test") for r in s_group}
                    seeds = sorted(set(mine) & set(theirs))
                    if not seeds:
                        continue
                    diffs = [100 * (mine[k] - theirs[k]) for k in seeds]
                    spread = f" ± {statistics.stdev(diffs):.2f}" if len(diffs) > 1 else ""
                    lines.append(
                        f"| `{r_name}` − `{s_name}` | {', '.join(map(str, seeds))} "
                        f"| {', '.join(f'{d:+.2f}' for d in diffs)} "
                        f"| {statistics.fmean(diffs):+.2f}{spread} |"
                    )
    return lines


def arm_rows(folder: Path, label: str) -> list[str]:
    arms = _arms(folder)
    return [
        f"| {label} `{arm}` | {len(group)} | {_pct([_top1(r, 'test') for r in group])} "
        f"| {_pct([_top1(r, 'best') for r in group])} | seeds "
        f"{', '.join(str(r['seed']) for r in group)} |"
        for arm, group in arms.items()
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pbt", nargs="+", type=Path, required=True)
    parser.add_argument("--study", nargs="*", type=Path, default=[])
    parser.add_argument("--replay", nargs="*", type=Path, default=[])
    parser.add_argument("--arm", nargs="*", type=Path, default=[])
    args = parser.parse_args(argv)
    lines = [
        "| run | n | top-1 % last epoch (test) | top-1 % best val epoch (test) | note |",
        "|---|---|---|---|---|",
    ]
    for folder in args.pbt:
        lines += pbt_rows(folder)
    for folder in args.replay:
        lines += arm_rows(folder, "replay")
    for folder in args.arm:
        lines += arm_rows(folder, "from scratch")
    for folder in args.study:
        lines += arm_rows(folder, "study")
    if (args.replay or args.arm) and args.study:
        lines += ["", *paired_rows(args.replay + args.arm, args.study)]
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
