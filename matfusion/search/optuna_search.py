"""Ray Tune's OptunaSearch that tells Optuna which trials ASHA cut short.

Ray's ``OptunaSearch`` reports every epoch to the Optuna trial (``trial.report(score, step)``)
but ends every trial as COMPLETE with its last score, so TPE ranks a model stopped after one
epoch against models trained for forty by the raw number.  Here a trial that ended before its
own last epoch (``trial_finished`` false in its last result: stopped by ASHA at a rung, or cut by
the search's time or epoch budget) is told to Optuna as PRUNED.  TPE then splits its trials the
way Optuna's own pruners intend: finished trials by score first, then pruned trials by how far
they got (the step of their last report) and by their score there.  Trials that finished
(all epochs, early stopping by patience, one-shot tabular models) stay COMPLETE.
"""
from __future__ import annotations

from typing import Optional

from optuna.trial import TrialState
from ray.tune.search.optuna import OptunaSearch


def cut_short(result: Optional[dict]) -> bool:
    """True when the trial's last result says it did not run to its own end."""
    return bool(result) and "trial_finished" in result and not result["trial_finished"]


class PrunedAwareOptunaSearch(OptunaSearch):
    """OptunaSearch whose trials stopped by the scheduler (or the budget) end PRUNED in Optuna."""

    def on_trial_complete(self, trial_id: str, result: Optional[dict] = None, error: bool = False) -> None:
        ot_trial = self._ot_trials.get(trial_id)
        if error or ot_trial is None or trial_id in self._completed_trials or not cut_short(result):
            return super().on_trial_complete(trial_id, result, error)
        # its intermediate scores are already in Optuna (on_trial_result); TPE reads the last one
        self._ot_study.tell(ot_trial, state=TrialState.PRUNED)
        self._completed_trials.add(trial_id)
