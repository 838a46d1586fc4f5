"""Resume: `matfusion search` is SIGKILLed mid-search (a real subprocess with its own local Ray),
then `matfusion search --resume` finishes it.  Real Ray, real MLflow (sqlite), real data.

The fast tests drive MlflowTrialLogger (the Tune callback) with Tune's own Trial objects through
what a restore replays: a second logger (as unpickled from the experiment) meets trials whose
runs exist, some closed by the interruption, and results re-reported for logged epochs."""

import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from conftest import REPO
from mlflow.tracking import MlflowClient
from ray.tune.experiment import Trial

from matfusion.search.tuner import discard_orphan_runs, unrestorable_reason
from matfusion.tracking.logger import MlflowTrialLogger, close_open_trial_runs, ensure_experiment
from matfusion.tracking.runs import nested_runs

NAME = "phonons-smoke"  # configs/smoke.yaml
NUM_SAMPLES = 6
MAX_EPOCHS = 4


def search_cmd(tmp_path, data_dir, *extra):
    return [
        sys.executable,
        "-m",
        "matfusion.cli",
        "search",
        str(REPO / "configs" / "smoke.yaml"),
        "--data-dir",
        str(data_dir),
        "--quiet",
        "--set",
        "data.limit=100",
        "--set",
        f"search.num_samples={NUM_SAMPLES}",
        "--set",
        f"search.max_epochs={MAX_EPOCHS}",
        "--set",
        "search.grace_period=1",
        "--set",
        "search.reduction_factor=2",
        "--set",
        "search.max_concurrent=2",
        "--set",
        "search.families=[rf, cgcnn]",
        "--set",
        "search.fusions=[none]",
        "--set",
        "search.preset=quick",
        "--set",
        "search.points_to_evaluate=false",
        "--set",
        f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlruns.db'}",
        "--set",
        f"mlflow.artifact_location={tmp_path / 'artifacts'}",
        "--set",
        f"search.storage_path={tmp_path / 'ray'}",
        *extra,
    ]


def snapshot(exp_dir: Path) -> dict:
    """trial_id -> status in the newest experiment snapshot ({} if none or half-written)."""
    files = sorted(glob.glob(str(exp_dir / "experiment_state-*.json")))
    if not files:
        return {}
    try:
        with open(files[-1]) as fh:
            state = json.load(fh)
    except (OSError, ValueError):
        return {}
    out = {}
    for trial_json, _ in state["trial_data"]:
        t = json.loads(trial_json)
        out[t["trial_id"]] = t["status"]
    return out


def _proc_stat(pid: int):
    """(parent pid, start time) of a live process, else None (also for a zombie)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[1]), fields[19]


def run_processes(root_pid: int, ray_tmp: str) -> set:
    """(pid, start time) of the processes of one search run: the descendants of its driver
    (Ray's GCS, raylet and workers) and whatever names its own Ray temp dir."""
    procs = {}
    for p in Path("/proc").iterdir():
        if p.name.isdigit() and int(p.name) != os.getpid():
            st = _proc_stat(int(p.name))
            if st is not None:
                procs[int(p.name)] = st
    keep = {root_pid} if root_pid in procs else set()
    for pid in procs:
        try:
            if ray_tmp in (Path("/proc") / str(pid) / "cmdline").read_bytes().decode(errors="replace"):
                keep.add(pid)
        except OSError:
            pass
    grew = True
    while grew:
        children = {pid for pid, (ppid, _) in procs.items() if ppid in keep} - keep
        keep |= children
        grew = bool(children)
    return {(pid, procs[pid][1]) for pid in keep}


def alive(procs: set) -> set:
    return {(pid, start) for pid, start in procs if (_proc_stat(pid) or (None, None))[1] == start}


def kill_leftovers(procs: set, grace_s: float = 15.0) -> set:
    """Ray's processes share the driver's fate; give them a moment, then SIGKILL survivors by
    pid (checking the start time, so that a reused pid is left alone).  Returns the survivors."""
    deadline = time.time() + grace_s
    while alive(procs) and time.time() < deadline:
        time.sleep(0.5)
    left = alive(procs)
    for pid, _ in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return left


@pytest.mark.slow
@pytest.mark.parametrize("asha_mode", ["stop", "promote"])
def test_sigkill_then_resume_finishes_each_trial_once(tmp_path, data_dir, asha_mode):
    mode = ("--set", f"search.asha_mode={asha_mode}")
    exp_dir = tmp_path / "ray" / NAME
    db = f"sqlite:///{tmp_path / 'mlruns.db'}"
    ray_tmp = tempfile.mkdtemp(prefix="mfray-", dir="/tmp")  # short: Ray's socket paths must fit 107 chars
    log1 = open(tmp_path / "first.log", "w")
    proc = subprocess.Popen(
        search_cmd(tmp_path, data_dir, *mode),
        cwd=tmp_path,
        stdout=log1,
        stderr=subprocess.STDOUT,
        env=dict(os.environ, RAY_TMPDIR=ray_tmp),
        start_new_session=True,
    )
    procs = set()
    try:
        # wait for a snapshot holding a finished trial and some trials still to run
        deadline = time.time() + 240
        before = {}
        while time.time() < deadline:
            procs |= run_processes(proc.pid, ray_tmp)
            assert proc.poll() is None, (
                "the search ended before it could be killed:\n" + (tmp_path / "first.log").read_text()[-3000:]
            )
            before = snapshot(exp_dir)
            done = [t for t, s in before.items() if s == "TERMINATED"]
            if done and len(done) <= NUM_SAMPLES - 2:
                break
            time.sleep(0.2)
        else:
            pytest.fail("no finished trial within 240 s:\n" + (tmp_path / "first.log").read_text()[-3000:])
        procs |= run_processes(proc.pid, ray_tmp)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        log1.close()
        kill_leftovers(procs)
    assert len(procs) > 3  # driver, GCS, raylet, workers...: the scan does see them
    assert alive(procs) == set()

    client = MlflowClient(db)
    exp = client.get_experiment_by_name(NAME)
    finished_before = {t for t, s in before.items() if s == "TERMINATED"}
    end_times = {}
    for r in client.search_runs([exp.experiment_id]):
        tid = r.data.tags.get("trial_id")
        if tid in finished_before and r.info.status == "FINISHED":
            end_times[tid] = r.info.end_time
    state = json.loads((exp_dir / "matfusion_search.json").read_text())

    ray_tmp2 = tempfile.mkdtemp(prefix="mfray-", dir="/tmp")
    try:
        proc2 = subprocess.run(
            search_cmd(tmp_path, data_dir, *mode, "--resume"),
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=400,
            env=dict(os.environ, RAY_TMPDIR=ray_tmp2),
        )
    finally:
        kill_leftovers(run_processes(-1, ray_tmp2), grace_s=5)
        shutil.rmtree(ray_tmp, ignore_errors=True)
        shutil.rmtree(ray_tmp2, ignore_errors=True)
    out = proc2.stdout + proc2.stderr
    assert proc2.returncode == 0, out[-4000:]
    assert f"resuming search '{NAME}'" in proc2.stdout
    assert f"parent run {state['parent_run_id']}" in proc2.stdout

    # every planned trial ended exactly once, in Tune's view
    after = snapshot(exp_dir)
    assert len(after) == NUM_SAMPLES, after
    assert set(after.values()) == {"TERMINATED"}, after
    assert set(before) <= set(after)

    # MLflow: one parent (the first one, reused), one nested run per trial, nothing RUNNING
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert [p.info.run_id for p in parents] == [state["parent_run_id"]]
    parent = parents[0]
    assert parent.info.status == "FINISHED" and parent.data.tags["status"] == "completed"
    assert parent.data.tags["attempts"] == "2"
    nested = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    trial_ids = [r.data.tags["trial_id"] for r in nested]
    assert len(trial_ids) == len(set(trial_ids)), trial_ids
    assert set(trial_ids) == set(after)
    assert [r.data.tags["trial_id"] for r in runs if r.info.status == "RUNNING"] == []
    configs = set()
    for r in nested:
        assert r.info.status == "FINISHED", r.data.tags
        assert r.data.tags["status"] in {"completed", "pruned"}, r.data.tags
        steps = [m.step for m in client.get_metric_history(r.info.run_id, "val_mae")]
        assert len(steps) == len(set(steps)), (r.data.tags["trial_id"], steps)  # no epoch logged twice
        assert sorted(steps) == list(range(1, len(steps) + 1))
        if r.data.tags["family"] == "rf":
            assert steps == [1] and r.data.tags["status"] == "completed"
        configs.add(tuple(sorted((k, v) for k, v in r.data.params.items())))
    # the restored Optuna searcher went on from its state: a fresh one (same seed) would
    # propose the first trials' configs again
    assert len(configs) == NUM_SAMPLES

    # trials finished before the kill were not run again
    by_id = {r.data.tags["trial_id"]: r for r in nested}
    for tid, end in end_times.items():
        assert by_id[tid].info.end_time == end, tid
        assert "resumed" not in by_id[tid].data.tags

    # the rungs of the resumed ASHA include the GNN trials of before the kill (replayed), never rf
    rungs = json.loads(
        Path(client.download_artifacts(parent.info.run_id, "asha_rungs.json", str(tmp_path))).read_text()
    )["rungs"]
    first = next(r for r in rungs if r["milestone"] == 1)["recorded"]
    gnn = {tid for tid, r in by_id.items() if r.data.tags["family"] == "cgcnn"}
    assert set(first) == gnn
    assert all(by_id[t].data.tags["family"] == "cgcnn" for rung in rungs for t in rung["recorded"])
    for tid in gnn:
        history = {m.step: m.value for m in client.get_metric_history(by_id[tid].info.run_id, "val_mae")}
        assert first[tid] == pytest.approx(history[1])


# ----------------------------------------------------------------------------- fast: the callback
def cgcnn_trial(trial_id):
    return Trial(
        "run_trial",
        trial_id=trial_id,
        stub=True,
        config={"family": "cgcnn", "cgcnn": {"hidden": 32, "fusion": "none"}, "max_epochs": 4},
    )


def result(epoch, val, finished=False):
    return {
        "epoch": epoch,
        "training_iteration": epoch,
        "val_mae": val,
        "train_loss": val / 2,
        "best_val_mae": val,
        "lr": 1e-3,
        "trial_finished": finished,
    }


@pytest.fixture
def store(tmp_path):
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlruns.db'}")
    exp = ensure_experiment(client, "resume", str(tmp_path / "artifacts"))
    parent = client.create_run(exp, tags={"kind": "search"}).info.run_id
    return client, exp, parent


def test_restored_logger_reuses_runs_and_skips_logged_epochs(store):
    client, exp, parent = store
    first = MlflowTrialLogger(client.tracking_uri, exp, parent)
    a, b, c = cgcnn_trial("aaa"), cgcnn_trial("bbb"), cgcnn_trial("ccc")
    for t in (a, b, c):
        first.on_trial_start(0, [], t)
    for epoch, val in [(1, 3.0), (2, 2.0), (3, 1.5)]:
        first.on_trial_result(0, [], a, result(epoch, val))
    first.on_trial_result(0, [], b, result(1, 5.0))
    first.on_trial_complete(0, [], b)  # pruned at epoch 1, but the snapshot still had it running
    first.on_trial_result(0, [], c, result(1, 4.0))
    first.on_trial_error(0, [], c)
    client.set_tag(first.run_ids["ccc"], "error", "RuntimeError: boom")
    ids = dict(first.run_ids)
    # ... the driver is killed here; the restored search starts its own copy of the callback

    second = MlflowTrialLogger(client.tracking_uri, exp, parent)
    for t in (a, b, c):
        second.on_trial_start(0, [], t)
    assert second.run_ids == ids  # found by tag, not created again
    for run_id in ids.values():
        run = client.get_run(run_id)
        assert run.info.status == "RUNNING" and run.data.tags["status"] == "running"
        assert run.data.tags["resumed"] == "1" and "error" not in run.data.tags
    # a resumed from its epoch-2 checkpoint: epoch 3 comes again, with another value
    for epoch, val in [(3, 1.4), (4, 1.2)]:
        second.on_trial_result(0, [], a, result(epoch, val, finished=epoch == 4))
    second.on_trial_complete(0, [], a)
    second.on_trial_result(0, [], b, result(1, 5.0))
    second.on_trial_complete(0, [], b)
    second.on_trial_result(0, [], c, result(1, 4.0))
    second.on_trial_result(0, [], c, result(2, 3.0, finished=True))
    second.on_trial_complete(0, [], c)

    runs = nested_runs(client, exp, parent)
    assert sorted(r.data.tags["trial_id"] for r in runs) == ["aaa", "bbb", "ccc"]
    by_id = {r.data.tags["trial_id"]: r for r in runs}
    assert {t: r.data.tags["status"] for t, r in by_id.items()} == {
        "aaa": "completed",
        "bbb": "pruned",
        "ccc": "completed",
    }
    assert all(r.info.status == "FINISHED" for r in runs)
    history = client.get_metric_history(ids["aaa"], "val_mae")
    assert sorted((m.step, m.value) for m in history) == [(1, 3.0), (2, 2.0), (3, 1.5), (4, 1.2)]
    for key in ("train_loss", "best_val_mae", "lr"):
        steps = [m.step for m in client.get_metric_history(ids["aaa"], key)]
        assert sorted(steps) == [1, 2, 3, 4]
    assert [m.step for m in client.get_metric_history(ids["bbb"], "val_mae")] == [1]
    assert [m.step for m in client.get_metric_history(ids["bbb"], "epochs_trained")] == [1]
    assert sorted(m.step for m in client.get_metric_history(ids["ccc"], "val_mae")) == [1, 2]
    assert client.get_run(ids["aaa"]).data.metrics["epochs_trained"] == 4


def test_orphan_and_open_runs_are_closed(store):
    client, exp, parent = store
    logger = MlflowTrialLogger(client.tracking_uri, exp, parent)
    for tid in ("kept", "open", "orphan"):
        logger.on_trial_start(0, [], cgcnn_trial(tid))
    # another nested run of the search (e.g. an ensemble built on it) is not a trial run
    other = client.create_run(exp, tags={"mlflow.parentRunId": parent, "kind": "ensemble"}).info.run_id
    logger.on_trial_result(0, [], cgcnn_trial("kept"), result(1, 2.0, finished=True))
    logger.on_trial_complete(0, [], cgcnn_trial("kept"))
    # a trial started after the last experiment snapshot is unknown to the restored search
    assert discard_orphan_runs(client, exp, parent, {"kept", "open"}) == ["orphan"]
    assert sorted(r.data.tags["trial_id"] for r in nested_runs(client, exp, parent)) == ["kept", "open"]
    logger.on_trial_result(0, [], cgcnn_trial("open"), result(1, 3.0))
    logger.on_trial_result(0, [], cgcnn_trial("open"), result(2, 2.5))
    assert close_open_trial_runs(client, exp, parent, "interrupted", "KILLED") == ["open"]
    runs = {r.data.tags["trial_id"]: r for r in nested_runs(client, exp, parent)}
    assert runs["open"].info.status == "KILLED" and runs["open"].data.tags["status"] == "interrupted"
    assert runs["open"].data.metrics["epochs_trained"] == 2
    assert runs["open"].data.metrics["final_best_val_mae"] == 2.5
    assert runs["kept"].data.tags["status"] == "completed"
    assert client.get_run(other).info.lifecycle_stage == "active"
    assert client.get_run(other).info.status == "RUNNING"


def test_unrestorable_reason(tmp_path):
    exp = tmp_path / "exp"
    assert "does not exist" in unrestorable_reason(exp)
    exp.mkdir()
    assert "tuner.pkl" in unrestorable_reason(exp)
    (exp / "tuner.pkl").write_bytes(b"x")
    assert "before Ray Tune wrote its first experiment snapshot" in unrestorable_reason(exp)
    (exp / "experiment_state-2026-01-01_00-00-00.json").write_text("{}")
    (exp / "search_gen_state-2026-01-01_00-00-00.json").write_text("{}")
    assert unrestorable_reason(exp) is None
