"""Random forest on Magpie features (scikit-learn; NaN features are handled natively)."""
from __future__ import annotations

from sklearn.ensemble import RandomForestRegressor


def random_forest(n_estimators: int = 300, max_depth: int | None = None, min_samples_leaf: int = 1,
                  max_features: float | str = 1.0, seed: int = 0, n_jobs: int = 1) -> RandomForestRegressor:
    """An unfitted ``RandomForestRegressor`` with matfusion's hyperparameter names."""
    return RandomForestRegressor(
        n_estimators=int(n_estimators),
        max_depth=None if not max_depth else int(max_depth),
        min_samples_leaf=int(min_samples_leaf),
        max_features=max_features,
        random_state=seed,
        n_jobs=n_jobs,
    )
