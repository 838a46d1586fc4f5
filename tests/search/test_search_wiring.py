"""How the search is wired: resources per trial, the seeded TPE searcher behind its concurrency
limiter, the ASHA variant that leaves one-shot RF trials out of its rungs (on Tune's own Trial
objects), and one real search (Ray, MLflow, matbench_phonons) checking the concurrency limit,
ASHA's pruning, the rungs and the progress table."""

import io
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO
from mlflow.tracking import MlflowClient
from ray.tune.experiment import Trial
from ray.tune.schedulers import ASHAScheduler, TrialScheduler

from matfusion.config import SearchConfig
from matfusion.search import compat
from matfusion.search.schedulers import ONE_SHOT_FAMILIES, TabularAwareASHA, TargetReachedStopper, TotalEpochsStopper
from matfusion.search.tuner import (
    SearchProgress,
    build_scheduler,
    build_searcher,
    snapshot_trials,
    trial_resources,
)
from matfusion.spaces import define_search_space


# ----------------------------------------------------------------------------- resources
@pytest.mark.parametrize(
    "gpus_per_trial, max_concurrent, cluster_gpus, expected",
    [
        (None, 2, 0, {"cpu": 1.0}),  # no GPU anywhere: CPU only
        (None, 2, 1, {"cpu": 1.0, "gpu": 0.5}),  # one GPU shared by the concurrent trials
        (None, 3, 1, {"cpu": 1.0, "gpu": 0.333}),
        (None, 1, 4, {"cpu": 1.0, "gpu": 1.0}),
        (0.25, 2, 1, {"cpu": 1.0, "gpu": 0.25}),  # the config wins
        (0.25, 2, 0, {"cpu": 1.0, "gpu": 0.25}),
        (0.0, 2, 1, {"cpu": 1.0}),  # explicitly no GPU
    ],
)
def test_trial_resources(gpus_per_trial, max_concurrent, cluster_gpus, expected):
    s = SearchConfig(gpus_per_trial=gpus_per_trial, max_concurrent=max_concurrent)
    assert trial_resources(s, cluster_gpus) == expected


def test_trial_resources_cpus_from_config():
    assert trial_resources(SearchConfig(cpus_per_trial=2.5), 0) == {"cpu": 2.5}
    assert trial_resources(SearchConfig(cpus_per_trial=0.5, max_concurrent=4), 2) == {"cpu": 0.5, "gpu": 0.25}


# ----------------------------------------------------------------------------- searcher
def _space(seed=0):
    constants = {"max_epochs": 4, "seed": seed, "patience": 20, "cpus": 1, "targets": ["y"]}
    return define_search_space(
        ["rf", "cgcnn"], constants, fusions=["none", "early"], targets=["y"], task_weighting=["fixed"], preset="quick"
    )


def _score(config):
    """A deterministic stand-in for a trial's val_mae: depends on every suggested value."""
    family = config["family"]
    return (
        1.0
        + sum(math.log1p(abs(float(v))) for v in config[family].values() if not isinstance(v, str))
        + (0.5 if family == "rf" else 0.0)
    )


def suggest_sequence(seed: int, n: int = 12, max_concurrent: int = 2) -> list[dict]:
    """Drive the search's searcher the way Tune does: suggest until the limiter says no, then
    finish the oldest running trial (so TPE, past its startup trials, sees running trials
    through constant liar) and go on."""
    s = SearchConfig(seed=seed, num_samples=n, max_concurrent=max_concurrent, families=["rf", "cgcnn"])
    searcher = build_searcher(s, _space(seed))
    configs, running = [], []
    while len(configs) < n:
        trial_id = f"trial_{len(configs):03d}"
        config = searcher.suggest(trial_id)
        if config is None:  # max_concurrent trials are running
            done_id, done_config = running.pop(0)
            searcher.on_trial_complete(done_id, result={"val_mae": _score(done_config)})
            continue
        configs.append(config)
        running.append((trial_id, config))
        assert len(running) <= max_concurrent
    return configs


def test_same_seed_same_configs():
    a, b = suggest_sequence(seed=7), suggest_sequence(seed=7)
    assert a == b
    assert len({json.dumps(c, sort_keys=True) for c in a}) == len(a)  # no config proposed twice
    assert suggest_sequence(seed=8)[:5] != a[:5]


def test_trials_cut_short_end_pruned_in_optuna():
    """A GNN trial ASHA stops at a rung ends PRUNED in Optuna with its per-epoch scores, so TPE ranks
    it below every finished trial; finished, one-shot (rf) and failed trials keep their states."""
    import optuna

    from matfusion.search.tuner import SCORE

    s = SearchConfig(seed=3, num_samples=8, max_concurrent=4, families=["rf", "cgcnn"])
    limiter = build_searcher(s, _space(3))
    ids = [f"t{k}" for k in range(4)]
    for tid in ids:
        assert limiter.suggest(tid) is not None

    def epochs(tid, scores, finished_at):
        for epoch, v in enumerate(scores, start=1):
            r = {"training_iteration": epoch, "epoch": epoch, SCORE: v, "trial_finished": epoch == finished_at}
            limiter.on_trial_result(tid, r)
        return r

    cut = epochs("t0", [0.5, 0.4], finished_at=4)  # stopped by ASHA after 2 of 4 epochs
    done = epochs("t1", [2.0, 1.9, 1.8, 1.7], finished_at=4)  # ran to its end, worse scores
    one_shot = epochs("t2", [1.2], finished_at=1)  # a tabular trial: one report
    for tid, r in (("t0", cut), ("t1", done), ("t2", one_shot)):
        limiter.on_trial_complete(tid, result=r)
    limiter.on_trial_complete("t3", result=None, error=True)

    study = compat.optuna_study(limiter.searcher)
    by_number = {t.number: t for t in study.get_trials(deepcopy=False)}
    states = [by_number[k].state for k in range(4)]
    assert states == [
        optuna.trial.TrialState.PRUNED,
        optuna.trial.TrialState.COMPLETE,
        optuna.trial.TrialState.COMPLETE,
        optuna.trial.TrialState.FAIL,
    ]
    assert by_number[0].intermediate_values == {1: 0.5, 2: 0.4}  # Optuna keeps the last as its value
    assert by_number[1].value == 1.7 and by_number[2].value == 1.2
    # TPE's split puts the two finished trials before the pruned one, although its score is lower
    below, above = compat.tpe_split_trials(study, list(by_number.values())[:3], n_below=2)
    assert sorted(t.number for t in below) == [1, 2] and [t.number for t in above] == [0]


def test_paused_trial_frees_its_slot_and_reaches_optuna_twice():
    """PauseAwareLimiter + PrunedAwareOptunaSearch as PromotingASHA drives them: a paused trial gives
    up its slot (a new trial may be suggested) and is PRUNED in Optuna at its rung; resumed, it takes
    a slot again; finished, TPE gets a COMPLETE copy of its params with the final score."""
    import optuna

    from matfusion.search.tuner import SCORE

    s = SearchConfig(seed=5, num_samples=8, max_concurrent=2, families=["rf", "cgcnn"])
    limiter = build_searcher(s, _space(5))
    assert limiter.suggest("a") is not None and limiter.suggest("b") is not None
    assert limiter.suggest("c") is None  # two running: no slot
    r1 = {"training_iteration": 1, SCORE: 0.9, "trial_finished": False}
    limiter.on_trial_result("a", r1)
    limiter.pause("a", r1)
    assert limiter.suggest("c") is not None  # a's slot went to c
    limiter.resume("a")
    assert limiter.suggest("d") is None  # a holds a slot again
    limiter.on_trial_result("a", {"training_iteration": 2, SCORE: 0.5, "trial_finished": False})  # ignored
    limiter.on_trial_complete("a", result={"training_iteration": 3, SCORE: 0.4, "trial_finished": True})
    assert limiter.live_trials == {"b", "c"}

    study = compat.optuna_study(limiter.searcher)
    trials = study.get_trials(deepcopy=False)
    a = trials[0]
    assert a.state == optuna.trial.TrialState.PRUNED and a.intermediate_values == {1: 0.9}
    copies = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(copies) == 1 and copies[0].params == a.params and copies[0].value == 0.4


def test_promotion_rule_of_promoting_asha():
    """floor(n / rf) best of a rung may go on while trials come; ceil(n / rf) once none will."""
    from matfusion.search.schedulers import PromotingASHA

    asha = PromotingASHA(
        time_attr="training_iteration", metric="val_mae", mode="min", max_t=9, grace_period=1, reduction_factor=3
    )
    recorded = {"t1": -5.0, "t2": -1.0, "t3": -3.0, "t4": -2.0}  # metric_op * val_mae: higher is better
    assert asha.promotable(1, recorded) == ["t2"]
    assert asha.promotable(1, recorded, final=True) == ["t2", "t4"]
    assert asha.promotable(1, {"t1": -5.0, "t2": -1.0}) == []
    asha._promoted.add(("t2", 1))
    assert asha.promotable(1, recorded) == [] and asha.promotable(1, recorded, final=True) == ["t4"]


def test_promoting_asha_tells_the_searcher_it_listens_to():
    """A restored search re-attaches the scheduler to the restored searcher with ``listen``: the
    pauses go to the new listener only."""
    from matfusion.search.schedulers import PromotingASHA

    old, new = [], []
    asha = PromotingASHA(
        time_attr="training_iteration",
        metric="val_mae",
        mode="min",
        max_t=9,
        grace_period=1,
        reduction_factor=3,
        on_pause=lambda tid, r: old.append(tid),
    )
    asha.listen(lambda tid, r: new.append((tid, r["val_mae"])), lambda tid: new.append(tid))
    trial = _trial("g1", "cgcnn")
    asha.on_trial_add(None, trial)
    assert asha.on_trial_result(None, trial, _res(1, 2.0)) == TrialScheduler.PAUSE  # alone at rung 1: waits
    assert old == [] and new == [("g1", 2.0)]


# ----------------------------------------------------------------------------- scheduler
def _trial(trial_id, family, storage=None):
    return Trial(
        "run_trial",
        trial_id=trial_id,
        stub=True,
        storage=storage,
        config={"family": family, family: {}, "max_epochs": 4},
    )


def _res(it, val):
    return {"training_iteration": it, "val_mae": val}


GNN_RESULTS = [  # (trial, iteration, val_mae) in arrival order
    ("g1", 1, 2.0),
    ("g2", 1, 3.0),
    ("g1", 2, 1.8),
    ("g3", 1, 1.0),
    ("g3", 2, 0.9),
    ("g4", 1, 2.5),
    ("g1", 3, 1.7),
    ("g3", 3, 0.8),
    ("g3", 4, 0.7),
    ("g1", 4, 1.6),
]


def _asha(cls, **kw):
    return cls(
        time_attr="training_iteration", metric="val_mae", mode="min", max_t=4, grace_period=1, reduction_factor=2, **kw
    )


def _feed(scheduler, with_rf: bool):
    """Feed GNN results (and, interleaved, one-shot RF trials) as Tune would; returns the
    decision for every GNN result."""
    trials = {t: _trial(t, "cgcnn") for t in ("g1", "g2", "g3", "g4")}
    rf = [_trial(f"rf{k}", "rf") for k in range(3)]
    decisions, stopped = [], set()
    for k, (tid, it, val) in enumerate(GNN_RESULTS):
        if with_rf and k < len(rf):  # an RF trial arrives, reports once (iteration 1) and ends
            scheduler.on_trial_add(None, rf[k])
            assert scheduler.on_trial_result(None, rf[k], _res(1, 0.1 * (k + 1))) == TrialScheduler.CONTINUE
            scheduler.on_trial_complete(None, rf[k], _res(1, 0.1 * (k + 1)))
        if tid in stopped:
            continue
        if it == 1:
            scheduler.on_trial_add(None, trials[tid])
        decision = scheduler.on_trial_result(None, trials[tid], _res(it, val))
        decisions.append((tid, it, decision))
        if decision == TrialScheduler.STOP:
            stopped.add(tid)
            scheduler.on_trial_complete(None, trials[tid], _res(it, val))
    return decisions


@pytest.mark.parametrize("max_t, grace, rf", [(27, 3, 3), (40, 5, 3), (30, 1, 2), (8, 8, 3)])
def test_lr_restarts_are_ashas_rung_milestones(max_t, grace, rf):
    """With lr_schedule rungs GNN trials restart their cosine schedule at the rung milestones of
    the very scheduler the search builds; with cosine (the default, under ASHA too): none."""
    from matfusion.search.schedulers import rung_milestones
    from matfusion.search.tuner import lr_restarts

    asha = build_scheduler(SearchConfig(families=["cgcnn"], max_epochs=max_t, grace_period=grace, reduction_factor=rf))
    milestones = sorted(int(m) for m, _ in compat.asha_rungs(asha))
    assert rung_milestones(max_t, grace, rf) == milestones
    expect = [m for m in milestones if m < max_t]
    cfg = SearchConfig(
        families=["cgcnn"], max_epochs=max_t, grace_period=grace, reduction_factor=rf, lr_schedule="rungs"
    )
    assert lr_restarts(cfg) == expect
    assert (
        lr_restarts(SearchConfig(families=["cgcnn"], max_epochs=max_t, grace_period=grace, reduction_factor=rf)) == []
    )
    assert lr_restarts(SearchConfig(families=["cgcnn"], max_epochs=max_t, grace_period=grace, scheduler="fifo")) == []
    assert (
        lr_restarts(SearchConfig(families=["cgcnn"], max_epochs=max_t, grace_period=grace, lr_schedule="cosine")) == []
    )
    assert (
        lr_restarts(
            SearchConfig(
                families=["cgcnn"],
                max_epochs=max_t,
                grace_period=grace,
                reduction_factor=rf,
                scheduler="fifo",
                lr_schedule="rungs",
            )
        )
        == expect
    )


def test_rf_trials_never_enter_the_rungs():
    assert "rf" in ONE_SHOT_FAMILIES
    ours = _asha(TabularAwareASHA)
    decisions = _feed(ours, with_rf=True)
    # GNN decisions are exactly plain ASHA's on the GNN results alone
    assert decisions == _feed(_asha(ASHAScheduler), with_rf=False)
    assert ("g2", 1, TrialScheduler.STOP) in decisions and ("g1", 1, TrialScheduler.CONTINUE) in decisions
    assert all(not t.startswith("rf") for t in ours.recorded_trial_ids())
    assert {r["milestone"]: r["recorded"] for r in ours.rungs()}[1] == {"g1": 2.0, "g2": 3.0, "g3": 1.0, "g4": 2.5}
    # plain ASHA, given the RF trials, lets their one-shot numbers set the first rung's cutoff
    plain = _asha(ASHAScheduler)
    assert _feed(plain, with_rf=True)[0] == ("g1", 1, TrialScheduler.STOP)
    assert {"rf0", "rf1", "rf2"} <= set(compat.asha_rungs(plain)[-1][1])


def test_search_stoppers_end_at_the_epoch_budget_or_the_target():
    budget = TotalEpochsStopper(3)
    ends = []
    # Tune passes a finished trial's last result twice (b's iteration 1): it counts once
    for trial_id, iteration in (("a", 1), ("b", 1), ("b", 1), ("a", 2)):
        assert budget(trial_id, {"val_mae": 1.0, "training_iteration": iteration}) is False  # no trial is stopped
        ends.append(budget.stop_all())
    assert ends == [False, False, False, True]

    target = TargetReachedStopper(10.0)
    assert target("a", {"epoch": 1}) is False and not target.stop_all()  # a result without val_mae
    assert target("a", {"val_mae": 10.5}) is False and not target.stop_all()
    assert target("b", {"val_mae": 10.0}) is False and target.stop_all()
    assert target("a", {"val_mae": 50.0}) is False and target.stop_all()  # reached stays reached


def test_more_tabular_families():
    sched = _asha(TabularAwareASHA, tabular_families={"xgb"})
    sched.on_trial_add(None, _trial("x", "xgb"))
    assert sched.on_trial_result(None, _trial("x", "xgb"), _res(4, 0.1)) == TrialScheduler.CONTINUE
    assert sched.recorded_trial_ids() == set()
    assert isinstance(build_scheduler(SearchConfig(max_epochs=6, grace_period=2)), TabularAwareASHA)


def test_restored_trial_history_is_replayed_into_the_rungs(tmp_path):
    """On Tuner.restore, Tune adds the trials of the snapshot to a fresh scheduler: their
    results up to the restored one (not those after it, which the trial reports again) are
    recorded as ASHA recorded them before."""
    storage = compat.trial_storage(str(tmp_path), "exp", "g1_dir")
    trial = _trial("g1", "cgcnn", storage)
    Path(trial.path).mkdir(parents=True)
    lines = [json.dumps(_res(it, val)) for it, val in [(1, 2.0), (2, 1.5), (3, 1.4), (4, 1.3)]]
    Path(trial.path, "result.json").write_text("\n".join(lines) + '\n{"training_iter')  # last line cut by the kill
    trial.run_metadata.last_result = _res(2, 1.5)  # the snapshot had it at iteration 2
    sched = _asha(TabularAwareASHA)
    sched.on_trial_add(None, trial)
    assert {r["milestone"]: r["recorded"] for r in sched.rungs()} == {1: {"g1": 2.0}, 2: {"g1": 1.5}, 4: {}}
    # a fresh trial (no results) starts with nothing recorded
    sched.on_trial_add(None, _trial("g2", "cgcnn"))
    assert sched.recorded_trial_ids() == {"g1"}


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def _progress_trials():
    trials = [_trial("aaa", "cgcnn"), _trial("bbb", "rf"), _trial("ccc", "cgcnn")]
    trials[0].config["cgcnn"] = {"fusion": "early"}
    for n, t in enumerate(trials, 1):
        t.experiment_tag = f"{n}_family={t.config['family']}"
    trials[0].run_metadata.last_result = {"epoch": 3, "val_mae": 2.5, "best_val_mae": 2.0}
    return trials


def test_progress_off_a_terminal_is_one_line_per_ended_trial():
    """Off a terminal: nothing while trials run, one line per trial when it ends (however many
    reports Tune makes), then one summary line; never a table again."""
    out = io.StringIO()
    progress, trials = SearchProgress(stream=out, total=3), _progress_trials()
    assert not progress.tty
    for t in trials:
        t.set_status(Trial.RUNNING)
    for _ in range(5):
        progress.report(trials, done=False)
    assert out.getvalue() == ""
    trials[1].set_status(Trial.TERMINATED)
    trials[1].run_metadata.last_result = {"epoch": 1, "val_mae": 1.25, "best_val_mae": 1.25, "trial_finished": True}
    for _ in range(5):
        progress.report(trials, done=False)
    trials[0].set_status(Trial.TERMINATED)  # stopped by ASHA: no trial_finished
    trials[2].set_status(Trial.ERROR)
    progress.report(trials, done=False)
    progress.report(trials, done=True)
    lines = out.getvalue().splitlines()
    assert len(lines) == 4, lines
    assert "t02 rf" in lines[0] and "completed" in lines[0] and "best_val_mae     1.25" in lines[0], lines[0]
    assert "search best 1.25 (t02 rf)" in lines[0]
    assert "t01 cgcnn-early" in lines[1] and "stopped early" in lines[1] and "epochs   3" in lines[1], lines[1]
    assert "t03 cgcnn-none" in lines[2] and "failed" in lines[2]
    assert lines[3].endswith("search ended: 3 trials (1 completed, 1 stopped early, 1 failed)"), lines[3]
    assert "\r" not in out.getvalue()


def test_progress_on_a_terminal_updates_one_status_line_in_place():
    out = _Terminal()
    progress, trials = SearchProgress(stream=out, total=3, refresh_s=0), _progress_trials()
    assert progress.tty
    trials[0].set_status(Trial.RUNNING)
    progress.report(trials, done=False)
    progress.report(trials, done=False)
    text = out.getvalue()
    assert "\n" not in text and text.count("\r\x1b[2K") == 2  # redrawn in place, no new line
    assert text.rsplit("\r\x1b[2K", 1)[1].endswith("0/3 ended, 1 running, 2 pending: t01 cgcnn-early ep 3 2")
    trials[0].set_status(Trial.TERMINATED)
    progress.report(trials, done=True)
    finished = out.getvalue()[len(text) :].split("\r\x1b[2K")
    assert any("t01 cgcnn-early" in part and "stopped early" in part for part in finished), finished
    assert out.getvalue().endswith("search ended: 3 trials (1 stopped early, 2 pending)\n"), out.getvalue()


# ----------------------------------------------------------------------------- one real search
def smoke_search(tmp_path, data_dir, settings: dict, timeout: int = 500, extra_args: tuple = ()):
    """`matfusion search configs/smoke.yaml` on 100 phonons rows with ``settings`` (key -> value
    for --set) and ``extra_args`` in a subprocess; returns the process, the MLflow client, the
    parent run and the trial runs."""
    db = f"sqlite:///{tmp_path / 'mlruns.db'}"
    base = {
        "data.limit": 100,
        "search.grace_period": 1,
        "search.fusions": "[none]",
        "search.preset": "quick",
        "search.points_to_evaluate": "false",
        "mlflow.tracking_uri": db,
        "mlflow.artifact_location": tmp_path / "artifacts",
        "search.storage_path": tmp_path / "ray",
    }
    cmd = [
        sys.executable,
        "-m",
        "matfusion.cli",
        "search",
        str(REPO / "configs" / "smoke.yaml"),
        "--data-dir",
        str(data_dir),
    ]
    for key, value in {**base, **settings}.items():
        cmd += ["--set", f"{key}={value}"]
    cmd += list(extra_args)
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    client = MlflowClient(db)
    exp = client.get_experiment_by_name("phonons-smoke")
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    nested = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    return proc, client, parent, nested


@pytest.mark.slow
def test_real_search_limits_concurrency_and_prunes_gnns_only(tmp_path, data_dir):
    num_samples, max_epochs = 8, 4
    # resources would let 4 trials run at once: only the limiter holds them to 2
    proc, client, parent, nested = smoke_search(
        tmp_path,
        data_dir,
        {
            "search.num_samples": num_samples,
            "search.max_epochs": max_epochs,
            "search.reduction_factor": 2,
            "search.families": "[rf, cgcnn]",
            "search.max_concurrent": 2,
            "search.cpus_per_trial": 0.5,
            # TPE's own mix of rf and cgcnn (after the budget rule's round robin this seed gives 5 rf of 8:
            # too few GNN trials for a rung to prune); tests/search/test_fair_scheduling.py tests the rule
            "search.min_trials_per_group": 0,
        },
        timeout=400,
    )
    assert "Both 'metric' and 'mode' must be set" not in proc.stdout + proc.stderr
    assert len(nested) == num_samples

    # concurrency: trial runs open from the trial's start to its end
    events = sorted([(r.info.start_time, 1) for r in nested] + [(r.info.end_time, -1) for r in nested])
    level, peak = 0, 0
    for _, step in events:  # at equal times an end (-1) sorts before a start (+1)
        level += step
        peak = max(peak, level)
    # the limit holds; on a loaded machine short trials may not overlap at all, so 1 is possible
    assert 1 <= peak <= 2

    # pruning: ASHA stopped some GNN trials at a rung before max_epochs; RF is never pruned
    epochs = {
        r.data.tags["trial_id"]: [m.step for m in client.get_metric_history(r.info.run_id, "val_mae")] for r in nested
    }
    by_status = {}
    for r in nested:
        by_status.setdefault((r.data.tags["family"], r.data.tags["status"]), []).append(r.data.tags["trial_id"])
    assert set(by_status) <= {("rf", "completed"), ("cgcnn", "completed"), ("cgcnn", "pruned")}, by_status
    pruned = by_status.get(("cgcnn", "pruned"), [])
    assert pruned, by_status
    for tid in pruned:
        assert len(epochs[tid]) < max_epochs and len(epochs[tid]) in (1, 2)  # stopped at rung 1 or 2
    for tid in by_status.get(("cgcnn", "completed"), []):
        assert len(epochs[tid]) == max_epochs
    assert ("rf", "completed") in by_status

    # the scheduler's rungs after the search: every GNN trial that reached a milestone, no RF, with
    # the score ASHA compares (best_val_mae: the lowest val_mae of epochs 1..milestone, not the
    # milestone epoch's own val_mae, which may be higher)
    rungs = json.loads(
        Path(client.download_artifacts(parent.info.run_id, "asha_rungs.json", str(tmp_path))).read_text()
    )["rungs"]
    assert [r["milestone"] for r in rungs] == [1, 2, 4]
    gnn = {r.data.tags["trial_id"]: r for r in nested if r.data.tags["family"] == "cgcnn"}
    for rung in rungs:
        m = rung["milestone"]
        expected = {}
        for tid, run in gnn.items():
            history = {h.step: h.value for h in client.get_metric_history(run.info.run_id, "val_mae")}
            if m in history:
                expected[tid] = min(v for step, v in history.items() if step <= m)
        assert rung["recorded"] == pytest.approx(expected)

    # the progress (not a terminal): one line per trial as it ends, by its run name, then a summary
    ended = re.findall(r"^\[\s*\d+ s\]  (t\d\d \S+)\s", proc.stdout, re.M)
    assert sorted(ended) == sorted(r.info.run_name for r in nested), ended
    assert re.search(rf"^\[\s*\d+ s\] search ended: {num_samples} trials \(", proc.stdout, re.M)
    assert "== Status ==" not in proc.stdout and "\r" not in proc.stdout
    assert not re.search(r"^\s*Trial name\s", proc.stdout, re.M)


@pytest.mark.slow
def test_real_search_stops_once_a_trial_reaches_stop_at_val_mae(tmp_path, data_dir):
    """search.stop_at_val_mae: the whole search ends right after the first epoch at or below it
    (here any epoch: 1e9), not an interrupted search: exit 0, every run closed."""
    proc, client, parent, nested = smoke_search(
        tmp_path,
        data_dir,
        {
            "search.num_samples": 6,
            "search.max_epochs": 8,
            "search.families": "[cgcnn]",
            "search.stop_at_val_mae": 1e9,
            "search.max_concurrent": 2,
        },
    )
    assert "interrupted" not in proc.stdout
    epochs = [len(client.get_metric_history(r.info.run_id, "val_mae")) for r in nested]
    # without the stop the first trial goes on to epoch 8 (no rung can stop it: it is first);
    # with it the search ends at the first epoch, plus what the two running trials reported
    # before the driver acted on it (Tune may handle a few queued results in the same step)
    assert 1 <= sum(epochs) <= 4 and len(nested) <= 2, epochs
    assert {r.info.status for r in [parent] + nested} == {"FINISHED"}


@pytest.mark.slow
def test_real_search_promote_mode_pauses_until_a_rung_can_compare(tmp_path, data_dir):
    """search.asha_mode: promote, real Ray and MLflow: no GNN trial leaves a rung before the rung
    holds reduction_factor results (Ray's rule lets the first trial run on alone); paused trials
    resume from their rung's checkpoint (no epoch trained twice), the best reach max_epochs, and
    no MLflow run is left open."""
    num_samples, max_epochs, rf = 7, 3, 3  # rungs at epochs 1 and 3
    # whether a paused trial is resumed depends on the rung-1 scores and their order: with one
    # cosine cycle (the default) every trial of the final best third had gone on as it arrived, so
    # none was resumed; with the rung schedule these 7 trials include one that waits, then resumes
    proc, client, parent, nested = smoke_search(
        tmp_path,
        data_dir,
        {
            "search.num_samples": num_samples,
            "search.max_epochs": max_epochs,
            "search.reduction_factor": rf,
            "search.families": "[cgcnn]",
            "search.asha_mode": "promote",
            "search.checkpoint_every": 5,
            "search.max_concurrent": 2,
            "search.cpus_per_trial": 1,
            "search.lr_schedule": "rungs",
        },
    )
    assert len(nested) == num_samples
    assert {r.info.status for r in nested} == {"FINISHED"}
    assert {r.data.tags["status"] for r in nested} <= {"completed", "pruned"}

    history = {r.data.tags["trial_id"]: client.get_metric_history(r.info.run_id, "val_mae") for r in nested}
    for tid, h in history.items():  # resumed from the rung's checkpoint: epochs 1..k, each once
        assert sorted(m.step for m in h) == list(range(1, len(h) + 1)), (tid, [m.step for m in h])
    first_at = {tid: {m.step: m.timestamp for m in h} for tid, h in history.items()}
    for milestone in (1,):  # the rung below max_epochs
        for tid, steps in first_at.items():
            if milestone + 1 not in steps:
                continue
            went_on = steps[milestone + 1]
            at_rung = [t for t, s in first_at.items() if milestone in s and s[milestone] <= went_on]
            assert len(at_rung) >= rf, (tid, milestone, at_rung)
    finished = [tid for tid, h in history.items() if len(h) == max_epochs]
    assert finished, {tid: len(h) for tid, h in history.items()}
    # the trial that reached rung 1 first was paused there (Ray's rule would let it go on alone):
    # Tune restarts a paused trial from its checkpoint, so iterations_since_restore starts again
    results = {}
    for f in (tmp_path / "ray" / "phonons-smoke").glob("*/result.json"):
        rows = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
        results[rows[0]["trial_id"]] = rows
    assert set(results) == set(history)
    first = min(first_at, key=lambda t: first_at[t][1])
    first_results = results[first]
    assert len(first_results) == 1 or first_results[1]["iterations_since_restore"] == 1, first_results[:2]
    resumed = [
        t for t, rows in results.items() if any(r["iterations_since_restore"] < r["training_iteration"] for r in rows)
    ]
    assert resumed, {
        t: [(r["training_iteration"], r["iterations_since_restore"]) for r in rows] for t, rows in results.items()
    }


@pytest.mark.slow
def test_real_search_promote_mode_ends_paused_trials_at_the_time_budget(tmp_path, data_dir):
    """When the time budget ends a promote-mode search, trials paused at a rung end with it (not an
    interrupted, resumable search): exit 0, every trial run closed, none 'interrupted'; a later
    --resume of the finished search trains nothing more."""
    settings = {
        "search.num_samples": 200,
        "search.max_epochs": 9,
        "search.reduction_factor": 3,
        "search.families": "[cgcnn]",
        "search.asha_mode": "promote",
        "search.time_budget_s": 60,
    }
    proc, client, parent, nested = smoke_search(tmp_path, data_dir, settings)
    assert "interrupted" not in proc.stdout
    runs = [parent] + nested
    statuses = [r.data.tags["status"] for r in nested]
    assert {r.info.status for r in runs} == {"FINISHED"}
    assert set(statuses) <= {"completed", "pruned", "stopped"} and "completed" in statuses, statuses
    epochs = {r.info.run_id: len(client.get_metric_history(r.info.run_id, "val_mae")) for r in nested}
    counts = list(epochs.values())
    assert max(counts) == 9 and counts.count(1) > counts.count(9), counts  # most wait at rung 1

    # Tune's last snapshot still holds the trials it stopped while they were paused as PAUSED;
    # --resume of this finished search must not run them on (Tune restores the time budget as
    # spent): nothing trains, no trial is added, every run keeps its status and stays closed
    paused = [t for t, status in snapshot_trials(tmp_path / "ray" / "phonons-smoke").items() if status == "PAUSED"]
    assert paused
    proc, client, parent2, nested2 = smoke_search(tmp_path, data_dir, settings, extra_args=("--resume",))
    assert "resuming search 'phonons-smoke'" in proc.stdout and "interrupted" not in proc.stdout
    assert parent2.info.run_id == parent.info.run_id
    assert {r.info.run_id: len(client.get_metric_history(r.info.run_id, "val_mae")) for r in nested2} == epochs
    assert {r.info.run_id: r.data.tags["status"] for r in nested2} == {
        r.info.run_id: r.data.tags["status"] for r in nested
    }
    assert {r.info.status for r in [parent2] + nested2} == {"FINISHED"}
