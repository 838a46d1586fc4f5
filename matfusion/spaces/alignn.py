"""Search space of ALIGNN (graph + line graph encoder; the fusion has its own space)."""
from __future__ import annotations

from .params import Categorical, Float, Int

PARAMS = {
    "hidden": Categorical((32, 64, 128)),
    "n_layers": Int(1, 3),
    "n_gcn": Int(0, 2),
    "head_hidden": Categorical((64, 128, 256)),
    "dropout": Float(0.0, 0.3),
    "lr": Float(3e-4, 1e-2, log=True),
    "weight_decay": Float(1e-6, 1e-3, log=True),
    "batch_size": Categorical((32, 64)),
}
PRESETS = {
    "quick": {"hidden": Categorical((32, 64)), "n_layers": Int(1, 2), "n_gcn": Int(0, 1)},
    "thorough": {"hidden": Categorical((32, 64, 128, 256)), "n_layers": Int(1, 4), "n_gcn": Int(0, 3)},
}
DEFAULTS = {"hidden": 64, "n_layers": 2, "n_gcn": 1, "head_hidden": 128, "dropout": 0.0, "lr": 2e-3,
            "weight_decay": 1e-5, "batch_size": 64}


def alignn_space(s) -> None:
    s.all(PARAMS)
