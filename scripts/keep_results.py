"""Keep a study's small files in the repository: every run's ``results.json`` and the
``metrics.csv`` it points to, so ``python -m gompertz_kd.report`` regenerates the study's table
from the repository alone (checkpoints and data stay out).

    python scripts/keep_results.py logs/c10cpu/multiruns/<timestamp> docs/results/<study>

Each run lands in ``<study>/<its overrides>/`` (``method-dkd_seed-0``), a population member in
``<study>/<its member name>/`` (``static_s0``, ``job3``), its history at the same relative path as
in the run directory.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
from pathlib import Path

# overrides that say where or how a run was launched, not what it was
_LAUNCH = ("hydra", "callbacks.rich_progress_bar", "paths.", "print_config")


def run_name(results: dict, fallback: str) -> str:
    parts = [o for o in results.get("overrides", []) if not o.lstrip("+~").startswith(_LAUNCH)]
    name = "_".join(re.sub(r"[^A-Za-z0-9.,-]+", "-", o.replace("=", "-")) for o in parts)
    return name or fallback


def keep(source: Path, study: Path) -> list[Path]:
    kept = []
    for path in sorted(source.rglob("results.json")):
        results = json.loads(path.read_text())
        member = results.get("population") is not None
        dest = study / (path.parent.name if member else run_name(results, path.parent.name))
        if dest.exists():
            raise SystemExit(f"{dest} exists: two runs with the same overrides, or kept before")
        dest.mkdir(parents=True)
        shutil.copy2(path, dest / "results.json")
        if results.get("history"):
            history = dest / results["history"]
            history.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path.parent / results["history"], history)
        kept.append(dest)
    return kept


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", type=Path, help="a run or multirun directory")
    parser.add_argument("study", type=Path, help="where to keep them, e.g. docs/results/<study>")
    args = parser.parse_args()
    for dest in keep(args.source, args.study):
        print(dest)


if __name__ == "__main__":
    main()
