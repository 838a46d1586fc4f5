"""What a trial receives: numpy arrays only (zero-copy through Ray's object store).

``pack_trial_data`` keeps only the rows of the inner train and validation parts, so a trial
cannot see the test part of a fold even by accident; the test rows are packed separately
(``pack_rows``) for the driver's after-search evaluation.

In the trial, :func:`graph_dataset` turns a part into the graphs its loaders read: a
:class:`~matfusion.data.graph_store.LazyGraphDataset` (a graph is built when a batch reads it, so
the trial holds the packed arrays and one batch of ``Data``, whatever the dataset's size), or with
``MATFUSION_EAGER_GRAPHS=1`` the eager list of :func:`data_list` (every graph built up front: the
path before; kept for ``benchmarks/scale.py``'s comparison and as a fallback).

With ``features.graph_store: disk`` the driver writes a part's graphs once as checksummed shard files
(``graph_store_dir``: ``<cache>/graph-shards/``) and the part carries only their index
(``graph_store``); the trial's :class:`~matfusion.data.graph_store.DiskGraphDataset` reads a graph
from its shard when a batch needs it.
"""

from __future__ import annotations

import os
from typing import Optional, Sequence

import numpy as np

from ..data.crystal_graph import GraphSet


def pack_rows(
    descriptors: np.ndarray,
    graphs: Optional[GraphSet],
    targets: np.ndarray,
    rows: Sequence[int],
    ids: Optional[Sequence[str]] = None,
    graph_store_dir=None,
) -> dict:
    """Arrays of the given rows: ``descriptors`` (the descriptor matrix), ``y``, ``row`` (original positions) and, for
    structure data, the packed graph arrays under ``graph/<name>``, or with ``graph_store_dir`` the index of
    their shard files written there (``graph_store``: :func:`~matfusion.data.graph_store.write_graph_store`)."""
    rows = np.asarray(rows, dtype=np.int64)
    out = {
        "row": rows,
        "descriptors": np.ascontiguousarray(descriptors[rows]),
        "y": np.ascontiguousarray(np.asarray(targets, dtype=np.float64)[rows]),
    }
    if ids is not None:
        out["ids"] = np.array([ids[r] for r in rows])
    if graphs is not None:
        sub = graphs.subset(rows)
        if graph_store_dir is not None:  # the graphs as shard files; the part carries their index only
            from ..data.graph_store import write_graph_store

            out["graph_store"] = write_graph_store(sub, graph_store_dir)
            return out
        for k, v in sub.arrays().items():
            out[f"graph/{k}"] = v
        out["graph/cutoff"] = np.array(graphs.cutoff)
        out["graph/max_neighbors"] = np.array(graphs.max_neighbors)
    return out


def pack_trial_data(
    descriptors: np.ndarray,
    graphs: Optional[GraphSet],
    targets: np.ndarray,
    train: Sequence[int],
    val: Sequence[int],
    gaussian_bins: int = 40,
    gaussian_width: Optional[float] = None,
    graph_store_dir=None,
) -> dict:
    """The inner train and validation rows only: ``{"train": {...}, "val": {...}, "graph_params": {...}}``;
    with ``graph_store_dir`` their graphs are shard files there (see :func:`pack_rows`)."""
    return {
        "train": pack_rows(descriptors, graphs, targets, train, graph_store_dir=graph_store_dir),
        "val": pack_rows(descriptors, graphs, targets, val, graph_store_dir=graph_store_dir),
        "graph_params": {"gaussian_bins": int(gaussian_bins), "gaussian_width": gaussian_width},
    }


def graphs_of(part: dict):
    """The part's graphs: a :class:`GraphSet`, a :class:`~matfusion.data.graph_store.DiskGraphSet` when they are
    on disk, or None."""
    if "graph_store" in part:
        from ..data.graph_store import DiskGraphSet

        return DiskGraphSet(part["graph_store"])
    if "graph/z" not in part:
        return None
    arrays = {k: part[f"graph/{k}"] for k in GraphSet.ARRAY_NAMES if f"graph/{k}" in part}
    return GraphSet(**arrays, cutoff=float(part["graph/cutoff"]), max_neighbors=int(part["graph/max_neighbors"]))


def required_graphs(part: dict) -> GraphSet:
    """The part's graphs; a ValueError for a dataset without crystal structures."""
    gs = graphs_of(part)
    if gs is None:
        raise ValueError("this dataset has no crystal structures; graph models need structures")
    return gs


def data_list(part: dict, graph_params: dict) -> list:
    """PyG ``Data`` objects of a packed part (targets attached as ``y``), their bond features
    expanded per batch by the models (one float per edge held)."""
    gs = required_graphs(part)
    if not isinstance(gs, GraphSet):  # on disk
        from ..data.graph_store import DiskGraphDataset

        ds = DiskGraphDataset(gs, part["y"], None, **graph_params, expand_edges=False)
        return [ds[i] for i in range(len(ds))]
    return gs.to_data_list(range(len(gs)), part["y"], **graph_params, expand_edges=False)


EAGER_GRAPHS_ENV = "MATFUSION_EAGER_GRAPHS"


def eager_graphs() -> bool:
    """Whether trials build every graph up front (``MATFUSION_EAGER_GRAPHS=1``) instead of lazily."""
    return os.environ.get(EAGER_GRAPHS_ENV, "").strip().lower() in ("1", "true", "yes")


def graph_dataset(
    part: dict, graph_params: dict, descriptors: Optional[np.ndarray] = None, lazy: Optional[bool] = None
):
    """The graphs of a packed part as a trial's loaders read them, targets attached as ``y`` and, when
    given, row ``i`` of ``descriptors`` (n, D) as item i's ``descriptors`` (1, D) float32.  ``lazy``
    (default: unless ``MATFUSION_EAGER_GRAPHS=1``): a :class:`~matfusion.data.graph_store.LazyGraphDataset`
    over the part's arrays; else the eager list of :func:`data_list`.  Both give the same items."""
    lazy = (not eager_graphs()) if lazy is None else bool(lazy)
    if not lazy:
        items = data_list(part, graph_params)
        if descriptors is not None:
            import torch

            z = torch.from_numpy(np.asarray(descriptors, dtype=np.float32))
            for k, d in enumerate(items):
                d.descriptors = z[k : k + 1]
        return items
    from ..data.graph_store import DiskGraphDataset, LazyGraphDataset

    gs = required_graphs(part)
    cls = LazyGraphDataset if isinstance(gs, GraphSet) else DiskGraphDataset
    return cls(gs, part["y"], descriptors, **graph_params, expand_edges=False)
