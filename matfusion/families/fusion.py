"""The one home of the fusions of a graph encoder with the descriptor (Magpie) branch: their
names, their typed parameters and defaults, their search space and the model wrapper.

- ``none``: the encoder alone;
- ``early`` / ``attention``: the encoder fused with the descriptor MLP branch
  (:class:`~matfusion.trainables.fusion.FusedModel`), with ``comp_hidden`` / ``comp_layers``
  (and ``fusion_dim`` for attention);
- ``late``: alpha * RF + (1 - alpha) * GNN on finished predictions, alpha chosen on the inner
  validation rows (the trainable does it; the forests use the trial's ``rf`` section, else the
  rf family's defaults).
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from ..spaces.params import Categorical, Int
from .base import HyperParams, defaults_of

FUSIONS = ("none", "early", "attention", "late")
# the fusion a graph family's seeded default point takes, first allowed of these
PREFERRED = ("early", "attention", "none", "late")
# fusion -> the fusion parameters it uses
USES = {"none": (), "late": (), "early": ("comp_hidden", "comp_layers"),
        "attention": ("comp_hidden", "comp_layers", "fusion_dim")}


class FusionParams(HyperParams):
    """The fusion fields of a graph family's hyperparameters."""

    fusion: Literal[FUSIONS] = "none"
    comp_hidden: int = Field(128, ge=1, description="width of the descriptor MLP branch")
    comp_layers: int = Field(2, ge=1, description="layers of the descriptor MLP branch")
    fusion_dim: int = Field(128, ge=1, description="attention: width both modalities are projected to")


PARAMS = {
    "comp_hidden": Categorical((64, 128, 256)),
    "comp_layers": Int(1, 3),
    "fusion_dim": Categorical((64, 128)),
}
PRESETS = {"quick": {"comp_hidden": Categorical((64, 128)), "comp_layers": Int(1, 2)}}
DEFAULTS = defaults_of(FusionParams, PARAMS)


def fusion_space(s, fusion: str) -> None:
    """``s`` suggests under the GNN family's prefix; ``fusion`` has already been chosen."""
    for param in USES[fusion]:
        s(param)


def default_fusion(choices) -> str:
    preferred = [f for f in PREFERRED if f in choices]
    return preferred[0] if preferred else choices[0]


def fuse(encoder, params: FusionParams, graph_dim: int, descriptor_features: int, head_hidden: int, dropout: float,
         n_targets: int):
    """The encoder fused with the descriptor branch as ``params.fusion`` asks (``none`` and
    ``late``: the encoder itself)."""
    if params.fusion in ("none", "late"):
        return encoder
    from ..trainables.fusion import FusedModel

    return FusedModel(encoder, graph_dim=graph_dim, fusion=params.fusion, descriptor_dim=descriptor_features,
                      comp_hidden=params.comp_hidden, comp_layers=params.comp_layers, fusion_dim=params.fusion_dim,
                      head_hidden=head_hidden, dropout=dropout, n_targets=n_targets)
