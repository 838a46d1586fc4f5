"""``matfusion benchmark TASK``: nested cross-validation over matbench's 5 official folds.

For every official fold k of a matbench v0.1 regression task:

1. **Search** (:func:`~matfusion.search.tuner.run_search`) on the fold's training part only:
   the search splits it into train + inner validation and never trains, selects or early-stops
   on the fold's test part.  Its budget is the config's ``search.time_budget_s`` (per fold).
2. **Stack** the best trials of that search (top ``ensemble.k`` per group, at most
   ``benchmark.max_groups`` groups) out of fold on exactly the rows the search saw
   (:class:`~matfusion.ensembles.stacking.StackedEnsemble`).
3. **Predict** every test row of the fold and ``record`` the predictions (and the ensemble's
   std) in a matbench ``MatbenchBenchmark``; ``results.json.gz`` is rewritten after every fold.
4. Write the fold's files under ``<out>/fold_<k>/`` (predictions, trials, member metrics,
   feature importances, the rows used: ``rows.json``) and log them to MLflow: the fold's
   search parent run is the fold's parent run; the ensemble is a nested run of it.

Row alignment: our rows are read from ``<task>.json.gz`` with ids ``mb-<task>-NNNN``; the
test ids of each fold are matbench's own (``MatbenchTask.validation``), and before anything runs
every fold's test ids and targets are checked against matbench's ``get_test_data`` (same ids,
same targets), so predictions are recorded in matbench's order for matbench's ids.

Leakage guards (checked, not assumed): the search's dataset, fold and split are rebuilt here with
the search's own functions and checked against the search run's logged dataset hash and sizes;
the rows given to the stacking and every row the fitted ensemble reports having trained on, early
stopped on or fitted the meta-learner on must be disjoint from matbench's test ids of the fold,
else the fold fails before anything is recorded.  ``rows.json`` lists them by id.

Resume: a fold recorded in ``results.json.gz`` is skipped; a fold whose search completed is
stacked from that search's MLflow run; a fold whose search was interrupted continues it
(``run_search(resume=True)``).  ``benchmark_state.json`` keeps the per-fold progress and the
settings the benchmark started with (a different config in the same ``--out`` is refused).

Composition-only tasks (e.g. matbench_expt_gap): no crystal graphs; only the tabular families
(:data:`matfusion.families.TABULAR`) are searched, and the config's graph families are
left out with a message.

``results.json.gz`` and the matbench side: :mod:`matfusion.benchmark.matbench_io`; importances:
:mod:`matfusion.benchmark.importances`; the report: :mod:`matfusion.benchmark.report`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from ..families import TABULAR
from .base import (
    N_OFFICIAL_FOLDS,
    REPORT_FILE,
    RESULTS_FILE,
    STATE_FILE,
    BenchmarkError,
    printer,
    read_state,
    write_state,
)
from .fold import fold_config, run_fold
from .matbench_io import check_alignment, check_task, ensure_matminer_data, fold_scores, open_benchmark, recorded_folds

__all__ = [
    "BenchmarkError",
    "BenchmarkResult",
    "N_OFFICIAL_FOLDS",
    "REPORT_FILE",
    "RESULTS_FILE",
    "STATE_FILE",
    "composition_only_families",
    "fold_config",
    "format_result",
    "parse_folds",
    "prepare_config",
    "read_state",
    "run_benchmark",
    "write_state",
]

# config keys that may differ between the first call of a benchmark and its resumption
_RESUME_FREE_KEYS = (
    "data.data_dir",
    "features.n_jobs",
    "features.cache_dir",
    "search.address",
    "search.storage_path",
    "mlflow.",
)


@dataclass
class BenchmarkResult:
    task: str
    out_dir: Path
    results_path: Path
    folds_run: list = field(default_factory=list)  # folds recorded by this call
    folds_skipped: list = field(default_factory=list)  # already recorded before this call
    summaries: dict = field(default_factory=dict)  # fold -> summary dict (this call's folds)
    fold_mae: dict = field(default_factory=dict)  # fold -> test MAE, every recorded fold
    interrupted: bool = False
    report_path: Optional[Path] = None
    wall_s: float = 0.0

    @property
    def mean_mae(self) -> float:
        return float(np.mean(list(self.fold_mae.values()))) if self.fold_mae else float("nan")


# -- families -----------------------------------------------------------------------------------


def composition_only_families(families: Sequence[str], task: str) -> tuple[list, list]:
    """(kept, dropped): the tabular families of ``families`` and the others; raises
    :class:`BenchmarkError` when none is tabular."""
    kept = [f for f in families if f in TABULAR]
    dropped = [f for f in families if f not in TABULAR]
    if not kept:
        raise BenchmarkError(
            f"{task} has compositions only (no crystal structures), and none of search.families "
            f"{list(families)} works without structures; add a composition family: "
            f"{', '.join(TABULAR)}"
        )
    return kept, dropped


# -- folds --------------------------------------------------------------------------------------


def parse_folds(text: Optional[str]) -> Optional[list[int]]:
    """``"0,1,3"`` -> [0, 1, 3]; None -> None (all folds).  Names a bad item."""
    if text is None or str(text).strip() == "":
        return None
    folds = []
    for item in str(text).split(","):
        item = item.strip()
        try:
            k = int(item)
        except ValueError:
            raise BenchmarkError(f"--folds: {item!r} is not a fold number (0..{N_OFFICIAL_FOLDS - 1})") from None
        if not 0 <= k < N_OFFICIAL_FOLDS:
            raise BenchmarkError(f"--folds: fold {k} does not exist (matbench has folds 0..{N_OFFICIAL_FOLDS - 1})")
        if k not in folds:
            folds.append(k)
    return sorted(folds)


# -- config ---------------------------------------------------------------------------------------


def prepare_config(cfg, task: str):
    """The config a benchmark of ``task`` runs with: ``data.source`` set to the task (the name
    gets the task appended when the config named another source).  ``data.limit`` is refused:
    it would drop test rows; ``benchmark.train_limit`` limits the training rows instead."""
    from ..config import ConfigError

    if cfg.data.limit is not None:
        raise ConfigError(
            f"data.limit ({cfg.data.limit}) would also drop test rows of the folds; in a benchmark "
            "use benchmark.train_limit (training rows per fold; every test row is predicted)"
        )
    update = {}
    if cfg.data.source != task:
        update["name"] = f"{cfg.name}-{task}"
        print(f"benchmark of {task}: data.source {cfg.data.source!r} of the config replaced by {task}", flush=True)
    data = cfg.data.model_copy(update={"source": task, "target": None})
    return cfg.model_copy(update={**update, "data": data})


def _flat(cfg) -> dict:
    from ..tracking.logger import flatten

    return {
        k: v
        for k, v in flatten(cfg.model_dump(mode="json")).items()
        if not any(k == p or k.startswith(p) for p in _RESUME_FREE_KEYS) and k != "data.fold"
    }


# -- state (read_state / write_state: .base) ---------------------------------------------------------


def _check_same_settings(state: dict, settings: dict, out: Path) -> None:
    before = state.get("settings")
    if not before:
        return
    keys = sorted(set(before) | set(settings))
    diff = [k for k in keys if before.get(k) != settings.get(k)]
    if diff:
        shown = ", ".join(f"{k}: {before.get(k)!r} then, {settings.get(k)!r} now" for k in diff[:5])
        raise BenchmarkError(
            f"{out} holds a benchmark started with other settings ({shown}"
            f"{'' if len(diff) <= 5 else f', and {len(diff) - 5} more'}); resume it with the same "
            "config, or pass another --out"
        )


# -- one fold: matfusion.benchmark.fold.run_fold ------------------------------------------------------


# -- the benchmark ------------------------------------------------------------------------------------


def run_benchmark(
    cfg,
    task: str,
    folds: Optional[Sequence[int]] = None,
    out: Optional[Path] = None,
    progress: bool = True,
    report: bool = True,
) -> BenchmarkResult:
    """Run (or resume) the benchmark of ``task`` over ``folds`` (default all 5); see the module
    docstring.  Returns what was recorded; ``interrupted`` when a search was interrupted."""
    from matbench.constants import MBV01_KEY  # noqa: F401 - fails early without matbench

    from ..data import default_data_dir, load_dataset

    t0 = time.time()
    say = printer(progress)
    import logging

    logging.getLogger("matbench").setLevel(logging.WARNING)  # its INFO lines would drown the progress output
    check_task(task)
    cfg = prepare_config(cfg, task)
    out = Path(out) if out else Path("results") / task
    out.mkdir(parents=True, exist_ok=True)
    folds = list(range(N_OFFICIAL_FOLDS)) if folds is None else sorted(set(int(k) for k in folds))
    data_dir = Path(cfg.data.data_dir) if cfg.data.data_dir else default_data_dir()
    say(f"matbench data for scoring: MATMINER_DATA={ensure_matminer_data(task, data_dir)}")

    full = load_dataset(cfg.data, seed=cfg.search.seed)
    say(full.summary())
    if not full.has_structures:
        kept, dropped = composition_only_families(cfg.search.families, task)
        if dropped:
            say(
                f"{task} has compositions only (no crystal structures): searching the composition (tabular) "
                f"families {', '.join(kept)} only; left out {', '.join(dropped)}"
            )
            raw = cfg.model_dump(mode="json")
            raw["search"]["families"] = kept
            raw["search"]["space"] = {
                k: v for k, v in (raw["search"].get("space") or {}).items() if k.split(".")[0] in kept
            }
            from ..config import config_from_dict

            cfg = config_from_dict(raw, origin=f"benchmark of {task} (composition families)")

    state = read_state(out)
    settings = _flat(cfg)
    if state.get("task") not in (None, task):
        raise BenchmarkError(f"{out} holds a benchmark of {state.get('task')}, not {task}; use another --out")
    _check_same_settings(state, settings, out)
    state.update(
        task=task, config_name=cfg.name, settings=state.get("settings") or settings, dataset_hash=full.content_hash
    )
    if state.get("dataset_hash_first") not in (None, full.content_hash):
        raise BenchmarkError(f"{out}: the data of {task} changed since this benchmark started; use another --out")
    state.setdefault("dataset_hash_first", full.content_hash)
    write_state(out, state)

    results_path = out / RESULTS_FILE
    mb = open_benchmark(task, results_path)
    done = recorded_folds(mb, task)
    result = BenchmarkResult(task=task, out_dir=out, results_path=results_path)
    todo = [k for k in folds if k not in done]
    result.folds_skipped = [k for k in folds if k in done]
    for k in result.folds_skipped:
        say(f"fold {k}: already recorded in {results_path}; skipped")
    if todo:
        mb_task = mb.tasks_map[task]
        mb_task.load()
        test_ids = check_alignment(mb_task, full)
        say(f"matbench's test rows line up with ours on all {len(test_ids)} folds (ids and targets)")
        if not mb.user_metadata:
            from .. import __version__

            mb.add_metadata(
                {
                    "algorithm": "matfusion",
                    "matfusion_version": __version__,
                    "config": cfg.name,
                    "description": "Ray Tune + Optuna TPE + ASHA search over RF on Magpie and "
                    "CGCNN/ALIGNN (fused with Magpie), out-of-fold stacked ensemble per fold",
                }
            )
        for k in todo:
            summary = run_fold(cfg, task, k, full, mb, test_ids[k], out, state, progress=progress)
            if summary is None:
                result.interrupted = True
                break
            result.folds_run.append(k)
            result.summaries[k] = summary
    result.fold_mae = {k: float(s["mae"]) for k, s in fold_scores(mb, task).items()}
    if report and result.fold_mae:
        from .report import write_report

        result.report_path = write_report(out)
        say(f"report: {result.report_path}")
    result.wall_s = time.time() - t0
    return result


def format_result(res: BenchmarkResult) -> str:
    lines = [f"\nBenchmark of {res.task}: {len(res.fold_mae)}/{N_OFFICIAL_FOLDS} folds recorded in {res.results_path}"]
    for k in sorted(res.fold_mae):
        tag = " (this run)" if k in res.folds_run else ""
        lines.append(f"  fold {k}: test MAE {res.fold_mae[k]:.4g}{tag}")
    if res.fold_mae:
        lines.append(
            f"  mean over {len(res.fold_mae)} fold(s): {res.mean_mae:.4g}"
            + (
                ""
                if len(res.fold_mae) == N_OFFICIAL_FOLDS
                else " (not comparable to the leaderboard until all 5 folds are recorded)"
            )
        )
    if res.interrupted:
        lines.append("interrupted: run the same command again to resume at the first unfinished fold")
    if res.report_path:
        lines.append(f"report: {res.report_path}")
    lines.append(f"wall time {res.wall_s:.0f} s")
    return "\n".join(lines)
