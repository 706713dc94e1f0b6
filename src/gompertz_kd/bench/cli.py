"""``python -m gompertz_kd.bench``: the command line, and the order the sections run in."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from gompertz_kd.bench.accuracy import accuracy_section
from gompertz_kd.bench.harness import (
    BASELINE_METHOD,
    DEFAULT_SECTIONS,
    PRECISIONS,
    SECTIONS,
    STUDENT_METHOD,
    PeakMemory,
    Result,
    Setup,
)
from gompertz_kd.bench.population import (
    POPULATION_CASES,
    PopulationCase,
    PopulationRow,
    population_rows,
)
from gompertz_kd.bench.profile import profile_lines, profile_section
from gompertz_kd.bench.recipe import recipe_lines, recipe_section
from gompertz_kd.bench.render import (
    estimate_lines,
    render,
    results_table,
    targets,
    write_report,
)
from gompertz_kd.bench.sections import (
    checkpoint_cost,
    compile_section,
    data_section,
    method_names,
    methods_section,
    ratios,
    steps_section,
    throughput_modules,
    throughput_section,
)


# ---------------------------------------------------------------------------------- main
def _population(args: argparse.Namespace, setup: Setup, memory: list) -> list[PopulationRow]:
    """The population section: ``--population`` at ``--population-sizes`` on this pair, or the
    standard cases (:data:`~gompertz_kd.bench.population.POPULATION_CASES`) each on its pair."""
    if args.population:
        sizes = tuple(int(k) for k in args.population_sizes.split(",") if k)
        compared = {int(k) for k in args.population_singles.split(",") if k}
        case = PopulationCase(
            setup.teacher, setup.student, setup.num_classes, args.population, sizes,
            experiment=args.population_experiment,
        )  # fmt: skip
        rows = []
        for size in sizes:
            _progress(f"population {args.population}, K={size}")
            rows += population_rows(
                setup, case, [size], args.repeats, args.warmup, args.train_images, memory,
                compare=size in compared, compile_too=args.compile,
            )  # fmt: skip
        return rows
    rows = []
    for case in POPULATION_CASES:
        _progress(f"population {case.population}, {case.teacher} -> {case.student}")
        # the same device, precision and batch on the case's own pair (a fresh teacher)
        pair = dataclasses.replace(
            setup,
            teacher=case.teacher,
            student=case.student,
            num_classes=case.num_classes,
            teacher_ckpt=None,
        )
        pair.deadline = setup.deadline
        rows += population_rows(
            pair, case, case.sizes, args.repeats, args.warmup, args.train_images, memory,
            compile_too=case.compiled and args.compile,
        )  # fmt: skip
    return rows


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m gompertz_kd.bench", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--teacher", default="ResNet50")
    parser.add_argument("--student", default="MobileNetV2")
    parser.add_argument("--num-classes", type=int, default=100)
    parser.add_argument("--teacher-ckpt", default=None, help="trained teacher weights")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument(
        "--batches", default=None, help="throughput section: comma-separated batch sizes"
    )
    parser.add_argument("--precision", choices=PRECISIONS, default="32-true")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-channels-last", action="store_true")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--gm-every", type=int, default=4)
    parser.add_argument(
        "--gm-fraction",
        type=float,
        default=0.25,
        help="the share of each batch the gm_fraction cases compute gradient matching on",
    )
    parser.add_argument("--fd-steps", default="1e-1,1e-2,1e-3,1e-4")
    parser.add_argument("--data-batches", type=int, default=20, help="batches per data timing")
    parser.add_argument("--workers", default="0,2", help="per-image DataLoader worker counts")
    parser.add_argument(
        "--sections",
        default=",".join(DEFAULT_SECTIONS),
        help=f"comma-separated, from {','.join(SECTIONS)} (default: all but throughput, recipe "
        "and profile)",
    )
    parser.add_argument(
        "--methods",
        default="",
        help="methods section: comma-separated conf/method names (default: every one but "
        f"{STUDENT_METHOD}; {BASELINE_METHOD}, the baseline, always runs)",
    )
    parser.add_argument(
        "--population",
        default=None,
        help="population section: a conf/population name timed on the pair above at "
        "--population-sizes (default: the cases of gompertz_kd.bench.population.POPULATION_CASES, each on "
        "its own pair)",
    )
    parser.add_argument(
        "--population-sizes", default="1,6", help="with --population: member counts K to time"
    )
    parser.add_argument(
        "--population-singles",
        default="6",
        help="with --population: the largest K also timed as single steps (the ratio)",
    )
    parser.add_argument(
        "--population-experiment",
        default=None,
        help="with --population: compose the members in this experiment (its gm_every and "
        "precisions, e.g. c100_resnet50_mbv2's gradient matching on every 4th step); default: "
        "the model defaults (gradient matching on every step)",
    )
    parser.add_argument("--compile", action="store_true", help="run the torch.compile parts")
    parser.add_argument(
        "--compile-mode",
        default=None,
        help="torch.compile mode of the recipe section's compiled steps (reduce-overhead: CUDA "
        "graphs)",
    )
    parser.add_argument(
        "--recipe-compile",
        default=None,
        help="recipe section: the rows to compile as well, comma-separated leading words of "
        "their names (default with --compile: every row)",
    )
    parser.add_argument("--epochs", type=int, default=240)
    parser.add_argument(
        "--train-images",
        type=int,
        default=50_000,
        help="training-set size: of the full-run estimate, and of the methods' per-image "
        "memories (CRD's banks)",
    )
    parser.add_argument("--test-images", type=int, default=10_000)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument(
        "--budget",
        type=float,
        default=0,
        help="seconds; on a loaded machine sections then run fewer rounds (at least 3) to "
        "finish in about this time (0: always --repeats)",
    )
    parser.add_argument("--output", default=None, help="markdown file to write the report into")
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    sections = tuple(s for s in args.sections.split(",") if s)
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}; choose from {SECTIONS}")
    if "compile" in sections and not args.compile:
        sections = tuple(s for s in sections if s != "compile")
    args.section_list = sections
    args.method_list = [m for m in args.methods.split(",") if m]
    try:
        method_names(args.method_list)
    except ValueError as error:
        parser.error(str(error))
    return args


def main(argv: Sequence[str] | None = None) -> str:
    """Run the benchmark; print the report and return it (also written to ``--output``)."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    start, load_before = time.perf_counter(), os.getloadavg()[0]
    device = torch.device(args.device)
    setup = Setup(
        teacher=args.teacher,
        student=args.student,
        num_classes=args.num_classes,
        batch=args.batch,
        device=device,
        precision=args.precision,
        channels_last=not args.no_channels_last,
        teacher_ckpt=args.teacher_ckpt,
        gm_every=args.gm_every,
        gm_fraction=args.gm_fraction,
    )
    sections: dict[str, Any] = {}
    memory: list[tuple[Result, Callable[[], Any]]] = []  # probed after every timing
    with tempfile.TemporaryDirectory() as scratch_dir, _quiet_lightning():
        scratch = Path(scratch_dir)

        def budget(share: float) -> None:
            setup.deadline = start + share * args.budget if args.budget else None

        if "steps" in args.section_list:
            budget(0.45)
            _progress("steps")
            results = steps_section(setup, args.repeats, args.warmup, scratch, memory)
            sections["steps"] = (results, ratios(results, setup.gm_every, setup.gm_fraction))
            sections["checkpoint"] = checkpoint_cost(setup, scratch, results)
        if "methods" in args.section_list:
            budget(0.6)
            _progress("methods")
            sections["methods"] = methods_section(
                setup, args.repeats, args.warmup, args.train_images, memory, args.method_list
            )
        if "population" in args.section_list:
            budget(0.7)
            sections["population"] = _population(args, setup, memory)
        if "accuracy" in args.section_list:
            _progress("accuracy")
            fd_steps = [float(s) for s in args.fd_steps.split(",") if s]
            sections["accuracy"] = accuracy_section(setup, fd_steps)
        if "data" in args.section_list:
            budget(0.65)
            _progress("data")
            workers = [int(w) for w in args.workers.split(",") if w]
            sections["data"] = data_section(setup, args.repeats, args.data_batches, workers)
        if "compile" in args.section_list:
            budget(0.85)
            _progress("compile")
            sections["compile"] = compile_section(setup, args.repeats, memory)
        if "throughput" in args.section_list:
            sections["throughput"] = {}
            modules = throughput_modules(setup, args.compile)
            budget(0.9)
            for batch in [int(b) for b in (args.batches or str(args.batch)).split(",")]:
                _progress(f"throughput, batch {batch}")
                setup.batch = batch
                res = throughput_section(setup, args.repeats, modules, scratch, memory)
                estimate = estimate_lines(res, args.epochs, args.train_images, args.test_images)
                sections["throughput"][batch] = (res, estimate)
                print("\n".join(results_table(res) + estimate), flush=True)
        if "recipe" in args.section_list:
            budget(0.95)
            _progress("recipe")
            compile_rows = args.recipe_compile.split(",") if args.recipe_compile else None
            sections["recipe"] = recipe_section(
                setup,
                args.repeats,
                args.epochs,
                args.train_images,
                args.test_images,
                compile_rows if args.compile else [],
                args.compile_mode,
                memory,
            )
            print("\n".join(recipe_lines(sections["recipe"])), flush=True)
        if "profile" in args.section_list:
            _progress("profile")
            sections["profile"] = profile_section(setup)
            print("\n".join(profile_lines(sections["profile"])), flush=True)
        if memory:
            _progress("peak memory")
            probe = PeakMemory(device)
            for result, fn in memory:
                result.peak_mib = probe(fn)
    steps = sections.get("steps")
    sections["targets"] = targets(
        steps[0] if steps else None,
        steps[1] if steps else None,
        sections.get("data"),
        setup,
        sections["compile"][1] if "compile" in sections else None,
    )
    report = render(
        args, setup, sections, (load_before, os.getloadavg()[0]), time.perf_counter() - start
    )
    print(report)
    if args.output:
        write_report(Path(args.output), report)
    return report


def _progress(section: str) -> None:
    print(f"[bench] {section} (load average {os.getloadavg()[0]:.2f})", file=sys.stderr, flush=True)


@contextlib.contextmanager
def _quiet_lightning() -> Iterator[None]:
    """Lightning's start-up chatter would bury the report (one Trainer per timed round)."""
    import logging
    import warnings

    loggers = [logging.getLogger(n) for n in ("lightning.pytorch", "lightning.fabric")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", module="lightning")
            warnings.filterwarnings("ignore", message=".*does not have many workers.*")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


if __name__ == "__main__":
    main()
