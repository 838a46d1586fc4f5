"""CGCNN (Xie & Grossman, 2018) on the crystal graph; the fusion has its own space (:mod:`.fusion`)."""

from __future__ import annotations

from pydantic import Field

from ..spaces.params import Categorical, Float, Int
from .graph import GraphFamily, GraphParams


class CGCNNParams(GraphParams):
    n_conv: int = Field(3, ge=1, description="CGConv layers")
    lr: float = Field(3e-3, gt=0.0, description="AdamW base learning rate (cosine schedule)")


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


class CGCNNFamily(GraphFamily):
    name = "cgcnn"
    order = 40
    Params = CGCNNParams
    PARAMS = PARAMS
    PRESETS = PRESETS

    def encoder(self, params: CGCNNParams, node_features: int, edge_features: int, angle_features: int, n_targets: int):
        from ..trainables.cgcnn import CGCNN

        return CGCNN(
            node_features,
            edge_features,
            hidden=params.hidden,
            n_conv=params.n_conv,
            head_hidden=params.head_hidden,
            dropout=params.dropout,
            n_targets=n_targets,
        )


FAMILY = CGCNNFamily()
DEFAULTS = FAMILY.DEFAULTS
