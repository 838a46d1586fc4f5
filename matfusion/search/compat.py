"""The one door to the private parts of Ray Tune and Optuna that the search relies on.

Ray Tune and Optuna give no public way to do some things the search needs: read ASHA's rungs
(to log them, to replay a restored trial's results, to promote from a rung), tell Optuna a trial
was PRUNED through Ray's ``OptunaSearch``, reach the callbacks and the scheduler a restored
``Tuner`` runs with, mark a trial for Tune's next experiment snapshot.  Every such access lives
here, in a small named function that says which attribute it reads, what it relies on about
it, and the version it was checked against.  Nothing else in ``matfusion`` touches a private
attribute of a Ray, Ray Tune, Optuna or MLflow object.

``tests/search/test_compat.py`` holds one contract test per attribute, run against the installed
packages with real objects: when an upgrade changes one, that test fails naming the attribute
and the version.  pyproject.toml pins ray, optuna and mlflow to the minor versions checked here;
docs/dependencies.md says how to move that window.

Checked against: ray 2.60.0 (``ray[tune]``), optuna 5.0.0 (MLflow: no private access).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

CHECKED_RAY = "2.60"
CHECKED_OPTUNA = "5.0"
CHECKED_MLFLOW = "3.17"


# -- Ray Tune: AsyncHyperBandScheduler (ray/tune/schedulers/async_hyperband.py) ------------------
# State an ASHA subclass needs and Ray keeps in private fields set in ``__init__``.


def asha_brackets(scheduler) -> list:
    """The scheduler's brackets (``AsyncHyperBandScheduler._brackets``: a list of ``_Bracket``,
    one per ``brackets=``, fixed at construction).  Checked: ray 2.60.0."""
    return scheduler._brackets


def bracket_rungs(bracket) -> list[tuple[float, dict]]:
    """A bracket's rungs (``_Bracket._rungs``): ``[(milestone, recorded), ...]`` with the HIGHEST
    milestone first; ``recorded`` maps trial_id -> ``metric_op * metric`` (higher is better) and
    is the live dict ASHA decides from, so writing into it records a result.  Checked: ray 2.60.0."""
    return bracket._rungs


def bracket_record(bracket, trial, time: float, score: float) -> str:
    """Record ``score`` (``metric_op * metric``) of ``trial`` at ``time`` in ``bracket`` exactly as
    ASHA does when a result comes (``_Bracket.on_result``: the highest rung with milestone <=
    ``time`` that does not hold the trial yet gets it); returns ASHA's decision (CONTINUE / STOP).
    Checked: ray 2.60.0."""
    return bracket.on_result(trial, time, score)


def empty_bracket_like(bracket):
    """A new bracket with the same milestones as ``bracket`` and nothing recorded (a deep copy of
    the ``_Bracket``, its ``_rungs`` dicts emptied): the rungs of one group of a family-fair
    scheduler.  Relies on a ``_Bracket`` holding its state in plain attributes (``rf``,
    ``_rungs``, ``_stop_last_trials``).  Checked: ray 2.60.0."""
    import copy

    fresh = copy.deepcopy(bracket)
    for _, recorded in bracket_rungs(fresh):
        recorded.clear()
    return fresh


def assign_trial_bracket(scheduler, trial_id: str, bracket) -> None:
    """Put a trial in ``bracket`` (``_trial_info[trial_id] = bracket``): Ray's ``on_trial_result``
    and ``on_trial_complete`` record the trial's results in the bracket they find there, so a
    bracket need not be one of ``_brackets``.  Checked: ray 2.60.0."""
    scheduler._trial_info[trial_id] = bracket


def asha_rungs(scheduler) -> list[tuple[float, dict]]:
    """``(milestone, recorded)`` of every bracket, each bracket's highest milestone first
    (see :func:`bracket_rungs`)."""
    return [rung for bracket in asha_brackets(scheduler) for rung in bracket_rungs(bracket)]


def trial_bracket(scheduler, trial_id: str):
    """The bracket ASHA put a trial in when the trial was added (``_trial_info``: trial_id ->
    ``_Bracket``, filled by ``on_trial_add``, emptied by ``on_trial_complete`` /
    ``on_trial_remove``), or None for a trial it does not hold.  Checked: ray 2.60.0."""
    return scheduler._trial_info.get(trial_id)


def forget_trial(scheduler, trial_id: str) -> None:
    """Drop a trial from ASHA's trial -> bracket map (``_trial_info``) without recording a result
    (Ray's ``on_trial_remove`` raises KeyError for a trial it never added).  Checked: ray 2.60.0."""
    scheduler._trial_info.pop(trial_id, None)


def asha_time_attr(scheduler) -> str:
    """The result key ASHA measures time in (``_time_attr``, e.g. ``training_iteration``).
    Checked: ray 2.60.0."""
    return scheduler._time_attr


def asha_metric_op(scheduler) -> float:
    """The sign ASHA applies to the metric before it records it (``_metric_op``: -1.0 for mode
    min, 1.0 for max, None before a mode is set), so recorded values are higher-is-better.
    Checked: ray 2.60.0."""
    return scheduler._metric_op


def asha_max_t(scheduler) -> float:
    """ASHA's ``max_t`` (``_max_t``): the time at which every trial is stopped.  Checked: ray 2.60.0."""
    return scheduler._max_t


def asha_reduction_factor(scheduler) -> float:
    """ASHA's ``reduction_factor`` (``_reduction_factor``).  Checked: ray 2.60.0."""
    return scheduler._reduction_factor


# -- Ray Tune: the controller a scheduler is handed (ray/tune/execution/tune_controller.py) ------


def mark_trial_to_checkpoint(controller, trial) -> bool:
    """Have Tune write ``trial`` into its next experiment snapshot.  Tune re-snapshots only the
    trials it marked itself; one a scheduler stops while it is PAUSED is not, so a later resume
    would find it PAUSED and run it on.  A scheduler is handed a ``TrialRunnerWrapper`` whose
    ``_tune_controller`` is the ``TuneController``; its ``_mark_trial_to_checkpoint(trial)``
    adds the trial to ``_trials_to_cache``.  Returns False where neither exists (nothing is
    marked).  Checked: ray 2.60.0."""
    tune_controller = getattr(controller, "_tune_controller", controller)
    mark = getattr(tune_controller, "_mark_trial_to_checkpoint", None)
    if mark is None:
        return False
    mark(trial)
    return True


# -- Ray Tune: OptunaSearch (ray/tune/search/optuna/optuna_search.py) -----------------------------


def optuna_study(searcher):
    """The ``optuna.Study`` behind Ray's ``OptunaSearch`` (``_ot_study``: created by
    ``_setup_study`` once metric and mode are known, None before).  Checked: ray 2.60.0 with
    optuna 5.0.0."""
    return searcher._ot_study


def optuna_trial_of(searcher, trial_id: str):
    """The live ``optuna.Trial`` that ``OptunaSearch`` asked for a Tune trial (``_ot_trials``:
    trial_id -> ``optuna.Trial``, filled by ``suggest``), or None.  Checked: ray 2.60.0."""
    return searcher._ot_trials.get(trial_id)


def completed_trial_ids(searcher) -> frozenset:
    """The Tune trial ids ``OptunaSearch`` has told Optuna the end of (``_completed_trials``:
    a set; ``on_trial_result`` of such a trial raises, ``on_trial_complete`` warns and does
    nothing).  Checked: ray 2.60.0."""
    return frozenset(searcher._completed_trials)


def mark_completed(searcher, trial_id: str) -> None:
    """Record in ``OptunaSearch._completed_trials`` that its Optuna trial ended (after the caller
    told the study itself), as ``OptunaSearch.on_trial_complete`` does.  Checked: ray 2.60.0."""
    searcher._completed_trials.add(trial_id)


# -- Ray Tune: ConcurrencyLimiter (ray/tune/search/concurrency_limiter.py) ------------------------


def limiter_take_slot(limiter, trial_id: str) -> None:
    """Count ``trial_id`` as running again in a ``ConcurrencyLimiter`` (``live_trials``: the set
    ``suggest`` refuses beyond ``max_concurrent``; ``num_unfinished_live_trials``: its count),
    as ``suggest`` does for a new trial.  Undocumented fields.  Checked: ray 2.60.0."""
    if trial_id not in limiter.live_trials:
        limiter.live_trials.add(trial_id)
        limiter.num_unfinished_live_trials += 1


# -- Ray Tune: Tuner (ray/tune/tuner.py, ray/tune/impl/tuner_internal.py) -------------------------
# A Tuner keeps its TunerInternal in ``_local_tuner`` (``_remote_tuner`` under Ray Client, where
# these return None); after ``Tuner.restore`` that holds the configs unpickled from tuner.pkl.


def _tuner_internal(tuner):
    return getattr(tuner, "_local_tuner", None)


def tuner_callbacks(tuner) -> list:
    """The callbacks the Tuner runs with (``_local_tuner.get_run_config().callbacks``; after a
    restore, the unpickled ones), [] where they cannot be reached.  Checked: ray 2.60.0."""
    internal = _tuner_internal(tuner)
    if internal is None:
        return []
    return list(internal.get_run_config().callbacks or [])


def _tune_config(tuner):
    internal = _tuner_internal(tuner)
    return None if internal is None else internal._tune_config


def tuner_scheduler(tuner):
    """The trial scheduler the Tuner runs with (``_local_tuner._tune_config.scheduler``; after a
    restore, the one unpickled from tuner.pkl), None where it cannot be reached.  Checked: ray 2.60.0."""
    return getattr(_tune_config(tuner), "scheduler", None)


def tuner_searcher(tuner):
    """The search algorithm the Tuner runs with (``_local_tuner._tune_config.search_alg``; after
    a restore, the unpickled one, whose state Tune restores from the experiment folder when the
    search starts), None where it cannot be reached.  Checked: ray 2.60.0."""
    return getattr(_tune_config(tuner), "search_alg", None)


# -- Ray core ---------------------------------------------------------------------------------------


def refresh_ray_config() -> bool:
    """Make an already imported Ray re-read its ``RAY_*`` environment (``ray._raylet.Config.
    initialize("")``, as ``ray.init`` does).  Best effort: False where Ray was not imported yet
    (it reads the environment when it is) or the call failed.  Checked: ray 2.60.0."""
    import sys

    if "ray._raylet" not in sys.modules:
        return False
    try:
        from ray._raylet import Config

        Config.initialize("")
    except Exception:  # noqa: BLE001 - best effort; the variable is set for child processes
        return False
    return True


# -- used by the tests only -------------------------------------------------------------------------


def trial_storage(storage_path: str, experiment_dir_name: str, trial_dir_name: str):
    """A ``StorageContext`` (``ray.train._internal.storage``) for building a ``Trial`` with a
    folder on disk outside a Tune run.  Checked: ray 2.60.0."""
    from ray.train._internal.storage import StorageContext

    return StorageContext(
        storage_path=storage_path, experiment_dir_name=experiment_dir_name, trial_dir_name=trial_dir_name
    )


def tpe_split_trials(study, trials: Iterable, n_below: int) -> tuple[list, list]:
    """TPE's split of ``trials`` into its "below" (good) and "above" groups
    (``optuna.samplers._tpe.sampler._split_trials``): complete trials by value first, then
    pruned ones by their last step and value there.  Checked: optuna 5.0.0."""
    from optuna.samplers._tpe.sampler import _split_trials

    return _split_trials(study, list(trials), n_below=n_below)


def validate_cluster_config(config: dict) -> Any:
    """The checks ``ray up`` runs on a cluster config (``ray.autoscaler._private.util``:
    ``prepare_config`` then ``validate_config``); raises on an invalid one.  Checked: ray 2.60.0."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    return validate_config(prepare_config(config))
