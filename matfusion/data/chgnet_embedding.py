"""The ``chgnet`` descriptor set: the 64-dim crystal feature of the pretrained CHGNet potential.

CHGNet (``chgnet`` package, an optional dependency: ``pip install "matfusion[chgnet]"``) ships
its pretrained weights inside its wheel, so loading the model reads a file of the installed
package and never the network.  The vector is the model's graph-level feature: the mean over
the atoms of the atom features after the last convolution and the read-out norm
(``crystal_fea`` of ``CHGNet.forward(..., return_crystal_feas=True)``), 64 floats that do not
depend on the order of the atoms.

:func:`embed` works in batches: each structure is turned into a CHGNet graph on its own (a
structure the converter refuses, e.g. one with an isolated atom, is a failure of that structure
only), the graphs of a batch go through the model together, and a batch the model fails on is
run again one structure at a time, so a bad structure leaves only its own row NaN.  The model
runs in eval mode without gradients (no dropout, no randomness: the same structures give the
same vectors), on the CPU; the batches are spread over forked workers (one torch thread each, at
most :func:`~matfusion.data.parallel.usable_cores` of them), and the calling process's torch
thread count is restored after.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
from functools import lru_cache
from typing import Sequence

import numpy as np

from .dataset import DataError
from .parallel import parallel_map, usable_cores

CHGNET_MODEL = "0.3.0"  # the pretrained weights in the chgnet wheel
CHGNET_WIDTH = 64
CHGNET_COLUMNS = tuple(f"crystal_fea_{i}" for i in range(CHGNET_WIDTH))
BATCH_SIZE = 32
INSTALL_HINT = 'pip install "matfusion[chgnet]"'


class ChgnetUnavailable(DataError):
    """The ``chgnet`` descriptor set was asked for and the ``chgnet`` package is not installed."""


def available() -> bool:
    return importlib.util.find_spec("chgnet") is not None


def require() -> None:
    """Raise :class:`ChgnetUnavailable` (one line, with the install command) without chgnet."""
    if not available():
        raise ChgnetUnavailable(
            f"features.descriptors: the chgnet set needs the optional chgnet package, which is not installed; "
            f"install it with: {INSTALL_HINT}"
        )


def package_version() -> str:
    """The installed chgnet version (part of the set's cache key), or ``"missing"``."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("chgnet")
    except PackageNotFoundError:
        return "missing"


@contextlib.contextmanager
def _one_torch_thread():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@lru_cache(maxsize=1)
def model():
    """The pretrained CHGNet, loaded once per process from the wheel's checkpoint, on the CPU."""
    require()
    from chgnet.model import CHGNet

    # one torch thread here too: two threads made the load 10x slower on the busy 2-core machine
    with _one_torch_thread(), contextlib.redirect_stdout(io.StringIO()):  # CHGNet prints its parameter count
        net = CHGNet.load(model_name=CHGNET_MODEL, use_device="cpu", verbose=False)
    return net.eval()


def _reason(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:200]}" if text else type(err).__name__


def _forward(net, graphs: list) -> np.ndarray:
    import torch

    with torch.no_grad():
        out = net(graphs, task="e", return_crystal_feas=True)["crystal_fea"]
    feas = out.detach().cpu().numpy().astype(np.float64).reshape(len(graphs), CHGNET_WIDTH)
    # rounded like the structural sets: float32 noise of the batch layout must not decide a split
    return np.round(np.where(np.isfinite(feas), feas, np.nan), 6)


class _Batch:
    """Embeds the structures ``structures[start:stop]`` (what the workers of ``parallel_map`` call):
    ``(rows (stop - start, 64), failures as (position, reason))``."""

    def __init__(self, structures: Sequence) -> None:
        self.structures = structures

    def __call__(self, bounds: tuple[int, int]) -> tuple[np.ndarray, list]:
        start, stop = bounds
        net = model()
        rows = np.full((stop - start, CHGNET_WIDTH), np.nan)
        failures, idx, graphs = [], [], []
        with _one_torch_thread():
            for i in range(start, stop):
                try:
                    graphs.append(net.graph_converter(self.structures[i]))
                    idx.append(i - start)
                except Exception as err:  # noqa: BLE001 - one structure the converter refuses
                    failures.append((i, _reason(err)))
            if graphs:
                try:
                    rows[idx] = _forward(net, graphs)
                except Exception:  # noqa: BLE001 - find the structure(s) of the batch that fail
                    for j, g in zip(idx, graphs):
                        try:
                            rows[j] = _forward(net, [g])[0]
                        except Exception as err:  # noqa: BLE001
                            failures.append((start + j, _reason(err)))
        return rows, failures


def embed(
    structures: Sequence, n_jobs: int = 1, progress: bool = False, batch_size: int = BATCH_SIZE
) -> tuple[np.ndarray, list[tuple[int, str]]]:
    """``(matrix, failures)``: the (n, 64) CHGNet crystal features of ``structures`` (NaN rows for
    the structures it cannot embed) and one ``(position, reason)`` per such structure, sorted.

    Batches of ``batch_size`` structures are spread over ``n_jobs`` forked workers (at most
    :func:`~matfusion.data.parallel.usable_cores`; in this process when it cannot fork), each
    running torch on ONE thread: on the shared 2-core machine two torch threads per forward
    were 6-12x slower than one (docs/notes-data.md), and parallel batches use the cores instead."""
    n = len(structures)
    out = np.full((n, CHGNET_WIDTH), np.nan)
    failures: list[tuple[int, str]] = []
    if not n:
        return out, failures
    model()  # loaded once here: forked workers inherit it
    bounds = [(i, min(n, i + batch_size)) for i in range(0, n, batch_size)]
    values, crashed = parallel_map(
        _Batch(structures),
        bounds,
        n_jobs=max(1, min(int(n_jobs), usable_cores())),
        chunk=1,
        progress=progress,
        desc=f"descriptors (chgnet, batches of {batch_size})",
        unit="batch",
    )
    for (start, stop), value in zip(bounds, values):
        if value is not None:
            out[start:stop] = value[0]
            failures.extend(value[1])
    for f in crashed:  # _Batch itself does not raise; if it did, its structures stay NaN
        start, stop = bounds[f.index]
        failures.extend((i, f"{f.error}: {f.message}") for i in range(start, stop))
    failures.sort()
    return out, failures


def chgnet_vector(structure) -> np.ndarray:
    """The 64 CHGNet crystal features of one structure (raises where it cannot be embedded)."""
    matrix, failures = embed([structure])
    if failures:
        raise ValueError(failures[0][1])
    return matrix[0]
