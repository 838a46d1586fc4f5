"""MLflow logging of a search: one parent run per search, one nested run per trial.

Everything is written from the driver process (a Tune ``Callback``), so a sqlite store has a
single writer.  Trial runs carry the params of the trial, every per-epoch metric (step =
epoch), tags ``family`` and ``trial_id``, and a final ``status`` tag: ``completed`` (ran to its
last epoch or stopped early on its own), ``pruned`` (stopped by ASHA), ``failed`` (with an
``error`` tag), ``stopped`` (cut by the search's time or epoch budget) or ``interrupted`` (the
search was interrupted; ``matfusion search --resume`` continues it).

Resuming a search (``Tuner.restore``) replays some of this: Tune starts unfinished trials again
(``on_trial_start``) and re-reports the epochs after their last checkpoint.  So a trial's run is
looked up by its tags (``trial_id`` under the parent run) before one is created, a run that was
closed by the interruption is reopened, and a (metric, step) already logged is never logged
twice.

A tracking server that stops answering for a while loses nothing: the writes wait in memory, in
order, and are sent when it answers again (:mod:`matfusion.tracking.outbox`); one that is still
down when the trials have ended leaves :attr:`MlflowTrialLogger.unsent_line`, which the search
prints (:func:`matfusion.search.faults.result_without_tracking`).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient
from ray.tune import Callback

from .. import families
from . import outbox as outbox_settings
from .outbox import Outbox, Write, unreachable
from .runs import find_trial_run, nested_runs
from .ui import experiment_tags, missing_experiment_tags

DEFAULT_TRACKING_URI = "sqlite:///mlruns.db"
TRIAL_METRICS = ("val_mae", "train_loss", "best_val_mae", "lr")
TRIAL_METRIC_PREFIXES = (
    "val_mae_",
    "task_weight_",
    "late_alpha",
    "attention_graph",
    "residual_base_val_mae",
    "residual_beta",
)


def trial_metric_names(result: dict) -> list[str]:
    return [
        k
        for k, v in result.items()
        if (k in TRIAL_METRICS or k.startswith(TRIAL_METRIC_PREFIXES))
        and isinstance(v, (int, float))
        and not isinstance(v, bool)
    ]


def resolve_tracking_uri(uri: Optional[str] = None) -> str:
    """Config value, else ``$MLFLOW_TRACKING_URI``, else a sqlite file in the working directory
    (made absolute so that every process agrees on it)."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + str(Path(uri[len("sqlite:///") :]).resolve())
    return uri


def ensure_experiment(client: MlflowClient, name: str, artifact_location: Optional[str] = None) -> str:
    """The id of the experiment ``name``, created when it does not exist, with the tags of
    :func:`matfusion.tracking.ui.experiment_tags` (a model-training experiment, so that the MLflow
    UI opens it on its runs, and the "Leaderboard" view of its runs table); an existing one gets
    those it lacks."""
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        for key, value in missing_experiment_tags(exp.tags or {}).items():
            client.set_experiment_tag(exp.experiment_id, key, value)
        return exp.experiment_id
    tags = experiment_tags()
    if artifact_location is None and client.tracking_uri.startswith(("http://", "https://")):
        # a tracking server (e.g. `matfusion mlflow-server`) stores the artifacts itself (proxied)
        return client.create_experiment(name, tags=tags)
    location = artifact_location or str(Path("mlartifacts").resolve())
    if "://" not in location:
        location = Path(location).resolve().as_uri()
    return client.create_experiment(name, artifact_location=location, tags=tags)


def trial_number(trial) -> Optional[int]:
    """The 1-based number of a Tune trial in its search (the searcher's counter, which Tune keeps
    at the head of the trial's ``experiment_tag``), or None."""
    head = str(getattr(trial, "experiment_tag", "") or "").split("_", 1)[0]
    return int(head) if head.isdigit() else None


def trial_run_name(trial) -> str:
    """The run name of a trial: its number, family and fusion (``t03 cgcnn-early``, ``t01 rf``)."""
    config = dict(trial.config or {})
    family = str(config.get("family", "?"))
    fusion = trial_fusion(config)
    label = family if fusion == "-" else f"{family}-{fusion}"
    number = trial_number(trial)
    return f"t{number:02d} {label}" if number is not None else f"{label} {trial.trial_id}"


def trial_fusion(config: dict) -> str:
    """The fusion column of a trial (``-`` for a tabular family, else :func:`families.fusion_of`);
    ``config`` is a trial config, or a flat row with ``family`` and ``fusion``."""
    if config.get("family") not in families.GRAPH:
        return "-"
    return families.fusion_of(config)


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


def close_open_trial_runs(
    client: MlflowClient, experiment_id: str, parent_run_id: str, status: str, run_status: str = "FINISHED"
) -> list[str]:
    """Tag every nested run still RUNNING with ``status`` and terminate it; returns their trial ids."""
    closed = []
    for run in nested_runs(client, experiment_id, parent_run_id, "attributes.status = 'RUNNING'"):
        run_id = run.info.run_id
        steps = [m.step for m in client.get_metric_history(run_id, "val_mae")]
        final, now = [], int(time.time() * 1000)
        done = {m.step for m in client.get_metric_history(run_id, "epochs_trained")}
        if steps and max(steps) not in done:
            final.append(Metric("epochs_trained", float(max(steps)), now, max(steps)))
            if "best_val_mae" in run.data.metrics:
                final.append(Metric("final_best_val_mae", run.data.metrics["best_val_mae"], now, max(steps)))
        client.log_batch(run_id, metrics=final, tags=[RunTag("status", status)])
        client.set_terminated(run_id, run_status)
        closed.append(run.data.tags.get("trial_id", run.info.run_id))
    return closed


@dataclass
class _TrialInfo:
    """What the logger keeps of a Tune trial to write its run later (its Trial object changes)."""

    trial_id: str
    config: dict
    run_name: str
    number: Optional[int]


class MlflowTrialLogger(Callback):
    """Tune callback: a nested MLflow run per trial under ``parent_run_id``.

    Every write goes through an :class:`~matfusion.tracking.outbox.Outbox`: when the tracking
    server stops answering, the writes wait in memory, in order, and are sent when it answers
    again (at a later write, and at the experiment's end, :meth:`on_experiment_end`, which waits
    up to ``end_grace_s``, default :data:`matfusion.tracking.outbox.END_GRACE_S`); what still
    waits then is :attr:`unsent_line`."""

    def __init__(
        self, tracking_uri: str, experiment_id: str, parent_run_id: str, end_grace_s: Optional[float] = None
    ) -> None:
        self.tracking_uri = tracking_uri
        self.experiment_id = experiment_id
        self.parent_run_id = parent_run_id
        self.end_grace_s = end_grace_s
        self._client: Optional[MlflowClient] = None
        self._outbox: Optional[Outbox] = None
        self.run_ids: dict[str, str] = {}
        # trial_id -> metric -> steps already in MLflow (so that re-reported epochs are skipped)
        self.logged_steps: dict[str, dict[str, set]] = {}
        self.last_result: dict[str, dict] = {}
        self.status: dict[str, str] = {}
        # trial_id -> Tune status when the experiment ended (None until it ends)
        self.final_statuses: Optional[dict[str, str]] = None
        self.unsent_line = ""  # after the experiment's end: what the server never got ("" for nothing)
        self._opened: set = set()  # trials whose run this process has asked for
        self._created: set = set()  # trials whose params and config this process sends (a new run, or one without)

    @property
    def client(self) -> MlflowClient:
        if self._client is None:
            self._client = MlflowClient(self.tracking_uri)
        return self._client

    @property
    def outbox(self) -> Outbox:
        if self._outbox is None:
            self._outbox = Outbox(self.tracking_uri)
        return self._outbox

    def __getstate__(self):  # Tune pickles callbacks into tuner.pkl
        state = dict(self.__dict__)
        state["_client"] = None
        state["_outbox"] = None  # its writes hold closures; a restored search looks its runs up again
        state["_opened"], state["_created"] = set(), set()
        return state

    # Tune saves this with every experiment snapshot and hands it back on restore.  It is a
    # cache only: a trial not in it is looked up in MLflow anyway.
    def get_state(self) -> Optional[dict]:
        return {"run_ids": dict(self.run_ids)} if self.run_ids else None

    def set_state(self, state: dict) -> None:
        self.run_ids.update((state or {}).get("run_ids", {}))

    # -- runs ------------------------------------------------------------------------------

    def _adopt(self, trial_id: str, run) -> str:
        """Take over an existing run of the trial: know its logged steps, reopen it if the
        interruption (or an earlier failure of the trial) closed it."""
        run_id = run.info.run_id
        steps: dict[str, set] = {}
        for key in run.data.metrics:
            steps[key] = {m.step for m in self.client.get_metric_history(run_id, key)}
        self.logged_steps[trial_id] = steps
        if run.info.status != "RUNNING":
            self.client.update_run(run_id, status="RUNNING")
        if run.data.tags.get("status") != "running":
            self.client.set_tag(run_id, "status", "running")
        if "error" in run.data.tags:
            self.client.delete_tag(run_id, "error")
        self.client.set_tag(run_id, "resumed", str(int(run.data.tags.get("resumed", "0")) + 1))
        return run_id

    def _open_run(self, info: _TrialInfo) -> None:
        """The trial's run: the one it has from before a resume (by the snapshot's run id, else
        by its tags), else a new one (its params and config follow as writes of their own)."""
        trial_id = info.trial_id
        run_id = self.run_ids.get(trial_id)
        run = None
        if run_id is not None:
            try:
                run = self.client.get_run(run_id)
            except Exception as err:  # state from a snapshot naming a run that is gone
                if unreachable(err):
                    raise
                run = None
        if run is None:
            run = find_trial_run(self.client, self.experiment_id, self.parent_run_id, trial_id)
        if run is not None:
            run_id = self._adopt(trial_id, run)
            # a run whose params or config never arrived (the answer to its create lost in an
            # outage, or a driver that ended while they waited) gets them now
            if not run.data.params or not self._has_config(run_id):
                self._created.add(trial_id)
        else:
            config = info.config
            family = str(config.get("family", "?"))
            run_id = self.client.create_run(
                self.experiment_id,
                run_name=info.run_name,
                tags={
                    "mlflow.parentRunId": self.parent_run_id,
                    "family": family,
                    "encoder": family if family in families.GRAPH else "-",
                    "fusion": trial_fusion(config),
                    "trial_id": trial_id,
                    "trial_number": str(info.number or ""),
                    "status": "running",
                },
            ).info.run_id
            self.logged_steps[trial_id] = {}
            self._created.add(trial_id)
        self.run_ids[trial_id] = run_id

    def _has_config(self, run_id: str) -> bool:
        """Whether the run has its ``trial_config.json`` (True when its artifacts cannot be listed:
        left as they are)."""
        try:
            return "trial_config.json" in {a.path for a in self.client.list_artifacts(run_id)}
        except Exception as err:  # noqa: BLE001 - an artifact store this process cannot read
            if unreachable(err):
                raise
            return True

    def _ask_for_run(self, trial) -> str:
        """Queue the trial's run (once per trial and process), its params and config; its label."""
        label = trial_run_name(trial)
        trial_id = trial.trial_id
        if trial_id in self._opened:
            return label
        self._opened.add(trial_id)
        info = _TrialInfo(trial_id, dict(trial.config or {}), label, trial_number(trial))
        params = _params(info.config)

        def log_params() -> None:
            if trial_id in self._created:
                self.client.log_batch(self.run_ids[trial_id], params=params)

        def log_config() -> None:
            if trial_id in self._created:  # exact types, for ensembles
                self.client.log_dict(self.run_ids[trial_id], info.config, "trial_config.json")

        self.outbox.put(Write(label, {"runs": 1}, lambda: self._open_run(info)))
        self.outbox.put(Write(label, {"params": len(params)}, log_params))
        self.outbox.put(Write(label, {"artifacts": 1}, log_config))
        return label

    # -- Tune hooks ------------------------------------------------------------------------

    def on_trial_start(self, iteration, trials, trial, **info):
        self._ask_for_run(trial)

    def _new_metrics(self, trial_id: str, values: dict, step: int) -> list[Metric]:
        """The metrics of ``values`` at ``step`` (those the run already has are left out when
        they are sent: :meth:`_send_metrics`)."""
        now = int(time.time() * 1000)
        return [Metric(k, float(v), now, step) for k, v in values.items()]

    def _send_metrics(self, trial_id: str, metrics: list[Metric], tags: Optional[list] = None) -> None:
        """Log the metrics the run has not got yet (a resumed trial re-reports the epochs after
        its checkpoint), and ``tags``; their steps count as logged once the server took them."""
        steps = self.logged_steps.setdefault(trial_id, {})
        new = [m for m in metrics if m.step not in steps.get(m.key, ())]
        if new or tags:
            self.client.log_batch(self.run_ids[trial_id], metrics=new, tags=list(tags or []))
        for m in new:
            steps.setdefault(m.key, set()).add(m.step)

    def _last(self, trial) -> dict:
        # after a restore, a trial may finish before reporting anything in this process
        return self.last_result.get(trial.trial_id) or dict(getattr(trial, "last_result", None) or {})

    def on_trial_result(self, iteration, trials, trial, result, **info):
        label = self._ask_for_run(trial)
        step = int(result.get("epoch", result.get("training_iteration", 0)))
        trial_id = trial.trial_id
        metrics = self._new_metrics(trial_id, {k: result[k] for k in trial_metric_names(result)}, step)
        if metrics:
            self.outbox.put(Write(label, {"metrics": len(metrics)}, lambda: self._send_metrics(trial_id, metrics)))
        self.last_result[trial_id] = dict(result)

    def _finish(self, trial, status: str, run_status: str, error: Optional[str] = None) -> None:
        label = self._ask_for_run(trial)
        trial_id = trial.trial_id
        last = self._last(trial)
        tags = [RunTag("status", status)]
        if error:
            tags.append(RunTag("error", error[:4000]))
        final = {}
        if "best_val_mae" in last:
            final["final_best_val_mae"] = last["best_val_mae"]
        if "epoch" in last:
            final["epochs_trained"] = last["epoch"]
        metrics = self._new_metrics(trial_id, final, int(last.get("epoch", 0) or 0))
        self.outbox.put(
            Write(
                label,
                {"metrics": len(metrics), "tags": len(tags)},
                lambda: self._send_metrics(trial_id, metrics, tags),
            )
        )
        self.outbox.put(
            Write(label, {"run ends": 1}, lambda: self.client.set_terminated(self.run_ids[trial_id], run_status))
        )
        self.status[trial_id] = status

    def on_trial_complete(self, iteration, trials, trial, **info):
        last = self._last(trial)
        status = "completed" if last.get("trial_finished") else "pruned"
        self._finish(trial, status, "FINISHED")

    def on_experiment_end(self, trials, **info):
        # Tune's last snapshot may still hold a trial stopped while PAUSED (no actor) as PAUSED
        self.final_statuses = {t.trial_id: t.status for t in trials}
        grace = outbox_settings.END_GRACE_S if self.end_grace_s is None else self.end_grace_s
        if self._outbox is not None and not self._outbox.drain(grace):
            self.unsent_line = self._outbox.unsent_line()

    def on_trial_error(self, iteration, trials, trial, **info):
        error = None
        path = getattr(trial, "error_file", None)
        if path and os.path.exists(path):
            with open(path) as fh:
                error = fh.read()[-4000:]
        self._finish(trial, "failed", "FAILED", error=error)
