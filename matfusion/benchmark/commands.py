"""The ``benchmark`` and ``report`` subcommands: their parsers and what they run."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..config_args import add_config_flags, load_config_of

BENCHMARK_EPILOG = """\
examples:
  matfusion benchmark matbench_phonons --config configs/benchmark.yaml
  matfusion benchmark matbench_phonons --config configs/benchmark.yaml --folds 0 --out results/try
  matfusion benchmark matbench_dielectric --config configs/benchmark_dielectric.yaml
  matfusion benchmark matbench_expt_gap --config configs/benchmark.yaml    composition only: the tabular families
  matfusion report results/matbench_phonons

Per fold: search the fold's training part (budget search.time_budget_s), stack the best trials
(ensemble.k per family/fusion, benchmark.max_groups groups at most), predict every test row,
record it in matbench and rewrite <out>/results.json.gz.  Running the same command again resumes
at the first unfinished fold (recorded folds are skipped).  One MLflow parent run per fold (the
fold's search; the ensemble is nested in it).  Exit status 130 when a search was interrupted.
"""


def add_parsers(subparsers) -> None:
    """Register ``benchmark`` and ``report`` on the main parser's subparsers."""
    fmt = argparse.RawDescriptionHelpFormatter
    p = subparsers.add_parser(
        "benchmark",
        formatter_class=fmt,
        epilog=BENCHMARK_EPILOG,
        help="nested cross-validation over matbench's 5 official folds: search, stack, record results.json.gz",
        description="Benchmark matfusion on a matbench v0.1 task: for each official fold, a search on the fold's\n"
        "training part, a stacked ensemble, and its predictions of the test fold recorded with matbench.",
    )
    p.add_argument("task", help="matbench task, e.g. matbench_phonons")
    p.add_argument("--config", required=True, help="YAML config (see configs/benchmark.yaml)")
    p.add_argument("--folds", default=None, help="comma-separated folds to run, e.g. 0,1 (default: all 5)")
    p.add_argument("--out", default=None, help="output folder (default: results/<task>)")
    add_config_flags(p, example="search.time_budget_s=180")
    p.add_argument("--no-report", action="store_true", help="do not write the report at the end")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    p.set_defaults(func=cmd_benchmark)

    p = subparsers.add_parser(
        "report",
        formatter_class=fmt,
        help="write the markdown report + plots of a benchmark folder",
        description="Write <out>/report.md and its PNGs from the files `matfusion benchmark` wrote there\n"
        "(results.json.gz, fold_<k>/*): per-fold and mean MAE next to the matbench leaderboard, model\n"
        "families, parity plots, search history, feature and modality importances.",
        epilog="example: matfusion report results/matbench_phonons",
    )
    p.add_argument("out", metavar="DIR", help="benchmark output folder, e.g. results/matbench_phonons")
    p.set_defaults(func=cmd_report)


def cmd_benchmark(args) -> int:
    from .runner import BenchmarkError, format_result, parse_folds, run_benchmark

    try:
        folds = parse_folds(args.folds)
        cfg = load_config_of(args)
        res = run_benchmark(
            cfg,
            args.task,
            folds=folds,
            out=Path(args.out) if args.out else None,
            progress=not args.quiet,
            report=not args.no_report,
        )
    except BenchmarkError as err:
        print(f"matfusion benchmark: error: {err}", file=sys.stderr)
        return 2
    print(format_result(res), flush=True)
    return 130 if res.interrupted else 0


def cmd_report(args) -> int:
    from .base import BenchmarkError
    from .report import write_report

    try:
        path = write_report(Path(args.out))
    except BenchmarkError as err:
        print(f"matfusion report: error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0
