"""Each optional logger records a run when its package is installed (the extras
``gompertz_kd[tensorboard]``, ``[wandb]``, ``[mlflow]``; ``dev`` includes them)."""

import pytest
from hydra import compose, initialize_config_dir

from gompertz_kd.config import CONFIG_DIR
from gompertz_kd.train import run_training

from helpers import tiny_kd_overrides


def run_with(logger, tiny_c10, cache, out, *extra):
    overrides = [
        *tiny_kd_overrides(tiny_c10, out, cache, max_epochs=1),
        f"logger={logger}",
        "trainer.log_every_n_steps=1",
        *extra,
    ]
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    return run_training(cfg)


def test_tensorboard_records_the_run(tiny_c10, cache, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_with("tensorboard", tiny_c10, cache, tmp_path / "run")
    events = list((tmp_path / "run" / "tensorboard").rglob("events.out.tfevents.*"))
    assert events
    accumulator = EventAccumulator(str(events[0].parent))
    accumulator.Reload()
    assert "train/loss" in accumulator.Tags()["scalars"]
    assert (tmp_path / "run" / "csv" / "metrics.csv").is_file()  # CSV stays on beside it


def test_wandb_offline_records_the_run(tiny_c10, cache, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_with("wandb", tiny_c10, cache, tmp_path / "run", "logger.wandb.offline=true")
    runs = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert runs, list((tmp_path / "run").rglob("*"))[:20]
    assert list(runs[0].glob("*.wandb"))  # the run's records, ready for `wandb sync`


def test_mlflow_records_the_run_in_a_local_store(tiny_c10, cache, tmp_path):
    pytest.importorskip("mlflow")
    import mlflow

    # the default store: an SQLite database below paths.log_dir
    run_with("mlflow", tiny_c10, cache, tmp_path / "run", f"paths.log_dir={tmp_path}")
    store = tmp_path / "mlflow.db"
    assert store.is_file()
    client = mlflow.tracking.MlflowClient(tracking_uri=f"sqlite:///{store}")
    experiment = client.get_experiment_by_name("gompertz_kd")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1
    assert "train/loss" in runs[0].data.metrics
