"""Graphs read lazily: a dataset whose item ``i`` is built from the packed arrays when it is read.

A trial gets the packed arrays of its rows (:class:`~matfusion.data.crystal_graph.GraphSet`,
zero-copy through Ray's object store).  Turning every graph into a PyG ``Data`` up front
(:meth:`GraphSet.to_data_list`) holds O(N) Python objects and tensor copies per trial; a
:class:`LazyGraphDataset` holds the arrays only, and a ``DataLoader`` over it builds the graphs of
one batch at a time (the same ``Data``, item for item, as the eager list: same builder).

Measured growth with the dataset size: ``benchmarks/scale.py``, docs/scale.md.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import OrderedDict
from pathlib import Path
from typing import Optional

import numpy as np

from .cache import arrays_digest, atomic_write
from .crystal_graph import GraphSet

log = logging.getLogger(__name__)


def _torch_dataset_base():
    from torch.utils.data import Dataset

    return Dataset


class LazyGraphDataset(_torch_dataset_base()):
    """``Data`` of graph ``i`` of ``graphs`` on each ``dataset[i]``, with ``y`` (from ``targets``) and,
    when ``descriptors`` (n, D) are given, ``descriptors`` (1, D) (row ``i``, float32).  The other
    arguments are :meth:`GraphSet.to_data_list`'s.  ``y`` of the whole set is :attr:`y`, without
    building any graph.  ``accesses`` counts the graphs built so far."""

    def __init__(
        self,
        graphs: GraphSet,
        targets: Optional[np.ndarray] = None,
        descriptors: Optional[np.ndarray] = None,
        gaussian_bins: int = 40,
        gaussian_width: Optional[float] = None,
        line_graph_bins: int = 20,
        expand_edges: bool = False,
    ) -> None:
        import torch

        n = len(graphs)
        if targets is not None and len(targets) != n:
            raise ValueError(f"{type(self).__name__}: {len(targets)} targets for {n} graphs")
        if descriptors is not None and len(descriptors) != n:
            raise ValueError(f"{type(self).__name__}: {len(descriptors)} descriptor rows for {n} graphs")
        self.graphs, self.targets = graphs, targets
        self._build = graphs.data_builder(targets, gaussian_bins, gaussian_width, line_graph_bins, expand_edges)
        self._descriptors = None if descriptors is None else torch.from_numpy(np.asarray(descriptors, np.float32))
        self.accesses = 0

    def __len__(self) -> int:
        return len(self.graphs)

    def __getitem__(self, i):
        """The ``Data`` of graph ``i`` (a slice: a list of them)."""
        n = len(self)
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(n))]
        i = int(i)
        if not -n <= i < n:
            raise IndexError(f"graph {i} out of range for {n} graphs")
        i %= n
        data = self._build(i)
        if self._descriptors is not None:
            data.descriptors = self._descriptors[i : i + 1]
        self.accesses += 1
        return data

    @property
    def y(self):
        """(n, n_targets) float32 tensor: the ``y`` of every item, stacked (as ``torch.cat`` of them)."""
        import torch

        if self.targets is None:
            raise ValueError("LazyGraphDataset: no targets were given")
        t = np.asarray(self.targets)
        return torch.tensor(t.reshape(len(t), -1), dtype=torch.float32)


# -- graphs on disk: checksummed shard files, read a graph at a time ------------------------------

GRAPH_SHARD_ROWS = 1024  # graphs per shard file
STORE_FORMAT = 1
_PTRS = ("node_ptr", "edge_ptr", "line_ptr")
# array -> (its pointer, whether the item axis is the last one: (2, E) index arrays)
_ITEM_ARRAYS = {
    "z": ("node_ptr", False),
    "edge_index": ("edge_ptr", True),
    "distance": ("edge_ptr", False),
    "edge_vec": ("edge_ptr", False),
    "line_index": ("line_ptr", True),
    "line_cos": ("line_ptr", False),
}


class GraphStoreError(RuntimeError):
    """A shard of a graph store on disk is missing or fails its checksum."""


def _rows_slice(graphs: GraphSet, a: int, b: int) -> dict:
    """The packed arrays of graphs ``a:b`` (pointers rebased to 0)."""
    out = {}
    for name, (ptr, last_axis) in _ITEM_ARRAYS.items():
        arr = getattr(graphs, name)
        if arr is None:
            continue
        p = getattr(graphs, ptr)
        lo, hi = int(p[a]), int(p[b])
        out[name] = np.ascontiguousarray(arr[:, lo:hi] if last_axis else arr[lo:hi])
    for ptr in _PTRS:
        p = getattr(graphs, ptr)
        if p is not None:
            out[ptr] = np.ascontiguousarray(p[a : b + 1] - p[a])
    return out


def _shard_bytes(arrays: dict) -> tuple[bytes, dict]:
    """One shard file's bytes (the arrays' raw C-order bytes, one after the other) and its layout
    ``{name: [offset, dtype, shape]}``."""
    chunks, layout, offset = [], {}, 0
    for name in (*_PTRS, *_ITEM_ARRAYS):
        if name not in arrays:
            continue
        a = np.ascontiguousarray(arrays[name])
        layout[name] = [offset, a.dtype.str, list(a.shape)]
        chunks.append(a.tobytes())
        offset += a.nbytes
    return b"".join(chunks), layout


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _file_sha256(path: Path) -> Optional[str]:
    try:
        return _sha256(path.read_bytes())
    except OSError:
        return None


def store_key(graphs: GraphSet, rows_per_shard: int) -> str:
    """The content address of a graph store: its graphs' arrays, cutoff, neighbours and shard size."""
    head = f"graph-store v{STORE_FORMAT} {graphs.cutoff!r} {graphs.max_neighbors} {rows_per_shard}"
    return hashlib.sha256(f"{head} {arrays_digest(graphs.arrays())}".encode()).hexdigest()[:24]


def write_graph_store(graphs: GraphSet, root, rows_per_shard: int = GRAPH_SHARD_ROWS) -> dict:
    """Write ``graphs`` as checksummed shard files of ``rows_per_shard`` consecutive graphs under
    ``root/<key>/`` (``key``: :func:`store_key`; each file a temporary one, then renamed) and
    return the store's index: its folder, the shard files with their row ranges (graph ``i`` is
    at position ``i - start`` of the shard whose ``start <= i < stop``), layouts and SHA-256
    checksums.  A store already there is reused: every shard's checksum is checked, and a shard
    missing or corrupt is written again (one warning line each)."""
    if rows_per_shard < 1:
        raise ValueError(f"rows_per_shard must be >= 1 (got {rows_per_shard})")
    key = store_key(graphs, rows_per_shard)
    folder = Path(root).expanduser().resolve() / key
    folder.mkdir(parents=True, exist_ok=True)
    index_path = folder / "index.json"
    old = None
    if index_path.is_file():
        try:
            old = json.loads(index_path.read_text())
        except (OSError, ValueError):
            old = None
    n, shards, rebuilt = len(graphs), [], 0
    for k, a in enumerate(range(0, n, rows_per_shard)):
        b = min(a + rows_per_shard, n)
        name = f"shard-{k:05d}.bin"
        path = folder / name
        known = old["shards"][k] if old and k < len(old["shards"]) and old["shards"][k]["file"] == name else None
        if known is not None and known["start"] == a and known["stop"] == b:
            on_disk = _file_sha256(path)
            if on_disk == known["sha256"]:
                shards.append(known)
                continue
            why = "missing" if on_disk is None else "corrupt (checksum mismatch)"
            log.warning("graph store shard %s is %s; rebuilding it", path, why)
            rebuilt += 1
        data, layout = _shard_bytes(_rows_slice(graphs, a, b))
        atomic_write(path, data)
        shards.append({"file": name, "start": a, "stop": b, "sha256": _sha256(data), "layout": layout})
    index = {
        "format": STORE_FORMAT,
        "key": key,
        "dir": str(folder),
        "n": n,
        "cutoff": float(graphs.cutoff),
        "max_neighbors": int(graphs.max_neighbors),
        "line_graph": bool(graphs.has_line_graph),
        "rows_per_shard": int(rows_per_shard),
        "shards": shards,
        "rebuilt": rebuilt,
    }
    if old != index:
        atomic_write(index_path, json.dumps({**index, "rebuilt": 0}).encode())
    return index


class DiskGraphSet:
    """The graphs of a store written by :func:`write_graph_store`, read one graph at a time with
    plain positioned reads (``os.pread``) of its byte ranges: nothing of the whole set is mapped or
    held but each touched shard's pointers.  A shard's file is read whole once, on first use, to
    check its SHA-256 (:class:`GraphStoreError` naming the file when it differs or the file is
    missing); :attr:`shards_read` names the shard files read so far.  ``graph(i)`` and
    ``line(i)`` are :class:`GraphSet`'s."""

    def __init__(self, index: dict, max_open: int = 16) -> None:
        self.index = index
        self.folder = Path(index["dir"])
        self.cutoff, self.max_neighbors = float(index["cutoff"]), int(index["max_neighbors"])
        self.has_line_graph = bool(index["line_graph"])
        self._starts = np.array([s["start"] for s in index["shards"]], dtype=np.int64)
        self._ptrs: dict[int, dict] = {}  # shard -> its local pointers (after its checksum passed)
        self._fds: OrderedDict = OrderedDict()  # shard -> open descriptor (LRU, at most max_open)
        self.max_open = max_open
        self.shards_read: set[str] = set()

    def __len__(self) -> int:
        return int(self.index["n"])

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_fds"] = OrderedDict()  # descriptors stay in their process
        return state

    def __del__(self):
        for fd in getattr(self, "_fds", {}).values():
            try:
                os.close(fd)
            except OSError:
                pass

    def locate(self, i: int) -> tuple[int, int]:
        """(shard, position in it) of graph ``i``."""
        k = int(np.searchsorted(self._starts, i, side="right") - 1)
        return k, int(i - self._starts[k])

    def _missing(self, path: Path) -> GraphStoreError:
        return GraphStoreError(
            f"graph store shard {path} is missing: features.graph_store: disk needs the feature cache on storage "
            "shared by the driver and every node (or use graph_store: memory)"
        )

    def _open(self, k: int) -> int:
        fd = self._fds.get(k)
        if fd is not None:
            self._fds.move_to_end(k)
            return fd
        shard = self.index["shards"][k]
        path = self.folder / shard["file"]
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            raise self._missing(path) from None
        if k not in self._ptrs:  # first use: the whole file once, for its checksum
            with os.fdopen(os.dup(fd), "rb") as fh:
                data = fh.read()
            if _sha256(data) != shard["sha256"]:
                os.close(fd)
                raise GraphStoreError(
                    f"graph store shard {path} is corrupt (checksum mismatch): the driver rebuilds it when it "
                    "prepares the store again"
                )
            self._ptrs[k] = {
                p: np.frombuffer(data, np.dtype(dt), int(np.prod(shape)), off).copy()
                for p, (off, dt, shape) in shard["layout"].items()
                if p in _PTRS
            }
            self.shards_read.add(shard["file"])
            del data
        self._fds[k] = fd
        if len(self._fds) > self.max_open:
            os.close(self._fds.popitem(last=False)[1])
        return fd

    def _read(self, k: int, j: int, name: str) -> np.ndarray:
        fd = self._open(k)
        off, dt, shape = self.index["shards"][k]["layout"][name]
        ptr, last_axis = _ITEM_ARRAYS[name]
        p = self._ptrs[k][ptr]
        lo, hi = int(p[j]), int(p[j + 1])
        dtype = np.dtype(dt)
        if last_axis:  # (2, total): one range of each row
            total = shape[1]
            rows = [os.pread(fd, (hi - lo) * dtype.itemsize, off + (r * total + lo) * dtype.itemsize) for r in (0, 1)]
            return np.stack([np.frombuffer(r, dtype) for r in rows]) if hi > lo else np.zeros((2, 0), dtype)
        width = int(np.prod(shape[1:])) if len(shape) > 1 else 1
        raw = os.pread(fd, (hi - lo) * width * dtype.itemsize, off + lo * width * dtype.itemsize)
        return np.frombuffer(raw, dtype).reshape((hi - lo, *shape[1:])).copy()

    def data_builder(self, targets=None, *params):
        """``build(i)``: the ``Data`` of graph ``i`` (read from its shard), as
        :meth:`GraphSet.data_builder` builds it from in-memory arrays; ``params`` are its."""

        def build(i: int):
            one = self.graph_set(i)
            return one.data_builder(None if targets is None else np.asarray(targets)[i : i + 1], *params)(0)

        return build

    def graph_set(self, i: int) -> GraphSet:
        """Graph ``i`` alone, as a one-graph :class:`GraphSet`."""
        n = len(self)
        if not 0 <= i < n:
            raise IndexError(f"graph {i} out of range for {n} graphs")
        k, j = self.locate(i)
        arrays = {name: self._read(k, j, name) for name in _ITEM_ARRAYS if self.has_line_graph or "line" not in name}
        gs = GraphSet(
            z=arrays["z"],
            node_ptr=np.array([0, len(arrays["z"])], np.int64),
            edge_index=arrays["edge_index"],
            distance=arrays["distance"],
            edge_vec=arrays["edge_vec"],
            edge_ptr=np.array([0, len(arrays["distance"])], np.int64),
            cutoff=self.cutoff,
            max_neighbors=self.max_neighbors,
        )
        if self.has_line_graph:
            gs.line_index, gs.line_cos = arrays["line_index"], arrays["line_cos"]
            gs.line_ptr = np.array([0, len(arrays["line_cos"])], np.int64)
        return gs


class DiskGraphDataset(LazyGraphDataset):
    """:class:`LazyGraphDataset` over a graph store on disk (:class:`DiskGraphSet`): item ``i`` is
    read from its shard file when it is read and built by the same builder, so it equals the
    in-memory item.  ``shards_read``: the shard files read so far."""

    def __init__(self, store: "DiskGraphSet | dict", *args, **kwargs) -> None:
        """``store``: a :class:`DiskGraphSet` or the index it reads; the other arguments are
        :class:`LazyGraphDataset`'s."""
        super().__init__(store if isinstance(store, DiskGraphSet) else DiskGraphSet(store), *args, **kwargs)

    @property
    def shards_read(self) -> set:
        return self.graphs.shards_read
