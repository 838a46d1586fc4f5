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

Family-fair rungs (``scope="group"``, ``search.asha_scope: group``, the default): every group
of trials (:func:`matfusion.families.group_of`: ``lgbm``, ``cgcnn-none``, ``cgcnn-early``, ...)
has its own bracket, i.e. its own rungs at the same milestones, and a trial is recorded in and
judged against its own group's rungs only: a GNN's epoch k never meets LightGBM's k-th chunk of
boosting rounds.  ``scope="all"`` is the family-blind ASHA of before (one bracket for every
epoch-trained trial), kept for comparison.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Optional

from ray.tune.schedulers import AsyncHyperBandScheduler, TrialScheduler
from ray.tune.stopper import Stopper

from .. import families
from . import compat

log = logging.getLogger("matfusion.search")

# families trained in one shot (no epochs): outside ASHA's rungs
ONE_SHOT_FAMILIES = frozenset(families.ONE_SHOT)

RESULT_FILE = "result.json"
SCOPES = ("group", "all")
ALL = "all"  # the group label of every trial under scope "all"


def rung_milestones(max_t: int, grace_period: int, reduction_factor: int) -> list[int]:
    """The epochs at which ASHA (as :func:`~matfusion.search.tuner.build_scheduler` builds it: one
    bracket) compares trials, lowest first, read from a real Ray scheduler so they always match."""
    asha = AsyncHyperBandScheduler(
        time_attr="training_iteration",
        metric="m",
        mode="min",
        max_t=max_t,
        grace_period=grace_period,
        reduction_factor=reduction_factor,
    )
    return sorted(int(m) for m, _ in compat.bracket_rungs(compat.asha_brackets(asha)[0]))


def is_tabular(trial, tabular=ONE_SHOT_FAMILIES) -> bool:
    config = getattr(trial, "config", None) or {}
    return str(config.get("family")) in tabular


class TabularAwareASHA(AsyncHyperBandScheduler):
    """ASHA that ignores trials of tabular families (``config["family"]`` in
    :data:`ONE_SHOT_FAMILIES` or in ``tabular_families``): they are never recorded in a rung
    and never stopped.

    ``scope="group"``: each group of trials (``families.group_of(trial.config)``) gets its own
    bracket (rungs at the scheduler's milestones), made when the group's first trial is added;
    a trial is recorded in and judged against its group's rungs only.  ``scope="all"`` (the
    class's default, as before): one set of rungs for every epoch-trained trial."""

    def __init__(self, *args, tabular_families=None, scope: str = ALL, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if scope not in SCOPES:
            raise ValueError(f"ASHA scope {scope!r} not allowed; allowed: {', '.join(SCOPES)}")
        self.tabular_families = frozenset(tabular_families or ()) | ONE_SHOT_FAMILIES
        self.scope = scope
        self._groups: dict = {}  # group -> its bracket (scope "group"), in the order groups appeared

    def __setstate__(self, state: dict) -> None:  # a scheduler pickled before scopes existed
        state.setdefault("scope", ALL)
        state.setdefault("_groups", {})
        self.__dict__.update(state)

    def _tabular(self, trial) -> bool:
        return is_tabular(trial, self.tabular_families)

    def group(self, trial) -> str:
        """The rungs a trial is judged in: its group (scope ``group``) or ``all``."""
        if self.scope == ALL:
            return ALL
        config = getattr(trial, "config", None) or {}
        try:
            return families.group_of(config)
        except families.UnknownFamilyError:  # a family outside the registry: its own group
            return str(config.get("family"))

    def group_brackets(self) -> list[tuple[str, object]]:
        """``[(group, bracket)]``: each group's own bracket (scope ``group``, in the order the
        groups appeared), or ``[("all", bracket), ...]`` for Ray's brackets (scope ``all``)."""
        if self.scope == ALL:
            return [(ALL, b) for b in compat.asha_brackets(self)]
        return list(self._groups.items())

    # -- the scheduler interface ------------------------------------------------------------

    def on_trial_add(self, tune_controller, trial) -> None:
        if self._tabular(trial):
            return
        super().on_trial_add(tune_controller, trial)
        if self.scope != ALL:
            group = self.group(trial)
            if group not in self._groups:
                self._groups[group] = compat.empty_bracket_like(compat.asha_brackets(self)[0])
            compat.assign_trial_bracket(self, trial.trial_id, self._groups[group])
        self._replay(trial)

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        if self._tabular(trial):
            return TrialScheduler.CONTINUE
        return super().on_trial_result(tune_controller, trial, result)

    def on_trial_complete(self, tune_controller, trial, result: dict) -> None:
        if self._tabular(trial):
            return
        if compat.trial_bracket(self, trial.trial_id) is not None:
            super().on_trial_complete(tune_controller, trial, result)

    def on_trial_remove(self, tune_controller, trial) -> None:
        compat.forget_trial(self, trial.trial_id)

    def on_trial_error(self, tune_controller, trial) -> None:
        compat.forget_trial(self, trial.trial_id)

    # -- inspection ------------------------------------------------------------------------

    def rungs(self) -> list[dict]:
        """``[{"group": g, "milestone": m, "recorded": {trial_id: metric}}]`` of every bracket
        (group ``all`` under scope ``all``), group by group, lowest milestone first, metric in its
        own sign (e.g. a MAE, not its negative)."""
        out, op = [], compat.asha_metric_op(self)
        for group, bracket in self.group_brackets():
            for milestone, recorded in reversed(compat.bracket_rungs(bracket)):
                out.append(
                    {
                        "group": group,
                        "milestone": milestone,
                        "recorded": {t: float(v) * op for t, v in recorded.items()},
                    }
                )
        return out

    def recorded_trial_ids(self) -> set[str]:
        return {t for rung in self.rungs() for t in rung["recorded"]}

    # -- restore ---------------------------------------------------------------------------

    def _replay(self, trial) -> None:
        """Record the results a restored trial already had (a fresh trial has none)."""
        last = getattr(trial, "last_result", None) or {}
        time_attr, metric = compat.asha_time_attr(self), self.metric
        upto = last.get(time_attr)
        if upto is None or not metric:
            return
        bracket, op = compat.trial_bracket(self, trial.trial_id), compat.asha_metric_op(self)
        for result in _result_history(trial):
            t, value = result.get(time_attr), result.get(metric)
            if t is None or value is None or t > upto:
                continue
            compat.bracket_record(bracket, trial, t, op * value)


class PromotingASHA(TabularAwareASHA):
    """ASHA with the promotion rule of its paper (Li et al., 2020) instead of Ray's stopping rule.

    Ray's ASHA lets a trial go on from a rung unless it falls below the best
    ``1/reduction_factor`` of the results the rung holds so far, so a trial that reaches a rung
    first (the first, start-up trials of a search) goes on unopposed to ``max_t``.  Here a trial
    at rung ``m`` goes on only if it is among the best ``floor(n / reduction_factor)`` of the ``n``
    results rung ``m`` holds (itself included) and was not sent on from it before; otherwise it
    is PAUSED (Tune keeps its checkpoint: the trainable checkpoints at the rungs) and waits.
    Whenever a slot frees up, a waiting trial that has become promotable is resumed first
    (highest rung first), then a new trial starts.  Once the searcher has no more trials and
    nothing runs, each rung sends on its best ``ceil(n / reduction_factor)`` (so a small search
    still trains its best trials to ``max_t``), and the trials still waiting then end (pruned).

    Per group (``scope="group"``): a rung is its group's rung, so a trial waits for, and is
    promoted against, trials of its own group only; a paused trial is remembered with its group
    and only its group's promotion resumes it; "nothing runs" at the end of the search means
    nothing of that group runs (a group may finish its rungs while another group still trains).

    ``on_pause(trial_id, result)`` and ``on_resume(trial_id)`` tell the searcher (see
    :class:`~matfusion.search.optuna_search.PauseAwareLimiter`) that a trial gave up or took
    back its slot.  Tabular one-shot trials are outside the rungs, as in :class:`TabularAwareASHA`.
    """

    def __init__(self, *args, on_pause=None, on_resume=None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.listen(on_pause, on_resume)
        self._promoted: set[tuple[str, float]] = set()  # (trial_id, milestone) already sent on
        self._waiting: dict[str, tuple[str, float]] = {}  # trial_id -> (its group, the milestone it waits at)

    def listen(self, on_pause=None, on_resume=None) -> None:
        """Tell ``on_pause(trial_id, result)`` / ``on_resume(trial_id)`` of every pause and resume
        from now on (e.g. the searcher a restored Tuner runs with: the one pickled with this
        scheduler is another copy)."""
        self._on_pause, self._on_resume = on_pause, on_resume

    def waiting(self) -> dict[str, tuple[str, float]]:
        """trial_id -> (group, milestone) of the trials this scheduler paused and has not resumed."""
        return dict(self._waiting)

    def promotable(self, milestone: float, recorded: dict, final: bool = False) -> list[str]:
        """Trials of a rung that may go on, best first: its best ``n // reduction_factor``
        (``ceil`` when ``final``), less those already sent on from it."""
        n, rf = len(recorded), compat.asha_reduction_factor(self)
        k = int(-(-n // rf)) if final else int(n // rf)
        best = sorted(recorded, key=lambda t: recorded[t], reverse=True)[:k]  # values are metric_op * metric
        return [t for t in best if (t, milestone) not in self._promoted]

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        time_attr, metric = compat.asha_time_attr(self), self.metric
        if self._tabular(trial) or time_attr not in result or metric not in result:
            return TrialScheduler.CONTINUE
        t = result[time_attr]
        if t >= compat.asha_max_t(self):
            return TrialScheduler.STOP
        bracket = compat.trial_bracket(self, trial.trial_id)  # its group's (scope group)
        if bracket is None:
            return TrialScheduler.CONTINUE
        for milestone, recorded in compat.bracket_rungs(bracket):  # highest milestone first
            if t < milestone or trial.trial_id in recorded:
                continue
            recorded[trial.trial_id] = compat.asha_metric_op(self) * result[metric]
            if trial.trial_id in self.promotable(milestone, recorded):
                self._promoted.add((trial.trial_id, milestone))
                return TrialScheduler.CONTINUE
            self._waiting[trial.trial_id] = (self.group(trial), milestone)
            if self._on_pause is not None:
                self._on_pause(trial.trial_id, result)
            return TrialScheduler.PAUSE
        return TrialScheduler.CONTINUE

    def _group_rungs(self, groups=None) -> list[tuple[float, str, dict]]:
        """``(milestone, group, recorded)`` of the rungs of ``groups`` (default: all), highest
        milestone first (groups in the order they appeared at equal milestones)."""
        rungs = [
            (milestone, group, recorded)
            for group, bracket in self.group_brackets()
            if groups is None or group in groups
            for milestone, recorded in compat.bracket_rungs(bracket)
        ]
        return sorted(rungs, key=lambda r: -r[0])  # stable: group order kept at equal milestones

    def _promotion(self, paused: dict, final: bool = False, groups=None):
        """The paused trial to resume: the best promotable of the highest rung that has one;
        a rung of group g resumes only trials that g paused."""
        for milestone, group, recorded in self._group_rungs(groups):
            mine = {tid: t for tid, t in paused.items() if self._waiting.get(tid) == (group, milestone)}
            for trial_id in self.promotable(milestone, recorded, final):
                if trial_id in mine:
                    self._promoted.add((trial_id, milestone))
                    del self._waiting[trial_id]
                    if self._on_resume is not None:
                        self._on_resume(trial_id)
                    return mine[trial_id]
        return None

    def choose_trial_to_run(self, tune_controller):
        from ray.tune.experiment import Trial

        trials = tune_controller.get_trials()
        for t in trials:  # paused, but not by this scheduler (e.g. restored from a snapshot): it goes on
            if t.status == Trial.PAUSED and t.trial_id not in self._waiting:
                if self._on_resume is not None:
                    self._on_resume(t.trial_id)
                return t
        paused = {t.trial_id: t for t in trials if t.status == Trial.PAUSED and t.trial_id in self._waiting}
        trial = self._promotion(paused)
        if trial is not None:
            return trial
        for t in trials:
            if t.status == Trial.PENDING:
                return t
        search_alg = getattr(tune_controller, "search_alg", None)
        if not paused or (search_alg is not None and not search_alg.is_finished()):
            return None
        # no more trials to come: a group none of whose trials runs (scope all: nothing runs)
        # finishes its rungs, then ends its waiting trials
        running = {self.group(t) for t in trials if t.status == Trial.RUNNING and not self._tabular(t)}
        if self.scope == ALL and any(t.status == Trial.RUNNING for t in trials):
            running.add(ALL)
        idle = [g for g, _ in self.group_brackets() if g not in running]
        if not idle:
            return None
        trial = self._promotion(paused, final=True, groups=idle)
        if trial is None:
            # Tune re-snapshots only the trials it marks; one stopped while PAUSED is not, so the
            # experiment would keep it as PAUSED (a resume would run it on): mark it here
            for t in paused.values():
                if self._waiting.get(t.trial_id, (None,))[0] not in idle:
                    continue
                self._waiting.pop(t.trial_id, None)
                tune_controller.stop_trial(t)
                compat.mark_trial_to_checkpoint(tune_controller, t)
        return trial

    def on_trial_complete(self, tune_controller, trial, result: dict) -> None:
        self._waiting.pop(trial.trial_id, None)
        super().on_trial_complete(tune_controller, trial, result)

    def on_trial_remove(self, tune_controller, trial) -> None:
        self._waiting.pop(trial.trial_id, None)
        super().on_trial_remove(tune_controller, trial)

    def on_trial_error(self, tune_controller, trial) -> None:
        self._waiting.pop(trial.trial_id, None)
        super().on_trial_error(tune_controller, trial)


class TotalEpochsStopper(Stopper):
    """Stop the whole search once its trials together reported ``max_total_epochs`` results
    (one result = one epoch; a one-shot tabular trial counts one).  Tune hands a stopper the
    last result of a finished trial a second time (its "duplicate" end-of-trial result), so a
    trial's results count once per ``training_iteration``.  The count restarts when a search
    is resumed (Tune does not save stoppers)."""

    def __init__(self, max_total_epochs: int) -> None:
        self.max_total_epochs = int(max_total_epochs)
        self.total = 0
        self._last: dict[str, int] = {}  # trial_id -> the last training_iteration counted

    def __call__(self, trial_id: str, result: dict) -> bool:
        iteration = result.get("training_iteration")
        if iteration is None:
            self.total += 1
        elif iteration > self._last.get(trial_id, 0):
            self._last[trial_id] = iteration
            self.total += 1
        return False

    def stop_all(self) -> bool:
        return self.total >= self.max_total_epochs


class TargetReachedStopper(Stopper):
    """Stop the whole search as soon as any trial reports ``metric`` at or below ``target``."""

    def __init__(self, target: float, metric: str = "val_mae") -> None:
        self.target, self.metric = float(target), metric
        self.reached = False

    def __call__(self, trial_id: str, result: dict) -> bool:
        value = result.get(self.metric)
        if value is not None and value <= self.target:
            self.reached = True
        return False

    def stop_all(self) -> bool:
        return self.reached


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
