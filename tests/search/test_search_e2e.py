"""End to end: `matfusion search` on a smoke-sized config with real Ray, real MLflow (sqlite),
real matbench_phonons data, in a temp dir; then the MLflow UI, served and opened exactly as the
search says, in a real headless Chromium."""

import json
import os
import re
import shlex
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import REPO
from mlflow.tracking import MlflowClient

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smoke_search(tmp_path_factory, data_dir_module):
    tmp_path = tmp_path_factory.mktemp("e2e")
    db = tmp_path / "mlruns.db"
    cmd = [
        sys.executable,
        "-m",
        "matfusion.cli",
        "search",
        str(REPO / "configs" / "smoke.yaml"),
        "--data-dir",
        str(data_dir_module),
        "--quiet",
        "--set",
        "data.limit=120",
        "--set",
        "search.num_samples=4",
        "--set",
        "search.max_epochs=3",
        "--set",
        "search.grace_period=1",
        "--set",
        f"mlflow.tracking_uri=sqlite:///{db}",
        "--set",
        f"mlflow.artifact_location={tmp_path / 'artifacts'}",
        "--set",
        f"search.storage_path={tmp_path / 'ray'}",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return {"tmp_path": tmp_path, "db": db, "out": proc.stdout}


@pytest.fixture(scope="module")
def data_dir_module():
    from conftest import DATA_DIR

    if DATA_DIR is None:
        pytest.fail("real data not found: set MATFUSION_DATA or place ../shared/data beside the repo")
    return DATA_DIR


def test_smoke_search_logs_parent_and_nested_runs(smoke_search):
    tmp_path, db, out = smoke_search["tmp_path"], smoke_search["db"], smoke_search["out"]
    assert "Leaderboard of search 'phonons-smoke'" in out
    assert "test MAE (information only" in out
    assert f"mlflow ui --backend-store-uri sqlite:///{db}" in out

    client = MlflowClient(f"sqlite:///{db}")
    exp = client.get_experiment_by_name("phonons-smoke")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["dataset_hash"] and parent.data.tags["fold"] == "0"
    assert parent.data.params["data.source"] == "matbench_phonons"
    assert parent.data.params["n_test"] != "0"
    assert parent.data.metrics["best_val_mae"] > 0
    assert parent.data.metrics["best_test_mae_info"] > 0

    nested = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(nested) >= 2
    assert len(nested) == 4
    for r in nested:
        assert r.info.status == "FINISHED", r.data.tags
        assert r.data.tags["status"] in {"completed", "pruned"}
        assert r.data.tags["family"] in {"rf", "cgcnn"}
        assert r.data.params["family"] == r.data.tags["family"]
        if r.data.tags["family"] == "rf":
            assert r.data.tags["encoder"] == "-" and r.data.tags["fusion"] == "-"
        else:
            assert r.data.tags["encoder"] == r.data.tags["family"]
            assert r.data.tags["fusion"] == r.data.params[f"{r.data.tags['family']}.fusion"]
        history = client.get_metric_history(r.info.run_id, "val_mae")
        steps = sorted(m.step for m in history)
        assert steps == list(range(1, len(steps) + 1)) and len(steps) >= 1
        assert len(client.get_metric_history(r.info.run_id, "train_loss")) == len(steps)
        if r.data.tags["family"] == "cgcnn":
            assert len(steps) >= 1 and int(r.data.params["max_epochs"]) == 3
            if r.data.tags["status"] == "completed":
                assert len(steps) == 3
    # the leaderboard artifact exists
    arts = [a.path for a in client.list_artifacts(parent.info.run_id)]
    assert {
        "leaderboard.csv",
        "config.json",
        "search_space.json",
        "optimization_history.png",
        "val_mae_per_epoch.png",
    } <= set(arts), arts
    space = client.download_artifacts(parent.info.run_id, "search_space.json", str(tmp_path))
    families = json.load(open(space))["families"]
    assert set(families) == {"rf", "cgcnn"} and "fusion" in families["cgcnn"]

    # a model-training experiment; runs named by trial number, family and fusion; the parent
    # run's description says what was searched
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    names = sorted(r.info.run_name for r in nested)
    expected = sorted(
        f"t{int(r.data.tags['trial_number']):02d} "
        + (
            r.data.tags["family"]
            if r.data.tags["fusion"] == "-"
            else f"{r.data.tags['family']}-{r.data.tags['fusion']}"
        )
        for r in nested
    )
    assert names == expected and [n[:3] for n in names] == ["t01", "t02", "t03", "t04"], names
    note = parent.data.tags["mlflow.note.content"]
    assert "**Search `phonons-smoke`**" in note and "matbench_phonons (120 rows)" in note, note
    assert "groups searched: rf, cgcnn-none, cgcnn-early" in note and "- 4 trials proposed by Optuna TPE" in note
    assert f"train {parent.data.params['n_train']}, inner validation {parent.data.params['n_val']}" in note

    # checkpoints: a completed search keeps only the best trial's (its last, holding its best weights)
    left = sorted((tmp_path / "ray" / "phonons-smoke").glob("*/checkpoint_*"))
    assert len(left) == 1, left
    best = json.load(open(client.download_artifacts(parent.info.run_id, "best_config.json", str(tmp_path))))
    assert f"run_trial_{parent.data.tags['best_trial_id']}_" in left[0].parent.name, (left, best)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_mlflow_ui_opens_as_printed_on_the_runs_list(smoke_search, tmp_path):
    """The UI command and page the search prints, run as printed (another free port only): the
    page is the experiment's runs list (not MLflow 3's GenAI overview), best val MAE first: every
    trial by its readable name, in leaderboard order; the parent's page shows its description."""
    from cdp_browser import Chromium, find_chromium

    binary = find_chromium()
    if binary is None:
        pytest.skip(os.environ.get("MATFUSION_CHROMIUM_MISSING") or "chromium is not installed")
    out = smoke_search["out"]
    command = re.search(r"Open the MLflow UI:  (.+)", out).group(1)
    page = re.search(r"then, in a browser: (\S+)", out).group(1)
    argv = shlex.split(command)
    assert os.path.isfile(argv[0]) and argv[1] == "ui" and argv[-2:] == ["--port", "5000"], argv
    port = _free_port()
    argv[-1], page = str(port), page.replace("127.0.0.1:5000", f"127.0.0.1:{port}")
    client = MlflowClient(f"sqlite:///{smoke_search['db']}")
    exp = client.get_experiment_by_name("phonons-smoke")
    runs = client.search_runs([exp.experiment_id])
    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    trials = sorted(r.info.run_name for r in runs if r.info.run_id != parent.info.run_id)
    assert page.endswith(
        f"/#/experiments/{exp.experiment_id}/runs?workflowType=machine_learning&viewStateShareKey=leaderboard"
    ), page  # the experiment's "Leaderboard" view: its columns and order (matfusion/tracking/ui.py)
    trial_runs = [r for r in runs if r.info.run_id != parent.info.run_id]
    scores = {r.info.run_name: r.data.metrics["best_val_mae"] for r in trial_runs}
    assert len(set(scores.values())) == len(scores), scores  # distinct: one order to check
    by_score = sorted(scores, key=scores.get)

    ui = subprocess.Popen(argv, stdout=open(tmp_path / "ui.log", "w"), stderr=subprocess.STDOUT, start_new_session=True)
    browser = None
    try:
        deadline = time.time() + 240
        while True:
            assert ui.poll() is None, (tmp_path / "ui.log").read_text()[-2000:]
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                assert time.time() < deadline, "the MLflow UI did not come up in 240 s"
                time.sleep(1)
        browser = Chromium(binary, str(tmp_path / "profile"), log_path=str(tmp_path / "chromium.log"))
        browser.open(page)
        browser.wait_for_text([parent.info.run_name, "matching runs"])
        href = browser.evaluate("location.href")
        assert f"#/experiments/{exp.experiment_id}/runs" in href, href
        text = browser.text()
        assert "Token Usage" not in text and "Traces\n0" not in text  # not the GenAI overview
        text = browser.wait_for_text(trials)  # sorted by a metric, the runs are listed flat
        assert f"{len(trials) + 1} matching runs" in text, text[-800:]
        assert sorted(by_score, key=text.index) == by_score, (text[-800:], scores)  # the leaderboard's order
        browser.send(
            "Page.navigate",
            {"url": f"http://127.0.0.1:{port}/#/experiments/{exp.experiment_id}/runs/{parent.info.run_id}"},
        )
        browser.wait_for_text(["Search phonons-smoke", "groups searched: rf, cgcnn-none"])
        browser.screenshot(str(tmp_path / "parent.png"))
        # the parent's plots: listed among its artifacts, and the selected one shown (an image as wide as the file)
        png = Path(client.download_artifacts(parent.info.run_id, "optimization_history.png", str(tmp_path)))
        width = int.from_bytes(png.read_bytes()[16:20], "big")  # the PNG's IHDR width
        run_page = f"http://127.0.0.1:{port}/#/experiments/{exp.experiment_id}/runs/{parent.info.run_id}"
        browser.send("Page.navigate", {"url": f"{run_page}/artifacts/optimization_history.png"})
        browser.wait_for_text(["optimization_history.png", "val_mae_per_epoch.png"])
        shown = f"[...document.images].some(i => i.src.startsWith('blob:') && i.naturalWidth === {width})"
        deadline = time.time() + 60
        while not browser.evaluate(shown):
            if time.time() > deadline:
                images = browser.evaluate("[...document.images].map(i => i.src.slice(0, 40) + ' ' + i.naturalWidth)")
                pytest.fail(f"optimization_history.png ({width} px wide) listed but not shown; images: {images}")
            time.sleep(0.5)
            time.sleep(0.5)
    finally:
        if browser is not None:
            browser.close()
        os.killpg(ui.pid, 15)
        ui.wait(timeout=30)
