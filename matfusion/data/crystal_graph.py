"""Crystal graphs: periodic neighbours within a radius, element features on nodes,
Gaussian-expanded distances on edges.

For atom i, its neighbours are all periodic images j with ``|r_j - r_i| <= cutoff``, of which
the ``max_neighbors`` nearest are kept.  Each kept pair is a directed edge j -> i (PyG's
source -> target), so a convolution at i aggregates messages from its neighbours.
An atom with no neighbour in the cutoff keeps no edge: its graph is still valid.

Each edge also keeps its bond vector ``edge_vec = r_j + n @ L - r_i``: from the centre i
(the edge's target) to the neighbour j's periodic image (the edge's source), n being the
image's integer cell offset and L the lattice matrix.  Optionally the graph carries its line
graph (bonds as nodes, bond angles as edges; see :mod:`matfusion.data.line_graph`).

A whole dataset is packed into a :class:`GraphSet` of flat numpy arrays (cheap to cache,
and zero-copy through Ray's object store); PyG ``Data`` objects (:class:`CrystalGraphData`)
are built on demand.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Optional, Sequence

import numpy as np

# Elemental properties (from matminer's Magpie tables) that make up each node's features.
NODE_PROPERTIES = (
    "Number",
    "MendeleevNumber",
    "AtomicWeight",
    "MeltingT",
    "Column",
    "Row",
    "CovalentRadius",
    "Electronegativity",
    "NsValence",
    "NpValence",
    "NdValence",
    "NfValence",
    "NValence",
    "NsUnfilled",
    "NpUnfilled",
    "NdUnfilled",
    "NfUnfilled",
    "NUnfilled",
    "GSvolume_pa",
    "GSbandgap",
    "GSmagmom",
    "SpaceGroupNumber",
    "FirstIonizationEnergy",
    "ElectronAffinity",
    "Polarizability",
)
MAX_Z = 103


@lru_cache(maxsize=1)
def element_feature_table() -> np.ndarray:
    """(MAX_Z + 1, F) float32 table: standardized Magpie properties of each element, then a
    one-hot of the periodic-table column (18) and row (9).  Missing values are 0 (the mean)."""
    from matminer.utils.data import MagpieData
    from pymatgen.core.periodic_table import Element

    props = MagpieData().all_elemental_props
    symbols = [Element.from_Z(z).symbol for z in range(1, MAX_Z + 1)]
    scalar = np.full((MAX_Z + 1, len(NODE_PROPERTIES)), np.nan)
    for k, name in enumerate(NODE_PROPERTIES):
        table = props.get(name, {})
        for z, sym in enumerate(symbols, start=1):
            v = table.get(sym)
            if v is not None:
                try:
                    scalar[z, k] = float(v)
                except (TypeError, ValueError):
                    pass
    real = scalar[1:]
    mean = np.nanmean(real, axis=0)
    std = np.nanstd(real, axis=0)
    std[~np.isfinite(std) | (std == 0)] = 1.0
    scalar = (scalar - mean) / std
    scalar[~np.isfinite(scalar)] = 0.0
    scalar[0] = 0.0
    col = np.zeros((MAX_Z + 1, 18))
    row = np.zeros((MAX_Z + 1, 9))
    for z in range(1, MAX_Z + 1):
        c = props["Column"].get(symbols[z - 1])
        r = props["Row"].get(symbols[z - 1])
        if c is not None and 1 <= int(c) <= 18:
            col[z, int(c) - 1] = 1.0
        if r is not None and 1 <= int(r) <= 9:
            row[z, int(r) - 1] = 1.0
    return np.concatenate([scalar, col, row], axis=1).astype(np.float32)


def gaussian_basis(cutoff: float, bins: int, width: Optional[float] = None) -> tuple[np.ndarray, float]:
    """The centres mu_k (float32, evenly spaced on [0, cutoff]) and the width w (default: cutoff / bins)
    of the bond-length basis; the stored expansion and the per-batch one both use it."""
    return np.linspace(0.0, cutoff, int(bins), dtype=np.float32), float(width or cutoff / bins)


def gaussian_expansion(distances: np.ndarray, cutoff: float, bins: int, width: Optional[float] = None) -> np.ndarray:
    """e_k(d) = exp(-(d - mu_k)^2 / w^2), mu_k evenly spaced on [0, cutoff]."""
    centers, width = gaussian_basis(cutoff, bins, width)
    d = np.asarray(distances, dtype=np.float32)[:, None]
    return np.exp(-((d - centers[None, :]) ** 2) / (width**2)).astype(np.float32)


def cosine_expansion(cos: np.ndarray, bins: int) -> np.ndarray:
    """Gaussian basis of bond-angle cosines: a_k(c) = exp(-(c - mu_k)^2 / w^2), mu_k evenly
    spaced on [-1, 1] (both ends included), w = their spacing."""
    centers = np.linspace(-1.0, 1.0, bins, dtype=np.float32)
    width = 2.0 / (bins - 1)
    c = np.asarray(cos, dtype=np.float32)[:, None]
    return np.exp(-((c - centers[None, :]) ** 2) / (width**2)).astype(np.float32)


def neighbor_graph(structure, cutoff: float, max_neighbors: int):
    """Atomic numbers (N,), directed edges (2, E) as (source=neighbour, target=centre),
    distances (E,) and bond vectors (E, 3) from the centre to the neighbour's image."""
    z = np.array([site.specie.Z for site in structure], dtype=np.int16)
    centers, neighbors, images, dist = structure.get_neighbor_list(r=cutoff)
    if len(dist) == 0:
        return (z, np.zeros((2, 0), dtype=np.int32), np.zeros(0, dtype=np.float32), np.zeros((0, 3), dtype=np.float32))
    order = np.lexsort((dist, centers))  # by centre, then distance
    centers, neighbors, images, dist = centers[order], neighbors[order], images[order], dist[order]
    # rank of each edge within its centre's sorted neighbour list
    starts = np.searchsorted(centers, centers, side="left")
    rank = np.arange(len(centers)) - starts
    keep = rank < max_neighbors
    centers, neighbors, images, dist = centers[keep], neighbors[keep], images[keep], dist[keep]
    cart = structure.cart_coords
    vec = cart[neighbors] + np.asarray(images, dtype=np.float64) @ structure.lattice.matrix - cart[centers]
    edge_index = np.stack([neighbors, centers]).astype(np.int32)
    return z, edge_index, dist.astype(np.float32), vec.astype(np.float32)


def _crystal_graph_data_class():
    """``CrystalGraphData``: a PyG ``Data`` whose ``lg_edge_index`` (line-graph edges between
    bonds) is offset, when batched, by the number of bonds of the preceding graphs."""
    from torch_geometric.data import Data

    class CrystalGraphData(Data):
        def __inc__(self, key, value, *args, **kwargs):
            if key == "lg_edge_index":
                return self.edge_index.size(1)
            return super().__inc__(key, value, *args, **kwargs)

    CrystalGraphData.__module__ = __name__
    CrystalGraphData.__qualname__ = "CrystalGraphData"
    return CrystalGraphData


def __getattr__(name: str):
    # torch_geometric is imported lazily (feature workers never need it); the class is made once
    if name == "CrystalGraphData":
        cls = globals().get("_CrystalGraphData")
        if cls is None:
            cls = globals()["_CrystalGraphData"] = _crystal_graph_data_class()
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass
class GraphSet:
    """Graphs of a dataset packed into flat arrays.

    Graph ``g`` has nodes ``z[node_ptr[g]:node_ptr[g+1]]`` and edges
    ``edge_index[:, edge_ptr[g]:edge_ptr[g+1]]`` (indices local to the graph) with lengths
    ``distance[edge_ptr[g]:edge_ptr[g+1]]`` and bond vectors ``edge_vec[edge_ptr[g]:...]``.
    When the line graph was built, its edges are ``line_index[:, line_ptr[g]:line_ptr[g+1]]``
    (indices of the graph's own edges) with bond-angle cosines ``line_cos[...]``; otherwise
    the three ``line_*`` arrays are None.
    """

    z: np.ndarray
    node_ptr: np.ndarray
    edge_index: np.ndarray
    distance: np.ndarray
    edge_vec: np.ndarray
    edge_ptr: np.ndarray
    cutoff: float
    max_neighbors: int
    line_index: Optional[np.ndarray] = None
    line_cos: Optional[np.ndarray] = None
    line_ptr: Optional[np.ndarray] = None

    ARRAY_NAMES = (
        "z",
        "node_ptr",
        "edge_index",
        "distance",
        "edge_vec",
        "edge_ptr",
        "line_index",
        "line_cos",
        "line_ptr",
    )

    def __len__(self) -> int:
        return len(self.node_ptr) - 1

    @property
    def has_line_graph(self) -> bool:
        return self.line_ptr is not None

    @classmethod
    def from_parts(cls, parts: Sequence[tuple], cutoff: float, max_neighbors: int) -> "GraphSet":
        """Pack per-graph tuples ``(z, edge_index, distance, edge_vec)``, or
        ``(z, edge_index, distance, edge_vec, line_index, line_cos)`` (all or none with the
        line graph), as returned by :func:`neighbor_graph` (+ :func:`line_graph`)."""
        parts = list(parts)
        widths = {len(p) for p in parts}
        if not widths <= {4} and not widths <= {6}:
            raise ValueError(f"graph parts must all have 4 items, or all 6 (with the line graph); got {sorted(widths)}")
        n_nodes = np.array([len(p[0]) for p in parts], dtype=np.int64)
        n_edges = np.array([p[1].shape[1] for p in parts], dtype=np.int64)
        gs = cls(
            z=np.concatenate([p[0] for p in parts]).astype(np.int16) if parts else np.zeros(0, np.int16),
            node_ptr=np.concatenate([[0], np.cumsum(n_nodes)]).astype(np.int64),
            edge_index=np.concatenate([p[1] for p in parts], axis=1).astype(np.int32)
            if parts
            else np.zeros((2, 0), np.int32),
            distance=np.concatenate([p[2] for p in parts]).astype(np.float32) if parts else np.zeros(0, np.float32),
            edge_vec=np.concatenate([p[3] for p in parts]).astype(np.float32).reshape(-1, 3)
            if parts
            else np.zeros((0, 3), np.float32),
            edge_ptr=np.concatenate([[0], np.cumsum(n_edges)]).astype(np.int64),
            cutoff=float(cutoff),
            max_neighbors=int(max_neighbors),
        )
        if parts and widths == {6}:
            n_line = np.array([p[4].shape[1] for p in parts], dtype=np.int64)
            gs.line_index = np.concatenate([p[4] for p in parts], axis=1).astype(np.int32)
            gs.line_cos = np.concatenate([p[5] for p in parts]).astype(np.float32)
            gs.line_ptr = np.concatenate([[0], np.cumsum(n_line)]).astype(np.int64)
        return gs

    def arrays(self) -> dict:
        """The packed arrays by name (the ``line_*`` ones only when the line graph exists)."""
        return {k: getattr(self, k) for k in self.ARRAY_NAMES if getattr(self, k) is not None}

    def subset(self, indices: Sequence[int]) -> "GraphSet":
        """A new packed set holding only the given graphs, in the given order."""
        if self.has_line_graph:
            parts = [self.graph(int(g)) + self.line(int(g)) for g in indices]
        else:
            parts = [self.graph(int(g)) for g in indices]
        out = GraphSet.from_parts(parts, self.cutoff, self.max_neighbors)
        if self.has_line_graph and not out.has_line_graph:  # an empty subset keeps the layout
            out.line_index, out.line_cos = np.zeros((2, 0), np.int32), np.zeros(0, np.float32)
            out.line_ptr = np.zeros(1, np.int64)
        return out

    def graph(self, g: int):
        """``(z, edge_index, distance, edge_vec)`` of graph ``g``."""
        a, b = self.node_ptr[g], self.node_ptr[g + 1]
        c, d = self.edge_ptr[g], self.edge_ptr[g + 1]
        return self.z[a:b], self.edge_index[:, c:d], self.distance[c:d], self.edge_vec[c:d]

    def line(self, g: int):
        """``(line_index, line_cos)`` of graph ``g`` (indices of its own edges)."""
        if not self.has_line_graph:
            raise ValueError("this GraphSet has no line graph (featurize with FeaturesConfig.line_graph=True)")
        a, b = self.line_ptr[g], self.line_ptr[g + 1]
        return self.line_index[:, a:b], self.line_cos[a:b]

    def num_edges(self, g: int) -> int:
        return int(self.edge_ptr[g + 1] - self.edge_ptr[g])

    def to_data_list(
        self,
        indices: Sequence[int],
        targets: Optional[np.ndarray] = None,
        gaussian_bins: int = 40,
        gaussian_width: Optional[float] = None,
        line_graph_bins: int = 20,
        expand_edges: bool = True,
    ) -> list:
        """:class:`CrystalGraphData` objects (``x`` element features, ``z``, ``edge_index``,
        ``edge_attr`` Gaussian-expanded distances, ``y`` if targets are given) for the given
        graphs.  ``expand_edges=False``: the bond lengths ``edge_dist`` (E,) and the basis
        ``edge_basis`` (1, 3: cutoff, bins, width) instead of ``edge_attr``, which the models
        expand per batch (:mod:`matfusion.trainables.edge_basis`; one float per edge held).  With a line graph, also ``lg_edge_index`` (2, L) (indices of the graph's
        edges, offset per graph when batched) and ``lg_edge_attr`` (L, line_graph_bins), the
        bond-angle cosines expanded in Gaussians over [-1, 1]."""
        build = self.data_builder(targets, gaussian_bins, gaussian_width, line_graph_bins, expand_edges)
        return [build(g) for g in indices]

    def data_builder(
        self,
        targets: Optional[np.ndarray] = None,
        gaussian_bins: int = 40,
        gaussian_width: Optional[float] = None,
        line_graph_bins: int = 20,
        expand_edges: bool = True,
    ) -> "DataBuilder":
        """``build(g)``: the :class:`CrystalGraphData` of graph ``g`` alone, exactly as
        :meth:`to_data_list` makes it (same arguments); for datasets that build a graph only
        when it is read (:class:`matfusion.data.graph_store.LazyGraphDataset`)."""
        return DataBuilder(self, targets, gaussian_bins, gaussian_width, line_graph_bins, expand_edges)


class DataBuilder:
    """Builds the PyG ``Data`` of one graph of a :class:`GraphSet` (see :meth:`GraphSet.to_data_list`
    for what it holds); the bond-length basis tensor is made once and shared by every graph built."""

    def __init__(
        self,
        graphs: GraphSet,
        targets: Optional[np.ndarray],
        gaussian_bins: int,
        gaussian_width: Optional[float],
        line_graph_bins: int,
        expand_edges: bool,
    ) -> None:
        import torch

        self.graphs, self.targets = graphs, targets
        self.gaussian_bins, self.gaussian_width = gaussian_bins, gaussian_width
        self.line_graph_bins, self.expand_edges = line_graph_bins, expand_edges
        _, width = gaussian_basis(graphs.cutoff, gaussian_bins, gaussian_width)
        self.basis = torch.tensor([[graphs.cutoff, float(gaussian_bins), width]], dtype=torch.float64)

    def __call__(self, g: int):
        import torch

        gs, g = self.graphs, int(g)
        z, ei, dist, _vec = gs.graph(g)
        data = __getattr__("CrystalGraphData")(
            x=torch.from_numpy(element_feature_table()[z.astype(np.int64)]),
            z=torch.from_numpy(z.astype(np.int64)),
            edge_index=torch.from_numpy(ei.astype(np.int64)),
            num_nodes=len(z),
        )
        if self.expand_edges:
            data.edge_attr = torch.from_numpy(
                gaussian_expansion(dist, gs.cutoff, self.gaussian_bins, self.gaussian_width)
            )
        else:
            data.edge_dist = torch.from_numpy(np.asarray(dist, dtype=np.float32))
            data.edge_basis = self.basis
        if gs.has_line_graph:
            li, cos = gs.line(g)
            data.lg_edge_index = torch.from_numpy(li.astype(np.int64))
            data.lg_edge_attr = torch.from_numpy(cosine_expansion(cos, self.line_graph_bins))
        if self.targets is not None:
            data.y = torch.tensor(np.atleast_1d(self.targets[g]), dtype=torch.float32).view(1, -1)
        return data
