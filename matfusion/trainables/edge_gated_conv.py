"""Edge-gated graph convolution (Bresson & Laurent, 2017; as used in ALIGNN, Choudhary &
DeCost, 2021), updating both node and edge features.

For an edge j -> i (PyG's source -> target) with features e_ij, and nodes x:

    e_ij' = e_ij + SiLU(BN(A x_i + B x_j + C e_ij))
    x_i'  = x_i  + SiLU(BN(U x_i + sum_j sigma(e_ij') * V x_j / (sum_j sigma(e_ij') + eps)))

sigma is the logistic function applied per channel, so each channel of the neighbour
messages V x_j is averaged with its own soft weights (the gates), normalized over the
incoming edges of i.  BN is batch normalization over edges and nodes respectively.
"""

from __future__ import annotations

import torch
from torch import nn
from torch_geometric.nn import MessagePassing


def _batch_norm(bn: nn.BatchNorm1d, h: torch.Tensor) -> torch.Tensor:
    # BatchNorm cannot train on fewer than two rows (a batch whose graphs have no edges)
    if bn.training and h.size(0) < 2:
        return h
    return bn(h)


class EdgeGatedGraphConv(MessagePassing):
    """One edge-gated convolution; ``forward(x, edge_index, edge_attr) -> (x', edge_attr')``.

    ``channels`` is the width of both the node and the edge features (kept unchanged).
    """

    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__(aggr="add")
        self.eps = eps
        self.A = nn.Linear(channels, channels)  # target node  -> edge update
        self.B = nn.Linear(channels, channels)  # source node  -> edge update
        self.C = nn.Linear(channels, channels)  # edge itself  -> edge update
        self.U = nn.Linear(channels, channels)  # node itself  -> node update
        self.V = nn.Linear(channels, channels)  # neighbour message
        self.bn_edge = nn.BatchNorm1d(channels)
        self.bn_node = nn.BatchNorm1d(channels)

    def forward(self, x: torch.Tensor, edge_index: torch.Tensor, edge_attr: torch.Tensor):
        src, dst = edge_index[0], edge_index[1]
        # e_ij' = e_ij + SiLU(BN(A x_i + B x_j + C e_ij))
        m = self.A(x)[dst] + self.B(x)[src] + self.C(edge_attr)
        edge_attr = edge_attr + nn.functional.silu(_batch_norm(self.bn_edge, m))
        gate = torch.sigmoid(edge_attr)
        # sum_j sigma(e_ij') * V x_j and sum_j sigma(e_ij'), in one pass
        agg = self.propagate(edge_index, v=self.V(x), gate=gate, size=(x.size(0), x.size(0)))
        num, den = agg.chunk(2, dim=-1)
        h = self.U(x) + num / (den + self.eps)
        x = x + nn.functional.silu(_batch_norm(self.bn_node, h))
        return x, edge_attr

    def message(self, v_j: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        return torch.cat([gate * v_j, gate], dim=-1)
