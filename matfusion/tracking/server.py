"""One MLflow tracking server for a cluster: ``matfusion mlflow-server``.

Runs ``mlflow server`` with a SQL backend (sqlite file, or a PostgreSQL URI) and proxied
artifact storage (``--serve-artifacts``: clients upload and download artifacts through the
server, which keeps them under ``--artifacts-destination``), bound to 127.0.0.1 unless
``--host`` says otherwise.  It waits until the server answers ``/health``, prints the tracking
URI to put in a config (``mlflow.tracking_uri``) or in ``$MLFLOW_TRACKING_URI``, and then runs
until it is stopped (Ctrl-C or SIGTERM stop the server's processes too).

On a Ray cluster, every trial's MLflow run is written by the search driver (a Tune callback),
so the server has to be reachable from the node that runs ``matfusion search`` only: run both
on the head node and keep the server on its loopback (see docs/cluster.md).

``--experiment NAME`` creates that experiment on the server (if it does not exist) with the
server's proxied artifact root, so that the search's artifacts (trial configs, leaderboard,
plots) go through the server too, not to a path on the driver's disk.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Optional

from .ui import experiment_tags, missing_experiment_tags

DEFAULT_BACKEND = "sqlite:///mlruns.db"
DEFAULT_ARTIFACTS = "mlartifacts"
DEFAULT_PORT = 5000


def absolute_backend(uri: str) -> str:
    """A sqlite URI with an absolute path (the server's working directory must not matter);
    other URIs (postgresql://..., mysql://...) unchanged."""
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + str(Path(uri[len("sqlite:///") :]).resolve())
    if "://" not in uri:  # a bare file name: a sqlite file
        return "sqlite:///" + str(Path(uri).resolve())
    return uri


def absolute_destination(dest: str) -> str:
    return dest if "://" in dest else str(Path(dest).resolve())


def connect_host(host: str) -> str:
    """The address clients use for a server bound to ``host`` (a wildcard bind is reached
    through this machine's name)."""
    if host in ("0.0.0.0", "::", ""):
        return socket.getfqdn() or "127.0.0.1"
    return host


def tracking_uri(host: str, port: int) -> str:
    h = connect_host(host)
    if ":" in h and not h.startswith("["):
        h = f"[{h}]"
    return f"http://{h}:{port}"


def server_command(
    backend_store_uri: str = DEFAULT_BACKEND,
    artifacts_destination: str = DEFAULT_ARTIFACTS,
    host: str = "127.0.0.1",
    port: int = DEFAULT_PORT,
    workers: int = 2,
    allowed_hosts: Optional[str] = None,
    extra: Optional[list[str]] = None,
) -> list[str]:
    """The ``mlflow server`` command line (run with this interpreter's mlflow)."""
    cmd = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--backend-store-uri",
        absolute_backend(backend_store_uri),
        "--serve-artifacts",
        "--artifacts-destination",
        absolute_destination(artifacts_destination),
        "--host",
        host,
        "--port",
        str(port),
        "--workers",
        str(workers),
    ]
    if allowed_hosts:
        cmd += ["--allowed-hosts", allowed_hosts]
    return cmd + list(extra or [])


def server_env(base: Optional[dict] = None) -> dict:
    """The server's environment: MLflow 3's job execution off unless the user turned it on.
    Its job runner (GenAI evaluation jobs, which matfusion never submits) starts about ten
    ``huey`` consumer processes of ~240 MB each beside the server."""
    env = dict(os.environ if base is None else base)
    env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    return env


def wait_healthy(uri: str, timeout: float = 120.0, proc: Optional[subprocess.Popen] = None) -> None:
    """Block until ``uri``/health answers OK; raise if the server process ends or time runs out."""
    deadline = time.time() + timeout
    last = ""
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"mlflow server exited with status {proc.returncode} before it was ready")
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=5) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, OSError) as err:
            last = str(err)
        time.sleep(0.5)
    raise TimeoutError(f"mlflow server at {uri} not healthy after {timeout:.0f} s ({last})")


def _api(uri: str, path: str, body: Optional[dict] = None) -> dict:
    """One call of the MLflow REST API (plain HTTP: no client threads in this process)."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(
        f"{uri}/api/2.0/mlflow/{path}", data=data, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read() or b"{}")


def create_experiments(uri: str, names: list[str]) -> dict[str, str]:
    """Create each experiment on the server unless it exists (artifact root: the server's
    proxied one), with the tags of :func:`matfusion.tracking.ui.experiment_tags` (a model-training
    experiment with the "Leaderboard" view of its runs; an existing one gets those it lacks);
    name -> artifact location."""
    out = {}
    for name in names:
        query = urllib.parse.urlencode({"experiment_name": name})
        try:
            exp = _api(uri, f"experiments/get-by-name?{query}")["experiment"]
        except urllib.error.HTTPError as err:
            if err.code != 404:
                raise
            tags = [{"key": k, "value": v} for k, v in experiment_tags().items()]
            _api(uri, "experiments/create", {"name": name, "tags": tags})
            exp = _api(uri, f"experiments/get-by-name?{query}")["experiment"]
        existing = {t.get("key"): t.get("value") for t in exp.get("tags", [])}
        for key, value in missing_experiment_tags(existing).items():
            _api(
                uri,
                "experiments/set-experiment-tag",
                {"experiment_id": exp["experiment_id"], "key": key, "value": value},
            )
        out[name] = exp.get("artifact_location", "")
    return out


def serve(
    backend_store_uri: str = DEFAULT_BACKEND,
    artifacts_destination: str = DEFAULT_ARTIFACTS,
    host: str = "127.0.0.1",
    port: int = DEFAULT_PORT,
    workers: int = 2,
    allowed_hosts: Optional[str] = None,
    experiments: Optional[list[str]] = None,
    startup_timeout: float = 120.0,
) -> int:
    """Run the server in the foreground until it ends or is stopped; its exit status."""
    cmd = server_command(backend_store_uri, artifacts_destination, host, port, workers, allowed_hosts)
    uri = tracking_uri(host, port)
    # its own process group, so that stopping it stops its worker processes too
    proc = subprocess.Popen(cmd, start_new_session=True, env=server_env())

    def forward(signum, frame):  # stop the server's whole process group; proc.wait() below then returns
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass

    saved = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        wait_healthy(uri, startup_timeout, proc)
        if experiments:
            for name, loc in create_experiments(uri, experiments).items():
                print(f"experiment {name!r}: artifacts at {loc}", flush=True)
        print(
            f"MLflow tracking server ready (backend {absolute_backend(backend_store_uri)}, artifacts proxied "
            f"to {absolute_destination(artifacts_destination)})",
            flush=True,
        )
        print(f"tracking URI: {uri}", flush=True)
        print(
            f"  use it with: export MLFLOW_TRACKING_URI={uri}   (or mlflow.tracking_uri: {uri} in the config)",
            flush=True,
        )
        if host in ("127.0.0.1", "localhost", "::1"):
            print(
                f"  bound to loopback only; from another machine: ssh -L {port}:127.0.0.1:{port} <this host>",
                flush=True,
            )
        return proc.wait()
    except KeyboardInterrupt:
        return 130
    finally:
        if proc.poll() is None:
            forward(None, None)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        try:  # helpers the server left behind in its group (mlflow's job consumers)
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        for sig, handler in saved.items():  # the caller's handlers back
            signal.signal(sig, handler)
