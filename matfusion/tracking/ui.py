"""What a search's experiment tells the MLflow UI (3.17), and the page that opens it.

* Its kind (tag ``mlflow.experimentKind``): a model-training experiment opens on its runs, not
  on the GenAI overview of traces.
* A saved view of the runs table, "Leaderboard": the leaderboard's metrics and tags as visible
  columns (``best_val_mae``, ``epochs_trained``, ``family``, ``fusion``, ``status``), best
  ``best_val_mae`` first.  The UI reads a view from the experiment tag
  ``mlflow.sharedViewState.<key>`` when the page's URL carries ``viewStateShareKey=<key>``; the
  tag holds the envelope the UI's own "Save as new view" writes (``name``, ``createdAt``,
  ``updatedAt`` in ms, ``state``: the view's JSON, here uncompressed), so the view is also listed
  in the UI's views menu.  The UI ignores the view when the URL carries any search facet of its
  own (``orderByKey``, ``orderByAsc``, ``searchFilter``, ...): the sort lives in the view, the
  URL carries only the key.

Both tags are set when an experiment is created and added to an existing one that lacks them;
an existing view is never overwritten (a user may have edited it in the UI).
"""

from __future__ import annotations

import json
import time
from typing import Mapping, Optional

from .runs import EXPERIMENT_KIND_TAG, MODEL_TRAINING

VIEW_KEY = "leaderboard"
VIEW_NAME = "Leaderboard"
VIEW_TAG = f"mlflow.sharedViewState.{VIEW_KEY}"
# The UI's search facets (its EXPERIMENT_PAGE_QUERY_PARAM_KEYS): any of them in the URL and the
# shared view is not applied.
UI_SEARCH_FACETS = (
    "searchFilter",
    "orderByKey",
    "orderByAsc",
    "startTime",
    "lifecycleFilter",
    "modelVersionFilter",
    "datasetsFilter",
)
# the leaderboard (tracking/leaderboard.py: family, fusion, val_mae, epochs, status); the run
# name carries the trial number
SORT_METRIC = "best_val_mae"
VIEW_METRICS = ("best_val_mae", "epochs_trained")
VIEW_TAGS = ("family", "fusion", "status")
SORT_COLUMN_WIDTH = 160  # px


def column_key(kind: str, name: str) -> str:
    """The UI's key of a runs-table column: ``metrics.`best_val_mae```, ``tags.`family```."""
    return f"{kind}.`{name}`"


def view_columns() -> list[str]:
    return [column_key("metrics", m) for m in VIEW_METRICS] + [column_key("tags", t) for t in VIEW_TAGS]


def leaderboard_view_state() -> dict:
    """The runs page's state of the view: its search facets (the sort) and its UI state (the
    columns shown); the UI fills every other field with its defaults."""
    columns = view_columns()
    return {
        "orderByKey": column_key("metrics", SORT_METRIC),
        "orderByAsc": True,
        "selectedColumns": columns,
        # the grid applies widths only with an order, and puts the columns it names first:
        # after Duration (col-id "duration"), as the UI would place them; the sort metric wide
        # enough for a full float (the UI prints every digit of a metric)
        "columnOrder": ["duration", *columns],
        "columnWidths": {column_key("metrics", SORT_METRIC): SORT_COLUMN_WIDTH},
    }


def leaderboard_view_tag(now_ms: Optional[int] = None) -> str:
    """The value of :data:`VIEW_TAG`: the UI's saved-view envelope around the view's state."""
    now_ms = int(time.time() * 1000) if now_ms is None else int(now_ms)
    state = json.dumps(leaderboard_view_state())
    return json.dumps({"name": VIEW_NAME, "createdAt": now_ms, "updatedAt": now_ms, "state": state})


def experiment_tags() -> dict[str, str]:
    """The tags a new experiment of a search is created with."""
    return {EXPERIMENT_KIND_TAG: MODEL_TRAINING, VIEW_TAG: leaderboard_view_tag()}


def missing_experiment_tags(existing: Mapping[str, str]) -> dict[str, str]:
    """Those of :func:`experiment_tags` that an experiment with tags ``existing`` lacks."""
    return {k: v for k, v in experiment_tags().items() if k not in existing}


def runs_url(base: str, experiment_id: str) -> str:
    """The runs list of an experiment in the MLflow UI at ``base``, in the model-training view,
    with the leaderboard view: its columns, best first."""
    query = f"workflowType=machine_learning&viewStateShareKey={VIEW_KEY}"
    return f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs?{query}"
