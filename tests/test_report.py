"""The run report: grouping seeds, the numbers in the table, plots written, CLI errors."""

import csv
import json
import logging
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gompertz_kd.report import (
    History,
    config_name,
    load_runs,
    main,
    markdown_table,
    mean_band,
    plot_accuracy,
    plot_weights,
    stage_spans,
    summarize,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PNGS = ("accuracy.png", "loss_terms.png", "loss_weights.png")
CONFIG_A = "c100_resnet50_mbv2 schedule.b=3"
CONFIG_B = "c100_resnet50_mbv2_kd"
CONFIG_C = "c100_resnet50_mbv2_nohist"

# Two epochs of five steps; the Gompertz stage switches at steps 3 (growth) and 7 (saturation).
STAGES = [0, 0, 0, 1, 1, 1, 1, 2, 2, 2]


def write_metrics(path: Path, val_top1: tuple[float, float], kd_scale: float = 1.0) -> None:
    """A CSVLogger-shaped metrics.csv: sorted header, step rows and epoch-end rows, blanks as ''."""
    rows = []
    for step, stage in enumerate(STAGES):
        progress = step / 9
        rows.append(
            {
                "epoch": step // 5,
                "step": step,
                "train/loss": 3.0 - 0.1 * step,
                "train/loss_ce": 2.0 - 0.1 * step,
                "train/loss_kd": 1.0,
                "ce_weight": 1.0,
                "kd_weight": kd_scale * progress,
                "schedule/progress": progress,
                "schedule/stage": float(stage),
            }
        )
        if step % 5 == 4:
            rows.append(
                {
                    "epoch": step // 5,
                    "step": step,
                    "val/top1": val_top1[step // 5],
                    "val/top5": 0.9,
                    "train/top1": 0.5,
                }
            )
    header = sorted({key for row in rows for key in row})
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=header, restval="")
        writer.writeheader()
        writer.writerows(rows)


def write_run(
    run_dir: Path,
    *,
    name: str,
    overrides: list[str],
    seed: int,
    top1: float,
    best_top1: float,
    top5: float,
    selected_on: str,
    wall_time_s: float,
    images_per_s: float,
    status: str = "completed",
    val_top1: tuple[float, float] | None = (0.3, 0.5),
) -> None:
    results = {
        "status": status,
        "name": name,
        "overrides": overrides,
        "seed": seed,
        "dataset": "cifar100",
        "teacher": "ResNet50",
        "student": "MobileNetV2",
        "test": {"top1": top1, "top5": top5},
        "best": {"top1": best_top1, "top5": top5, "epoch": 1, "selected_on": selected_on},
        "epochs": 2,
        "history": "csv/metrics.csv",
        "final_weights": {"ce_weight": 1.0, "kd_weight": 1.0},
        "final_stage": "saturation",
        "wall_time_s": wall_time_s,
        "train_images_per_s": images_per_s,
        "git_commit": "abc123",
        "config": {"model": {"kd_scale": 1.0}, "seed": seed},
    }
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "results.json").write_text(json.dumps(results))
    if val_top1 is not None:
        write_metrics(run_dir / "csv" / "metrics.csv", val_top1)


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    """A Hydra-multirun-like directory: config A with seeds 1 and 2 (in 10/ and 2/, so natural
    order matters) and a failed seed 3, config B with one seed, config C without a history."""
    root = tmp_path / "multirun"
    a = dict(
        name="c100_resnet50_mbv2",
        selected_on="test",
    )
    write_run(
        root / "10",
        **a,
        overrides=["schedule.b=3", "seed=2", "paths.output_dir=/x"],
        seed=2,
        top1=0.64,
        best_top1=0.67,
        top5=0.87,
        wall_time_s=1200.0,
        images_per_s=900.0,
        val_top1=(0.4, 0.6),
    )
    write_run(
        root / "2",
        **a,
        overrides=["seed=1", "schedule.b=3", "hydra.job.chdir=true"],
        seed=1,
        top1=0.60,
        best_top1=0.61,
        top5=0.85,
        wall_time_s=600.0,
        images_per_s=800.0,
        val_top1=(0.2, 0.4),
    )
    write_run(
        root / "3",
        **a,
        overrides=["schedule.b=3", "seed=3"],
        seed=3,
        status="failed",
        top1=0.0,
        best_top1=0.0,
        top5=0.0,
        wall_time_s=1.0,
        images_per_s=1.0,
    )
    write_run(
        root / "11",
        name=CONFIG_B,
        overrides=[f"experiment={CONFIG_B}", "seed=0"],
        seed=0,
        top1=0.70,
        best_top1=0.71,
        top5=0.90,
        selected_on="val",
        wall_time_s=90.0,
        images_per_s=1000.0,
    )
    write_run(
        root / "12",
        name=CONFIG_C,
        overrides=[],
        seed=0,
        top1=0.5,
        best_top1=0.5,
        top5=0.8,
        selected_on="val",
        wall_time_s=60.0,
        images_per_s=500.0,
        val_top1=None,
    )
    return root


def is_png(path: Path) -> bool:
    data = path.read_bytes()
    return data[:8] == PNG_MAGIC and len(data) > 5000


# ------------------------------------------------------------------------------ grouping
def test_config_name_drops_seed_paths_hydra_and_redundant_experiment():
    results = {
        "name": "c100_resnet50_mbv2",
        "overrides": [
            "seed=4",
            "schedule.b=3",
            "++paths.data_dir=/d",
            "hydra.run.dir=/o",
            "model.kd_scale=2",
            "experiment=c100_resnet50_mbv2",
        ],
    }
    assert config_name(results) == "c100_resnet50_mbv2 model.kd_scale=2 schedule.b=3"
    assert config_name({"name": "train", "overrides": []}) == "train"
    # An experiment other than the name is part of the identity.
    assert config_name({"name": "x", "overrides": ["experiment=y"]}) == "x experiment=y"


def test_config_name_group_by_fields_and_config_paths():
    results = {"name": "n", "student": "MobileNetV2", "config": {"model": {"kd_scale": 2.0}}}
    assert config_name(results, ["student", "model.kd_scale"]) == (
        "student=MobileNetV2 model.kd_scale=2.0"
    )
    assert config_name(results, ["name", "missing.key"]) == "n missing.key=?"


def test_load_runs_groups_seeds_in_natural_order_and_skips_failed(sweep, caplog):
    with caplog.at_level(logging.WARNING, logger="gompertz_kd.report"):
        runs = load_runs([sweep])
    assert [(r.config, r.seed) for r in runs] == [
        (CONFIG_A, 1),  # 2/ before 3/ (failed) before 10/ before 11/ and 12/
        (CONFIG_A, 2),
        (CONFIG_B, 0),
        (CONFIG_C, 0),
    ]
    assert "failed" in caplog.text and str(sweep / "3" / "results.json") in caplog.text
    # The run without history is kept, with a warning that names it.
    assert runs[-1].history is None
    assert str(sweep / "12") in caplog.text and "plots" in caplog.text


# ------------------------------------------------------------------------------ table
def test_summarize_means_and_sample_stds(sweep):
    rows = summarize(load_runs([sweep]))
    assert [r.config for r in rows] == [CONFIG_A, CONFIG_B, CONFIG_C]
    a, b, _ = rows
    assert a.n_seeds == 2 and a.seeds == (1, 2)  # the failed seed 3 is not counted
    assert a.test_top1.mean == pytest.approx(0.62)
    assert a.test_top1.std == pytest.approx(math.sqrt(2 * 0.02**2))  # ddof=1
    assert a.best_top1.mean == pytest.approx(0.64)
    assert a.best_top1.std == pytest.approx(math.sqrt(2 * 0.03**2))
    assert a.test_top5.mean == pytest.approx(0.86)
    assert a.wall_time_min.mean == pytest.approx(15.0)
    assert a.images_per_s.mean == pytest.approx(850.0)
    assert a.selected_on == ("test",)
    assert b.n_seeds == 1 and b.test_top1.mean == pytest.approx(0.70) and b.test_top1.std is None
    assert b.selected_on == ("val",)


def test_markdown_table_cells_and_labels(sweep):
    table = markdown_table(summarize(load_runs([sweep])))
    lines = table.splitlines()
    header = lines[0]
    assert "last epoch" in header and "best epoch" in header and "n seeds" in header
    row_a = next(line for line in lines if CONFIG_A in line)
    cells = [c.strip() for c in row_a.strip("|").split("|")]
    assert cells == [
        f"`{CONFIG_A}`",
        "2",
        "62.00 ± 2.83",
        "64.00 ± 4.24",
        "test (optimistic)",
        "86.00 ± 1.41",
        "15.0",
        "850",
    ]
    row_b = next(line for line in lines if f"`{CONFIG_B}`" in line)
    assert "70.00 ± —" in row_b and "held-out val" in row_b
    # Exactly one row per configuration, below the header and its separator.
    assert sum(line.startswith("| `") for line in lines) == 3
    assert "ddof = 1" in table and "validation split" in table


def test_a_search_without_test_numbers_shows_its_val_column(tmp_path):
    for trial, val in enumerate((0.61, 0.64)):
        write_run(
            tmp_path / "search" / str(trial), name=f"job{trial}",
            overrides=[f"schedule.b={trial + 2}"], seed=0, top1=0.0, best_top1=0.0, top5=0.0,
            selected_on="val", wall_time_s=60.0, images_per_s=100.0,
        )  # fmt: skip
        path = tmp_path / "search" / str(trial) / "results.json"
        results = json.loads(path.read_text())
        results.update(test={"top1": None, "top5": None}, best_val_top1=val)
        path.write_text(json.dumps(results))
    lines = markdown_table(summarize(load_runs([tmp_path / "search"]))).splitlines()
    assert "| top-1 % best epoch (val) |" in lines[0]
    assert [line.split(" | ")[2] for line in lines[2:4]] == ["61.00 ± —", "64.00 ± —"]


# ------------------------------------------------------------------------------ curves
def test_history_reads_blank_cells_as_missing(tmp_path):
    path = tmp_path / "metrics.csv"
    path.write_text("epoch,step,train/loss_ce,val/top1\n0,0,2.5,\n0,4,,0.25\n1,9,1.5,\n")
    history = History.read_csv(path)
    x, y = history.series("val/top1", "epoch")
    np.testing.assert_array_equal(x, [0.0])
    np.testing.assert_array_equal(y, [0.25])
    x, y = history.series("train/loss_ce")
    np.testing.assert_array_equal(x, [0.0, 9.0])
    np.testing.assert_array_equal(y, [2.5, 1.5])
    assert "val/top1" in history and "test/top1" not in history
    assert history.series("test/top1")[0].size == 0


def test_mean_band_on_union_of_x():
    x, mean, lo, hi = mean_band(
        [(np.array([0.0, 1.0, 2.0]), np.array([1.0, 2.0, 3.0])), (np.array([1.0]), np.array([4.0]))]
    )
    np.testing.assert_array_equal(x, [0.0, 1.0, 2.0])
    np.testing.assert_allclose(mean, [1.0, 3.0, 3.0])
    np.testing.assert_allclose(lo, [1.0, 2.0, 3.0])
    np.testing.assert_allclose(hi, [1.0, 4.0, 3.0])


def test_stage_spans_tile_the_steps():
    spans = stage_spans(np.arange(10.0), np.array(STAGES, dtype=float))
    assert spans == [(0.0, 3.0, 0), (3.0, 7.0, 1), (7.0, 9.0, 2)]
    assert stage_spans(np.array([5.0]), np.array([2.0])) == [(5.0, 5.0, 2)]
    assert stage_spans(np.empty(0), np.empty(0)) == []


def test_plot_weights_shades_the_three_stages(sweep):
    fig = plot_weights(load_runs([sweep]))
    panels = [ax for ax in fig.axes if ax.get_visible()]
    assert len(panels) == 2  # config C has no history
    ax = panels[0]
    spans = sorted(p.get_x() for p in ax.patches)
    assert spans == [0.0, 3.0, 7.0]
    assert {line.get_label() for line in ax.get_lines()} == {"ce_weight", "kd_weight"}


def test_plot_weights_legend_names_only_the_stages_its_panel_shades(sweep):
    # config B's schedule logs no stage (a constant or linear schedule); config A's does
    metrics = sweep / "11" / "csv" / "metrics.csv"
    with open(metrics, newline="") as f:
        rows = list(csv.DictReader(f))
    with open(metrics, "w", newline="") as f:
        names = [n for n in rows[0] if n != "schedule/stage"]
        writer = csv.DictWriter(f, fieldnames=names, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    staged, plain = (ax for ax in plot_weights(load_runs([sweep])).axes if ax.get_visible())
    assert {"lag", "growth", "saturation"} <= {t.get_text() for t in staged.get_legend().texts}
    assert not plain.patches
    assert {t.get_text() for t in plain.get_legend().texts} == {"ce_weight", "kd_weight"}


def test_plot_accuracy_mean_and_none_without_history(sweep, tmp_path):
    runs = load_runs([sweep])
    fig = plot_accuracy(runs)
    line = fig.axes[0].get_lines()[0]
    np.testing.assert_allclose(line.get_ydata(), [30.0, 50.0])  # mean of (20, 40) and (40, 60)
    no_history = [r for r in runs if r.history is None]
    assert plot_accuracy(no_history, tmp_path / "none.png") is None
    assert not (tmp_path / "none.png").exists()


# ------------------------------------------------------------------------------ CLI
def test_main_writes_report_and_plots(sweep, tmp_path, capsys):
    out = tmp_path / "report"
    assert main([str(sweep), "--out", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert "62.00 ± 2.83" in stdout and "last epoch" in stdout
    report = (out / "report.md").read_text()
    assert "62.00 ± 2.83" in report and "4 completed runs in 3 configurations" in report
    assert "1 results.json skipped" in report
    for png in PNGS:
        assert is_png(out / png), png
        assert f"]({png})" in report


def test_main_group_by_merges_configurations(sweep, tmp_path, capsys):
    assert main([str(sweep), "--out", str(tmp_path), "--group-by", "student"]) == 0
    stdout = capsys.readouterr().out
    assert "`student=MobileNetV2` | 4 |" in stdout


def test_module_runs_as_script(sweep):
    proc = subprocess.run(
        [sys.executable, "-m", "gompertz_kd.report", str(sweep)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert CONFIG_A in proc.stdout
    assert "warning:" in proc.stderr and "failed" in proc.stderr
    assert (sweep / "report.md").is_file()
    for png in PNGS:
        assert is_png(sweep / png), png


def test_no_results_is_a_usage_error(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SystemExit) as exit_info:
        main([str(empty)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "no results.json found under" in err and str(empty) in err
    assert not (empty / "report.md").exists()


def test_only_failed_runs_is_a_usage_error(tmp_path, capsys):
    write_run(
        tmp_path / "0",
        name="n",
        overrides=[],
        seed=0,
        top1=0.1,
        best_top1=0.1,
        top5=0.1,
        selected_on="val",
        wall_time_s=1.0,
        images_per_s=1.0,
        status="failed",
    )
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path)])
    assert exit_info.value.code == 2
    assert "no completed run" in capsys.readouterr().err


def test_unknown_group_by_key_is_a_usage_error(sweep, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([str(sweep), "--group-by", "no_such_key"])
    assert exit_info.value.code == 2
    assert "no_such_key" in capsys.readouterr().err


def test_run_without_checkpoint_or_csv_logger_shows_dashes(tmp_path, caplog):
    """What train() writes with test=false/no checkpointing and no CSVLogger: nulls."""
    results = {
        "status": "completed",
        "name": "bare",
        "overrides": [],
        "seed": 0,
        "test": {"top1": 0.5, "top5": None},
        "best": {"top1": None, "top5": None, "epoch": None, "selected_on": None},
        "history": None,
        "wall_time_s": None,
        "train_images_per_s": None,
    }
    (tmp_path / "results.json").write_text(json.dumps(results))
    with caplog.at_level(logging.WARNING, logger="gompertz_kd.report"):
        runs = load_runs([tmp_path])
    assert len(runs) == 1 and runs[0].history is None
    assert "history is null" in caplog.text
    row = markdown_table(summarize(runs)).splitlines()[2]
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells == ["`bare`", "1", "50.00 ± —", "—", "—", "—", "—", "—"]


# ------------------------------------------------------------------------------ baseline, --into
def test_baseline_column_is_the_seed_by_seed_difference(sweep):
    table = markdown_table(summarize(load_runs([sweep])), baseline=CONFIG_B)
    lines = table.splitlines()
    assert f"Δ top-1 % last epoch vs `{CONFIG_B}`" in lines[0]

    def cells(config):
        line = next(line for line in lines if line.startswith(f"| `{config}`"))
        return [c.strip() for c in line.strip("|").split("|")]

    assert cells(CONFIG_C)[3] == "-20.00 ± — (n=1)"  # 0.50 - 0.70 on seed 0
    assert cells(CONFIG_A)[3] == "—"  # seeds 1, 2: none in common with the baseline's 0
    assert cells(CONFIG_B)[3] == "—"
    assert "seed by seed" in table


def test_paired_difference_pairs_by_seed():
    from gompertz_kd.report import Stat, SummaryRow, paired_difference

    def row(values, config="x"):
        nan = Stat(math.nan, None, 0)
        return SummaryRow(config, tuple(values), nan, nan, nan, (), nan, nan, tuple(values.items()))

    diff = paired_difference(row({0: 0.70, 1: 0.74, 2: 0.69}), row({2: 0.66, 0: 0.68, 1: 0.70}))
    assert diff.n == 3 and diff.mean == pytest.approx(0.03)
    assert diff.std == pytest.approx(np.std([0.02, 0.04, 0.03], ddof=1))
    # a PBT member's student may descend from another seed's: it pairs with nothing
    pbt = row({0: 0.70, 1: 0.74}, config="[PBT member] c10cpu_long")
    assert paired_difference(pbt, row({0: 0.68, 1: 0.70})).n == 0


def test_unknown_baseline_is_a_usage_error_naming_the_configurations(sweep, tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main([str(sweep), "--out", str(tmp_path / "r"), "--baseline", "nope"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "--baseline" in err and "'nope'" in err and CONFIG_B in err
    assert not (tmp_path / "r" / "report.md").exists()


def test_into_replaces_only_the_marked_block_with_relative_plot_links(sweep, tmp_path, capsys):
    from gompertz_kd.report import MARK_END, MARK_START

    doc = tmp_path / "docs" / "results.md"
    doc.parent.mkdir()
    doc.write_text(f"# Study\n\nintro\n\n{MARK_START}\nOLD TABLE\n{MARK_END}\n\nconclusion\n")
    assert main([str(sweep), "--into", str(doc), "--baseline", CONFIG_B]) == 0
    text = doc.read_text()
    assert text.startswith("# Study\n\nintro\n\n") and text.endswith("\n\nconclusion\n")
    assert "OLD TABLE" not in text and text.count(MARK_START) == 1
    assert "62.00 ± 2.83" in text and "-20.00 ± — (n=1)" in text
    for png in PNGS:  # plots default to docs/results/, linked relative to docs/results.md
        assert is_png(tmp_path / "docs" / "results" / png)
        assert f"](results/{png})" in text
    # a second run rewrites the block in place
    assert main([str(sweep), "--into", str(doc)]) == 0
    assert doc.read_text().count(MARK_START) == 1 and "(n=1)" not in doc.read_text()
