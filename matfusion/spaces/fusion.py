"""Search space of the fusion of a graph encoder with the Magpie branch (per GNN family):
each fusion brings only its own parameters."""
from __future__ import annotations

from .params import Categorical, Int

PARAMS = {
    "comp_hidden": Categorical((64, 128, 256)),
    "comp_layers": Int(1, 3),
    "fusion_dim": Categorical((64, 128)),
}
PRESETS = {"quick": {"comp_hidden": Categorical((64, 128)), "comp_layers": Int(1, 2)}}
DEFAULTS = {"comp_hidden": 128, "comp_layers": 2, "fusion_dim": 128}


def fusion_space(s, fusion: str) -> None:
    """``s`` suggests under the GNN family's prefix; ``fusion`` has already been chosen."""
    if fusion in ("early", "attention"):
        s("comp_hidden")
        s("comp_layers")
    if fusion == "attention":
        s("fusion_dim")
