"""Wire a search: data -> features -> Ray Tune (OptunaSearch TPE + ASHA) -> MLflow -> leaderboard.

The search sees only the inner train and validation parts of the fold.  After it, the best
trial (by inner-validation MAE) is evaluated once on the test part, for information only:
that number never feeds back into any choice.

Resume (``run_search(cfg, resume=True)``, ``matfusion search CONFIG --resume``): the search named
``cfg.name`` under ``search.storage_path`` is continued with ``Tuner.restore``: finished trials
are kept, unfinished ones continue from their last checkpoint, errored ones are retried from
theirs; Tune restores the Optuna searcher and its counters with the experiment, so no more than
``num_samples`` trials are ever created.  The MLflow parent run of the interrupted search is
reused: its id is kept in ``<storage>/<name>/matfusion_search.json`` (written before the search
starts) and, as a fallback, found by its tag ``ray_experiment_path``.  Trial runs are found by
their ``trial_id`` tag (see :class:`MlflowTrialLogger`).  If the folder holds no restorable
experiment (killed before Tune wrote its first experiment snapshot), the search starts afresh:
the leftover folder is moved aside and the leftover MLflow runs are closed as ``interrupted``.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

# Keep every Ray port on loopback unless the user points us at a cluster.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # use our compact SearchProgress below
# per-epoch checkpoints of small models make Tune snapshot often; that is expected, not a problem
os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
# a failed trial is one line (FailureReporter below), not Tune's traceback; `matfusion --debug` sets 1
os.environ.setdefault("TUNE_PRINT_ALL_TRIAL_ERRORS", "0")

import numpy as np
import pandas as pd
from ray.tune import Callback, ProgressReporter

from .. import __version__
from ..config import Config, ConfigError, SearchConfig
from ..data import load_dataset
from ..data.parallel import usable_cores
from ..data.prepare import check_structures, prepare_fold
from ..spaces import define_search_space
from ..tracking.leaderboard import format_group_summary, group_summary, search_leaderboard
from ..tracking.logger import (
    MlflowTrialLogger,
    close_open_trial_runs,
    ensure_experiment,
    flatten,
    resolve_tracking_uri,
    trial_run_name,
)
from ..tracking.report import log_search_report
from ..tracking.runs import find_trial_run, nested_runs
from ..trainables.loop import target_stats, validation_score
from ..trainables.trial import predict_from_checkpoint, run_trial
from . import compat
from .faults import (
    TrialFailure,
    check_tracking_server,
    failure_reason,
    injected_faults,
    result_without_tracking,
    trial_error_reason,
)
from .interrupts import SearchSignals
from .schedulers import PromotingASHA, TabularAwareASHA, TargetReachedStopper, TotalEpochsStopper, rung_milestones

log = logging.getLogger("matfusion.search")

# what TPE learns from and ASHA compares at its rungs: a trial's best inner-validation MAE so far
# (its last epoch's val_mae is noisier, and after early stopping not the weights it keeps)
SCORE = "best_val_mae"
STATE_FILE = "matfusion_search.json"  # in the experiment folder: the MLflow parent run, for --resume
TUNER_FILE = "tuner.pkl"
EXPERIMENT_STATE_GLOB = "experiment_state-*.json"
SEARCHER_STATE_GLOB = "search_gen_state-*.json"


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
    resumed: bool = False
    interrupted: bool = False  # stopped before every trial ended; continue with resume=True
    experiment_path: str = ""
    signal: Optional[int] = None  # the signal that interrupted it (SIGINT, SIGTERM), if one did
    best_trial_id: Optional[str] = None
    n_trials: int = 0  # trials Tune ran (or restored), in all
    n_succeeded: int = 0  # ended without error, with a finite validation MAE
    failures: tuple = ()  # TrialFailure of every trial that ended ERROR
    tracking_unsent: str = ""  # the warning line when the tracking server did not answer again

    @property
    def n_failed(self) -> int:
        return len(self.failures)


def _git_commit() -> str:
    try:
        root = Path(__file__).resolve().parents[2]
        return (
            subprocess.run(
                ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5
            ).stdout.strip()
            or "unknown"
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def init_ray(address: Optional[str], num_cpus: Optional[int] = None) -> None:
    import ray

    if ray.is_initialized():
        return
    if address:
        ray.init(address=address, log_to_driver=False)
    else:
        ray.init(num_cpus=num_cpus or usable_cores(), include_dashboard=False, log_to_driver=False)


def trial_resources(search: SearchConfig, cluster_gpus: float = 0.0) -> dict:
    """Resources of one trial: ``cpu`` from the config; ``gpu`` from the config, else (unset)
    a 1/max_concurrent share of a GPU when the cluster has any GPU, else none."""
    gpus = search.gpus_per_trial
    if gpus is None:
        gpus = round(1.0 / search.max_concurrent, 3) if cluster_gpus and cluster_gpus > 0 else 0.0
    res = {"cpu": search.cpus_per_trial}
    if gpus:
        res["gpu"] = gpus
    return res


def cluster_gpu_count() -> float:
    import ray

    return float(ray.cluster_resources().get("GPU", 0))


def n_startup_trials(search: SearchConfig) -> int:
    return min(5, search.num_samples)


def lr_restarts(search: SearchConfig) -> list[int]:
    """Epochs after which GNN trials restart their cosine learning rate: ASHA's rung milestones
    below ``max_epochs`` when ``search.lr_schedule`` is ``rungs``, else none (one cosine cycle)."""
    if search.lr_schedule != "rungs":
        return []
    return [
        m
        for m in rung_milestones(search.max_epochs, search.grace_period, search.reduction_factor)
        if m < search.max_epochs
    ]


def build_sampler(search: SearchConfig):
    """Optuna sampler of the search: multivariate TPE (grouped by family, constant liar for the
    trials still running), or random search (``search.sampler: random``)."""
    import warnings

    from optuna.exceptions import ExperimentalWarning
    from optuna.samplers import RandomSampler, TPESampler

    if search.sampler == "random":
        return RandomSampler(seed=search.seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        return TPESampler(
            seed=search.seed,
            multivariate=True,
            group=True,
            constant_liar=True,
            n_startup_trials=n_startup_trials(search),
        )


def fair_start(search: SearchConfig, space, points_to_evaluate: Optional[list] = None) -> list[dict]:
    """The points the search starts with under its budget rule across groups: with
    ``search.min_trials_per_group`` k > 0 and at least two groups in the space, k rounds of
    round robin over the groups (:meth:`~matfusion.spaces.SearchSpace.round_robin_points`; a
    group's known-good points fill its slots first), then the known-good points left over.
    Warns once when ``num_samples`` cuts the round robin short (fewer trials, or none, for the
    groups last in its order)."""
    points = list(points_to_evaluate or [])
    k = search.min_trials_per_group
    groups = [g for g, _ in space.groups()]
    if k <= 0 or len(groups) < 2:
        return points
    points = space.round_robin_points(k, points)
    if search.num_samples < k * len(groups):
        got = {g: 0 for g in groups}
        for point in points[: search.num_samples]:
            got[space.group_of_point(point)] += 1
        short = ", ".join(f"{g} {n}" for g, n in got.items() if n < k)
        others = f" (the others {k})" if any(n >= k for n in got.values()) else ""
        print(
            f"matfusion: warning: search.num_samples ({search.num_samples}) < {len(groups)} groups x "
            f"search.min_trials_per_group ({k}): the round robin over the groups is cut short; trials per "
            f"group: {short}{others}",
            file=sys.stderr,
            flush=True,
        )
    return points


def build_searcher(search: SearchConfig, space, points_to_evaluate: Optional[list] = None):
    """OptunaSearch over the define-by-run ``space``, at most ``max_concurrent`` trials running at
    once (a trial paused at an ASHA rung does not count); trials ASHA stops or pauses at a rung
    end PRUNED in Optuna (see :mod:`.optuna_search`).  It proposes first the points of
    :func:`fair_start` (every group ``search.min_trials_per_group`` trials, in round robin, the
    known-good ``points_to_evaluate`` among them: Optuna's enqueued trials, the sampler filling in
    what a partial point leaves open), then what TPE chooses, the group included
    (``search.budget_rule: tpe``) or the group's parameters only, in the group
    :class:`~matfusion.search.optuna_search.GroupShareRule` gives (``share``)."""
    from .optuna_search import PauseAwareLimiter, PrunedAwareOptunaSearch, SharedBudgetOptunaSearch

    points = fair_start(search, space, points_to_evaluate)
    kwargs = dict(
        space=space, metric=SCORE, mode="min", sampler=build_sampler(search), points_to_evaluate=points or None
    )
    if search.budget_rule == "share" and len(space.groups()) > 1:
        searcher = SharedBudgetOptunaSearch(**kwargs, group_points=space.groups(), share_margin=search.share_margin)
    else:
        searcher = PrunedAwareOptunaSearch(**kwargs)
    return PauseAwareLimiter(searcher, max_concurrent=search.max_concurrent)


def build_scheduler(search: SearchConfig, searcher=None):
    """ASHA over epochs that leaves one-shot (tabular) trials out of its rungs, with rungs per group
    of trials (``search.asha_scope: group``; ``all``: one set for every trial), under
    ``search.asha_mode`` (Ray's stopping rule, or the paper's promotion rule with paused trials,
    told to ``searcher``), or FIFO (``search.scheduler: fifo``: every trial runs to its end)."""
    from ray.tune.schedulers import FIFOScheduler

    if search.scheduler == "fifo":
        return FIFOScheduler()
    kwargs = dict(
        time_attr="training_iteration",
        metric=SCORE,
        mode="min",
        max_t=search.max_epochs,
        grace_period=search.grace_period,
        reduction_factor=search.reduction_factor,
        scope=search.asha_scope,
    )
    if search.asha_mode == "promote":
        return PromotingASHA(
            **kwargs, on_pause=getattr(searcher, "pause", None), on_resume=getattr(searcher, "resume", None)
        )
    return TabularAwareASHA(**kwargs)


def checkpoint_epochs(search: SearchConfig) -> list[int]:
    """Epochs every trial checkpoints at besides ``checkpoint_every``: the rungs, where
    ``asha_mode: promote`` may pause a trial (it resumes from that checkpoint)."""
    if search.scheduler != "asha" or search.asha_mode != "promote":
        return []
    return rung_milestones(search.max_epochs, search.grace_period, search.reduction_factor)


def _num(value, fmt: str = "{:.4g}") -> str:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and np.isfinite(value):
        return fmt.format(value)
    return ""


class SearchProgress(ProgressReporter):
    """The live progress of a search, compact: one line per trial when it ends (its number,
    family and fusion, how it ended, its epochs and best inner-validation MAE, the search's
    best so far), and, on a terminal, one status line kept up to date in place below them
    (trials done / running / paused, what the running ones are at).  Elsewhere (a log, CI,
    ``ray job submit``) only the per-trial lines and a last summary line are written."""

    def __init__(self, stream=None, tty: Optional[bool] = None, refresh_s: float = 1.0, total: Optional[int] = None):
        self._stream = stream  # None: sys.stdout at the time of writing
        self._tty = tty  # None: whether the stream is a terminal
        self.refresh_s, self.total = refresh_s, total
        self._t0: Optional[float] = None
        self._ended: set = set()
        self._best: Optional[tuple[float, str]] = None
        self._status_shown = False
        self._last_draw = 0.0

    @property
    def stream(self):
        return self._stream or sys.stdout

    @property
    def tty(self) -> bool:
        if self._tty is not None:
            return self._tty
        return bool(getattr(self.stream, "isatty", lambda: False)())

    def __getstate__(self):  # Tune pickles the reporter into tuner.pkl; a stream does not pickle
        return {**self.__dict__, "_stream": None}

    def should_report(self, trials, done: bool = False) -> bool:
        return True  # report() decides what, if anything, is new

    def _elapsed(self) -> str:
        return f"[{time.time() - self._t0:5.0f} s]"

    @staticmethod
    def how_it_ended(trial) -> str:
        if trial.status == "ERROR":
            return "failed"
        if trial.status != "TERMINATED":
            return str(trial.status).lower()  # e.g. an interrupted search's running trials
        return "completed" if (trial.last_result or {}).get("trial_finished") else "stopped early"

    def ended_line(self, trial) -> str:
        r = trial.last_result or {}
        best = r.get("best_val_mae", r.get("val_mae"))
        if isinstance(best, (int, float)) and np.isfinite(best):
            if self._best is None or best < self._best[0]:
                self._best = (float(best), trial_run_name(trial))
        parts = [self._elapsed(), f"{trial_run_name(trial):<22}", f"{self.how_it_ended(trial):<13}"]
        if isinstance(r.get("epoch"), (int, float)):
            parts.append(f"epochs {_num(r.get('epoch'), '{:.0f}'):>3}")
        parts.append(f"best_val_mae {_num(best) or '-':>8}")
        if self._best is not None:
            parts.append(f"| search best {self._best[0]:.4g} ({self._best[1]})")
        return "  ".join(parts)

    def status_line(self, trials) -> str:
        running = [t for t in trials if t.status == "RUNNING"]
        paused = sum(t.status == "PAUSED" for t in trials)
        pending = sum(t.status == "PENDING" for t in trials)
        total = f"/{self.total}" if self.total else ""
        head = f"{self._elapsed()} {len(self._ended)}{total} ended, {len(running)} running"
        if paused:
            head += f", {paused} paused"
        if pending:
            head += f", {pending} pending"
        at = []
        for t in running:
            r = t.last_result or {}
            epoch = f" ep {_num(r.get('epoch'), '{:.0f}')}" if "epoch" in r else ""
            val = f" {_num(r.get('best_val_mae'))}" if "best_val_mae" in r else ""
            at.append(f"{trial_run_name(t)}{epoch}{val}")
        if at:
            head += ": " + "; ".join(at)
        if self._best is not None:
            head += f" | best {self._best[0]:.4g} ({self._best[1]})"
        return head

    def _write(self, text: str) -> None:
        self.stream.write(text)
        self.stream.flush()

    def _clear_status(self) -> None:
        if self._status_shown:
            self._write("\r\x1b[2K")
            self._status_shown = False

    def report(self, trials, done: bool, *sys_info: str) -> None:
        if self._t0 is None:
            self._t0 = time.time()
        ended = [t for t in trials if t.status in ("TERMINATED", "ERROR") and t.trial_id not in self._ended]
        if ended:
            self._clear_status()
            for t in ended:
                self._ended.add(t.trial_id)
                self._write(self.ended_line(t) + "\n")
        if done:
            self._clear_status()
            counts = Counter(self.how_it_ended(t) for t in trials)
            order = ["completed", "stopped early", "failed"] + sorted(
                set(counts) - {"completed", "stopped early", "failed"}
            )
            summary = ", ".join(f"{counts[k]} {k}" for k in order if counts[k]) or "no trials"
            self._write(f"{self._elapsed()} search ended: {len(trials)} trials ({summary})\n")
            return
        if self.tty and (ended or time.time() - self._last_draw >= self.refresh_s):
            width = shutil.get_terminal_size((120, 20)).columns
            self._write("\r\x1b[2K" + self.status_line(trials)[: max(20, width - 1)])
            self._status_shown, self._last_draw = True, time.time()


class FailureReporter(Callback):
    """Tune callback: when a trial fails, one line on stderr (``matfusion: trial t02 lgbm
    (ab12cd34) failed: REASON``, :func:`~matfusion.search.faults.failure_reason`) and in the
    log; the search goes on (the summary and the MLflow tags come from the results after it)."""

    def on_trial_error(self, iteration, trials, trial, **info):
        line = f"trial {trial_run_name(trial)} ({trial.trial_id}) failed: {trial_error_reason(trial)}"
        print(f"matfusion: {line}", file=sys.stderr, flush=True)
        log.info(line)


# -- experiment folder and resume --------------------------------------------------------------


def experiment_path(cfg: Config) -> Path:
    return Path(cfg.search.storage_path or "ray_results").resolve() / cfg.name


def unrestorable_reason(path: Path) -> Optional[str]:
    """None if ``path`` holds an experiment ``Tuner.restore`` can continue, else why not."""
    if not path.is_dir():
        return f"{path} does not exist"
    if not (path / TUNER_FILE).is_file():
        return f"{path} has no {TUNER_FILE}"
    if not glob.glob(str(path / EXPERIMENT_STATE_GLOB)) or not glob.glob(str(path / SEARCHER_STATE_GLOB)):
        return "it was stopped before Ray Tune wrote its first experiment snapshot"
    return None


def read_state(path: Path) -> dict:
    try:
        return json.loads((path / STATE_FILE).read_text())
    except (OSError, ValueError):
        return {}


def write_state(path: Path, state: dict) -> None:
    path.mkdir(parents=True, exist_ok=True)
    tmp = path / f".{STATE_FILE}.tmp"
    tmp.write_text(json.dumps(state, indent=2))
    os.replace(tmp, path / STATE_FILE)


def find_parent_run(client, experiment_ids: list[str], path: Path, state: dict) -> Optional[object]:
    """The MLflow parent run of the search stored at ``path``: the one named in its state file,
    else the latest parent run tagged with this experiment path that did not complete."""
    run_id = state.get("parent_run_id")
    if run_id:
        try:
            run = client.get_run(run_id)
            if run.info.lifecycle_stage == "active":
                return run
        except Exception:  # noqa: BLE001 - gone, or another store
            log.warning("parent run %s named in %s not found", run_id, path / STATE_FILE)
    if "'" in str(path):
        return None
    runs = client.search_runs(
        [e for e in experiment_ids if e],
        filter_string=f"tags.ray_experiment_path = '{path}' and tags.kind = 'search'",
        order_by=["attributes.start_time DESC"],
        max_results=50,
    )
    runs = [r for r in runs if r.data.tags.get("status") != "completed"]
    return runs[0] if runs else None


def _close_search(client, experiment_id: str, parent_id: str, status: str, run_status: str) -> None:
    close_open_trial_runs(client, experiment_id, parent_id, status, run_status)
    client.set_tag(parent_id, "status", status)
    client.set_terminated(parent_id, run_status)


def _abandon(client, path: Path, experiment_id: str) -> None:
    """Close the MLflow runs of a leftover search folder and move the folder aside."""
    state = read_state(path)
    parent = find_parent_run(client, [state.get("experiment_id"), experiment_id], path, state)
    if parent is not None and parent.info.status == "RUNNING":
        _close_search(client, parent.info.experiment_id, parent.info.run_id, "interrupted", "KILLED")
    aside = path.with_name(f"{path.name}.{time.strftime('%Y%m%d-%H%M%S')}")
    path.rename(aside)
    print(f"moved the earlier search folder aside: {aside}", file=sys.stderr, flush=True)


def snapshot_trials(path: Path) -> dict[str, str]:
    """trial_id -> status in the experiment's latest snapshot ({} if there is none)."""
    from ray.tune import ExperimentAnalysis

    quiet = logging.getLogger("ray.tune.analysis.experiment_analysis")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # it warns about trials without results; the caller knows
    try:
        trials = ExperimentAnalysis(str(path)).trials
    except Exception:  # noqa: BLE001 - no snapshot
        return {}
    finally:
        quiet.setLevel(level)
    return {t.trial_id: t.status for t in trials}


def experiment_unfinished(path: Path) -> list[str]:
    """Trial ids that the experiment's latest snapshot holds as not yet ended (Tune snapshots
    before it stops the trials of an interrupted run, so these are what a resume continues)."""
    return [t for t, status in snapshot_trials(path).items() if status not in ("TERMINATED", "ERROR")]


def discard_orphan_runs(client, experiment_id: str, parent_id: str, known: set) -> list[str]:
    """Delete the trial runs of trials the experiment snapshot does not know: started after the
    last snapshot of a killed search, they never happened for the restored search (whose
    searcher proposes them again under new ids).  MLflow deletes softly (restorable)."""
    discarded = []
    for run in nested_runs(client, experiment_id, parent_id):
        trial_id = run.data.tags.get("trial_id")
        if trial_id in known:
            continue
        client.set_tag(run.info.run_id, "status", "discarded")
        if run.info.status == "RUNNING":
            client.set_terminated(run.info.run_id, "KILLED")
        client.delete_run(run.info.run_id)
        discarded.append(trial_id)
    return discarded


def _trial_logger(tuner):
    """The MlflowTrialLogger the Tuner runs with (the unpickled one after a restore)."""
    return next((c for c in compat.tuner_callbacks(tuner) if isinstance(c, MlflowTrialLogger)), None)


def _restored_scheduler(tuner):
    """The scheduler a restored Tuner runs with (unpickled from the experiment), to log its
    rungs; None where Ray keeps it elsewhere.  A promote-mode scheduler is told of its pauses
    and resumes through the restored searcher."""
    from .optuna_search import PauseAwareLimiter

    scheduler, searcher = compat.tuner_scheduler(tuner), compat.tuner_searcher(tuner)
    if isinstance(scheduler, PromotingASHA) and isinstance(searcher, PauseAwareLimiter):
        scheduler.listen(searcher.pause, searcher.resume)  # the restored searcher
    return scheduler


# -- the search --------------------------------------------------------------------------------


@dataclass
class _ParentRun:
    """The MLflow side of a running search: its client, experiment and parent run."""

    client: object
    tracking_uri: str
    experiment_id: str
    run_id: str
    attempt: int  # 1, then one more per resume


def run_search(cfg: Config, progress: bool = True, resume: bool = False) -> SearchResult:
    """Run the search that ``cfg`` describes and return its leaderboard.  With ``resume``,
    continue the interrupted search of the same name (see the module docstring).  SIGINT or
    SIGTERM while the trials run ends it as an interrupted search (``interrupted``, ``signal``;
    resumable); before they run, or a second time, they raise
    :class:`~matfusion.search.interrupts.SearchInterrupted` (see :mod:`.interrupts`)."""
    with SearchSignals() as signals:
        return _run_search(cfg, progress, resume, signals)


def _run_search(cfg: Config, progress: bool, resume: bool, signals: SearchSignals) -> SearchResult:
    t0 = time.time()
    check_tracking_server(resolve_tracking_uri(cfg.mlflow.tracking_uri))  # before any work: one line, fast
    path = experiment_path(cfg)
    resuming = _resolve_resume(cfg, path, resume)
    dataset = _load_dataset(cfg)
    space = _define_space(cfg.search, dataset.target_names)
    prep = prepare_fold(cfg, dataset, families=cfg.search.families, progress=progress)
    split = prep.split
    print(
        f"fold {split.fold}: train {len(split.train)}, inner val {len(split.val)}, test {len(split.test)} (held out)",
        flush=True,
    )
    parent = _open_parent_run(cfg, path, prep, space, resuming)
    try:
        _start_ray(cfg.search, parent)
        trainable = _trainable(cfg.search, prep.trial_data)
        if resuming:
            tuner, scheduler = _restore_tuner(path, trainable)
        else:
            tuner, scheduler = _build_tuner(cfg, path, space, trainable, parent, progress)
            _write_new_state(cfg, path, prep, parent)
    except KeyboardInterrupt:  # before any trial ran: nothing to continue but the search itself
        _close_search(parent.client, parent.experiment_id, parent.run_id, "interrupted", "KILLED")
        raise
    with signals.during_fit():
        results, fit_s = _fit(tuner, parent)
    logger = _trial_logger(tuner)
    if logger is not None and logger.unsent_line:  # the tracking server did not answer again: Tune's results
        return result_without_tracking(cfg, results, parent, path, prep, t0, resuming, signals, logger)
    unfinished = _how_it_ended(tuner, path, parent, fit_s, interrupted=signals.interrupted)
    interrupted = signals.interrupted or bool(unfinished)
    failures = record_failures(results, parent)
    board = search_leaderboard(parent.client, parent.experiment_id, parent.run_id)
    best = None if interrupted else _best_result(results)
    best_val, best_test, best_config = _best_trial_test_mae(best, prep)
    if not interrupted:
        prune_checkpoints(path, keep=[best[1] if best else None] + [r for r in results if r.error is not None])
    wall = time.time() - t0
    _log_report(parent, scheduler, compat.tuner_searcher(tuner))
    result = search_result(
        cfg,
        parent,
        path,
        results,
        board=board,
        failures=failures,
        best=best,
        scores=(best_val, best_test, best_config),
        wall_s=wall,
        resumed=resuming,
        interrupted=interrupted,
        signals=signals,
    )
    _finish(parent, result)
    return result


def search_result(
    cfg: Config,
    parent: _ParentRun,
    path: Path,
    results,
    *,
    board: pd.DataFrame,
    failures,
    best,
    scores: tuple,
    wall_s: float,
    resumed: bool,
    interrupted: bool,
    signals: SearchSignals,
    tracking_unsent: str = "",
) -> SearchResult:
    """The :class:`SearchResult` of a search that ran: its leaderboard ``board``, the trials'
    ``failures``, ``best`` (``(val_mae, Result)`` or None) with its ``scores`` (best val MAE, test
    MAE, config), from MLflow (:func:`_run_search`) or from Tune's results when the tracking
    server did not answer again (:func:`~matfusion.search.faults.result_without_tracking`)."""
    best_val, best_test, best_config = scores
    return SearchResult(
        cfg.name,
        parent.experiment_id,
        parent.run_id,
        parent.tracking_uri,
        board,
        best_config,
        best_val,
        best_test,
        wall_s,
        resumed=resumed,
        interrupted=interrupted,
        experiment_path=str(path),
        signal=signals.signum if interrupted else None,
        best_trial_id=(best[1].metrics or {}).get("trial_id") if best else None,
        n_trials=len(results),
        n_succeeded=sum(_succeeded(r) for r in results),
        failures=tuple(failures),
        tracking_unsent=tracking_unsent,
    )


def _succeeded(result) -> bool:
    """A trial that ended without error and reported a finite validation MAE."""
    df = result.metrics_dataframe
    val = df["val_mae"] if df is not None and "val_mae" in df else []
    return result.error is None and bool(np.isfinite(np.asarray(val, dtype=np.float64)).any())


def _trial_id_of(result) -> str:
    """The trial id of a Result: in its metrics, else (a trial that failed before it reported
    anything) in its folder's name, ``<trainable>_<trial id>_<number>_...``."""
    trial_id = (result.metrics or {}).get("trial_id")
    if trial_id:
        return str(trial_id)
    found = re.match(r"run_trial_([0-9a-f]{8}(?:_\d{5})?)_", Path(result.path).name)
    return found.group(1) if found else Path(result.path).name


def record_failures(results, parent: _ParentRun) -> list[TrialFailure]:
    """The trials of the ResultGrid that ended ERROR, each with its one-line reason, which is
    tagged ``failure`` on its MLflow run (beside the logger's ``status: failed``, ``error``)."""
    failures = []
    for r in results:
        if r.error is None:
            continue
        trial_id = _trial_id_of(r)
        reason = failure_reason(r.error)
        run = find_trial_run(parent.client, parent.experiment_id, parent.run_id, trial_id)
        name = run.info.run_name if run is not None else trial_id
        if run is not None:
            parent.client.set_tag(run.info.run_id, "failure", reason)
        failures.append(TrialFailure(trial_id, name, reason))
    return sorted(failures, key=lambda f: f.run_name)


def _resolve_resume(cfg: Config, path: Path, resume: bool) -> bool:
    """Whether the search continues the experiment at ``path``: asked, and restorable (else it
    says why not and starts afresh)."""
    if not resume:
        return False
    reason = unrestorable_reason(path)
    if reason is None:
        print(f"resuming search {cfg.name!r} from {path}", flush=True)
        return True
    print(
        f"matfusion: --resume: nothing to resume for {cfg.name!r}: {reason}; starting the search from the beginning",
        file=sys.stderr,
        flush=True,
    )
    return False


def _load_dataset(cfg: Config):
    """The search's dataset (seeded by ``search.seed``), announced; refused when a searched
    family needs structures it lacks (before any featurization)."""
    dataset = load_dataset(cfg.data, seed=cfg.search.seed)
    print(dataset.summary(), flush=True)
    check_structures(dataset, cfg.search.families)
    return dataset


def _define_space(s: SearchConfig, targets: list[str]):
    """The define-by-run search space, with the constants every trial config carries."""
    constants = {
        "max_epochs": s.max_epochs,
        "seed": s.seed,
        "patience": s.early_stopping_patience,
        "cpus": s.cpus_per_trial,
        "targets": targets,
        "checkpoint_every": s.checkpoint_every,
        "lr_restarts": lr_restarts(s),
        "checkpoint_at": checkpoint_epochs(s),
    }
    return define_search_space(
        s.families,
        constants,
        fusions=s.fusions,
        targets=targets,
        task_weighting=s.task_weighting,
        task_weights=s.task_weights,
        preset=s.preset,
        overrides=s.space,
    )


def _open_parent_run(cfg: Config, path: Path, prep, space, resuming: bool) -> _ParentRun:
    """The MLflow parent run of the search: the interrupted one when resuming, else a new one."""
    import mlflow
    from mlflow.tracking import MlflowClient

    tracking_uri = resolve_tracking_uri(cfg.mlflow.tracking_uri)
    mlflow.set_tracking_uri(tracking_uri)
    client = MlflowClient(tracking_uri)
    experiment_id = ensure_experiment(client, cfg.mlflow.experiment or cfg.name, cfg.mlflow.artifact_location)
    if resuming:
        return _resumed_parent_run(cfg, path, prep, client, tracking_uri, experiment_id)
    return _new_parent_run(cfg, path, prep, space, client, tracking_uri, experiment_id)


def _resumed_parent_run(cfg: Config, path: Path, prep, client, tracking_uri: str, experiment_id: str) -> _ParentRun:
    """Find the interrupted search's parent run, check it was on the same data, mark it running
    again (one more attempt) and discard the runs of trials the snapshot does not know."""
    dataset, split = prep.dataset, prep.split
    state = read_state(path)
    parent = find_parent_run(client, [state.get("experiment_id"), experiment_id], path, state)
    if parent is None:
        raise ConfigError(
            f"cannot resume {cfg.name!r}: its MLflow parent run is not in {tracking_uri} "
            f"(looked for the run in {path / STATE_FILE} and for tag ray_experiment_path); "
            "resume with the same mlflow settings, or start a new search without --resume"
        )
    tags = parent.data.tags
    if (tags.get("dataset_hash"), tags.get("fold")) != (dataset.content_hash, str(split.fold)):
        raise ConfigError(
            f"cannot resume {cfg.name!r}: its data changed (dataset hash / fold "
            f"{tags.get('dataset_hash')}/{tags.get('fold')} then, {dataset.content_hash}/"
            f"{split.fold} now); resume with the same data settings"
        )
    parent_id, experiment_id = parent.info.run_id, parent.info.experiment_id
    attempt = int(tags.get("attempts", "1")) + 1
    if parent.info.status != "RUNNING":
        client.update_run(parent_id, status="RUNNING")
    client.set_tag(parent_id, "status", "running")
    client.set_tag(parent_id, "attempts", str(attempt))
    print(f"MLflow parent run {parent_id} (attempt {attempt})", flush=True)
    discarded = discard_orphan_runs(client, experiment_id, parent_id, set(snapshot_trials(path)))
    if discarded:
        print(
            f"discarded the MLflow runs of {len(discarded)} trial(s) started after the last "
            f"experiment snapshot: {', '.join(map(str, discarded))}",
            flush=True,
        )
    return _ParentRun(client, tracking_uri, experiment_id, parent_id, attempt)


def _new_parent_run(cfg: Config, path: Path, prep, space, client, tracking_uri: str, experiment_id: str) -> _ParentRun:
    """Close and move aside a leftover folder of the same name, then create the parent run with
    the search's tags, its flattened config and sizes as params, config and space as artifacts."""
    from mlflow.entities import Param

    dataset, split = prep.dataset, prep.split
    if path.exists() and any(path.iterdir()):
        _abandon(client, path, experiment_id)
    parent = client.create_run(
        experiment_id,
        run_name=f"search-{cfg.name}",
        tags={
            "kind": "search",
            "dataset": dataset.name,
            "fold": str(split.fold),
            "dataset_hash": dataset.content_hash,
            "git_commit": _git_commit(),
            "matfusion_version": __version__,
            "search_name": cfg.name,
            "ray_experiment_path": str(path),
            "status": "running",
            "attempts": "1",
        },
    )
    parent_id = parent.info.run_id
    config_dict = cfg.model_dump(mode="json")
    client.log_batch(
        parent_id,
        params=[Param(k, str(v)[:6000]) for k, v in flatten(config_dict).items()]
        + [
            Param("n_train", str(len(split.train))),
            Param("n_val", str(len(split.val))),
            Param("n_test", str(len(split.test))),
            Param("n_rows", str(len(dataset))),
        ],
    )
    for reason, n in dataset.skipped.items():
        client.set_tag(parent_id, f"skipped.{reason}", str(n))
    client.set_tag(parent_id, "mlflow.note.content", search_description(cfg, prep, space))  # the run's description
    client.log_dict(parent_id, config_dict, "config.json")
    client.log_dict(parent_id, space.describe(), "search_space.json")
    return _ParentRun(client, tracking_uri, experiment_id, parent_id, 1)


def search_description(cfg: Config, prep, space) -> str:
    """What the search searched, in a few markdown lines: the description of its MLflow parent
    run (the UI shows it on the run's page)."""
    s, dataset, split = cfg.search, prep.dataset, prep.split
    groups = ", ".join(g for g, _ in space.groups())
    budget = [f"at most {s.max_epochs} epochs a trial", f"{s.max_concurrent} at a time"]
    if s.time_budget_s:
        budget.append(f"time budget {s.time_budget_s:g} s")
    if s.max_total_epochs:
        budget.append(f"at most {s.max_total_epochs} epochs in all")
    rule = "FIFO" if s.scheduler == "fifo" else f"ASHA ({s.asha_mode}, per {s.asha_scope}, grace {s.grace_period})"
    descriptors = ", ".join(cfg.features.descriptors) if cfg.features.descriptors else "the default sets"
    return "\n".join(
        [
            f"**Search `{cfg.name}`** of {', '.join(dataset.target_names)} on {dataset.name} "
            f"({len(dataset)} rows), outer fold {split.fold}: train {len(split.train)}, inner validation "
            f"{len(split.val)}, test {len(split.test)} (held out: no trial sees it).",
            "",
            f"- groups searched: {groups} ({s.preset} ranges)",
            f"- {s.num_samples} trials proposed by Optuna {s.sampler.upper()} (seed {s.seed}), "
            f"stopped early by {rule} on the inner-validation MAE; " + ", ".join(budget),
            f"- descriptors: {descriptors}; crystal graphs within {cfg.features.cutoff:g} A, "
            f"{cfg.features.max_neighbors} neighbours",
            "- one nested run per trial (`tNN family-fusion`); the leaderboard (leaderboard.csv) and the "
            "plots are this run's artifacts",
        ]
    )


def _start_ray(s: SearchConfig, parent: _ParentRun) -> None:
    """Connect to (or start) Ray; on failure (e.g. the cluster refused the driver) leave no
    parent run RUNNING."""
    try:
        init_ray(s.address)
    except BaseException:
        parent.client.set_tag(parent.run_id, "error", "could not connect to Ray")
        _close_search(parent.client, parent.experiment_id, parent.run_id, "failed", "FAILED")
        raise


def _trainable(s: SearchConfig, trial_data: dict):
    """``run_trial`` with the trial data (inner train + val rows only) and its resources."""
    from ray import tune

    resources = trial_resources(s, cluster_gpu_count())
    trainable = tune.with_parameters(run_trial, data=trial_data, faults=injected_faults())
    return tune.with_resources(trainable, resources)


def _restore_tuner(path: Path, trainable):
    """The Tuner of the experiment at ``path``: searcher, scheduler, callbacks, stopper and time
    budget come back from it; unfinished trials continue, errored ones are retried."""
    from ray.tune import Tuner

    tuner = Tuner.restore(
        str(path), trainable=trainable, resume_unfinished=True, resume_errored=True, restart_errored=False
    )
    return tuner, _restored_scheduler(tuner)


def _stopper(s: SearchConfig):
    """The search-wide stop rules (total epochs, target val_mae), or None."""
    from ray.tune.stopper import CombinedStopper

    stoppers = [TotalEpochsStopper(s.max_total_epochs)] if s.max_total_epochs else []
    if s.stop_at_val_mae is not None:
        stoppers.append(TargetReachedStopper(s.stop_at_val_mae))
    return CombinedStopper(*stoppers) if stoppers else None


def _build_tuner(cfg: Config, path: Path, space, trainable, parent: _ParentRun, progress: bool):
    """A new Tuner: searcher (with the default points), scheduler, stoppers, the MLflow trial
    logger, checkpoints and retries."""
    from ray.tune import CheckpointConfig, FailureConfig, RunConfig, TuneConfig, Tuner

    s = cfg.search
    points = space.default_points() if s.points_to_evaluate else None
    searcher = build_searcher(s, space, points)
    scheduler = build_scheduler(s, searcher)
    tuner = Tuner(
        trainable,
        tune_config=TuneConfig(
            search_alg=searcher,
            scheduler=scheduler,
            num_samples=s.num_samples,
            time_budget_s=s.time_budget_s,
            reuse_actors=True,
        ),
        run_config=RunConfig(
            name=cfg.name,
            storage_path=str(path.parent),
            callbacks=[MlflowTrialLogger(parent.tracking_uri, parent.experiment_id, parent.run_id), FailureReporter()],
            stop=_stopper(s),
            checkpoint_config=CheckpointConfig(num_to_keep=1),
            failure_config=FailureConfig(max_failures=s.max_failures),
            progress_reporter=SearchProgress(total=s.num_samples),
            verbose=1 if progress else 0,
        ),
    )
    return tuner, scheduler


def _write_new_state(cfg: Config, path: Path, prep, parent: _ParentRun) -> None:
    """The state file a resume reads (written before the search starts)."""
    write_state(
        path,
        {
            "search_name": cfg.name,
            "parent_run_id": parent.run_id,
            "experiment_id": parent.experiment_id,
            "tracking_uri": parent.tracking_uri,
            "dataset_hash": prep.dataset.content_hash,
            "fold": prep.split.fold,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        },
    )


class _QuietTrialErrors(logging.Filter):
    """Drops Tune's ``Trials did not complete: [...]`` (each failed trial has had its own line)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Trials did not complete")


def _fit(tuner, parent: _ParentRun):
    """Run the search: (ResultGrid, seconds).  Ctrl-C closes the runs as ``interrupted``
    (resumable); any other error as ``failed``."""
    client, experiment_id, parent_id = parent.client, parent.experiment_id, parent.run_id
    t_fit = time.time()
    tune_log, quiet = logging.getLogger("ray.tune.tune"), _QuietTrialErrors()
    if os.environ.get("TUNE_PRINT_ALL_TRIAL_ERRORS") == "0":
        tune_log.addFilter(quiet)
    try:
        results = tuner.fit()
    except KeyboardInterrupt:
        _close_search(client, experiment_id, parent_id, "interrupted", "KILLED")
        raise
    except BaseException:
        close_open_trial_runs(client, experiment_id, parent_id, "failed", "FAILED")
        client.set_tag(parent_id, "status", "failed")
        client.set_terminated(parent_id, "FAILED")
        raise
    finally:
        tune_log.removeFilter(quiet)
    return results, time.time() - t_fit


def _how_it_ended(tuner, path: Path, parent: _ParentRun, fit_s: float, interrupted: bool = False) -> list[str]:
    """The trials left unfinished (interrupted: resumable), with their runs closed as such; or,
    when every trial ended, [] with the runs a budget cut closed as ``stopped``.  A trial the
    budget ended while it was paused at a rung (asha_mode: promote) may still be PAUSED in
    Tune's last snapshot: Tune's own final statuses tell; not so after an ``interrupted`` fit
    (a signal), where Tune stops every trial after its last snapshot: that snapshot tells."""
    client, experiment_id, parent_id = parent.client, parent.experiment_id, parent.run_id
    final = {} if interrupted else getattr(_trial_logger(tuner), "final_statuses", None) or {}
    unfinished = [t for t in experiment_unfinished(path) if final.get(t) not in ("TERMINATED", "ERROR")]
    if unfinished or interrupted:
        close_open_trial_runs(client, experiment_id, parent_id, "interrupted", "KILLED")
    else:
        stopped = close_open_trial_runs(client, experiment_id, parent_id, "stopped", "FINISHED")
        if stopped:
            log.info("trials stopped by the search budget after %.0f s: %s", fit_s, stopped)
    return unfinished


def _best_result(results):
    """(val_mae, result) of the best trial of the ResultGrid that finished without error and has
    a checkpoint (the first of equals), or None."""
    best = None
    for r in results:
        df = r.metrics_dataframe
        val = float(df["val_mae"].min()) if df is not None and "val_mae" in df else float("nan")
        if r.error is None and np.isfinite(val) and r.checkpoint is not None and (best is None or val < best[0]):
            best = (val, r)
    return best


def prune_checkpoints(path: Path, keep: Iterable = ()) -> tuple[int, int]:
    """After a completed search, delete the trial checkpoints nothing will read again: every
    ``checkpoint_*`` folder of the experiment at ``path`` but those of the results ``keep``
    (the best trial's: the model it stands for; errored trials', which ``--resume`` retries
    from theirs).  Tune keeps one checkpoint a trial while the search runs (the last, which
    holds the best weights so far too): what a resume continues from.  Stacking (``matfusion
    ensemble``) refits its members from their configs and reads no checkpoint.  Returns
    (folders deleted, bytes freed)."""
    kept = set()
    for r in keep:
        if r is not None and r.checkpoint is not None:
            kept.add(Path(r.checkpoint.path).resolve())
    n, freed = 0, 0
    for ckpt in path.glob("*/checkpoint_*"):
        if not ckpt.is_dir() or ckpt.resolve() in kept:
            continue
        size = sum(f.stat().st_size for f in ckpt.rglob("*") if f.is_file())
        shutil.rmtree(ckpt, ignore_errors=True)
        n, freed = n + 1, freed + size
    if n:
        log.info("deleted %d trial checkpoints (%.1f MB) of the completed search at %s", n, freed / 1e6, path)
    return n, freed


def _best_trial_test_mae(best, prep) -> tuple[float, float, Optional[dict]]:
    """(val MAE, test MAE, config) of the best trial: its checkpoint predicts the test part once,
    scored as the trials score validation (information only: it feeds no choice)."""
    if best is None:
        return float("nan"), float("nan"), None
    best_val, best_result = best
    best_config = best_result.config
    test_part, data = prep.test_part, prep.trial_data
    with best_result.checkpoint.as_directory() as d:
        pred = predict_from_checkpoint(best_config, d, test_part, data["graph_params"])
    y_test = np.asarray(test_part["y"], dtype=np.float64)
    _, train_std = target_stats(data["train"]["y"])
    best_test, _ = validation_score(
        np.asarray(pred).reshape(len(y_test), -1), y_test.reshape(len(y_test), -1), train_std
    )
    return best_val, best_test, best_config


def _log_report(parent: _ParentRun, scheduler, searcher=None) -> None:
    """leaderboard.csv and the plots (a report problem must not fail a finished search), ASHA's
    rungs and, under ``search.budget_rule: share``, the rule's choices (``budget_share.json``)."""
    try:
        log_search_report(parent.client, parent.run_id, parent.experiment_id)
    except Exception as err:  # noqa: BLE001
        log.warning("search report failed: %s", err)
    if isinstance(scheduler, TabularAwareASHA):
        parent.client.log_dict(parent.run_id, {"rungs": scheduler.rungs()}, "asha_rungs.json")
    rule = getattr(getattr(searcher, "searcher", searcher), "rule", None)
    if rule is not None:
        parent.client.log_dict(parent.run_id, rule.summary(), "budget_share.json")


def _finish(parent: _ParentRun, result: SearchResult) -> None:
    """Close the parent run: ``interrupted`` (KILLED), or ``completed`` with the search's
    metrics (one value per attempt), the best config and family."""
    from mlflow.entities import Metric

    client, parent_id = parent.client, parent.run_id
    if result.interrupted:
        client.set_tag(parent_id, "status", "interrupted")
        client.set_terminated(parent_id, "KILLED")
        return
    now = int(time.time() * 1000)
    step = parent.attempt - 1  # one value per attempt (a resumed search logs again)
    metrics = [
        Metric("wall_s", result.wall_s, now, step),
        Metric("n_trials", float(len(result.leaderboard)), now, step),
        Metric("n_failed", float(result.n_failed), now, step),
    ]
    if np.isfinite(result.best_val_mae):
        metrics += [
            Metric("best_val_mae", result.best_val_mae, now, step),
            Metric("best_test_mae_info", result.best_test_mae, now, step),
        ]
    client.log_batch(parent_id, metrics=metrics)
    if result.best_config is not None:
        client.log_dict(parent_id, result.best_config, "best_config.json")
        client.set_tag(parent_id, "best_family", str(result.best_config.get("family")))
    if result.best_trial_id:
        client.set_tag(parent_id, "best_trial_id", str(result.best_trial_id))
    client.set_tag(parent_id, "failed_trials", str(result.n_failed))
    if result.n_trials and not result.n_succeeded:
        client.set_tag(parent_id, "error", no_trial_succeeded(result))
        client.set_tag(parent_id, "status", "failed")
        client.set_terminated(parent_id, "FAILED")
        return
    client.set_tag(parent_id, "status", "completed")
    client.set_terminated(parent_id, "FINISHED")


def no_trial_succeeded(result: SearchResult) -> str:
    """The one line of a search none of whose trials succeeded (its first failure's reason)."""
    first = f"; first: {result.failures[0].line()}" if result.failures else ""
    return f"no trial of search {result.name!r} succeeded ({result.n_failed} of {result.n_trials} failed{first})"


def format_result(res: SearchResult) -> str:
    lines = [f"\nLeaderboard of search {res.name!r} (inner-validation MAE; lower is better):"]
    with pd.option_context("display.max_rows", 50, "display.width", 120):
        lines.append(res.leaderboard.to_string(index=False, float_format=lambda x: f"{x:.4g}"))
    if len(res.leaderboard):
        lines += [
            "\nBest of each group and the budget it used (epochs trained in total):",
            format_group_summary(group_summary(res.leaderboard)),
        ]
    if res.n_trials:
        counts = f"{res.n_succeeded} succeeded, {res.n_failed} failed"
        lines.append(f"\ntrials: {res.n_trials} ({counts})")
        lines += [f"  failed: {f.line()}" for f in res.failures]
    if res.interrupted:
        lines.append(
            f"\nthe search was interrupted before all its trials ended; continue it with "
            f"`matfusion search CONFIG --resume` (experiment {res.experiment_path})"
        )
    elif res.best_config is not None:
        lines.append(
            f"\nbest trial: family={res.best_config.get('family')} val_mae={res.best_val_mae:.4g}; "
            f"its test MAE (information only, not used for any choice) = {res.best_test_mae:.4g}"
        )
    lines.append(f"wall time {res.wall_s:.1f} s; MLflow experiment {res.experiment_id}, parent run {res.parent_run_id}")
    lines += ui_lines(res.tracking_uri, res.experiment_id)
    return "\n".join(lines)


def mlflow_executable() -> str:
    """``mlflow`` beside this Python (the venv's, which need not be on PATH), else ``mlflow``."""
    beside = Path(sys.executable).parent / "mlflow"
    return str(beside) if beside.is_file() else "mlflow"


def ui_runs_url(base: str, experiment_id: str) -> str:
    """The runs list of an experiment in the MLflow UI at ``base``: the model-training view (MLflow
    3.17 opens its GenAI overview otherwise), with the experiment's "Leaderboard" view of the runs
    table (the leaderboard's columns, best best_val_mae first; see :mod:`matfusion.tracking.ui`)."""
    from ..tracking.ui import runs_url

    return runs_url(base, experiment_id)


def ui_lines(uri: str, experiment_id: str, port: int = 5000) -> list[str]:
    """How to open the runs of the experiment in the MLflow UI: the command that serves a
    database store, then the page; or the page on a tracking server."""
    if uri.startswith(("http://", "https://")):
        return [f"Open the MLflow UI at {ui_runs_url(uri, experiment_id)}"]
    return [
        f"Open the MLflow UI:  {mlflow_executable()} ui --backend-store-uri {uri} --host 127.0.0.1 --port {port}",
        f"  then, in a browser: {ui_runs_url(f'http://127.0.0.1:{port}', experiment_id)}",
    ]
