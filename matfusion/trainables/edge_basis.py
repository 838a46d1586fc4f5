"""Bond features computed per batch from the stored bond lengths.

A graph's edges carry their length d (``edge_dist``, one float per edge) and the basis
(``edge_basis``: cutoff, bins, width; one row per graph); a model expands them when it runs,
so a trial's graphs hold one float per edge instead of ``bins``.  The expansion is the one
:func:`matfusion.data.crystal_graph.gaussian_expansion` computes:

    e_k(d) = exp(-(d - mu_k)^2 / w^2),    mu_k evenly spaced on [0, cutoff], k = 1..bins

Graphs made with their ``edge_attr`` already expanded are used as they are.
"""

from __future__ import annotations

import torch

from ..data.crystal_graph import gaussian_basis


def bond_width(data) -> int:
    """The width of a graph's bond features (``bins``)."""
    attr = getattr(data, "edge_attr", None)
    return int(attr.shape[1]) if attr is not None else int(data.edge_basis[0, 1])


def bond_features(data) -> torch.Tensor:
    """(E, bins) bond features of a graph or a batch of graphs."""
    attr = getattr(data, "edge_attr", None)
    if attr is not None:
        return attr
    cutoff, bins, width = data.edge_basis[0].tolist()
    centers, width = gaussian_basis(cutoff, int(bins), width)
    d = data.edge_dist.unsqueeze(1)
    mu = torch.from_numpy(centers).to(d.device)
    # e_k(d) = exp(-(d - mu_k)^2 / w^2)
    return torch.exp(-((d - mu) ** 2) / (width**2))
