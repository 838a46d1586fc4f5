"""Search space of extra trees (extremely randomized trees) on the descriptor matrix."""
from __future__ import annotations

from .params import Categorical, Float, Int

PARAMS = {
    "n_estimators": Int(200, 1000, step=100),
    "max_depth": Categorical((0, 20, 40)),  # 0 = unlimited
    "min_samples_leaf": Int(1, 5),
    "max_features": Float(0.2, 1.0),
    "bootstrap": Categorical((False, True)),
}
PRESETS = {
    "quick": {"n_estimators": Int(100, 300, step=50)},
    "thorough": {"n_estimators": Int(300, 2000, step=100), "min_samples_leaf": Int(1, 8)},
}
DEFAULTS = {"n_estimators": 500, "max_depth": 0, "min_samples_leaf": 1, "max_features": 0.5, "bootstrap": False}


def et_space(s) -> None:
    s.all(PARAMS)
