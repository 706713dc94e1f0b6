#!/usr/bin/env bash
# The GPU check: one call on a machine with one CUDA GPU (no network needed), planned to end
# within 8 minutes on a bare machine (--budget, seconds).
#
#   scripts/gpu_check.sh [--out DIR] [--budget S]  # on a machine with a CUDA GPU
#   scripts/gpu_check.sh --dry-run [--out DIR]     # the same stages on the CPU with tiny networks
#   scripts/gpu_check.sh --stages recipe,e2e       # some stages only (names below)
#
# It runs from a checkout without installing the package: the Python is $PYTHON, else .venv's,
# else python3; `src/` goes on PYTHONPATH when gompertz_kd is not importable. Packages that
# Python lacks (hydra-core, omegaconf, antlr4, POT on a stock CUDA image) are installed from the
# wheels in .whl/ into a temporary folder: `make gpu-wheels` downloads them here for the GPU
# machine's Python (PY_VERSION=3.12 by default); copy .whl/ with the checkout.
#
# Stages, in order of what they are worth (each under its own time limit, cut to what is left of
# the budget, so that one that hangs cannot eat the others):
#  1. the device and the versions of everything it imports;
#  2. recipe: every configuration of `experiment=c100_resnet50_mbv2` at the recipe's batch 64,
#     bf16-mixed, eager and compiled (compile_step, CUDA graphs): KD, DKD, DIST, Gompertz-CNN
#     paper-exact and with the experiment's gradient-matching default, the ResNet50 teacher's
#     own training step; each one's 240 epochs extrapolated, against the GPU targets;
#  3. e2e: a real `python -m gompertz_kd.run experiment=c100_resnet50_mbv2 trainer=gpu` run of a
#     few epochs (teacher trained and cached first) on a generated 100-class image folder, to
#     results.json;
#  4. population: the paper's six-configuration table (K = 6) and its seed replicas (K = 18) on
#     one teacher pass at batch 64, fused against looped members;
#  5. profile: torch.profiler over the KD and the default Gompertz-CNN steps: the operators that
#     take the time, and how busy the device is (what a missed target is explained with);
#  6. the tests marked `gpu`;
#  7. the default test suite with the GPU visible (pytest-xdist where installed), each result
#     named.
# Not in the default plan (--stages): throughput (batches 64/128/256, the Lightning step) and
# methods (every method's step at batch 128).
# Everything printed also goes to DIR/gpu_check.log, the reports to DIR/*.md, the e2e run's
# results.json to DIR/e2e_results.json (DIR: --out, default docs/results/gpu_check/<UTC date>;
# logs/gpu_check/dry_run for a dry run).
# See docs/benchmarks.md.
set -uo pipefail
cd "$(dirname "$0")/.."

dry_run=0
out=""
budget=450
stages=",recipe,e2e,population,profile,gpu,suite,"
usage="usage: $0 [--dry-run] [--out DIR] [--budget S] [--stages recipe,e2e,population,profile,gpu,suite,throughput,methods]"
while (($#)); do
    case "$1" in
        --dry-run) dry_run=1 ;;
        --out) out="$2"; shift ;;
        --budget) budget="$2"; shift ;;
        --stages) stages=",$2,"; shift ;;
        *) echo "$usage" >&2; exit 2 ;;
    esac
    shift
done
if [[ -z $out ]]; then
    out="docs/results/gpu_check/$(date -u +%F)"
    ((dry_run)) && out=logs/gpu_check/dry_run
fi
mkdir -p "$out"
out="$(cd "$out" && pwd)"
exec > >(tee "$out/gpu_check.log") 2>&1

if [[ -n "${PYTHON:-}" ]]; then PY="$PYTHON"
elif [[ -x .venv/bin/python ]]; then PY="$PWD/.venv/bin/python"
else PY=python3
fi
if [[ -d .whl ]] && ! "$PY" -c "import hydra, omegaconf, ot" 2>/dev/null; then
    site="${TMPDIR:-/tmp}/gompertz_kd_site"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$site" .whl/*.whl || { echo "installing .whl/ failed" >&2; exit 1; }
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
if ! "$PY" -c "import gompertz_kd" 2>/dev/null; then
    export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
fi
export PY PYTHONUNBUFFERED=1

start=$(date +%s)
failed=()
stage() { echo; echo "== $1 ($(($(date +%s) - start)) s elapsed)"; }
want() { [[ $stages == *",$1,"* ]]; }
# step LIMIT_S NAME COMMAND...: run a stage's command under a time limit, cut to what is left of
# the budget (less 10 s for the summary); a stage with under 20 s left is skipped. A failure is
# noted. A shell function F runs as `step LIMIT NAME bash -c "$(declare -f F); F"` (timeout runs
# programs only; what F reads from the script must be exported).
step() {
    local limit=$1 name=$2; shift 2
    local left=$((budget - ($(date +%s) - start) - 10))
    if ((left < 20)); then
        echo "!! $name: skipped, the budget of $budget s is spent"
        failed+=("$name (skipped: budget)")
        return 0
    fi
    ((limit > left)) && limit=$left
    timeout --kill-after=10 "$limit" "$@"
    local rc=$?
    if ((rc == 124 || rc == 137)); then echo "!! $name: stopped at its limit of $limit s"; fi
    if ((rc != 0)); then failed+=("$name (exit $rc)"); fi
    return 0
}

stage "device and versions"
if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
else
    echo "nvidia-smi: not found"
fi
"$PY" - <<'EOF' || { echo "the Python environment cannot import gompertz_kd" >&2; exit 1; }
import importlib.metadata as md
import platform

import torch

import gompertz_kd

names = ["torch", "torchvision", "lightning", "torchmetrics", "timm", "hydra-core", "omegaconf",
         "POT", "numpy", "scipy", "triton"]
versions = []
for name in names:
    try:
        versions.append(f"{name} {md.version(name)}")
    except md.PackageNotFoundError:
        versions.append(f"{name} -")
print(f"python {platform.python_version()}; " + ", ".join(versions))
print(f"gompertz_kd from {gompertz_kd.__file__}")
print(f"CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(
        f"device: {p.name}, {p.total_memory / 2**30:.0f} GiB, compute capability {p.major}.{p.minor}, "
        f"bf16 {torch.cuda.is_bf16_supported()}, {torch.cuda.device_count()} visible"
    )
else:
    print("device: no CUDA device visible")
EOF

if [[ $dry_run == 1 ]]; then
    device=cpu
    networks=(--teacher resnet14 --student resnet8 --num-classes 10)
    batch=8 batches=8,16 method_batch=8
    # the compiler's first steps take minutes on a CPU: compile one row to prove the path
    recipe_compile=(--recipe-compile KD) compile_mode=default
    population=schedules_kd population_sizes=1,4 population_singles=4 population_experiment=c10cpu
    e2e_args="model=resnet20_resnet8 data=cifar10_folder data.batch_size=32 trainer=cpu method=kd"
    e2e_data=(cifar10 16 4) e2e_epochs=2
    suite=(tests/test_schedules.py)  # the whole suite is `make test`; this proves the stage
else
    if ! "$PY" -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
        echo "no CUDA device: run with --dry-run to check the script on the CPU" >&2
        exit 1
    fi
    device=cuda
    networks=(--teacher ResNet50 --student MobileNetV2 --num-classes 100)
    batch=64 batches=${GPU_CHECK_BATCHES:-64,128,256} method_batch=128
    recipe_compile=() compile_mode=reduce-overhead
    population=paper_table population_sizes=6,18 population_singles=6
    population_experiment=c100_resnet50_mbv2  # the recipe's members: gradient matching every 4th step
    # the main command; the teacher's 240 epochs and the student's cut to a few
    e2e_args="experiment=c100_resnet50_mbv2 data=cifar100_folder trainer=gpu"
    e2e_data=(cifar100 50 10) e2e_epochs=3
    suite=(tests)
fi
export PY out e2e_args e2e_epochs

if want recipe; then
    stage "recipe: experiment=c100_resnet50_mbv2 at batch $batch, bf16-mixed, eager and compiled ($compile_mode)"
    mode=()
    [[ $compile_mode != default ]] && mode=(--compile-mode "$compile_mode")
    step 220 "recipe" "$PY" -m gompertz_kd.bench "${networks[@]}" --device "$device" \
        --precision bf16-mixed --sections recipe --batch "$batch" --compile "${mode[@]}" \
        "${recipe_compile[@]}" --repeats 3 --budget 180 --output "$out/recipe.md"
fi

if want e2e; then
    stage "end-to-end run: python -m gompertz_kd.run $e2e_args, generated image folder, $e2e_epochs epochs"
    export e2e_dataset=${e2e_data[0]} e2e_train=${e2e_data[1]} e2e_test=${e2e_data[2]}
    e2e() {
        local root
        root="$(mktemp -d)"
        "$PY" -c "from gompertz_kd.data import make_synthetic_folder as m; m('$root/images', '$e2e_dataset', $e2e_train, $e2e_test)"
        (cd "$root" && GOMPERTZ_KD_ROOT="$root" "$PY" -m gompertz_kd.run $e2e_args \
            data.root="$root/images" trainer.max_epochs="$e2e_epochs" \
            teacher.recipe.max_epochs=2 callbacks.rich_progress_bar=null print_config=false) \
            || return 1
        local results
        results="$(find "$root/logs" -name results.json | head -1)"
        [[ -n $results ]] || { echo "no results.json written"; return 1; }
        cp "$results" "$out/e2e_results.json"
        "$PY" - "$results" <<'PYEOF'
import json, sys
r = json.load(open(sys.argv[1]))
print(f"results.json: status {r['status']}, test top-1 {r['test']['top1']}, "
      f"{r['epochs']} epochs in {r['wall_time_s']:.0f} s "
      f"({r['train_images_per_s'] or 0:.0f} training images/s), teacher provisioned in "
      f"{r['teacher_provision_s']:.0f} s")
PYEOF
        find "$root/logs" "$root/teachers" -name '*.ckpt' -o -name '*.pt' | sed "s|$root/||"
    }
    step 120 "end-to-end run" bash -c "$(declare -f e2e); e2e"
fi

if want population; then
    stage "populations: K = $population_sizes members on one teacher pass, batch $batch, fused and looped"
    step 90 "populations" "$PY" -m gompertz_kd.bench "${networks[@]}" --device "$device" \
        --precision bf16-mixed --sections population --population "$population" \
        --population-sizes "$population_sizes" --population-singles "$population_singles" \
        --population-experiment "$population_experiment" \
        --batch "$batch" --repeats 3 --output "$out/population.md"
fi

if want profile; then
    stage "profile: where the KD and the default Gompertz-CNN steps spend their time, batch $batch"
    step 60 "profile" "$PY" -m gompertz_kd.bench "${networks[@]}" --device "$device" \
        --precision bf16-mixed --sections profile --batch "$batch" --output "$out/profile.md"
fi

if want gpu; then
    stage "tests marked gpu"
    # Without a GPU every one of them skips; pytest's exit status 5 (nothing collected) is no failure.
    gpu_tests() { "$PY" -m pytest -q -m gpu -p no:cacheprovider tests || [[ $? == 5 ]]; }
    step 60 "tests marked gpu" bash -c "$(declare -f gpu_tests); gpu_tests"
fi

if want suite; then
    stage "the default test suite with the device visible"
    xdist=()
    # one thread per worker: 12 workers of the machine's default thread count would oversubscribe it
    if "$PY" -c "import xdist" 2>/dev/null; then xdist=(-n 12); fi
    suite_run() { OMP_NUM_THREADS=1 "$PY" -m pytest -rfE -p no:cacheprovider "$@" 2>&1 | tee "$out/suite.log"; return "${PIPESTATUS[0]}"; }
    step 150 "default test suite" bash -c "$(declare -f suite_run); suite_run ${xdist[*]} ${suite[*]}"
fi

if want throughput; then
    stage "throughput: bf16-mixed, channels_last, eager and torch.compile, batches $batches"
    step 220 "throughput" "$PY" -m gompertz_kd.bench "${networks[@]}" --device "$device" \
        --precision bf16-mixed --sections throughput --batches "$batches" --compile --repeats 3 \
        --output "$out/throughput.md"
fi

if want methods; then
    stage "every method's step at batch $method_batch, bf16-mixed"
    step 120 "methods" "$PY" -m gompertz_kd.bench "${networks[@]}" --device "$device" \
        --precision bf16-mixed --sections methods --batch "$method_batch" --repeats 3 \
        --output "$out/methods.md"
fi

stage "done; reports in $out"
if ((${#failed[@]})); then
    printf 'FAILED: %s\n' "${failed[@]}"
    exit 1
fi
echo "every stage passed"
