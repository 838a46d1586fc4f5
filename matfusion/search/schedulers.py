"""Trial schedulers of the search.

:class:`TabularAwareASHA` is Ray's ASHA (:class:`~ray.tune.schedulers.AsyncHyperBandScheduler`)
for the epoch-trained families, and a pass-through for the tabular ones.  A random forest
trains in one shot and reports once, at iteration 1; left to plain ASHA, that single
(usually good) number would enter the first rung and set the cutoff that 1-epoch GNNs are
compared against, so GNNs would be pruned for not beating a model on another budget axis.
Here tabular trials are never recorded in any rung and never stopped; every other trial is
treated exactly as by ASHA.

On ``Tuner.restore`` Tune re-adds every trial of the experiment to a fresh copy of the
scheduler (Tune does not save scheduler state).  The rungs are rebuilt by replaying each
restored trial's results (its ``result.json``) up to the result Tune restored it at, in the
order ASHA first saw them, so a resumed search keeps pruning against the trials that finished
before the interruption.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Optional

from ray.tune.schedulers import AsyncHyperBandScheduler, TrialScheduler
from ray.tune.stopper import Stopper

from ..config import ONE_SHOT_FAMILIES

log = logging.getLogger("matfusion.search")

# families trained in one shot (no epochs): outside ASHA's rungs (the name is kept for its users)
TABULAR_FAMILIES = frozenset(ONE_SHOT_FAMILIES)

RESULT_FILE = "result.json"


def rung_milestones(max_t: int, grace_period: int, reduction_factor: int) -> list[int]:
    """The epochs at which ASHA (as :func:`~matfusion.search.tuner.build_scheduler` builds it: one
    bracket) compares trials, lowest first, read from a real Ray scheduler so they always match."""
    asha = AsyncHyperBandScheduler(time_attr="training_iteration", metric="m", mode="min", max_t=max_t,
                                   grace_period=grace_period, reduction_factor=reduction_factor)
    return sorted(int(m) for m, _ in asha._brackets[0]._rungs)


def is_tabular(trial, tabular=TABULAR_FAMILIES) -> bool:
    config = getattr(trial, "config", None) or {}
    return str(config.get("family")) in tabular


class TabularAwareASHA(AsyncHyperBandScheduler):
    """ASHA that ignores trials of tabular families (``config["family"]`` in
    :data:`TABULAR_FAMILIES` or in ``tabular_families``): they are never recorded in a rung
    and never stopped."""

    def __init__(self, *args, tabular_families=None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.tabular_families = frozenset(tabular_families or ()) | TABULAR_FAMILIES

    def _tabular(self, trial) -> bool:
        return is_tabular(trial, self.tabular_families)

    # -- the scheduler interface ------------------------------------------------------------

    def on_trial_add(self, tune_controller, trial) -> None:
        if self._tabular(trial):
            return
        super().on_trial_add(tune_controller, trial)
        self._replay(trial)

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        if self._tabular(trial):
            return TrialScheduler.CONTINUE
        return super().on_trial_result(tune_controller, trial, result)

    def on_trial_complete(self, tune_controller, trial, result: dict) -> None:
        if self._tabular(trial):
            return
        if trial.trial_id in self._trial_info:
            super().on_trial_complete(tune_controller, trial, result)

    def on_trial_remove(self, tune_controller, trial) -> None:
        self._trial_info.pop(trial.trial_id, None)

    def on_trial_error(self, tune_controller, trial) -> None:
        self._trial_info.pop(trial.trial_id, None)

    # -- inspection ------------------------------------------------------------------------

    def rungs(self) -> list[dict]:
        """``[{"milestone": m, "recorded": {trial_id: metric}}]`` of every bracket, lowest
        milestone first, metric in its own sign (e.g. a MAE, not its negative)."""
        out = []
        for bracket in self._brackets:
            for milestone, recorded in reversed(bracket._rungs):
                out.append({"milestone": milestone,
                            "recorded": {t: float(v) * self._metric_op for t, v in recorded.items()}})
        return out

    def recorded_trial_ids(self) -> set[str]:
        return {t for rung in self.rungs() for t in rung["recorded"]}

    # -- restore ---------------------------------------------------------------------------

    def _replay(self, trial) -> None:
        """Record the results a restored trial already had (a fresh trial has none)."""
        last = getattr(trial, "last_result", None) or {}
        upto = last.get(self._time_attr)
        if upto is None or not self._metric:
            return
        bracket = self._trial_info[trial.trial_id]
        for result in _result_history(trial):
            t, value = result.get(self._time_attr), result.get(self._metric)
            if t is None or value is None or t > upto:
                continue
            bracket.on_result(trial, t, self._metric_op * value)


class TotalEpochsStopper(Stopper):
    """Stop the whole search once its trials together reported ``max_total_epochs`` results
    (one result = one epoch; a one-shot tabular trial counts one).  The count restarts when a
    search is resumed (Tune does not save stoppers)."""

    def __init__(self, max_total_epochs: int) -> None:
        self.max_total_epochs = int(max_total_epochs)
        self.total = 0

    def __call__(self, trial_id: str, result: dict) -> bool:
        self.total += 1
        return False

    def stop_all(self) -> bool:
        return self.total >= self.max_total_epochs


def _result_history(trial) -> list[dict]:
    path: Optional[str] = None
    # the trial's folder in the experiment (storage) first: the driver staging folder of a
    # restored trial belongs to the new Ray session and is empty
    for attr in ("path", "local_path"):
        try:
            d = getattr(trial, attr)
        except Exception:  # noqa: BLE001 - no storage context (or no Ray session) for it
            d = None
        if d and os.path.isfile(os.path.join(d, RESULT_FILE)):
            path = os.path.join(d, RESULT_FILE)
            break
    if path is None:
        return []
    rows = []
    with open(path) as fh:
        for line in fh:
            line = line.strip()
            if not line:
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut short by the interruption
                log.debug("skipping a partial line of %s", path)
    return rows
