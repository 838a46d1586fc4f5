"""The ``leaderboard`` and ``mlflow-server`` subcommands: their parsers and what they run."""

from __future__ import annotations

import argparse
import sys

LEADERBOARD_EPILOG = """\
examples:
  matfusion leaderboard                      best trial of each family, latest search
  matfusion leaderboard --top 10             the 10 best trials overall
  matfusion leaderboard --all --experiment phonons-smoke

Reads the latest search (parent run with tag kind=search) of the experiment; default
experiment: the one whose search started last.  MLflow: --tracking-uri, else
$MLFLOW_TRACKING_URI, else sqlite:///mlruns.db in the working directory.
"""


def add_parsers(subparsers) -> None:
    """Register ``leaderboard`` and ``mlflow-server`` on the main parser's subparsers."""
    p = subparsers.add_parser(
        "leaderboard",
        help="print the best trials of the latest search logged to MLflow",
        description="Print the best trial of each model family (default), the top N trials "
        "or all trials of the latest search of an MLflow experiment.",
        epilog=LEADERBOARD_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--experiment", help="MLflow experiment name (default: the one whose search started last)")
    p.add_argument("--top", type=int, metavar="N", help="the N best trials overall instead of the best per family")
    p.add_argument("--all", action="store_true", help="every trial, ranked (trials without a val_mae last)")
    p.add_argument(
        "--tracking-uri",
        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlruns.db in the working directory)",
    )
    p.set_defaults(func=cmd_leaderboard)

    p = subparsers.add_parser(
        "mlflow-server",
        help="run one MLflow tracking server for a cluster (SQL backend, proxied artifacts)",
        description="Run `mlflow server` with a sqlite or PostgreSQL backend and proxied artifact "
        "storage (--serve-artifacts), on 127.0.0.1 unless --host says otherwise; print "
        "the tracking URI once it is up.  See docs/cluster.md.",
    )
    p.add_argument(
        "--backend-store-uri",
        default="sqlite:///mlruns.db",
        help="sqlite:///FILE or postgresql://USER@HOST/DB (default: sqlite:///mlruns.db here)",
    )
    p.add_argument(
        "--artifacts-destination",
        default="mlartifacts",
        help="where the server keeps proxied artifacts: a folder or s3://... (default: ./mlartifacts)",
    )
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=5000)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--allowed-hosts", help="Host headers the server accepts (mlflow's DNS-rebinding guard)")
    p.add_argument(
        "--experiment",
        action="append",
        default=[],
        metavar="NAME",
        help="create this experiment on the server (proxied artifact root) if missing; repeatable",
    )
    p.set_defaults(func=cmd_mlflow_server)


def _error(message: str) -> int:
    print(f"matfusion: error: {message}", file=sys.stderr)
    return 2


def cmd_leaderboard(args) -> int:
    from pathlib import Path

    import numpy as np
    import pandas as pd
    from mlflow.tracking import MlflowClient

    from .leaderboard import (
        LEADERBOARD_COLUMNS,
        format_group_summary,
        group_summary,
        leaderboard,
        search_trials,
    )
    from .logger import resolve_tracking_uri
    from .runs import latest_search_run

    if args.top is not None and args.top < 1:
        return _error(f"--top must be at least 1, got {args.top}")
    uri = resolve_tracking_uri(args.tracking_uri)
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///") :]).is_file():
        # do not let MLflow create an empty store as a side effect of reading one
        return _error(f"no MLflow store at {uri} (pass --tracking-uri or set $MLFLOW_TRACKING_URI)")
    client = MlflowClient(uri)
    experiments = list(client.search_experiments(max_results=50000))
    names = ", ".join(sorted(e.name for e in experiments)) or "none"
    if args.experiment:
        exp = client.get_experiment_by_name(args.experiment)
        if exp is None or exp.lifecycle_stage != "active":
            return _error(f"experiment {args.experiment!r} not found in {uri}; experiments: {names}")
        parent = latest_search_run(client, [exp.experiment_id])
        if parent is None:
            return _error(f"experiment {exp.name!r} has no search run (tag kind=search)")
    else:
        parent = latest_search_run(client, [e.experiment_id for e in experiments])
        if parent is None:
            return _error(f"no search runs (tag kind=search) in {uri}; experiments: {names}")
        exp = client.get_experiment(parent.info.experiment_id)
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
    print(
        f"search {parent.info.run_name!r} (experiment {exp.name!r}, parent run {parent.info.run_id}, "
        f"started {started}, {parent.info.status.lower()})"
    )
    print((f"{len(trials)} trials: " + ", ".join(f"{n} {s}" for s, n in counts.items())) if len(trials) else "0 trials")
    print(f"{what} by inner-validation MAE (lower is better):")
    if board.empty:
        print("  no trial has a val_mae yet")
        return 0
    table = board[LEADERBOARD_COLUMNS].copy()
    table["val_mae"] = [f"{v:.4g}" if np.isfinite(v) else "-" for v in table["val_mae"]]
    with pd.option_context("display.max_rows", None, "display.width", 160):
        print(table.to_string(index=False))
    print("\nbest of each group and the budget it used (epochs trained in total):")
    print(format_group_summary(group_summary(trials)))
    return 0


def cmd_mlflow_server(args) -> int:
    from .server import serve

    return serve(
        args.backend_store_uri,
        args.artifacts_destination,
        host=args.host,
        port=args.port,
        workers=args.workers,
        allowed_hosts=args.allowed_hosts,
        experiments=args.experiment,
    )
