"""Featurize a dataset: Magpie composition features and crystal graphs, in parallel, cached.

``featurize(dataset, features_config)`` returns a :class:`FeatureSet`.  Work is spread over
worker processes (forked, so structures are not pickled) with a progress bar.  Results are
cached on disk under a key made of the dataset's content hash, the featurizer parameters
and the matfusion version, so a second run does no featurization.  A cache file that fails
its checksum or cannot be read is reported and rebuilt.
"""
from __future__ import annotations

import logging
import multiprocessing as mp
import os
import warnings
from dataclasses import dataclass
from functools import lru_cache
from typing import Optional

import numpy as np
from tqdm.auto import tqdm

from .cache import FeatureCache, cache_key
from .crystal_graph import GraphSet, neighbor_graph
from .line_graph import line_graph
from .dataset import Dataset

log = logging.getLogger("matfusion.data")

MAGPIE_WIDTH = 132


@dataclass
class FeatureSet:
    """Features of every row of a dataset, in the dataset's row order."""

    # the descriptor matrix (features.descriptors, see descriptors.py): Magpie's 132 columns first
    # when selected, then the structural sets; float64, NaN where a value could not be computed.
    # Named ``magpie`` because it fills the Magpie slot of the trial data (tabular families and
    # the descriptor branch of fused GNNs)
    magpie: np.ndarray
    magpie_columns: list[str]
    graphs: Optional[GraphSet]  # None for composition-only datasets
    from_cache: bool = False
    descriptor_sets: tuple = ("magpie",)  # the resolved features.descriptors, in column order


def _magpie_featurizer():
    from matminer.featurizers.composition import ElementProperty

    fz = ElementProperty.from_preset("magpie", impute_nan=False)
    return fz


@lru_cache(maxsize=1)
def _magpie_columns() -> tuple[str, ...]:
    return tuple(_magpie_featurizer().feature_labels())


def magpie_columns() -> list[str]:
    return list(_magpie_columns())


def magpie_features(items, featurizer=None) -> np.ndarray:
    """(n, 132) Magpie features of structures or compositions (matminer ElementProperty)."""
    fz = featurizer or _magpie_featurizer()
    out = np.full((len(items), MAGPIE_WIDTH), np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i, item in enumerate(items):
            comp = item.composition if hasattr(item, "composition") else item
            out[i] = fz.featurize(comp)
    return out


def graph_parts(structure, cutoff: float, max_neighbors: int, with_line_graph: bool = False) -> tuple:
    """One structure's packed-graph parts for ``GraphSet.from_parts``: the neighbour graph,
    followed by its line graph when asked."""
    parts = neighbor_graph(structure, cutoff, max_neighbors)
    return parts + line_graph(parts[1], parts[3]) if with_line_graph else parts


# Worker state: set in the parent before forking, so children inherit the structures.
_WORK: dict = {}


def _featurize_chunk(bounds: tuple[int, int]):
    start, stop = bounds
    items = _WORK["items"]
    fz = _WORK.get("fz")
    if fz is None:
        fz = _WORK["fz"] = _magpie_featurizer()
    want_magpie, want_graph = _WORK["magpie"], _WORK["graph"]
    magpie = magpie_features(items[start:stop], fz) if want_magpie else None
    graphs = None
    if want_graph:
        graphs = [graph_parts(s, _WORK["cutoff"], _WORK["max_neighbors"], bool(_WORK.get("line_graph")))
                  for s in items[start:stop]]
    return start, magpie, graphs


def _compute(items, want_magpie: bool, want_graph: bool, cutoff: float, max_neighbors: int,
             n_jobs: int, progress: bool, want_line_graph: bool = False):
    n = len(items)
    chunk = max(1, min(64, n // (4 * max(1, n_jobs)) or 1))
    bounds = [(i, min(n, i + chunk)) for i in range(0, n, chunk)]
    _WORK.clear()
    _WORK.update(items=items, magpie=want_magpie, graph=want_graph, cutoff=cutoff, max_neighbors=max_neighbors,
                 line_graph=want_line_graph)
    if want_magpie:
        _WORK["fz"] = _magpie_featurizer()  # built once here; forked workers inherit it
    magpie = np.full((n, MAGPIE_WIDTH), np.nan) if want_magpie else None
    graphs: list = [None] * n if want_graph else []
    what = " + ".join(x for x, w in (("magpie", want_magpie), ("graphs", want_graph),
                                     ("line graphs", want_graph and want_line_graph)) if w)
    bar = tqdm(total=n, desc=f"featurize ({what})", unit="struct", disable=not progress)
    try:
        if n_jobs > 1 and n > 2 * chunk and "fork" in mp.get_all_start_methods():
            ctx = mp.get_context("fork")
            with ctx.Pool(n_jobs) as pool:
                for start, m, g in pool.imap_unordered(_featurize_chunk, bounds):
                    _store(start, m, g, magpie, graphs, bar)
        else:
            for b in bounds:
                _store(*_featurize_chunk(b), magpie, graphs, bar)
    finally:
        bar.close()
        _WORK.clear()
    return magpie, graphs


def _store(start, m, g, magpie, graphs, bar):
    k = len(m) if m is not None else len(g)
    if m is not None:
        magpie[start:start + k] = m
    if g is not None:
        graphs[start:start + k] = g
    bar.update(k)


def featurize(dataset: Dataset, features=None, progress: bool = True, cache: Optional[FeatureCache] = None,
              graphs: bool = True) -> FeatureSet:
    """The descriptor matrix and (for structure datasets, unless ``graphs=False``: a search of
    tabular families only) crystal graphs of every row, cached."""
    from ..config import FeaturesConfig

    features = features or FeaturesConfig()
    cache = cache or FeatureCache(features.cache_dir)
    want_graph = dataset.has_structures and graphs
    # format 2: bond vectors (edge_vec) and, optionally, the line graph
    graph_params = {"cutoff": features.cutoff, "max_neighbors": features.max_neighbors, "format": 2,
                    "line_graph": bool(features.line_graph)}
    magpie_key = cache_key("magpie", dataset.content_hash, {"preset": "magpie", "width": MAGPIE_WIDTH})
    graph_key = cache_key("graph", dataset.content_hash, graph_params)

    magpie_arrays = cache.load(magpie_key)
    graph_arrays = cache.load(graph_key) if want_graph else None
    need_magpie = magpie_arrays is None
    need_graph = want_graph and graph_arrays is None
    n_jobs = features.n_jobs or os.cpu_count() or 1

    if need_magpie or need_graph:
        magpie, parts = _compute(dataset.structures, need_magpie, need_graph, features.cutoff,
                                 features.max_neighbors, n_jobs, progress, want_line_graph=features.line_graph)
        if need_magpie:
            magpie_arrays = {"magpie": magpie}
            cache.save(magpie_key, magpie_arrays)
        if need_graph:
            gs = GraphSet.from_parts(parts, features.cutoff, features.max_neighbors)
            graph_arrays = gs.arrays()
            cache.save(graph_key, graph_arrays)

    graph_set = None
    if want_graph:
        graph_set = GraphSet(**graph_arrays, cutoff=features.cutoff, max_neighbors=features.max_neighbors)
        if len(graph_set) != len(dataset):
            raise RuntimeError(f"graph cache holds {len(graph_set)} graphs for {len(dataset)} rows")
    magpie = magpie_arrays["magpie"]
    if magpie.shape != (len(dataset), MAGPIE_WIDTH):
        raise RuntimeError(f"magpie cache has shape {magpie.shape} for {len(dataset)} rows")
    from . import descriptors as desc

    sets = desc.resolve_sets(getattr(features, "descriptors", None), dataset.has_structures)
    table = desc.cached_matrix(dataset, sets, magpie, cache, n_jobs=n_jobs, progress=progress)
    return FeatureSet(
        magpie=table,
        magpie_columns=desc.columns_of(sets),
        graphs=graph_set,
        from_cache=not (need_magpie or need_graph),
        descriptor_sets=tuple(sets),
    )
