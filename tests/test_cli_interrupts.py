"""SIGTERM outside a search: `matfusion ensemble` (and a benchmark's stacking) stops as Ctrl-C does,
one line and exit 143, instead of dying at once without a word (Python's default)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import yaml
from conftest import DATA_DIR, REPO
from mlflow.tracking import MlflowClient

from matfusion.search.interrupts import SearchInterrupted, command_signals


def test_command_signals_make_sigterm_an_interrupt_and_put_the_old_handler_back():
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SearchInterrupted) as info:
        with command_signals():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler raises here, at once
    assert info.value.signum == signal.SIGTERM and isinstance(info.value, KeyboardInterrupt)
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_forked_child_under_command_signals_ends_as_sigterm_would():
    with command_signals():
        pid = os.fork()
        if pid == 0:  # the child: SIGTERM must end it, not raise into a copy of the parent's stack
            try:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(5)
            finally:
                os._exit(7)  # reached only if the signal raised instead of ending the process
        _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGTERM, status


@pytest.mark.slow
def test_sigterm_to_the_ensemble_command_is_one_line_and_143(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    config = tmp_path / "search.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "name": "ens-sigterm",
                "data": {"source": "matbench_phonons", "limit": 120, "data_dir": str(DATA_DIR)},
                "search": {
                    "families": ["rf", "cgcnn"],
                    "fusions": ["none"],
                    "preset": "quick",
                    "num_samples": 2,
                    "max_epochs": 1,
                    "grace_period": 1,
                    "storage_path": str(tmp_path / "ray"),
                },
                "mlflow": {"tracking_uri": uri, "artifact_location": str(tmp_path / "artifacts")},
            }
        )
    )
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    cli = [sys.executable, "-m", "matfusion.cli"]
    search = subprocess.run(
        [*cli, "search", str(config), "--quiet"], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600
    )
    assert search.returncode == 0, search.stdout[-2000:] + search.stderr[-2000:]
    # a stack that takes minutes (its CGCNN member trains 300 epochs per fold), stopped while it works
    proc = subprocess.Popen(
        [*cli, "ensemble", "--experiment", "ens-sigterm", "--tracking-uri", uri, "--k", "1", "--folds", "2"]
        + ["--max-epochs", "300", "--data-dir", str(DATA_DIR)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
        env=env,
    )
    try:
        seen = []
        for line in proc.stdout:  # the members are chosen: the stacking starts
            seen.append(line)
            if " members" in line and line.startswith("search run "):
                break
        time.sleep(3)
        assert proc.poll() is None, "".join(seen)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, "".join(seen) + out[-2000:] + err[-3000:]
    assert err.strip().splitlines()[-1] == "matfusion: interrupted (SIGTERM)", err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("ens-sigterm").experiment_id
    assert not client.search_runs([exp], filter_string="attributes.status = 'RUNNING'")  # nothing left open
    assert not client.search_runs([exp], filter_string="tags.kind = 'ensemble'")  # and no half ensemble
