"""What every part of the benchmark shares: its error and the files of its output folder."""

RESULTS_FILE = "results.json.gz"      # matbench's MatbenchBenchmark.as_dict(), gzip JSON
STATE_FILE = "benchmark_state.json"   # per-fold progress and the settings the benchmark started with
REPORT_FILE = "report.md"
N_OFFICIAL_FOLDS = 5


class BenchmarkError(ValueError):
    """A benchmark that cannot run as asked; the message names the task, fold or key."""
