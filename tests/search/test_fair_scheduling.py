"""Family-fair scheduling (issue 24): per-group ASHA rungs and the round robin over groups.

The scheduler tests feed real Ray ``Trial`` objects to the real schedulers the search builds
(``build_scheduler``), as Tune does; the searcher tests drive the real OptunaSearch; one real search
(Ray Tune + MLflow, subprocess) checks both ends together."""

import json
import pickle
import re
from pathlib import Path

import pytest
from ray.tune.experiment import Trial
from ray.tune.schedulers import ASHAScheduler, TrialScheduler

from matfusion import families
from matfusion.config import SearchConfig
from matfusion.search import compat
from matfusion.search.schedulers import PromotingASHA, TabularAwareASHA
from matfusion.search.tuner import (
    SCORE,
    SearchResult,
    build_scheduler,
    build_searcher,
    fair_start,
    format_result,
)
from matfusion.spaces import define_search_space
from matfusion.tracking.leaderboard import GROUP_SUMMARY_COLUMNS, group_summary

CONTINUE, STOP, PAUSE = TrialScheduler.CONTINUE, TrialScheduler.STOP, TrialScheduler.PAUSE


def trial(trial_id, family, fusion="none", storage=None):
    section = {"fusion": fusion} if families.get(family).graph else {}
    return Trial(
        "run_trial",
        trial_id=trial_id,
        stub=True,
        storage=storage,
        config={"family": family, family: section, "max_epochs": 8},
    )


def res(it, val):
    return {"training_iteration": it, SCORE: val}


def scheduler(scope, mode="stop", max_epochs=8, grace=1, rf=2):
    return build_scheduler(
        SearchConfig(
            families=["rf", "lgbm", "cgcnn"],
            max_epochs=max_epochs,
            grace_period=grace,
            reduction_factor=rf,
            asha_scope=scope,
            asha_mode=mode,
        )
    )


# (trial, family, fusion, iteration, best_val_mae) in arrival order: LightGBM's numbers are 20x better
MIXED = [
    ("l1", "lgbm", "none", 1, 0.10),
    ("l1", "lgbm", "none", 2, 0.09),
    ("l2", "lgbm", "none", 1, 0.12),  # worse than l1 at rung 1: stopped by l1
    ("r1", "rf", "none", 1, 0.05),  # one shot: outside every rung
    ("g1", "cgcnn", "none", 1, 2.0),
    ("g1", "cgcnn", "none", 2, 1.5),
    ("g2", "cgcnn", "none", 1, 3.0),  # worse than g1 at rung 1
    ("e1", "cgcnn", "early", 1, 2.5),
    ("e1", "cgcnn", "early", 2, 2.4),
    ("l3", "lgbm", "none", 1, 0.08),
    ("l3", "lgbm", "none", 2, 0.07),
    ("g1", "cgcnn", "none", 3, 1.4),
    ("g1", "cgcnn", "none", 4, 1.3),
]


def feed(sched, results=MIXED):
    """Tune's calls for ``results``: add at the first result, complete when stopped; returns
    (trial, iteration) -> decision."""
    trials, stopped, decisions = {}, set(), {}
    for tid, family, fusion, it, val in results:
        if tid in stopped:
            continue
        if tid not in trials:
            trials[tid] = trial(tid, family, fusion)
            sched.on_trial_add(None, trials[tid])
        decision = sched.on_trial_result(None, trials[tid], res(it, val))
        decisions[(tid, it)] = decision
        if decision == STOP or family == "rf":
            stopped.add(tid)
            sched.on_trial_complete(None, trials[tid], res(it, val))
    return decisions


def test_a_gnn_trial_is_never_stopped_by_lightgbm_or_rf_results():
    """Family-fair (the default): the CGCNN trials are judged against CGCNN trials of the same fusion
    only; LightGBM's far better numbers at the same iterations stop none of them.  Family-blind
    (asha_scope all, the old behaviour): the first CGCNN trial is stopped at its first rung."""
    fair = scheduler("group")
    assert isinstance(fair, TabularAwareASHA) and fair.scope == "group"
    decisions = feed(fair)
    assert decisions[("g1", 1)] == decisions[("g1", 2)] == decisions[("g1", 4)] == CONTINUE
    assert decisions[("e1", 1)] == decisions[("e1", 2)] == CONTINUE
    assert decisions[("g2", 1)] == STOP  # a group's rungs still prune: g2 lost to g1
    assert decisions[("l2", 1)] == STOP and decisions[("r1", 1)] == CONTINUE
    # each group's decisions are exactly Ray's ASHA fed that group's results alone
    for group in ("lgbm", "cgcnn-none", "cgcnn-early"):
        alone = [r for r in MIXED if families.group_of({"family": r[1], "fusion": r[2]}) == group]
        plain = feed(
            ASHAScheduler(
                time_attr="training_iteration", metric=SCORE, mode="min", max_t=8, grace_period=1, reduction_factor=2
            ),
            alone,
        )
        assert {k: v for k, v in decisions.items() if k[0] in {r[0] for r in alone}} == plain, group
    # the rungs, per group, hold that group's trials only (and no rf)
    rungs = fair.rungs()
    assert {r["group"] for r in rungs} == {"lgbm", "cgcnn-none", "cgcnn-early"}
    first = {r["group"]: r["recorded"] for r in rungs if r["milestone"] == 1}
    assert first == {
        "lgbm": {"l1": 0.10, "l2": 0.12, "l3": 0.08},
        "cgcnn-none": {"g1": 2.0, "g2": 3.0},
        "cgcnn-early": {"e1": 2.5},
    }
    assert [r["milestone"] for r in rungs if r["group"] == "lgbm"] == [1, 2, 4, 8]

    blind = scheduler("all")
    assert blind.scope == "all"
    old = feed(blind)
    assert old[("g1", 1)] == STOP and old[("e1", 1)] == STOP  # LightGBM set the cutoff
    assert {r["group"] for r in blind.rungs()} == {"all"}
    assert set(next(r for r in blind.rungs() if r["milestone"] == 1)["recorded"]) == {
        "l1",
        "l2",
        "l3",
        "g1",
        "g2",
        "e1",
    }


class Controller:
    """What a scheduler asks of Tune's controller: the trials, the search algorithm (is it
    finished?) and stop_trial."""

    def __init__(self, trials, finished=False):
        self.trials, self.finished, self.stopped = trials, finished, []
        self.search_alg = self

    def is_finished(self):
        return self.finished

    def get_trials(self):
        return list(self.trials.values())

    def stop_trial(self, t):
        self.stopped.append(t.trial_id)
        t.set_status(Trial.TERMINATED)


def report(sched, ctl, tid, it, val):
    decision = sched.on_trial_result(ctl, ctl.trials[tid], res(it, val))
    if decision == PAUSE:
        ctl.trials[tid].set_status(Trial.PAUSED)
    return decision


def run_next(sched, ctl):
    t = sched.choose_trial_to_run(ctl)
    if t is not None:
        t.set_status(Trial.RUNNING)
    return None if t is None else t.trial_id


def promote_setup(scope):
    pauses, resumes = [], []
    sched = scheduler(scope, mode="promote", max_epochs=4, grace=1, rf=2)
    assert isinstance(sched, PromotingASHA)
    sched.listen(lambda tid, r: pauses.append(tid), resumes.append)
    specs = {
        "a1": ("cgcnn", "none"),
        "a2": ("cgcnn", "none"),
        "b1": ("lgbm", "none"),
        "b2": ("lgbm", "none"),
        "b3": ("lgbm", "none"),
    }
    ctl = Controller({tid: trial(tid, *spec) for tid, spec in specs.items()})
    for t in ctl.trials.values():
        sched.on_trial_add(ctl, t)
        t.set_status(Trial.RUNNING)
    return sched, ctl, pauses, resumes


def test_promote_mode_resumes_a_paused_trial_only_by_its_own_group():
    """asha_mode promote, per group: a CGCNN trial paused alone at its rung stays paused however
    many (worse) LightGBM results come to the same milestone, and goes on only when a second
    CGCNN trial makes it the best of its own rung.  Family-blind, the LightGBM results resume it."""
    sched, ctl, pauses, resumes = promote_setup("group")
    assert report(sched, ctl, "a1", 1, 2.0) == PAUSE  # alone in its rung: waits
    for tid, val in (("b1", 5.0), ("b2", 6.0), ("b3", 7.0)):
        assert report(sched, ctl, tid, 1, val) == PAUSE  # b1 is best of lgbm's rung but came first
    assert sched.waiting() == {"a1": ("cgcnn-none", 1), "b1": ("lgbm", 1), "b2": ("lgbm", 1), "b3": ("lgbm", 1)}
    assert run_next(sched, ctl) == "b1"  # lgbm's rung (3 results: best 1 may go on) resumes its own trial
    assert run_next(sched, ctl) is None  # a1 is alone in its rung: nothing of lgbm's frees it
    assert "a1" in sched.waiting() and resumes == ["b1"]
    assert report(sched, ctl, "a2", 1, 3.0) == PAUSE  # cgcnn's rung now holds 2: a1 is its best
    assert run_next(sched, ctl) == "a1"
    assert resumes == ["b1", "a1"] and pauses == ["a1", "b1", "b2", "b3", "a2"]

    # the end of the search: cgcnn has nothing running, so it finishes its rung (a1 was sent on
    # already: a2 ends); lgbm still has b1 running, so b2 and b3 keep waiting
    ctl.trials["a1"].set_status(Trial.TERMINATED)
    sched.on_trial_complete(ctl, ctl.trials["a1"], res(4, 1.0))
    ctl.finished = True
    assert run_next(sched, ctl) is None
    assert ctl.stopped == ["a2"] and set(sched.waiting()) == {"b2", "b3"}

    # family-blind: the LightGBM results at rung 1 make the CGCNN trial the rung's best: resumed
    sched, ctl, pauses, resumes = promote_setup("all")
    assert report(sched, ctl, "a1", 1, 2.0) == PAUSE
    for tid, val in (("b1", 5.0), ("b2", 6.0), ("b3", 7.0)):
        assert report(sched, ctl, tid, 1, val) == PAUSE
    assert run_next(sched, ctl) == "a1"


def test_restore_replays_each_trial_into_its_groups_rungs(tmp_path):
    """Tuner.restore adds the snapshot's trials to a fresh copy of the scheduler (unpickled): each
    trial's result history is replayed into its own group's rungs."""
    sched = scheduler("group", max_epochs=4)
    fresh = pickle.loads(pickle.dumps(sched))  # what tuner.pkl gives back
    assert fresh.scope == "group" and fresh.rungs() == []
    histories = {
        "g1": ("cgcnn", "early", [(1, 2.0), (2, 1.5), (3, 1.4)], 2),
        "l1": ("lgbm", "none", [(1, 0.2), (2, 0.1)], 2),
        "g2": ("cgcnn", "none", [(1, 3.0)], 1),
    }
    for tid, (family, fusion, rows, upto) in histories.items():
        storage = compat.trial_storage(str(tmp_path), "exp", f"{tid}_dir")
        t = trial(tid, family, fusion, storage)
        Path(t.path).mkdir(parents=True)
        Path(t.path, "result.json").write_text("\n".join(json.dumps(res(i, v)) for i, v in rows) + "\n")
        t.run_metadata.last_result = res(*rows[upto - 1])
        fresh.on_trial_add(None, t)
    by_group = {}
    for r in fresh.rungs():
        by_group.setdefault(r["group"], {})[r["milestone"]] = r["recorded"]
    assert by_group == {
        "cgcnn-early": {1: {"g1": 2.0}, 2: {"g1": 1.5}, 4: {}},
        "lgbm": {1: {"l1": 0.2}, 2: {"l1": 0.1}, 4: {}},
        "cgcnn-none": {1: {"g2": 3.0}, 2: {}, 4: {}},
    }
    # a new cgcnn-none trial worse than g2 at rung 1 is stopped by the replayed g2, not by lgbm
    g3 = trial("g3", "cgcnn", "none")
    fresh.on_trial_add(None, g3)
    assert fresh.on_trial_result(None, g3, res(1, 3.5)) == STOP
    # a scheduler pickled before scopes existed comes back family-blind
    state = dict(sched.__dict__)
    del state["scope"], state["_groups"]
    old = TabularAwareASHA.__new__(TabularAwareASHA)
    old.__setstate__(state)
    assert old.scope == "all" and old.group(g3) == "all"


# ----------------------------------------------------------------------------- the budget rule
def space(families_=("rf", "lgbm", "cgcnn"), fusions=("none", "early")):
    constants = {"max_epochs": 4, "seed": 0, "patience": 20, "cpus": 1, "targets": ["y"]}
    return define_search_space(
        list(families_), constants, fusions=list(fusions), targets=["y"], task_weighting=["fixed"], preset="quick"
    )


def test_round_robin_points_visit_every_group_and_keep_the_known_good_ones():
    sp = space()
    assert [g for g, _ in sp.groups()] == ["rf", "lgbm", "cgcnn-none", "cgcnn-early"]
    known = sp.default_points()  # rf, lgbm, cgcnn (early), lgbm (l1 objective)
    points = sp.round_robin_points(2, known)
    assert [sp.group_of_point(p) for p in points] == ["rf", "lgbm", "cgcnn-none", "cgcnn-early"] * 2
    assert points[0] == known[0] and points[1] == known[1] and points[3] == known[2] and points[5] == known[3]
    assert points[2] == {"family": "cgcnn", "cgcnn/fusion": "none"} and points[4] == {"family": "rf"}
    # a third known-good point of a group beyond its minimum follows the round robin
    assert [sp.group_of_point(p) for p in sp.round_robin_points(1, known)] == [
        "rf",
        "lgbm",
        "cgcnn-none",
        "cgcnn-early",
        "lgbm",
    ]
    assert sp.round_robin_points(0, known) == known
    one = space(("cgcnn",), ("none",))
    assert one.round_robin_points(3, []) == []  # one group: nothing to be fair across


def test_the_searcher_proposes_the_round_robin_then_tpe_chooses(capsys):
    """The real OptunaSearch: the first groups x min_trials_per_group trials cover every group in
    round robin (the sampler fills in the other parameters), the rest are TPE's."""
    s = SearchConfig(
        families=["rf", "lgbm", "cgcnn"],
        fusions=["none", "early"],
        num_samples=12,
        max_concurrent=12,
        min_trials_per_group=2,
        seed=1,
    )
    limiter = build_searcher(s, space(), space().default_points())
    configs = [limiter.suggest(f"t{k}") for k in range(12)]
    groups = [families.group_of(c) for c in configs]
    assert groups[:8] == ["rf", "lgbm", "cgcnn-none", "cgcnn-early"] * 2, groups
    assert len({json.dumps(c, sort_keys=True) for c in configs}) == 12
    assert "warning" not in capsys.readouterr().err

    small = s.model_copy(update={"num_samples": 3})
    points = fair_start(small, space(), [])
    assert [space().group_of_point(p) for p in points[:3]] == ["rf", "lgbm", "cgcnn-none"]
    err = capsys.readouterr().err
    assert err.count("warning") == 1 and "cgcnn-early 0" in err and "rf 1" in err
    assert fair_start(s.model_copy(update={"min_trials_per_group": 0}), space(), []) == []


def test_group_share_rule_gives_the_least_used_group_in_contention():
    """budget_rule share: equal training time per group; a running trial counts at least its
    group's median ended trial; a group whose best finished trial is over (1 + margin) x the best
    group's leaves the share; a GNN stopped at a rung is judged by nothing."""
    from matfusion.search.optuna_search import GroupShareRule

    rule = GroupShareRule(["rf", "lgbm", "cgcnn-none"], margin=0.25)
    assert rule.choose("t0") == "rf"  # nothing used: the first group on a tie
    for tid, group, secs, val in [("a", "rf", 5, 0.30), ("b", "lgbm", 20, 0.10), ("c", "cgcnn-none", 100, 0.12)]:
        rule.started(tid, group)
        rule.ended(tid, {"time_total_s": secs, "trial_finished": True}, val)
    # rf: 0.30 > 1.25 x 0.10: out, although it used the least time
    assert rule.contenders() == ["lgbm", "cgcnn-none"]
    assert rule.choose("t1") == "lgbm"
    rule.started("d", "lgbm")  # running, nothing reported: counts lgbm's median (20 s)
    assert rule.group_times() == {"rf": 5.0, "lgbm": 40.0, "cgcnn-none": 100.0}
    rule.reported("d", {"time_total_s": 30})
    assert rule.group_times()["lgbm"] == 50.0
    rule.ended("d", {"time_total_s": 90, "trial_finished": True}, 0.11)
    assert rule.group_times()["lgbm"] == 110.0 and rule.choose("t2") == "cgcnn-none"
    rule.started("e", "cgcnn-none")
    rule.ended("e", {"time_total_s": 8, "trial_finished": False}, 0.01)  # cut at a rung: not ranked
    assert rule.finished_best["cgcnn-none"] == 0.12 and rule.choose("t3") == "cgcnn-none"
    summary = rule.summary()
    assert summary["group_time_s"] == {"rf": 5.0, "lgbm": 110.0, "cgcnn-none": 108.0}
    assert [c["group"] for c in summary["choices"]] == ["rf", "lgbm", "cgcnn-none", "cgcnn-none"]
    json.dumps(summary)
    wide = GroupShareRule(["rf", "lgbm"], margin=5.0)
    wide.started("a", "rf")
    wide.ended("a", {"time_total_s": 5}, 0.3)
    wide.started("b", "lgbm")
    wide.ended("b", {"time_total_s": 20}, 0.1)
    assert wide.choose() == "rf"  # within a wide margin rf stays in and has used less


def test_the_share_searcher_enqueues_the_rules_group_after_the_round_robin():
    """The real OptunaSearch under budget_rule share: the round robin first, then every trial is
    in the group the rule chose when it was proposed (TPE fills in the group's parameters)."""
    s = SearchConfig(
        families=["rf", "lgbm", "cgcnn"],
        fusions=["none", "early"],
        num_samples=20,
        max_concurrent=20,
        min_trials_per_group=1,
        budget_rule="share",
        share_margin=1.0,
        seed=1,
    )
    limiter = build_searcher(s, space())
    inner = limiter.searcher
    cost = {"rf": 2.0, "lgbm": 5.0, "cgcnn-none": 40.0, "cgcnn-early": 30.0}
    score = {"rf": 0.5, "lgbm": 0.2, "cgcnn-none": 0.3, "cgcnn-early": 0.25}
    groups = []
    for k in range(16):
        config = limiter.suggest(f"t{k}")
        group = families.group_of(config)
        groups.append(group)
        limiter.on_trial_result(f"t{k}", {SCORE: score[group], "training_iteration": 1, "time_total_s": cost[group]})
        limiter.on_trial_complete(
            f"t{k}", {SCORE: score[group], "training_iteration": 1, "time_total_s": cost[group], "trial_finished": True}
        )
    assert groups[:4] == ["rf", "lgbm", "cgcnn-none", "cgcnn-early"], groups
    chosen = [c for c in inner.rule.choices]
    assert [g for _, g, _ in chosen] == groups[4:]
    for _, group, times in chosen:  # the least-used group in contention (rf 0.5 > 2 x 0.2: out)
        assert group != "rf" and times[group] == min(times[g] for g in ("lgbm", "cgcnn-none", "cgcnn-early"))
    used = inner.rule.group_times()
    assert max(used[g] for g in ("lgbm", "cgcnn-none", "cgcnn-early")) - min(
        used[g] for g in ("lgbm", "cgcnn-none", "cgcnn-early")
    ) <= max(cost.values())
    assert groups.count("lgbm") > 3 * groups.count("cgcnn-none")
    tpe = build_searcher(s.model_copy(update={"budget_rule": "tpe"}), space()).searcher
    assert not hasattr(tpe, "rule")


def test_config_fields():
    s = SearchConfig()
    assert s.asha_scope == "group" and s.min_trials_per_group == 2
    assert s.budget_rule == "tpe" and s.share_margin == 0.25
    with pytest.raises(ValueError, match="budget_rule"):
        SearchConfig(budget_rule="bandit")
    with pytest.raises(ValueError, match="asha_scope"):
        SearchConfig(asha_scope="family")
    with pytest.raises(ValueError, match="min_trials_per_group"):
        SearchConfig(min_trials_per_group=-1)
    assert build_scheduler(SearchConfig(asha_scope="all")).scope == "all"
    assert build_scheduler(SearchConfig(asha_mode="promote")).scope == "group"


# ----------------------------------------------------------------------------- the leaderboard
def test_group_summary_and_the_printed_result():
    import pandas as pd

    board = pd.DataFrame(
        [
            {"trial_id": "a", "family": "lgbm", "fusion": "-", "val_mae": 0.12, "epochs": 40, "status": "completed"},
            {
                "trial_id": "b",
                "family": "cgcnn",
                "fusion": "early",
                "val_mae": 0.10,
                "epochs": 30,
                "status": "completed",
            },
            {"trial_id": "c", "family": "cgcnn", "fusion": "early", "val_mae": 0.20, "epochs": 4, "status": "pruned"},
            {
                "trial_id": "d",
                "family": "cgcnn",
                "fusion": "none",
                "val_mae": float("nan"),
                "epochs": 0,
                "status": "failed",
            },
            {"trial_id": "e", "family": "rf", "fusion": "-", "val_mae": 0.17, "epochs": 1, "status": "completed"},
            {"trial_id": "f", "family": "lgbm", "fusion": "-", "val_mae": 0.13, "epochs": 7, "status": "stopped"},
        ]
    )
    summary = group_summary(board)
    assert list(summary.columns) == GROUP_SUMMARY_COLUMNS
    assert list(summary["group"]) == ["cgcnn-early", "lgbm", "rf", "cgcnn-none"]
    rows = summary.set_index("group")
    assert rows.loc["cgcnn-early"].tolist() == [2, 1, 1, 0.10, 34]
    assert rows.loc["lgbm"].tolist() == [2, 1, 0, 0.12, 47]
    assert rows.loc["cgcnn-none", "trials"] == 1 and pd.isna(rows.loc["cgcnn-none", "best_val_mae"])
    assert group_summary(board.iloc[:0]).empty

    result = SearchResult("s", "1", "p", "sqlite:///x.db", board, None, float("nan"), float("nan"), 1.0)
    text = format_result(result)
    tail = text[text.index("Best of each group") :].splitlines()
    assert tail[1].split() == GROUP_SUMMARY_COLUMNS
    assert tail[2].split() == ["cgcnn-early", "2", "1", "1", "0.1", "34"]
    assert tail[5].split() == ["cgcnn-none", "1", "0", "0", "-", "0"]


def test_cli_leaderboard_prints_the_group_summary(tmp_path, capsys, monkeypatch):
    from mlflow.tracking import MlflowClient
    from search_records import MAIN_TRIALS, write_search

    from matfusion.cli import main
    from matfusion.tracking.logger import ensure_experiment

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    client = MlflowClient(uri)
    write_search(client, ensure_experiment(client, "main", str(tmp_path / "art")), MAIN_TRIALS, tmp_path=tmp_path)
    assert main(["leaderboard", "--tracking-uri", uri]) == 0
    out = capsys.readouterr().out
    tail = out[out.index("best of each group") :].splitlines()
    assert tail[1].split() == GROUP_SUMMARY_COLUMNS
    rows = {line.split()[0]: line.split() for line in tail[2:] if line.strip()}
    # MAIN_TRIALS: rf a/b/c; cgcnn none a/c/e (c pruned, e failed), early b, attention d (pruned)
    assert rows["cgcnn-early"] == ["cgcnn-early", "1", "1", "0", "0.4", "4"]
    assert rows["rf"] == ["rf", "3", "3", "0", "0.45", "3"]
    assert rows["cgcnn-none"] == ["cgcnn-none", "3", "1", "1", "0.55", "5"]
    assert rows["cgcnn-attention"] == ["cgcnn-attention", "1", "0", "1", "0.7", "2"]


# ----------------------------------------------------------------------------- one real search
@pytest.mark.slow
def test_real_search_round_robin_and_per_group_promotion(tmp_path, data_dir):
    """Real Ray Tune + MLflow, asha_mode promote, families rf, lgbm, cgcnn x fusions none, early:
    the 8 trials (4 groups x min_trials_per_group 2) are the round robin over the groups, in order;
    each epoch-trained group's rung 1 holds its own two trials only, so none leaves it while trials
    come (2 < reduction_factor 3); at the end each group sends its best on to max_epochs (ceil(2/3))
    and the other ends at rung 1."""
    from test_search_wiring import smoke_search

    proc, client, parent, nested = smoke_search(
        tmp_path,
        data_dir,
        {
            "search.num_samples": 8,
            "search.max_epochs": 3,
            "search.reduction_factor": 3,
            "search.families": "[rf, lgbm, cgcnn]",
            "search.fusions": "[none, early]",
            "search.asha_mode": "promote",
            "search.min_trials_per_group": 2,
            "search.checkpoint_every": 5,
            "search.max_concurrent": 2,
            "search.cpus_per_trial": 1,
        },
        timeout=500,
    )
    assert len(nested) == 8 and {r.info.status for r in nested} == {"FINISHED"}
    created = []  # Tune names a trial's folder run_trial_<id>_<its number in creation order>_...
    for d in (tmp_path / "ray" / "phonons-smoke").glob("run_trial_*"):
        number = int(re.match(r"run_trial_[0-9a-f]+_(\d+)_", d.name).group(1))
        created.append((number, families.group_of(json.loads((d / "params.json").read_text()))))
    order = [g for _, g in sorted(created)]
    assert order == ["rf", "lgbm", "cgcnn-none", "cgcnn-early"] * 2, order

    group = {
        r.data.tags["trial_id"]: families.group_of(
            {"family": r.data.tags["family"], "fusion": r.data.params.get(f"{r.data.tags['family']}.fusion")}
        )
        for r in nested
    }
    history = {
        tid: {m.step: m.value for m in client.get_metric_history(r.info.run_id, "val_mae")}
        for tid, r in ((r.data.tags["trial_id"], r) for r in nested)
    }
    rungs = json.loads(
        Path(client.download_artifacts(parent.info.run_id, "asha_rungs.json", str(tmp_path))).read_text()
    )["rungs"]
    first = {r["group"]: r["recorded"] for r in rungs if r["milestone"] == 1}
    assert set(first) == {"lgbm", "cgcnn-none", "cgcnn-early"}
    for g, recorded in first.items():
        mine = [t for t, gg in group.items() if gg == g]
        assert sorted(recorded) == sorted(mine), (g, recorded)
        best = min(recorded, key=recorded.get)
        assert len(history[best]) == 3, (g, history)  # sent on at the end, trained to max_epochs
        assert [len(history[t]) for t in mine if t != best] == [1], (g, history)
    assert [len(h) for t, h in history.items() if group[t] == "rf"] == [1, 1]
    assert "Best of each group" in proc.stdout


@pytest.mark.slow
def test_real_search_under_the_share_rule(tmp_path, data_dir):
    """Real Ray Tune + MLflow, budget_rule share: after the round robin (one trial per group) every
    trial went to the group with the least training time when it was proposed, and the times the
    rule kept (budget_share.json on the parent run) are Tune's own time_total_s, summed per group."""
    from test_search_wiring import smoke_search

    num_samples = 7
    _, client, parent, nested = smoke_search(
        tmp_path,
        data_dir,
        {
            "search.num_samples": num_samples,
            "search.max_epochs": 2,
            "search.families": "[rf, lgbm, cgcnn]",
            "search.min_trials_per_group": 1,
            "search.budget_rule": "share",
            "search.share_margin": 10,
            "search.max_concurrent": 2,
            "search.cpus_per_trial": 1,
        },
        timeout=500,
    )
    assert len(nested) == num_samples
    share = json.loads(
        Path(client.download_artifacts(parent.info.run_id, "budget_share.json", str(tmp_path))).read_text()
    )
    tune_group, tune_time = {}, {}
    for d in (tmp_path / "ray" / "phonons-smoke").glob("run_trial_*"):
        tid = re.match(r"run_trial_([0-9a-f]+)_", d.name).group(1)
        tune_group[tid] = families.group_of(json.loads((d / "params.json").read_text()))
        lines = [json.loads(x) for x in (d / "result.json").read_text().splitlines() if x.strip()]
        tune_time[tid] = lines[-1]["time_total_s"]
    assert len(tune_group) == num_samples
    assert len(share["choices"]) == num_samples - 3
    for choice in share["choices"]:
        times = choice["times"]
        assert tune_group[choice["trial_id"]] == choice["group"]
        assert times[choice["group"]] == min(times.values()), choice
    for group in ("rf", "lgbm", "cgcnn-none"):
        want = sum(t for tid, t in tune_time.items() if tune_group[tid] == group)
        assert share["group_time_s"][group] == pytest.approx(want, rel=1e-6), (group, share, tune_time)
