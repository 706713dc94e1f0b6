import math
import subprocess
import sys

import pytest
import torch
from torch import nn

from gompertz_kd import bench, losses
from gompertz_kd.bench.harness import RatioName
from gompertz_kd.bench.recipe import ROW_NAMES
from gompertz_kd.bench.render import target_list
from gompertz_kd.config import CONFIG_DIR

# on the CPU wherever the suite runs (the bench's own default is the GPU when there is one)
TINY = ["--teacher", "resnet14", "--student", "resnet8", "--num-classes", "10", "--batch", "4"]
TINY += ["--device", "cpu"]


@pytest.mark.slow  # for its time; `make test-full` runs it
def test_report_lands_between_the_markers_and_keeps_the_hand_written_text(tmp_path):
    doc = tmp_path / "benchmarks.md"
    doc.write_text(
        f"# Benchmarks\n\nintro\n\n{bench.MARK_START}\nOLD-BLOCK\n{bench.MARK_END}\n\noutro\n"
    )
    argv = TINY + ["--repeats", "2", "--warmup", "0", "--gm-every", "2", "--fd-steps", "1e-2"]
    argv += ["--data-batches", "2", "--workers", "0", "--sections", "steps,accuracy,data"]
    report = bench.main(argv + ["--output", str(doc)])
    text = doc.read_text()
    assert text.startswith("# Benchmarks\n\nintro\n") and text.endswith("\noutro\n")
    assert "OLD-BLOCK" not in text and report.strip() in text
    for needle in (
        "resnet14 → resnet8",
        "| teacher forward |",
        "| student step |",
        "| static KD step |",
        "| + Wasserstein |",
        "| full Gompertz-CNN step |",
        "| + gradient matching, every 2 steps |",
        "| Gompertz KD step, Lightning |",
        "| overhead, Lightning: KD step / (student step + teacher forward) |",
        "| tensor path (on_device=True) |",
        "finite-difference gradient matching (not offered), step 0.01",
    ):
        assert needle in report, needle
    # every target is a row: its ratio's median against its bound, and the status that follows
    rows = report.split("### Targets")[1].strip().splitlines()[2:]
    # (the compiled step's target needs --compile, the fused and compiled populations' the
    # population section, which this run leaves out)
    targets = [
        t
        for t in target_list(gm_every=2)
        if t.ratio != RatioName.COMPILED_VS_EAGER
        and not t.ratio.startswith(("fused / looped", "compiled (compile=step)"))
    ]
    assert [row.split(" | ")[0].lstrip("| ") for row in rows] == [t.text for t in targets]
    for target, row in zip(targets, rows, strict=True):
        median = float(row.split(" | ")[1].split(" (")[0])
        assert row.endswith("| met |") == target.met(median), row
    # every row of the steps table has a positive rate and six cells
    steps = report.split("### Steps")[1].split("### Ratios")[0].strip().splitlines()[2:]
    assert len(steps) > 15 and all(row.count("|") == 8 for row in steps)
    assert all(float(row.split("|")[2]) > 0 for row in steps)
    assert all(row.count("|") == 3 for row in report.split("### Accuracy")[1].splitlines()[4:12])
    # a second run replaces the block instead of adding one
    bench.write_report(doc, "new body")
    assert doc.read_text().count(bench.MARK_START) == 1 and "new body" in doc.read_text()


def test_throughput_section_estimates_the_full_run(capsys):
    argv = TINY + ["--sections", "throughput", "--batches", "4,8", "--repeats", "1"]
    report = bench.main(argv + ["--epochs", "240", "--train-images", "50000"])
    assert "### End-to-end, batch 4" in report and "### End-to-end, batch 8" in report
    assert report.count("estimated full run (240 epochs × 50000 training") == 2


def _methods_table(report):
    """``{config cell: cells}`` of the methods table's rows."""
    section = report.split("### Methods")[1]
    rows = [line for line in section.splitlines() if line.startswith("| ") and "`method=" in line]
    return {cells[1]: cells for cells in ([c.strip() for c in r.split("|")[1:-1]] for r in rows)}


@pytest.mark.slow  # for its time; `make test-full` runs it
def test_methods_section_times_every_method_config_as_a_ratio_to_kd():
    report = bench.main(TINY + ["--sections", "methods", "--repeats", "1", "--warmup", "0"])
    table = _methods_table(report)
    configs = {p.stem for p in (CONFIG_DIR / "method").glob("*.yaml")} - {"student"}
    assert set(table) == {f"`method={m}`" for m in configs}
    assert next(iter(table)) == "`method=kd`"  # the baseline first
    assert float(table["`method=kd`"][5]) == 1.0
    for config, cells in table.items():
        step_ms, ratio = float(cells[3]), float(cells[5])
        assert step_ms > 0 and math.isfinite(ratio) and ratio > 0, config
    # CRD at its configured K, with a memory bank the size of the training set (50,000 images)
    assert "K = 16384 negatives" in report
    assert int(table["`method=crd`"][8].replace(",", "")) >= 2 * 50_000 * 128
    assert int(table["`method=fitnet`"][7].replace(",", "")) > 0  # the regressor is counted
    assert table["`method=kd`"][0] == "KD" and table["`method=wkdl`"][0] == "WKD-L"


def test_methods_option_keeps_the_kd_baseline_and_rejects_unknown_methods(capsys):
    assert bench.method_names(["dkd"]) == ["kd", "dkd"]
    assert bench.method_names()[0] == "kd" and "student" not in bench.method_names()
    with pytest.raises(SystemExit):
        bench.parse_args(["--methods", "dkd,nosuch"])
    assert "nosuch" in capsys.readouterr().err


def test_round_robin_visits_every_case_in_turn_and_keeps_the_repeats():
    order = []

    def case(name, seconds):
        return bench.Case(name, lambda: order.append(name) or seconds, images_per_step=10, steps=2)

    results = bench.run_round_robin([case("a", 1.0), case("b", 4.0)], repeats=3, warmup=1)
    assert order == ["a", "b"] * 4
    assert results["a"].seconds == [0.5] * 3 and results["b"].seconds == [2.0] * 3
    assert results["b"].images_per_second == pytest.approx(5.0)
    assert bench.summarize([3.0, 1.0, 2.0]) == (2.0, 1.0, 3.0)
    # past the deadline no new round starts once the minimum is done
    late = bench.run_round_robin([case("c", 1.0)], repeats=5, warmup=1, deadline=0.0, min_repeats=2)
    assert len(late["c"].seconds) == 2


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self")
@pytest.mark.slow  # for its time; `make test-full` runs it
def test_peak_memory_sees_what_a_call_allocates():
    # In a child process: the probe changes glibc's allocator settings for the whole process.
    code = (
        "import torch\nfrom gompertz_kd.bench import PeakMemory\n"
        "probe = PeakMemory(torch.device('cpu'))\n"
        "print(probe(lambda: torch.ones(64 * 2**20 // 4).sum()), probe(lambda: None))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    big, nothing = (float(v) for v in out.stdout.split())
    assert 60 < big < 100 and nothing < 8


def _smooth_and_relu_net(activation):
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        activation(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        activation(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 5),
    ).train()


def _gm_gradients(net, step):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 3, 16, 16, generator=g)
    y = torch.randint(0, 5, (6,), generator=g)
    teacher_grad = torch.randn(6, 3, 16, 16, generator=g)
    params = list(net.parameters())
    xi = x.clone().requires_grad_(True)
    student_grad = losses.true_class_input_gradient(net(xi), xi, y, create_graph=True)
    exact = torch.autograd.grad(losses.gradient_matching_loss(student_grad, teacher_grad), params)
    xi = x.clone().requires_grad_(True)
    estimate = torch.autograd.grad(
        bench.finite_difference_gm(net, xi, net(xi), y, teacher_grad, step), params
    )
    flat = [torch.cat([t.flatten() for t in ts]) for ts in (exact, estimate)]
    return ((flat[1] - flat[0]).norm() / flat[0].norm()).item()


def test_finite_difference_measurement_converges_on_a_smooth_network_only():
    """The bench's evidence against a finite-difference estimator is only as good as the
    estimator: on a smooth network it must agree with the double backward."""
    assert _gm_gradients(_smooth_and_relu_net(nn.Tanh), 1e-2) < 5e-3
    assert _gm_gradients(_smooth_and_relu_net(nn.ReLU), 1e-2) > 0.3


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_bench_steps_run_on_cuda_in_bf16():
    argv = TINY + ["--device", "cuda", "--precision", "bf16-mixed", "--repeats", "1"]
    report = bench.main(argv + ["--warmup", "0", "--sections", "steps"])
    assert "bf16-mixed, cuda" in report and "| Gompertz KD step, Lightning |" in report


def test_recipe_section_extrapolates_each_configuration_of_the_main_command():
    argv = TINY + ["--sections", "recipe", "--repeats", "1", "--train-images", "64"]
    report = bench.main(argv + ["--test-images", "16", "--epochs", "20"])
    section = report.split("### The main command at its own scale")[1]
    rows = [r for r in section.splitlines() if r.startswith("| ") and "---" not in r][1:]
    assert [r.split(" | ")[0].lstrip("| ") for r in rows] == list(ROW_NAMES)
    # the experiment's own gradient-matching setting, and the paper's one setting away
    assert "| `method=gompertz_cnn` | 4, 1 |" in section
    assert "| `method=gompertz_cnn model.gm_every=1 model.gm_fraction=1.0` | 1, 1 |" in section
    for row in rows:
        cells = row.split(" | ")
        value, unit = cells[7].split()
        seconds = float(value) * {"s": 1, "min": 60, "h": 3600}[unit]
        # 20 epochs of 64 / 4 = 16 steps and 16 / 4 = 4 evaluation forwards each (the cells
        # are rounded for display: 5 % of slack)
        assert seconds > 20 * 16 * float(cells[3]) / 1000 * 0.95


def test_profile_section_ranks_the_operators_of_each_profiled_step():
    report = bench.main(TINY + ["--sections", "profile"])
    section = report.split("### Where a step's time goes")[1]
    for name in ("KD student", "Gompertz-CNN student, the experiment's default"):
        assert f"**{name}**" in section
    shares = [
        float(r.split(" | ")[-1].rstrip(" %|")) for r in section.splitlines() if r.startswith("| `")
    ]
    assert shares and all(0 <= s <= 100 for s in shares)
    # the gradient-matching step is profiled over a whole gm_every cycle of the experiment (4)
    assert "**Gompertz-CNN student, the experiment's default**, 4 steps" in section


def test_population_members_compose_in_the_experiment_given():
    from gompertz_kd.bench.population import member_specs

    plain = dict(member_specs("paper_table", 6))
    recipe = dict(member_specs("paper_table", 6, experiment="c100_resnet50_mbv2"))
    assert list(plain) == list(recipe)
    assert plain["gompertz_cnn"].model.gm_every == 1
    assert recipe["gompertz_cnn"].model.gm_every == 4  # the GPU recipe's default
