"""Line graph of a crystal graph: bonds become nodes, bond angles become edges (ALIGNN).

Conventions (those of :func:`matfusion.data.crystal_graph.neighbor_graph`): atom-graph edge
``e = (source, target) = (neighbour, centre)`` carries ``edge_vec[e]``, the vector from its
*target* (the centre) to its *source* (the neighbour's periodic image).

The nodes of the line graph are the atom graph's directed edges.  Bond ``a = (k -> j)`` and
bond ``b = (j -> i)`` meet at atom j (target of a == source of b) and give the line-graph edge
``a -> b`` (messages flow along the bonds, towards the centres, as in the atom graph).  Put
j at the origin: k sits at ``edge_vec[a]`` (a's vector points from its centre j to k), and i
sits at ``-edge_vec[b]`` (b's vector points from its centre i to j).  The feature of the
line-graph edge is the cosine of the angle k-j-i at j::

    cos = (v_a . (-v_b)) / (|v_a| |v_b|)      with v_a = edge_vec[a], v_b = edge_vec[b]

Excluded: the back-and-forth pair, where a is the reverse of b (k and i are the same atom
*and* the same periodic image, i.e. ``source(a) == target(b)`` and ``v_a == -v_b``): it
would be a zero angle between a bond and itself.  Everything else at j is kept, including
``a == b`` in a crystal where one atom bonds to its own images (k and i are then two
different images of the atom, on opposite sides of j: cos = -1).

So for every atom j, (bonds into j) x (bonds out of j), minus one pair for each bond out of
j whose reverse is also in the graph (always, unless ``max_neighbors`` dropped it).
"""

from __future__ import annotations

import numpy as np

# two images closer than this (Angstrom) are the same point
_SAME_POINT = 1e-3


def line_graph(edge_index: np.ndarray, edge_vec: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Line graph of one crystal graph.

    ``edge_index`` (2, E) as (source, target); ``edge_vec`` (E, 3) from target to source.
    Returns ``lg_index`` (2, L) int32 as (bond a, bond b) indices into the E edges, grouped by
    b, and ``cos`` (L,) float32, the cosine of the bond angle at the shared atom.
    """
    edge_index = np.asarray(edge_index)
    vec = np.asarray(edge_vec, dtype=np.float64).reshape(-1, 3)
    n_edges = edge_index.shape[1]
    if n_edges == 0:
        return np.zeros((2, 0), dtype=np.int32), np.zeros(0, dtype=np.float32)
    src, tgt = edge_index[0].astype(np.int64), edge_index[1].astype(np.int64)
    n_atoms = int(max(src.max(), tgt.max())) + 1

    # bonds into each atom j, grouped by j: into[into_start[j]:into_start[j+1]]
    into = np.argsort(tgt, kind="stable")
    n_into = np.bincount(tgt, minlength=n_atoms)
    into_start = np.concatenate([[0], np.cumsum(n_into)])

    # every bond b = (j -> i) pairs with every bond a into j = source(b)
    per_b = n_into[src]
    b = np.repeat(np.arange(n_edges), per_b)
    first = np.concatenate([[0], np.cumsum(per_b)[:-1]])
    local = np.arange(len(b)) - np.repeat(first, per_b)
    a = into[into_start[src[b]] + local]

    # drop the back-and-forth pairs: same atom k == i, and the same image (v_a == -v_b)
    same_atom = np.flatnonzero(src[a] == tgt[b])
    gap = vec[a[same_atom]] + vec[b[same_atom]]
    reverse = same_atom[np.abs(gap).max(axis=1) < _SAME_POINT]
    if len(reverse):
        keep = np.ones(len(a), dtype=bool)
        keep[reverse] = False
        a, b = a[keep], b[keep]

    unit = vec / np.maximum(np.sqrt(np.einsum("ij,ij->i", vec, vec)), 1e-12)[:, None]
    cos = -np.einsum("ij,ij->i", unit[a], unit[b])  # angle between j->k (v_a) and j->i (-v_b)
    cos = np.clip(cos, -1.0, 1.0)
    return np.stack([a, b]).astype(np.int32), cos.astype(np.float32)
