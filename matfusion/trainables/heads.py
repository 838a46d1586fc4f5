"""Regression head shared by every model: y = W_2 dropout(act(W_1 h + b_1)) + b_2."""

from __future__ import annotations

from torch import nn


def regression_head(
    in_features: int, hidden: int, n_targets: int, dropout: float = 0.0, activation: type[nn.Module] = nn.Softplus
) -> nn.Sequential:
    """One output per target (multi-task: one column per task over a shared representation)."""
    return nn.Sequential(
        nn.Linear(in_features, hidden), activation(), nn.Dropout(dropout), nn.Linear(hidden, n_targets)
    )
