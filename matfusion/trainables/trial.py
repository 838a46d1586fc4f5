"""The Ray Tune trainable: a plain function of ``config`` that trains one model family and
reports to Tune, plus the inverse used after a search: rebuild a trial's model from its
checkpoint and predict.

``config`` is what the search space produced, e.g.::

    {"family": "cgcnn",
     "cgcnn": {"hidden": 64, "n_conv": 3, "dropout": 0.1, "lr": 1e-3, "batch_size": 64,
               "fusion": "early", "comp_hidden": 128, "comp_layers": 2},
     "multitask": {"weighting": "uncertainty"},
     "max_epochs": 30, "seed": 0, "patience": 20, "cpus": 1, "targets": ["K_VRH", "G_VRH"]}

Families: the tabular ones, ``rf`` (random forest), ``et`` (extra trees) and ``lgbm``
(LightGBM, reporting every chunk of boosting rounds), trained on the descriptor matrix by
:mod:`.tabular`, and the graph encoders (``cgcnn``, ...), each
with a ``fusion``: ``none`` (graph only), ``early`` / ``attention`` (with the Magpie MLP
branch, see :mod:`.fusion`), or ``late`` (alpha * RF + (1 - alpha) * GNN, alpha chosen on
the inner validation predictions).
"""
from __future__ import annotations

import os
import pickle
from typing import Optional

import numpy as np

# torch and the graph models are imported where they are used: a tabular trial's Ray worker
# then imports scikit-learn / LightGBM only (seconds less per worker on a busy machine)
from .loop import (CHECKPOINT_FILE, LocalSession, LoopSettings, TuneSession, predict, seed_everything,
                   target_stats, train_torch_model, validation_score)
from . import tabular
from .tabular import ONE_SHOT_FAMILIES, TABULAR_FAMILIES, fit_tabular, predict_tabular
from .trial_data import data_list

RF_FILE = "model.pkl"


def _cgcnn(hp: dict, node_features: int, edge_features: int, angle_features: int, n_targets: int):
    from .cgcnn import CGCNN

    return CGCNN(node_features, edge_features, hidden=int(hp.get("hidden", 64)),
                 n_conv=int(hp.get("n_conv", 3)), head_hidden=int(hp.get("head_hidden", 128)),
                 dropout=float(hp.get("dropout", 0.0)), n_targets=n_targets)


def _alignn(hp: dict, node_features: int, edge_features: int, angle_features: int, n_targets: int):
    from .alignn import ALIGNN

    if angle_features <= 0:
        raise ValueError("alignn needs the line graph: featurize with features.line_graph=true")
    return ALIGNN(node_features, edge_features, angle_features, hidden=int(hp.get("hidden", 64)),
                  n_layers=int(hp.get("n_layers", 2)), n_gcn=int(hp.get("n_gcn", 1)),
                  head_hidden=int(hp.get("head_hidden", 128)), dropout=float(hp.get("dropout", 0.0)),
                  n_targets=n_targets)


# graph encoders: family -> builder(hp, node_features, edge_features, angle_features, n_targets)
ENCODERS = {"cgcnn": _cgcnn, "alignn": _alignn}
TORCH_FAMILIES = tuple(ENCODERS)
LATE_ALPHAS = np.linspace(0.0, 1.0, 21)


def _threads(config: dict) -> int:
    return max(1, int(config.get("cpus", 1)))


def fusion_of(config: dict) -> str:
    return str(config.get(config["family"], {}).get("fusion", "none"))


def loop_settings(config: dict) -> LoopSettings:
    hp = config.get(config["family"], {})
    return LoopSettings(
        max_epochs=int(config.get("max_epochs", 30)),
        lr=float(hp.get("lr", 1e-3)),
        weight_decay=float(hp.get("weight_decay", 1e-5)),
        batch_size=int(hp.get("batch_size", 64)),
        patience=int(config.get("patience", 20)),
        loss=str(hp.get("loss", "l1")),
        seed=int(config.get("seed", 0)),
        checkpoint_every=int(config.get("checkpoint_every", 1)),
        lr_restarts=tuple(int(e) for e in config.get("lr_restarts") or ()),
        checkpoint_at=tuple(int(e) for e in config.get("checkpoint_at") or ()),
    )


def build_torch_model(config: dict, node_features: int, edge_features: int, n_targets: int = 1,
                      angle_features: int = 0, magpie_features: int = 132) -> torch.nn.Module:
    """The encoder of ``config["family"]``, fused with the Magpie branch if the fusion asks."""
    from .fusion import FusedModel

    family = config["family"]
    if family not in ENCODERS:
        raise ValueError(f"unknown graph family {family!r}; known: {', '.join(ENCODERS)}")
    hp = config.get(family, {})
    encoder = ENCODERS[family](hp, node_features, edge_features, angle_features, n_targets)
    fusion = fusion_of(config)
    if fusion in ("none", "late"):
        return encoder
    return FusedModel(encoder, graph_dim=int(hp.get("hidden", 64)), fusion=fusion, magpie_dim=magpie_features,
                      comp_hidden=int(hp.get("comp_hidden", 128)), comp_layers=int(hp.get("comp_layers", 2)),
                      fusion_dim=int(hp.get("fusion_dim", 128)), head_hidden=int(hp.get("head_hidden", 128)),
                      dropout=float(hp.get("dropout", 0.0)), n_targets=n_targets)


def build_criterion(config: dict, n_tasks: int) -> MultiTaskLoss:
    """Fixed task weights (from config, default 1), searched ones, or learned uncertainty."""
    from .multitask import MultiTaskLoss

    mt = config.get("multitask", {}) or {}
    names = list(config.get("targets") or [f"t{k}" for k in range(n_tasks)])
    weighting = mt.get("weighting", "fixed")
    base = str(config.get(config["family"], {}).get("loss", "l1"))
    if weighting == "uncertainty":
        return MultiTaskLoss(n_tasks, weighting="uncertainty", base=base)
    weights = [float(mt.get(f"w_{name}", 1.0)) for name in names] if n_tasks > 1 else None
    return MultiTaskLoss(n_tasks, weights=weights, weighting="fixed", base=base)


# -- Magpie standardization (fitted on the training rows of the trial) -------------------------

def fit_scaler(magpie: np.ndarray) -> dict:
    mean = np.nanmean(np.where(np.isfinite(magpie), magpie, np.nan), axis=0)
    std = np.nanstd(np.where(np.isfinite(magpie), magpie, np.nan), axis=0)
    mean = np.where(np.isfinite(mean), mean, 0.0)
    std = np.where(np.isfinite(std) & (std > 0), std, 1.0)
    return {"mean": mean, "std": std}


def scale(magpie: np.ndarray, scaler: dict) -> np.ndarray:
    z = (magpie - scaler["mean"]) / scaler["std"]
    return np.where(np.isfinite(z), z, 0.0).astype(np.float32)


def _graphs_with_magpie(part: dict, graph_params: dict, scaler: Optional[dict]) -> list:
    import torch

    items = data_list(part, graph_params)
    if scaler is not None:
        z = torch.from_numpy(scale(part["magpie"], scaler))
        for k, d in enumerate(items):
            d.magpie = z[k:k + 1]
    return items


def _feature_widths(item) -> tuple[int, int, int]:
    angle = getattr(item, "lg_edge_attr", None)
    return item.x.shape[1], item.edge_attr.shape[1], 0 if angle is None else angle.shape[1]


# -- the random forest of late fusion (one per target: multi-task labels may be missing) ------

def fit_forests(config: dict, magpie: np.ndarray, y: np.ndarray) -> list:
    """The late-fusion random forests of a GNN trial (``config["rf"]`` parameters, else defaults)."""
    return tabular.fit_forests(dict(config, family="rf"), magpie, y)


predict_forests = tabular.predict_forests


def choose_late_alpha(rf_pred: np.ndarray, gnn_pred: np.ndarray, y: np.ndarray, y_std: np.ndarray) -> tuple[float, float]:
    """alpha in [0, 1] minimizing the validation score of alpha * RF + (1 - alpha) * GNN."""
    scores = [validation_score(a * rf_pred + (1 - a) * gnn_pred, y, y_std)[0] for a in LATE_ALPHAS]
    best = int(np.nanargmin(scores))
    return float(LATE_ALPHAS[best]), float(scores[best])


# -- training ---------------------------------------------------------------------------------

def fit_family(config: dict, data: dict, session=None) -> dict:
    """Train the family named by ``config["family"]`` on ``data`` (from ``pack_trial_data``)."""
    family = config["family"]
    session = session or LocalSession()
    if family in TABULAR_FAMILIES:  # seeded by their own seed parameter; no torch needed
        return fit_tabular(config, data, session)
    import torch

    seed_everything(int(config.get("seed", 0)))
    torch.set_num_threads(_threads(config))
    tr, va = data["train"], data["val"]
    y_train = np.asarray(tr["y"], dtype=np.float64).reshape(len(tr["y"]), -1)
    y_val = np.asarray(va["y"], dtype=np.float64).reshape(len(va["y"]), -1)
    _, y_std = target_stats(y_train)
    if family not in ENCODERS:
        raise ValueError(f"unknown family {family!r}; known: {', '.join(TABULAR_FAMILIES + TORCH_FAMILIES)}")

    fusion = fusion_of(config)
    scaler = fit_scaler(tr["magpie"]) if fusion in ("early", "attention") else None
    train_list = _graphs_with_magpie(tr, data["graph_params"], scaler)
    val_list = _graphs_with_magpie(va, data["graph_params"], scaler)
    n_targets = y_train.shape[1]
    node_f, edge_f, angle_f = _feature_widths(train_list[0])
    model = build_torch_model(config, node_f, edge_f, n_targets, angle_f, tr["magpie"].shape[1])
    extra_state: dict = {"magpie_scaler": scaler, "fusion": fusion}
    val_hook = None
    if fusion == "late":
        forests = fit_forests(config, tr["magpie"], y_train)
        rf_val = predict_forests(forests, va["magpie"])
        extra_state["rf"] = forests
        val_rows = np.asarray(va["row"]).copy()

        def val_hook(gnn_val):
            # alpha is chosen on the inner validation rows only (never on training predictions)
            alpha, _ = choose_late_alpha(rf_val, gnn_val, y_val, y_std)
            blended = alpha * rf_val + (1 - alpha) * gnn_val
            return blended, {"late_alpha": alpha}, {"alpha": alpha, "alpha_rows": val_rows}

    return train_torch_model(model, train_list, val_list, loop_settings(config), session=session,
                             criterion=build_criterion(config, n_targets), val_hook=val_hook,
                             target_names=config.get("targets"), extra_state=extra_state)


def _write_forests(state: dict, directory: str) -> None:
    """The checkpoint of a one-shot forest trial (rf, et): its list of forests, pickled."""
    family = "et" if "et" in state else "rf"
    with open(os.path.join(directory, RF_FILE), "wb") as fh:
        pickle.dump(state[family], fh)


_write_rf = _write_forests  # the earlier name
STATE_PICKLE = "state.pkl"  # the checkpoint of an lgbm trial (its trees as text: no torch needed)


def _write_pickled_state(state: dict, directory: str) -> None:
    with open(os.path.join(directory, STATE_PICKLE), "wb") as fh:
        pickle.dump(state, fh)


def _read_pickled_state(directory: str) -> dict:
    with open(os.path.join(directory, STATE_PICKLE), "rb") as fh:
        return pickle.load(fh)


def run_trial(config: dict, data: dict) -> None:
    """The trainable given to ``ray.tune.Tuner`` (via ``tune.with_parameters(run_trial, data=...)``).
    Forest trials checkpoint their pickled forests, lgbm trials their pickled state (``state.pkl``),
    torch trials a ``state.pt``."""
    family = config["family"]
    if family in ONE_SHOT_FAMILIES:
        session = TuneSession(write=_write_forests)
    elif family in TABULAR_FAMILIES:
        session = TuneSession(write=_write_pickled_state, read=_read_pickled_state)
    else:
        session = TuneSession()
    fit_family(config, data, session=session)


def predict_from_state(config: dict, state: dict, part: dict, graph_params: dict) -> np.ndarray:
    """Predictions (n,) or (n, k) of a trained trial (its best weights) on a packed part."""
    if config["family"] in TABULAR_FAMILIES:
        pred = predict_tabular(config, state, part["magpie"])
        return pred[:, 0] if pred.shape[1] == 1 else pred
    import torch

    items = _graphs_with_magpie(part, graph_params, state.get("magpie_scaler"))
    node_f, edge_f, angle_f = _feature_widths(items[0])
    n_targets = len(np.atleast_1d(state["y_mean"]))
    model = build_torch_model(config, node_f, edge_f, n_targets, angle_f, part["magpie"].shape[1])
    model.load_state_dict(state["best_model"])
    model.to(torch.device("cpu"))
    pred = predict(model, items, state["y_mean"], state["y_std"], device=torch.device("cpu"))
    if state.get("fusion") == "late":
        alpha = state["best_hook_state"]["alpha"]
        pred = alpha * predict_forests(state["rf"], part["magpie"]) + (1 - alpha) * pred
    return pred[:, 0] if pred.shape[1] == 1 else pred


def load_trial_state(config: dict, checkpoint_dir: str) -> dict:
    if config["family"] in ONE_SHOT_FAMILIES:
        with open(os.path.join(checkpoint_dir, RF_FILE), "rb") as fh:
            forests = pickle.load(fh)
        return {config["family"]: forests if isinstance(forests, list) else [forests]}
    if config["family"] in TABULAR_FAMILIES:
        return _read_pickled_state(checkpoint_dir)
    import torch

    return torch.load(os.path.join(checkpoint_dir, CHECKPOINT_FILE), map_location="cpu", weights_only=False)


def predict_from_checkpoint(config: dict, checkpoint_dir: str, part: dict, graph_params: dict) -> np.ndarray:
    """Predictions (n,) or (n, k) of a finished trial's best model on a packed part."""
    return predict_from_state(config, load_trial_state(config, checkpoint_dir), part, graph_params)
