"""The ``matfusion`` console script: argument parsing and dispatch.

``search``, ``featurize`` and ``validate`` are registered here; each package registers its own
subcommands: ``leaderboard`` and ``mlflow-server`` (:mod:`matfusion.tracking.commands`),
``ensemble``, ``export`` and ``predict`` (:mod:`matfusion.ensembles.commands`), ``benchmark`` and
``report`` (:mod:`matfusion.benchmark.commands`).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Optional

# Ray must bind to loopback by default: set before anything imports ray.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from . import __version__
from .config_args import add_config_flags, load_config_of

# exit statuses (docs/reliability.md has the table); 130 / 143: interrupted by SIGINT / SIGTERM
EXIT_OK = 0
EXIT_ERROR = 1  # a step failed (the ensemble, a prediction), or an unexpected error (--debug shows it)
EXIT_BAD_INPUT = 2  # a bad argument, config, file or dataset
EXIT_MODEL_NOT_FOUND = 3  # the model URI, run id or folder names no model (matfusion.ensembles.commands)
EXIT_NO_TRIAL_SUCCEEDED = 4  # every trial of the search failed
EXIT_TRACKING_UNREACHABLE = 5  # the MLflow tracking server does not answer

TUNE_TRACEBACKS = "TUNE_PRINT_ALL_TRIAL_ERRORS"  # Ray Tune logs a failed trial's traceback when "1"

EXIT_CODES_HELP = """\
Exit status: 0 done; 1 a step failed or an unexpected error (--debug shows its traceback); 2 bad
input (argument, config, file, dataset, a Ray cluster's missing token); 3 no model at that URI /
run id / folder; 4 every trial of the search failed; 5 the MLflow tracking server does not
answer; 130 / 143 interrupted by SIGINT / SIGTERM.  Errors are one line on stderr
(`matfusion: error: ...`); --debug adds the traceback, and Ray Tune's for a failed trial.
"""

DESCRIPTION = """\
matfusion searches hybrid models for a materials property: random forests, extra trees and
LightGBM on composition and structure descriptors (Magpie and more), and CGCNN / ALIGNN
crystal-graph networks fused with those descriptors (early, attention, late or residual
fusion; single- or multi-task), tried in parallel under Ray Tune (Optuna
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
Interrupts: SIGINT (Ctrl-C) or SIGTERM stops the search: the trials' last checkpoints and
Ray Tune's snapshot are kept, the MLflow parent run and the unfinished trials' runs end KILLED
with status tag `interrupted`, and --resume finishes the work.  A second signal stops at once.
Failed trials: a trial that raises (diverged, out of memory, an unreadable checkpoint, any error)
ends failed with one line naming it and the reason (on stderr, and as tag `failure` on its MLflow
run); the others go on, and the summary counts the failed ones.
Exit status: 0 when the search ended and a trial succeeded, 4 when every trial failed, 5 when
the MLflow tracking server does not answer, 130 when SIGINT interrupted it, 143 when SIGTERM did.

Data dir: --data-dir, else $MATFUSION_DATA, else ../shared/data.
MLflow: mlflow.tracking_uri in the config, else $MLFLOW_TRACKING_URI, else sqlite:///mlruns.db
in the working directory (artifacts in ./mlartifacts).
"""


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML search config (see configs/)")
    add_config_flags(p)


def _load(args):
    address = getattr(args, "address", None)
    return load_config_of(args, *([f"search.address={address}"] if address else []))


def cmd_search(args) -> int:
    cfg = _load(args)  # validated before Ray starts
    from .search.ray_auth import HELP as RAY_AUTH_HELP
    from .search.ray_auth import auth_failure, prepare_ray_auth

    prepare_ray_auth(cfg.search.address)  # token auth for an explicit HOST:PORT (before ray import)
    from .search.faults import TrackingUnreachable
    from .search.tuner import format_result, run_search

    try:
        result = run_search(cfg, progress=not args.quiet, resume=args.resume)
    except TrackingUnreachable:
        raise  # main: one line, EXIT_TRACKING_UNREACHABLE
    except ConnectionError as err:
        if not auth_failure(err):
            raise
        print(f"matfusion: error: {cfg.search.address}: {RAY_AUTH_HELP}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(format_result(result), flush=True)
    from .search.interrupts import exit_status, last_signal

    if result.interrupted or last_signal() is not None:  # a signal after the last trial: no ensemble
        return exit_status(result.signal or last_signal())
    if result.n_trials and not result.n_succeeded:
        from .search.tuner import no_trial_succeeded

        print(f"matfusion: error: {no_trial_succeeded(result)}", file=sys.stderr, flush=True)
        return EXIT_NO_TRIAL_SUCCEEDED
    rc, ensemble = stack_after_search(cfg, result, progress=not args.quiet)
    if ensemble is None:
        return rc
    return use_the_model(cfg, result, ensemble)


def ensemble_after_search(cfg, result, progress: bool = True) -> int:
    """With ``ensemble.enabled``, stack the completed search ``result`` (its parent run) and
    print the ensemble's summary; 0 when done or not asked for, 1 when the ensemble failed."""
    return stack_after_search(cfg, result, progress)[0]


def stack_after_search(cfg, result, progress: bool = True):
    """(exit status, EnsembleResult or None) of :func:`ensemble_after_search`."""
    if not cfg.ensemble.enabled or result.interrupted:
        return 0, None
    if result.tracking_unsent:  # stacking reads the trials from the tracking server, which did not come back
        # what the server never got goes with this process, and `matfusion ensemble --experiment` would
        # stack the latest *completed* search of the experiment (this one's parent run stays RUNNING)
        print(
            "matfusion: warning: the search's ensemble is not built (ensemble.enabled): the tracking server did "
            "not answer, and the trial results it did not get are not kept; to stack this search, run it again "
            "once the server answers (`matfusion ensemble --experiment " + result.name + "` would stack the "
            "experiment's latest completed search, not this one)",
            file=sys.stderr,
            flush=True,
        )
        return 0, None
    from .ensembles.pipeline import build_ensemble_from_search
    from .ensembles.pipeline import format_result as format_ensemble

    try:
        res = build_ensemble_from_search(
            settings=cfg.ensemble,
            tracking_uri=result.tracking_uri,
            seed=cfg.search.seed,
            data_dir=cfg.data.data_dir,
            progress=progress,
            parent_run_id=result.parent_run_id,
        )
    except ValueError as err:
        print(f"matfusion: ensemble after search {result.parent_run_id} failed: {err}", file=sys.stderr)
        return 1, None
    print(format_ensemble(res), flush=True)
    return 0, res


def use_the_model(cfg, result, res) -> int:
    """The end of the story after a search and its ensemble ``res``: predict the held-out
    structures with the registered champion (else the ensemble's own model) and say what to
    run next; 0, or 1 when the prediction failed."""
    model_uri = f"models:/matfusion-{res.task}@champion" if res.version else res.model_uri
    out_dir = Path(cfg.search.storage_path).resolve().parent if cfg.search.storage_path else Path.cwd()
    try:
        predicted = predict_unseen(cfg, model_uri, out_dir / "predictions")
    except (ValueError, OSError) as err:
        print(f"matfusion: predicting the held-out structures with {model_uri} failed: {err}", file=sys.stderr)
        return 1
    print(next_steps(result, model_uri, predicted), flush=True)
    return 0


def predict_unseen(cfg, model_uri: str, out_dir: Path) -> Path:
    """Predict, with ``model_uri``, the structures of the search's held-out test part (which no
    trial, no stacking and no calibration saw), as a user would: they are written to a table
    (``<name>-unseen.csv``: id, structure as a pymatgen dict), which ``matfusion predict``'s
    reader loads, and the predictions (``<name>-predictions.csv``: id, prediction, std, and the
    known target beside them) are written and summarized.  Returns the predictions' path."""
    import json

    import numpy as np
    import pandas as pd

    from .data import load_dataset
    from .data.prepare import fold_split
    from .ensembles.export import predict_structures

    dataset = load_dataset(cfg.data, seed=cfg.search.seed)
    rows = fold_split(cfg, dataset).test
    out_dir.mkdir(parents=True, exist_ok=True)
    table = out_dir / f"{cfg.name}-unseen.csv"
    pd.DataFrame(
        {"id": [dataset.ids[i] for i in rows], "structure": [json.dumps(dataset.structures[i].as_dict()) for i in rows]}
    ).to_csv(table, index=False)
    pred = predict_structures(model_uri, [table])
    known = pd.DataFrame({"id": [dataset.ids[i] for i in rows], "target": np.asarray(dataset.targets)[rows].tolist()})
    if np.asarray(dataset.targets).ndim == 1:
        pred = pred.merge(known.rename(columns={"target": dataset.target_name}), on="id", how="left")
    path = out_dir / f"{cfg.name}-predictions.csv"
    pred.to_csv(path, index=False)
    line = f"\npredicted {len(pred)} structures the model never saw (the held-out test part) with {model_uri}: {path}"
    if dataset.target_name in pred and "prediction" in pred:
        err = (pred["prediction"] - pred[dataset.target_name]).abs()
        line += f"; MAE {err.mean():.4g}, median std {pred['std'].median():.4g}"
    print(line, flush=True)
    return path


def next_steps(result, model_uri: str, predicted: Path) -> str:
    """What to run next: the MLflow UI on the search's runs, predict and export with the model."""
    from .search.tuner import mlflow_executable, ui_lines

    exe = Path(mlflow_executable()).with_name("matfusion")
    exe = str(exe) if exe.is_file() else "matfusion"
    lines = ["\nNext:"]
    lines += ["  " + line.strip() for line in ui_lines(result.tracking_uri, result.experiment_id)]
    lines += [
        f"  predict your own structures:  {exe} predict {model_uri} my_cifs/ --out preds.csv",
        f"  export the model (a folder with its model card):  {exe} export {model_uri} --to exported/",
        f"  (the held-out structures and their predictions: {predicted.with_name(predicted.name.replace('-predictions', '-unseen'))}, {predicted})",
    ]
    return "\n".join(lines)


def cmd_featurize(args) -> int:
    cfg = _load(args)
    from .data import load_dataset
    from .data.featurize import featurize

    ds = load_dataset(cfg.data, seed=cfg.search.seed)
    print(ds.summary())
    fs = featurize(ds, cfg.features, progress=True)
    n_edges = int(fs.graphs.edge_ptr[-1]) if fs.graphs is not None else 0
    print(
        f"descriptors {fs.descriptors.shape}; graphs {0 if fs.graphs is None else len(fs.graphs)} "
        f"({n_edges} edges); from cache: {fs.from_cache}"
    )
    return 0


def cmd_validate(args) -> int:
    """Check the config, then its data: the source exists and loads (its rows counted, every skip
    named, at most 20 lines on stderr), the searched families and descriptor sets fit it.  Prints
    the config with its defaults on stdout; 0 when usable, 2 when not."""
    shown = 20  # the most skip / load messages printed
    cfg = _load(args)
    import yaml

    from .data import load_dataset
    from .data.descriptors import resolve_sets
    from .data.prepare import check_structures

    data_log = logging.getLogger("matfusion.data")
    level = data_log.level
    data_log.setLevel(logging.ERROR)  # each skip is printed once below, not logged as well
    try:
        ds = load_dataset(cfg.data, seed=cfg.search.seed)  # DataError: one line, exit 2 (main)
    finally:
        data_log.setLevel(level)
    try:
        check_structures(ds, cfg.search.families)
        resolve_sets(cfg.features.descriptors, ds.has_structures)
    except ValueError as err:
        print(f"matfusion: error: {err}", file=sys.stderr)
        return 2
    print(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    print(f"data: {ds.summary()}", file=sys.stderr)
    for message in ds.messages[:shown]:
        print(f"  {message}", file=sys.stderr)
    if len(ds.messages) > shown:
        print(f"  ... and {len(ds.messages) - shown} more", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="matfusion", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"matfusion {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error (else one line)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser(
        "search",
        help="run a hyperparameter search (Ray Tune + Optuna TPE + ASHA, logged to MLflow)",
        description="Run the search a YAML config describes and print its leaderboard.",
        epilog=SEARCH_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_common(p)
    p.add_argument(
        "--address",
        help="connect to an existing Ray cluster (auto or HOST:PORT); default: start a local Ray on 127.0.0.1",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the interrupted search of this config's name (see below); "
        "starts afresh, saying so, if nothing is restorable",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars or progress table")
    p.set_defaults(func=cmd_search)

    p = sub.add_parser("featurize", help="load the config's dataset and build (or reuse) its cached features")
    _add_common(p)
    p.set_defaults(func=cmd_featurize)

    p = sub.add_parser("validate", help="check a config and print it with every default filled in")
    _add_common(p)
    p.set_defaults(func=cmd_validate)

    from .tracking.commands import add_parsers as add_tracking_parsers

    add_tracking_parsers(sub)  # leaderboard, mlflow-server
    from .ensembles.commands import add_parsers as add_ensemble_parsers

    add_ensemble_parsers(sub)
    from .benchmark.commands import add_parsers as add_benchmark_parsers

    add_benchmark_parsers(sub)  # benchmark, report
    for command in sub.choices.values():  # `matfusion search CONFIG --debug` as well as `matfusion --debug ...`
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        command.epilog = f"{command.epilog}\n\n{EXIT_CODES_HELP}" if command.epilog else EXIT_CODES_HELP
    return parser


def error_line(err: BaseException) -> str:
    """An error as one line: its message's lines joined (PyYAML's, for one, spans several)."""
    text = " ".join(line.strip() for line in str(err).splitlines() if line.strip())
    return text or type(err).__name__


def exit_code_of(err: BaseException) -> int:
    """The exit status of an error that reached :func:`main`."""
    from .config import ConfigError
    from .data.dataset import DataError
    from .search.faults import TrackingUnreachable

    if isinstance(err, (ConfigError, DataError)):
        return EXIT_BAD_INPUT
    if isinstance(err, TrackingUnreachable):
        return EXIT_TRACKING_UNREACHABLE
    return EXIT_ERROR


def report_error(err: BaseException, debug: bool) -> int:
    """Print ``err`` as one line on stderr (with ``debug``: its traceback first); its exit status."""
    import traceback

    if debug:
        traceback.print_exception(err, file=sys.stderr)
    code = exit_code_of(err)
    expected = code != EXIT_ERROR  # a bad input or an unreachable server: its own message says it all
    line = error_line(err) if expected else f"{type(err).__name__}: {error_line(err)}"
    hint = "" if expected or debug else " (an unexpected error: run with --debug for its traceback)"
    print(f"matfusion: error: {line}{hint}", file=sys.stderr, flush=True)
    return code


def tracking_store_of(args) -> Optional[str]:
    """The MLflow tracking URI a command is about to read (``leaderboard``, ``ensemble``, and
    ``export`` / ``predict`` of a model that is no exported folder), else None."""
    if not hasattr(args, "tracking_uri"):
        return None
    model = getattr(args, "model", None)
    if model is not None and Path(model).exists():  # an exported folder: no tracking store
        return None
    from .tracking.logger import resolve_tracking_uri

    return resolve_tracking_uri(args.tracking_uri)


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    debug = bool(getattr(args, "debug", False))
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_BAD_INPUT
    from .search.interrupts import command_signals, exit_status, last_signal, signal_name

    saved = os.environ.get(TUNE_TRACEBACKS)
    if debug:  # Ray Tune's traceback of a failed trial too (read when a search starts)
        os.environ[TUNE_TRACEBACKS] = "1"
    try:
        uri = tracking_store_of(args)
        if uri:  # a tracking server that does not answer: one line at once, not MLflow's minutes of retries
            from .search.faults import check_tracking_server

            check_tracking_server(uri, "--tracking-uri, else $MLFLOW_TRACKING_URI")
        with command_signals():  # SIGTERM like Ctrl-C: the command's clean-up runs, then exit 143
            rc = args.func(args)
    except KeyboardInterrupt as err:  # SIGINT, or SIGTERM as SearchInterrupted, before or after the trials ran
        signum = getattr(err, "signum", None) or last_signal()
        print(f"matfusion: interrupted ({signal_name(signum)})", file=sys.stderr, flush=True)
        return exit_status(signum)
    except Exception as err:  # noqa: BLE001 - every error is one line (and its traceback with --debug)
        return report_error(err, debug)
    finally:
        if debug and saved is None:
            os.environ.pop(TUNE_TRACEBACKS, None)
        elif debug:
            os.environ[TUNE_TRACEBACKS] = saved
    if rc == 130 and last_signal() is not None:  # e.g. `benchmark`: its search was interrupted by this signal
        return exit_status(last_signal())
    return rc


if __name__ == "__main__":
    sys.exit(main())
