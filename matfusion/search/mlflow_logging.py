"""MLflow logging of a search: one parent run per search, one nested run per trial.

Everything is written from the driver process (a Tune ``Callback``), so a sqlite store has a
single writer.  Trial runs carry the params of the trial, every per-epoch metric (step =
epoch), tags ``family`` and ``trial_id``, and a final ``status`` tag: ``completed`` (ran to its
last epoch or stopped early on its own), ``pruned`` (stopped by ASHA) or ``failed``.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Optional

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient
from ray.tune import Callback

DEFAULT_TRACKING_URI = "sqlite:///mlruns.db"
TRIAL_METRICS = ("val_mae", "train_loss", "best_val_mae", "lr")
TRIAL_METRIC_PREFIXES = ("val_mae_", "task_weight_", "late_alpha", "attention_graph")


def trial_metric_names(result: dict) -> list[str]:
    return [k for k, v in result.items()
            if (k in TRIAL_METRICS or k.startswith(TRIAL_METRIC_PREFIXES))
            and isinstance(v, (int, float)) and not isinstance(v, bool)]


def resolve_tracking_uri(uri: Optional[str] = None) -> str:
    """Config value, else ``$MLFLOW_TRACKING_URI``, else a sqlite file in the working directory
    (made absolute so that every process agrees on it)."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + str(Path(uri[len("sqlite:///"):]).resolve())
    return uri


def ensure_experiment(client: MlflowClient, name: str, artifact_location: Optional[str] = None) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = artifact_location or str(Path("mlartifacts").resolve())
    if "://" not in location:
        location = Path(location).resolve().as_uri()
    return client.create_experiment(name, artifact_location=location)


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _params(d: dict) -> list[Param]:
    return [Param(k, str(v)[:6000]) for k, v in flatten(d).items()]


class MlflowTrialLogger(Callback):
    """Tune callback: a nested MLflow run per trial under ``parent_run_id``."""

    def __init__(self, tracking_uri: str, experiment_id: str, parent_run_id: str) -> None:
        self.tracking_uri = tracking_uri
        self.experiment_id = experiment_id
        self.parent_run_id = parent_run_id
        self._client: Optional[MlflowClient] = None
        self.run_ids: dict[str, str] = {}
        self.last_result: dict[str, dict] = {}
        self.status: dict[str, str] = {}

    @property
    def client(self) -> MlflowClient:
        if self._client is None:
            self._client = MlflowClient(self.tracking_uri)
        return self._client

    def __getstate__(self):  # Tune may pickle callbacks for experiment snapshots
        state = dict(self.__dict__)
        state["_client"] = None
        return state

    def _run_for(self, trial) -> str:
        run_id = self.run_ids.get(trial.trial_id)
        if run_id is None:
            config = {k: v for k, v in trial.config.items()}
            family = str(config.get("family", "?"))
            run = self.client.create_run(
                self.experiment_id,
                run_name=f"{family}-{trial.trial_id}",
                tags={"mlflow.parentRunId": self.parent_run_id, "family": family,
                      "trial_id": trial.trial_id, "status": "running"},
            )
            run_id = run.info.run_id
            self.client.log_batch(run_id, params=_params(config))
            self.run_ids[trial.trial_id] = run_id
        return run_id

    def on_trial_start(self, iteration, trials, trial, **info):
        self._run_for(trial)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        run_id = self._run_for(trial)
        step = int(result.get("epoch", result.get("training_iteration", 0)))
        now = int(time.time() * 1000)
        metrics = [Metric(k, float(result[k]), now, step) for k in trial_metric_names(result)]
        if metrics:
            self.client.log_batch(run_id, metrics=metrics)
        self.last_result[trial.trial_id] = dict(result)

    def _finish(self, trial, status: str, run_status: str, error: Optional[str] = None) -> None:
        run_id = self._run_for(trial)
        last = self.last_result.get(trial.trial_id, {})
        tags = [RunTag("status", status)]
        if error:
            tags.append(RunTag("error", error[:4000]))
        final = []
        now = int(time.time() * 1000)
        if "best_val_mae" in last:
            final.append(Metric("final_best_val_mae", float(last["best_val_mae"]), now, 0))
        if "epoch" in last:
            final.append(Metric("epochs_trained", float(last["epoch"]), now, 0))
        self.client.log_batch(run_id, metrics=final, tags=tags)
        self.client.set_terminated(run_id, run_status)
        self.status[trial.trial_id] = status

    def on_trial_complete(self, iteration, trials, trial, **info):
        last = self.last_result.get(trial.trial_id, {})
        status = "completed" if last.get("trial_finished") else "pruned"
        self._finish(trial, status, "FINISHED")

    def on_trial_error(self, iteration, trials, trial, **info):
        error = None
        path = getattr(trial, "error_file", None)
        if path and os.path.exists(path):
            with open(path) as fh:
                error = fh.read()[-4000:]
        self._finish(trial, "failed", "FAILED", error=error)
