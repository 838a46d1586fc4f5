"""Extra trees (extremely randomized trees) on the descriptor matrix (scikit-learn)."""

from __future__ import annotations

from typing import Optional

from pydantic import Field

from ..spaces.params import Categorical, Float, Int
from .base import HyperParams
from .forest import ForestFamily


class ETParams(HyperParams):
    n_estimators: int = Field(500, ge=1)
    max_depth: Optional[int] = Field(0, ge=0, description="0 (or None) = unlimited")
    min_samples_leaf: int = Field(1, ge=1)
    max_features: float = Field(0.5, gt=0.0, le=1.0, description="share of the features tried at each split")
    bootstrap: bool = False


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


class ExtraTrees(ForestFamily):
    name = "et"
    order = 30
    Params = ETParams
    PARAMS = PARAMS
    PRESETS = PRESETS


FAMILY = ExtraTrees()
DEFAULTS = FAMILY.DEFAULTS
