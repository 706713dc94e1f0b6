#!/usr/bin/env bash
# The GPU check: what to run on a machine with one CUDA GPU (no network needed; about 8 minutes).
#
#   scripts/gpu_check.sh [--out DIR]              # on a machine with a CUDA GPU
#   scripts/gpu_check.sh --dry-run [--out DIR]    # the same steps on the CPU with tiny networks
#   scripts/gpu_check.sh --stages population,suite  # some stages only (names below)
#
# It runs from a checkout without installing the package: the Python is $PYTHON, else .venv's,
# else python3; `src/` goes on PYTHONPATH when gompertz_kd is not importable. Packages that
# Python lacks (hydra-core, omegaconf, antlr4, POT on a stock CUDA image) are installed from the
# wheels in .whl/ into a temporary folder: `make gpu-wheels` downloads them here for the GPU
# machine's Python (PY_VERSION=3.12 by default); copy .whl/ with the checkout.
#
# Stages (each bounded by a time limit, so one that hangs cannot eat the others):
#  1. the device and the versions of everything it imports;
#  2. the tests marked `gpu`;
#  3. an end-to-end run, `python -m gompertz_kd.run` with trainer=gpu (bf16-mixed) on a generated
#     image folder: teacher trained and cached, student distilled, checkpoint and results.json;
#  4. throughput of ResNet50 -> MobileNetV2 at batch 64, 128 and 256: bf16-mixed, channels_last,
#     eager and torch.compile, tensor data path on synthetic uint8 images, with the estimated time
#     of a full 240-epoch c100_resnet50_mbv2 run;
#  5. one training step of every distillation method at batch 128, bf16-mixed, as ratios to KD;
#  6. populations of K = 1, 6 and 18 members (the paper's table, seed replicas) on one teacher
#     pass at batch 128: step time, member-images/s, memory per extra member, and the K = 6 ratio
#     to the six members' single-run steps;
#  7. the default test suite with the GPU visible (pytest-xdist used where installed).
# Everything printed also goes to DIR/gpu_check.log; the benchmark reports to DIR/*.md
# (DIR: --out, default logs/gpu_check). See docs/benchmarks.md.
set -uo pipefail
cd "$(dirname "$0")/.."

dry_run=0
out=logs/gpu_check
stages=",gpu,e2e,throughput,methods,population,suite,"
while (($#)); do
    case "$1" in
        --dry-run) dry_run=1 ;;
        --out) out="$2"; shift ;;
        --stages) stages=",$2,"; shift ;;
        *) echo "usage: $0 [--dry-run] [--out DIR] [--stages gpu,e2e,throughput,methods,population,suite]" >&2; exit 2 ;;
    esac
    shift
done
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
# step LIMIT_S NAME COMMAND...: run a stage's command under a time limit; note it if it fails.
# A shell function F runs as `step LIMIT NAME bash -c "$(declare -f F); F"` (timeout runs
# programs only; what F reads from the script must be exported).
step() {
    local limit=$1 name=$2; shift 2
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
    batches=8,16
    method_batch=8
    population=schedules_kd population_sizes=1,4 population_singles=4
    run_args="model=resnet20_resnet8 trainer=cpu trainer.precision=32-true"
    suite=(tests/test_schedules.py)  # the whole suite is `make test`; this proves the stage
else
    if ! "$PY" -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
        echo "no CUDA device: run with --dry-run to check the script on the CPU" >&2
        exit 1
    fi
    device=cuda
    networks=(--teacher ResNet50 --student MobileNetV2 --num-classes 100)
    batches=${GPU_CHECK_BATCHES:-64,128,256}
    method_batch=128
    population=paper_table population_sizes=1,6,18 population_singles=6
    run_args="model=resnet20_resnet8 trainer=gpu"
    suite=(tests)
fi

if want gpu; then
    stage "tests marked gpu"
    # Without a GPU every one of them skips; pytest's exit status 5 (nothing collected) is no failure.
    gpu_tests() { "$PY" -m pytest -q -m gpu -p no:cacheprovider tests || [[ $? == 5 ]]; }
    step 120 "tests marked gpu" bash -c "$(declare -f gpu_tests); gpu_tests"
fi

if want e2e; then
    export run_args
    stage "end-to-end run: python -m gompertz_kd.run $run_args, generated image folder"
    e2e() {
        local root
        root="$(mktemp -d)"
        "$PY" -c "from gompertz_kd.data import make_synthetic_folder as m; m('$root/images', 'cifar10', 16, 4)"
        (cd "$root" && GOMPERTZ_KD_ROOT="$root" "$PY" -m gompertz_kd.run $run_args \
            data=cifar10_folder data.root="$root/images" data.batch_size=32 method=kd \
            trainer.max_epochs=2 teacher.recipe.max_epochs=2 print_config=false) || return 1
        local results
        results="$(find "$root/logs" -name results.json | head -1)"
        [[ -n $results ]] || { echo "no results.json written"; return 1; }
        echo "results.json: $(cat "$results" | head -c 1200)"
        find "$root/logs" "$root/teachers" -name '*.ckpt' -o -name '*.pt' | sed "s|$root/||"
    }
    step 150 "end-to-end run" bash -c "$(declare -f e2e); e2e"
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

if want population; then
    stage "populations: K = $population_sizes members on one teacher pass, batch $method_batch"
    step 150 "populations" "$PY" -m gompertz_kd.bench "${networks[@]}" --device "$device" \
        --precision bf16-mixed --sections population --population "$population" \
        --population-sizes "$population_sizes" --population-singles "$population_singles" \
        --batch "$method_batch" --repeats 3 --output "$out/population.md"
fi

if want suite; then
    stage "the default test suite with the device visible"
    xdist=()
    if "$PY" -c "import xdist" 2>/dev/null; then xdist=(-n 14 -v); fi
    step 150 "default test suite" "$PY" -m pytest -q -rf -p no:cacheprovider "${xdist[@]}" "${suite[@]}"
fi

stage "done; reports in $out"
if ((${#failed[@]})); then
    printf 'FAILED: %s\n' "${failed[@]}"
    exit 1
fi
echo "every stage passed"
