"""THE leaderboard of a search, computed from its MLflow runs.

A search is one MLflow parent run (tag ``kind=search``) with one nested run per trial, as
:class:`~matfusion.tracking.logger.MlflowTrialLogger` writes them.  :func:`search_trials` turns
those runs into a table of trials, :func:`rank_trials` / :func:`leaderboard` rank it, and
:func:`search_leaderboard` is the search's leaderboard (``LEADERBOARD_COLUMNS``, best first) that
``run_search`` returns, ``matfusion leaderboard`` prints and the search report logs.
:func:`group_summary` is the per-group view of the same trials (each group's best and the
budget it used), printed after the leaderboard.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
import pandas as pd

from .. import families
from .logger import trial_fusion
from .runs import child_runs

PARAM_PREFIX = "params."
BASE_COLUMNS = ["trial_id", "run_id", "family", "encoder", "fusion", "status", "val_mae", "epochs", "start_time"]
LEADERBOARD_COLUMNS = ["trial_id", "family", "fusion", "val_mae", "epochs", "status"]
FINISHED = ("completed", "pruned", "stopped")  # stopped: cut by the search's time/epoch budget


# -- reading MLflow ----------------------------------------------------------------------
def collect_trials(client, experiment_id: str, parent_run_id: str) -> tuple[pd.DataFrame, dict]:
    """The trials frame and, per trial_id, its val_mae history as sorted ``[(epoch, value)]``."""
    runs = child_runs(client, experiment_id, parent_run_id)
    rows, histories = [], {}
    for run in runs:
        tags, params = run.data.tags, run.data.params
        if tags.get("kind") == "ensemble" or tags.get("status") == "discarded":
            continue  # not a trial: an ensemble built from the search, or a run dropped on resume
        family = tags.get("family") or params.get("family") or "?"
        trial_id = tags.get("trial_id") or run.info.run_name or run.info.run_id
        history = sorted(
            (int(m.step), float(m.value))
            for m in client.get_metric_history(run.info.run_id, "val_mae")
            if m.value is not None and math.isfinite(m.value)
        )
        histories[trial_id] = history
        if history:
            val = min(v for _, v in history)
            epochs = max(s for s, _ in history)
        else:
            val = float("nan")
            epochs = int(run.data.metrics.get("epochs_trained", 0) or 0)
        status = tags.get("status")
        if not status or status == "running" and run.info.status != "RUNNING":
            # a run that ended without its logger writing the final tag
            status = {"FINISHED": "completed", "FAILED": "failed", "KILLED": "failed"}.get(
                run.info.status, str(run.info.status).lower()
            )
        row = {
            "trial_id": trial_id,
            "run_id": run.info.run_id,
            "family": family,
            "encoder": family if family in families.GRAPH else "-",
            "fusion": trial_fusion({"family": family, "fusion": params.get(f"{family}.fusion", "none")}),
            "status": status,
            "val_mae": val,
            "epochs": epochs,
            "start_time": pd.Timestamp(run.info.start_time, unit="ms", tz="UTC"),
        }
        row.update({PARAM_PREFIX + k: v for k, v in params.items()})
        rows.append(row)
    param_cols = sorted({k for r in rows for k in r if k.startswith(PARAM_PREFIX)})
    df = pd.DataFrame(rows, columns=BASE_COLUMNS + param_cols)
    df["val_mae"] = df["val_mae"].astype(float)
    df["epochs"] = df["epochs"].astype(int)
    df["start_time"] = pd.to_datetime(df["start_time"], utc=True)
    df = df.sort_values(["start_time", "trial_id"], kind="stable").reset_index(drop=True)
    return df, histories


def search_trials(client, experiment_id: str, parent_run_id: str) -> pd.DataFrame:
    """One row per nested run of the search ``parent_run_id``, in start order.

    Columns: ``trial_id, run_id, family, encoder`` (the graph encoder, ``-`` for rf),
    ``fusion`` (``<family>.fusion`` param, ``none`` if absent, ``-`` for rf), ``status``
    (completed / pruned / failed / running), ``val_mae`` (minimum of the val_mae history,
    NaN when none was logged), ``epochs`` (last logged epoch, 0 when none), ``start_time``
    (UTC), then one ``params.<name>`` column per logged param (strings, as MLflow keeps them;
    NaN where a trial has no such param).
    """
    return collect_trials(client, experiment_id, parent_run_id)[0]


# -- ranking -----------------------------------------------------------------------------
def rank_trials(df: pd.DataFrame) -> pd.DataFrame:
    """All trials, best val_mae first; trials without a val_mae last; ties in start order."""
    keys = [c for c in ("val_mae", "start_time", "trial_id") if c in df.columns]
    return df.sort_values(keys, na_position="last", kind="stable").reset_index(drop=True)


def leaderboard(df: pd.DataFrame, top: Optional[int] = None, per_family: bool = True) -> pd.DataFrame:
    """Rank trials.

    ``per_family=True``: the best ``top`` (default 1) trials of each family that has a
    val_mae, families ordered by their best trial.  ``per_family=False``: the overall ``top``
    trials that have a val_mae, or, with ``top=None``, every trial (those without a val_mae
    last).
    """
    if top is not None and top < 1:
        raise ValueError(f"top must be >= 1, got {top}")
    ranked = rank_trials(df)
    if not per_family:
        if top is None:
            return ranked
        return ranked[np.isfinite(ranked["val_mae"])].head(top).reset_index(drop=True)
    scored = ranked[np.isfinite(ranked["val_mae"])]
    best = scored.groupby("family", sort=False).head(top or 1)
    order = {f: i for i, f in enumerate(scored["family"].drop_duplicates())}
    return (
        best.assign(_family_rank=best["family"].map(order))
        .sort_values("_family_rank", kind="stable")
        .drop(columns="_family_rank")
        .reset_index(drop=True)
    )


def search_leaderboard(client, experiment_id: str, parent_run_id: str) -> pd.DataFrame:
    """The leaderboard of search ``parent_run_id``: one row per trial with ``LEADERBOARD_COLUMNS``
    (trial_id, family, fusion, val_mae, epochs, status), sorted by val_mae (best first; trials
    without a val_mae last, ties in start order)."""
    return rank_trials(search_trials(client, experiment_id, parent_run_id))[LEADERBOARD_COLUMNS]


GROUP_SUMMARY_COLUMNS = ["group", "trials", "completed", "pruned", "best_val_mae", "epochs"]


def group_summary(trials: pd.DataFrame) -> pd.DataFrame:
    """One row per group of trials (:func:`matfusion.families.group_of` of family and fusion:
    ``rf``, ``lgbm``, ``cgcnn-early``, ...): ``trials`` (how many), ``completed`` / ``pruned``
    (trials with that status; ``stopped`` ones, cut by the search's budget, count in neither),
    ``best_val_mae`` (the group's best inner-validation MAE, NaN when none reported) and
    ``epochs`` (epochs its trials trained in total: the budget it used; a one-shot trial counts 1).
    Groups by their best val_mae, best first.  ``trials`` is any frame with family, fusion,
    status, val_mae and epochs columns (:func:`search_trials`, a search's leaderboard)."""
    if trials is None or len(trials) == 0:
        return pd.DataFrame(columns=GROUP_SUMMARY_COLUMNS)
    df = trials.copy()
    df["group"] = [
        families.group_of({"family": f, "fusion": u}) if f in families.names() else str(f)
        for f, u in zip(df["family"], df["fusion"])
    ]
    df["val_mae"] = df["val_mae"].astype(float)
    rows = []
    for group, part in df.groupby("group", sort=False):
        vals = part["val_mae"][np.isfinite(part["val_mae"])]
        rows.append(
            {
                "group": group,
                "trials": len(part),
                "completed": int((part["status"] == "completed").sum()),
                "pruned": int((part["status"] == "pruned").sum()),
                "best_val_mae": float(vals.min()) if len(vals) else float("nan"),
                "epochs": int(part["epochs"].fillna(0).astype(int).sum()),
            }
        )
    out = pd.DataFrame(rows, columns=GROUP_SUMMARY_COLUMNS)
    return out.sort_values(["best_val_mae", "group"], na_position="last", kind="stable").reset_index(drop=True)


def format_group_summary(summary: pd.DataFrame) -> str:
    """The group summary as printed: best_val_mae with 4 significant digits, ``-`` for none."""
    table = summary.copy()
    table["best_val_mae"] = [f"{v:.4g}" if np.isfinite(v) else "-" for v in table["best_val_mae"].astype(float)]
    with pd.option_context("display.max_rows", None, "display.width", 160):
        return table.to_string(index=False)
