"""The ``population`` Hydra launcher: a sweep's jobs train as one population, one teacher pass.

    python -m gompertz_kd.run -m hydra/launcher=population experiment=c10cpu method=kd,dkd,dist
    python -m gompertz_kd.run -m hparams_search=gompertz_optuna hydra/launcher=population \\
        hydra.sweeper.n_jobs=8

Hydra hands a launcher its jobs in batches: the basic sweeper all of them (or
``hydra.sweeper.max_batch_size`` at a time), the Optuna sweeper ``n_jobs`` trials at a time. This
launcher trains each batch as one population run (:mod:`gompertz_kd.population`): every job is a
member named ``job<N>`` (its job number), composed from its own overrides exactly as its single run
would be, and the teacher runs once per batch for all of them. Each job's return value (what an
Optuna sweep optimises, ``optimized_metric``) is its member's, so any sweeper works unchanged.

What a population requires, a batch requires: the jobs may differ in the method, its schedules and
progress mode, and the seed, but not in ``data``, ``model``, ``trainer`` or ``teacher`` (a batch
that does fails before any training and names the difference). A job's ``seed`` is its student's
initialisation seed; all jobs of a batch share one data order, that of ``data_seed`` (default: the
first job's seed). Outputs: ``<sweep dir>/<first job number of the batch>/members/job<N>/``
(``results.json``, ``csv/metrics.csv``, ``checkpoints/``), read by ``python -m gompertz_kd.report``
like single runs.

A stopped batch (SIGINT / SIGTERM) writes its checkpoint like any population run, but Hydra does
not resume sweeps: the batches that finished keep their results; run the rest again.

This module sits in the ``hydra_plugins`` namespace because Hydra instantiates launchers only from
there; it imports nothing heavy until a batch is launched (Hydra imports every plugin at start-up).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.core.utils import (
    JobReturn,
    JobStatus,
    configure_log,
    filter_overrides,
    run_job,
    setup_globals,
)
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, open_dict

log = logging.getLogger(__name__)


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def population_of_jobs(
    job_overrides: Sequence[Sequence[str]], first_job: int, data_seed: int | None = None
) -> tuple[list[str], dict[str, Any]]:
    """The overrides the batch's own config is composed from, and its ``population`` node: one
    member ``job<N>`` per job, with the job's overrides (its ``seed`` as the member's own seed).

    The batch's own overrides are those every job shares, in the first job's order, plus
    ``seed=<data seed>``; a job's ``hydra.*`` overrides are dropped (they configure Hydra, not the
    run).
    """
    jobs = [
        [o for o in overrides if not _key(o).startswith("hydra.")] for overrides in job_overrides
    ]
    if not jobs:
        raise ValueError("the population launcher was handed no jobs")
    members: dict[str, Any] = {}
    seeds: list[int | None] = []
    for number, overrides in enumerate(jobs, start=first_job):
        seed = [o.split("=", 1)[1] for o in overrides if _key(o) == "seed"]
        seeds.append(int(seed[-1]) if seed else None)
        members[f"job{number}"] = {
            "overrides": [o for o in overrides if _key(o) != "seed"],
            "seed": seeds[-1],
        }
    shared = [o for o in jobs[0] if _key(o) != "seed" and all(o in job for job in jobs[1:])]
    if data_seed is None:
        data_seed = seeds[0]
    if data_seed is not None:
        shared.append(f"seed={int(data_seed)}")
    return shared, {"name": f"jobs_{first_job}-{first_job + len(jobs) - 1}", "members": members}


def _train_population(cfg: DictConfig) -> dict[str, dict[str, Any]]:
    from gompertz_kd.population import run_population

    # members are composed from their own overrides alone: each exactly its single run
    return run_population(cfg, base_overrides=[]).results


class PopulationLauncher(Launcher):
    """Launches each batch of sweep jobs as one population run (see the module's docstring)."""

    def __init__(self, data_seed: int | None = None) -> None:
        super().__init__()
        self.data_seed = data_seed
        self.config: DictConfig | None = None
        self.hydra_context: HydraContext | None = None
        self.task_function: TaskFunction | None = None

    def setup(
        self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig
    ) -> None:
        self.config = config
        self.hydra_context = hydra_context
        self.task_function = task_function

    def launch(
        self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int
    ) -> Sequence[JobReturn]:
        setup_globals()
        assert self.config is not None and self.hydra_context is not None
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        Path(str(self.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
        shared, population = population_of_jobs(job_overrides, initial_job_idx, self.data_seed)
        log.info(
            "Launching %d jobs as one population (one teacher pass), data seed from %s",
            len(job_overrides),
            next((o for o in shared if _key(o) == "seed"), "the config"),
        )
        for name, overrides in zip(population["members"], job_overrides, strict=True):
            log.info("\t%s : %s", name, " ".join(filter_overrides(overrides)))
        batch_cfg = self.hydra_context.config_loader.load_sweep_config(self.config, shared)
        with open_dict(batch_cfg):
            batch_cfg.hydra.job.id = initial_job_idx
            batch_cfg.hydra.job.num = initial_job_idx
            batch_cfg.population = population
        batch = run_job(
            hydra_context=self.hydra_context,
            task_function=_train_population,
            config=batch_cfg,
            job_dir_key="hydra.sweep.dir",
            job_subdir_key="hydra.sweep.subdir",
        )
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        return [
            self._job_return(batch, name, list(overrides))
            for name, overrides in zip(population["members"], job_overrides, strict=True)
        ]

    @staticmethod
    def _job_return(batch: JobReturn, name: str, overrides: list[str]) -> JobReturn:
        from gompertz_kd.population import MEMBERS_DIR
        from gompertz_kd.train import metric_value

        ret = JobReturn(
            overrides=overrides,
            cfg=batch.cfg,
            hydra_cfg=batch.hydra_cfg,
            working_dir=str(Path(str(batch.working_dir)) / MEMBERS_DIR / name),
            task_name=batch.task_name,
            status=batch.status,
        )
        if batch.status == JobStatus.COMPLETED:
            assert batch.cfg is not None
            metric = batch.cfg.get("optimized_metric")
            ret.return_value = metric_value(batch.return_value[name], metric)
        else:
            ret.return_value = batch._return_value  # the batch's exception, raised on access
        return ret
