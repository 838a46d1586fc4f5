"""What a trial receives: numpy arrays only (zero-copy through Ray's object store).

``pack_trial_data`` keeps only the rows of the inner train and validation parts, so a trial
cannot see the test part of a fold even by accident; the test rows are packed separately
(``pack_rows``) for the driver's after-search evaluation.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from ..data.crystal_graph import GraphSet


def pack_rows(
    descriptors: np.ndarray,
    graphs: Optional[GraphSet],
    targets: np.ndarray,
    rows: Sequence[int],
    ids: Optional[Sequence[str]] = None,
) -> dict:
    """Arrays of the given rows: ``descriptors`` (the descriptor matrix), ``y``, ``row`` (original positions) and, for
    structure data, the packed graph arrays under ``graph/<name>``."""
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
) -> dict:
    """The inner train and validation rows only: ``{"train": {...}, "val": {...}, "graph_params": {...}}``."""
    return {
        "train": pack_rows(descriptors, graphs, targets, train),
        "val": pack_rows(descriptors, graphs, targets, val),
        "graph_params": {"gaussian_bins": int(gaussian_bins), "gaussian_width": gaussian_width},
    }


def graphs_of(part: dict) -> Optional[GraphSet]:
    if "graph/z" not in part:
        return None
    arrays = {k: part[f"graph/{k}"] for k in GraphSet.ARRAY_NAMES if f"graph/{k}" in part}
    return GraphSet(**arrays, cutoff=float(part["graph/cutoff"]), max_neighbors=int(part["graph/max_neighbors"]))


def data_list(part: dict, graph_params: dict) -> list:
    """PyG ``Data`` objects of a packed part (targets attached as ``y``), their bond features
    expanded per batch by the models (one float per edge held)."""
    gs = graphs_of(part)
    if gs is None:
        raise ValueError("this dataset has no crystal structures; graph models need structures")
    return gs.to_data_list(range(len(gs)), part["y"], **graph_params, expand_edges=False)
