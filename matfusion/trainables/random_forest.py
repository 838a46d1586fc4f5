"""Random forest on Magpie features (scikit-learn; NaN features are handled natively)."""
from __future__ import annotations

from sklearn.ensemble import RandomForestRegressor


def random_forest(*, n_estimators: int, max_depth: int | None, min_samples_leaf: int, max_features: float | str,
                  seed: int = 0, n_jobs: int = 1) -> RandomForestRegressor:
    """An unfitted ``RandomForestRegressor`` with matfusion's hyperparameter names (``max_depth``
    0 or None = unlimited; defaults: the rf family's, :class:`matfusion.families.rf.RFParams`)."""
    return RandomForestRegressor(
        n_estimators=int(n_estimators),
        max_depth=None if not max_depth else int(max_depth),
        min_samples_leaf=int(min_samples_leaf),
        max_features=max_features,
        random_state=seed,
        n_jobs=n_jobs,
    )
