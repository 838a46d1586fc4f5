"""ALIGNN (Choudhary & DeCost, 2021): edge-gated convolutions on the crystal graph and on its
line graph, so that bond angles inform the bond features.

Inputs (from ``GraphSet.to_data_list`` on a set featurized with ``line_graph=True``): atom
features ``x``, bond features ``edge_attr`` (Gaussian-expanded distances) on ``edge_index``,
and angle features ``lg_edge_attr`` (Gaussian-expanded bond-angle cosines) on
``lg_edge_index``, the line graph whose nodes are the bonds.  After embedding each of them
(h = SiLU(W f + b)) into ``hidden`` channels, x (atoms), y (bonds), t (angles):

    ALIGNN layer  (n_layers times; every convolution below is residual, see EdgeGatedGraphConv)
        y, t = EGGC_line(y, lg_edge_index, t)      # bonds exchange messages through angles
        x, y = EGGC_atom(x, edge_index, y)         # atoms, with the updated bonds
    GCN layer     (n_gcn times)
        x, y = EGGC(x, edge_index, y)

then the same pooling and head as :class:`matfusion.trainables.cgcnn.CGCNN`:

    h = mean_i x_i,    y_hat = W_2 dropout(softplus(W_1 h + b_1)) + b_2
"""

from __future__ import annotations

import torch
from torch import nn
from torch_geometric.nn import global_mean_pool

from .edge_basis import bond_features
from .edge_gated_conv import EdgeGatedGraphConv
from .heads import regression_head


class ALIGNNLayer(nn.Module):
    """One line-graph convolution (bonds and angles) followed by one atom-graph convolution."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.line_conv = EdgeGatedGraphConv(hidden)
        self.atom_conv = EdgeGatedGraphConv(hidden)

    def forward(self, x, y, t, edge_index, lg_edge_index):
        y, t = self.line_conv(y, lg_edge_index, t)
        x, y = self.atom_conv(x, edge_index, y)
        return x, y, t


def _embedding(n_in: int, n_out: int) -> nn.Module:
    return nn.Sequential(nn.Linear(n_in, n_out), nn.SiLU())


class ALIGNN(nn.Module):
    """Atomistic line graph neural network.

    Parameters: ``node_features`` (width of ``data.x``), ``edge_features`` (width of
    ``data.edge_attr``), ``angle_features`` (width of ``data.lg_edge_attr``), ``hidden``
    (width of atom, bond and angle embeddings), ``n_layers`` (ALIGNN layers), ``n_gcn``
    (atom-graph-only edge-gated layers after them), ``head_hidden``, ``dropout`` (before the
    output layer), ``n_targets`` (outputs per crystal).
    """

    def __init__(
        self,
        node_features: int,
        edge_features: int,
        angle_features: int,
        hidden: int = 64,
        n_layers: int = 2,
        n_gcn: int = 1,
        head_hidden: int = 128,
        dropout: float = 0.0,
        n_targets: int = 1,
    ) -> None:
        super().__init__()
        self.embed_atom = _embedding(node_features, hidden)
        self.embed_bond = _embedding(edge_features, hidden)
        self.embed_angle = _embedding(angle_features, hidden)
        self.alignn_layers = nn.ModuleList([ALIGNNLayer(hidden) for _ in range(n_layers)])
        self.gcn_layers = nn.ModuleList([EdgeGatedGraphConv(hidden) for _ in range(n_gcn)])
        self.head = regression_head(hidden, head_hidden, n_targets, dropout)

    def embed_crystal(self, data) -> torch.Tensor:
        """Pooled crystal embedding h (batch, hidden)."""
        if getattr(data, "lg_edge_index", None) is None:
            raise ValueError(
                "ALIGNN needs the line graph (lg_edge_index / lg_edge_attr): featurize with "
                "FeaturesConfig.line_graph=True"
            )
        x = self.embed_atom(data.x)
        y = self.embed_bond(bond_features(data))
        t = self.embed_angle(data.lg_edge_attr)
        for layer in self.alignn_layers:
            x, y, t = layer(x, y, t, data.edge_index, data.lg_edge_index)
        for conv in self.gcn_layers:
            x, y = conv(x, data.edge_index, y)
        return global_mean_pool(x, data.batch)

    def forward(self, data) -> torch.Tensor:
        return self.head(self.embed_crystal(data))
