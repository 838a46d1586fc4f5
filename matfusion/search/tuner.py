"""Wire a search: data -> features -> Ray Tune (OptunaSearch TPE + ASHA) -> MLflow -> leaderboard.

The search sees only the inner train and validation parts of the fold.  After it, the best
trial (by inner-validation MAE) is evaluated once on the test part, for information only:
that number never feeds back into any choice.
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

# Keep every Ray port on loopback unless the user points us at a cluster.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # use the trimmed CLIReporter table below
# per-epoch checkpoints of small models make Tune snapshot often; that is expected, not a problem
os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")

import numpy as np
import pandas as pd

from .. import __version__
from ..config import Config
from ..data import load_dataset, split_fold
from ..data.featurize import featurize
from ..spaces import define_search_space
from ..trainables.loop import target_stats, validation_score
from ..trainables.trial import predict_from_checkpoint, run_trial
from ..trainables.trial_data import pack_rows, pack_trial_data
from .mlflow_logging import MlflowTrialLogger, ensure_experiment, flatten, resolve_tracking_uri

log = logging.getLogger("matfusion.search")

LEADERBOARD_COLUMNS = ["trial_id", "family", "val_mae", "epochs", "status"]


@dataclass
class SearchResult:
    name: str
    experiment_id: str
    parent_run_id: str
    tracking_uri: str
    leaderboard: pd.DataFrame
    best_config: Optional[dict]
    best_val_mae: float
    best_test_mae: float
    wall_s: float


def _git_commit() -> str:
    try:
        root = Path(__file__).resolve().parents[2]
        return subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                              text=True, timeout=5).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def init_ray(address: Optional[str], num_cpus: Optional[int] = None) -> None:
    import ray

    if ray.is_initialized():
        return
    if address:
        ray.init(address=address, log_to_driver=False)
    else:
        ray.init(num_cpus=num_cpus or os.cpu_count(), include_dashboard=False, log_to_driver=False)


def trial_resources(cfg: Config) -> dict:
    """cpu per trial from config; gpu from config, else a share of one GPU when the cluster has any."""
    import ray

    gpus = cfg.search.gpus_per_trial
    if gpus is None:
        has_gpu = ray.cluster_resources().get("GPU", 0) > 0
        gpus = round(1.0 / cfg.search.max_concurrent, 3) if has_gpu else 0.0
    res = {"cpu": cfg.search.cpus_per_trial}
    if gpus:
        res["gpu"] = gpus
    return res


def target_names(dataset) -> list[str]:
    """One name per target column (multi-target tables join their names with commas)."""
    n = 1 if dataset.targets.ndim == 1 else dataset.targets.shape[1]
    names = [t.strip() for t in str(dataset.target_name).split(",")]
    return names if len(names) == n else [f"t{k}" for k in range(n)]


def trial_statuses(client, experiment_id: str, parent_id: str) -> dict:
    """trial_id -> status tag of the nested runs of a search."""
    runs = client.search_runs([experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_id}'",
                              max_results=10000)
    return {r.data.tags.get("trial_id"): r.data.tags.get("status", "?") for r in runs}


def run_search(cfg: Config, progress: bool = True) -> SearchResult:
    """Run the search that ``cfg`` describes and return its leaderboard."""
    import mlflow
    from mlflow.tracking import MlflowClient
    from optuna.samplers import TPESampler
    from ray import tune
    from ray.tune import CheckpointConfig, CLIReporter, FailureConfig, RunConfig, TuneConfig, Tuner
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    t0 = time.time()
    s = cfg.search
    # -- data and features (driver side, cached)
    dataset = load_dataset(cfg.data, seed=s.seed)
    print(dataset.summary(), flush=True)
    graph_families = [f for f in s.families if f != "rf"]
    if graph_families and not dataset.has_structures:
        raise ValueError(f"{dataset.name} has compositions only; family '{graph_families[0]}' needs crystal "
                         "structures (use search.families: [rf])")
    targets = target_names(dataset)
    constants = {"max_epochs": s.max_epochs, "seed": s.seed, "patience": s.early_stopping_patience,
                 "cpus": s.cpus_per_trial, "targets": targets}
    space = define_search_space(s.families, constants, fusions=s.fusions, targets=targets,
                                task_weighting=s.task_weighting, task_weights=s.task_weights)
    split = split_fold(dataset, cfg.data.fold, cfg.data.val_fraction, seed=s.seed, n_folds=cfg.data.n_folds)
    # ALIGNN needs each graph's line graph, built (and cached) with the graphs
    features_cfg = cfg.features.model_copy(update={"line_graph": True}) if "alignn" in s.families else cfg.features
    features = featurize(dataset, features_cfg, progress=progress)
    data = pack_trial_data(features.magpie, features.graphs, dataset.targets, split.train, split.val,
                           gaussian_bins=cfg.features.gaussian_bins, gaussian_width=cfg.features.gaussian_width)
    test_part = pack_rows(features.magpie, features.graphs, dataset.targets, split.test)
    print(f"fold {split.fold}: train {len(split.train)}, inner val {len(split.val)}, "
          f"test {len(split.test)} (held out)", flush=True)

    # -- MLflow parent run
    tracking_uri = resolve_tracking_uri(cfg.mlflow.tracking_uri)
    mlflow.set_tracking_uri(tracking_uri)
    client = MlflowClient(tracking_uri)
    experiment_name = cfg.mlflow.experiment or cfg.name
    experiment_id = ensure_experiment(client, experiment_name, cfg.mlflow.artifact_location)
    parent = client.create_run(experiment_id, run_name=f"search-{cfg.name}", tags={
        "kind": "search", "dataset": dataset.name, "fold": str(split.fold),
        "dataset_hash": dataset.content_hash, "git_commit": _git_commit(),
        "matfusion_version": __version__,
    })
    parent_id = parent.info.run_id
    config_dict = cfg.model_dump(mode="json")
    from mlflow.entities import Metric, Param

    client.log_batch(parent_id, params=[Param(k, str(v)[:6000]) for k, v in flatten(config_dict).items()] + [
        Param("n_train", str(len(split.train))), Param("n_val", str(len(split.val))),
        Param("n_test", str(len(split.test))), Param("n_rows", str(len(dataset))),
    ])
    for reason, n in dataset.skipped.items():
        client.set_tag(parent_id, f"skipped.{reason}", str(n))
    client.log_dict(parent_id, config_dict, "config.json")

    # -- Ray Tune
    init_ray(s.address)
    resources = trial_resources(cfg)
    searcher = ConcurrencyLimiter(
        OptunaSearch(space=space, metric="val_mae", mode="min", sampler=TPESampler(seed=s.seed, n_startup_trials=min(5, s.num_samples))),
        max_concurrent=s.max_concurrent,
    )
    scheduler = ASHAScheduler(time_attr="training_iteration", metric="val_mae", mode="min", max_t=s.max_epochs,
                              grace_period=s.grace_period, reduction_factor=s.reduction_factor)
    mlflow_logger = MlflowTrialLogger(tracking_uri, experiment_id, parent_id)
    storage = Path(s.storage_path or "ray_results").resolve()
    reporter = CLIReporter(
        metric_columns={"epoch": "epoch", "val_mae": "val_mae", "best_val_mae": "best"},
        parameter_columns={"family": "family"}, max_report_frequency=15, sort_by_metric=True,
    )
    tuner = Tuner(
        tune.with_resources(tune.with_parameters(run_trial, data=data), resources),
        tune_config=TuneConfig(search_alg=searcher, scheduler=scheduler,
                               num_samples=s.num_samples, time_budget_s=s.time_budget_s),
        run_config=RunConfig(
            name=cfg.name, storage_path=str(storage), callbacks=[mlflow_logger],
            checkpoint_config=CheckpointConfig(num_to_keep=1),
            failure_config=FailureConfig(max_failures=0), progress_reporter=reporter,
            verbose=1 if progress else 0,
        ),
    )
    try:
        results = tuner.fit()
    except BaseException:
        client.set_tag(parent_id, "status", "failed")
        client.set_terminated(parent_id, "FAILED")
        raise

    # -- leaderboard and the best trial's test MAE (information only)
    statuses = trial_statuses(client, experiment_id, parent_id)
    rows, best = [], None
    for r in results:
        if r.config is None:
            continue
        df = r.metrics_dataframe
        val = float(df["val_mae"].min()) if df is not None and "val_mae" in df else float("nan")
        epochs = int(df["epoch"].max()) if df is not None and "epoch" in df else 0
        trial_id = (r.metrics or {}).get("trial_id", Path(r.path).name if r.path else "?")
        status = statuses.get(trial_id, "failed" if r.error else "completed")
        rows.append({"trial_id": trial_id, "family": r.config.get("family"), "val_mae": val,
                     "epochs": epochs, "status": status})
        if r.error is None and np.isfinite(val) and r.checkpoint is not None and (best is None or val < best[0]):
            best = (val, r)
    board = pd.DataFrame(rows, columns=LEADERBOARD_COLUMNS).sort_values("val_mae", na_position="last").reset_index(drop=True)

    best_val = best_test = float("nan")
    best_config = None
    if best is not None:
        best_val, best_result = best
        best_config = best_result.config
        with best_result.checkpoint.as_directory() as d:
            pred = predict_from_checkpoint(best_config, d, test_part, data["graph_params"])
        y_test = np.asarray(test_part["y"], dtype=np.float64)
        _, train_std = target_stats(data["train"]["y"])
        best_test, _ = validation_score(np.asarray(pred).reshape(len(y_test), -1), y_test.reshape(len(y_test), -1), train_std)
    wall = time.time() - t0

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "leaderboard.csv"
        board.to_csv(path, index=False)
        client.log_artifact(parent_id, str(path))
    now = int(time.time() * 1000)
    metrics = [Metric("wall_s", wall, now, 0), Metric("n_trials", float(len(board)), now, 0)]
    if np.isfinite(best_val):
        metrics += [Metric("best_val_mae", best_val, now, 0), Metric("best_test_mae_info", best_test, now, 0)]
    client.log_batch(parent_id, metrics=metrics)
    if best_config is not None:
        client.log_dict(parent_id, best_config, "best_config.json")
        client.set_tag(parent_id, "best_family", str(best_config.get("family")))
    client.set_tag(parent_id, "status", "completed")
    client.set_terminated(parent_id, "FINISHED")
    return SearchResult(cfg.name, experiment_id, parent_id, tracking_uri, board, best_config,
                        best_val, best_test, wall)


def format_result(res: SearchResult) -> str:
    lines = [f"\nLeaderboard of search {res.name!r} (inner-validation MAE; lower is better):"]
    with pd.option_context("display.max_rows", 50, "display.width", 120):
        lines.append(res.leaderboard.to_string(index=False, float_format=lambda x: f"{x:.4g}"))
    if res.best_config is not None:
        lines.append(f"\nbest trial: family={res.best_config.get('family')} val_mae={res.best_val_mae:.4g}; "
                     f"its test MAE (information only, not used for any choice) = {res.best_test_mae:.4g}")
    lines.append(f"wall time {res.wall_s:.1f} s; MLflow experiment {res.experiment_id}, parent run {res.parent_run_id}")
    uri = res.tracking_uri
    if uri.startswith("sqlite:") or uri.startswith("postgresql") or uri.startswith("mysql"):
        lines.append(f"Open the MLflow UI:  mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000")
    else:
        lines.append(f"Open the MLflow UI at {uri}")
    return "\n".join(lines)
