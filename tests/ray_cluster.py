"""A real Ray cluster on this machine for the tests: tests/ray_cluster_helper.py (a head and
``workers`` worker raylets, ``cpus`` CPUs each, loopback) in a process group of its own, driven
through its stdin.  Imported by the tests like conftest (tests/ is on sys.path):
``from ray_cluster import RayCluster``; used by tests/search/test_cluster.py and
tests/data/test_sharded_featurize.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

HELPER = Path(__file__).resolve().parent / "ray_cluster_helper.py"


def stop_group(proc: subprocess.Popen, sig=signal.SIGTERM, timeout: float = 60) -> None:
    """Stop a process started with start_new_session=True, and its process group (its own id)."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # anything of the group still there
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)


class RayCluster:
    """tests/ray_cluster_helper.py in its own process (and process group), with the environment
    ``env`` (its ``RAY_TMPDIR``: the cluster's temp dir, where the helper's stderr goes too)."""

    def __init__(self, env: dict, workers: int = 1, cpus: int = 1) -> None:
        self.log = open(Path(env["RAY_TMPDIR"]) / "helper.err", "w")
        self.proc = subprocess.Popen(
            [sys.executable, str(HELPER), "--workers", str(workers), "--cpus", str(cpus)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
            env=env,
            cwd=env["RAY_TMPDIR"],
            start_new_session=True,
        )
        info = self.read(timeout=180)
        self.address, self.head, self.workers = info["address"], info["head"], list(info["workers"])

    @property
    def nodes(self) -> set:
        """The node ids of the head and the workers."""
        return {self.head, *self.workers}

    def read(self, timeout: float) -> dict:
        box: list = []
        reader = threading.Thread(target=lambda: box.append(self.proc.stdout.readline()), daemon=True)
        reader.start()
        reader.join(timeout)
        if not box or not box[0]:
            raise RuntimeError(f"ray cluster helper: no answer in {timeout:.0f} s (exit {self.proc.poll()})")
        return json.loads(box[0])

    def command(self, cmd: str, timeout: float = 120) -> dict:
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()
        return self.read(timeout)

    def shutdown(self) -> None:
        if self.proc.poll() is None:
            try:
                self.command("shutdown", timeout=90)
                self.proc.wait(timeout=30)
            except (OSError, RuntimeError, ValueError, subprocess.TimeoutExpired):
                pass
        stop_group(self.proc, timeout=30)  # whatever of its group is left (its Ray processes)
        self.log.close()
