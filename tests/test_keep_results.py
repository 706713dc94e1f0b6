"""scripts/keep_results.py: a study's small files kept so the report regenerates from them."""

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parents[1] / "scripts" / "keep_results.py"
spec = importlib.util.spec_from_file_location("keep_results", SCRIPT)
keep_results = importlib.util.module_from_spec(spec)
spec.loader.exec_module(keep_results)


def fake_run(run_dir: Path, overrides: list[str], population: dict | None = None) -> None:
    (run_dir / "csv").mkdir(parents=True)
    (run_dir / "csv" / "metrics.csv").write_text("step,train/loss\n0,1.0\n")
    (run_dir / "checkpoints").mkdir()
    (run_dir / "checkpoints" / "last.ckpt").write_bytes(b"big")
    results = {"overrides": overrides, "history": "csv/metrics.csv", "test": {"top1": 0.5}}
    if population is not None:
        results["population"] = population
    (run_dir / "results.json").write_text(json.dumps(results))


def test_keeps_results_and_history_under_the_runs_overrides_never_checkpoints(tmp_path):
    sweep = tmp_path / "multirun"
    fake_run(sweep / "0", ["experiment=c10cpu", "method=dkd", "hydra.launcher.n_jobs=2"])
    fake_run(sweep / "1", ["experiment=c10cpu", "method=crd", "callbacks.rich_progress_bar=null"])
    kept = keep_results.keep(sweep, tmp_path / "study")
    assert sorted(p.name for p in kept) == [
        "experiment-c10cpu_method-crd",
        "experiment-c10cpu_method-dkd",
    ]
    for dest in kept:
        assert (dest / "results.json").is_file() and (dest / "csv" / "metrics.csv").is_file()
        assert not list(dest.rglob("*.ckpt"))
    with pytest.raises(SystemExit, match="exists"):
        keep_results.keep(sweep, tmp_path / "study")


def test_population_members_keep_their_member_names(tmp_path):
    run = tmp_path / "population" / "members"
    for name in ("static_s0", "job3"):
        fake_run(run / name, ["experiment=c10cpu", "seed=0"], population={"name": "p"})
    kept = keep_results.keep(tmp_path / "population", tmp_path / "study")
    assert sorted(p.name for p in kept) == ["job3", "static_s0"]
