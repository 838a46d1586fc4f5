"""Training of the tabular families on the descriptor matrix (the ``magpie`` arrays of the trial
data): ``rf`` (random forest), ``et`` (extra trees) and ``lgbm`` (LightGBM).

Multi-target: one model per target, trained on the rows labelled for it.  ``rf`` and ``et``
train in one shot and report once (epoch 1; the search's ASHA leaves them out of its rungs).
``lgbm`` trains in chunks of ``rounds_per_epoch`` boosting rounds, ``ceil(n_estimators /
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

import math
import numpy as np

from ..config import ONE_SHOT_FAMILIES, TABULAR_FAMILIES  # noqa: F401  (re-exported for the trainables)
from .extra_trees import extra_trees
from .lgbm import ChunkedLGBM
from .loop import LocalSession, target_stats, validation_score
from .random_forest import random_forest


def _threads(config: dict) -> int:
    return max(1, int(config.get("cpus", 1)))


def _as_2d(y) -> np.ndarray:
    y = np.asarray(y, dtype=np.float64)
    return y.reshape(len(y), -1)


# -- random forest / extra trees ----------------------------------------------------------------

def forest_from_config(config: dict):
    """The unfitted scikit-learn forest of an ``rf`` or ``et`` trial config."""
    family = config["family"]
    hp = config.get(family, {}) or {}
    seed, n_jobs = int(config.get("seed", 0)), _threads(config)
    if family == "rf":
        return random_forest(n_estimators=hp.get("n_estimators", 300), max_depth=hp.get("max_depth"),
                             min_samples_leaf=hp.get("min_samples_leaf", 1), max_features=hp.get("max_features", 1.0),
                             seed=seed, n_jobs=n_jobs)
    if family == "et":
        return extra_trees(n_estimators=hp.get("n_estimators", 500), max_depth=hp.get("max_depth"),
                           min_samples_leaf=hp.get("min_samples_leaf", 1), max_features=hp.get("max_features", 0.5),
                           bootstrap=bool(hp.get("bootstrap", False)), seed=seed, n_jobs=n_jobs)
    raise ValueError(f"family {family!r} is not a forest; forests: rf, et")


def fit_forests(config: dict, X: np.ndarray, y: np.ndarray) -> list:
    """One fitted forest per target, each on the rows labelled for it."""
    y = _as_2d(y)
    forests = []
    for k in range(y.shape[1]):
        labelled = np.isfinite(y[:, k])
        forests.append(forest_from_config(config).fit(X[labelled], y[labelled, k]))
    return forests


def predict_forests(forests: list, X: np.ndarray) -> np.ndarray:
    return np.stack([f.predict(X) for f in forests], axis=1)


# -- LightGBM ---------------------------------------------------------------------------------------

def lgbm_from_config(config: dict) -> ChunkedLGBM:
    hp = config.get("lgbm", {}) or {}
    return ChunkedLGBM(learning_rate=hp.get("learning_rate", 0.05), num_leaves=hp.get("num_leaves", 31),
                       min_child_samples=hp.get("min_child_samples", 10),
                       feature_fraction=hp.get("feature_fraction", 0.7),
                       bagging_fraction=hp.get("bagging_fraction", 0.8), lambda_l1=hp.get("lambda_l1", 0.0),
                       lambda_l2=hp.get("lambda_l2", 0.0), objective=hp.get("objective", "l2"),
                       max_bin=hp.get("max_bin", 63), seed=int(config.get("seed", 0)), n_jobs=_threads(config))


def rounds_per_epoch(config: dict) -> int:
    """Boosting rounds per reported epoch: ``lgbm.rounds_per_epoch`` if given, else
    ``ceil(n_estimators / max_epochs)`` (the trial then spans max_epochs epochs)."""
    hp = config.get("lgbm", {}) or {}
    if hp.get("rounds_per_epoch"):
        return max(1, int(hp["rounds_per_epoch"]))
    return max(1, math.ceil(int(hp.get("n_estimators", 1000)) / max(1, int(config.get("max_epochs", 30)))))


def predict_lgbm(state: dict, X: np.ndarray) -> np.ndarray:
    """(n, k) predictions of an lgbm trial state at its best chunk."""
    models = [ChunkedLGBM.from_state(s) for s in state["lgbm"]]
    rounds = state.get("best_rounds")
    return np.stack([m.predict(X, rounds) for m in models], axis=1)


def fit_lgbm(config: dict, data: dict, session=None) -> dict:
    """Chunked LightGBM training with a report (and checkpoint) per chunk; returns the last state."""
    session = session or LocalSession()
    tr, va = data["train"], data["val"]
    X_tr, X_va = np.asarray(tr["magpie"], dtype=np.float64), np.asarray(va["magpie"], dtype=np.float64)
    y_tr, y_va = _as_2d(tr["y"]), _as_2d(va["y"])
    _, y_std = target_stats(y_tr)
    names = list(config.get("targets") or [])
    max_epochs = int(config.get("max_epochs", 30))
    patience = int(config.get("patience", 20))
    every = max(1, int(config.get("checkpoint_every", 1)))
    checkpoint_at = {int(e) for e in config.get("checkpoint_at") or ()}
    chunk = rounds_per_epoch(config)
    labelled = [np.isfinite(y_tr[:, k]) for k in range(y_tr.shape[1])]

    resume = session.get_state()
    if resume is not None:
        models = [ChunkedLGBM.from_state(s) for s in resume["lgbm"]]
        start = int(resume["epoch"]) + 1
        best_val, best_epoch = float(resume["best_val_mae"]), int(resume["best_epoch"])
    else:
        models = [lgbm_from_config(config) for _ in labelled]
        start, best_val, best_epoch = 1, float("inf"), 0
    state = resume
    datasets = [m.dataset(X_tr[rows], y_tr[rows, k]) for k, (m, rows) in enumerate(zip(models, labelled))]
    # predictions kept up to date chunk by chunk (only the new rounds are evaluated)
    val_pred = np.stack([m.predict(X_va) if m.booster_ is not None else np.zeros(len(X_va)) for m in models], axis=1)
    tr_pred = np.stack([m.predict(X_tr) if m.booster_ is not None else np.zeros(len(X_tr)) for m in models], axis=1)
    for epoch in range(start, max_epochs + 1):
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
        finished = epoch >= max_epochs or epoch - best_epoch >= patience
        metrics = {"epoch": epoch, "train_loss": train_mae, "val_mae": val_mae, "best_val_mae": best_val,
                   "rounds": epoch * chunk, "trial_finished": bool(finished)}
        if len(task_maes) > 1:
            metrics.update({f"val_mae_{n}": m for n, m in zip(names, task_maes)})
        if not (finished or epoch % every == 0 or epoch in checkpoint_at):
            session.report(metrics, None)
            continue
        state = {"family": "lgbm", "lgbm": [m.get_state() for m in models], "epoch": epoch,
                 "best_val_mae": best_val, "best_epoch": best_epoch, "best_rounds": best_epoch * chunk,
                 "rounds_per_epoch": chunk, "target_names": names}
        session.report(metrics, state)
        if finished:
            break
    return state


# -- one entry point ------------------------------------------------------------------------------

def fit_tabular(config: dict, data: dict, session=None) -> dict:
    """Train the tabular family of ``config`` on the descriptor matrix of ``data`` (from
    ``pack_trial_data``), reporting through ``session``; returns the trained state."""
    family = config["family"]
    session = session or LocalSession()
    if family == "lgbm":
        return fit_lgbm(config, data, session)
    tr, va = data["train"], data["val"]
    y_train, y_val = _as_2d(tr["y"]), _as_2d(va["y"])
    _, y_std = target_stats(y_train)
    forests = fit_forests(config, tr["magpie"], y_train)
    val_mae, task_maes = validation_score(predict_forests(forests, va["magpie"]), y_val, y_std)
    train_mae, _ = validation_score(predict_forests(forests, tr["magpie"]), y_train, y_std)
    metrics = {"epoch": 1, "train_loss": train_mae, "val_mae": val_mae, "best_val_mae": val_mae,
               "trial_finished": True}
    if len(task_maes) > 1:
        metrics.update({f"val_mae_{n}": m for n, m in zip(config.get("targets", []), task_maes)})
    state = {family: forests}
    session.report(metrics, state)
    return state


def predict_tabular(config: dict, state: dict, X: np.ndarray) -> np.ndarray:
    """(n, k) predictions of a trained tabular trial state."""
    family = config["family"]
    if family == "lgbm":
        return predict_lgbm(state, X)
    forests = state[family]
    return predict_forests(forests if isinstance(forests, list) else [forests], X)


def slim_state(config: dict, state: dict) -> dict:
    """What prediction needs of a tabular state (the ensemble keeps these)."""
    if config["family"] == "lgbm":
        return {k: state[k] for k in ("lgbm", "best_rounds", "best_val_mae", "best_epoch", "target_names") if k in state}
    return {config["family"]: state[config["family"]]}
