"""Search space of the fusion of a graph encoder with the Magpie branch (per GNN family)."""
from __future__ import annotations

from typing import Sequence


def fusion_space(trial, prefix: str, fusions: Sequence[str]) -> str:
    fusion = trial.suggest_categorical(prefix + "fusion", list(fusions))
    if fusion in ("early", "attention"):
        trial.suggest_categorical(prefix + "comp_hidden", [64, 128, 256])
        trial.suggest_int(prefix + "comp_layers", 1, 3)
    if fusion == "attention":
        trial.suggest_categorical(prefix + "fusion_dim", [64, 128])
    return fusion
