"""CLI subcommands ``ensemble``, ``export`` and ``predict``.

Wire into the main parser with ``add_parsers(subparsers)``; each subcommand sets
``args.func(args) -> int`` (the exit status).

The ``ensemble`` flags that are settings of :class:`matfusion.config.EnsembleConfig` (``--k``,
``--meta``, ``--folds``, ``--max-epochs``, ``--no-refit``, ``--no-register``) default to None /
unset: a flag not given keeps EnsembleConfig's default, and :func:`settings_from_args` builds the
validated EnsembleConfig from the given ones.  ``--context-features`` and ``--seed`` default to
:class:`~matfusion.ensembles.stacking.StackedEnsemble`'s own defaults.
"""

from __future__ import annotations

import argparse
import inspect
import sys
import typing

from ..config import EnsembleConfig
from .stacking import META_LEARNERS, StackedEnsemble

EXIT_BAD_INPUT = 2  # a bad argument, file or value
EXIT_MODEL_NOT_FOUND = 3  # the model URI, run id or folder names no model

# flag of each EnsembleConfig field the `ensemble` command sets
_FLAGS = {
    "k": "--k",
    "meta": "--meta",
    "n_folds": "--folds",
    "max_epochs": "--max-epochs",
    "refit": "--no-refit",
    "register": "--no-register",
    "coverage": "--coverage",
    "difficulty": "--difficulty",
}


def _stacking_default(name: str):
    return inspect.signature(StackedEnsemble).parameters[name].default


def settings_from_args(args) -> EnsembleConfig:
    """The :class:`~matfusion.config.EnsembleConfig` of the ``ensemble`` flags: the flags given
    override its defaults.  A value EnsembleConfig rejects raises ``ValueError`` naming the flag."""
    from pydantic import ValidationError

    given = {
        "k": args.k,
        "meta": args.meta,
        "n_folds": args.folds,
        "max_epochs": args.max_epochs,
        "coverage": args.coverage,
        "difficulty": args.difficulty,
    }
    values = {key: v for key, v in given.items() if v is not None}
    if args.no_refit:
        values["refit"] = False
    if args.no_register:
        values["register"] = False
    try:
        return EnsembleConfig(**values)
    except ValidationError as err:
        problems = []
        for e in err.errors():
            field = str(e["loc"][0]) if e["loc"] else ""
            problems.append(f"{_FLAGS.get(field, field)}: {e['msg']} (got {e['input']!r})")
        raise ValueError("; ".join(problems)) from None


def _tracking(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--tracking-uri",
        default=None,
        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or sqlite:///mlruns.db)",
    )


def add_parsers(subparsers) -> None:
    """Register ``ensemble``, ``export`` and ``predict`` on an argparse subparsers object."""
    fmt = argparse.RawDescriptionHelpFormatter
    p = subparsers.add_parser(
        "ensemble",
        formatter_class=fmt,
        help="stack the best trials of a finished search into an ensemble, evaluate, log and register it",
        description="Build an out-of-fold stacked ensemble from the latest search of an MLflow experiment.\n\n"
        "Members: the top-k trials per group (rf; each graph family x fusion) by inner-validation MAE.\n"
        "The dataset and outer fold are rebuilt from the search's config.json; every member is\n"
        "retrained K times on the fold's training rows (K-fold), the meta-learner is fitted on the\n"
        "out-of-fold predictions, and the fold's test rows are used only for the final metrics.\n"
        "The result is a nested MLflow run (kind=ensemble) and a pyfunc model registered as\n"
        "matfusion-<task>; alias 'champion' moves to it only if its test MAE is better.",
        epilog="example: matfusion ensemble --experiment phonons-smoke --k 2 --meta mae --folds 5",
    )
    p.add_argument("--experiment", required=True, help="MLflow experiment name of the search")
    d = EnsembleConfig()
    p.add_argument("--k", type=int, default=None, help=f"members per group (default {d.k})")
    p.add_argument(
        "--meta",
        choices=META_LEARNERS,
        default=None,
        help="meta-learner: mae (convex blend minimizing the out-of-fold MAE), nnls (non-negative least "
        f"squares), ridge, gbm (default {d.meta})",
    )
    p.add_argument("--folds", type=int, default=None, help=f"out-of-fold splits K (>= 2; default {d.n_folds})")
    p.add_argument(
        "--context-features",
        type=int,
        default=_stacking_default("context_features"),
        help="append the first N descriptor columns to the meta input (ridge/gbm only; default "
        f"{_stacking_default('context_features')})",
    )
    p.add_argument(
        "--coverage",
        type=float,
        default=None,
        help=f"coverage of the conformal interval lower/upper, in (0, 1) (default {d.coverage})",
    )
    p.add_argument(
        "--difficulty",
        choices=typing.get_args(EnsembleConfig.model_fields["difficulty"].annotation),
        default=None,
        help="what scales the interval per row: model (a small model of the out-of-fold |residual|), spread "
        f"(the members' spread), constant (plain conformal) (default {d.difficulty})",
    )
    p.add_argument("--families", nargs="+", default=None, help="only these families (default: all)")
    p.add_argument(
        "--max-epochs",
        type=int,
        default=None,
        help=f"epochs of the graph (GNN) members (default: {'as searched' if d.max_epochs is None else d.max_epochs})",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=_stacking_default("seed"),
        help=f"seed of the K-fold and early-stopping splits (default {_stacking_default('seed')})",
    )
    p.add_argument("--data-dir", default=None, help="data dir (default: $MATFUSION_DATA or ../shared/data)")
    p.add_argument(
        "--no-register",
        action="store_true",
        help="log the model but do not register it" + ("" if d.register else " (the default)"),
    )
    p.add_argument(
        "--no-refit",
        action="store_true",
        help="predict with the K fold models instead of refitting every weighted member on all rows"
        + ("" if d.refit else " (the default)"),
    )
    p.add_argument("--quiet", action="store_true", help="no progress output")
    _tracking(p)
    p.set_defaults(func=run_ensemble)

    p = subparsers.add_parser(
        "export",
        formatter_class=fmt,
        help="write a registered/logged ensemble model to a self-contained folder",
        description="Copy the MLflow model files of a model URI (models:/matfusion-<task>@champion,\n"
        "runs:/<run_id>/model) or an ensemble run id into DIR and write README.md (model card:\n"
        "data, folds, members and weights, metrics, seed, package versions).\n"
        "Load it later with mlflow.pyfunc.load_model(DIR) or `matfusion predict DIR ...`.",
        epilog="example: matfusion export models:/matfusion-matbench_phonons@champion --to ./phonons-model",
    )
    p.add_argument("model", metavar="RUN_OR_MODEL_URI", help="model URI or ensemble run id")
    p.add_argument("--to", required=True, metavar="DIR", help="target folder (new or empty)")
    _tracking(p)
    p.set_defaults(func=run_export)

    p = subparsers.add_parser(
        "predict",
        formatter_class=fmt,
        help="predict structures (CIF/POSCAR files, folders, CSV/JSON tables) with a model",
        description="Predict with an ensemble model (a model URI, run id or exported folder).\n"
        "INPUT: CIF/POSCAR files, folders of them, or CSV/JSON tables with a structure column\n"
        "(pymatgen dict, CIF or POSCAR text). A bad file or row is named on stderr and skipped;\n"
        "all the others are predicted. Output columns: id, prediction, std (calibrated: about 68 %\n"
        "of errors within it), lower, upper (conformal interval, --coverage), spread (the\n"
        "uncalibrated fold-model spread); a multi-target model: <column>_<target> for each target.\n"
        "Exit status: 0 done, 1 nothing to predict, 2 bad input, 3 no such model.",
        epilog="example: matfusion predict models:/matfusion-matbench_phonons@champion cifs/ --out preds.csv",
    )
    p.add_argument("model", metavar="MODEL", help="model URI, ensemble run id, or exported folder")
    p.add_argument("inputs", metavar="INPUT", nargs="+", help="files, folders or tables")
    p.add_argument("--out", default=None, help="CSV to write (default: print to stdout)")
    p.add_argument("--structure-column", default="structure", help="structure column of tables (default structure)")
    p.add_argument(
        "--coverage",
        type=float,
        default=None,
        help="coverage of the lower/upper interval, in (0, 1) (default: the model's, 0.9 unless set at fit)",
    )
    _tracking(p)
    p.set_defaults(func=run_predict)


def _set_tracking(uri) -> None:
    import mlflow

    from ..tracking.logger import resolve_tracking_uri

    mlflow.set_tracking_uri(resolve_tracking_uri(uri))


def run_ensemble(args) -> int:
    from .pipeline import build_ensemble_from_search, format_result

    try:
        settings = settings_from_args(args)
        res = build_ensemble_from_search(
            args.experiment,
            settings=settings,
            tracking_uri=args.tracking_uri,
            families=args.families,
            data_dir=args.data_dir,
            context_features=args.context_features,
            seed=args.seed,
            progress=not args.quiet,
        )
    except ValueError as err:
        print(f"matfusion ensemble: {err}", file=sys.stderr)
        return 2
    print(format_result(res), flush=True)
    return 0


def run_export(args) -> int:
    from .export import ModelNotFoundError, export_model

    _set_tracking(args.tracking_uri)
    try:
        path = export_model(args.model, args.to)
    except ModelNotFoundError as err:
        print(f"matfusion export: {err}", file=sys.stderr)
        return EXIT_MODEL_NOT_FOUND
    except (ValueError, FileExistsError) as err:
        print(f"matfusion export: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(f"exported {args.model} to {path} (model card: {path / 'README.md'})")
    return 0


def run_predict(args) -> int:
    from .export import ModelNotFoundError, predict_structures

    _set_tracking(args.tracking_uri)
    try:
        df = predict_structures(args.model, args.inputs, structure_column=args.structure_column, coverage=args.coverage)
    except ModelNotFoundError as err:
        print(f"matfusion predict: {err}", file=sys.stderr)
        return EXIT_MODEL_NOT_FOUND
    except ValueError as err:
        print(f"matfusion predict: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if args.out:
        df.to_csv(args.out, index=False)
        print(f"wrote {len(df)} predictions to {args.out}")
    else:
        print(df.to_csv(index=False), end="")
    return 0 if len(df) else 1
