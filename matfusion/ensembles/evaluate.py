"""Evaluate a fitted :class:`~matfusion.ensembles.stacking.StackedEnsemble` on the untouched
test rows of the outer fold, and log it to MLflow as a nested run of the search.

Reported (``Evaluation.metrics``): ``ensemble_{mae,rmse,r2}``; per member (the column the point
prediction uses: its refit on all the training rows, else its K fold models averaged)
``member.<name>_{mae,rmse,r2}``; the plain unweighted average of the members
``average_{mae,rmse,r2}``; calibration of the ensemble's std: ``calib_within_1std`` and
``calib_within_2std`` (share of test rows with |error| <= 1 or 2 std; a Gaussian would give
0.68 and 0.95), and ``mean_std``.  For a calibrated ensemble (conformal intervals, see
:mod:`matfusion.ensembles.calibration`) the std is the calibrated one, and the test rows also
give ``coverage_68`` / ``coverage_90`` / ``coverage_95`` (share of test rows inside the
interval at that nominal coverage), ``width_68`` / ``width_90`` / ``width_95`` (mean interval
width), ``coverage_nominal`` (the model's own ``lower`` / ``upper`` level) and
``coverage_at_nominal``; ``spread_within_1std`` is the uncalibrated fold-model spread's share,
for reference.  The test rows only measure: the calibration used training rows only.

With k targets every metric is per target, on the test rows labelled for it, with the
target's name as suffix (``ensemble_mae_K_VRH``, ``member.rf_r2_G_VRH``,
``calib_within_1std_G_VRH``, ``n_test_G_VRH`` ...); ``Evaluation.test_mae`` is then the mean of
the per-target ensemble MAEs (what the registry compares).
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
import pandas as pd

from .calibration import coverage_metrics, level_name, reliability_curve
from .stacking import StackedEnsemble, _as_targets


def regression_metrics(pred: np.ndarray, y: np.ndarray) -> dict:
    pred = np.asarray(pred, dtype=np.float64).reshape(-1)
    y = np.asarray(y, dtype=np.float64).reshape(-1)
    err = pred - y
    ss_tot = float(np.sum((y - y.mean()) ** 2))
    return {
        "mae": float(np.mean(np.abs(err))),
        "rmse": float(np.sqrt(np.mean(err**2))),
        "r2": float(1.0 - np.sum(err**2) / ss_tot) if ss_tot > 0 else float("nan"),
    }


def calibration(pred: np.ndarray, std: np.ndarray, y: np.ndarray) -> dict:
    err = np.abs(np.asarray(pred) - np.asarray(y))
    std = np.asarray(std)
    return {
        "calib_within_1std": float(np.mean(err <= std)),
        "calib_within_2std": float(np.mean(err <= 2 * std)),
        "mean_std": float(np.mean(std)),
    }


@dataclass
class Evaluation:
    metrics: dict
    predictions: pd.DataFrame  # row, y, prediction, std, [lower, upper], spread, one column per member, average
    weights: Optional[dict]
    summary: dict = field(default_factory=dict)
    # target ("" for one target) -> (nominal levels, observed test coverage): the reliability diagram
    reliability: dict = field(default_factory=dict)

    @property
    def test_mae(self) -> float:
        if "ensemble_mae" in self.metrics:
            return self.metrics["ensemble_mae"]
        targets = self.summary.get("targets") or []
        return float(np.mean([self.metrics[f"ensemble_mae_{t}"] for t in targets]))

    @property
    def targets(self) -> list:
        """Target names for k > 1 targets, [] for a single target."""
        t = list(self.summary.get("targets") or [])
        return t if len(t) > 1 else []


def _block(ensemble, pred, std, members, y, suffix: str, spread=None, sigma=None, calibrator=None) -> dict:
    average = members.mean(axis=1)
    metrics = {f"ensemble_{k}{suffix}": v for k, v in regression_metrics(pred, y).items()}
    metrics.update({f"average_{k}{suffix}": v for k, v in regression_metrics(average, y).items()})
    for j, name in enumerate(ensemble.names_):
        metrics.update({f"member.{name}_{k}{suffix}": v for k, v in regression_metrics(members[:, j], y).items()})
    metrics.update({f"{k}{suffix}": v for k, v in calibration(pred, std, y).items()})
    if calibrator is not None:
        nominal = float(ensemble.coverage_)
        metrics.update({f"{k}{suffix}": v for k, v in coverage_metrics(y, pred, sigma, calibrator).items()})
        at = coverage_metrics(y, pred, sigma, calibrator, levels=(nominal,))
        metrics[f"coverage_nominal{suffix}"] = nominal
        metrics[f"coverage_at_nominal{suffix}"] = at[f"coverage_{level_name(nominal)}"]
        metrics[f"spread_within_1std{suffix}"] = float(np.mean(np.abs(pred - y) <= spread))
    return metrics


def _interval_columns(frame: pd.DataFrame, out: dict, sfx: str, t: Optional[int]) -> None:
    """std, lower, upper, spread columns (lower/upper only for a calibrated ensemble)."""
    pick = (lambda a: a) if t is None else (lambda a: a[:, t])
    frame[f"std{sfx}"] = pick(out["std"])
    if "lower" in out:
        frame[f"lower{sfx}"] = pick(out["lower"])
        frame[f"upper{sfx}"] = pick(out["upper"])
    frame[f"spread{sfx}"] = pick(out["spread"])


def evaluate_ensemble(
    ensemble: StackedEnsemble, descriptors: np.ndarray, graphs, targets: np.ndarray, test_rows: Sequence[int]
) -> Evaluation:
    """Metrics of the ensemble, each member and the members' plain average on ``test_rows``."""
    y_all = _as_targets(targets)
    test_rows = np.asarray(test_rows, dtype=np.int64)
    overlap = set(test_rows.tolist()) & set(ensemble.meta_rows_.tolist())
    if overlap:
        raise ValueError(f"{len(overlap)} test rows were used to fit the ensemble (e.g. row {min(overlap)})")
    if (y_all.ndim == 2) != ensemble.multi_target or (y_all.ndim == 2 and y_all.shape[1] != ensemble.n_targets_):
        raise ValueError(
            f"targets of shape {y_all.shape} do not match the ensemble's {getattr(ensemble, 'n_targets_', 1)} target(s)"
        )
    cal_rows = set().union(*(set(np.asarray(r).tolist()) for r in getattr(ensemble, "calibration_rows_", [])))
    if cal_rows & set(test_rows.tolist()):
        raise ValueError("test rows were used to calibrate the ensemble's intervals")
    y = y_all[test_rows]
    out = ensemble.predict_all(descriptors, graphs, test_rows)
    members, pred, std = out["members"], out["mean"], out["std"]
    average = members.mean(axis=1)
    cals = list(getattr(ensemble, "calibrators_", None) or [])
    reliability = {}
    if not ensemble.multi_target:
        extra = {"spread": out["spread"], "sigma": out["sigma"], "calibrator": cals[0]} if cals else {}
        metrics = _block(ensemble, pred, std, members, y, "", **extra)
        metrics["n_test"] = float(len(test_rows))
        if cals:
            reliability[""] = reliability_curve(y, pred, out["sigma"], cals[0])
        frame = pd.DataFrame({"row": test_rows, "y": y, "prediction": pred})
        _interval_columns(frame, out, "", None)
        for j, name in enumerate(ensemble.names_):
            frame[f"member.{name}"] = members[:, j]
        frame["average"] = average
    else:
        metrics = {"n_test": float(len(test_rows))}
        frame = pd.DataFrame({"row": test_rows})
        for t, tname in enumerate(ensemble.target_names_):
            lab = np.isfinite(y[:, t])  # labelled test rows of this target only
            if lab.sum() == 0:
                raise ValueError(f"no test row has a label for target {tname!r}")
            extra = (
                {"spread": out["spread"][lab, t], "sigma": out["sigma"][lab, t], "calibrator": cals[t]} if cals else {}
            )
            metrics.update(
                _block(ensemble, pred[lab, t], std[lab, t], members[lab, :, t], y[lab, t], f"_{tname}", **extra)
            )
            metrics[f"n_test_{tname}"] = float(lab.sum())
            if cals:
                reliability[tname] = reliability_curve(y[lab, t], pred[lab, t], out["sigma"][lab, t], cals[t])
            frame[f"y_{tname}"] = y[:, t]
            frame[f"prediction_{tname}"] = pred[:, t]
            _interval_columns(frame, out, f"_{tname}", t)
            for j, name in enumerate(ensemble.names_):
                frame[f"member.{name}_{tname}"] = members[:, j, t]
            frame[f"average_{tname}"] = average[:, t]
    return Evaluation(
        metrics=metrics,
        predictions=frame,
        weights=ensemble.weights_,
        summary=ensemble.summary(),
        reliability=reliability,
    )


def reliability_plot(evaluation: Evaluation, path: str, title: str = "") -> Optional[str]:
    """The reliability diagram of the conformal intervals on the test rows: observed coverage
    against nominal coverage (one curve per target); None when the ensemble is not calibrated."""
    if not evaluation.reliability:
        return None
    from ..plotting import new_figure, save_figure

    fig = new_figure(5, 5)
    ax = fig.add_subplot()
    for target, (levels, observed) in evaluation.reliability.items():
        sfx = f"_{target}" if target else ""
        n = int(evaluation.metrics.get(f"n_test{sfx}", evaluation.metrics.get("n_test", 0)))
        ax.plot(levels, observed, "o-", ms=3, label=f"{target or 'test rows'} (n={n})")
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="ideal")
    ax.set_xlabel("nominal coverage")
    ax.set_ylabel("observed coverage on the test rows")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_title(title or "reliability of the conformal intervals")
    ax.legend(loc="upper left", fontsize=8)
    ax.grid(alpha=0.3)
    save_figure(fig, path)
    return path


def parity_plot(evaluation: Evaluation, path: str, title: str = "") -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    df = evaluation.predictions
    suffixes = [f"_{t}" for t in evaluation.targets] or [""]
    fig, axes = plt.subplots(1, len(suffixes), figsize=(5 * len(suffixes), 5), dpi=100, squeeze=False)
    for ax, sfx in zip(axes[0], suffixes):
        part = df[np.isfinite(df[f"y{sfx}"])]
        ax.errorbar(
            part[f"y{sfx}"],
            part[f"prediction{sfx}"],
            yerr=part[f"std{sfx}"],
            fmt="o",
            ms=3,
            alpha=0.7,
            elinewidth=0.8,
            label=f"ensemble (MAE {evaluation.metrics[f'ensemble_mae{sfx}']:.4g})",
        )
        lo = float(min(part[f"y{sfx}"].min(), part[f"prediction{sfx}"].min()))
        hi = float(max(part[f"y{sfx}"].max(), part[f"prediction{sfx}"].max()))
        ax.plot([lo, hi], [lo, hi], "k--", lw=1)
        ax.set_xlabel("true" + (f" {sfx[1:]}" if sfx else ""))
        ax.set_ylabel("predicted")
        ax.set_title(title or "test parity")
        ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def log_evaluation(
    client,
    experiment_id: str,
    parent_run_id: str,
    evaluation: Evaluation,
    tags: Optional[dict] = None,
    run_name: str = "ensemble",
) -> str:
    """A nested run (``mlflow.parentRunId`` = the search's parent, ``kind=ensemble``) with the
    metrics, meta-learner weights (as ``weight.<member>`` metrics and ``weights.json``), the
    member configs, test predictions and a parity plot.  Returns its run id; the run is left
    RUNNING so that a model can be logged into it (``finish_run`` ends it)."""
    from mlflow.entities import Metric, Param

    summary = evaluation.summary
    run = client.create_run(
        experiment_id,
        run_name=run_name,
        tags={
            "mlflow.parentRunId": parent_run_id,
            "kind": "ensemble",
            "meta": str(summary.get("meta")),
            "members": ",".join(summary.get("members", [])),
            **{k: str(v) for k, v in (tags or {}).items()},
        },
    )
    run_id = run.info.run_id
    now = int(time.time() * 1000)
    metrics = [Metric(k, float(v), now, 0) for k, v in evaluation.metrics.items() if np.isfinite(v)]
    for name, w in (evaluation.weights or {}).items():
        if isinstance(w, dict):  # k targets: {target: {member: weight}}
            metrics += [Metric(f"weight.{name}.{m}", float(v), now, 0) for m, v in w.items()]
        elif w is not None:
            metrics.append(Metric(f"weight.{name}", float(w), now, 0))
    params = [
        Param("meta", str(summary.get("meta"))),
        Param("n_folds", str(summary.get("n_folds"))),
        Param("context_features", str(summary.get("context_features"))),
        Param("seed", str(summary.get("seed"))),
        Param("n_members", str(len(summary.get("members", [])))),
        Param("n_meta_rows", str(summary.get("n_meta_rows"))),
        Param("refit", ",".join(summary.get("refit") or []) or "none"),
    ]
    calib = summary.get("calibration")
    if calib:
        first = calib if "difficulty" in calib else next(iter(calib.values()))
        params += [Param("interval_difficulty", str(first["difficulty"])), Param("coverage", str(first["coverage"]))]
    client.log_batch(run_id, metrics=metrics, params=params)
    client.log_dict(run_id, evaluation.weights or {}, "weights.json")
    client.log_dict(
        run_id, {"members": summary.get("members"), "configs": summary.get("member_configs")}, "members.json"
    )
    with tempfile.TemporaryDirectory() as d:
        csv = os.path.join(d, "test_predictions.csv")
        evaluation.predictions.to_csv(csv, index=False)
        client.log_artifact(run_id, csv)
        png = parity_plot(
            evaluation,
            os.path.join(d, "parity.png"),
            title=f"{tags.get('dataset', '') if tags else ''} fold {tags.get('fold', '') if tags else ''}",
        )
        client.log_artifact(run_id, png)
        rel = reliability_plot(evaluation, os.path.join(d, "reliability.png"))
        if rel:
            client.log_artifact(run_id, rel)
    calib = summary.get("calibration")
    if calib:
        client.log_dict(run_id, calib, "calibration.json")
    return run_id


def metrics_json(evaluation: Evaluation) -> str:
    return json.dumps(evaluation.metrics, indent=2, sort_keys=True)
