"""Fusion of a crystal-graph encoder (CGCNN or ALIGNN) with the Magpie composition branch.

With h_g the pooled graph embedding and h_c the composition embedding:

- ``early``:      y = head([h_g || h_c])
- ``attention``:  p_m = P_m h_m (both modalities projected to width d),
                  s_m = v^T tanh(W p_m + b),  a = softmax_m(s_m),
                  y = head(sum_m a_m p_m)
  the per-sample weights a (batch, 2; columns graph, composition) are returned by
  :meth:`FusedModel.forward_with_attention` and sum to one.

(``none`` is the encoder alone; ``late`` fusion blends finished predictions and lives in
the trainable, not here.)
"""

from __future__ import annotations

import torch
from torch import nn

from .composition import CompositionMLP
from .heads import regression_head


def _head(width: int, head_hidden: int, dropout: float, n_targets: int) -> nn.Sequential:
    return regression_head(width, head_hidden, n_targets, dropout, activation=nn.SiLU)


class FusedModel(nn.Module):
    """``encoder`` must provide ``embed_crystal(data) -> (batch, graph_dim)``; the batch must
    carry ``data.descriptors`` (batch, descriptor_dim), standardized."""

    def __init__(
        self,
        encoder: nn.Module,
        graph_dim: int,
        fusion: str = "early",
        descriptor_dim: int = 132,
        comp_hidden: int = 128,
        comp_layers: int = 2,
        fusion_dim: int = 128,
        head_hidden: int = 128,
        dropout: float = 0.0,
        n_targets: int = 1,
    ) -> None:
        super().__init__()
        if fusion not in ("early", "attention"):
            raise ValueError(f"FusedModel fuses 'early' or 'attention', not {fusion!r}")
        self.fusion = fusion
        self.encoder = encoder
        self.composition = CompositionMLP(descriptor_dim, comp_hidden, comp_layers, dropout)
        if fusion == "early":
            self.head = _head(graph_dim + comp_hidden, head_hidden, dropout, n_targets)
        else:
            self.project_graph = nn.Linear(graph_dim, fusion_dim)
            self.project_comp = nn.Linear(comp_hidden, fusion_dim)
            self.score = nn.Sequential(
                nn.Linear(fusion_dim, fusion_dim), nn.Tanh(), nn.Linear(fusion_dim, 1, bias=False)
            )
            self.head = _head(fusion_dim, head_hidden, dropout, n_targets)
        self.attention_weights: torch.Tensor | None = None  # last batch's weights, for logging

    def forward_with_attention(self, data):
        h_g = self.encoder.embed_crystal(data)
        h_c = self.composition(data.descriptors)
        if self.fusion == "early":
            return self.head(torch.cat([h_g, h_c], dim=-1)), None
        p = torch.stack([self.project_graph(h_g), self.project_comp(h_c)], dim=1)  # (B, 2, d)
        a = torch.softmax(self.score(p).squeeze(-1), dim=1)  # (B, 2)
        return self.head((a.unsqueeze(-1) * p).sum(dim=1)), a

    def forward(self, data):
        pred, a = self.forward_with_attention(data)
        self.attention_weights = None if a is None else a.detach()
        return pred
