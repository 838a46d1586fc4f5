"""Ray Tune's OptunaSearch that tells Optuna which trials ASHA cut short.

Ray's ``OptunaSearch`` reports every epoch to the Optuna trial (``trial.report(score, step)``)
but ends every trial as COMPLETE with its last score, so TPE ranks a model stopped after one
epoch against models trained for forty by the raw number.  Here a trial that ended before its
own last epoch (``trial_finished`` false in its last result: stopped by ASHA at a rung, or cut by
the search's time or epoch budget) is told to Optuna as PRUNED.  TPE then splits its trials the
way Optuna's own pruners intend: finished trials by score first, then pruned trials by how far
they got (the step of their last report) and by their score there.  Trials that finished
(all epochs, early stopping by patience, one-shot tabular models) stay COMPLETE.  A trial told
PRUNED at a pause (``search.asha_mode: promote``) that later runs to its end is added again as a
COMPLETE trial with its final score.

:class:`GroupShareRule` and :class:`SharedBudgetOptunaSearch` are the budget rule
``search.budget_rule: share``: after the round robin, the group of each new trial is the one that
has used the least training time among the groups still in contention, and TPE picks only its
parameters.
"""

from __future__ import annotations

import statistics
from typing import Optional, Sequence

from optuna.trial import TrialState, create_trial
from ray.tune.search import ConcurrencyLimiter
from ray.tune.search.optuna import OptunaSearch

from .. import families
from . import compat


def cut_short(result: Optional[dict]) -> bool:
    """True when the trial's last result says it did not run to its own end."""
    return bool(result) and "trial_finished" in result and not result["trial_finished"]


class PrunedAwareOptunaSearch(OptunaSearch):
    """OptunaSearch whose trials stopped by the scheduler (or the budget) end PRUNED in Optuna."""

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if trial_id in compat.completed_trial_ids(self):  # resumed after a pause: Optuna has its record
            return
        super().on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: Optional[dict] = None, error: bool = False) -> None:
        ot_trial = compat.optuna_trial_of(self, trial_id)
        if ot_trial is not None and trial_id in compat.completed_trial_ids(self):
            self._finished_after_pause(ot_trial, result, error)
            return
        if error or ot_trial is None or not cut_short(result):
            return super().on_trial_complete(trial_id, result, error)
        # its intermediate scores are already in Optuna (on_trial_result); TPE reads the last one
        compat.optuna_study(self).tell(ot_trial, state=TrialState.PRUNED)
        compat.mark_completed(self, trial_id)

    def _finished_after_pause(self, ot_trial, result: Optional[dict], error: bool) -> None:
        """A trial told PRUNED when it was paused at a rung, then resumed, ran to its end: Optuna
        cannot change a finished trial, so TPE gets a COMPLETE copy with the final score."""
        if error or not result or cut_short(result) or result.get(self.metric) is None:
            return
        study = compat.optuna_study(self)
        frozen = study.get_trials(deepcopy=False)[ot_trial.number]
        study.add_trial(
            create_trial(
                params=frozen.params,
                distributions=frozen.distributions,
                value=float(result[self.metric]),
                state=TrialState.COMPLETE,
            )
        )


class PauseAwareLimiter(ConcurrencyLimiter):
    """ConcurrencyLimiter in which a trial paused by the scheduler does not hold a slot.

    :class:`~matfusion.search.schedulers.PromotingASHA` calls :meth:`pause` when it pauses a trial
    (the searcher hears of it as a trial cut short at a rung, and a new trial may start) and
    :meth:`resume` when the trial takes a slot again."""

    def pause(self, trial_id: str, result: Optional[dict]) -> None:
        self.on_trial_complete(trial_id, result=result)

    def resume(self, trial_id: str) -> None:
        compat.limiter_take_slot(self, trial_id)


class GroupShareRule:
    """Which group the next trial goes to under ``search.budget_rule: share``.

    Every group of the space gets an equal share of the training time.  A group's time is the
    sum over its trials of ``time_total_s`` (their last report); a trial still running counts at
    least the median time of its group's ended trials (so that trials started at once do not all
    go to the group that was last to have little time).  The groups in contention are those whose
    best *finished* trial (one that ran to its own end: a GNN stopped at a rung is judged by
    nothing) has a score at most ``(1 + margin)`` times the best group's; a group without a
    finished trial stays in.  :meth:`choose` gives the group in contention with the least time,
    the first in the space's order on a tie."""

    def __init__(self, groups: Sequence[str], margin: float = 0.25) -> None:
        if not groups:
            raise ValueError("GroupShareRule: no groups")
        self.groups = list(groups)
        self.margin = float(margin)
        self.group_of: dict[str, str] = {}
        self.time: dict[str, float] = {}
        self.running: set[str] = set()
        self.finished_best: dict[str, float] = {}
        self.choices: list[tuple[str, str, dict]] = []  # (trial_id, group, the group times it saw)

    def started(self, trial_id: str, group: str) -> None:
        if group not in self.groups:
            self.groups.append(group)
        self.group_of[trial_id] = group
        self.time.setdefault(trial_id, 0.0)
        self.running.add(trial_id)

    def reported(self, trial_id: str, result: Optional[dict]) -> None:
        if trial_id in self.group_of and result and result.get("time_total_s") is not None:
            self.time[trial_id] = max(self.time.get(trial_id, 0.0), float(result["time_total_s"]))

    def ended(self, trial_id: str, result: Optional[dict], score: Optional[float]) -> None:
        self.reported(trial_id, result)
        self.running.discard(trial_id)
        group = self.group_of.get(trial_id)
        if group is None or score is None or cut_short(result) or not score == score:  # NaN: nothing to rank
            return
        self.finished_best[group] = min(self.finished_best.get(group, float("inf")), float(score))

    def resumed(self, trial_id: str) -> None:
        if trial_id in self.group_of:
            self.running.add(trial_id)

    def group_times(self) -> dict[str, float]:
        ended: dict[str, list[float]] = {}
        for t, g in self.group_of.items():
            if t not in self.running:
                ended.setdefault(g, []).append(self.time[t])
        out = {g: 0.0 for g in self.groups}
        for t, g in self.group_of.items():
            used = self.time[t]
            if t in self.running and ended.get(g):
                used = max(used, statistics.median(ended[g]))
            out[g] += used
        return out

    def contenders(self) -> list[str]:
        if not self.finished_best:
            return list(self.groups)
        best = min(self.finished_best.values())
        limit = best * (1 + self.margin) if best >= 0 else best * (1 - self.margin)
        return [g for g in self.groups if self.finished_best.get(g, -float("inf")) <= limit]

    def summary(self) -> dict:
        """What the rule saw and did, as JSON: the margin, each group's training time and best
        finished score, the groups in contention now, and every choice with the times it saw."""
        return {
            "rule": "share",
            "margin": self.margin,
            "group_time_s": self.group_times(),
            "finished_best": dict(self.finished_best),
            "contenders": self.contenders(),
            "trials": {t: {"group": g, "time_s": self.time[t]} for t, g in self.group_of.items()},
            "choices": [{"trial_id": t, "group": g, "times": times} for t, g, times in self.choices],
        }

    def choose(self, trial_id: str = "") -> str:
        times = self.group_times()
        group = min(self.contenders(), key=lambda g: (times[g], self.groups.index(g)))
        self.choices.append((trial_id, group, times))
        return group


class SharedBudgetOptunaSearch(PrunedAwareOptunaSearch):
    """:class:`PrunedAwareOptunaSearch` under ``search.budget_rule: share``: once Optuna's queue of
    starting points (the round robin over the groups, then the known-good points left) is used up,
    each new trial is enqueued with the partial point of the group :class:`GroupShareRule` chooses,
    so TPE picks only the parameters within that group.  ``group_points``: ``[(group, partial
    point)]`` (:meth:`~matfusion.spaces.SearchSpace.groups`)."""

    def __init__(self, *args, group_points: Sequence[tuple[str, dict]] = (), share_margin: float = 0.25, **kwargs):
        super().__init__(*args, **kwargs)
        self.group_points = {g: dict(p) for g, p in group_points}
        self.rule = GroupShareRule(list(self.group_points), share_margin)

    def suggest(self, trial_id: str) -> Optional[dict]:
        study = compat.optuna_study(self)
        if study is not None and not study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
            if compat.optuna_trial_of(self, trial_id) is None:
                study.enqueue_trial(self.group_points[self.rule.choose(trial_id)])
        config = super().suggest(trial_id)
        if config is not None:
            self.rule.started(trial_id, families.group_of(config))
        return config

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        self.rule.reported(trial_id, result)
        if trial_id in compat.completed_trial_ids(self):  # resumed after a pause
            self.rule.resumed(trial_id)
        super().on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: Optional[dict] = None, error: bool = False) -> None:
        score = None if error or not result else result.get(self.metric)
        self.rule.ended(trial_id, result, score)
        super().on_trial_complete(trial_id, result, error)
