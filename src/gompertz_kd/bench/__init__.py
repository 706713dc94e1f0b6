"""What a distillation step costs, side by side: ``python -m gompertz_kd.bench``.

    python -m gompertz_kd.bench --teacher ResNet50 --student MobileNetV2 --batch 32 \\
        --precision 32-true --device cpu --compile --output docs/benchmarks.md

Sections (``--sections``, default all but ``throughput``):

- ``steps``: images/second and peak memory of the teacher's forward alone, a student training
  step alone, the static KD, Gompertz KD, +Wasserstein, +gradient matching and full Gompertz-CNN
  steps (a plain PyTorch loop fed by the tensor data path), the Gompertz KD step under Lightning,
  and the options of :class:`~gompertz_kd.module.DistillationModule` that change the cost
  (folded BatchNorm, bf16 teacher, channels_last, gradient matching every k steps); then the
  ratios the targets are stated in.
- ``methods``: one training step of every distillation method, each objective built from its
  ``conf/method/<name>.yaml`` (all but ``student``; ``--methods`` picks some) exactly as a
  training run builds it, timed in the same plain loop and reported as a ratio to the
  ``method=kd`` step, with the objective's own parameters and buffers.
- ``accuracy``: what the options change: folded BatchNorm and the bf16 teacher against the
  fp32 teacher as built (logits, KD, Wasserstein and gradient-matching losses, input
  gradients); gradient matching under bf16-mixed; and a finite-difference estimate of the
  gradient-matching gradient against the exact double backward, for several step sizes (why
  the module offers none).
- ``data``: images/second of each data path (tensor path, per-image DataLoader with 0 and 2
  workers) on synthetic uint8 CIFAR images, next to the training throughput it must feed.
- ``compile``: ``torch.compile`` (``--compile``): compile time and compiled against eager KD step.
- ``throughput``: per batch size (``--batches``), the end-to-end Lightning step of the
  ``c100_resnet50_mbv2`` objective, eager and (with ``--compile``) compiled, and the estimated
  time of a full run (``--epochs`` epochs of ``--train-images`` images). The GPU check's section.

Every timed case runs ``--warmup`` rounds first; then ``--repeats`` rounds visit every case of a
section in turn (round-robin), so a burst of load from another process hits all of them alike.
Ratios are taken within each round and summarised by their median and spread (min-max), which
cancels most of the slow drift of a shared machine. Minor page faults per step are counted
around each timed call. Peak memory is measured after all timing: on CUDA
``max_memory_allocated``, on Linux CPUs the rise of the peak resident set size over a single
call (glibc set to return freed memory), i.e. what the step allocates above what was live.
The networks are randomly initialised unless ``--teacher-ckpt`` names trained weights.
"""

from gompertz_kd.bench.accuracy import finite_difference_gm
from gompertz_kd.bench.cli import main, parse_args
from gompertz_kd.bench.harness import (
    MARK_END,
    MARK_START,
    Case,
    PeakMemory,
    PlainLoop,
    Result,
    Setup,
    run_round_robin,
    summarize,
    timed,
)
from gompertz_kd.bench.render import write_report
from gompertz_kd.bench.sections import method_names, methods_section

__all__ = [
    "MARK_END",
    "MARK_START",
    "Case",
    "PeakMemory",
    "PlainLoop",
    "Result",
    "Setup",
    "finite_difference_gm",
    "main",
    "method_names",
    "methods_section",
    "parse_args",
    "run_round_robin",
    "summarize",
    "timed",
    "write_report",
]
