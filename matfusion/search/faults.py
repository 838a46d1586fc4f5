"""Faults during a search: one line for a failed trial, the search going on, a fast word when
MLflow cannot be reached, and the fault injection the tests drive the real trainable with.

A trial that raises (its model diverged, it ran out of memory, its checkpoint cannot be read, its
worker died, any other error) ends ERROR in Ray Tune; the search goes on with the others.  Its
reason is one line, :func:`failure_reason` (kind, then the error's own first line), printed when
it fails (``matfusion: trial t02 lgbm failed: ...``, :class:`~matfusion.search.tuner.FailureReporter`), tagged ``failure``
on its MLflow run beside the logger's ``status: failed`` and traceback (``error``), and counted in
the search's summary.  A search none of whose trials succeeded is a failed search (its parent run
FAILED; exit 4 on the command line).

Fault injection (for tests and drills; never set by matfusion itself): ``MATFUSION_INJECT_FAULTS``
in the driver's environment when a search starts, a comma-separated list of
``FAMILY@EPOCH=KIND``: every trial of that family, when it reports that epoch, ``error`` (raises
a RuntimeError), ``memory`` (raises MemoryError), ``nan`` (reports a NaN loss and validation
MAE, which the trial's own guard then refuses) or ``slow`` (from that epoch on, each report waits a
second: a trial slow enough to be caught mid-way).  The spec is read once, in the driver, and handed
to the trainable with its data (Ray workers do not see the driver's later environment).

The tracking server going away mid-search: the trial logger's writes wait and are sent when it
is back (:mod:`matfusion.tracking.outbox`); still down at the end, :func:`result_without_tracking`
makes the search's result from Tune's results and says in one line what MLflow never got.

What runs inside the trial (the non-finite guard, the checkpoint reader, the injected faults) is
:mod:`matfusion.trainables.guards`: the trainables never import the search.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

from ..trainables.guards import INJECT_ENV, OOM_MARKERS, Fault, first_line, parse_faults

if TYPE_CHECKING:  # pandas is imported when a leaderboard is made
    import pandas as pd

REASON_CHARS = 300  # a reason line is cut to this many characters


class TrackingUnreachable(ConnectionError):
    """The MLflow tracking server of ``mlflow.tracking_uri`` does not answer."""


# -- one line per failure -----------------------------------------------------------------------


def root_cause(exc: BaseException) -> BaseException:
    """The trainable's own exception inside Ray's wrappers (``RayTaskError``: ``.cause``)."""
    seen = set()
    while id(exc) not in seen:
        seen.add(id(exc))
        cause = getattr(exc, "cause", None)
        if isinstance(cause, BaseException):
            exc = cause
            continue
        break
    return exc


def _cut(line: str) -> str:
    return line if len(line) <= REASON_CHARS else line[: REASON_CHARS - 3] + "..."


def failure_reason(error) -> str:
    """One line saying why a trial failed, from its exception (Ray's wrapper or the trainable's
    own) or, where only Tune's text trace is left, that text (its last line is the exception)."""
    if error is None:
        return "failed (no error recorded)"
    if isinstance(error, str):
        lines = [line.strip() for line in error.splitlines() if line.strip() and not line.startswith(" ")]
        last = lines[-1] if lines else "failed (empty error trace)"
        kind, _, message = last.partition(": ")
        return _reason(kind.rsplit(".", 1)[-1], message, None)
    exc = root_cause(error)
    return _reason(type(exc).__name__, first_line(str(exc)), exc)


def _reason(kind: str, message: str, exc: Optional[BaseException]) -> str:
    low = message.lower()
    if (exc is not None and isinstance(exc, MemoryError)) or kind in ("MemoryError", "TrialOutOfMemory"):
        detail = f": {message}" if message else ""
        return _cut(
            f"out of memory ({kind}{detail}); use a smaller model or batch, or fewer trials at once "
            "(search.max_concurrent)"
        )
    if kind == "OutOfMemoryError" or any(m in low for m in OOM_MARKERS):
        return _cut(f"out of memory ({kind}: {message}); use a smaller model or batch, or fewer trials at once")
    if kind in ("NonFiniteLossError", "FloatingPointError"):
        return _cut(f"diverged: {message}")
    if kind == "CorruptCheckpointError":
        return _cut(f"unreadable checkpoint: {message}")
    if kind in ("RayActorError", "ActorDiedError", "WorkerCrashedError", "NodeDiedError"):
        return _cut(f"its worker process died ({kind}: {message or 'no message'})")
    return _cut(f"{kind}: {message}" if message else kind)


def trial_error_reason(trial) -> str:
    """The reason line of a Tune trial that ended ERROR: from its pickled exception, else from
    its error text file (the files Tune wrote beside the trial, before it calls back)."""
    pickled, text = getattr(trial, "pickled_error_file", None), getattr(trial, "error_file", None)
    error = None
    if pickled and os.path.isfile(pickled):
        try:
            import cloudpickle

            with open(pickled, "rb") as fh:
                error = cloudpickle.load(fh)
        except Exception:  # noqa: BLE001 - an exception that does not unpickle here
            error = None
    if error is None and text and os.path.isfile(text):
        with open(text, errors="replace") as fh:
            error = fh.read()
    return failure_reason(error)


@dataclass
class TrialFailure:
    trial_id: str
    run_name: str
    reason: str

    def line(self) -> str:
        return f"{self.run_name} ({self.trial_id}): {self.reason}"


# -- fault injection -------------------------------------------------------------------------------


def injected_faults() -> tuple[Fault, ...]:
    """The faults the driver's environment asks for now (read when a search starts)."""
    faults = parse_faults(os.environ.get(INJECT_ENV))
    if faults:
        print(
            f"matfusion: warning: {INJECT_ENV} injects faults into this search's trials: {os.environ[INJECT_ENV]}",
            file=sys.stderr,
            flush=True,
        )
    return faults


# -- MLflow tracking server ---------------------------------------------------------------------

PROBE_TIMEOUT_S = 5


def check_tracking_server(uri: str, setting: str = "mlflow.tracking_uri") -> None:
    """For an http(s) tracking URI: one request, no retries, a short timeout; raises
    :class:`TrackingUnreachable` naming the URI (and the ``setting`` it came from) when the server
    does not answer.  A database or
    file store is not probed (its errors are the store's own)."""
    if not uri.startswith(("http://", "https://")):
        return
    from mlflow.tracking import MlflowClient

    from ..tracking.outbox import quick_requests

    try:
        with quick_requests(retries=0, timeout_s=PROBE_TIMEOUT_S):
            MlflowClient(uri).search_experiments(max_results=1)
    except Exception as err:  # noqa: BLE001 - connection refused, timeout, DNS, a non-MLflow answer
        raise TrackingUnreachable(
            f"the MLflow tracking server {uri} ({setting}) does not answer "
            f"({_connection_reason(err)}); start it (e.g. `matfusion mlflow-server`), or set {setting} "
            "to a reachable server or a sqlite:/// file"
        ) from err


def _connection_reason(err: BaseException) -> str:
    text = str(err)
    low = text.lower()
    if "connection refused" in low or "errno 111" in low:
        return "connection refused"
    if "timed out" in low or "timeout" in low:
        return f"no answer within {PROBE_TIMEOUT_S} s"
    if "name or service not known" in low or "nodename nor servname" in low:
        return "unknown host"
    return _cut(f"{type(err).__name__}: {first_line(text)}")


# -- the tracking server gone at the search's end --------------------------------------------------


def tune_leaderboard(results, statuses: Optional[dict] = None, unended: str = "stopped") -> pd.DataFrame:
    """The search's leaderboard (``LEADERBOARD_COLUMNS``, best first) from Tune's ResultGrid,
    for when the tracking server cannot be read: each trial's best reported val_mae, its last
    epoch and how it ended, in the MLflow leaderboard's words: the status the trial logger gave
    it when it ended (``statuses``, trial id -> ``completed`` / ``pruned`` / ``failed``), else
    ``failed`` (an error) or ``completed`` (it finished), else ``unended``: ``stopped`` (cut by the
    search's budget; Tune never ended it) or ``interrupted``, as :func:`~matfusion.search.tuner._how_it_ended`
    closes such runs.  A trial that ended before a resume is not in this process's ``statuses``:
    one ASHA pruned then reads ``stopped`` here."""
    import numpy as np
    import pandas as pd

    from ..tracking.leaderboard import LEADERBOARD_COLUMNS
    from ..tracking.logger import trial_fusion

    rows = []
    for r in results:
        df, metrics, config = r.metrics_dataframe, dict(r.metrics or {}), dict(r.config or {})
        vals = np.asarray(df["val_mae"], dtype=np.float64) if df is not None and "val_mae" in df else np.array([])
        vals = vals[np.isfinite(vals)]
        trial_id = _tune_trial_id(r)
        status = (statuses or {}).get(trial_id) or (
            "failed" if r.error is not None else "completed" if metrics.get("trial_finished") else unended
        )
        rows.append(
            {
                "trial_id": trial_id,
                "family": str(config.get("family", "?")),
                "fusion": trial_fusion(config),
                "val_mae": float(vals.min()) if len(vals) else float("nan"),
                "epochs": int(metrics.get("epoch", 0) or 0),
                "status": status,
            }
        )
    board = pd.DataFrame(rows, columns=LEADERBOARD_COLUMNS)
    board["val_mae"] = board["val_mae"].astype(float)
    return board.sort_values(["val_mae", "trial_id"], na_position="last", kind="stable").reset_index(drop=True)


def _tune_trial_id(result) -> str:
    from .tuner import _trial_id_of

    return _trial_id_of(result)


def _tune_run_name(result) -> str:
    """The run name the trial's MLflow run has (``t02 lgbm``), from its folder name
    ``run_trial_<id>_<number>_...`` and its config."""
    import re
    from pathlib import Path
    from types import SimpleNamespace

    from ..tracking.logger import trial_run_name

    found = re.match(r"run_trial_[0-9a-f]{8}(?:_\d{5})?_(\d+)", Path(result.path).name)
    trial = SimpleNamespace(
        config=result.config, experiment_tag=found.group(1) if found else "", trial_id=_tune_trial_id(result)
    )
    return trial_run_name(trial)


def result_without_tracking(cfg, results, parent, path, prep, t0: float, resumed: bool, signals, logger):
    """The :class:`~matfusion.search.tuner.SearchResult` of a search whose tracking server did not
    answer again before it ended (the trial logger's writes still waiting, see
    :mod:`matfusion.tracking.outbox`): leaderboard, failures, best trial and its test MAE from
    Tune's results, no MLflow call; one warning line says what MLflow never got and where Tune
    keeps every trial's results (``path``).  The parent run stays RUNNING in MLflow."""
    import time

    from .tuner import _best_result, _best_trial_test_mae, experiment_unfinished, prune_checkpoints, search_result

    final = logger.final_statuses or {}
    unfinished = [t for t in experiment_unfinished(path) if final.get(t) not in ("TERMINATED", "ERROR")]
    interrupted = signals.interrupted or bool(unfinished)
    failures = sorted(
        (TrialFailure(_tune_trial_id(r), _tune_run_name(r), failure_reason(r.error)) for r in results if r.error),
        key=lambda f: f.run_name,
    )
    best = None if interrupted else _best_result(results)
    best_val, best_test, best_config = _best_trial_test_mae(best, prep)
    if not interrupted:
        prune_checkpoints(path, keep=[best[1] if best else None] + [r for r in results if r.error is not None])
    unsent = (
        f"{logger.outbox.unsent_line(str(path))}; nor the search's own results (its parent run "
        f"{parent.run_id} stays RUNNING)"
    )
    print(unsent, file=sys.stderr, flush=True)
    return search_result(
        cfg,
        parent,
        path,
        results,
        board=tune_leaderboard(results, logger.status, unended="interrupted" if interrupted else "stopped"),
        failures=failures,
        best=best,
        scores=(best_val, best_test, best_config),
        wall_s=time.time() - t0,
        resumed=resumed,
        interrupted=interrupted,
        signals=signals,
        tracking_unsent=unsent,
    )
