"""`matfusion mlflow-server`: the server it starts runs without MLflow 3's job runner."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from matfusion.tracking.server import server_env, tracking_uri, wait_healthy

JOBS = "MLFLOW_SERVER_ENABLE_JOB_EXECUTION"


def test_server_env_turns_job_execution_off_unless_the_user_set_it():
    assert server_env({})[JOBS] == "false"
    assert server_env({JOBS: "true", "X": "1"}) == {JOBS: "true", "X": "1"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _descendants(pid: int) -> list[str]:
    """The command lines of ``pid``'s descendants (children, their children, ...)."""
    out = subprocess.run(["ps", "-eo", "pid=,ppid=,args="], capture_output=True, text=True, check=True).stdout
    rows = [line.split(None, 2) for line in out.splitlines() if len(line.split(None, 2)) == 3]
    found, todo = [], [str(pid)]
    while todo:
        parent = todo.pop()
        for child, ppid, args in rows:
            if ppid == parent:
                found.append(args)
                todo.append(child)
    return found


def _start_and_list(cmd: list[str], env: dict, uri: str) -> list[str]:
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_healthy(uri, 120, proc)
        time.sleep(3)  # the job runner starts its consumers after the server answers
        return _descendants(proc.pid)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


@pytest.mark.slow
def test_matfusion_server_starts_no_job_consumers(tmp_path):
    """Plain `mlflow server` (3.17) starts a job runner and ~10 huey consumers beside itself."""
    env = {k: v for k, v in os.environ.items() if k != JOBS}  # as a user's shell has it
    port = _free_port()
    ours = _start_and_list(
        [sys.executable, "-m", "matfusion.cli", "mlflow-server", "--port", str(port), "--workers", "1"]
        + ["--backend-store-uri", f"sqlite:///{tmp_path / 'b.db'}", "--artifacts-destination", str(tmp_path / "b")],
        env,
        tracking_uri("127.0.0.1", port),
    )
    assert any(" mlflow server " in f" {p} " for p in ours), ours  # the server, a grandchild of the CLI
    assert not any("huey" in p or "_job_runner" in p for p in ours), ours
