"""Bond features expanded per batch from stored lengths equal the stored expansion."""

from __future__ import annotations

import numpy as np
import torch
from pymatgen.core import Lattice, Structure
from torch_geometric.loader import DataLoader

from matfusion.data.crystal_graph import GraphSet, gaussian_expansion, neighbor_graph
from matfusion.trainables.cgcnn import CGCNN
from matfusion.trainables.edge_basis import bond_features, bond_width


def _graphs() -> GraphSet:
    nacl = Structure(Lattice.cubic(5.6), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    si = Structure(Lattice.cubic(5.43), ["Si", "Si"], [[0, 0, 0], [0.25, 0.25, 0.25]])
    cells = [nacl, si, nacl * (2, 1, 1)]
    return GraphSet.from_parts([neighbor_graph(c, 5.0, 12) for c in cells], cutoff=5.0, max_neighbors=12)


def test_lazy_bond_features_equal_the_stored_expansion_and_hold_one_float_per_edge():
    gs = _graphs()
    y = np.arange(len(gs), dtype=float).reshape(-1, 1)
    eager = gs.to_data_list(range(len(gs)), y, gaussian_bins=24)
    lazy = gs.to_data_list(range(len(gs)), y, gaussian_bins=24, expand_edges=False)
    for e, z in zip(eager, lazy):
        assert "edge_attr" not in z and z.edge_dist.shape == (e.edge_attr.shape[0],)
        assert bond_width(z) == bond_width(e) == 24
        torch.testing.assert_close(bond_features(z), e.edge_attr, atol=1e-6, rtol=0)
    # per batch: the batch's lengths expanded at once equal every graph's stored rows
    batch = next(iter(DataLoader(lazy, batch_size=len(lazy))))
    torch.testing.assert_close(bond_features(batch), torch.cat([e.edge_attr for e in eager]), atol=1e-6, rtol=0)
    d = gs.distance
    np.testing.assert_allclose(bond_features(batch).numpy(), gaussian_expansion(d, 5.0, 24), atol=1e-6)


def test_a_model_gives_the_same_predictions_on_lazy_and_stored_bond_features():
    gs = _graphs()
    eager = gs.to_data_list(range(len(gs)), gaussian_bins=16, gaussian_width=0.4)
    lazy = gs.to_data_list(range(len(gs)), gaussian_bins=16, gaussian_width=0.4, expand_edges=False)
    torch.manual_seed(0)
    model = CGCNN(eager[0].x.shape[1], 16, hidden=8, n_conv=2, head_hidden=8).eval()
    with torch.no_grad():
        a = model(next(iter(DataLoader(eager, batch_size=3))))
        b = model(next(iter(DataLoader(lazy, batch_size=3))))
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
