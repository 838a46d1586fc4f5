"""Bond vectors, the line graph (bond angles), its batching and caching, and the ALIGNN encoder."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pymatgen.core import Lattice, Structure
from torch_geometric.loader import DataLoader

from matfusion.config import DataConfig, FeaturesConfig
from matfusion.data import load_dataset, split_fold
from matfusion.data.crystal_graph import CrystalGraphData, GraphSet, neighbor_graph
from matfusion.data.featurize import featurize
from matfusion.data.line_graph import line_graph
from matfusion.trainables.alignn import ALIGNN
from matfusion.trainables.loop import LocalSession
from matfusion.trainables.trial import build_torch_model, fit_family
from matfusion.trainables.trial_data import graphs_of, pack_rows, pack_trial_data


def simple_cubic() -> Structure:
    return Structure(Lattice.cubic(3.0), ["Po"], [[0, 0, 0]])


def bent_triatomic() -> Structure:
    # O at the origin, H 1.0 A along x, F 1.2 A at 120 degrees from it; H-F is 1.91 A apart
    lat = Lattice.cubic(30.0)
    theta = np.deg2rad(120.0)
    cart = np.array([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [1.2 * np.cos(theta), 1.2 * np.sin(theta), 0.0]]) + 10.0
    return Structure(lat, ["O", "H", "F"], lat.get_fractional_coords(cart))


def nacl() -> Structure:
    return Structure.from_spacegroup("Fm-3m", Lattice.cubic(5.64), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])


def with_line(structure, cutoff, max_neighbors=12):
    g = neighbor_graph(structure, cutoff, max_neighbors)
    return g + line_graph(g[1], g[3])


def brute_force_line_graph(ei, vec):
    """Reference: every (a, b) with target(a) == source(b), except a == reverse(b)."""
    out = {}
    for b in range(ei.shape[1]):
        for a in range(ei.shape[1]):
            if ei[1, a] != ei[0, b]:
                continue
            if ei[0, a] == ei[1, b] and np.allclose(vec[a], -vec[b], atol=1e-3):
                continue
            out[(a, b)] = -np.dot(vec[a], vec[b]) / (np.linalg.norm(vec[a]) * np.linalg.norm(vec[b]))
    return out


# --------------------------------------------------------------------------- bond vectors


def test_bond_vectors_point_from_centre_to_neighbour_image():
    z, ei, dist, vec = neighbor_graph(bent_triatomic(), cutoff=1.5, max_neighbors=12)
    assert vec.shape == (ei.shape[1], 3) and vec.dtype == np.float32
    edges = {(int(s), int(t)): v for s, t, v in zip(ei[0], ei[1], vec)}
    assert set(edges) == {(1, 0), (0, 1), (2, 0), (0, 2)}
    np.testing.assert_allclose(edges[(1, 0)], [1.0, 0.0, 0.0], atol=1e-5)  # centre O -> neighbour H
    np.testing.assert_allclose(edges[(0, 1)], [-1.0, 0.0, 0.0], atol=1e-5)  # centre H -> neighbour O
    np.testing.assert_allclose(np.linalg.norm(vec, axis=1), dist, atol=1e-5)

    # periodic images: the lone Po atom's 6 bonds are to its own images, +-3 A on each axis
    z, ei, dist, vec = neighbor_graph(simple_cubic(), cutoff=3.1, max_neighbors=12)
    assert ei.shape == (2, 6) and np.all(ei == 0)
    assert sorted(map(tuple, np.round(vec).astype(int).tolist())) == sorted(
        [(3, 0, 0), (-3, 0, 0), (0, 3, 0), (0, -3, 0), (0, 0, 3), (0, 0, -3)]
    )


# --------------------------------------------------------------------------- line graph


def test_simple_cubic_line_graph_counts_and_angles():
    """6 bonds, all between the one atom and its images.  Bond b = (j -> i) pairs with every
    bond into j (all 6), except its own reverse (i at the same image as k): 6 * 5 = 30 line
    edges.  Of the 5 kept per b, one is a == b itself (k and i are the images on opposite
    sides of j: 180 degrees) and 4 are the perpendicular bonds (90 degrees)."""
    _, ei, _, vec = neighbor_graph(simple_cubic(), cutoff=3.1, max_neighbors=12)
    lg, cos = line_graph(ei, vec)
    assert lg.shape == (2, 30) and lg.dtype == np.int32 and cos.dtype == np.float32
    assert np.bincount(lg[1], minlength=6).tolist() == [5] * 6  # 5 in-edges per bond
    assert np.bincount(lg[0], minlength=6).tolist() == [5] * 6
    straight = np.isclose(cos, -1.0, atol=1e-6)
    right = np.isclose(cos, 0.0, atol=1e-6)
    assert straight.sum() == 6 and right.sum() == 24 and np.all(straight | right)
    assert np.all(lg[0, straight] == lg[1, straight])  # 180 degrees: a bond with itself
    # no back-and-forth pair is left
    assert not np.any(np.all(np.isclose(vec[lg[0]], -vec[lg[1]]), axis=1))


def test_line_graph_direction_and_angle_on_a_molecule():
    """O-H and O-F at 120 degrees (H-F beyond the cutoff): bonds H->O, O->H, F->O, O->F.
    The only angles are at O: H->O->F and F->O->H, cos 120 = -0.5; at H and F each bond
    meets only its own reverse, which is excluded."""
    _, ei, _, vec = neighbor_graph(bent_triatomic(), cutoff=1.5, max_neighbors=12)
    lg, cos = line_graph(ei, vec)
    index = {(int(s), int(t)): e for e, (s, t) in enumerate(zip(ei[0], ei[1]))}
    pairs = {(int(a), int(b)) for a, b in zip(lg[0], lg[1])}
    assert pairs == {(index[(1, 0)], index[(0, 2)]), (index[(2, 0)], index[(0, 1)])}
    np.testing.assert_allclose(cos, -0.5, atol=1e-5)


def test_line_graph_matches_brute_force_on_real_structures():
    ds = load_dataset(DataConfig(source="matbench_phonons", limit=8))
    for s in ds.structures:
        _, ei, _, vec = neighbor_graph(s, 6.0, 12)
        lg, cos = line_graph(ei, vec)
        ref = brute_force_line_graph(ei, vec.astype(np.float64))
        got = {(int(a), int(b)): float(c) for a, b, c in zip(lg[0], lg[1], cos)}
        assert got.keys() == ref.keys()
        np.testing.assert_allclose([got[k] for k in ref], list(ref.values()), atol=1e-5)


def test_line_graph_of_edgeless_graph_is_empty():
    lg, cos = line_graph(np.zeros((2, 0), np.int32), np.zeros((0, 3), np.float32))
    assert lg.shape == (2, 0) and cos.shape == (0,)


# --------------------------------------------------------------------------- packing and batching


def three_graphs() -> GraphSet:
    parts = [with_line(simple_cubic(), 3.1), with_line(bent_triatomic(), 1.5), with_line(nacl(), 4.1)]
    return GraphSet.from_parts(parts, cutoff=4.1, max_neighbors=12)


def test_batched_line_graph_indices_point_at_the_right_edges():
    gs = three_graphs()
    assert gs.has_line_graph and gs.line_ptr.tolist()[0] == 0 and len(gs.line_ptr) == 4
    items = gs.to_data_list(range(3), targets=np.array([1.0, 2.0, 3.0]), line_graph_bins=20)
    assert all(isinstance(d, CrystalGraphData) for d in items)
    assert items[0].lg_edge_attr.shape == (30, 20) and items[0].lg_edge_index.shape == (2, 30)
    batch = next(iter(DataLoader(items, batch_size=3, shuffle=False)))
    n_edges = [d.edge_index.shape[1] for d in items]
    offsets = np.concatenate([[0], np.cumsum(n_edges)[:-1]])
    expected = torch.cat([d.lg_edge_index + int(o) for d, o in zip(items, offsets)], dim=1)
    assert torch.equal(batch.lg_edge_index, expected)
    assert torch.equal(batch.lg_edge_attr, torch.cat([d.lg_edge_attr for d in items]))
    # every angle joins a bond into atom j with a bond out of the same (batched) atom j
    a, b = batch.lg_edge_index
    assert torch.equal(batch.edge_index[1, a], batch.edge_index[0, b])
    # and its cosine is that of the two bond vectors (now looked up in the whole batch)
    vec = torch.from_numpy(np.concatenate([gs.graph(g)[3] for g in range(3)]))
    cos = -(nn_unit(vec[a]) * nn_unit(vec[b])).sum(1)
    np.testing.assert_allclose(cos.numpy(), gs.line_cos, atol=1e-5)
    # the graph each angle lands in is the graph of its bonds
    edge_graph = batch.batch[batch.edge_index[1]]
    assert torch.equal(edge_graph[a], edge_graph[b])


def nn_unit(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm(dim=1, keepdim=True)


def test_subset_and_trial_packing_keep_the_line_graph():
    gs = three_graphs()
    sub = gs.subset([2, 0])
    for i, g in enumerate([2, 0]):
        for mine, theirs in zip(sub.graph(i) + sub.line(i), gs.graph(g) + gs.line(g)):
            np.testing.assert_array_equal(mine, theirs)
    part = pack_rows(np.zeros((3, 132)), gs, np.arange(3.0), [1, 2])
    back = graphs_of(part)
    assert back.has_line_graph and set(back.arrays()) == set(GraphSet.ARRAY_NAMES)
    for name, x in gs.subset([1, 2]).arrays().items():
        np.testing.assert_array_equal(x, back.arrays()[name], err_msg=name)
    empty = gs.subset([])
    assert len(empty) == 0 and empty.has_line_graph and empty.line_ptr.tolist() == [0]


# --------------------------------------------------------------------------- the encoder


def test_alignn_forward_shapes():
    items = three_graphs().to_data_list(range(3), targets=np.array([[1.0, 2.0]] * 3))
    batch = next(iter(DataLoader(items, batch_size=3)))
    node_f, edge_f, angle_f = items[0].x.shape[1], items[0].edge_attr.shape[1], items[0].lg_edge_attr.shape[1]
    torch.manual_seed(0)
    for n_targets in (1, 2):
        model = ALIGNN(node_f, edge_f, angle_f, hidden=16, n_layers=2, n_gcn=1, head_hidden=32, n_targets=n_targets)
        out = model(batch)
        assert out.shape == (3, n_targets) and torch.isfinite(out).all()
        assert model.embed_crystal(batch).shape == (3, 16)
        out.sum().backward()
        assert all(p.grad is not None for p in model.parameters())
    # built through the trainable's registry as well, and swappable into a fusion model
    cfg = {"family": "alignn", "alignn": {"hidden": 16, "n_layers": 1, "n_gcn": 0, "fusion": "early"}}
    fused = build_torch_model(cfg, node_f, edge_f, 2, angle_f, 132)
    batch.descriptors = torch.zeros(3, 132)
    assert fused(batch).shape == (3, 2)


def test_alignn_without_line_graph_says_what_to_do():
    gs = GraphSet.from_parts([neighbor_graph(nacl(), 4.1, 12)], cutoff=4.1, max_neighbors=12)
    (data,) = gs.to_data_list([0])
    model = ALIGNN(data.x.shape[1], data.edge_attr.shape[1], 20, hidden=8)
    with pytest.raises(ValueError, match="line_graph"):
        model(data)


@pytest.fixture(scope="module")
def phonons150():
    return load_dataset(DataConfig(source="matbench_phonons", limit=150))


def test_featurize_line_graph_is_cached_and_reloaded(phonons150, tmp_path):
    cfg = FeaturesConfig(cache_dir=str(tmp_path), n_jobs=2, line_graph=True)
    first = featurize(phonons150, cfg, progress=False)
    assert not first.from_cache and first.graphs.has_line_graph
    second = featurize(phonons150, cfg, progress=False)
    assert second.from_cache
    for name, x in first.graphs.arrays().items():
        np.testing.assert_array_equal(x, second.graphs.arrays()[name], err_msg=name)
    assert set(first.graphs.arrays()) == set(GraphSet.ARRAY_NAMES)
    for g in (0, 57, 149):  # same as building it directly
        lg, cos = line_graph(*first.graphs.graph(g)[1:4:2])
        np.testing.assert_array_equal(first.graphs.line(g)[0], lg)
        np.testing.assert_array_equal(first.graphs.line(g)[1], cos)
    # without the line graph: another cache entry, and no line arrays
    plain = featurize(phonons150, cfg.model_copy(update={"line_graph": False}), progress=False)
    assert not plain.graphs.has_line_graph and "line_index" not in plain.graphs.arrays()
    for name in ("z", "edge_index", "distance", "edge_vec"):
        np.testing.assert_array_equal(getattr(plain.graphs, name), getattr(first.graphs, name))
    assert len(list(tmp_path.glob("graph-*.npz"))) == 2


def test_alignn_trains_on_real_data(phonons150, tmp_path):
    features = featurize(phonons150, FeaturesConfig(cache_dir=str(tmp_path), n_jobs=2, line_graph=True), progress=False)
    split = split_fold(phonons150, 0, 0.2, seed=0, n_folds=5)
    data = pack_trial_data(features.descriptors, features.graphs, phonons150.targets, split.train, split.val)
    config = {
        "family": "alignn",
        "alignn": {"hidden": 32, "n_layers": 1, "n_gcn": 1, "head_hidden": 32, "lr": 5e-3, "batch_size": 32},
        "max_epochs": 4,
        "seed": 0,
        "cpus": 2,
    }
    session = LocalSession()
    fit_family(config, data, session)
    history = session.history
    assert len(history) == 4
    assert all(np.isfinite(h["val_mae"]) for h in history)
    assert history[-1]["best_val_mae"] < history[0]["val_mae"]
