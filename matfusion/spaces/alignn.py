"""Search space of ALIGNN (graph + line graph)."""
from __future__ import annotations


def alignn_space(trial, prefix: str = "alignn/") -> None:
    trial.suggest_categorical(prefix + "hidden", [32, 64, 128])
    trial.suggest_int(prefix + "n_layers", 1, 3)
    trial.suggest_int(prefix + "n_gcn", 0, 2)
    trial.suggest_categorical(prefix + "head_hidden", [64, 128, 256])
    trial.suggest_float(prefix + "dropout", 0.0, 0.3)
    trial.suggest_float(prefix + "lr", 3e-4, 1e-2, log=True)
    trial.suggest_float(prefix + "weight_decay", 1e-6, 1e-3, log=True)
    trial.suggest_categorical(prefix + "batch_size", [32, 64])
