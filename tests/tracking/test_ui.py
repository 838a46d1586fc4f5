"""What a search's experiment tells the MLflow UI: its kind and the "Leaderboard" view of its runs
table, on a real sqlite store (the UI itself opening it: tests/search/test_cluster.py, in Chromium)."""

import json
from urllib.parse import parse_qs, urlsplit

from mlflow.tracking import MlflowClient

from matfusion.search.tuner import ui_lines, ui_runs_url
from matfusion.tracking.logger import ensure_experiment
from matfusion.tracking.runs import EXPERIMENT_KIND_TAG, MODEL_TRAINING
from matfusion.tracking.ui import UI_SEARCH_FACETS, VIEW_KEY, VIEW_NAME, VIEW_TAG


def _view(tags: dict) -> dict:
    """The view as the UI reads it: the saved-view envelope, then its state's JSON."""
    envelope = json.loads(tags[VIEW_TAG])
    assert isinstance(envelope["name"], str) and isinstance(envelope["createdAt"], int)
    assert isinstance(envelope["updatedAt"], int) and isinstance(envelope["state"], str)
    return {"name": envelope["name"], **json.loads(envelope["state"])}


def test_experiment_gets_the_leaderboard_view_once_and_keeps_an_edited_one(tmp_path):
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlruns.db'}")
    tags = client.get_experiment(ensure_experiment(client, "new", str(tmp_path / "art"))).tags
    view = _view(tags)
    assert tags[EXPERIMENT_KIND_TAG] == MODEL_TRAINING and view["name"] == VIEW_NAME
    assert view["orderByKey"] == "metrics.`best_val_mae`" and view["orderByAsc"] is True
    assert view["selectedColumns"] == [
        "metrics.`best_val_mae`",
        "metrics.`epochs_trained`",
        "tags.`family`",
        "tags.`fusion`",
        "tags.`status`",
    ]
    assert view["columnOrder"] == ["duration", *view["selectedColumns"]] and view["columnWidths"]

    # an experiment made before (no kind, no view) gets both; a view edited in the UI stays
    old = client.create_experiment("old", artifact_location=(tmp_path / "old").as_uri())
    assert ensure_experiment(client, "old") == old
    assert _view(client.get_experiment(old).tags)["selectedColumns"] == view["selectedColumns"]
    edited = json.dumps({"name": "mine", "createdAt": 1, "updatedAt": 2, "state": json.dumps({"selectedColumns": []})})
    client.set_experiment_tag(old, VIEW_TAG, edited)
    ensure_experiment(client, "old")
    assert client.get_experiment(old).tags[VIEW_TAG] == edited


def test_printed_page_asks_for_the_view_and_no_facet_that_would_cancel_it(tmp_path):
    url = ui_runs_url("http://127.0.0.1:5000/", "7")
    head, _, query = urlsplit(url).fragment.partition("?")
    params = parse_qs(query)
    assert url.startswith("http://127.0.0.1:5000/#/experiments/7/runs?") and head == "/experiments/7/runs"
    assert params == {"workflowType": ["machine_learning"], "viewStateShareKey": [VIEW_KEY]}
    assert not set(params) & set(UI_SEARCH_FACETS)  # the UI drops the view when the URL has a facet
    assert VIEW_TAG == f"mlflow.sharedViewState.{VIEW_KEY}"
    assert ui_lines("http://10.0.0.5:5001", "7") == [
        f"Open the MLflow UI at {ui_runs_url('http://10.0.0.5:5001', '7')}"
    ]
