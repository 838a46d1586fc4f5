"""Graphs read lazily: a dataset whose item ``i`` is built from the packed arrays when it is read.

A trial gets the packed arrays of its rows (:class:`~matfusion.data.crystal_graph.GraphSet`,
zero-copy through Ray's object store).  Turning every graph into a PyG ``Data`` up front
(:meth:`GraphSet.to_data_list`) holds O(N) Python objects and tensor copies per trial; a
:class:`LazyGraphDataset` holds the arrays only, and a ``DataLoader`` over it builds the graphs of
one batch at a time (the same ``Data``, item for item, as the eager list: same builder).

Measured growth with the dataset size: ``benchmarks/scale.py``, docs/scale.md.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from .crystal_graph import GraphSet


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
            raise ValueError(f"LazyGraphDataset: {len(targets)} targets for {n} graphs")
        if descriptors is not None and len(descriptors) != n:
            raise ValueError(f"LazyGraphDataset: {len(descriptors)} descriptor rows for {n} graphs")
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
