"""Featurize a dataset: the descriptor matrix and the crystal graphs, in shards, cached.

``featurize(dataset, features_config)`` returns a :class:`FeatureSet`.  It orchestrates: the
crystal graphs (built here) and the descriptor matrix (every set, Magpie included, from
:mod:`matfusion.data.descriptors`), each loaded from the feature cache or computed and saved.
Cache entries are keyed by the dataset's content hash, the featurizer parameters and the
matfusion version, so a second run does no featurization.  A cache file that fails its checksum
or cannot be read is reported and rebuilt.

What is missing from the cache is computed in fixed-size shards (:data:`SHARD_SIZE` consecutive
rows): each shard builds the graphs and the missing descriptor sets of its rows and is written as
its own file under ``<cache>/shards/`` (atomic rename), keyed by the content of its structures and
the featurizer parameters.  A featurization that is interrupted resumes from the finished shards;
once every shard is there, the arrays are assembled in row order (byte-identical to one pass over
all rows), saved as the cache entries above (what the rest of matfusion reads) and the shard files
removed.  ``features.backend`` says where the shards run: ``local``, the forked workers of
:func:`~matfusion.data.parallel.parallel_map` (one shard per task), or ``ray``, one Ray task per
shard on the cluster (:mod:`matfusion.data.distributed`, imported only then).
"""

from __future__ import annotations

import hashlib
import logging
import sys
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from . import descriptors as desc
from .cache import FeatureCache, cache_key
from .crystal_graph import GraphSet, neighbor_graph
from .dataset import DataError, Dataset
from .line_graph import line_graph
from .parallel import Failure, default_n_jobs, parallel_map

log = logging.getLogger("matfusion.data")

# format 2: bond vectors (edge_vec) and, optionally, the line graph
GRAPH_FORMAT = 2
# rows per shard of featurization work: the unit of work (one forked-pool or Ray task: the largest
# chunk parallel_map hands a worker, so the local pool is as busy as before) and of resume; part of
# no cache key (a shard's key is the content of its structures)
SHARD_SIZE = 64


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
    shards: Optional["ShardStats"] = None  # how the missing features were computed (None: nothing was)


@dataclass
class ShardStats:
    """The shards of one featurization: how many, how many were computed now and how many reused
    from an interrupted run, and the shards computed per Ray node id (``ray`` backend only)."""

    backend: str
    total: int
    computed: int
    reused: int
    per_node: Counter = field(default_factory=Counter)

    def summary(self) -> str:
        text = f"featurize: {self.total} shard(s), {self.computed} computed ({self.backend}), {self.reused} reused"
        if self.per_node:
            nodes = ", ".join(f"{node[:8]} {n}" for node, n in sorted(self.per_node.items()))
            text += f"; shards per node ({len(self.per_node)} node(s)): {nodes}"
        return text


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
    ``failed`` holds their row positions, ``reasons`` one line each; ``shard_files`` the files of
    the good shards of a sharded featurization (left on disk for a run of the same rows to reuse;
    a caller that featurizes without the failed rows instead removes them after, with
    :func:`remove_shard_files`: its later shards hold other rows, so other keys)."""

    def __init__(self, message: str, failed: list[int], reasons: list[str], shard_files: Sequence[Path] = ()) -> None:
        super().__init__(message)
        self.failed, self.reasons, self.shard_files = failed, reasons, list(shard_files)


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
        raise graph_build_error(dataset, failures)
    return GraphSet.from_parts(parts, cutoff, max_neighbors)


def graph_build_error(dataset: Dataset, failures: Sequence[Failure]) -> GraphBuildError:
    """The :class:`GraphBuildError` naming ``failures`` (their ``index``: row positions in ``dataset``)."""
    failures = sorted(failures, key=lambda f: f.index)
    reasons = [f"row {f.index} (id {dataset.ids[f.index]}): {f.error}: {f.message}" for f in failures]
    return GraphBuildError(
        f"{dataset.name}: cannot build the crystal graph of {len(failures)} structure(s): "
        + "; ".join(reasons[:5])
        + (" ..." if len(failures) > 5 else "")
        + " (remove these rows from the data)",
        [f.index for f in failures],
        reasons,
    )


def graph_key(dataset: Dataset, features) -> str:
    """The cache key of the graphs of every row of ``dataset`` built with ``features``."""
    params = {
        "cutoff": features.cutoff,
        "max_neighbors": features.max_neighbors,
        "format": GRAPH_FORMAT,
        "line_graph": bool(features.line_graph),
    }
    return cache_key("graph", dataset.content_hash, params)


def cached_graphs(
    dataset: Dataset, features, cache: FeatureCache, n_jobs: int = 1, progress: bool = False
) -> tuple[GraphSet, bool]:
    """(the graphs of every row, whether they came from the cache), built in one pass (no shards)."""
    key = graph_key(dataset, features)
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


# -- shards: the unit of featurization work and of resume ---------------------------------------


@dataclass(frozen=True)
class ShardWork:
    """What every shard computes: the graphs of its rows when ``graph`` holds their parameters
    (cutoff, max_neighbors, line_graph), and the descriptor sets ``sets`` (matrix order)."""

    graph: Optional[tuple]
    sets: tuple

    def key_params(self) -> dict:
        """What a shard's cache key depends on besides its structures: the graph parameters and
        each set's own cache identity (name, version, width)."""
        graph = None
        if self.graph is not None:
            cutoff, max_neighbors, line = self.graph
            graph = {"cutoff": cutoff, "max_neighbors": max_neighbors, "format": GRAPH_FORMAT, "line_graph": line}
        return {"graph": graph, "sets": [desc.registry()[n].cache_key("") for n in self.sets]}

    def label(self) -> str:
        parts = []
        if self.graph is not None:
            parts.append("graphs + line graphs" if self.graph[2] else "graphs")
        if self.sets:
            parts.append(f"descriptors ({', '.join(self.sets)})")
        return f"featurize ({' + '.join(parts)})"


@dataclass(frozen=True)
class Shard:
    """Rows ``start:stop`` of the dataset; ``key``: its file's cache key."""

    index: int
    start: int
    stop: int
    key: str

    def rows(self) -> str:
        return f"shard {self.index} (rows {self.start}-{self.stop - 1})"


@dataclass
class ShardResult:
    """A computed shard: its arrays (``graph.<name>`` packed graphs, ``desc.<set>`` (rows, width)
    blocks; None when a graph failed), the graph failures (dataset row positions), what the
    featurizers logged (level, message), and the Ray node that computed it (``ray`` backend)."""

    index: int
    arrays: Optional[dict]
    failures: list
    messages: list
    node: str = ""


class _Collect(logging.Handler):
    def __init__(self, into: list) -> None:
        super().__init__(logging.INFO)
        self.into = into

    def emit(self, record: logging.LogRecord) -> None:
        self.into.append((record.levelno, record.getMessage()))


@contextmanager
def _captured_logs():
    """The records of the ``matfusion.data`` logger while a shard runs, kept for the driver (a
    Ray worker's log never reaches it) instead of printed where the shard runs."""
    logger, records = logging.getLogger("matfusion.data"), []
    handler, propagate = _Collect(records), logger.propagate
    logger.addHandler(handler)
    logger.propagate = False
    try:
        yield records
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate


def compute_shard(work: ShardWork, structures: Sequence, start: int, index: int) -> ShardResult:
    """The features ``work`` asks for of ``structures`` (the rows from ``start`` on), one process,
    no I/O: what each backend runs per shard.  Graph failures leave the descriptors uncomputed."""
    arrays: dict = {}
    with _captured_logs() as messages:
        if work.graph is not None:
            parts, failures = parallel_map(_GraphParts(*work.graph), structures, n_jobs=1)
            if failures:
                moved = [Failure(start + f.index, f.error, f.message) for f in failures]
                return ShardResult(index, None, moved, messages)
            gs = GraphSet.from_parts(parts, work.graph[0], work.graph[1])
            arrays.update({f"graph.{k}": v for k, v in gs.arrays().items()})
        if work.sets:
            blocks = desc.compute_sets(structures, work.sets, n_jobs=1, first=start)
            arrays.update({f"desc.{n}": np.ascontiguousarray(blocks[n]) for n in work.sets})
    return ShardResult(index, arrays, [], messages)


def _item_digest(h, item) -> None:
    """Feed what the featurizers read of one structure (lattice, fractional coordinates, the
    species and occupancy of each site, charge) or composition into the hash ``h``."""
    if hasattr(item, "lattice"):
        h.update(np.ascontiguousarray(item.lattice.matrix, dtype=np.float64).tobytes())
        h.update(np.ascontiguousarray(item.frac_coords, dtype=np.float64).tobytes())
        sites = ";".join(",".join(f"{sp}:{occ!r}" for sp, occ in site.species.items()) for site in item)
        h.update(f"{sites}|{getattr(item, 'charge', 0)!r}".encode())
    else:
        h.update("|".join(f"{el}:{amt!r}" for el, amt in item.items()).encode())


def plan_shards(structures: Sequence, work: ShardWork, shard_size: int = SHARD_SIZE) -> list[Shard]:
    """The shards of ``structures``: ``shard_size`` consecutive rows each (the last one shorter),
    each keyed by the content of its structures and ``work``'s parameters."""
    shard_size = max(1, int(shard_size))
    params, shards = work.key_params(), []
    for i, start in enumerate(range(0, len(structures), shard_size)):
        stop = min(len(structures), start + shard_size)
        h = hashlib.sha256()
        for item in structures[start:stop]:
            _item_digest(h, item)
        shards.append(Shard(i, start, stop, cache_key("shard", h.hexdigest(), params)))
    return shards


def shard_cache(cache: FeatureCache) -> FeatureCache:
    """Where the shard files live: ``shards/`` in the feature cache's folder."""
    return FeatureCache(cache.directory / "shards")


def _complete(result: ShardResult, shard: Shard, store: FeatureCache, on_shard: Optional[Callable]) -> None:
    """Write a computed shard's file (atomic rename), then tell ``on_shard(index, path)``."""
    if result.arrays is not None:
        path = store.save(shard.key, result.arrays)
        if on_shard is not None:
            on_shard(shard.index, path)


class _LocalShard:
    """One shard in a worker of ``parallel_map``: computed and written there (the structures and
    this object reach forked workers through the fork)."""

    def __init__(self, work: ShardWork, structures: Sequence, store: FeatureCache, on_shard) -> None:
        self.work, self.structures, self.store, self.on_shard = work, structures, store, on_shard

    def __call__(self, shard: Shard) -> ShardResult:
        result = compute_shard(self.work, self.structures[shard.start : shard.stop], shard.start, shard.index)
        _complete(result, shard, self.store, self.on_shard)
        return result


def run_shards_local(work, structures, todo, store, on_shard, n_jobs: int, progress: bool) -> list[ShardResult]:
    """The shards ``todo`` over ``n_jobs`` forked workers (one shard per task), one bar over them."""
    for name in work.sets:  # featurizers built once here: forked workers inherit them
        if desc.registry()[name].prepare is not None:
            desc.registry()[name].prepare()
    results, crashed = parallel_map(
        _LocalShard(work, structures, store, on_shard),
        todo,
        n_jobs=n_jobs,
        chunk=1,
        progress=progress,
        desc=work.label(),
        unit="shard",
    )
    if crashed:  # writing a shard failed (disk full, permissions): nothing to skip, the run stops
        f = crashed[0]
        raise RuntimeError(f"featurize: {todo[f.index].rows()} failed: {f.error}: {f.message}")
    return results


def run_shards_ray(work, structures, todo, store, on_shard, n_jobs: int, progress: bool, address) -> list[ShardResult]:
    """The shards ``todo`` as Ray tasks (:func:`matfusion.data.distributed.run_shards`); each shard
    is written here, by the driver, as its result arrives (the workers' disks need not be shared)."""
    from .distributed import run_shards

    results = []

    def arrived(shard: Shard, result: ShardResult) -> None:
        _complete(result, shard, store, on_shard)
        results.append(result)

    run_shards(
        compute_shard,
        work,
        structures,
        todo,
        arrived,
        address=address,
        num_cpus=n_jobs,
        progress=progress,
        desc=work.label(),
    )
    return results


def _load_shard(store: FeatureCache, shard: Shard, work: ShardWork, n_rows: int) -> Optional[dict]:
    """A finished shard's arrays from its file, or None (absent, corrupt: reported by the cache, or
    not what ``work`` needs)."""
    arrays = store.load(shard.key)
    if arrays is None:
        return None
    ok = all(arrays.get(f"desc.{n}", np.zeros((0, 0))).shape == (n_rows, desc.registry()[n].width) for n in work.sets)
    if work.graph is not None:
        ok = ok and "graph.node_ptr" in arrays and len(arrays["graph.node_ptr"]) == n_rows + 1
    return arrays if ok else None


def concat_graphs(parts: Sequence[GraphSet], cutoff: float, max_neighbors: int) -> GraphSet:
    """The packed graphs of consecutive shards as one :class:`GraphSet` (identical, array for
    array, to packing all their graphs at once with ``GraphSet.from_parts``)."""

    def ptr(name: str) -> np.ndarray:
        out, offset = [np.zeros(1, np.int64)], np.int64(0)
        for g in parts:
            p = getattr(g, name)
            out.append(p[1:] + offset)
            offset = offset + p[-1]
        return np.concatenate(out).astype(np.int64)

    gs = GraphSet(
        z=np.concatenate([g.z for g in parts]),
        node_ptr=ptr("node_ptr"),
        edge_index=np.concatenate([g.edge_index for g in parts], axis=1),
        distance=np.concatenate([g.distance for g in parts]),
        edge_vec=np.concatenate([g.edge_vec for g in parts]),
        edge_ptr=ptr("edge_ptr"),
        cutoff=float(cutoff),
        max_neighbors=int(max_neighbors),
    )
    if parts[0].has_line_graph:
        gs.line_index = np.concatenate([g.line_index for g in parts], axis=1)
        gs.line_cos = np.concatenate([g.line_cos for g in parts])
        gs.line_ptr = ptr("line_ptr")
    return gs


def _shard_graphs(arrays: dict, work: ShardWork) -> GraphSet:
    names = {k[len("graph.") :]: v for k, v in arrays.items() if k.startswith("graph.")}
    return GraphSet(**names, cutoff=work.graph[0], max_neighbors=work.graph[1])


def featurize_in_shards(
    dataset: Dataset,
    work: ShardWork,
    cache: FeatureCache,
    backend: str = "local",
    n_jobs: int = 1,
    progress: bool = False,
    shard_size: int = SHARD_SIZE,
    on_shard: Optional[Callable] = None,
    ray_address: Optional[str] = None,
) -> tuple[Optional[GraphSet], dict, ShardStats]:
    """(the graphs, ``{set: (n, width) block}``, the shard counts) that ``work`` asks for, of every
    row of ``dataset``: the finished shards read from their files, the others computed on
    ``backend`` and written as they finish; the shard files are removed once assembled.  Graph
    failures anywhere are one :class:`GraphBuildError` after every shard ran (the good shards stay
    on disk, named in its ``shard_files``)."""
    store = shard_cache(cache)
    shards = plan_shards(dataset.structures, work, shard_size)
    done = {s.index: a for s in shards if (a := _load_shard(store, s, work, s.stop - s.start)) is not None}
    todo = [s for s in shards if s.index not in done]
    stats = ShardStats(backend, len(shards), len(todo), len(done))
    if todo and backend == "ray":
        results = run_shards_ray(work, dataset.structures, todo, store, on_shard, n_jobs, progress, ray_address)
    elif todo:
        results = run_shards_local(work, dataset.structures, todo, store, on_shard, n_jobs, progress)
    else:
        results = []
    failures = []
    results = sorted(results, key=lambda r: r.index)
    _relog(shards, results)
    for r in results:
        failures.extend(r.failures)
        if r.arrays is not None:
            done[r.index] = r.arrays
        if r.node:
            stats.per_node[r.node] += 1
    if failures:
        err = graph_build_error(dataset, failures)
        err.shard_files = [store.path(s.key) for s in shards if s.index in done]
        raise err
    graphs, blocks = _assemble([done[s.index] for s in shards], work)
    remove_shard_files([store.path(s.key) for s in shards])
    if progress:
        print(stats.summary(), file=sys.stderr, flush=True)
    else:
        log.info(stats.summary())
    return graphs, blocks, stats


def remove_shard_files(paths: Sequence[Path]) -> None:
    """Delete these shard files (those already gone are skipped), then their folder when no other
    featurization has shards there."""
    for path in paths:
        try:
            Path(path).unlink()
        except OSError:
            pass
    for folder in {Path(p).parent for p in paths}:
        try:
            folder.rmdir()
        except OSError:
            pass


def _relog(shards: Sequence[Shard], results: Sequence[ShardResult]) -> None:
    """What the featurizers logged in the shards, here: per level the first message (with its
    shard's rows) and how many more there were (each at DEBUG), not one line per shard."""
    by_level: dict = {}
    for r in results:
        for level, message in r.messages:
            by_level.setdefault(level, []).append(f"{shards[r.index].rows()}: {message}")
    for level, lines in sorted(by_level.items()):
        more = (
            f" (and {len(lines) - 1} more such message(s) from other shards; DEBUG lists them)"
            if len(lines) > 1
            else ""
        )
        log.log(level, "%s%s", lines[0], more)
        for line in lines[1:]:
            log.debug("%s", line)


def _assemble(ordered: list, work: ShardWork) -> tuple[Optional[GraphSet], dict]:
    """The graphs and descriptor blocks of every row from the shards' arrays, in row order."""
    blocks = {
        n: np.concatenate([a[f"desc.{n}"] for a in ordered], axis=0)
        if ordered
        else np.zeros((0, desc.registry()[n].width))
        for n in work.sets
    }
    if work.graph is None:
        return None, blocks
    cutoff, max_neighbors = work.graph[0], work.graph[1]
    if not ordered:
        return GraphSet.from_parts([], cutoff, max_neighbors), blocks
    return concat_graphs([_shard_graphs(a, work) for a in ordered], cutoff, max_neighbors), blocks


def featurize(
    dataset: Dataset,
    features=None,
    progress: bool = True,
    cache: Optional[FeatureCache] = None,
    graphs: bool = True,
    *,
    shard_size: int = SHARD_SIZE,
    on_shard: Optional[Callable] = None,
    ray_address: Optional[str] = None,
) -> FeatureSet:
    """The descriptor matrix and (for structure datasets, unless ``graphs=False``: a search of
    tabular families only) crystal graphs of every row, cached; what the cache lacks is computed
    in shards on ``features.backend`` (see the module docstring).  ``on_shard(index, path)`` is
    called in the process that wrote each shard file; ``ray_address``: the cluster to join when
    this process is not connected to Ray yet (else ``$RAY_ADDRESS``, else a local Ray)."""
    from ..config import FeaturesConfig

    features = features or FeaturesConfig()
    cache = cache or FeatureCache(features.cache_dir)
    sets = desc.resolve_sets(getattr(features, "descriptors", None), dataset.has_structures)
    want_graphs = dataset.has_structures and graphs
    n = len(dataset)

    gkey = graph_key(dataset, features) if want_graphs else None
    graph_arrays = cache.load(gkey) if want_graphs else None
    blocks = desc.cached_blocks(dataset, sets, cache)
    missing = [name for name in sets if name not in blocks]
    graph_params = (features.cutoff, features.max_neighbors, bool(features.line_graph))
    work = ShardWork(graph_params if want_graphs and graph_arrays is None else None, tuple(missing))

    stats = None
    if work.graph is not None or work.sets:
        fresh_graphs, fresh_blocks, stats = featurize_in_shards(
            dataset,
            work,
            cache,
            backend=getattr(features, "backend", "local"),
            n_jobs=default_n_jobs(features.n_jobs),
            progress=progress,
            shard_size=shard_size,
            on_shard=on_shard,
            ray_address=ray_address,
        )
        if fresh_graphs is not None:
            graph_arrays = fresh_graphs.arrays()
            cache.save(gkey, graph_arrays)
        for name, block in fresh_blocks.items():
            desc.save_block(dataset, name, block, cache)
            blocks[name] = block
    graph_set = None
    if want_graphs:
        graph_set = GraphSet(**graph_arrays, cutoff=features.cutoff, max_neighbors=features.max_neighbors)
        if len(graph_set) != n:
            raise RuntimeError(f"graph cache holds {len(graph_set)} graphs for {n} rows")
    return FeatureSet(
        descriptors=desc.matrix_of_blocks(sets, blocks, n),
        descriptor_columns=desc.columns_of(sets),
        graphs=graph_set,
        from_cache=stats is None,
        descriptor_sets=tuple(sets),
        shards=stats,
    )
