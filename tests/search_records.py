"""Search records written to a real MLflow store through the search's own MlflowTrialLogger hooks,
shared by tests/tracking/test_report.py and tests/search/test_fair_scheduling.py.  Imported by the
tests like conftest (tests/ is on sys.path): ``from search_records import MAIN_TRIALS, write_search``."""

import math
from types import SimpleNamespace

from matfusion.tracking.logger import MlflowTrialLogger

CONSTANTS = {"max_epochs": 4, "seed": 0, "patience": 20, "cpus": 1, "targets": ["last phdos peak"]}


def rf(n_estimators, max_depth=10, max_features=0.5):
    return {
        "family": "rf",
        "rf": {
            "n_estimators": n_estimators,
            "max_depth": max_depth,
            "min_samples_leaf": 2,
            "max_features": max_features,
        },
        **CONSTANTS,
    }


def cgcnn(hidden, fusion="none", lr=1e-3, **fusion_hp):
    return {
        "family": "cgcnn",
        "cgcnn": {"hidden": hidden, "n_conv": 3, "lr": lr, "dropout": 0.1, "fusion": fusion, **fusion_hp},
        **CONSTANTS,
    }


# trial_id -> (config, val_mae per epoch, end): the main search, in start order
MAIN_TRIALS = {
    "rf_a": (rf(200), [0.50], "completed"),
    "cg_a": (cgcnn(64, lr=3e-3), [0.90, 0.60, 0.55, 0.58], "completed"),
    "rf_b": (rf(300, max_depth=20), [0.45], "completed"),
    "cg_b": (cgcnn(128, "early", comp_hidden=128, comp_layers=2), [0.80, 0.42, 0.40, 0.41], "completed"),
    "cg_c": (cgcnn(32, lr=1e-2), [1.20], "pruned"),
    "rf_c": (rf(400, max_features=0.9), [0.60], "completed"),
    "cg_d": (cgcnn(64, "attention", comp_hidden=64, comp_layers=1, fusion_dim=64), [0.95, 0.70], "pruned"),
    "cg_e": (cgcnn(128, lr=5e-4), [], "failed"),
}
MAIN_RANKED = ["cg_b", "rf_b", "rf_a", "cg_a", "rf_c", "cg_d", "cg_c", "cg_e"]


def write_search(client, experiment_id, trials, start_time=None, tmp_path=None):
    """A parent run like run_search's, and its trials through the real MlflowTrialLogger hooks."""
    parent = client.create_run(
        experiment_id,
        start_time=start_time,
        run_name="search-test",
        tags={"kind": "search", "dataset": "matbench_phonons", "fold": "0"},
    )
    parent_id = parent.info.run_id
    logger = MlflowTrialLogger(client.tracking_uri, experiment_id, parent_id)
    for trial_id, (config, curve, end) in trials.items():
        trial = SimpleNamespace(trial_id=trial_id, config=config, error_file=None)
        logger.on_trial_start(0, [], trial)
        best = math.inf
        for epoch, val in enumerate(curve, start=1):
            best = min(best, val)
            logger.on_trial_result(
                0,
                [],
                trial,
                {
                    "epoch": epoch,
                    "training_iteration": epoch,
                    "val_mae": val,
                    "train_loss": val * 0.8,
                    "best_val_mae": best,
                    "lr": 1e-3,
                    "trial_finished": end == "completed" and epoch == len(curve),
                },
            )
        if end == "failed":
            error = tmp_path / f"{trial_id}.error.txt"
            error.write_text("Traceback (most recent call last):\nRuntimeError: CUDA out of memory\n")
            trial.error_file = str(error)
            logger.on_trial_error(0, [], trial)
        elif end in ("completed", "pruned"):
            logger.on_trial_complete(0, [], trial)
        # anything else stays "running"
    return parent_id
