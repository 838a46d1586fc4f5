"""CGCNN (Xie & Grossman, 2018) on a crystal graph, built from PyG's ``CGConv``.

Each layer updates every atom from its neighbours j with the edge features e_ij:

    z_ij = x_i || x_j || e_ij
    x_i' = x_i + sum_j sigmoid(z_ij W_f + b_f) * softplus(z_ij W_s + b_s)

then a mean over atoms gives the crystal embedding, and an MLP head gives the targets:

    h = mean_i x_i^(L),    y = W_2 dropout(softplus(W_1 h + b_1)) + b_2
"""

from __future__ import annotations

import torch
from torch import nn
from torch_geometric.nn import CGConv, global_mean_pool

from .edge_basis import bond_features
from .heads import regression_head


class CGCNN(nn.Module):
    """Crystal graph convolutional network.

    Parameters: ``node_features`` (width of ``data.x``), ``edge_features`` (width of the bond
    features, :func:`~matfusion.trainables.edge_basis.bond_features`), ``hidden`` (atom embedding
    width), ``n_conv`` (CGConv layers), ``head_hidden`` (width of the head MLP), ``dropout`` (before the output layer),
    ``n_targets`` (outputs per crystal).
    """

    def __init__(
        self,
        node_features: int,
        edge_features: int,
        hidden: int = 64,
        n_conv: int = 3,
        head_hidden: int = 128,
        dropout: float = 0.0,
        n_targets: int = 1,
    ) -> None:
        super().__init__()
        self.embed = nn.Linear(node_features, hidden)
        self.convs = nn.ModuleList(
            [CGConv(hidden, dim=edge_features, aggr="add", batch_norm=True) for _ in range(n_conv)]
        )
        self.head = regression_head(hidden, head_hidden, n_targets, dropout)

    def embed_crystal(self, data) -> torch.Tensor:
        """Pooled crystal embedding h (batch, hidden)."""
        x = self.embed(data.x)
        e = bond_features(data)
        for conv in self.convs:
            x = conv(x, data.edge_index, e)
        return global_mean_pool(x, data.batch)

    def forward(self, data) -> torch.Tensor:
        return self.head(self.embed_crystal(data))
