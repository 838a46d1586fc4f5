"""One parallel map for the featurizers (crystal graphs and descriptor sets).

``parallel_map(fn, items, n_jobs=..., progress=...)`` applies ``fn`` to every item and returns
``(values, failures)``: ``values[i]`` is ``fn(items[i])`` (``None`` where it raised) and
``failures`` lists a :class:`Failure` (position, exception type, message) per item that raised,
in item order.  The caller decides what a failure means (the descriptor sets turn it into NaN,
the graph builder into an error naming the rows).

Workers are forked where the platform can fork: ``fn`` and ``items`` are handed to each worker
once, as the arguments of its start-up function (inherited through the fork, never pickled),
and the workers receive only ``(start, stop)`` bounds of contiguous chunks.  Results come back
chunk by chunk, in any order, and are put in place; a tqdm bar counts the items.  Without fork
(or for small inputs, or ``n_jobs=1``) the same chunks run in this process.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

# the largest chunk handed to one worker at a time (items)
MAX_CHUNK = 64


@dataclass(frozen=True)
class Failure:
    """An item ``fn`` raised on: its position in ``items``, the exception's type and message."""

    index: int
    error: str
    message: str

    def __str__(self) -> str:
        return (
            f"item {self.index}: {self.error}: {self.message}" if self.message else f"item {self.index}: {self.error}"
        )


def usable_cores() -> int:
    """The cores this process may run on: its CPU affinity, capped by a cgroup v2 CPU quota
    (``cpu.max``, what docker ``--cpus`` and Kubernetes limits set).  ``os.cpu_count()`` counts
    the host's cores, and on a container limited to 2 of 64 it would start 64 workers."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, int(float(quota) / float(period))))
    except (OSError, ValueError):
        pass
    return max(1, cores)


def default_n_jobs(n_jobs: int = 0) -> int:
    """``n_jobs``, or every usable core (:func:`usable_cores`) for 0."""
    return n_jobs or usable_cores()


def chunk_size(n: int, n_jobs: int) -> int:
    """About four chunks per worker, at most :data:`MAX_CHUNK` items each, at least one."""
    return max(1, min(MAX_CHUNK, n // (4 * max(1, n_jobs)) or 1))


def can_fork() -> bool:
    """Whether the workers may be forked: the platform forks, and this process runs no Ray
    (a fork of a process whose Ray threads hold locks can hang in the child: seen as a worker
    stuck in futex_wait; the items then run in this process)."""
    ray = sys.modules.get("ray")
    if ray is not None and getattr(ray, "is_initialized", lambda: False)():
        return False
    return "fork" in mp.get_all_start_methods()


# The task of this worker process: (fn, items), set once by the pool's start-up function in a
# forked child (the parent never sets it: the serial path calls _run_chunk with the task).
_TASK: tuple | None = None


def _install(fn: Callable, items: Sequence) -> None:
    """A worker's start-up: its task, and SIGTERM back to the default action.  The pool ends its
    workers with SIGTERM; a handler inherited from the parent (Ray's driver handler, a command's,
    a test's) that returns instead of ending the process leaves a worker waiting for tasks
    forever and the pool's exit joining it forever (seen in a CI run)."""
    global _TASK
    _TASK = (fn, items)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    # forked with SIGTERM blocked (see _forking_pool): one sent before the line above is
    # delivered now, to the default action
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})


def _forking_pool(n_jobs: int, fn: Callable, items: Sequence):
    """A fork pool whose workers are forked with SIGTERM blocked: the pool may end a worker
    with SIGTERM before the worker's start-up has put the default action back (a worker just
    forked when a short map ends; seen in a CI run), and a handler inherited from the parent
    that returns would then swallow it.  Blocked, it waits until :func:`_install` unblocks it.
    The pool's own threads, started here, keep the blocked mask for the workers they fork."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    try:
        return mp.get_context("fork").Pool(n_jobs, initializer=_install, initargs=(fn, items))
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _run_chunk(bounds: tuple[int, int], task: tuple | None = None) -> tuple[int, list, list]:
    fn, items = task if task is not None else _TASK
    start, stop = bounds
    values, failures = [], []
    for i in range(start, stop):
        try:
            values.append(fn(items[i]))
        except Exception as err:  # noqa: BLE001 - reported to the caller per item
            values.append(None)
            text = str(err).strip().splitlines()
            failures.append(Failure(i, type(err).__name__, text[0] if text else ""))
    return start, values, failures


def parallel_map(
    fn: Callable[[Any], Any],
    items: Sequence,
    n_jobs: int = 1,
    chunk: int | None = None,
    progress: bool = False,
    desc: str = "",
    unit: str = "struct",
) -> tuple[list, list[Failure]]:
    """``([fn(item) for item in items], failures)`` over ``n_jobs`` forked workers (see the
    module docstring); ``chunk`` items per task (default :func:`chunk_size`), a tqdm bar
    labelled ``desc`` when ``progress``.  Runs serially for ``n_jobs <= 1``, without fork, or
    when there are no more than two chunks."""
    n = len(items)
    n_jobs = max(1, int(n_jobs))
    chunk = chunk or chunk_size(n, n_jobs)
    bounds = [(i, min(n, i + chunk)) for i in range(0, n, chunk)]
    values: list = [None] * n
    failures: list[Failure] = []
    bar = tqdm(total=n, desc=desc or None, unit=unit, disable=not progress)

    def store(start: int, vals: list, fails: list) -> None:
        values[start : start + len(vals)] = vals
        failures.extend(fails)
        bar.update(len(vals))

    try:
        if n_jobs > 1 and n > 2 * chunk and can_fork():
            with _forking_pool(n_jobs, fn, items) as pool:
                for result in pool.imap_unordered(_run_chunk, bounds):
                    store(*result)
                # done: the workers end on the close sentinel (the with's exit would terminate them)
                pool.close()
                pool.join()
        else:
            for b in bounds:
                store(*_run_chunk(b, (fn, items)))
    finally:
        bar.close()
    failures.sort(key=lambda f: f.index)
    return values, failures
