"""Interrupts: a real `matfusion search` subprocess (its own local Ray, sqlite MLflow, real data)
gets SIGINT (to its process group, as Ctrl-C in a terminal sends it) or SIGTERM (to the driver
alone, as `kill PID`, systemd or docker send it) while its trials run.  It must stop with exit
130 / 143, leave the parent run KILLED and tagged `interrupted`, record no trial as completed
that did not finish, print no test MAE, and `--resume` must finish the work."""

import os
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from test_resume import NAME, kill_leftovers, run_processes, search_cmd, snapshot

from matfusion.search.interrupts import SearchInterrupted, SearchSignals, exit_status
from matfusion.tracking.leaderboard import search_leaderboard

NUM_SAMPLES = 3
SETTINGS = [
    "--set",
    f"search.num_samples={NUM_SAMPLES}",
    "--set",
    "search.max_epochs=12",
    "--set",
    "search.grace_period=12",  # nothing pruned: every trial must run to its end
    "--set",
    "search.families=[cgcnn]",
]


def _env(ray_tmp: str) -> dict:
    return dict(os.environ, RAY_TMPDIR=ray_tmp)


def _interrupt(tmp_path: Path, data_dir, signum: int, to_group: bool):
    """Start the search, wait until a trial has reported an epoch, send ``signum``; returns
    (exit status, output, Tune's snapshot when the signal was sent)."""
    exp_dir = tmp_path / "ray" / NAME
    ray_tmp = tempfile.mkdtemp(prefix="mfray-", dir="/tmp")
    log_path = tmp_path / "first.log"
    log = open(log_path, "w")
    proc = subprocess.Popen(
        search_cmd(tmp_path, data_dir, *SETTINGS),
        cwd=tmp_path,
        stdout=log,
        stderr=subprocess.STDOUT,
        env=_env(ray_tmp),
        start_new_session=True,
    )
    procs = set()
    try:
        deadline = time.time() + 300
        while time.time() < deadline:
            procs |= run_processes(proc.pid, ray_tmp)
            assert proc.poll() is None, "the search ended before the signal:\n" + log_path.read_text()[-3000:]
            reported = [f for f in exp_dir.glob("*/result.json") if f.stat().st_size > 0]
            if reported and "RUNNING" in snapshot(exp_dir).values():
                break
            time.sleep(0.3)
        else:
            pytest.fail("no trial reported within 300 s:\n" + log_path.read_text()[-3000:])
        before = snapshot(exp_dir)
        (os.killpg if to_group else os.kill)(proc.pid, signum)
        rc = proc.wait(timeout=180)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()
        kill_leftovers(procs | run_processes(-1, ray_tmp))
    return rc, log_path.read_text(), before


def _check_interrupted(tmp_path: Path, out: str, before: dict):
    assert "the search was interrupted" in out, out[-3000:]
    assert "test MAE" not in out and "best trial:" not in out, out[-3000:]
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlruns.db'}")
    exp = client.get_experiment_by_name(NAME)
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1
    parent = parents[0]
    assert (parent.info.status, parent.data.tags["status"]) == ("KILLED", "interrupted")
    assert "best_test_mae_info" not in parent.data.metrics
    after = snapshot(tmp_path / "ray" / NAME)
    trials = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert trials
    for r in trials:
        tid = r.data.tags["trial_id"]
        if after.get(tid) == "TERMINATED":  # ended before the signal
            assert r.data.tags["status"] in ("completed", "pruned"), r.data.tags
        else:
            assert (r.info.status, r.data.tags["status"]) == ("KILLED", "interrupted"), (tid, after, r.data.tags)
    assert any(s == "RUNNING" for s in before.values())
    board = search_leaderboard(client, exp.experiment_id, parent.info.run_id)
    unfinished = {t for t, s in after.items() if s != "TERMINATED"}
    assert unfinished, after
    assert set(board.loc[board.status == "completed", "trial_id"]).isdisjoint(unfinished), board
    return client, exp, parent


@pytest.mark.slow
def test_sigint_stops_the_search_as_interrupted_and_resume_finishes_it(tmp_path, data_dir):
    rc, out, before = _interrupt(tmp_path, data_dir, signal.SIGINT, to_group=True)
    assert rc == 130, out[-3000:]
    client, exp, parent = _check_interrupted(tmp_path, out, before)

    ray_tmp = tempfile.mkdtemp(prefix="mfray-", dir="/tmp")
    try:
        proc = subprocess.run(
            search_cmd(tmp_path, data_dir, *SETTINGS, "--resume"),
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=400,
            env=_env(ray_tmp),
        )
    finally:
        kill_leftovers(run_processes(-1, ray_tmp), grace_s=5)
    out2 = proc.stdout + proc.stderr
    assert proc.returncode == 0, out2[-4000:]
    assert "best trial:" in proc.stdout
    parent = client.get_run(parent.info.run_id)
    assert (parent.info.status, parent.data.tags["status"]) == ("FINISHED", "completed")
    after = snapshot(tmp_path / "ray" / NAME)
    assert len(after) == NUM_SAMPLES and set(after.values()) == {"TERMINATED"}, after
    board = search_leaderboard(client, exp.experiment_id, parent.info.run_id)
    assert sorted(board.trial_id) == sorted(after)
    assert set(board.status) == {"completed"}, board
    assert set(board.epochs) == {12}, board  # each ran to its last epoch, across the interruption


@pytest.mark.slow
def test_sigterm_to_the_driver_stops_the_search_with_143(tmp_path, data_dir):
    rc, out, before = _interrupt(tmp_path, data_dir, signal.SIGTERM, to_group=False)
    assert rc == 143, out[-3000:]
    assert "SIGTERM: stopping the search" in out
    _check_interrupted(tmp_path, out, before)


def test_a_signal_before_the_trials_run_raises_with_its_number():
    """Outside Tune's loop the first signal raises SearchInterrupted (a KeyboardInterrupt), whose
    number the CLI turns into its exit status; the handlers in place before come back after."""
    previous = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SearchInterrupted) as err:
        with SearchSignals() as signals:
            assert signal.getsignal(signal.SIGTERM) == signals._handle
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)  # the handler runs between bytecodes
    assert err.value.signum == signal.SIGTERM and isinstance(err.value, KeyboardInterrupt)
    assert signals.signum == signal.SIGTERM
    assert exit_status(err.value.signum) == 143 and exit_status(signal.SIGINT) == 130
    assert signal.getsignal(signal.SIGTERM) == previous
