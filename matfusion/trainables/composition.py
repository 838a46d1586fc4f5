"""Composition branch: an MLP on standardized Magpie features.

h_c = MLP(m) = SiLU(W_L ... dropout(SiLU(W_1 m + b_1)) ... + b_L)
"""

from __future__ import annotations

from torch import nn


class CompositionMLP(nn.Module):
    """MLP embedding of a (batch, in_features) Magpie matrix into (batch, hidden)."""

    def __init__(self, in_features: int = 132, hidden: int = 128, n_layers: int = 2, dropout: float = 0.0) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = in_features
        for _ in range(max(1, n_layers)):
            layers += [nn.Linear(width, hidden), nn.SiLU(), nn.Dropout(dropout)]
            width = hidden
        self.net = nn.Sequential(*layers)
        self.out_features = hidden

    def forward(self, descriptors):
        return self.net(descriptors)
