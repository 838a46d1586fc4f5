"""Search space of CGCNN (graph encoder; the fusion has its own space)."""
from __future__ import annotations

from .params import Categorical, Float, Int

PARAMS = {
    "hidden": Categorical((32, 64, 128)),
    "n_conv": Int(2, 5),
    "head_hidden": Categorical((64, 128, 256)),
    "dropout": Float(0.0, 0.3),
    "lr": Float(3e-4, 1e-2, log=True),
    "weight_decay": Float(1e-6, 1e-3, log=True),
    "batch_size": Categorical((32, 64, 128)),
}
PRESETS = {
    "quick": {"hidden": Categorical((32, 64)), "n_conv": Int(2, 3), "head_hidden": Categorical((64, 128))},
    "thorough": {"hidden": Categorical((32, 64, 128, 256)), "n_conv": Int(2, 6), "lr": Float(1e-4, 1e-2, log=True)},
}
DEFAULTS = {"hidden": 64, "n_conv": 3, "head_hidden": 128, "dropout": 0.0, "lr": 3e-3,
            "weight_decay": 1e-5, "batch_size": 64}


def cgcnn_space(s) -> None:
    s.all(PARAMS)
