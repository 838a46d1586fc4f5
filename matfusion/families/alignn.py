"""ALIGNN (Choudhary & DeCost, 2021): the crystal graph and its line graph (bond angles); needs
``features.line_graph``.  The fusion has its own space (:mod:`.fusion`)."""

from __future__ import annotations

from pydantic import Field

from ..spaces.params import Categorical, Float, Int
from .graph import GraphFamily, GraphParams


class ALIGNNParams(GraphParams):
    n_layers: int = Field(2, ge=0, description="ALIGNN layers (line graph + atom graph)")
    n_gcn: int = Field(1, ge=0, description="atom-graph-only edge-gated layers after them")
    lr: float = Field(2e-3, gt=0.0, description="AdamW base learning rate (cosine schedule)")


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


class ALIGNNFamily(GraphFamily):
    name = "alignn"
    order = 50
    Params = ALIGNNParams
    PARAMS = PARAMS
    PRESETS = PRESETS
    needs_line_graph = True

    def encoder(
        self, params: ALIGNNParams, node_features: int, edge_features: int, angle_features: int, n_targets: int
    ):
        from ..trainables.alignn import ALIGNN

        if angle_features <= 0:
            raise ValueError("alignn needs the line graph: featurize with features.line_graph=true")
        return ALIGNN(
            node_features,
            edge_features,
            angle_features,
            hidden=params.hidden,
            n_layers=params.n_layers,
            n_gcn=params.n_gcn,
            head_hidden=params.head_hidden,
            dropout=params.dropout,
            n_targets=n_targets,
        )


FAMILY = ALIGNNFamily()
DEFAULTS = FAMILY.DEFAULTS
