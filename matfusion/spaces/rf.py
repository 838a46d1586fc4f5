"""Search space of the random forest on Magpie features."""
from __future__ import annotations


def rf_space(trial, prefix: str = "rf/") -> None:
    trial.suggest_int(prefix + "n_estimators", 100, 500, step=50)
    trial.suggest_categorical(prefix + "max_depth", [0, 10, 20, 40])  # 0 = unlimited
    trial.suggest_int(prefix + "min_samples_leaf", 1, 5)
    trial.suggest_float(prefix + "max_features", 0.2, 1.0)
