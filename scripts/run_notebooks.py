"""Execute the notebooks in ``notebooks/`` top to bottom and keep the executed copies.

    python scripts/run_notebooks.py [--tiny] [--out DIR] [--cwd DIR] [--timeout S] [NOTEBOOK ...]

Runs each notebook (default: all of ``notebooks/*.ipynb``, in name order) with nbclient on this
interpreter's own ipykernel — whatever other ``python3`` kernels are installed — and writes the
executed copy, outputs and plots included, to ``--out`` (default ``logs/notebooks/``, outside
git). The notebooks in ``notebooks/`` themselves are never written to, so they stay stripped.

``--tiny`` sets ``GOMPERTZ_KD_NB_TINY=1``, which the notebooks read in their parameters cell to
run a few batches on generated images. ``GOMPERTZ_KD_ROOT`` (see ``conf/paths/default.yaml``)
moves the ``data/``, ``logs/`` and ``teachers/`` they read and write; the tests point it at a
scratch directory. Exits 1 if any notebook failed (its copy shows the failing cell).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
from pathlib import Path

import nbformat
from ipykernel.kernelspec import write_kernel_spec
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = ROOT / "notebooks"
TINY_ENV = "GOMPERTZ_KD_NB_TINY"
ANSI_COLOUR = re.compile(r"\x1b\[[0-9;]*m")


def execute(path: Path, out: Path, cwd: Path, timeout: int) -> bool:
    """Run one notebook in ``cwd`` and write the executed copy to ``out``; True if it ran
    through. Expects the ``python3`` kernel spec set up by :func:`main`."""
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(
        nb, kernel_name="python3", timeout=timeout, resources={"metadata": {"path": str(cwd)}}
    )
    try:
        client.execute()
    except CellExecutionError as err:
        print(f"FAILED {path.name}:\n{ANSI_COLOUR.sub('', str(err))}", file=sys.stderr)
        return False
    finally:
        nbformat.write(nb, out)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python scripts/run_notebooks.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("notebooks", nargs="*", type=Path, help="default: notebooks/*.ipynb")
    parser.add_argument("--out", type=Path, default=ROOT / "logs" / "notebooks")
    parser.add_argument("--cwd", type=Path, default=None, help="default: the notebook's folder")
    parser.add_argument("--tiny", action="store_true", help=f"set {TINY_ENV}=1: tiny inputs")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per cell")
    args = parser.parse_args(argv)

    paths = [p.resolve() for p in args.notebooks] or sorted(NOTEBOOK_DIR.glob("*.ipynb"))
    args.out.mkdir(parents=True, exist_ok=True)
    if args.tiny:
        os.environ[TINY_ENV] = "1"
    # The notebooks show plots through the inline backend; an inherited MPLBACKEND=Agg hides them.
    os.environ.pop("MPLBACKEND", None)
    failed = []
    with tempfile.TemporaryDirectory() as jupyter_dir:
        # A "python3" kernel spec for this interpreter, searched before the user's and the
        # system's: the notebooks run on this venv whatever else is installed.
        write_kernel_spec(Path(jupyter_dir) / "kernels" / "python3")
        os.environ["JUPYTER_PATH"] = os.pathsep.join(
            filter(None, [jupyter_dir, os.environ.get("JUPYTER_PATH")])
        )
        for path in paths:
            target = args.out.resolve() / path.name
            cwd = (args.cwd or path.parent).resolve()
            ok = execute(path, target, cwd, args.timeout)
            if not ok:
                failed.append(path.name)
            print(f"{'executed' if ok else 'FAILED  '} {path.name} -> {target}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
