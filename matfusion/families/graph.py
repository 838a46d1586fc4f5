"""What the crystal-graph families (cgcnn, alignn) share: the training hyperparameters of the
torch loop, the fusion with the descriptor branch (:mod:`.fusion`), training by
:func:`matfusion.trainables.trial.fit_graph` and the torch checkpoint (``state.pt``)."""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import Field

from ..spaces.params import Categorical
from . import fusion as _fusion
from .base import GRAPH, Family
from .fusion import FusionParams

LOSSES = ("l1", "mse", "huber")
# what prediction needs of a torch trial state (the optimizer etc. are dropped)
STATE_KEYS = (
    "best_model",
    "y_mean",
    "y_std",
    "descriptor_scaler",
    "fusion",
    "rf",
    "residual",
    "best_hook_state",
    "best_val_mae",
    "best_epoch",
    "target_names",
)


class GraphParams(FusionParams):
    """Hyperparameters every graph family has (its own add the encoder's)."""

    hidden: int = Field(64, ge=1, description="width of the crystal embedding")
    head_hidden: int = Field(128, ge=1, description="width of the head MLP")
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    lr: float = Field(gt=0.0, description="AdamW base learning rate (cosine schedule); each family sets its default")
    weight_decay: float = Field(1e-5, ge=0.0)
    batch_size: int = Field(64, ge=1)
    loss: Literal[LOSSES] = Field("l1", description="per-task loss on standardized targets")


class GraphFamily(Family):
    kind = GRAPH
    one_shot = False
    checkpoint_file = "state.pt"  # matfusion.trainables.loop.CHECKPOINT_FILE

    def search_specs(self, preset: str = "default", fusions=None) -> dict:
        specs = super().search_specs(preset)
        specs["fusion"] = Categorical(tuple(fusions or _fusion.FUSIONS))
        specs.update(_fusion.PARAMS)
        specs.update(_fusion.OPT_IN)
        specs.update(_fusion.PRESETS.get(preset, {}))
        return specs

    def space(self, s) -> None:
        s.all(self.PARAMS)
        _fusion.fusion_space(s, s("fusion"))

    def encoder(self, params, node_features: int, edge_features: int, angle_features: int, n_targets: int):
        """The unfitted encoder (a torch module with ``embed_crystal``)."""
        raise NotImplementedError

    def build(
        self,
        params,
        node_features: int,
        edge_features: int,
        n_targets: int = 1,
        angle_features: int = 0,
        descriptor_features: int = 132,
    ):
        """The encoder, fused with the descriptor branch if ``params.fusion`` asks."""
        encoder = self.encoder(params, node_features, edge_features, angle_features, n_targets)
        return _fusion.fuse(
            encoder,
            params,
            graph_dim=params.hidden,
            descriptor_features=descriptor_features,
            head_hidden=params.head_hidden,
            dropout=params.dropout,
            n_targets=n_targets,
        )

    def fit(self, trial, data: dict, session) -> dict:
        from ..trainables.trial import fit_graph

        return fit_graph(trial, data, session)

    def predict(self, trial, state: dict, part: dict, graph_params: dict) -> np.ndarray:
        from ..trainables.trial import predict_graph

        return predict_graph(trial, state, part, graph_params)

    def write_checkpoint(self, state: dict, directory: str) -> None:
        from ..trainables.loop import write_torch_state

        write_torch_state(state, directory)

    def read_checkpoint(self, directory: str) -> dict:
        import os

        import torch

        return torch.load(os.path.join(directory, self.checkpoint_file), map_location="cpu", weights_only=False)

    def slim_state(self, state: dict) -> dict:
        return {k: state[k] for k in STATE_KEYS if k in state}
