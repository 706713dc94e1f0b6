"""The package installs like a library: a wheel carries the configs, and a run of the installed
package writes below the working directory, never beside its own files."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import make_cifar_folder

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """The wheel built from this checkout, installed (without dependencies: the test's venv has
    them) into a folder of its own."""
    out = tmp_path_factory.mktemp("wheel")
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(out / "dist"), str(ROOT)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert build.returncode == 0, build.stderr[-3000:]
    wheel = next((out / "dist").glob("gompertz_kd-*.whl"))
    site = out / "site"
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site),
         str(wheel)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert install.returncode == 0, install.stderr[-3000:]
    return site


def run_installed(site, cwd, *args):
    env = {**os.environ, "PYTHONPATH": str(site), "OMP_NUM_THREADS": "1"}
    env.pop("GOMPERTZ_KD_ROOT", None)
    return subprocess.run(
        [sys.executable, "-m", "gompertz_kd.run", *args],
        capture_output=True, text=True, timeout=300, cwd=cwd, env=env,
    )  # fmt: skip


def files_under(path):
    return sorted(str(p.relative_to(path)) for p in path.rglob("*") if "__pycache__" not in p.parts)


def test_installed_wheel_composes_from_its_own_configs(installed, tmp_path):
    assert (installed / "gompertz_kd" / "conf" / "train.yaml").is_file()
    launcher = installed / "hydra_plugins" / "gompertz_kd_population_launcher"
    assert (launcher / "population_launcher.py").is_file()  # hydra/launcher=population
    env = {**os.environ, "PYTHONPATH": str(installed)}
    where = subprocess.run(
        [sys.executable, "-c", "import gompertz_kd; print(gompertz_kd.__file__)"],
        capture_output=True, text=True, cwd=tmp_path, env=env,
    )  # fmt: skip
    assert where.stdout.startswith(str(installed)), (
        where.stdout
    )  # the wheel's copy, not the checkout
    proc = run_installed(installed, tmp_path, "experiment=quick", "--cfg", "job", "--resolve")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "task_name: quick" in proc.stdout
    assert f"root_dir: {tmp_path}" in proc.stdout  # the working directory, not site-packages


def test_installed_run_writes_below_the_working_directory(installed, tmp_path):
    data = make_cifar_folder(tmp_path / "images", "cifar10", train_per_class=2, test_per_class=1)
    work = tmp_path / "work"
    work.mkdir()
    before = files_under(installed)
    proc = run_installed(
        installed, work, "debug=fast_dev_run", "data=cifar10_folder", f"data.root={data}",
        "data.batch_size=4", "model=resnet20_resnet8", "method=kd", "print_config=false",
        "callbacks.rich_progress_bar=null",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert list((work / "logs").rglob("results.json")), "the run directory is below it"
    assert list((work / "teachers").glob("*.pt")), (
        "the teacher cache is below the working directory"
    )
    assert list((work / "cache" / "data").iterdir()), "the decoded-data cache too"
    assert files_under(installed) == before  # nothing written into the installed package
