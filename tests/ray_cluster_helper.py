"""A real multi-node Ray cluster on this machine, for tests/search/test_cluster.py and docs/cluster_timing.py.

One raylet per node (``ray.cluster_utils.Cluster``: a head node plus worker nodes, each with its
own object store, node id and CPUs), everything on 127.0.0.1.  It runs in its own process so
that its Ray settings (token authentication, temp dir) never leak into the test process, and
is driven through stdin, one command a line:

    kill-worker     kill the first worker node's processes at once (no graceful stop): a node failure
    add-worker      add one more worker node
    shutdown        stop every node (also on end of input) and exit

It prints one JSON line per event on stdout: first ``{"address": ..., "head": NODE_ID,
"workers": [NODE_ID, ...]}``, then ``{"killed": NODE_ID}`` / ``{"added": NODE_ID}`` /
``{"down": true}``.  Usage: ``python tests/ray_cluster_helper.py --workers 1 --cpus 1``; the
environment says where Ray keeps its files (``RAY_TMPDIR``) and whether token authentication
is on (``RAY_AUTH_MODE=token`` with ``RAY_AUTH_TOKEN_PATH``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def emit(event: dict) -> None:
    print(json.dumps(event), flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=1, help="worker nodes besides the head")
    parser.add_argument("--cpus", type=int, default=1, help="CPUs of each node")
    args = parser.parse_args(argv)

    from ray.cluster_utils import Cluster

    # quick failure detection: a dead node is declared dead after ~3 s instead of ~30 s
    system_config = {
        "health_check_period_ms": 1000,
        "health_check_failure_threshold": 3,
        "health_check_initial_delay_ms": 1000,
    }
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": args.cpus,
            "include_dashboard": False,
            "resources": {"matfusion_head": 1},
            "_system_config": system_config,
        },
    )
    workers = [cluster.add_node(num_cpus=args.cpus, resources={"matfusion_worker": 1}) for _ in range(args.workers)]
    cluster.wait_for_nodes()
    emit(
        {
            "address": cluster.address,
            "head": cluster.head_node.node_id,
            "workers": [w.node_id for w in workers],
            "pid": os.getpid(),
        }
    )
    try:
        for line in sys.stdin:
            cmd = line.strip()
            if cmd == "kill-worker" and workers:
                node = workers.pop(0)
                cluster.remove_node(node, allow_graceful=False)
                emit({"killed": node.node_id})
            elif cmd == "add-worker":
                node = cluster.add_node(num_cpus=args.cpus, resources={"matfusion_worker": 1})
                workers.append(node)
                emit({"added": node.node_id})
            elif cmd == "shutdown":
                break
            elif cmd:
                emit({"error": f"unknown command {cmd!r}"})
    finally:
        cluster.shutdown()
        emit({"down": True})
    return 0


if __name__ == "__main__":
    sys.exit(main())
