"""Trial faults inside a real search (real Ray, real MLflow on sqlite in tmp_path, 60 rows of
matbench_phonons, tabular families only: seconds a trial): a trial that raises, a MemoryError, a
NaN loss mid-way (after the trial's first checkpoint), then, on resume, a corrupted checkpoint.
Each such trial ends failed with one line naming it and the reason (stderr, and tag ``failure``
on its MLflow run), the others go on, the summary counts the failed ones; the search exits 4 with
one line when no trial succeeded, 0 when one did.

The faults are injected into the real trainable with ``MATFUSION_INJECT_FAULTS`` (read by the
driver when the search starts; see matfusion.search.faults); the corrupted checkpoint is the
real checkpoint file of the failed trial, truncated by the test."""

import contextlib
import io
import math
import re
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO
from mlflow.tracking import MlflowClient

from matfusion.cli import EXIT_NO_TRIAL_SUCCEEDED, main
from matfusion.search.faults import failure_reason
from matfusion.trainables.guards import (
    INJECT_ENV,
    SLOW_REPORT_S,
    CheckedSession,
    FaultySession,
    as_memory_error,
    parse_faults,
)
from matfusion.trainables.loop import LocalSession, NonFiniteLossError

NAME = "phonons-smoke"  # configs/smoke.yaml
SETTINGS = {
    "data.limit": 60,
    "search.num_samples": 3,
    "search.families": "[rf, lgbm, et]",
    "search.min_trials_per_group": 1,  # round robin: t01 rf, t02 lgbm, t03 et
    "search.scheduler": "fifo",
    "search.max_epochs": 2,
    "search.grace_period": 1,
    "search.max_concurrent": 2,
    "search.points_to_evaluate": "false",
    # 30 trees (rf, et) or boosting rounds (lgbm, 15 an epoch) a trial
    "search.space": "{rf.n_estimators: 30, et.n_estimators: 30, lgbm.n_estimators: 30}",
}
FAULTS = "rf@1=error,et@1=memory,lgbm@2=nan"


def search(tmp: Path, faults: str, *extra: str):
    """``matfusion search`` in this process (its exit status, stdout, stderr) with ``faults``."""
    from conftest import DATA_DIR

    argv = ["search", str(REPO / "configs" / "smoke.yaml"), "--data-dir", str(DATA_DIR), "--quiet", *extra]
    values = {
        **SETTINGS,
        "mlflow.tracking_uri": f"sqlite:///{tmp / 'mlruns.db'}",
        "mlflow.artifact_location": str(tmp / "artifacts"),
        "search.storage_path": str(tmp / "ray"),
    }
    for key, value in values.items():
        argv += ["--set", f"{key}={value}"]
    out, err = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        mp.setenv(INJECT_ENV, faults)
        rc = main(argv)
    return rc, out.getvalue(), err.getvalue()


def runs_of(tmp: Path):
    client = MlflowClient(f"sqlite:///{tmp / 'mlruns.db'}")
    exp = client.get_experiment_by_name(NAME)
    runs = client.search_runs([exp.experiment_id], max_results=100)
    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    trials = {r.data.tags["family"]: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    return client, parent, trials


def failure_lines(stderr: str) -> dict:
    """family -> the one line ``matfusion: trial tNN FAMILY (id) failed: REASON`` of each failure
    (a progress bar may end with a carriage return just before one)."""
    found = re.finditer(r"(?:^|\r)(matfusion: trial t\d\d (\w+) \(\w+\) failed: [^\r\n]+)$", stderr, re.M)
    return {m.group(2): m.group(1) for m in found}


@pytest.fixture(scope="module")
def first(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("faults")
    return (tmp, *search(tmp, FAULTS))


@pytest.fixture(scope="module")
def resumed(first):
    """The first search resumed, without faults: Tune retries its failed trials, each from its
    last checkpoint (lgbm's, of epoch 1, which the test truncates first) or from the start."""
    tmp = first[0]
    ckpts = list((tmp / "ray" / NAME).glob("run_trial_*family=lgbm*/checkpoint_*/state.pkl"))
    assert len(ckpts) == 1, ckpts
    data = ckpts[0].read_bytes()
    ckpts[0].write_bytes(data[: len(data) // 3])
    return (tmp, *search(tmp, "", "--resume"))


def test_failed_trials_are_one_line_each_and_no_success_exits_4(first):
    tmp, rc, out, err = first
    assert rc == EXIT_NO_TRIAL_SUCCEEDED, out[-3000:] + err[-3000:]
    assert "Traceback" not in out + err and "Trials did not complete" not in err, err[-3000:]
    lines = failure_lines(err)
    assert set(lines) == {"rf", "lgbm", "et"}, err[-3000:]
    assert lines["rf"].endswith(
        "failed: RuntimeError: injected fault (MATFUSION_INJECT_FAULTS): an error in rf at epoch 1"
    )
    assert re.search(r"failed: out of memory \(MemoryError: injected fault .*\); use a smaller model", lines["et"])
    assert lines["lgbm"].endswith(
        "failed: diverged: lgbm reported train_loss=nan at epoch 2; the trial is stopped (its model diverged, "
        "or its validation rows have no finite target)"
    )
    # the summary counts them; the last line says the search failed, naming the first failure
    assert "trials: 3 (0 succeeded, 3 failed)" in out
    assert re.search(r"^  failed: t02 lgbm \(\w+\): diverged: lgbm reported", out, re.M), out
    assert "best trial:" not in out and "test MAE" not in out
    last = err.strip().splitlines()[-1]
    assert re.fullmatch(
        rf"matfusion: error: no trial of search '{NAME}' succeeded \(3 of 3 failed; first: t01 rf \(\w+\): "
        r"RuntimeError: injected fault \(MATFUSION_INJECT_FAULTS\): an error in rf at epoch 1\)",
        last,
    ), last

    client, parent, trials = runs_of(tmp)
    assert (parent.info.status, parent.data.tags["status"], parent.data.tags["failed_trials"]) == (
        "FAILED",
        "failed",
        "3",
    )
    assert parent.data.tags["error"] == last.removeprefix("matfusion: error: ")
    assert parent.data.metrics["n_failed"] == 3
    assert sorted(trials) == ["et", "lgbm", "rf"]
    for family, run in trials.items():
        assert (run.info.status, run.data.tags["status"]) == ("FAILED", "failed"), family
        assert lines[family].endswith(run.data.tags["failure"]) and "\n" not in run.data.tags["failure"]
    # lgbm failed mid-way: epoch 1 is logged (and checkpointed); the NaN of epoch 2 reached neither Tune nor MLflow
    lgbm = trials["lgbm"]
    assert [m.step for m in client.get_metric_history(lgbm.info.run_id, "val_mae")] == [1]
    assert np.isfinite(lgbm.data.metrics["val_mae"])


def test_resume_from_a_corrupted_checkpoint_fails_that_trial_and_the_others_succeed(resumed):
    tmp, rc, out, err = resumed
    assert rc == 0, out[-3000:] + err[-3000:]  # two trials succeeded
    assert "Traceback" not in out + err, err[-3000:]
    lines = failure_lines(err)
    assert set(lines) == {"lgbm"}, err[-3000:]
    assert re.search(
        r"failed: unreadable checkpoint: the lgbm checkpoint it resumes from cannot be read "
        r"\((UnpicklingError|EOFError): .*; checkpoint_\d+: state\.pkl\); the trial cannot continue from it",
        lines["lgbm"],
    ), lines["lgbm"]
    assert "trials: 3 (2 succeeded, 1 failed)" in out and "best trial: family=" in out

    client, parent, trials = runs_of(tmp)  # the same runs, one attempt more
    assert (parent.info.status, parent.data.tags["status"], parent.data.tags["attempts"]) == (
        "FINISHED",
        "completed",
        "2",
    )
    assert parent.data.tags["failed_trials"] == "1" and parent.data.tags["best_family"] in ("rf", "et")
    assert sorted(trials) == ["et", "lgbm", "rf"]
    lgbm = trials["lgbm"]
    assert (lgbm.info.status, lgbm.data.tags["status"]) == ("FAILED", "failed")
    assert lines["lgbm"].endswith(lgbm.data.tags["failure"])
    # in Tune: the trial ended ERROR with the reader's error (its error file, whose tail is the run's `error` tag)
    (error_file,) = (tmp / "ray" / NAME).glob("run_trial_*family=lgbm*/error.txt")
    assert "CorruptCheckpointError: the lgbm checkpoint it resumes from cannot be read" in error_file.read_text()
    assert "CorruptCheckpointError" in lgbm.data.tags["error"]
    from ray.tune import ExperimentAnalysis

    statuses = {t.config["family"]: t.status for t in ExperimentAnalysis(str(tmp / "ray" / NAME)).trials}
    assert statuses == {"rf": "TERMINATED", "et": "TERMINATED", "lgbm": "ERROR"}
    for family in ("rf", "et"):
        run = trials[family]
        assert (run.info.status, run.data.tags["status"]) == ("FINISHED", "completed"), family
        assert np.isfinite(run.data.metrics["val_mae"])


# -- the reasons and the guards, without Ray --------------------------------------------------------


def test_failure_reasons_are_one_line_by_kind():
    assert failure_reason(MemoryError()).startswith("out of memory (MemoryError); use a smaller model")
    torch_oom = RuntimeError(
        "[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you tried to "
        "allocate 256000000000000 bytes. Error code 12 (Cannot allocate memory)"
    )
    assert failure_reason(torch_oom).startswith("out of memory (RuntimeError: [enforce fail")
    assert failure_reason(NonFiniteLossError("training loss became nan at epoch 1 (lr=1e8)\nmore")) == (
        "diverged: training loss became nan at epoch 1 (lr=1e8)"
    )
    from ray.exceptions import ActorDiedError

    assert failure_reason(ActorDiedError()) == (
        "its worker process died (ActorDiedError: The actor died unexpectedly before finishing this task.)"
    )
    trace = 'Failure # 1\nTraceback (most recent call last):\n  File "x.py", line 1, in f\nValueError: bad value\n'
    assert failure_reason(trace) == "ValueError: bad value"  # Tune's text trace, where no pickled error is left
    assert len(failure_reason(ValueError("x" * 1000))) == 300


def test_torchs_allocator_failure_is_a_memory_error():
    """run_trial raises torch's failed allocation (a RuntimeError) as a MemoryError: 1 PiB is
    refused at once (more than the address space, whatever the overcommit setting)."""
    import torch

    with pytest.raises(RuntimeError) as info:
        torch.empty(2**50, dtype=torch.uint8)
    oom = as_memory_error(info.value)
    assert isinstance(oom, MemoryError) and "allocate" in str(oom)
    assert failure_reason(oom).startswith("out of memory (TrialOutOfMemory: ")
    assert as_memory_error(RuntimeError("mat1 and mat2 shapes cannot be multiplied")) is None


def test_a_non_finite_report_is_refused_before_it_reaches_the_search():
    inner = LocalSession()
    session = CheckedSession(inner, "lgbm")
    session.report({"epoch": 1, "train_loss": 1.0, "val_mae": 2.0, "best_val_mae": 2.0}, None)
    with pytest.raises(NonFiniteLossError, match=r"lgbm reported val_mae=inf at epoch 2"):
        session.report({"epoch": 2, "train_loss": 1.0, "val_mae": float("inf"), "best_val_mae": 2.0}, None)
    assert [m["epoch"] for m in inner.history] == [1]


def test_fault_specs_are_checked():
    assert [(f.family, f.epoch, f.kind) for f in parse_faults("lgbm@2=error, et@1=memory")] == [
        ("lgbm", 2, "error"),
        ("et", 1, "memory"),
    ]
    with pytest.raises(ValueError, match="is not FAMILY@EPOCH=KIND"):
        parse_faults("lgbm=error")
    with pytest.raises(ValueError, match="KIND is one of error, memory, nan"):
        parse_faults("lgbm@1=segfault")


def test_a_slow_fault_waits_before_every_report_from_its_epoch_on():
    waits, inner = [], LocalSession()
    session = FaultySession(inner, parse_faults("cgcnn@2=slow, cgcnn@3=nan"), sleep=waits.append)
    for epoch in (1, 2, 3, 4):
        session.report({"epoch": epoch, "train_loss": 1.0, "val_mae": 2.0}, None)
    assert waits == [SLOW_REPORT_S] * 3  # epochs 2, 3, 4; not 1
    assert [m["epoch"] for m in inner.history] == [1, 2, 3, 4]
    assert math.isnan(inner.history[2]["val_mae"]) and inner.history[3]["val_mae"] == 2.0  # the other faults stay


FORK_SCRIPT = """
import multiprocessing
from matfusion.search.interrupts import SearchSignals

def same(x):
    return x

if __name__ == "__main__":
    with SearchSignals() as signals:
        for _ in range(4):
            with multiprocessing.get_context("fork").Pool(4) as pool:
                assert list(pool.imap(same, range(200))) == list(range(200))
    print("interrupted:", signals.interrupted)
"""


def test_forked_workers_ended_by_sigterm_during_a_search_leave_no_traceback(tmp_path):
    """Featurization pools forked while the search's signal handlers are in place (as
    matfusion.data.parallel forks them): ``Pool.terminate`` (its ``with`` exit) ends the workers
    with SIGTERM, which is their default end, not a SearchInterrupted traceback from each worker
    still waiting for a task; the search itself is not interrupted.  (In a process of its own:
    this one may have Ray's threads, which a fork must not copy.)"""
    import os
    import subprocess
    import sys

    script = tmp_path / "forks.py"
    script.write_text(FORK_SCRIPT)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "interrupted: False"
    assert "Traceback" not in proc.stderr and "SearchInterrupted" not in proc.stderr, proc.stderr[-2000:]
