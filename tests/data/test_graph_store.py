"""The lazy graph dataset: the same items and batches as the eager list, graphs built only when read,
and a seeded trial that trains to the same history and predictions either way."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from pymatgen.core import Lattice, Structure
from torch_geometric.loader import DataLoader

from matfusion.data.crystal_graph import GraphSet, neighbor_graph
from matfusion.data.graph_store import LazyGraphDataset
from matfusion.data.line_graph import line_graph
from matfusion.trainables.loop import LocalSession, stacked_targets
from matfusion.trainables.trial import fit_family, predict_from_state
from matfusion.trainables.trial_data import EAGER_GRAPHS_ENV, graph_dataset, pack_rows, pack_trial_data

CUTOFF = 4.5


def structures(n: int, seed: int = 0) -> list[Structure]:
    """``n`` small crystals (rock salt, diamond Si, CsCl, with a few atoms each) strained and shaken, seeded."""
    rng = np.random.default_rng(seed)
    bases = [
        (5.64, ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]]),
        (5.43, ["Si", "Si"], [[0, 0, 0], [0.25, 0.25, 0.25]]),
        (4.12, ["Cs", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]]),
        (3.6, ["Cu"], [[0, 0, 0]]),
    ]
    out = []
    for k in range(n):
        a, species, coords = bases[k % len(bases)]
        lattice = Lattice(np.diag(a * (1 + rng.uniform(-0.02, 0.02, 3))))
        frac = np.asarray(coords, float) + rng.normal(0, 0.01, (len(coords), 3))
        s = Structure(lattice, species, frac)
        out.append(s * (2, 1, 1) if k % 3 == 0 else s)
    return out


def graph_set(n: int, with_line_graph: bool = False) -> GraphSet:
    parts = []
    for s in structures(n):
        g = neighbor_graph(s, CUTOFF, 12)
        parts.append(g + line_graph(g[1], g[3]) if with_line_graph else g)
    return GraphSet.from_parts(parts, CUTOFF, 12)


def assert_same_data(a, b) -> None:
    assert sorted(a.keys()) == sorted(b.keys())
    for key in a.keys():
        torch.testing.assert_close(a[key], b[key], atol=0, rtol=0, msg=key)


@pytest.mark.parametrize("with_line_graph", [False, True])
def test_lazy_items_and_shuffled_batches_equal_the_eager_list(with_line_graph):
    gs = graph_set(10, with_line_graph)
    y = np.arange(20.0).reshape(10, 2)
    desc = np.random.default_rng(1).normal(size=(10, 5)).astype(np.float32)
    eager = gs.to_data_list(range(10), y, gaussian_bins=16, expand_edges=False)
    z = torch.from_numpy(desc)
    for k, d in enumerate(eager):
        d.descriptors = z[k : k + 1]
    lazy = LazyGraphDataset(gs, y, desc, gaussian_bins=16)
    assert len(lazy) == 10
    for k in range(10):
        assert_same_data(lazy[k], eager[k])
    assert_same_data(lazy[-1], eager[-1])
    assert [d.num_nodes for d in lazy[2:5]] == [d.num_nodes for d in eager[2:5]]
    with pytest.raises(IndexError, match="graph 10 out of range for 10 graphs"):
        lazy[10]
    # the loader of the training loop: shuffled with a seeded generator, the same batches
    loaders = [
        DataLoader(items, batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(7))
        for items in (eager, lazy)
    ]
    n_batches = 0
    for a, b in zip(*loaders):
        assert_same_data(a, b)
        n_batches += 1
    assert n_batches == 3
    torch.testing.assert_close(lazy.y, torch.cat([d.y for d in eager]), atol=0, rtol=0)


def test_a_loader_over_the_lazy_dataset_builds_only_the_graphs_it_reads():
    gs = graph_set(12)
    lazy = LazyGraphDataset(gs, np.arange(12.0))
    np.testing.assert_array_equal(stacked_targets(lazy), np.arange(12.0).reshape(12, 1))
    assert lazy.accesses == 0  # the targets come without building a graph
    batches = iter(DataLoader(lazy, batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(0)))
    first = next(batches)
    assert first.num_graphs == 4 and lazy.accesses == 4
    next(batches)
    assert lazy.accesses == 8
    assert sum(b.num_graphs for b in batches) == 4 and lazy.accesses == 12


@pytest.mark.parametrize(
    "family, params, with_line_graph",
    [
        ("cgcnn", {"hidden": 16, "n_conv": 2, "head_hidden": 16, "fusion": "early", "comp_hidden": 16}, False),
        ("alignn", {"hidden": 16, "n_layers": 1, "n_gcn": 1, "head_hidden": 16, "fusion": "none"}, True),
    ],
)
def test_a_seeded_trial_trains_the_same_on_lazy_and_eager_graphs(monkeypatch, family, params, with_line_graph):
    n = 24
    gs = graph_set(n, with_line_graph)
    rng = np.random.default_rng(3)
    descriptors = rng.normal(size=(n, 6))
    y = rng.normal(size=n) + np.array([len(gs.graph(g)[0]) for g in range(n)], float)
    data = pack_trial_data(descriptors, gs, y, np.arange(0, 16), np.arange(16, 20), gaussian_bins=12)
    test = pack_rows(descriptors, gs, y, np.arange(20, 24))
    config = {
        "family": family,
        family: {**params, "lr": 3e-3, "batch_size": 6},
        "max_epochs": 3,
        "seed": 0,
        "cpus": 1,
    }
    runs = {}
    for mode in ("lazy", "eager"):
        if mode == "eager":
            monkeypatch.setenv(EAGER_GRAPHS_ENV, "1")
        items = graph_dataset(data["train"], data["graph_params"])
        assert isinstance(items, list if mode == "eager" else LazyGraphDataset)
        session = LocalSession()
        state = fit_family(copy.deepcopy(config), data, session)
        runs[mode] = session.history, predict_from_state(config, state, test, data["graph_params"])
    (h_lazy, p_lazy), (h_eager, p_eager) = runs["lazy"], runs["eager"]
    assert [m["epoch"] for m in h_lazy] == [1, 2, 3]
    assert h_lazy == h_eager
    np.testing.assert_allclose(p_lazy, p_eager, atol=1e-6, rtol=0)
    assert np.all(np.isfinite(p_lazy)) and p_lazy.shape == (4,)
