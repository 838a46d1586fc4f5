"""The MLflow tracking server going away in the middle of a search (a real `mlflow server` on a
free port with a sqlite backend in tmp_path, killed with SIGKILL while the search's trials run).

- It comes back (restarted on the same port and backend store): the trial logger's writes that
  failed meanwhile waited in memory and are sent, in order; every trial's run, each of its epochs'
  metrics (the values Tune recorded) and its end are in MLflow; the search exits 0.
- It does not come back: the search ends with exit 0 and its leaderboard from Tune's results, and
  one warning line says what MLflow never got (counts) and where Tune's results are.
- The Outbox alone, against a port nothing listens on (connection refused): writes wait in order,
  a refusal by the server raises, a full queue drops metric writes and counts them.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import signal
import socket
import sqlite3
import subprocess
import threading
import time
from pathlib import Path

import pytest
from conftest import DATA_DIR, REPO
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from matfusion.cli import main
from matfusion.tracking import outbox as outbox_settings
from matfusion.tracking.logger import trial_metric_names
from matfusion.tracking.outbox import Outbox, Write, quick_requests, unreachable
from matfusion.tracking.server import server_command, server_env, tracking_uri, wait_healthy

NAME = "phonons-smoke"  # configs/smoke.yaml
SETTINGS = {
    "data.limit": 60,
    "search.num_samples": 3,
    "search.families": "[rf, lgbm, et]",
    "search.min_trials_per_group": 1,  # t01 rf, t02 lgbm, t03 et
    "search.scheduler": "fifo",
    "search.max_epochs": 2,
    "search.grace_period": 1,
    "search.max_concurrent": 1,  # one after the other: most writes come after the first result
    "search.points_to_evaluate": "false",
    "search.space": "{rf.n_estimators: 30, et.n_estimators: 30, lgbm.n_estimators: 30}",
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A real `mlflow server` (one worker), stopped with SIGKILL and started again on the same
    port and backend store."""

    def __init__(self, tmp: Path) -> None:
        self.port = _free_port()
        self.uri = tracking_uri("127.0.0.1", self.port)
        self.db = tmp / "server.db"
        self.cmd = server_command(f"sqlite:///{self.db}", str(tmp / "artifacts"), port=self.port, workers=1)
        self.proc = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            self.cmd, env=server_env(), start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )

    def wait(self) -> None:
        wait_healthy(self.uri, 120, self.proc)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = Server(tmp_path_factory.mktemp("mlflow-server"))
    srv.start()
    srv.wait()
    yield srv
    srv.kill()


def _search(tmp: Path, uri: str, **extra):
    argv = ["search", str(REPO / "configs" / "smoke.yaml"), "--data-dir", str(DATA_DIR), "--quiet"]
    settings = {**SETTINGS, "mlflow.tracking_uri": uri, "search.storage_path": str(tmp / "ray"), **extra}
    for key, value in settings.items():
        argv += ["--set", f"{key}={value}"]
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    return rc, out.getvalue(), err.getvalue()


def _on_first_result(tmp: Path, then) -> threading.Thread:
    """A thread that calls ``then()`` once the first trial result of the search is on disk."""

    def watch():
        deadline = time.time() + 120
        while time.time() < deadline:
            if any(p.stat().st_size for p in (tmp / "ray" / NAME).glob("*/result.json")):
                then()
                return
            time.sleep(0.05)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def _tune_rows(tmp: Path) -> dict:
    """trial_id -> the results Tune recorded (each trial's result.json)."""
    out = {}
    for path in (tmp / "ray" / NAME).glob("*/result.json"):
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        out[rows[0]["trial_id"]] = rows
    return out


def _tune_epochs(tmp: Path) -> dict:
    """trial_id -> [(epoch, val_mae)] as Tune recorded them."""
    return {t: [(r["epoch"], r["val_mae"]) for r in rows] for t, rows in _tune_rows(tmp).items()}


def _stored(db: Path, experiment_path: str) -> tuple[int, int, int]:
    """(trial runs, of them ended, metric values) the server's sqlite store holds for the search
    whose parent run is tagged with ``experiment_path`` (read with sqlite3: the server is gone)."""
    with contextlib.closing(sqlite3.connect(db)) as con:
        (parent,) = con.execute(
            "select run_uuid from tags where key = 'ray_experiment_path' and value = ?", (experiment_path,)
        ).fetchone()
        trials = [
            r[0]
            for r in con.execute("select run_uuid from tags where key = 'mlflow.parentRunId' and value = ?", (parent,))
        ]
        marks = ",".join("?" * len(trials))
        ended = con.execute(f"select count(*) from runs where run_uuid in ({marks}) and end_time is not null", trials)
        logged = con.execute(f"select count(*) from metrics where run_uuid in ({marks})", trials)
        return len(trials), ended.fetchone()[0], logged.fetchone()[0]


@pytest.mark.slow
def test_a_server_killed_mid_search_and_restarted_loses_nothing(server, tmp_path, monkeypatch):
    monkeypatch.setattr(outbox_settings, "END_GRACE_S", 90.0)  # the restart took 23-27 s on 2 busy cores
    events = {}

    def outage():
        server.kill()
        events["killed"] = time.time()
        time.sleep(2)
        server.start()  # the same port and backend store

    watcher = _on_first_result(tmp_path, outage)
    rc, out, err = _search(tmp_path, server.uri)
    watcher.join(timeout=120)
    assert rc == 0, out[-3000:] + err[-3000:]
    assert "killed" in events
    assert re.search(
        # at a line's start, or after the \r with which a progress bar (tqdm, leave=False) clears its line
        rf"(?:^|\r)matfusion: warning: the MLflow tracking server {server.uri} does not answer \((connection refused|the "
        r"connection was dropped)\); the search goes on, its MLflow writes wait in memory",
        err,
        re.M,
    ), err[-3000:]
    assert re.search(r"answers again after \d+ s; the \d+ writes that waited are sent", err), err[-3000:]
    assert "not logged" not in err and "Traceback" not in out + err, err[-3000:]
    assert "trials: 3 (3 succeeded, 0 failed)" in out
    print("\n".join(line for line in err.splitlines() if "MLflow tracking server" in line))  # pytest -rP

    server.wait()
    client = MlflowClient(server.uri)
    exp = client.get_experiment_by_name(NAME)
    runs = client.search_runs([exp.experiment_id], max_results=100)
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert (parent.info.status, parent.data.tags["status"], parent.data.metrics["n_trials"]) == (
        "FINISHED",
        "completed",
        3,
    )
    trials = {r.data.tags["trial_id"]: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    tune = _tune_epochs(tmp_path)
    assert sorted(trials) == sorted(tune) and len(tune) == 3
    for trial_id, epochs in tune.items():
        run = trials[trial_id]
        assert (run.info.status, run.data.tags["status"]) == ("FINISHED", "completed"), trial_id
        history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "val_mae"))
        assert history == sorted(epochs), trial_id  # every epoch, once, with Tune's value
        assert run.data.metrics["epochs_trained"] == epochs[-1][0]
        assert run.data.params["family"] == run.data.tags["family"]
        assert "trial_config.json" in [a.path for a in client.list_artifacts(run.info.run_id)]


@pytest.mark.slow
def test_a_server_that_does_not_come_back_is_one_warning_and_the_search_ends(server, tmp_path, monkeypatch):
    monkeypatch.setattr(outbox_settings, "END_GRACE_S", 1.0)
    server.wait()
    watcher = _on_first_result(tmp_path, server.kill)
    rc, out, err = _search(tmp_path, server.uri, **{"ensemble.enabled": "true"})
    watcher.join(timeout=120)
    assert rc == 0, out[-3000:] + err[-3000:]
    # the stack after the search reads the trials from the server: not tried, and said so
    assert (
        "ensemble is not built (ensemble.enabled): the tracking server did not answer, and the trial results it "
        "did not get are not kept; to stack this search, run it again once the server answers "
        f"(`matfusion ensemble --experiment {NAME}` would stack the experiment's latest completed search, not this one)"
        in err
    ), err[-3000:]
    lost = [line for line in err.splitlines() if "did not answer until the search ended" in line]
    assert len(lost) == 1, err[-3000:]
    print(lost[0])  # shown by pytest -rP
    found = re.search(
        r"not logged: (.*) of (\d) trial run\(s\) \(([^)]*)\); Ray Tune's results of every trial are in (\S+);", lost[0]
    )
    assert found, lost[0]
    counts = dict((kind, int(n)) for n, kind in re.findall(r"(\d+) ([a-z ]+?)(?:,|$)", found.group(1)))
    assert counts.get("run ends", 0) >= 1 and counts.get("metrics", 0) >= 1, lost[0]
    assert Path(found.group(4)) == tmp_path / "ray" / NAME
    # what the store got plus what the line names covers all Tune recorded (a write in flight when
    # the server died may have reached it too): nothing is missing without being named
    runs, ended, logged = _stored(server.db, str((tmp_path / "ray" / NAME).resolve()))
    expected = sum(
        sum(len(trial_metric_names(r)) for r in rows) + 2  # + final_best_val_mae, epochs_trained
        for rows in _tune_rows(tmp_path).values()
    )
    assert runs + counts.get("runs", 0) >= 3 and ended + counts["run ends"] >= 3, (lost[0], runs, ended)
    assert logged + counts["metrics"] >= expected and logged < expected, (lost[0], logged, expected)
    assert "Traceback" not in out + err, err[-3000:]
    # the leaderboard and the summary from Tune's results
    assert "trials: 3 (3 succeeded, 0 failed)" in out and "best trial: family=" in out
    board = out.split("Leaderboard of search", 1)[1]
    assert len(re.findall(r"^\s*\w{8}(?:_\d{5})?\s+(rf|lgbm|et)\s", board, re.M)) == 3, board


# -- the Outbox alone: a port nothing listens on ---------------------------------------------------


def test_writes_wait_in_order_a_refusal_raises_and_a_full_queue_drops_metrics():
    closed = tracking_uri("127.0.0.1", _free_port())
    dead = MlflowClient(closed)
    sent = []

    def to_dead_server(i):
        def send():
            dead.log_batch("0" * 32, metrics=[Metric("m", float(i), 0, i)])
            sent.append(i)

        return send

    box = Outbox(closed, retry_every_s=0.0, max_writes=3, stream=io.StringIO())
    t0 = time.monotonic()
    for i in range(3):
        box.put(Write("t01 rf", {"metrics": 1}, to_dead_server(i)))
    box.put(Write("t01 rf", {"metrics": 2}, to_dead_server(3)))  # the queue is full: dropped, counted
    box.put(Write("t01 rf", {"run ends": 1}, lambda: None))  # not a metric write: it waits anyway
    assert time.monotonic() - t0 < 10  # no retry storm: one refused request a write
    assert sent == [] and len(box.pending) == 4 and box.outages == 1
    assert box.unsent() == {"metrics": 5, "run ends": 1}
    assert "does not answer (connection refused)" in box._stream.getvalue()
    line = box.unsent_line("/x/ray")
    assert "not logged: 5 metrics, 1 run ends of 1 trial run(s) (t01 rf) (2 metric values dropped" in line, line
    assert line.endswith("Ray Tune's results of every trial are in /x/ray")
    assert not box.drain(0.0)

    # the server answers again (here: the writes are plain calls): all sent, in order, the dropped still counted
    order = []
    box.pending.clear()
    for i in range(3):
        box.pending.append(Write("t01 rf", {"metrics": 1}, lambda i=i: order.append(i)))
    assert box.drain(0.0) and order == [0, 1, 2] and box.unsent() == {"metrics": 2}
    back = [line for line in box._stream.getvalue().splitlines() if "answers again after" in line]
    # the values dropped while it was away are said when it is back (no end line names them then)
    assert len(back) == 1 and back[0].endswith("; 2 metric values were dropped while it was away (the queue was full)")
    assert "the 3 writes that waited are sent" in back[0]
    # a second outage: its line counts its own writes, not the first one's too
    box.put(Write("t01 rf", {"metrics": 1}, to_dead_server(9)))
    assert box.outages == 2 and len(box.pending) == 1
    box.pending[0] = Write("t01 rf", {"metrics": 1}, lambda: order.append(9))
    assert box.drain(0.0) and order == [0, 1, 2, 9]
    back = [line for line in box._stream.getvalue().splitlines() if "answers again after" in line]
    assert len(back) == 2 and back[1].endswith("s; the 1 writes that waited are sent"), back

    def refused():  # an error that is no unreachable server (e.g. the server refusing a bad name): raised
        raise ValueError("Invalid metric name: 'bad name?*'")

    with pytest.raises(ValueError):
        box.put(Write("t01 rf", {"metrics": 1}, refused))
    assert not box.pending


def test_unreachable_tells_a_server_that_does_not_answer_from_one_that_refuses():
    dead = MlflowClient(tracking_uri("127.0.0.1", _free_port()))
    with pytest.raises(Exception) as info, quick_requests():  # MLflow's own retries: 4 minutes here
        dead.search_experiments(max_results=1)
    assert unreachable(info.value)
    from mlflow.exceptions import MlflowException

    assert not unreachable(MlflowException("Invalid metric name: 'a?'", error_code="INVALID_PARAMETER_VALUE"))
    assert unreachable(TimeoutError("timed out")) and not unreachable(ValueError("x"))


def test_a_run_found_without_its_params_and_config_gets_them(tmp_path):
    """The run of a trial whose create reached the server but whose answer was lost (or whose params
    never left a driver that ended during an outage): found by its trial_id tag, taken over, and its
    params and trial_config.json sent then (the ensembles read them)."""
    from types import SimpleNamespace

    from matfusion.tracking.logger import MlflowTrialLogger, ensure_experiment

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlruns.db'}")
    experiment_id = ensure_experiment(client, "lost-answer", str(tmp_path / "artifacts"))
    parent = client.create_run(experiment_id, run_name="search").info.run_id
    tags = {"mlflow.parentRunId": parent, "trial_id": "abc00001", "family": "rf", "status": "running"}
    orphan = client.create_run(experiment_id, run_name="t01 rf", tags=tags).info.run_id
    config = {"family": "rf", "rf": {"n_estimators": 30}, "seed": 0}
    logger = MlflowTrialLogger(client.tracking_uri, experiment_id, parent)
    logger.on_trial_start(0, [], SimpleNamespace(trial_id="abc00001", config=config, experiment_tag="1"))
    assert logger.run_ids["abc00001"] == orphan and not logger.outbox.pending
    run = client.get_run(orphan)
    assert run.data.params.get("rf.n_estimators") == "30" and run.data.tags["resumed"] == "1"
    assert "trial_config.json" in [a.path for a in client.list_artifacts(orphan)]
