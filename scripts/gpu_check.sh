#!/usr/bin/env bash
# The GPU check: what to run the day a GPU is lent (one GPU, no network, budget under 5 minutes).
#
#   scripts/gpu_check.sh              # on a machine with a CUDA GPU
#   scripts/gpu_check.sh --dry-run    # the same steps on the CPU with tiny networks (checks the script)
#
# 1. prints the device and the versions;
# 2. runs the tests marked `gpu`;
# 3. runs the benchmark's throughput section for ResNet50 -> MobileNetV2 at batch 64, 128 and 256,
#    bf16-mixed, channels_last, eager and torch.compile, fed by the tensor data path on synthetic
#    uint8 images, and prints the estimated time of a full 240-epoch c100_resnet50_mbv2 run.
# The report also goes to logs/gpu_check/benchmarks.md. See docs/benchmarks.md.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"

dry_run=0
case "${1:-}" in
    --dry-run) dry_run=1 ;;
    "") ;;
    *) echo "usage: $0 [--dry-run]" >&2; exit 2 ;;
esac
start=$(date +%s)
stage() { echo; echo "== $1 ($(($(date +%s) - start)) s elapsed)"; }

stage "device and versions"
if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
else
    echo "nvidia-smi: not found"
fi
"$PY" - <<'EOF'
import platform

import lightning
import torch

print(f"python {platform.python_version()}, torch {torch.__version__}, lightning {lightning.__version__}")
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
else
    if ! "$PY" -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
        echo "no CUDA device: run with --dry-run to check the script on the CPU" >&2
        exit 1
    fi
    device=cuda
    networks=(--teacher ResNet50 --student MobileNetV2 --num-classes 100)
    batches=64,128,256
fi

stage "tests marked gpu"
# On the CPU every one of them skips; pytest's exit status 5 (nothing collected) is not a failure.
"$PY" -m pytest -q -m gpu -p no:cacheprovider tests || [[ $? == 5 ]]

stage "throughput: bf16-mixed, channels_last, eager and torch.compile, batches $batches"
mkdir -p logs/gpu_check
"$PY" -m gompertz_kd.bench "${networks[@]}" --device "$device" --precision bf16-mixed \
    --sections throughput --batches "$batches" --compile --repeats 3 \
    --output logs/gpu_check/benchmarks.md

stage "done; report in logs/gpu_check/benchmarks.md"
