"""Samplers for hyper-parameter searches (``conf/hparams_search/``).

Hydra's Optuna sweeper types its ``sampler`` node with a fixed schema that has no field for
TPE's ``constant_liar``; :func:`batch_tpe` is a ``_target_`` with the same arguments that turns
it on. With it, trials asked together (``hydra.sweeper.n_jobs`` > 1, e.g. one population per
batch under ``hydra/launcher=population``) count as running while TPE proposes the next, so a
batch is spread over the space instead of placed around one point.
"""

from __future__ import annotations

from typing import Any


def batch_tpe(**kwargs: Any):
    """``optuna.samplers.TPESampler(constant_liar=True, **kwargs)``."""
    import optuna

    return optuna.samplers.TPESampler(constant_liar=True, **kwargs)
