"""Search space of the random forest on Magpie features."""
from __future__ import annotations

from .params import Categorical, Float, Int

PARAMS = {
    "n_estimators": Int(100, 500, step=50),
    "max_depth": Categorical((0, 10, 20, 40)),  # 0 = unlimited
    "min_samples_leaf": Int(1, 5),
    "max_features": Float(0.2, 1.0),
}
PRESETS = {
    "quick": {"n_estimators": Int(100, 200, step=50), "max_depth": Categorical((0, 20))},
    "thorough": {"n_estimators": Int(200, 1000, step=100), "min_samples_leaf": Int(1, 8)},
}
DEFAULTS = {"n_estimators": 300, "max_depth": 0, "min_samples_leaf": 1, "max_features": 0.35}


def rf_space(s) -> None:
    s.all(PARAMS)
