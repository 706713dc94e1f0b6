"""The notebooks: committed without outputs, and each runs top to bottom on tiny inputs.

Each run goes through ``scripts/run_notebooks.py --tiny`` (what ``make notebooks`` uses) with
``GOMPERTZ_KD_ROOT`` pointing at a scratch directory, so the notebooks read and write ``data/``,
``logs/`` and ``teachers/`` there and never in the checkout.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")  # a dev extra: skip where it is not installed

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = ROOT / "notebooks"
RUNNER = ROOT / "scripts" / "run_notebooks.py"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
SCHEDULE = "01_gompertz_schedule.ipynb"
DISTILL = "02_distill_in_a_notebook.ipynb"
COMPARE = "03_compare_runs.ipynb"


def run_notebooks(tmp_path: Path, root: Path, *names: str) -> list[nbformat.NotebookNode]:
    """Execute ``names`` in order on tiny inputs; return the executed notebooks."""
    out, cwd = tmp_path / "executed", tmp_path / "cwd"
    cwd.mkdir(exist_ok=True)
    env = {**os.environ, "GOMPERTZ_KD_ROOT": str(root), "TMPDIR": str(tmp_path)}
    proc = subprocess.run(
        [sys.executable, str(RUNNER), "--tiny", "--timeout", "300", "--out", str(out)]
        + ["--cwd", str(cwd), *(str(NOTEBOOK_DIR / name) for name in names)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-6000:]
    return [nbformat.read(out / name, as_version=4) for name in names]


def outputs(nb: nbformat.NotebookNode) -> list[dict]:
    return [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]


def images(nb: nbformat.NotebookNode) -> int:
    return sum("image/png" in o.get("data", {}) for o in outputs(nb))


def text(nb: nbformat.NotebookNode) -> str:
    """Everything the notebook printed or displayed as text or Markdown."""
    parts = []
    for o in outputs(nb):
        parts.append(o.get("text", ""))
        parts += [o.get("data", {}).get(k, "") for k in ("text/markdown", "text/plain")]
    return "\n".join(parts)


def test_the_notebooks_are_the_three_tested_here():
    assert [p.name for p in NOTEBOOKS] == [SCHEDULE, DISTILL, COMPARE]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_committed_without_outputs(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    dirty = [
        i
        for i, cell in enumerate(nb.cells)
        if cell.cell_type == "code" and (cell.outputs or cell.execution_count is not None)
    ]
    assert not dirty, (
        f"{path.name}: cells {dirty} have outputs or execution counts. Strip them with "
        f"`.venv/bin/nbstripout {path.relative_to(ROOT)}` (see notebooks/README.md)."
    )


def test_schedule_notebook_runs_and_shows_its_plots(tmp_path):
    (nb,) = run_notebooks(tmp_path, tmp_path / "root", SCHEDULE)
    assert images(nb) >= 5  # the parameter grid, stages, schedules, granularity, trajectory
    assert "inflection: t = 0.384, w = 0.331" in text(nb)  # w_max/e for the shipped config


@pytest.mark.slow  # for its time; `make test-full` runs it
def test_distill_notebook_trains_and_compare_notebook_reads_its_run(tmp_path):
    root = tmp_path / "root"
    distill, compare = run_notebooks(tmp_path, root, DISTILL, COMPARE)

    (results,) = (root / "logs" / "notebook" / "runs").glob("*/results.json")
    assert (results.parent / "csv" / "metrics.csv").is_file()
    assert "GENERATED data set" in text(distill)  # says plainly it is not CIFAR-10
    assert images(distill) >= 2

    shown = text(compare)
    assert f"1 completed runs from:\n  {root / 'logs'}" in shown
    assert "`notebook_generated_data`" in shown  # the report table lists the run 02 made
    assert images(compare) >= 5


@pytest.mark.slow  # for its time; `make test-full` runs it
def test_compare_notebook_makes_two_tiny_runs_when_there_are_none(tmp_path):
    root = tmp_path / "root"
    (nb,) = run_notebooks(tmp_path, root, COMPARE)
    shown = text(nb)
    assert "makes two tiny runs on generated images" in shown
    assert "`tiny_static_kd`" in shown and "`tiny_gompertz_kd_wd_gm`" in shown
    assert images(nb) >= 5
    assert not (root / "logs").exists()  # the tiny runs went to a scratch directory
