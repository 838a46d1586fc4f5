"""Featurization shards as Ray tasks over the cluster (``features.backend: ray``).

:func:`run_shards` submits one Ray task per shard (``num_cpus=1``, spread over the nodes) to the
cluster this process is connected to; when it is not connected yet, it joins ``address`` (else
``$RAY_ADDRESS``, else it starts a local Ray) and disconnects when the shards are done.  Each task
runs the featurizer's per-shard function (given by the caller: this module never imports the
featurizer) and returns its result with the id of the node it ran on; the driver gets the
results as they finish, one tqdm bar over all shards, and hands each to ``arrived`` (which writes
the shard's file, so an interruption keeps the finished shards).  Only
:mod:`matfusion.data.featurize` imports this module, and only for the ``ray`` backend: nothing
imports Ray at module import time.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any, Optional

from tqdm.auto import tqdm


def _shard_task(compute: Callable, work: Any, structures: Sequence, start: int, index: int):
    """One shard on a Ray worker: ``compute(work, structures, start, index)``, with this node's id."""
    import ray

    result = compute(work, structures, start, index)
    result.node = ray.get_runtime_context().get_node_id()
    return result


def _connect(address: Optional[str], num_cpus: Optional[int]) -> bool:
    """Connect this process to Ray unless it is already; whether it connected here."""
    import ray

    if ray.is_initialized():
        return False
    options = {"include_dashboard": False, "log_to_driver": False}
    if address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=address, **options)
    else:
        ray.init(num_cpus=num_cpus, **options)
    return True


def run_shards(
    compute: Callable,
    work: Any,
    structures: Sequence,
    shards: Sequence,
    arrived: Callable,
    address: Optional[str] = None,
    num_cpus: Optional[int] = None,
    progress: bool = False,
    desc: str = "",
) -> None:
    """Run ``compute`` on each of ``shards`` (``.index``, ``.start``, ``.stop`` into ``structures``)
    as a Ray task; ``arrived(shard, result)`` in this process as each one finishes (any order).
    An error (of a task, or raised by ``arrived``) or an interrupt cancels the shards not done yet
    and propagates.  ``num_cpus``: of a local Ray started here (default: every core)."""
    import ray

    if num_cpus is None:
        from .parallel import usable_cores

        num_cpus = usable_cores()
    started = _connect(address, num_cpus)
    bar = tqdm(total=len(shards), desc=desc or None, unit="shard", disable=not progress)
    pending: dict = {}
    try:
        task = ray.remote(num_cpus=1, scheduling_strategy="SPREAD")(_shard_task)
        pending = {task.remote(compute, work, list(structures[s.start : s.stop]), s.start, s.index): s for s in shards}
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                shard = pending.pop(ref)
                arrived(shard, ray.get(ref))
                bar.update(1)
    finally:
        bar.close()
        for ref in pending:
            ray.cancel(ref)
        if started:
            ray.shutdown()
