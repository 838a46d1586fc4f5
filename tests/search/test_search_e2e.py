"""End to end: `matfusion search` on a smoke-sized config with real Ray, real MLflow (sqlite),
real matbench_phonons data, in a temp dir."""

import subprocess
import sys

import pytest
from conftest import REPO
from mlflow.tracking import MlflowClient

pytestmark = pytest.mark.slow


def test_smoke_search_logs_parent_and_nested_runs(tmp_path, data_dir):
    db = tmp_path / "mlruns.db"
    cmd = [
        sys.executable,
        "-m",
        "matfusion.cli",
        "search",
        str(REPO / "configs" / "smoke.yaml"),
        "--data-dir",
        str(data_dir),
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
    out = proc.stdout
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
    import json

    families = json.load(open(space))["families"]
    assert set(families) == {"rf", "cgcnn"} and "fusion" in families["cgcnn"]
