"""Report of a finished (or running) search, read back from MLflow.

A search is one MLflow parent run (tag ``kind=search``) with one nested run per trial, as
:class:`~matfusion.tracking.logger.MlflowTrialLogger` writes them.  This module reads those runs
as a table of trials (:func:`matfusion.tracking.leaderboard.search_trials`), ranks them, and
logs to the parent run:

* ``leaderboard.csv``: every trial ranked by its best inner-validation MAE;
* ``optimization_history.png``: each trial's best val_mae in start order, plus the running best;
* ``param_importances.png``: per model family with at least 3 finished trials, how much each
  searched parameter explains val_mae (Optuna's fANOVA on a study rebuilt from the runs;
  a random-forest importance if that fails);
* ``val_mae_per_epoch.png``: the val_mae curve of every trial, coloured by family, pruned
  trials dashed;
* ``report_notes.txt``: why a plot was left out (too few trials, nothing finished, ...);
* tags ``best_trial_id``, ``best_run_id``, ``best_family``, ``best_fusion`` and metrics
  ``report_best_val_mae``, ``best_val_mae.<family>``, ``n_trials_<status>``.

Only the driver reads and writes here; nothing imports Ray.
"""

from __future__ import annotations

import logging
import math
import tempfile
import time
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd

from .. import plotting
from .leaderboard import FINISHED, PARAM_PREFIX, collect_trials, leaderboard, rank_trials

log = logging.getLogger("matfusion.report")

MIN_TRIALS_FOR_IMPORTANCE = 3


# ----------------------------------------------------------------------------- importances
def _as_numeric(values: pd.Series) -> Optional[pd.Series]:
    """``values`` (strings, NaN where absent) as floats if every present value is a finite
    number, else None."""
    present = values.dropna().astype(str)
    if present.str.lower().isin(["true", "false"]).any():
        return None
    nums = pd.to_numeric(present, errors="coerce")
    if nums.isna().any() or not np.isfinite(nums.to_numpy(dtype=float)).all():
        return None
    return pd.to_numeric(values.where(values.notna()), errors="coerce").astype(float)


def _importance_inputs(df: pd.DataFrame, family: str) -> tuple[pd.DataFrame, dict, np.ndarray]:
    """The finished trials of ``family`` as a table of varying parameters (conditional params
    filled: absent categorical -> ``<absent>``, absent number -> a value below the observed
    range), the kind of each (``num`` / ``cat``), and their val_mae."""
    rows = df[(df["family"] == family) & df["status"].isin(FINISHED) & np.isfinite(df["val_mae"])]
    table, kinds = {}, {}
    for col in [c for c in rows.columns if c.startswith(PARAM_PREFIX)]:
        values = rows[col]
        if values.isna().all() or values.fillna("<absent>").astype(str).nunique() < 2:
            continue  # other family's param, or a constant of the search
        name = col[len(PARAM_PREFIX) :]
        if name.startswith(family + "."):
            name = name[len(family) + 1 :]
        nums = _as_numeric(values)
        if nums is not None:
            lo, hi = float(nums.min()), float(nums.max())
            table[name] = nums.fillna(lo - max(hi - lo, 1.0))
            kinds[name] = "num"
        else:
            table[name] = values.fillna("<absent>").astype(str)
            kinds[name] = "cat"
    return pd.DataFrame(table, index=rows.index), kinds, rows["val_mae"].to_numpy(dtype=float)


def _fanova(x: pd.DataFrame, kinds: dict, y: np.ndarray) -> dict:
    import optuna
    from optuna.distributions import CategoricalDistribution, FloatDistribution

    dists = {}
    for name, kind in kinds.items():
        if kind == "num":
            dists[name] = FloatDistribution(float(x[name].min()), float(x[name].max()))
        else:
            dists[name] = CategoricalDistribution(sorted(x[name].unique()))
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study = optuna.create_study(direction="minimize")
        for (_, row), value in zip(x.iterrows(), y):
            params = {n: (float(row[n]) if kinds[n] == "num" else str(row[n])) for n in kinds}
            study.add_trial(optuna.trial.create_trial(params=params, distributions=dists, value=float(value)))
        evaluator = optuna.importance.FanovaImportanceEvaluator(seed=0)
        return optuna.importance.get_param_importances(study, evaluator=evaluator)
    finally:
        optuna.logging.set_verbosity(verbosity)


def _forest(x: pd.DataFrame, kinds: dict, y: np.ndarray) -> dict:
    from sklearn.ensemble import RandomForestRegressor

    parts, owner = [], []
    for name, kind in kinds.items():
        if kind == "num":
            parts.append(x[[name]].to_numpy(dtype=float))
            owner.append(name)
        else:
            onehot = pd.get_dummies(x[name]).to_numpy(dtype=float)
            parts.append(onehot)
            owner.extend([name] * onehot.shape[1])
    forest = RandomForestRegressor(n_estimators=200, random_state=0).fit(np.hstack(parts), y)
    out = dict.fromkeys(kinds, 0.0)
    for name, imp in zip(owner, forest.feature_importances_):
        out[name] += float(imp)
    total = sum(out.values())
    return {k: v / total for k, v in out.items()} if total > 0 else out


def param_importances(df: pd.DataFrame, family: str, method: str = "fanova") -> tuple[dict, str]:
    """Importance of each searched parameter of ``family`` for val_mae, over its finished
    (completed or pruned) trials, normalised to sum to 1, largest first.

    ``method="fanova"``: Optuna's fANOVA on a study rebuilt from the trials, falling back to a
    random forest's impurity importance if Optuna fails; ``method="forest"``: the random forest
    only.  Returns ``(importances, note)``: empty importances and a reason in ``note`` when there
    are fewer than 3 finished trials, no varying parameter or no spread in val_mae.
    """
    x, kinds, y = _importance_inputs(df, family)
    if len(y) < MIN_TRIALS_FOR_IMPORTANCE:
        return {}, f"{family}: {len(y)} finished trial(s), need {MIN_TRIALS_FOR_IMPORTANCE}"
    if not kinds:
        return {}, f"{family}: no parameter varies across its {len(y)} finished trials"
    if np.ptp(y) == 0:
        return {}, f"{family}: val_mae is the same in all {len(y)} finished trials"
    note = ""
    result = None
    if method == "fanova":
        try:
            result = _fanova(x, kinds, y)
            if not all(math.isfinite(v) for v in result.values()):
                raise ValueError("non-finite importance")
        except Exception as err:  # noqa: BLE001 - any Optuna failure falls back to the forest
            note = f"{family}: fANOVA failed ({type(err).__name__}: {err}); random-forest importance used"
            result = None
    elif method != "forest":
        raise ValueError(f"unknown importance method {method!r} (fanova or forest)")
    if result is None:
        result = _forest(x, kinds, y)
    return dict(sorted(result.items(), key=lambda kv: -kv[1])), note


def _study_frame(study) -> pd.DataFrame:
    """An Optuna study's finished trials in the shape of :func:`~matfusion.tracking.leaderboard.search_trials` (for importances)."""
    import optuna

    rows = []
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        if t.value is None or not math.isfinite(t.value):
            continue
        row = {
            "trial_id": str(t.number),
            "family": str(t.params.get("family", "?")),
            "status": "completed",
            "val_mae": float(t.value),
        }
        row.update({PARAM_PREFIX + k.replace("/", "."): str(v) for k, v in t.params.items()})
        rows.append(row)
    return pd.DataFrame(
        rows,
        columns=["trial_id", "family", "status", "val_mae"]
        + sorted({k for r in rows for k in r if k.startswith(PARAM_PREFIX)}),
    )


# ----------------------------------------------------------------------------- plots
def plot_optimization_history(df: pd.DataFrame, path: Path) -> Optional[str]:
    scored = df[np.isfinite(df["val_mae"])]
    if scored.empty:
        return "optimization_history.png: no trial logged a val_mae"
    fig = plotting.new_figure(8, 4.5)
    ax = fig.add_subplot()
    order = np.arange(1, len(df) + 1)
    colors = plotting.family_colors(df["family"])
    markers = {"completed": "o", "pruned": "v", "running": "s"}
    vals = df["val_mae"].to_numpy(dtype=float)
    for family in sorted(colors):
        for status, marker in markers.items():
            sel = ((df["family"] == family) & (df["status"] == status)).to_numpy() & np.isfinite(vals)
            if sel.any():
                ax.scatter(
                    order[sel],
                    vals[sel],
                    color=colors[family],
                    marker=marker,
                    s=36,
                    alpha=0.85,
                    label=f"{family} ({status})",
                )
    other = np.isfinite(vals) & ~df["status"].isin(list(markers)).to_numpy()
    if other.any():
        ax.scatter(order[other], vals[other], color="grey", marker="x", label="other status")
    plotting.plot_running_best(ax, vals, color="black")
    n_failed = int((~np.isfinite(vals)).sum())
    if n_failed:  # trials without a val_mae: a cross on the x axis
        ax.scatter(
            order[~np.isfinite(vals)],
            np.full(n_failed, 0.02),
            transform=ax.get_xaxis_transform(),
            color="red",
            marker="x",
            s=36,
            label="no val_mae (failed)",
            clip_on=False,
        )
    ax.set_xlabel("trial (start order)")
    ax.set_ylabel("best val_mae of the trial")
    title = f"Optimization history: {len(df)} trials"
    if n_failed:
        title += f" ({n_failed} without val_mae)"
    ax.set_title(title)
    plotting.maybe_log_y(ax, vals)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    plotting.save_figure(fig, path)
    return None


def plot_param_importances(importances: dict, counts: dict, path: Path) -> None:
    families = list(importances)
    height = sum(max(1.2, 0.35 * len(importances[f]) + 0.8) for f in families)
    fig = plotting.new_figure(7, height + 0.4)
    axes = fig.subplots(
        len(families), 1, squeeze=False, height_ratios=[max(1.2, 0.35 * len(importances[f]) + 0.8) for f in families]
    )[:, 0]
    colors = plotting.family_colors(families)
    for ax, family in zip(axes, families):
        imp = importances[family]
        names = list(imp)[::-1]
        ax.barh(names, [imp[n] for n in names], color=colors[family])
        ax.set_xlim(0, 1)
        ax.set_title(f"{family}: importance for val_mae ({counts[family]} finished trials)", fontsize=10)
        ax.tick_params(axis="y", labelsize=8)
        for i, n in enumerate(names):
            ax.text(min(imp[n] + 0.01, 0.9), i, f"{imp[n]:.2f}", va="center", fontsize=8)
    axes[-1].set_xlabel("normalised importance")
    plotting.save_figure(fig, path)


def plot_val_mae_per_epoch(df: pd.DataFrame, histories: dict, path: Path) -> Optional[str]:
    curves = [(row, histories.get(row.trial_id, [])) for row in df.itertuples()]
    curves = [(row, h) for row, h in curves if h]
    if not curves:
        return "val_mae_per_epoch.png: no trial logged a val_mae"
    fig = plotting.new_figure(8, 4.5)
    ax = fig.add_subplot()
    colors = plotting.family_colors(df["family"])
    styles = {"completed": "-", "pruned": "--", "failed": ":", "running": "-."}
    for row, history in curves:
        steps, values = zip(*history)
        ax.plot(
            steps,
            values,
            color=colors[row.family],
            ls=styles.get(row.status, "-"),
            lw=1.2,
            marker="o",
            ms=4 if len(history) > 1 else 6,
            alpha=0.8,
        )
    from matplotlib.lines import Line2D

    seen_status = {row.status for row, _ in curves}
    handles = [Line2D([], [], color=colors[f], lw=2, label=f) for f in sorted({r.family for r, _ in curves})]
    handles += [Line2D([], [], color="black", ls=styles.get(s, "-"), label=s) for s in sorted(seen_status)]
    ax.legend(handles=handles, fontsize=8, loc="best")
    max_epoch = max(h[-1][0] for _, h in curves)
    if max_epoch <= 20:
        ax.set_xticks(range(min(h[0][0] for _, h in curves), max_epoch + 1))
    ax.set_xlabel("epoch")
    ax.set_ylabel("val_mae")
    ax.set_title(f"val_mae per epoch: {len(curves)} trials (pruned dashed)")
    plotting.maybe_log_y(ax, [v for _, h in curves for _, v in h])
    ax.grid(alpha=0.3)
    plotting.save_figure(fig, path)
    return None


# ----------------------------------------------------------------------------- the report
def log_search_report(client, parent_run_id: str, experiment_id: str, study=None) -> pd.DataFrame:
    """Read the trials of search ``parent_run_id`` and log the leaderboard, plots and best-trial
    tags/metrics to that parent run (see the module docstring).  ``study``: an Optuna study of
    the search, whose completed trials are then used for the parameter importances instead of
    the MLflow runs.  Returns the trials frame of :func:`~matfusion.tracking.leaderboard.search_trials`.
    """
    from mlflow.entities import Metric, RunTag

    df, histories = collect_trials(client, experiment_id, parent_run_id)
    ranked = rank_trials(df)
    notes: list[str] = []
    with tempfile.TemporaryDirectory(prefix="matfusion-report-") as tmp:
        out = Path(tmp)
        board = ranked.copy()
        board.insert(0, "rank", np.arange(1, len(board) + 1))
        board["start_time"] = board["start_time"].map(lambda t: t.isoformat() if pd.notna(t) else "")
        board.to_csv(out / "leaderboard.csv", index=False)

        note = plot_optimization_history(df, out / "optimization_history.png")
        if note:
            notes.append(note)

        source = _study_frame(study) if study is not None else df
        importances, counts = {}, {}
        for family in sorted(source["family"].dropna().unique()):
            imp, note = param_importances(source, family)
            if note:
                notes.append(f"param_importances.png: {note}")
            if imp:
                importances[family] = imp
                counts[family] = int(
                    (
                        (source["family"] == family) & source["status"].isin(FINISHED) & np.isfinite(source["val_mae"])
                    ).sum()
                )
        if importances:
            plot_param_importances(importances, counts, out / "param_importances.png")
            pd.DataFrame(
                [{"family": f, "param": p, "importance": v} for f, imp in importances.items() for p, v in imp.items()]
            ).to_csv(out / "param_importances.csv", index=False)
        else:
            notes.append(
                "param_importances.png: left out, no family has "
                f"{MIN_TRIALS_FOR_IMPORTANCE} finished trials with varying parameters"
            )

        note = plot_val_mae_per_epoch(df, histories, out / "val_mae_per_epoch.png")
        if note:
            notes.append(note)
        if notes:
            (out / "report_notes.txt").write_text("\n".join(notes) + "\n")
            for n in notes:
                log.info("search report: %s", n)
        plots = sorted(p.name for p in out.glob("*.png"))
        for path in sorted(out.iterdir()):
            client.log_artifact(parent_run_id, str(path))

    now = int(time.time() * 1000)
    counts_by_status = df["status"].value_counts()
    metrics = [
        Metric(f"n_trials_{s}", float(counts_by_status.get(s, 0)), now, 0) for s in ("completed", "pruned", "failed")
    ]
    tags = [RunTag("report.plots", ",".join(plots) or "none")]
    best_rows = leaderboard(df, per_family=True)
    for row in best_rows.itertuples():
        metrics.append(Metric(f"best_val_mae.{row.family}", float(row.val_mae), now, 0))
    if not best_rows.empty:
        best = best_rows.iloc[0]
        metrics += [
            Metric("report_best_val_mae", float(best["val_mae"]), now, 0),
            Metric("report_best_epochs", float(best["epochs"]), now, 0),
        ]
        tags += [
            RunTag("best_trial_id", str(best["trial_id"])),
            RunTag("best_run_id", str(best["run_id"])),
            RunTag("best_family", str(best["family"])),
            RunTag("best_fusion", str(best["fusion"])),
        ]
    client.log_batch(parent_run_id, metrics=metrics, tags=tags)
    return df
