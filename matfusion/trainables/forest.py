"""The scikit-learn forests of the tabular families: a random forest (``rf``) or extra trees
(extremely randomized trees, ``et``) on the descriptor matrix; NaN features are handled natively."""

from __future__ import annotations

from sklearn.ensemble import ExtraTreesRegressor, RandomForestRegressor

ESTIMATORS = {"rf": RandomForestRegressor, "et": ExtraTreesRegressor}


def forest(
    kind: str,
    *,
    n_estimators: int,
    max_depth: int | None,
    min_samples_leaf: int,
    max_features: float | str,
    bootstrap: bool | None = None,
    seed: int = 0,
    n_jobs: int = 1,
):
    """An unfitted forest of ``kind`` (rf | et) with matfusion's hyperparameter names: ``max_depth``
    0 or None = unlimited; ``bootstrap`` None keeps the estimator's own rule (rf bootstraps, et
    does not).  Values come from the family's typed parameters (:mod:`matfusion.families`)."""
    extra = {} if bootstrap is None else {"bootstrap": bool(bootstrap)}
    return ESTIMATORS[kind](
        n_estimators=int(n_estimators),
        max_depth=None if not max_depth else int(max_depth),
        min_samples_leaf=int(min_samples_leaf),
        max_features=max_features,
        random_state=seed,
        n_jobs=n_jobs,
        **extra,
    )
