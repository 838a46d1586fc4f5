"""Contract tests of matfusion.search.compat: one per private Ray / Optuna attribute the search relies
on, against the installed packages and their real objects (a real AsyncHyperBandScheduler, a real
OptunaSearch over a one-parameter space, a real Tuner run and restored).  When an upgrade changes
one of them, its test fails naming the attribute and the installed version; fix compat.py (and only
compat.py), then move the window in pyproject.toml (docs/dependencies.md)."""

import contextlib
import os

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import optuna
import pytest
import ray
from conftest import REPO
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState
from ray.tune import Callback
from ray.tune.experiment import Trial
from ray.tune.schedulers import AsyncHyperBandScheduler, TrialScheduler
from ray.tune.search import ConcurrencyLimiter
from ray.tune.search.optuna import OptunaSearch

from matfusion.search import compat
from matfusion.search.schedulers import PromotingASHA

optuna.logging.set_verbosity(optuna.logging.WARNING)


@contextlib.contextmanager
def contract(attribute: str, package: str = "ray"):
    """Turn any failure inside into one that names the attribute and the installed version."""
    installed = {"ray": ray.__version__, "optuna": optuna.__version__}[package]
    checked = {"ray": compat.CHECKED_RAY, "optuna": compat.CHECKED_OPTUNA}[package]
    try:
        yield
    except Exception as err:  # noqa: BLE001 - AttributeError, KeyError, TypeError, AssertionError ...
        pytest.fail(
            f"{attribute} changed shape in {package} {installed} (compat.py was checked against "
            f"{package} {checked}): {type(err).__name__}: {err}",
            pytrace=False,
        )


def asha(**kw):
    args = {
        "time_attr": "training_iteration",
        "metric": "val_mae",
        "mode": "min",
        "max_t": 9,
        "grace_period": 1,
        "reduction_factor": 3,
    }
    return AsyncHyperBandScheduler(**{**args, **kw})


def trial(trial_id):
    return Trial("run_trial", trial_id=trial_id, stub=True, config={"family": "cgcnn"})


def optuna_search():
    return OptunaSearch(
        space={"x": FloatDistribution(0.0, 1.0)},
        metric="val_mae",
        mode="min",
        sampler=optuna.samplers.RandomSampler(seed=0),
    )


def test_the_pins_are_the_versions_checked():
    """pyproject's window is the minor version compat.py was checked against (and this test ran on)."""
    import mlflow

    assert ray.__version__.startswith(compat.CHECKED_RAY + "."), ray.__version__
    assert optuna.__version__.startswith(compat.CHECKED_OPTUNA + "."), optuna.__version__
    assert mlflow.__version__.startswith(compat.CHECKED_MLFLOW + "."), mlflow.__version__
    text = (REPO / "pyproject.toml").read_text()
    for name, version in (
        ("ray[tune]", compat.CHECKED_RAY),
        ("optuna", compat.CHECKED_OPTUNA),
        ("mlflow", compat.CHECKED_MLFLOW),
    ):
        major, minor = version.split(".")
        assert f'"{name}>={version},<{major}.{int(minor) + 1}"' in text, name


# ----------------------------------------------------------------------------- ASHA
def test_asha_brackets():
    with contract("AsyncHyperBandScheduler._brackets"):
        scheduler = asha(brackets=2)
        brackets = compat.asha_brackets(scheduler)
        assert compat.asha_brackets(scheduler) is brackets  # the scheduler's own list
        assert isinstance(brackets, list) and len(brackets) == 2
        assert all(hasattr(b, "on_result") for b in brackets)


def test_bracket_rungs_highest_milestone_first_and_live():
    with contract("_Bracket._rungs"):
        scheduler = asha()
        rungs = compat.bracket_rungs(compat.asha_brackets(scheduler)[0])
        assert [m for m, _ in rungs] == [9, 3, 1]  # grace_period * reduction_factor**k, highest first
        assert all(isinstance(recorded, dict) and not recorded for _, recorded in rungs)
        rungs[-1][1]["x"] = -1.0  # the dict is ASHA's own: what is written into it is recorded
        assert compat.bracket_rungs(compat.asha_brackets(scheduler)[0])[-1][1] == {"x": -1.0}
        assert compat.asha_rungs(scheduler) == rungs
        # Ray's own results land in the same dicts, as metric_op * metric
        t = trial("a")
        scheduler.on_trial_add(None, t)
        scheduler.on_trial_result(None, t, {"training_iteration": 1, "val_mae": 2.0})
        assert compat.asha_rungs(scheduler)[-1][1] == {"x": -1.0, "a": -2.0}


def test_bracket_record():
    with contract("_Bracket.on_result"):
        bracket = compat.asha_brackets(asha())[0]
        assert compat.bracket_record(bracket, trial("a"), 3, -1.0) == TrialScheduler.CONTINUE
        rungs = dict(compat.bracket_rungs(bracket))
        assert rungs[3] == {"a": -1.0} and rungs[1] == {}  # the highest milestone <= time gets it
        compat.bracket_record(bracket, trial("b"), 3, -0.5)
        compat.bracket_record(bracket, trial("c"), 3, -0.7)
        assert compat.bracket_record(bracket, trial("d"), 3, -5.0) == TrialScheduler.STOP  # below the cutoff


def test_trial_bracket_and_forget_trial():
    with contract("AsyncHyperBandScheduler._trial_info"):
        scheduler = asha(brackets=2)
        assert compat.trial_bracket(scheduler, "a") is None
        scheduler.on_trial_add(None, trial("a"))
        assert any(compat.trial_bracket(scheduler, "a") is b for b in compat.asha_brackets(scheduler))
        compat.forget_trial(scheduler, "a")
        assert compat.trial_bracket(scheduler, "a") is None
        compat.forget_trial(scheduler, "never-added")  # no error
        scheduler.on_trial_add(None, trial("b"))
        scheduler.on_trial_complete(None, trial("b"), {"training_iteration": 1, "val_mae": 1.0})
        assert compat.trial_bracket(scheduler, "b") is None  # Ray forgets a completed trial itself


def test_empty_bracket_like():
    with contract("_Bracket (deep copy of rf, _rungs, _stop_last_trials)"):
        scheduler = asha()
        template = compat.asha_brackets(scheduler)[0]
        compat.bracket_record(template, trial("a"), 3, -1.0)
        fresh = compat.empty_bracket_like(template)
        assert fresh is not template and type(fresh) is type(template)
        assert [m for m, _ in compat.bracket_rungs(fresh)] == [9, 3, 1]
        assert all(not recorded for _, recorded in compat.bracket_rungs(fresh))
        assert dict(compat.bracket_rungs(template))[3] == {"a": -1.0}  # the template keeps its own
        # the copy decides as a bracket: its cutoff comes from its own records only
        compat.bracket_record(fresh, trial("b"), 1, -0.5)
        assert compat.bracket_record(fresh, trial("c"), 1, -5.0) == TrialScheduler.STOP


def test_assign_trial_bracket():
    with contract("AsyncHyperBandScheduler._trial_info (read by on_trial_result / on_trial_complete)"):
        scheduler = asha()
        own = compat.empty_bracket_like(compat.asha_brackets(scheduler)[0])
        t = trial("a")
        scheduler.on_trial_add(None, t)
        compat.assign_trial_bracket(scheduler, "a", own)
        assert compat.trial_bracket(scheduler, "a") is own
        scheduler.on_trial_result(None, t, {"training_iteration": 1, "val_mae": 2.0})
        assert dict(compat.bracket_rungs(own))[1] == {"a": -2.0}  # Ray recorded it in the assigned bracket
        assert all(not r for _, r in compat.asha_rungs(scheduler))  # and not in its own
        scheduler.on_trial_complete(None, t, {"training_iteration": 3, "val_mae": 1.0})
        assert dict(compat.bracket_rungs(own))[3] == {"a": -1.0} and compat.trial_bracket(scheduler, "a") is None


def test_asha_time_attr():
    with contract("AsyncHyperBandScheduler._time_attr"):
        assert compat.asha_time_attr(asha(time_attr="epoch")) == "epoch"


def test_asha_metric_op():
    with contract("AsyncHyperBandScheduler._metric_op"):
        assert compat.asha_metric_op(asha(mode="min")) == -1.0
        assert compat.asha_metric_op(asha(mode="max")) == 1.0
        late = AsyncHyperBandScheduler(max_t=9)  # metric and mode given later by Tune
        assert compat.asha_metric_op(late) is None
        late.set_search_properties("val_mae", "min")
        assert compat.asha_metric_op(late) == -1.0 and late.metric == "val_mae"


def test_asha_max_t():
    with contract("AsyncHyperBandScheduler._max_t"):
        assert compat.asha_max_t(asha(max_t=27)) == 27


def test_asha_reduction_factor():
    with contract("AsyncHyperBandScheduler._reduction_factor"):
        assert compat.asha_reduction_factor(asha(reduction_factor=2)) == 2


# ----------------------------------------------------------------------------- OptunaSearch
def test_optuna_study():
    with contract("OptunaSearch._ot_study", "optuna"):
        study = compat.optuna_study(optuna_search())
        assert isinstance(study, optuna.Study)
        assert study.direction == optuna.study.StudyDirection.MINIMIZE


def test_optuna_trial_of():
    with contract("OptunaSearch._ot_trials"):
        searcher = optuna_search()
        assert compat.optuna_trial_of(searcher, "a") is None
        config = searcher.suggest("a")
        ot_trial = compat.optuna_trial_of(searcher, "a")
        assert isinstance(ot_trial, optuna.Trial) and ot_trial.number == 0
        assert ot_trial.params == config
        searcher.on_trial_result("a", {"val_mae": 0.5, "training_iteration": 1})  # reports to that trial
        frozen = compat.optuna_study(searcher).get_trials(deepcopy=False)[0]
        assert frozen.intermediate_values == {1: 0.5}


def test_completed_trial_ids_and_mark_completed():
    """What PrunedAwareOptunaSearch relies on: a trial in ``_completed_trials`` is not told to Optuna
    again by OptunaSearch.on_trial_complete; Ray fills the set itself when a trial ends."""
    with contract("OptunaSearch._completed_trials"):
        searcher = optuna_search()
        searcher.suggest("a")
        searcher.suggest("b")
        assert compat.completed_trial_ids(searcher) == frozenset()
        searcher.on_trial_complete("a", result={"val_mae": 1.0})
        assert compat.completed_trial_ids(searcher) == {"a"}
        study = compat.optuna_study(searcher)
        study.tell(compat.optuna_trial_of(searcher, "b"), state=TrialState.PRUNED)
        compat.mark_completed(searcher, "b")
        assert compat.completed_trial_ids(searcher) == {"a", "b"}
        searcher.on_trial_complete("b", result={"val_mae": 0.1})  # Ray warns and leaves it
        assert [t.state for t in study.get_trials(deepcopy=False)] == [TrialState.COMPLETE, TrialState.PRUNED]


def test_tpe_split_trials():
    with contract("optuna.samplers._tpe.sampler._split_trials", "optuna"):
        study = optuna.create_study(direction="minimize")
        dist = {"x": FloatDistribution(0.0, 1.0)}
        study.add_trial(
            optuna.trial.create_trial(
                params={"x": 0.1}, distributions=dist, intermediate_values={1: 0.01}, state=TrialState.PRUNED
            )
        )
        for x, value in ((0.2, 2.0), (0.3, 1.0)):
            study.add_trial(optuna.trial.create_trial(params={"x": x}, distributions=dist, value=value))
        below, above = compat.tpe_split_trials(study, study.get_trials(deepcopy=False), n_below=2)
        assert sorted(t.number for t in below) == [1, 2] and [t.number for t in above] == [0]


# ----------------------------------------------------------------------------- ConcurrencyLimiter
def test_limiter_take_slot():
    with contract("ConcurrencyLimiter.live_trials / num_unfinished_live_trials"):
        limiter = ConcurrencyLimiter(optuna_search(), max_concurrent=1)
        assert limiter.suggest("a") is not None and limiter.suggest("b") is None
        limiter.on_trial_complete("a", result={"val_mae": 1.0})
        compat.limiter_take_slot(limiter, "a")
        compat.limiter_take_slot(limiter, "a")  # counted once
        assert limiter.suggest("b") is None  # "a" holds the only slot again
        limiter.on_trial_complete("a", result={"val_mae": 1.0})  # (OptunaSearch warns: "a" ended before)
        assert limiter.suggest("b") is not None


# ----------------------------------------------------------------------------- Ray core, storage
def test_refresh_ray_config():
    with contract("ray._raylet.Config.initialize"):
        import ray._raylet  # noqa: F401 - imported by `import ray` already

        assert compat.refresh_ray_config() is True


def test_trial_storage(tmp_path):
    with contract("ray.train._internal.storage.StorageContext"):
        storage = compat.trial_storage(str(tmp_path), "exp", "t_dir")
        t = Trial("run_trial", trial_id="t", stub=True, storage=storage, config={})
        assert t.path == str(tmp_path / "exp" / "t_dir")


def test_validate_cluster_config():
    import copy

    import yaml

    with contract("ray.autoscaler._private.util.prepare_config / validate_config"):
        raw = yaml.safe_load((REPO / "cluster.yaml").read_text())
        compat.validate_cluster_config(copy.deepcopy(raw))
        with pytest.raises(Exception, match="no_such_field"):
            compat.validate_cluster_config({**copy.deepcopy(raw), "no_such_field": 1})


# ----------------------------------------------------------------------------- Tuner
def _tiny_tuner(tmp_path, scheduler, searcher, callbacks, trainable=None):
    from ray.tune import RunConfig, TuneConfig, Tuner

    return Tuner(
        trainable or (lambda config: None),
        tune_config=TuneConfig(scheduler=scheduler, search_alg=searcher, num_samples=2),
        run_config=RunConfig(name="compat", storage_path=str(tmp_path), callbacks=callbacks, verbose=0),
    )


def test_tuner_callbacks_scheduler_searcher(tmp_path):
    scheduler, searcher, callback = asha(), ConcurrencyLimiter(optuna_search(), max_concurrent=1), Callback()
    tuner = _tiny_tuner(tmp_path, scheduler, searcher, [callback])
    with contract("Tuner._local_tuner.get_run_config().callbacks"):
        assert compat.tuner_callbacks(tuner) == [callback] and compat.tuner_callbacks(tuner)[0] is callback
    with contract("Tuner._local_tuner._tune_config.scheduler"):
        assert compat.tuner_scheduler(tuner) is scheduler
    with contract("Tuner._local_tuner._tune_config.search_alg"):
        assert compat.tuner_searcher(tuner) is searcher


MARKED = []  # (returned, in TuneController._trials_to_cache) of each mark, in the driver


class MarkingASHA(PromotingASHA):
    """Marks every trial it starts for the next experiment snapshot (as PromotingASHA marks the
    trials it stops while paused), and notes whether Tune got the mark (module level: Tune pickles
    the scheduler into tuner.pkl)."""

    def choose_trial_to_run(self, tune_controller):
        chosen = super().choose_trial_to_run(tune_controller)
        if chosen is not None:
            returned = compat.mark_trial_to_checkpoint(tune_controller, chosen)
            inner = getattr(tune_controller, "_tune_controller", None)
            MARKED.append((returned, chosen in getattr(inner, "_trials_to_cache", ())))
        return chosen


class Counting(Callback):
    """A callback of our own, to find again in a restored Tuner."""


@pytest.mark.slow
def test_mark_trial_to_checkpoint_and_the_restored_tuner(tmp_path):
    """One real Tune run (2 one-result trials) with a PromotingASHA and a PauseAwareLimiter, then
    Tuner.restore: a scheduler's mark reaches the TuneController; the restored Tuner gives back the
    unpickled scheduler, searcher and callbacks, and _restored_scheduler re-attaches the scheduler
    to the restored searcher."""
    from ray.tune import Tuner

    from matfusion.search.optuna_search import (
        PauseAwareLimiter,
        PrunedAwareOptunaSearch,
    )
    from matfusion.search.tuner import _restored_scheduler

    def _report_once(config):  # nested: pickled by value (the workers cannot import this module)
        from ray import tune

        tune.report({"val_mae": float(config["x"]), "best_val_mae": float(config["x"]), "trial_finished": True})

    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    try:
        MARKED.clear()
        searcher = PauseAwareLimiter(
            PrunedAwareOptunaSearch(
                space={"x": FloatDistribution(0.0, 1.0)},
                metric="best_val_mae",
                mode="min",
                sampler=optuna.samplers.RandomSampler(seed=0),
            ),
            max_concurrent=1,
        )
        scheduler = MarkingASHA(
            time_attr="training_iteration",
            metric="best_val_mae",
            mode="min",
            max_t=1,
            grace_period=1,
            reduction_factor=2,
            on_pause=searcher.pause,
            on_resume=searcher.resume,
        )
        results = _tiny_tuner(tmp_path, scheduler, searcher, [Counting()], trainable=_report_once).fit()
        assert len(results) == 2 and not any(r.error for r in results)
        with contract("TrialRunnerWrapper._tune_controller / TuneController._mark_trial_to_checkpoint"):
            assert MARKED and all(returned and cached for returned, cached in MARKED), MARKED

        restored = Tuner.restore(str(tmp_path / "compat"), trainable=_report_once)
        with contract("Tuner._local_tuner._tune_config.scheduler (restored)"):
            assert isinstance(compat.tuner_scheduler(restored), MarkingASHA)
            assert compat.tuner_scheduler(restored) is not scheduler
        with contract("Tuner._local_tuner._tune_config.search_alg (restored)"):
            assert isinstance(compat.tuner_searcher(restored), PauseAwareLimiter)
            assert compat.tuner_searcher(restored) is not searcher
        with contract("Tuner._local_tuner.get_run_config().callbacks (restored)"):
            assert [type(c).__name__ for c in compat.tuner_callbacks(restored)] == ["Counting"]
        # ours: the restored scheduler tells the restored searcher of its pauses and resumes
        sched = _restored_scheduler(restored)
        restored_searcher = compat.tuner_searcher(restored)
        assert sched._on_pause == restored_searcher.pause and sched._on_resume == restored_searcher.resume
    finally:
        ray.shutdown()
