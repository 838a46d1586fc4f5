"""Search space of multi-task loss weighting (only for configs with several targets)."""
from __future__ import annotations

from typing import Optional, Sequence


def multitask_space(trial, targets: Sequence[str], weightings: Sequence[str],
                    fixed_weights: Optional[dict] = None, prefix: str = "multitask/") -> str:
    """``fixed``: lambda_k from config (default 1); ``tuned``: lambda_k in [0.1, 1] searched;
    ``uncertainty``: learned homoscedastic weights (nothing to search)."""
    weighting = trial.suggest_categorical(prefix + "weighting", list(weightings))
    if weighting == "tuned":
        for name in targets:
            trial.suggest_float(f"{prefix}w_{name}", 0.1, 1.0)
    return weighting  # "fixed" weights are constants: added by SearchSpace from the config
