"""Stacked ensembles of searched models: select members from MLflow, stack them out of fold,
evaluate on the held-out test rows, export as an MLflow pyfunc model, predict new structures.

Public API::

    select_members(client, experiment_id, parent_run_id, k=2, families=None) -> [trial config]
    StackedEnsemble(members, meta="mae", n_folds=5, context_features=0, seed=0)
        .fit(descriptors, graphs, targets, rows, graph_params)   # rows: the outer fold's training rows
        .predict(descriptors, graphs, rows, return_std=True)     # -> mean, calibrated std
        .predict_interval(descriptors, graphs, rows, coverage)   # -> mean, std, lower, upper, spread
    ConformalCalibrator(difficulty="model", coverage=0.9)      # the intervals (calibration.py)
    evaluate_ensemble(ensemble, descriptors, graphs, targets, test_rows) -> Evaluation
    log_evaluation(client, experiment_id, parent_run_id, evaluation, tags) -> run_id
    log_ensemble_model / save_ensemble_model / register_ensemble / export_model / predict_structures
    build_ensemble_from_search(experiment, ...)             # what `matfusion ensemble` runs

The MLflow run queries these use live in :mod:`matfusion.tracking.runs`; the matbench benchmark
that stacks one ensemble per fold lives in :mod:`matfusion.benchmark`.
"""

import importlib

# names -> submodule; imported on first use so that `matfusion --help` (which registers the
# commands) does not pay for importing mlflow, torch and scikit-learn
_EXPORTS = {
    "ConformalCalibrator": "calibration",
    "Evaluation": "evaluate",
    "evaluate_ensemble": "evaluate",
    "log_evaluation": "evaluate",
    "EnsemblePyfunc": "export",
    "export_model": "export",
    "log_ensemble_model": "export",
    "predict_structures": "export",
    "register_ensemble": "export",
    "save_ensemble_model": "export",
    "select_members": "select",
    "StackedEnsemble": "stacking",
    "build_ensemble_from_search": "pipeline",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
