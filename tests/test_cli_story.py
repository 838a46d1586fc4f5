"""The whole user story through the CLI, on a tiny real search (real Ray, Optuna, MLflow sqlite,
real matbench_phonons rows): `matfusion search` with the ensemble step on and the ensemble's
defaults (k = 2 members per group, two trials in each group) stacks, registers @champion,
predicts the held-out structures into a CSV and prints the next commands; then `matfusion
ensemble --experiment NAME` with every default stacks the same search again."""

import re
import shlex

import pandas as pd
import pytest
import yaml
from conftest import DATA_DIR
from mlflow.tracking import MlflowClient

from matfusion.cli import main
from matfusion.config import EnsembleConfig

pytestmark = pytest.mark.slow
TASK = "matbench_phonons"


def test_search_stacks_registers_predicts_unseen_and_says_what_next(tmp_path, capsys, monkeypatch):
    if DATA_DIR is None:
        pytest.fail("real data not found: set MATFUSION_DATA or place ../shared/data beside the repo")
    assert EnsembleConfig().k == 2  # the defaults this test runs
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    config = tmp_path / "story.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "name": "story",
                "data": {"source": TASK, "limit": 100, "data_dir": str(DATA_DIR)},
                "features": {"n_jobs": 2},
                "search": {
                    "families": ["rf", "cgcnn"],
                    "fusions": ["none"],
                    "preset": "quick",
                    "num_samples": 4,  # two groups x min_trials_per_group (2)
                    "max_epochs": 2,
                    "grace_period": 2,
                    "max_concurrent": 2,
                    "storage_path": str(tmp_path / "ray"),
                },
                "mlflow": {"tracking_uri": uri, "artifact_location": str(tmp_path / "artifacts")},
                "ensemble": {"enabled": True},
            }
        )
    )
    assert main(["search", str(config), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "Stacked ensemble (mae, 5 folds)" in out, out[-3000:]
    for member in ("rf", "rf_2", "cgcnn-none", "cgcnn-none_2"):
        assert f"member {member} " in out, out[-3000:]
    assert "registered matfusion-matbench_phonons version 1; alias 'champion' moved to it" in out

    # the held-out structures, predicted by the champion, beside their known targets
    champion = "models:/matfusion-matbench_phonons@champion"
    m = re.search(r"predicted (\d+) structures the model never saw .* with (\S+): (\S+); MAE ([\d.]+)", out)
    assert m and m.group(2) == champion, out[-2000:]
    unseen = pd.read_csv(tmp_path / "predictions" / "story-unseen.csv")
    pred = pd.read_csv(m.group(3))
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("story")
    parent = client.search_runs([exp.experiment_id], filter_string="tags.kind = 'search'")[0]
    assert len(unseen) == len(pred) == int(m.group(1)) == int(parent.data.params["n_test"])
    assert list(pred.id) == list(unseen.id)
    assert {"prediction", "std", "last phdos peak"} <= set(pred.columns)
    ensemble = client.search_runs([exp.experiment_id], filter_string="tags.kind = 'ensemble'")
    assert len(ensemble) == 1
    mae = (pred.prediction - pred["last phdos peak"]).abs().mean()
    # the champion predicts the test part as the ensemble's own evaluation scored it
    assert mae == pytest.approx(float(m.group(4)), rel=1e-3)
    assert mae == pytest.approx(ensemble[0].data.metrics["ensemble_mae"], rel=1e-3)

    # what to run next: the UI on the runs list, predict and export with the champion
    ui = re.search(r"Open the MLflow UI:  (.+)", out.split("\nNext:")[1]).group(1)
    assert shlex.split(ui)[1:4] == ["ui", "--backend-store-uri", uri]
    assert f"/#/experiments/{exp.experiment_id}/runs?workflowType=machine_learning" in out
    assert re.search(rf"\S*matfusion predict {re.escape(champion)} my_cifs/ --out preds.csv", out)
    assert re.search(rf"\S*matfusion export {re.escape(champion)} --to exported/", out)

    # `matfusion ensemble` with its defaults on the same search (two trials per group: k = 2)
    assert main(["ensemble", "--experiment", "story", "--tracking-uri", uri, "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "Stacked ensemble (mae, 5 folds)" in out and "member rf_2 " in out and "member cgcnn-none_2 " in out
    assert "registered matfusion-matbench_phonons version 2" in out
    runs = client.search_runs([exp.experiment_id], filter_string="tags.kind = 'ensemble'")
    assert len(runs) == 2 and {r.data.tags["mlflow.parentRunId"] for r in runs} == {parent.info.run_id}
