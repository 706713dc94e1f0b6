"""Command line: ``python -m gompertz_kd.run experiment=c100_resnet50_mbv2 [overrides]``.

The ``@hydra.main`` shell around :func:`run_config`, which chooses the run: a config with a
``population`` trains it (:func:`gompertz_kd.population.run_population`), any other is a single
run (:func:`gompertz_kd.train.run_training`). ``-m`` runs a multirun sweep. Returns the value an
Optuna sweep optimises (``optimized_metric``, default none).
"""

from __future__ import annotations

import logging
import sys
import warnings

import hydra
from omegaconf import DictConfig

from gompertz_kd.config import CONFIG_DIR, register_configs

register_configs()
log = logging.getLogger("gompertz_kd.run")

# Lightning 2.6 calls a torch pytree API that torch 2.14 deprecates; nothing for users to act on.
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")


def run_config(cfg: DictConfig):
    """Train what ``cfg`` describes and return its :class:`~gompertz_kd.run_parts.TrainingRun`:
    the population of ``cfg.population`` when it has one (``results``: member name -> results),
    else the single run."""
    if cfg.get("population"):
        from gompertz_kd.population import run_population

        return run_population(cfg)
    from gompertz_kd.train import run_training

    return run_training(cfg)


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="train")
def main(cfg: DictConfig) -> float | None:
    from gompertz_kd.callbacks import RunInterrupted  # after Hydra parsed the command line
    from gompertz_kd.run_parts import metric_value, resume_command

    try:
        results = run_config(cfg).results
    except RunInterrupted as stop:
        log.warning("%s. Resume with:\n  %s", stop, resume_command(cfg))
        sys.exit(128 + stop.signum)
    return metric_value(results, cfg.get("optimized_metric"))


if __name__ == "__main__":
    main()
