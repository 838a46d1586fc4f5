"""The Ray Tune trainable: a plain function of ``config`` that trains one model family and
reports to Tune, plus the inverse used after a search: rebuild a trial's model from its
checkpoint and predict.

``config`` is what the search space produced, e.g.::

    {"family": "cgcnn", "cgcnn": {"hidden": 64, "n_conv": 3, "dropout": 0.1, "lr": 1e-3,
     "batch_size": 64, "weight_decay": 1e-5}, "max_epochs": 30, "seed": 0, "patience": 20}
"""
from __future__ import annotations

import os
import pickle
from typing import Optional

import numpy as np
import torch

from .cgcnn import CGCNN
from .loop import CHECKPOINT_FILE, LocalSession, LoopSettings, TuneSession, predict, seed_everything, train_torch_model
from .random_forest import random_forest
from .trial_data import data_list

RF_FILE = "model.pkl"
TORCH_FAMILIES = ("cgcnn",)


def _threads(config: dict) -> int:
    return max(1, int(config.get("cpus", 1)))


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
    )


def build_torch_model(config: dict, node_features: int, edge_features: int, n_targets: int = 1) -> torch.nn.Module:
    family = config["family"]
    hp = config.get(family, {})
    if family == "cgcnn":
        return CGCNN(node_features, edge_features, hidden=int(hp.get("hidden", 64)),
                     n_conv=int(hp.get("n_conv", 3)), head_hidden=int(hp.get("head_hidden", 128)),
                     dropout=float(hp.get("dropout", 0.0)), n_targets=n_targets)
    raise ValueError(f"unknown torch family {family!r}; known: {', '.join(TORCH_FAMILIES)}")


def _rf_from_config(config: dict):
    hp = config.get("rf", {})
    return random_forest(n_estimators=hp.get("n_estimators", 300), max_depth=hp.get("max_depth"),
                         min_samples_leaf=hp.get("min_samples_leaf", 1), max_features=hp.get("max_features", 1.0),
                         seed=int(config.get("seed", 0)), n_jobs=_threads(config))


def fit_family(config: dict, data: dict, session=None) -> dict:
    """Train the family named by ``config["family"]`` on ``data`` (from ``pack_trial_data``)."""
    family = config["family"]
    seed_everything(int(config.get("seed", 0)))
    torch.set_num_threads(_threads(config))
    session = session or LocalSession()
    if family == "rf":
        model = _rf_from_config(config)
        tr, va = data["train"], data["val"]
        model.fit(tr["magpie"], tr["y"])
        val_mae = float(np.mean(np.abs(model.predict(va["magpie"]) - va["y"])))
        train_mae = float(np.mean(np.abs(model.predict(tr["magpie"]) - tr["y"])))
        state = {"rf": model}
        session.report({"epoch": 1, "train_loss": train_mae, "val_mae": val_mae, "best_val_mae": val_mae,
                        "trial_finished": True}, state)
        return state
    if family in TORCH_FAMILIES:
        train_list = data_list(data["train"], data["graph_params"])
        val_list = data_list(data["val"], data["graph_params"])
        n_targets = train_list[0].y.shape[-1]
        model = build_torch_model(config, train_list[0].x.shape[1], train_list[0].edge_attr.shape[1], n_targets)
        return train_torch_model(model, train_list, val_list, loop_settings(config), session=session)
    raise ValueError(f"unknown family {family!r}")


def _write_rf(state: dict, directory: str) -> None:
    with open(os.path.join(directory, RF_FILE), "wb") as fh:
        pickle.dump(state["rf"], fh)


def run_trial(config: dict, data: dict) -> None:
    """The trainable given to ``ray.tune.Tuner`` (via ``tune.with_parameters(run_trial, data=...)``)."""
    session = TuneSession(write=_write_rf) if config["family"] == "rf" else TuneSession()
    fit_family(config, data, session=session)


def predict_from_checkpoint(config: dict, checkpoint_dir: str, part: dict, graph_params: dict) -> np.ndarray:
    """Predictions (n,) or (n, k) of a finished trial's best model on a packed part."""
    family = config["family"]
    if family == "rf":
        with open(os.path.join(checkpoint_dir, RF_FILE), "rb") as fh:
            return pickle.load(fh).predict(part["magpie"])
    state = torch.load(os.path.join(checkpoint_dir, CHECKPOINT_FILE), map_location="cpu", weights_only=False)
    items = data_list(part, graph_params)
    model = build_torch_model(config, items[0].x.shape[1], items[0].edge_attr.shape[1], len(np.atleast_1d(state["y_mean"])))
    model.load_state_dict(state["best_model"])
    model.to(torch.device("cpu"))
    pred = predict(model, items, state["y_mean"], state["y_std"], device=torch.device("cpu"))
    return pred[:, 0] if pred.shape[1] == 1 else pred
