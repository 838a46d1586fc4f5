"""What every part of the benchmark shares: its error, the files of its output folder (and the
state file's reading and writing), the progress printer."""

from __future__ import annotations

import json
import os
from pathlib import Path

RESULTS_FILE = "results.json.gz"  # matbench's MatbenchBenchmark.as_dict(), gzip JSON
STATE_FILE = "benchmark_state.json"  # per-fold progress and the settings the benchmark started with
REPORT_FILE = "report.md"
N_OFFICIAL_FOLDS = 5


class BenchmarkError(ValueError):
    """A benchmark that cannot run as asked; the message names the task, fold or key."""


def printer(progress: bool):
    """``print`` (flushed) with ``progress``, else a function that prints nothing."""
    return (lambda *a: print(*a, flush=True)) if progress else (lambda *a: None)


def read_state(out: Path) -> dict:
    try:
        return json.loads((out / STATE_FILE).read_text())
    except FileNotFoundError:
        return {}
    except ValueError as err:
        raise BenchmarkError(f"{out / STATE_FILE} is not valid JSON ({err}); move it aside to start afresh") from None


def write_state(out: Path, state: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".{STATE_FILE}.tmp"
    tmp.write_text(json.dumps(state, indent=2, default=str))
    os.replace(tmp, out / STATE_FILE)
