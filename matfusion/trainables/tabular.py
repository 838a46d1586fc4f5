"""Training of the tabular families on the descriptor matrix (the ``descriptors`` arrays of the trial
data); each family of :mod:`matfusion.families` builds its model and calls in here.

Multi-target: one model per target, trained on the rows labelled for it.  Forests (``rf``,
``et``) train in one shot and report once (epoch 1; the search's ASHA leaves them out of its
rungs).  ``lgbm`` trains in chunks of ``rounds_per_epoch`` boosting rounds, ``ceil(n_estimators /
max_epochs)`` by default, so a trial spans ``max_epochs`` "epochs" like a GNN; after each chunk
it reports ``val_mae`` on the inner validation rows through the same session as the torch loop
(:class:`~matfusion.trainables.loop.LocalSession` / :class:`~matfusion.trainables.loop.TuneSession`),
with a checkpoint every ``checkpoint_every`` chunks, so ASHA can stop it and a restored trial
continues from its trees.  It stops early after ``patience`` chunks without improvement; the
model the trial stands for is the one at its best chunk (``best_rounds``).

The validation rows only select the chunk (early stopping); the test part of the fold is never
in the trial data.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from .. import families
from ..families import TrialConfig
from .loop import target_stats, validation_score


def _as_2d(y) -> np.ndarray:
    y = np.asarray(y, dtype=np.float64)
    return y.reshape(len(y), -1)


def _task_metrics(trial: TrialConfig, task_maes: list) -> dict:
    if len(task_maes) <= 1:
        return {}
    return {f"val_mae_{n}": m for n, m in zip(trial.targets or [], task_maes)}


# -- random forest / extra trees ----------------------------------------------------------------


def fit_forests(build: Callable, X: np.ndarray, y: np.ndarray) -> list:
    """One fitted forest per target (``build()`` gives an unfitted one), each on the rows labelled for it."""
    y = _as_2d(y)
    forests = []
    for k in range(y.shape[1]):
        labelled = np.isfinite(y[:, k])
        forests.append(build().fit(X[labelled], y[labelled, k]))
    return forests


def predict_forests(forests: list, X: np.ndarray) -> np.ndarray:
    return np.stack([f.predict(X) for f in forests], axis=1)


def fit_forest_trial(trial: TrialConfig, data: dict, session, build: Callable) -> dict:
    """A one-shot forest trial: fit, one report (epoch 1) with the state ``{family: forests}``."""
    tr, va = data["train"], data["val"]
    y_train, y_val = _as_2d(tr["y"]), _as_2d(va["y"])
    _, y_std = target_stats(y_train)
    forests = fit_forests(build, tr["descriptors"], y_train)
    val_mae, task_maes = validation_score(predict_forests(forests, va["descriptors"]), y_val, y_std)
    train_mae, _ = validation_score(predict_forests(forests, tr["descriptors"]), y_train, y_std)
    metrics = {
        "epoch": 1,
        "train_loss": train_mae,
        "val_mae": val_mae,
        "best_val_mae": val_mae,
        "trial_finished": True,
        **_task_metrics(trial, task_maes),
    }
    state = {trial.family: forests}
    session.report(metrics, state)
    return state


# -- LightGBM ---------------------------------------------------------------------------------------


def rounds_per_epoch(config) -> int:
    """Boosting rounds per reported epoch of an lgbm trial: ``lgbm.rounds_per_epoch`` if given,
    else ``ceil(n_estimators / max_epochs)`` (the trial then spans max_epochs epochs)."""
    trial = TrialConfig.parse(config)
    return families.get(trial.family).rounds_per_epoch(trial.params, trial.max_epochs)


def predict_lgbm(state: dict, X: np.ndarray) -> np.ndarray:
    """(n, k) predictions of an lgbm trial state at its best chunk."""
    from .lgbm import ChunkedLGBM

    models = [ChunkedLGBM.from_state(s) for s in state["lgbm"]]
    rounds = state.get("best_rounds")
    return np.stack([m.predict(X, rounds) for m in models], axis=1)


def fit_lgbm(trial: TrialConfig, data: dict, session, build: Callable, chunk: int) -> dict:
    """Chunked LightGBM training (``build()`` gives one unfitted ChunkedLGBM per target, ``chunk``
    rounds per epoch) with a report (and checkpoint) per chunk; returns the last state."""
    from .lgbm import ChunkedLGBM

    tr, va = data["train"], data["val"]
    X_tr, X_va = np.asarray(tr["descriptors"], dtype=np.float64), np.asarray(va["descriptors"], dtype=np.float64)
    y_tr, y_va = _as_2d(tr["y"]), _as_2d(va["y"])
    _, y_std = target_stats(y_tr)
    names = list(trial.targets or [])
    checkpoint_at = set(trial.checkpoint_at)
    labelled = [np.isfinite(y_tr[:, k]) for k in range(y_tr.shape[1])]

    resume = session.get_state()
    if resume is not None:
        models = [ChunkedLGBM.from_state(s) for s in resume["lgbm"]]
        start = int(resume["epoch"]) + 1
        best_val, best_epoch = float(resume["best_val_mae"]), int(resume["best_epoch"])
    else:
        models = [build() for _ in labelled]
        start, best_val, best_epoch = 1, float("inf"), 0
    state = resume
    datasets = [m.dataset(X_tr[rows], y_tr[rows, k]) for k, (m, rows) in enumerate(zip(models, labelled))]
    # predictions kept up to date chunk by chunk (only the new rounds are evaluated)
    val_pred = np.stack([m.predict(X_va) if m.booster_ is not None else np.zeros(len(X_va)) for m in models], axis=1)
    tr_pred = np.stack([m.predict(X_tr) if m.booster_ is not None else np.zeros(len(X_tr)) for m in models], axis=1)
    for epoch in range(start, trial.max_epochs + 1):
        for k, (model, rows) in enumerate(zip(models, labelled)):
            before = model.n_rounds_
            model.boost(X_tr[rows], y_tr[rows, k], chunk, data=datasets[k])
            val_pred[:, k] += model.predict(X_va, start=before)
            tr_pred[:, k] += model.predict(X_tr, start=before)
        val_mae, task_maes = validation_score(val_pred, y_va, y_std)
        if not np.isfinite(val_mae):
            raise FloatingPointError(f"lgbm validation MAE became {val_mae} at epoch {epoch}")
        train_mae, _ = validation_score(tr_pred, y_tr, y_std)
        if val_mae < best_val:
            best_val, best_epoch = val_mae, epoch
        finished = epoch >= trial.max_epochs or epoch - best_epoch >= trial.patience
        metrics = {
            "epoch": epoch,
            "train_loss": train_mae,
            "val_mae": val_mae,
            "best_val_mae": best_val,
            "rounds": epoch * chunk,
            "trial_finished": bool(finished),
        }
        if len(task_maes) > 1:
            metrics.update({f"val_mae_{n}": m for n, m in zip(names, task_maes)})
        if not (finished or epoch % trial.checkpoint_every == 0 or epoch in checkpoint_at):
            session.report(metrics, None)
            continue
        state = {
            "family": "lgbm",
            "lgbm": [m.get_state() for m in models],
            "epoch": epoch,
            "best_val_mae": best_val,
            "best_epoch": best_epoch,
            "best_rounds": best_epoch * chunk,
            "rounds_per_epoch": chunk,
            "target_names": names,
        }
        session.report(metrics, state)
        if finished:
            break
    return state
