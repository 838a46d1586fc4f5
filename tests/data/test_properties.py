"""Property tests (hypothesis) over random valid small crystals: every featurizer runs without a
failure, the neighbour graph is symmetric and within its cutoff, and graphs and descriptors do not
depend on the order of the atoms or on the choice of cell (a 2x1x1 supercell)."""

from __future__ import annotations

from collections import defaultdict

import numpy as np
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from pymatgen.core import Lattice, Structure

from matfusion.data.dataset import structure_problem
from matfusion.data.descriptors import DEFAULT_STRUCTURE_SETS, _Row, columns_of
from matfusion.data.featurize import graph_parts

ELEMENTS = ["H", "Li", "C", "O", "Na", "Mg", "Al", "Si", "Cl", "K", "Fe", "Cu", "Zn", "Ba"]
CUTOFF = 5.0
ALL_NEIGHBOURS = 10_000  # no max_neighbors truncation: the graph is the full radius graph
SETTINGS = settings(
    max_examples=25,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.filter_too_much],
)


@st.composite
def crystals(draw) -> Structure:
    """1-4 atoms of common elements at random positions in a random cell (3.5-6 A edges,
    75-105 degree angles); drawn again until it passes the load-time sanity checks."""
    lengths = [draw(st.floats(3.5, 6.0)) for _ in range(3)]
    angles = [draw(st.floats(75.0, 105.0)) for _ in range(3)]
    n = draw(st.integers(1, 4))
    species = [draw(st.sampled_from(ELEMENTS)) for _ in range(n)]
    coords = [[draw(st.floats(0.0, 1.0, exclude_max=True)) for _ in range(3)] for _ in range(n)]
    try:
        lattice = Lattice.from_parameters(*lengths, *angles)
    except ValueError:
        assume(False)
    assume(np.isfinite(lattice.volume) and lattice.volume > 1.0)
    s = Structure(lattice, species, coords)
    assume(structure_problem(s) is None)
    return s


def _pair_distances(parts) -> dict:
    """(source Z, target Z) -> the sorted distances of those edges: a summary of a graph that
    does not depend on how the atoms are numbered."""
    z, edge_index, dist = parts[0], parts[1], parts[2]
    out = defaultdict(list)
    for (src, tgt), d in zip(edge_index.T, dist):
        out[(int(z[src]), int(z[tgt]))].append(float(d))
    return {k: np.sort(v) for k, v in out.items()}


def _assert_same_pairs(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(a[k], b[k], atol=1e-4, err_msg=str(k))


def _descriptors(s: Structure) -> np.ndarray:
    row, failed = _Row(DEFAULT_STRUCTURE_SETS)(s)
    assert failed == [], failed  # no featurizer raised
    return row


@SETTINGS
@given(crystals())
def test_featurization_never_fails_and_edges_are_symmetric_within_the_cutoff(s):
    z, edge_index, dist, vec, line_index, line_cos = graph_parts(s, CUTOFF, ALL_NEIGHBOURS, with_line_graph=True)
    assert len(z) == len(s)
    assert np.all(dist <= CUTOFF + 1e-4) and np.all(dist > 0.49)
    np.testing.assert_allclose(np.linalg.norm(vec, axis=1), dist, rtol=1e-5, atol=1e-5)
    # every edge j -> i with bond vector v has its reverse i -> j with -v
    key = {(int(a), int(b), *np.round(v, 3)) for (a, b), v in zip(edge_index.T, vec)}
    for (a, b), v in zip(edge_index.T, vec):
        assert (int(b), int(a), *np.round(-v, 3)) in key
    assert line_index.shape[0] == 2 and np.all(np.abs(line_cos) <= 1.0)
    # the capped graph of the default featurizer: at most 12 edges into each atom
    capped = graph_parts(s, 6.0, 12)
    assert np.bincount(capped[1][1], minlength=len(s)).max(initial=0) <= 12
    row = _descriptors(s)
    assert row.shape == (len(columns_of(DEFAULT_STRUCTURE_SETS)),)
    assert np.isfinite(row[:132]).all()  # Magpie has every property of these elements


@SETTINGS
@given(crystals(), st.randoms(use_true_random=False))
def test_graph_and_descriptors_do_not_depend_on_the_atom_order(s, rnd):
    order = list(range(len(s)))
    rnd.shuffle(order)
    shuffled = Structure(s.lattice, [s[i].specie for i in order], [s[i].frac_coords for i in order])
    _assert_same_pairs(
        _pair_distances(graph_parts(s, CUTOFF, ALL_NEIGHBOURS)),
        _pair_distances(graph_parts(shuffled, CUTOFF, ALL_NEIGHBOURS)),
    )
    np.testing.assert_allclose(_descriptors(shuffled), _descriptors(s), atol=1e-5, equal_nan=True)


@SETTINGS
@given(crystals())
def test_graph_and_descriptors_do_not_depend_on_the_cell(s):
    big = s * (2, 1, 1)
    one = _pair_distances(graph_parts(s, CUTOFF, ALL_NEIGHBOURS))
    two = _pair_distances(graph_parts(big, CUTOFF, ALL_NEIGHBOURS))
    _assert_same_pairs({k: np.sort(np.repeat(v, 2)) for k, v in one.items()}, two)  # every atom twice
    columns = columns_of(DEFAULT_STRUCTURE_SETS)
    same = [i for i, c in enumerate(columns) if c != "bonds:n_sites_log"]  # log(number of sites) doubles
    a, b = _descriptors(s), _descriptors(big)
    np.testing.assert_allclose(b[same], a[same], atol=1e-4, rtol=1e-5, equal_nan=True)
    np.testing.assert_allclose(b[columns.index("bonds:n_sites_log")], np.log(2 * len(s)), atol=1e-6)  # rounded
