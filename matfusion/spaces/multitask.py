"""Search space of multi-task loss weighting (only for configs with several targets):
``fixed``: lambda_k from config (default 1); ``tuned``: lambda_k in [0.1, 1] searched;
``uncertainty``: learned homoscedastic weights (nothing to search)."""

from __future__ import annotations

from typing import Sequence

from .params import Float

TASK_WEIGHT = Float(0.1, 1.0)


def multitask_space(trial, targets: Sequence[str], weightings: Sequence[str], prefix: str = "multitask/") -> str:
    weighting = trial.suggest_categorical(prefix + "weighting", list(weightings))
    if weighting == "tuned":
        for name in targets:
            trial.suggest_float(f"{prefix}w_{name}", TASK_WEIGHT.low, TASK_WEIGHT.high)
    return weighting
