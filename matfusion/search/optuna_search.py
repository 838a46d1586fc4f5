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
"""

from __future__ import annotations

from typing import Optional

from optuna.trial import TrialState, create_trial
from ray.tune.search import ConcurrencyLimiter
from ray.tune.search.optuna import OptunaSearch

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
