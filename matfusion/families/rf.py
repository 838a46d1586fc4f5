"""The random forest on the descriptor matrix (scikit-learn; NaN features handled natively)."""

from __future__ import annotations

from typing import Optional

from pydantic import Field

from ..spaces.params import Categorical, Float, Int
from .base import HyperParams
from .forest import ForestFamily


class RFParams(HyperParams):
    n_estimators: int = Field(300, ge=1)
    max_depth: Optional[int] = Field(0, ge=0, description="0 (or None) = unlimited")
    min_samples_leaf: int = Field(1, ge=1)
    max_features: float = Field(0.35, gt=0.0, le=1.0, description="share of the features tried at each split")


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


class RandomForest(ForestFamily):
    name = "rf"
    order = 10
    Params = RFParams
    PARAMS = PARAMS
    PRESETS = PRESETS


FAMILY = RandomForest()
DEFAULTS = FAMILY.DEFAULTS
