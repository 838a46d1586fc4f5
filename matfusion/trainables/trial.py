"""The Ray Tune trainable: a plain function of ``config`` that trains one model family and
reports to Tune, plus the inverse used after a search: rebuild a trial's model from its
checkpoint and predict.

``config`` is what the search space produced, e.g.::

    {"family": "cgcnn",
     "cgcnn": {"hidden": 64, "n_conv": 3, "dropout": 0.1, "lr": 1e-3, "batch_size": 64,
               "fusion": "early", "comp_hidden": 128, "comp_layers": 2},
     "multitask": {"weighting": "uncertainty"},
     "max_epochs": 30, "seed": 0, "patience": 20, "cpus": 1, "targets": ["K_VRH", "G_VRH"]}

It is parsed once, at the top, into a :class:`~matfusion.families.TrialConfig`; the family
of the registry (:mod:`matfusion.families`) then trains, predicts and checkpoints.  The tabular
families (``rf``, ``et``, ``lgbm``) train on the descriptor matrix through :mod:`.tabular`; the
graph encoders (``cgcnn``, ``alignn``) through :func:`fit_graph` below, each with a ``fusion``:
``none`` (graph only), ``early`` / ``attention`` (with the Magpie MLP branch, see :mod:`.fusion`),
``late`` (alpha * RF + (1 - alpha) * GNN, alpha chosen on the inner validation predictions),
or ``residual`` (t(x) + beta * GNN(x): the encoder learns y - t(x) of a tabular model t, out of
fold on the training rows, see :func:`fit_residual_base`; beta in [0, 1] is chosen on the inner
validation rows, see :func:`choose_residual_beta`).
"""

from __future__ import annotations

import collections
import hashlib
from typing import TYPE_CHECKING, Optional, Union

import numpy as np

from .. import families
from ..families import TrialConfig
from ..families.trial_config import LATE_FOREST_FAMILY

# torch and the graph models are imported where they are used: a tabular trial's Ray worker
# then imports scikit-learn / LightGBM only (seconds less per worker on a busy machine)
from .loop import (
    LocalSession,
    LoopSettings,
    TuneSession,
    predict,
    seed_everything,
    target_stats,
    train_torch_model,
    validation_score,
)
from .tabular import fit_forests as _fit_forests
from .tabular import predict_forests
from .trial_data import graph_dataset

if TYPE_CHECKING:  # annotations only
    import torch

    from .multitask import MultiTaskLoss

LATE_ALPHAS = np.linspace(0.0, 1.0, 21)
Config = Union[TrialConfig, dict]


def loop_settings(config: Config) -> LoopSettings:
    trial = TrialConfig.parse(config)
    hp = trial.params
    return LoopSettings(
        max_epochs=trial.max_epochs,
        lr=hp.lr,
        weight_decay=hp.weight_decay,
        batch_size=hp.batch_size,
        patience=trial.patience,
        loss=hp.loss,
        seed=trial.seed,
        checkpoint_every=trial.checkpoint_every,
        lr_restarts=tuple(trial.lr_restarts),
        checkpoint_at=tuple(trial.checkpoint_at),
    )


def build_torch_model(
    config: Config,
    node_features: int,
    edge_features: int,
    n_targets: int = 1,
    angle_features: int = 0,
    descriptor_features: int = 132,
) -> torch.nn.Module:
    """The encoder of the trial's graph family, fused with the Magpie branch if the fusion asks."""
    trial = TrialConfig.parse(config)
    family = families.get(trial.family)
    if not family.graph:
        raise ValueError(f"unknown graph family {trial.family!r}; known: {', '.join(families.GRAPH)}")
    return family.build(trial.params, node_features, edge_features, n_targets, angle_features, descriptor_features)


def build_criterion(config: Config, n_tasks: int) -> MultiTaskLoss:
    """Fixed task weights (from config, default 1), searched ones, or learned uncertainty."""
    from .multitask import MultiTaskLoss

    trial = TrialConfig.parse(config)
    names = list(trial.targets or [f"t{k}" for k in range(n_tasks)])
    base = trial.params.loss
    if trial.multitask.weighting == "uncertainty":
        return MultiTaskLoss(n_tasks, weighting="uncertainty", base=base)
    weights = [trial.multitask.weight(name) for name in names] if n_tasks > 1 else None
    return MultiTaskLoss(n_tasks, weights=weights, weighting="fixed", base=base)


# -- Magpie standardization (fitted on the training rows of the trial) -------------------------


def fit_scaler(descriptors: np.ndarray) -> dict:
    mean = np.nanmean(np.where(np.isfinite(descriptors), descriptors, np.nan), axis=0)
    std = np.nanstd(np.where(np.isfinite(descriptors), descriptors, np.nan), axis=0)
    mean = np.where(np.isfinite(mean), mean, 0.0)
    std = np.where(np.isfinite(std) & (std > 0), std, 1.0)
    return {"mean": mean, "std": std}


def scale(descriptors: np.ndarray, scaler: dict) -> np.ndarray:
    z = (descriptors - scaler["mean"]) / scaler["std"]
    return np.where(np.isfinite(z), z, 0.0).astype(np.float32)


def _graphs_with_descriptors(part: dict, graph_params: dict, scaler: Optional[dict]):
    descriptors = None if scaler is None else scale(part["descriptors"], scaler)
    return graph_dataset(part, graph_params, descriptors)


def _feature_widths(item) -> tuple[int, int, int]:
    angle = getattr(item, "lg_edge_attr", None)
    from .edge_basis import bond_width

    return item.x.shape[1], bond_width(item), 0 if angle is None else angle.shape[1]


# -- the random forests of late fusion (one per target: multi-task labels may be missing) ------


def fit_forests(config: Config, descriptors: np.ndarray, y: np.ndarray) -> list:
    """The late-fusion forests of a GNN trial (its ``rf`` section, else the rf family's defaults)."""
    trial = TrialConfig.parse(config)
    forest = families.get(LATE_FOREST_FAMILY)
    return _fit_forests(lambda: forest.build(trial.late_forest, seed=trial.seed, n_jobs=trial.threads), descriptors, y)


def choose_late_alpha(
    rf_pred: np.ndarray, gnn_pred: np.ndarray, y: np.ndarray, y_std: np.ndarray
) -> tuple[float, float]:
    """alpha in [0, 1] minimizing the validation score of alpha * RF + (1 - alpha) * GNN."""
    scores = [validation_score(a * rf_pred + (1 - a) * gnn_pred, y, y_std)[0] for a in LATE_ALPHAS]
    best = int(np.nanargmin(scores))
    return float(LATE_ALPHAS[best]), float(scores[best])


# -- the tabular model t of residual fusion (one per target: multi-task labels may be missing) --

RESIDUAL_FOLD_SEED = 24  # mixed with the trial's seed into the folds of the training rows


def _base_params(trial: TrialConfig):
    """t's parameters: the trial's own section of t's family (a graph trial carries an rf section,
    the one of late fusion's forests), else that family's defaults."""
    base = trial.params.residual_base
    return trial.late_forest if base == LATE_FOREST_FAMILY else families.get(base).parse({})


def _fit_base(trial: TrialConfig, X: np.ndarray, y: np.ndarray):
    """One fitted t on (X, y), as its family fits a plain descriptor matrix."""
    family = families.get(trial.params.residual_base)
    return family.fit_matrix(_base_params(trial), X, y, seed=trial.seed, n_jobs=trial.threads)


def _predict_base(base: str, model, X: np.ndarray) -> np.ndarray:
    return families.get(base).predict_matrix(model, X)


# the last few fitted t (a Ray actor reused by the search runs trial after trial: residual trials
# of one search with the same seed and base fit the same t on the same training rows)
_RESIDUAL_MEMO: "collections.OrderedDict[str, dict]" = collections.OrderedDict()
_RESIDUAL_MEMO_SIZE = 2


def _residual_key(trial: TrialConfig, part: dict) -> str:
    """What t depends on: the training part's arrays and the t settings of the trial."""
    h = hashlib.sha256()
    for name in ("descriptors", "y", "row"):
        a = np.ascontiguousarray(part[name])
        h.update(f"{name}{a.dtype}{a.shape}".encode())
        h.update(a.tobytes())
    base = trial.params.residual_base
    settings = _base_params(trial).model_dump()
    h.update(repr((base, trial.params.residual_folds, trial.seed, trial.threads, sorted(settings.items()))).encode())
    return h.hexdigest()


def fit_residual_base(config: Config, part: dict) -> dict:
    """The tabular model t of a residual trial, fitted on the packed training part ``part`` only.

    The training rows are split into ``residual_folds`` seeded folds; for each target, the t of
    fold j is fitted on the labelled rows of the other folds and predicts the rows of fold j
    (``train_pred``: out of fold), and one t fitted on all the labelled training rows
    (``models``, one per target) predicts every other row.  ``fit_rows`` (per target, per fitted
    t: the ``K`` fold models then the full one) records the original row positions (the part's
    ``row``) each t was fitted on, ``fold`` the fold of each training row.  The last two results
    are kept in memory (keyed by the part's arrays and t's settings): the caller must not
    modify the returned dict."""
    trial = TrialConfig.parse(config)
    key = _residual_key(trial, part)
    if key in _RESIDUAL_MEMO:
        _RESIDUAL_MEMO.move_to_end(key)
        return _RESIDUAL_MEMO[key]
    residual = _fit_residual_base(trial, part)
    _RESIDUAL_MEMO[key] = residual
    while len(_RESIDUAL_MEMO) > _RESIDUAL_MEMO_SIZE:
        _RESIDUAL_MEMO.popitem(last=False)
    return residual


def _fit_residual_base(trial: TrialConfig, part: dict) -> dict:
    base, n_folds = trial.params.residual_base, trial.params.residual_folds
    X = np.asarray(part["descriptors"], dtype=np.float64)
    y = np.asarray(part["y"], dtype=np.float64).reshape(len(X), -1)
    rows = np.asarray(part["row"], dtype=np.int64)
    if len(X) < n_folds:
        raise ValueError(f"residual fusion: {len(X)} training rows cannot make residual_folds={n_folds} folds")
    fold = np.random.default_rng([trial.seed, RESIDUAL_FOLD_SEED]).permutation(len(X)) % n_folds
    train_pred = np.full(y.shape, np.nan)
    models, fit_rows = [], []
    for k in range(y.shape[1]):
        labelled = np.isfinite(y[:, k])
        rows_k = []
        for j in range(n_folds):
            fit = labelled & (fold != j)
            if not fit.any():
                raise ValueError(f"residual fusion: target {k} has no labelled training row outside fold {j}")
            held = fold == j
            train_pred[held, k] = _predict_base(base, _fit_base(trial, X[fit], y[fit, k]), X[held])
            rows_k.append(rows[fit])
        models.append(_fit_base(trial, X[labelled], y[labelled, k]))
        rows_k.append(rows[labelled])
        fit_rows.append(rows_k)
    return {
        "base": base,
        "models": models,
        "train_pred": train_pred,
        "train_rows": rows,
        "fold": fold,
        "fit_rows": fit_rows,
    }


def predict_residual_base(residual: dict, X: np.ndarray) -> np.ndarray:
    """(n, k) predictions of the full t (fitted on all the training rows) of a residual state."""
    X = np.asarray(X, dtype=np.float64)
    return np.stack([_predict_base(residual["base"], m, X) for m in residual["models"]], axis=1)


def choose_residual_beta(t_val: np.ndarray, gnn_val: np.ndarray, y_val: np.ndarray) -> np.ndarray:
    """(k,) beta in [0, 1] per target: the one minimizing the validation MAE of t + beta * GNN.

    ``t_val``, ``gnn_val``, ``y_val``: (n, k) t's predictions, the encoder's predictions of the
    residual and the labels, all on the trial's inner validation rows and nothing else (the rows
    early stopping already selects the epoch on: choosing beta there uses no row the trial did
    not already select on, and never a test row).  A missing label (NaN) leaves its row out of
    its target's fit.  sum_i |r_i - beta g_i| (r = y - t, g = GNN) is convex in beta, so its
    minimizer over [0, 1] is the unconstrained one clipped: the weighted median of r_i / g_i
    with weights |g_i| (rows with g_i = 0 add a constant).  A target without such a row (no
    labelled validation row, or a GNN output of 0) keeps beta = 1 (the plain residual fusion).
    Closed form rather than least squares: the MAE is what the trial reports and selects on."""
    shape = np.shape(gnn_val)
    t_val, gnn_val = (np.asarray(a, dtype=np.float64).reshape(shape[0], -1) for a in (t_val, gnn_val))
    y_val = np.asarray(y_val, dtype=np.float64).reshape(gnn_val.shape)
    betas = np.ones(gnn_val.shape[1])
    for k in range(gnn_val.shape[1]):
        r, g = y_val[:, k] - t_val[:, k], gnn_val[:, k]
        use = np.isfinite(r) & np.isfinite(g) & (g != 0)
        if not use.any():
            continue
        ratio, weight = r[use] / g[use], np.abs(g[use])
        order = np.argsort(ratio, kind="stable")
        cum = np.cumsum(weight[order])
        median = ratio[order][int(np.searchsorted(cum, 0.5 * cum[-1]))]
        betas[k] = float(np.clip(median, 0.0, 1.0))
    return betas


def residual_beta_metrics(beta: np.ndarray, names: Optional[list]) -> dict:
    """``residual_beta`` (the mean over targets), and ``residual_beta_<target>`` with several."""
    out = {"residual_beta": float(np.mean(beta))}
    if len(beta) > 1:
        for k, name in enumerate(names or [f"t{k}" for k in range(len(beta))]):
            out[f"residual_beta_{name}"] = float(beta[k])
    return out


def residual_beta_of(state: dict, n_targets: int) -> np.ndarray:
    """The (k,) beta a residual state predicts with (1: a state saved before the blend)."""
    beta = (state.get("best_hook_state") or {}).get("beta")
    return np.ones(n_targets) if beta is None else np.asarray(beta, dtype=np.float64).reshape(n_targets)


# -- graph families: training and prediction ---------------------------------------------------


def fit_graph(trial: TrialConfig, data: dict, session) -> dict:
    """Train the graph family of ``trial`` (encoder + fusion) with the torch loop."""
    import torch

    seed_everything(trial.seed)
    torch.set_num_threads(trial.threads)
    tr, va = data["train"], data["val"]
    y_train = np.asarray(tr["y"], dtype=np.float64).reshape(len(tr["y"]), -1)
    y_val = np.asarray(va["y"], dtype=np.float64).reshape(len(va["y"]), -1)
    _, y_std = target_stats(y_train)

    fusion = families.fusion_of(trial)
    scaler = fit_scaler(tr["descriptors"]) if fusion in ("early", "attention") else None
    residual = None
    if fusion == "residual":
        # t sees the training part only; the GNN learns y - t(x) with t(x) out of fold
        residual = fit_residual_base(trial, tr)
        tr = {**tr, "y": (y_train - residual["train_pred"]).reshape(np.shape(tr["y"]))}
    train_list = _graphs_with_descriptors(tr, data["graph_params"], scaler)
    val_list = _graphs_with_descriptors(va, data["graph_params"], scaler)
    n_targets = y_train.shape[1]
    node_f, edge_f, angle_f = _feature_widths(train_list[0])
    model = build_torch_model(trial, node_f, edge_f, n_targets, angle_f, tr["descriptors"].shape[1])
    extra_state: dict = {"descriptor_scaler": scaler, "fusion": fusion}
    val_hook, score_std, extra_metrics = None, None, None
    if fusion == "late":
        forests = fit_forests(trial, tr["descriptors"], y_train)
        rf_val = predict_forests(forests, va["descriptors"])
        extra_state["rf"] = forests
        val_rows = np.asarray(va["row"]).copy()

        def val_hook(gnn_val):
            # alpha is chosen on the inner validation rows only (never on training predictions)
            alpha, _ = choose_late_alpha(rf_val, gnn_val, y_val, y_std)
            blended = alpha * rf_val + (1 - alpha) * gnn_val
            return blended, {"late_alpha": alpha}, {"alpha": alpha, "alpha_rows": val_rows}

    if residual is not None:
        base_val = predict_residual_base(residual, va["descriptors"])
        extra_state["residual"] = residual
        score_std = y_std  # scored on the real targets (the loop's own std is the residuals')
        extra_metrics = {"residual_base_val_mae": validation_score(base_val, y_val, y_std)[0]}

        blend, val_rows = trial.params.residual_blend, np.asarray(va["row"]).copy()

        def val_hook(gnn_val):
            # beta is chosen on the inner validation rows only (those early stopping selects on)
            beta = choose_residual_beta(base_val, gnn_val, y_val) if blend else np.ones(gnn_val.shape[1])
            state = {"beta": beta, "beta_rows": val_rows}
            return base_val + beta * gnn_val, residual_beta_metrics(beta, trial.targets), state

    return train_torch_model(
        model,
        train_list,
        val_list,
        loop_settings(trial),
        session=session,
        criterion=build_criterion(trial, n_targets),
        val_hook=val_hook,
        target_names=trial.targets,
        extra_state=extra_state,
        score_std=score_std,
        extra_metrics=extra_metrics,
    )


def predict_graph(trial: TrialConfig, state: dict, part: dict, graph_params: dict) -> np.ndarray:
    """(n, k) predictions of a trained graph trial state (its best weights)."""
    import torch

    scaler = state.get(
        "descriptor_scaler", state.get("magpie_scaler")
    )  # magpie_scaler: the key of models saved before 2026-12
    items = _graphs_with_descriptors(part, graph_params, scaler)
    node_f, edge_f, angle_f = _feature_widths(items[0])
    n_targets = len(np.atleast_1d(state["y_mean"]))
    model = build_torch_model(trial, node_f, edge_f, n_targets, angle_f, part["descriptors"].shape[1])
    model.load_state_dict(state["best_model"])
    model.to(torch.device("cpu"))
    pred = predict(model, items, state["y_mean"], state["y_std"], device=torch.device("cpu"))
    if state.get("fusion") == "late":
        alpha = state["best_hook_state"]["alpha"]
        pred = alpha * predict_forests(state["rf"], part["descriptors"]) + (1 - alpha) * pred
    elif state.get("fusion") == "residual":
        beta = residual_beta_of(state, pred.shape[1])
        pred = predict_residual_base(state["residual"], part["descriptors"]) + beta * pred
    return pred


# -- the entry points: parse the trial config once, then the family does the work -------------


def fit_family(config: Config, data: dict, session=None) -> dict:
    """Train the family named by ``config["family"]`` on ``data`` (from ``pack_trial_data``)."""
    trial = TrialConfig.parse(config)
    return families.get(trial.family).fit(trial, data, session or LocalSession())


def run_trial(config: Config, data: dict, faults: tuple = ()) -> None:
    """The trainable given to ``ray.tune.Tuner`` (via ``tune.with_parameters(run_trial, data=...)``);
    checkpoints in the family's format (forests ``model.pkl``, lgbm ``state.pkl``, torch ``state.pt``).

    Its faults are the trial's, each with a one-line reason (:mod:`matfusion.trainables.guards`): a
    report with a non-finite loss or validation MAE stops it (``NonFiniteLossError``); a checkpoint
    that cannot be read raises ``CorruptCheckpointError`` naming it; torch's allocator failure is
    raised as a ``MemoryError`` (``TrialOutOfMemory``) like Python's own.  ``faults``: the
    injected faults of the search (``MATFUSION_INJECT_FAULTS``; tests and drills only)."""
    from .guards import CheckedSession, FaultySession, as_memory_error, checked_reader

    trial = TrialConfig.parse(config)
    family = families.get(trial.family)
    session = CheckedSession(
        TuneSession(write=family.write_checkpoint, read=checked_reader(family.read_checkpoint, trial.family)),
        trial.family,
    )
    mine = [f for f in faults if f.family == trial.family]
    if mine:
        session = FaultySession(session, mine)
    try:
        family.fit(trial, data, session)
    except RuntimeError as err:
        oom = as_memory_error(err)
        if oom is None:
            raise
        raise oom from err


def predict_from_state(config: Config, state: dict, part: dict, graph_params: dict) -> np.ndarray:
    """Predictions (n,) or (n, k) of a trained trial (its best weights) on a packed part."""
    trial = TrialConfig.parse(config)
    pred = families.get(trial.family).predict(trial, state, part, graph_params)
    return pred[:, 0] if pred.shape[1] == 1 else pred


def load_trial_state(config: Config, checkpoint_dir: str) -> dict:
    """The state in a finished trial's checkpoint directory (the family's format)."""
    return families.get(TrialConfig.parse(config).family).read_checkpoint(checkpoint_dir)


def predict_from_checkpoint(config: Config, checkpoint_dir: str, part: dict, graph_params: dict) -> np.ndarray:
    """Predictions (n,) or (n, k) of a finished trial's best model on a packed part."""
    return predict_from_state(config, load_trial_state(config, checkpoint_dir), part, graph_params)
