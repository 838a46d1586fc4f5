"""Search space of CGCNN (graph only)."""
from __future__ import annotations


def cgcnn_space(trial, prefix: str = "cgcnn/") -> None:
    trial.suggest_categorical(prefix + "hidden", [32, 64, 128])
    trial.suggest_int(prefix + "n_conv", 2, 5)
    trial.suggest_categorical(prefix + "head_hidden", [64, 128, 256])
    trial.suggest_float(prefix + "dropout", 0.0, 0.3)
    trial.suggest_float(prefix + "lr", 3e-4, 1e-2, log=True)
    trial.suggest_float(prefix + "weight_decay", 1e-6, 1e-3, log=True)
    trial.suggest_categorical(prefix + "batch_size", [32, 64, 128])
