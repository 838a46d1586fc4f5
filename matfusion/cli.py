"""The ``matfusion`` console script."""
from __future__ import annotations

import argparse
import logging
import os
import sys
import textwrap

# Ray must bind to loopback by default: set before anything imports ray.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from . import __version__

DESCRIPTION = """\
matfusion searches hybrid models for a materials property: a random forest on Magpie
composition features, and CGCNN / ALIGNN crystal-graph networks fused with Magpie (early,
attention or late fusion; single- or multi-task), tried in parallel under Ray Tune (Optuna
TPE proposes, ASHA stops bad trials early), with every trial logged to MLflow. The best
trials are then stacked into an ensemble, registered in MLflow, and used by `predict`.
"""

SEARCH_EPILOG = """\
examples:
  matfusion search configs/smoke.yaml
  matfusion search configs/phonons.yaml --set search.num_samples=20 --set data.fold=1
  matfusion search my.yaml --data-dir /data/matbench --address auto
  matfusion search configs/phonons.yaml --resume     continue it after a crash or Ctrl-C

Resume: --resume continues the search named by the config's `name`, stored under
search.storage_path (default ./ray_results/<name>): finished trials are kept, unfinished
ones continue from their last checkpoint, errored ones are retried from theirs, and the
same MLflow parent run and trial runs are reused.  Use the same config (data settings must
match; the search settings of the interrupted run apply).  If that folder holds nothing
restorable (the search was stopped before Ray Tune wrote its first experiment snapshot),
--resume says so and starts the search from the beginning.  Without --resume, an earlier
folder of the same name is moved aside and a new search starts.
Exit status: 0 when the search ended, 130 when it was interrupted (resumable).

Data dir: --data-dir, else $MATFUSION_DATA, else ../shared/data.
MLflow: mlflow.tracking_uri in the config, else $MLFLOW_TRACKING_URI, else sqlite:///mlruns.db
in the working directory (artifacts in ./mlartifacts).
"""


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML search config (see configs/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set search.num_samples=10 (repeatable)")
    p.add_argument("--data-dir", help="folder with the datasets (default: $MATFUSION_DATA or ../shared/data)")


def _load(args):
    from .config import load_config

    overrides = list(args.overrides)
    if getattr(args, "data_dir", None):
        overrides.append(f"data.data_dir={args.data_dir}")
    if getattr(args, "address", None):
        overrides.append(f"search.address={args.address}")
    return load_config(args.config, overrides)


def cmd_search(args) -> int:
    cfg = _load(args)  # validated before Ray starts
    from .search.ray_auth import HELP as RAY_AUTH_HELP, auth_failure, prepare_ray_auth

    prepare_ray_auth(cfg.search.address)  # token auth for an explicit HOST:PORT (before ray import)
    from .search.tuner import format_result, run_search

    try:
        result = run_search(cfg, progress=not args.quiet, resume=args.resume)
    except ConnectionError as err:
        if not auth_failure(err):
            raise
        print(f"matfusion: error: {cfg.search.address}: {RAY_AUTH_HELP}", file=sys.stderr)
        return 2
    print(format_result(result))
    if result.interrupted:
        return 130
    return ensemble_after_search(cfg, result, progress=not args.quiet)


def ensemble_after_search(cfg, result, progress: bool = True) -> int:
    """With ``ensemble.enabled``, stack the completed search ``result`` (its parent run) and
    print the ensemble's summary; 0 when done or not asked for, 1 when the ensemble failed."""
    if not cfg.ensemble.enabled or result.interrupted:
        return 0
    from .ensembles.pipeline import build_ensemble_from_search, format_result as format_ensemble

    try:
        res = build_ensemble_from_search(settings=cfg.ensemble, tracking_uri=result.tracking_uri,
                                         seed=cfg.search.seed, data_dir=cfg.data.data_dir,
                                         progress=progress, parent_run_id=result.parent_run_id)
    except ValueError as err:
        print(f"matfusion: ensemble after search {result.parent_run_id} failed: {err}", file=sys.stderr)
        return 1
    print(format_ensemble(res), flush=True)
    return 0


def cmd_featurize(args) -> int:
    cfg = _load(args)
    from .data import load_dataset
    from .data.featurize import featurize

    ds = load_dataset(cfg.data, seed=cfg.search.seed)
    print(ds.summary())
    fs = featurize(ds, cfg.features, progress=True)
    n_edges = int(fs.graphs.edge_ptr[-1]) if fs.graphs is not None else 0
    print(f"magpie {fs.magpie.shape}; graphs {0 if fs.graphs is None else len(fs.graphs)} "
          f"({n_edges} edges); from cache: {fs.from_cache}")
    return 0


def cmd_validate(args) -> int:
    cfg = _load(args)
    import yaml

    print(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    return 0


LEADERBOARD_EPILOG = """\
examples:
  matfusion leaderboard                      best trial of each family, latest search
  matfusion leaderboard --top 10             the 10 best trials overall
  matfusion leaderboard --all --experiment phonons-smoke

Reads the latest search (parent run with tag kind=search) of the experiment; default
experiment: the one whose search started last.  MLflow: --tracking-uri, else
$MLFLOW_TRACKING_URI, else sqlite:///mlruns.db in the working directory.
"""


def _leaderboard_error(message: str) -> int:
    print(f"matfusion: error: {message}", file=sys.stderr)
    return 2


def cmd_leaderboard(args) -> int:
    from pathlib import Path

    import numpy as np
    import pandas as pd
    from mlflow.tracking import MlflowClient

    from .search.mlflow_logging import resolve_tracking_uri
    from .search.report import LEADERBOARD_COLUMNS, leaderboard, search_trials

    if args.top is not None and args.top < 1:
        return _leaderboard_error(f"--top must be at least 1, got {args.top}")
    uri = resolve_tracking_uri(args.tracking_uri)
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).is_file():
        # do not let MLflow create an empty store as a side effect of reading one
        return _leaderboard_error(f"no MLflow store at {uri} (pass --tracking-uri or set $MLFLOW_TRACKING_URI)")
    client = MlflowClient(uri)
    experiments = list(client.search_experiments(max_results=50000))
    names = ", ".join(sorted(e.name for e in experiments)) or "none"
    search_filter = "tags.kind = 'search'"
    latest_first = ["attributes.start_time DESC"]
    if args.experiment:
        exp = client.get_experiment_by_name(args.experiment)
        if exp is None or exp.lifecycle_stage != "active":
            return _leaderboard_error(f"experiment {args.experiment!r} not found in {uri}; experiments: {names}")
    else:
        runs = client.search_runs([e.experiment_id for e in experiments], filter_string=search_filter,
                                  order_by=latest_first, max_results=1) if experiments else []
        if not runs:
            return _leaderboard_error(f"no search runs (tag kind=search) in {uri}; experiments: {names}")
        exp = client.get_experiment(runs[0].info.experiment_id)
    parents = client.search_runs([exp.experiment_id], filter_string=search_filter,
                                 order_by=latest_first, max_results=1)
    if not parents:
        return _leaderboard_error(f"experiment {exp.name!r} has no search run (tag kind=search)")
    parent = parents[0]
    trials = search_trials(client, exp.experiment_id, parent.info.run_id)
    if args.all:
        board = leaderboard(trials, top=args.top, per_family=False)
        what = "all trials" if args.top is None else f"top {args.top} trials"
    elif args.top is not None:
        board = leaderboard(trials, top=args.top, per_family=False)
        what = f"top {args.top} trials"
    else:
        board = leaderboard(trials, per_family=True)
        what = "best trial per family"
    counts = trials["status"].value_counts()
    started = pd.Timestamp(parent.info.start_time, unit="ms", tz="UTC").strftime("%Y-%m-%d %H:%M UTC")
    print(f"search {parent.info.run_name!r} (experiment {exp.name!r}, parent run {parent.info.run_id}, "
          f"started {started}, {parent.info.status.lower()})")
    print((f"{len(trials)} trials: " + ", ".join(f"{n} {s}" for s, n in counts.items())) if len(trials) else "0 trials")
    print(f"{what} by inner-validation MAE (lower is better):")
    if board.empty:
        print("  no trial has a val_mae yet")
        return 0
    table = board[LEADERBOARD_COLUMNS].copy()
    table["val_mae"] = [f"{v:.4g}" if np.isfinite(v) else "-" for v in table["val_mae"]]
    with pd.option_context("display.max_rows", None, "display.width", 160):
        print(table.to_string(index=False))
    return 0


def cmd_mlflow_server(args) -> int:
    from .search.mlflow_server import serve

    return serve(args.backend_store_uri, args.artifacts_destination, host=args.host, port=args.port,
                 workers=args.workers, allowed_hosts=args.allowed_hosts, experiments=args.experiment)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="matfusion", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"matfusion {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("search", help="run a hyperparameter search (Ray Tune + Optuna TPE + ASHA, logged to MLflow)",
                       description="Run the search a YAML config describes and print its leaderboard.",
                       epilog=SEARCH_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_common(p)
    p.add_argument("--address", help="connect to an existing Ray cluster (auto or HOST:PORT); "
                                     "default: start a local Ray on 127.0.0.1")
    p.add_argument("--resume", action="store_true",
                   help="continue the interrupted search of this config's name (see below); "
                        "starts afresh, saying so, if nothing is restorable")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars or progress table")
    p.set_defaults(func=cmd_search)

    p = sub.add_parser("featurize", help="load the config's dataset and build (or reuse) its cached features")
    _add_common(p)
    p.set_defaults(func=cmd_featurize)

    p = sub.add_parser("validate", help="check a config and print it with every default filled in")
    _add_common(p)
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("leaderboard", help="print the best trials of the latest search logged to MLflow",
                       description="Print the best trial of each model family (default), the top N trials "
                                   "or all trials of the latest search of an MLflow experiment.",
                       epilog=LEADERBOARD_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--experiment", help="MLflow experiment name (default: the one whose search started last)")
    p.add_argument("--top", type=int, metavar="N", help="the N best trials overall instead of the best per family")
    p.add_argument("--all", action="store_true", help="every trial, ranked (trials without a val_mae last)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else "
                                          "sqlite:///mlruns.db in the working directory)")
    p.set_defaults(func=cmd_leaderboard)

    p = sub.add_parser("mlflow-server", help="run one MLflow tracking server for a cluster (SQL backend, proxied artifacts)",
                       description="Run `mlflow server` with a sqlite or PostgreSQL backend and proxied artifact "
                                   "storage (--serve-artifacts), on 127.0.0.1 unless --host says otherwise; print "
                                   "the tracking URI once it is up.  See docs/cluster.md.")
    p.add_argument("--backend-store-uri", default="sqlite:///mlruns.db",
                   help="sqlite:///FILE or postgresql://USER@HOST/DB (default: sqlite:///mlruns.db here)")
    p.add_argument("--artifacts-destination", default="mlartifacts",
                   help="where the server keeps proxied artifacts: a folder or s3://... (default: ./mlartifacts)")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=5000)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--allowed-hosts", help="Host headers the server accepts (mlflow's DNS-rebinding guard)")
    p.add_argument("--experiment", action="append", default=[], metavar="NAME",
                   help="create this experiment on the server (proxied artifact root) if missing; repeatable")
    p.set_defaults(func=cmd_mlflow_server)
    from .ensembles.commands import add_parsers as add_ensemble_parsers

    add_ensemble_parsers(sub)
    from .ensembles.benchmark import add_parsers as add_benchmark_parsers

    add_benchmark_parsers(sub)  # benchmark, report
    return parser


def main(argv=None) -> int:
    from .config import ConfigError
    from .data.dataset import DataError

    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except (ConfigError, DataError) as err:
        print(f"matfusion: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
