"""Run queries: the MLflow runs of a search, read back.

A search is one parent run tagged ``kind=search``; each trial is a nested run of it
(``mlflow.parentRunId``) carrying a ``trial_id`` tag (see :mod:`matfusion.tracking.logger`).
Every query here pages through all results (MLflow returns at most 1000 runs a call).
"""

from __future__ import annotations

import json
import tempfile
from typing import Sequence

SEARCH_FILTER = "tags.kind = 'search'"
# MLflow 3's UI opens an experiment on the page of the experiment's kind, read from this tag
# (without it: a GenAI "Overview" of traces); a model-training experiment opens on its runs.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING = "custom_model_development"
LATEST_FIRST = ["attributes.start_time DESC"]


def quote(value: str) -> str:
    """A value for an MLflow filter string (single-quoted)."""
    return "'" + str(value).replace("\\", "\\\\").replace("'", "\\'") + "'"


def all_runs(client, experiment_ids: Sequence[str], filter_string: str, order_by=None) -> list:
    """Every run matching ``filter_string`` in ``experiment_ids``, all pages."""
    runs, token = [], None
    while True:
        page = client.search_runs(
            list(experiment_ids), filter_string=filter_string, max_results=1000, order_by=order_by, page_token=token
        )
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def child_runs(client, experiment_id: str, parent_run_id: str, extra_filter: str = "", order_by=None) -> list:
    """Every nested run of ``parent_run_id`` (trials, and e.g. an ensemble built on the search)."""
    filter_string = f"tags.mlflow.parentRunId = {quote(parent_run_id)}"
    if extra_filter:
        filter_string += f" and {extra_filter}"
    return all_runs(client, [experiment_id], filter_string, order_by=order_by)


def nested_runs(client, experiment_id: str, parent_run_id: str, extra_filter: str = "") -> list:
    """The trial runs of a search: nested runs of its parent run with a ``trial_id`` tag (other
    nested runs, e.g. an ensemble built on the search, are left out), all pages, oldest first."""
    runs = child_runs(client, experiment_id, parent_run_id, extra_filter, order_by=["attributes.start_time ASC"])
    return [r for r in runs if "trial_id" in r.data.tags]


def find_trial_run(client, experiment_id: str, parent_run_id: str, trial_id: str):
    """The nested run of ``trial_id`` under the parent (the oldest if, somehow, several)."""
    runs = nested_runs(client, experiment_id, parent_run_id, f"tags.trial_id = {quote(trial_id)}")
    return runs[0] if runs else None


def latest_search_run(client, experiment_ids: Sequence[str], prefer_completed: bool = False, max_results: int = 100):
    """The most recent parent run tagged ``kind=search`` in ``experiment_ids`` (with
    ``prefer_completed``: the most recent completed one among the latest ``max_results``, else the
    most recent); None when there is none."""
    if not experiment_ids:
        return None
    runs = client.search_runs(
        list(experiment_ids),
        filter_string=SEARCH_FILTER,
        order_by=LATEST_FIRST,
        max_results=max_results if prefer_completed else 1,
    )
    if not runs:
        return None
    done = [r for r in runs if r.data.tags.get("status") == "completed"] if prefer_completed else []
    return (done or runs)[0]


def latest_search_parent(client, experiment_name: str):
    """The latest search parent run of the experiment named ``experiment_name`` (completed ones
    preferred).  Raises ``ValueError`` naming what is missing."""
    exp = client.get_experiment_by_name(experiment_name)
    if exp is None:
        known = ", ".join(e.name for e in client.search_experiments(max_results=50))
        raise ValueError(f"no MLflow experiment named {experiment_name!r} (experiments: {known or 'none'})")
    run = latest_search_run(client, [exp.experiment_id], prefer_completed=True)
    if run is None:
        raise ValueError(f"experiment {experiment_name!r} has no search run (tag kind=search)")
    return run


def load_run_dict(client, run_id: str, artifact: str) -> dict:
    """A JSON artifact of a run, as a dict."""
    with tempfile.TemporaryDirectory() as d:
        with open(client.download_artifacts(run_id, artifact, d)) as fh:
            return json.load(fh)
