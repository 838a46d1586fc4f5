"""Extra trees (extremely randomized trees) on the descriptor matrix (scikit-learn; NaN
features are handled natively, as by the random forest)."""
from __future__ import annotations

from sklearn.ensemble import ExtraTreesRegressor


def extra_trees(*, n_estimators: int, max_depth: int | None, min_samples_leaf: int, max_features: float | str,
                bootstrap: bool, seed: int = 0, n_jobs: int = 1) -> ExtraTreesRegressor:
    """An unfitted ``ExtraTreesRegressor`` with matfusion's hyperparameter names (``max_depth``
    0 or None = unlimited; defaults: the et family's, :class:`matfusion.families.et.ETParams`)."""
    return ExtraTreesRegressor(
        n_estimators=int(n_estimators),
        max_depth=None if not max_depth else int(max_depth),
        min_samples_leaf=int(min_samples_leaf),
        max_features=max_features,
        bootstrap=bool(bootstrap),
        random_state=seed,
        n_jobs=n_jobs,
    )
