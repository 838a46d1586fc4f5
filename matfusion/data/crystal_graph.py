"""Crystal graphs: periodic neighbours within a radius, element features on nodes,
Gaussian-expanded distances on edges.

For atom i, its neighbours are all periodic images j with ``|r_j - r_i| <= cutoff``, of which
the ``max_neighbors`` nearest are kept.  Each kept pair is a directed edge j -> i (PyG's
source -> target), so a convolution at i aggregates messages from its neighbours.
An atom with no neighbour in the cutoff keeps no edge: its graph is still valid.

A whole dataset is packed into a :class:`GraphSet` of flat numpy arrays (cheap to cache,
and zero-copy through Ray's object store); PyG ``Data`` objects are built on demand.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Optional, Sequence

import numpy as np

# Elemental properties (from matminer's Magpie tables) that make up each node's features.
NODE_PROPERTIES = (
    "Number", "MendeleevNumber", "AtomicWeight", "MeltingT", "Column", "Row", "CovalentRadius",
    "Electronegativity", "NsValence", "NpValence", "NdValence", "NfValence", "NValence",
    "NsUnfilled", "NpUnfilled", "NdUnfilled", "NfUnfilled", "NUnfilled", "GSvolume_pa",
    "GSbandgap", "GSmagmom", "SpaceGroupNumber", "FirstIonizationEnergy", "ElectronAffinity",
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


def gaussian_expansion(distances: np.ndarray, cutoff: float, bins: int, width: Optional[float] = None) -> np.ndarray:
    """e_k(d) = exp(-(d - mu_k)^2 / w^2), mu_k evenly spaced on [0, cutoff]."""
    width = width or cutoff / bins
    centers = np.linspace(0.0, cutoff, bins, dtype=np.float32)
    d = np.asarray(distances, dtype=np.float32)[:, None]
    return np.exp(-((d - centers[None, :]) ** 2) / (width**2)).astype(np.float32)


def neighbor_graph(structure, cutoff: float, max_neighbors: int):
    """Atomic numbers, directed edges (2, E) as (source=neighbour, target=centre) and distances."""
    z = np.array([site.specie.Z for site in structure], dtype=np.int16)
    centers, neighbors, _images, dist = structure.get_neighbor_list(r=cutoff)
    if len(dist) == 0:
        return z, np.zeros((2, 0), dtype=np.int32), np.zeros(0, dtype=np.float32)
    order = np.lexsort((dist, centers))  # by centre, then distance
    centers, neighbors, dist = centers[order], neighbors[order], dist[order]
    # rank of each edge within its centre's sorted neighbour list
    starts = np.searchsorted(centers, centers, side="left")
    rank = np.arange(len(centers)) - starts
    keep = rank < max_neighbors
    edge_index = np.stack([neighbors[keep], centers[keep]]).astype(np.int32)
    return z, edge_index, dist[keep].astype(np.float32)


@dataclass
class GraphSet:
    """Graphs of a dataset packed into flat arrays.

    Graph ``g`` has nodes ``z[node_ptr[g]:node_ptr[g+1]]`` and edges
    ``edge_index[:, edge_ptr[g]:edge_ptr[g+1]]`` (indices local to the graph) with lengths
    ``distance[edge_ptr[g]:edge_ptr[g+1]]``.
    """

    z: np.ndarray
    node_ptr: np.ndarray
    edge_index: np.ndarray
    distance: np.ndarray
    edge_ptr: np.ndarray
    cutoff: float
    max_neighbors: int

    def __len__(self) -> int:
        return len(self.node_ptr) - 1

    @classmethod
    def from_parts(cls, parts: Sequence[tuple], cutoff: float, max_neighbors: int) -> "GraphSet":
        n_nodes = np.array([len(p[0]) for p in parts], dtype=np.int64)
        n_edges = np.array([p[1].shape[1] for p in parts], dtype=np.int64)
        return cls(
            z=np.concatenate([p[0] for p in parts]).astype(np.int16) if parts else np.zeros(0, np.int16),
            node_ptr=np.concatenate([[0], np.cumsum(n_nodes)]).astype(np.int64),
            edge_index=np.concatenate([p[1] for p in parts], axis=1).astype(np.int32) if parts else np.zeros((2, 0), np.int32),
            distance=np.concatenate([p[2] for p in parts]).astype(np.float32) if parts else np.zeros(0, np.float32),
            edge_ptr=np.concatenate([[0], np.cumsum(n_edges)]).astype(np.int64),
            cutoff=float(cutoff),
            max_neighbors=int(max_neighbors),
        )

    def arrays(self) -> dict:
        return {k: getattr(self, k) for k in ("z", "node_ptr", "edge_index", "distance", "edge_ptr")}

    def subset(self, indices: Sequence[int]) -> "GraphSet":
        """A new packed set holding only the given graphs, in the given order."""
        return GraphSet.from_parts([self.graph(int(g)) for g in indices], self.cutoff, self.max_neighbors)

    def graph(self, g: int):
        a, b = self.node_ptr[g], self.node_ptr[g + 1]
        c, d = self.edge_ptr[g], self.edge_ptr[g + 1]
        return self.z[a:b], self.edge_index[:, c:d], self.distance[c:d]

    def num_edges(self, g: int) -> int:
        return int(self.edge_ptr[g + 1] - self.edge_ptr[g])

    def to_data_list(self, indices: Sequence[int], targets: Optional[np.ndarray] = None,
                     gaussian_bins: int = 40, gaussian_width: Optional[float] = None) -> list:
        """PyG ``Data`` objects (``x`` element features, ``z``, ``edge_index``, ``edge_attr``
        Gaussian-expanded distances, ``y`` if targets are given) for the given graphs."""
        import torch
        from torch_geometric.data import Data

        table = element_feature_table()
        out = []
        for g in indices:
            z, ei, dist = self.graph(int(g))
            data = Data(
                x=torch.from_numpy(table[z.astype(np.int64)]),
                z=torch.from_numpy(z.astype(np.int64)),
                edge_index=torch.from_numpy(ei.astype(np.int64)),
                edge_attr=torch.from_numpy(gaussian_expansion(dist, self.cutoff, gaussian_bins, gaussian_width)),
                num_nodes=len(z),
            )
            if targets is not None:
                data.y = torch.tensor(np.atleast_1d(targets[int(g)]), dtype=torch.float32).view(1, -1)
            out.append(data)
        return out
