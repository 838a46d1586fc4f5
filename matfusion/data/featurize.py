"""Featurize a dataset: the descriptor matrix and the crystal graphs, in parallel, cached.

``featurize(dataset, features_config)`` returns a :class:`FeatureSet`.  It orchestrates: the
crystal graphs (built here, with :func:`~matfusion.data.parallel.parallel_map`) and the
descriptor matrix (every set, Magpie included, from :mod:`matfusion.data.descriptors`), each
loaded from the feature cache or computed and saved.  Cache entries are keyed by the
dataset's content hash, the featurizer parameters and the matfusion version, so a second run
does no featurization.  A cache file that fails its checksum or cannot be read is reported
and rebuilt.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

import numpy as np

from . import descriptors as desc
from .cache import FeatureCache, cache_key
from .crystal_graph import GraphSet, neighbor_graph
from .dataset import DataError, Dataset
from .line_graph import line_graph
from .parallel import default_n_jobs, parallel_map

log = logging.getLogger("matfusion.data")

# format 2: bond vectors (edge_vec) and, optionally, the line graph
GRAPH_FORMAT = 2


@dataclass
class FeatureSet:
    """Features of every row of a dataset, in the dataset's row order."""

    # the descriptor matrix (features.descriptors, see descriptors.py): Magpie's 132 columns first
    # when selected, then the structural sets; float64, NaN where a value could not be computed.
    descriptors: np.ndarray
    descriptor_columns: list[str]
    graphs: Optional[GraphSet]  # None for composition-only datasets
    from_cache: bool = False  # nothing was computed: the graphs and every set came from the cache
    descriptor_sets: tuple = ("magpie",)  # the resolved features.descriptors, in column order


def graph_parts(structure, cutoff: float, max_neighbors: int, with_line_graph: bool = False) -> tuple:
    """One structure's packed-graph parts for ``GraphSet.from_parts``: the neighbour graph,
    followed by its line graph when asked."""
    parts = neighbor_graph(structure, cutoff, max_neighbors)
    return parts + line_graph(parts[1], parts[3]) if with_line_graph else parts


class _GraphParts:
    """``graph_parts`` with fixed parameters (what the workers of ``parallel_map`` call)."""

    def __init__(self, cutoff: float, max_neighbors: int, with_line_graph: bool) -> None:
        self.cutoff, self.max_neighbors, self.with_line_graph = cutoff, max_neighbors, with_line_graph

    def __call__(self, structure) -> tuple:
        return graph_parts(structure, self.cutoff, self.max_neighbors, self.with_line_graph)


class GraphBuildError(DataError):
    """Structures the graph builder failed on: the message names them (row, id, reason);
    ``failed`` holds their row positions, ``reasons`` one line each."""

    def __init__(self, message: str, failed: list[int], reasons: list[str]) -> None:
        super().__init__(message)
        self.failed, self.reasons = failed, reasons


def build_graphs(
    dataset: Dataset,
    cutoff: float,
    max_neighbors: int,
    with_line_graph: bool = False,
    n_jobs: int = 1,
    progress: bool = False,
) -> GraphSet:
    """The crystal graphs (and line graphs when asked) of every row; structures the builder fails
    on are a :class:`GraphBuildError` naming their rows, ids and reasons (``prepare_fold`` skips
    them; the load-time checks of :func:`~matfusion.data.dataset.structure_problem` leave few)."""
    what = "graphs + line graphs" if with_line_graph else "graphs"
    parts, failures = parallel_map(
        _GraphParts(cutoff, max_neighbors, with_line_graph),
        dataset.structures,
        n_jobs=n_jobs,
        progress=progress,
        desc=f"featurize ({what})",
    )
    if failures:
        reasons = [f"row {f.index} (id {dataset.ids[f.index]}): {f.error}: {f.message}" for f in failures]
        raise GraphBuildError(
            f"{dataset.name}: cannot build the crystal graph of {len(failures)} structure(s): "
            + "; ".join(reasons[:5])
            + (" ..." if len(failures) > 5 else "")
            + " (remove these rows from the data)",
            [f.index for f in failures],
            reasons,
        )
    return GraphSet.from_parts(parts, cutoff, max_neighbors)


def cached_graphs(
    dataset: Dataset, features, cache: FeatureCache, n_jobs: int = 1, progress: bool = False
) -> tuple[GraphSet, bool]:
    """(the graphs of every row, whether they came from the cache)."""
    params = {
        "cutoff": features.cutoff,
        "max_neighbors": features.max_neighbors,
        "format": GRAPH_FORMAT,
        "line_graph": bool(features.line_graph),
    }
    key = cache_key("graph", dataset.content_hash, params)
    arrays = cache.load(key)
    hit = arrays is not None
    if not hit:
        gs = build_graphs(
            dataset,
            features.cutoff,
            features.max_neighbors,
            bool(features.line_graph),
            n_jobs=n_jobs,
            progress=progress,
        )
        arrays = gs.arrays()
        cache.save(key, arrays)
    graphs = GraphSet(**arrays, cutoff=features.cutoff, max_neighbors=features.max_neighbors)
    if len(graphs) != len(dataset):
        raise RuntimeError(f"graph cache holds {len(graphs)} graphs for {len(dataset)} rows")
    return graphs, hit


def featurize(
    dataset: Dataset, features=None, progress: bool = True, cache: Optional[FeatureCache] = None, graphs: bool = True
) -> FeatureSet:
    """The descriptor matrix and (for structure datasets, unless ``graphs=False``: a search of
    tabular families only) crystal graphs of every row, cached."""
    from ..config import FeaturesConfig

    features = features or FeaturesConfig()
    cache = cache or FeatureCache(features.cache_dir)
    n_jobs = default_n_jobs(features.n_jobs)
    sets = desc.resolve_sets(getattr(features, "descriptors", None), dataset.has_structures)
    graph_set, graphs_hit = None, True
    if dataset.has_structures and graphs:
        graph_set, graphs_hit = cached_graphs(dataset, features, cache, n_jobs=n_jobs, progress=progress)
    table, sets_hit = desc.cached_matrix(dataset, sets, cache, n_jobs=n_jobs, progress=progress)
    return FeatureSet(
        descriptors=table,
        descriptor_columns=desc.columns_of(sets),
        graphs=graph_set,
        from_cache=graphs_hit and sets_hit,
        descriptor_sets=tuple(sets),
    )
