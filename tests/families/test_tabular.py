"""Tabular families (rf, et, lgbm) on the descriptor matrix: chunked LightGBM reporting and
resuming through the loop's sessions, pruned by the search's ASHA under real Ray Tune, one model
per target, spaces, stacking with an lgbm member (and its pyfunc featurizing new structures),
and a real search mixing tabular and GNN families."""

import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import DATA_DIR, REPO

from matfusion import families
from matfusion.config import DataConfig, FeaturesConfig, SearchConfig
from matfusion.data import load_dataset, split_fold
from matfusion.data.featurize import featurize
from matfusion.search.schedulers import ONE_SHOT_FAMILIES as ONE_SHOT
from matfusion.spaces import define_search_space, resolve_specs
from matfusion.trainables.lgbm import ChunkedLGBM
from matfusion.trainables.loop import LocalSession
from matfusion.trainables.tabular import rounds_per_epoch
from matfusion.trainables.trial import fit_family, load_trial_state, predict_from_state, run_trial
from matfusion.trainables.trial_data import pack_rows, pack_trial_data

LGBM = {
    "family": "lgbm",
    "lgbm": {
        "n_estimators": 120,
        "learning_rate": 0.1,
        "num_leaves": 15,
        "min_child_samples": 5,
        "feature_fraction": 0.7,
        "bagging_fraction": 0.8,
    },
    "max_epochs": 6,
    "seed": 0,
    "patience": 50,
    "cpus": 1,
}


@pytest.fixture(scope="module")
def phonons(tmp_path_factory):
    if DATA_DIR is None:
        pytest.fail("real data not found: set MATFUSION_DATA or place ../shared/data beside the repo")
    ds = load_dataset(DataConfig(source="matbench_phonons", limit=160, data_dir=str(DATA_DIR)))
    split = split_fold(ds, 0)
    fs = featurize(ds, FeaturesConfig(n_jobs=2, cache_dir=str(tmp_path_factory.mktemp("fc"))), progress=False)
    data = pack_trial_data(fs.descriptors, fs.graphs, ds.targets, split.train, split.val)
    return ds, split, fs, data


def test_lgbm_reports_every_chunk_and_resumes_to_the_same_trees(phonons):
    _, split, fs, data = phonons
    assert rounds_per_epoch(LGBM) == 20
    full = LocalSession()
    state = fit_family(LGBM, data, full)
    assert [h["epoch"] for h in full.history] == [1, 2, 3, 4, 5, 6]
    assert [h["rounds"] for h in full.history] == [20, 40, 60, 80, 100, 120]
    vals = [h["val_mae"] for h in full.history]
    assert all(np.isfinite(vals)) and len(set(vals)) > 1  # a metric per chunk, not one number
    assert [h["trial_finished"] for h in full.history] == [False] * 5 + [True]
    assert state["best_val_mae"] == pytest.approx(min(vals))
    assert state["best_rounds"] == 20 * (int(np.argmin(vals)) + 1)

    # stopped after chunk 3 (as ASHA or a killed node would), restored from that checkpoint
    first = _KilledAfter(3)
    with pytest.raises(KeyboardInterrupt):
        fit_family(LGBM, data, first)
    assert first.last_state["epoch"] == 3
    resumed = LocalSession(resume_state=first.last_state)
    again = fit_family(LGBM, data, resumed)
    assert [h["epoch"] for h in resumed.history] == [4, 5, 6]
    np.testing.assert_allclose([h["val_mae"] for h in resumed.history], vals[3:], rtol=0, atol=1e-9)
    test = pack_rows(fs.descriptors, None, np.zeros(len(fs.descriptors)), split.test)
    np.testing.assert_allclose(predict_from_state(LGBM, again, test, {}), predict_from_state(LGBM, state, test, {}))


class _KilledAfter(LocalSession):
    """A session whose trial is killed right after its ``n``-th report (its checkpoint kept)."""

    def __init__(self, n):
        super().__init__()
        self.n = n

    def report(self, metrics, state):
        super().report(metrics, state)
        if len(self.history) >= self.n:
            raise KeyboardInterrupt


def test_lgbm_early_stopping_and_best_rounds():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(200, 5))
    y = rng.normal(size=200)  # pure noise: validation gets worse as boosting overfits
    data = {"train": {"descriptors": X[:150], "y": y[:150]}, "val": {"descriptors": X[150:], "y": y[150:]}}
    cfg = dict(LGBM, max_epochs=30, patience=3, lgbm=dict(LGBM["lgbm"], n_estimators=300))
    s = LocalSession()
    state = fit_family(cfg, data, s)
    assert len(s.history) < 30 and s.history[-1]["trial_finished"]
    assert len(s.history) - state["best_epoch"] == 3
    model = ChunkedLGBM.from_state(state["lgbm"][0])
    pred = predict_from_state(cfg, state, {"descriptors": X[150:]}, {})
    np.testing.assert_allclose(pred, model.predict(X[150:], state["best_rounds"]))


def test_multi_target_one_model_per_target_on_its_labelled_rows():
    rng = np.random.default_rng(1)
    X = rng.normal(size=(120, 4))
    y = np.stack([X[:, 0] * 3, -X[:, 1]], axis=1)
    y[::3, 0] = np.nan  # missing labels of target 0
    y[1::3, 1] = np.nan
    data = {"train": {"descriptors": X[:100], "y": y[:100]}, "val": {"descriptors": X[100:], "y": y[100:]}}
    for family in ("lgbm", "et", "rf"):
        cfg = {
            "family": family,
            family: {"n_estimators": 60},
            "max_epochs": 3,
            "seed": 0,
            "cpus": 1,
            "targets": ["a", "b"],
        }
        s = LocalSession()
        state = fit_family(cfg, data, s)
        assert {"val_mae_a", "val_mae_b"} <= set(s.history[-1])
        pred = predict_from_state(cfg, state, {"descriptors": X[100:]}, {})
        assert pred.shape == (20, 2) and np.isfinite(pred).all()
        labelled = np.isfinite(y[100:, 0])
        assert np.mean(np.abs(pred[labelled, 0] - y[100:][labelled, 0])) < np.std(y[:100][np.isfinite(y[:100, 0]), 0])


def test_forests_report_once_and_are_one_shot(phonons, tmp_path):
    _, split, fs, data = phonons
    for family in ("et", "rf"):
        cfg = {"family": family, family: {"n_estimators": 40}, "seed": 0, "cpus": 1}
        s = LocalSession()
        state = fit_family(cfg, data, s)
        assert len(s.history) == 1 and s.history[0]["trial_finished"] and s.history[0]["epoch"] == 1
        # the checkpoint a Tune trial writes for it, and its reload
        d = tmp_path / family
        d.mkdir()
        families.get(family).write_checkpoint(state, str(d))
        assert [p.name for p in d.iterdir()] == ["model.pkl"]
        test = pack_rows(fs.descriptors, None, np.zeros(len(fs.descriptors)), split.test)
        np.testing.assert_array_equal(
            predict_from_state(cfg, load_trial_state(cfg, str(d)), test, {}), predict_from_state(cfg, state, test, {})
        )
    assert {"rf", "et"} <= ONE_SHOT and "lgbm" not in ONE_SHOT  # lgbm is prunable by ASHA


def test_spaces_and_config_know_the_tabular_families():
    assert not families.get("lgbm").graph and not families.get("et").graph
    specs = resolve_specs(
        ["lgbm", "et"], "default", overrides={"lgbm.objective": ["l1", "huber"], "et.n_estimators": 300}
    )
    assert specs["lgbm"]["objective"].choices == ("l1", "huber") and specs["et"]["n_estimators"] == ("fixed", 300)
    space = define_search_space(
        ["rf", "lgbm", "et", "cgcnn"], {"max_epochs": 5}, fusions=["none"], targets=["a", "b"], task_weighting=["tuned"]
    )
    points = space.default_points()
    assert [p["family"] for p in points] == ["rf", "lgbm", "et", "cgcnn", "lgbm"]
    assert points[1]["lgbm/objective"] == "l2" and points[4]["lgbm/objective"] == "l1"
    assert {k: v for k, v in points[4].items() if k != "lgbm/objective"} == {
        k: v for k, v in points[1].items() if k != "lgbm/objective"
    }
    # a space without l1 gets no L1 variant
    narrowed = define_search_space(["lgbm"], {}, overrides={"lgbm.objective": ["l2", "huber"]})
    assert [p["lgbm/objective"] for p in narrowed.default_points()] == ["l2"]
    fixed = define_search_space(["lgbm"], {}, overrides={"lgbm.objective": "huber"})
    assert [p["family"] for p in fixed.default_points()] == ["lgbm"]
    assert "fusion" not in str([p for p in points if p["family"] in ("lgbm", "et")])
    import optuna

    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(12):
        trial = study.ask()
        space(trial)
        fam = trial.params["family"]
        assert all(k.startswith(f"{fam}/") or k in ("family",) or k.startswith("multitask/") for k in trial.params)
        if fam in ("lgbm", "et", "rf"):  # one model per target: no loss weights to search
            assert not any(k.startswith("multitask/") for k in trial.params)
    assert SearchConfig(families=["lgbm", "et"]).families == ["lgbm", "et"]


@pytest.mark.slow
def test_lgbm_trials_are_pruned_by_asha_under_real_ray_tune(phonons, tmp_path):
    """Real Ray Tune + the search's ASHA: lgbm trials report every chunk; trials clearly worse at
    the first rung are stopped there (learning rate 1e-4 barely moves the prediction), the good
    ones run all their epochs; an et trial beside them is never stopped nor put in a rung."""
    import ray
    from ray import tune

    from matfusion.search.schedulers import TabularAwareASHA

    _, _, _, data = phonons
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    try:
        base = dict(LGBM, max_epochs=4)
        configs = [dict(base, lgbm=dict(base["lgbm"], learning_rate=lr)) for lr in (0.2, 0.1, 1e-4, 1e-4)]
        configs.append({"family": "et", "et": {"n_estimators": 30}, "seed": 0, "cpus": 1, "max_epochs": 4})
        scheduler = TabularAwareASHA(
            time_attr="training_iteration",
            metric="best_val_mae",
            mode="min",
            max_t=4,
            grace_period=1,
            reduction_factor=2,
        )
        # trial i gets configs[i] (resolved in the driver; the workers run matfusion's run_trial on it,
        # without the grid's index "i", which is no key of a trial config)
        space = {"i": tune.grid_search(list(range(len(configs))))}
        for key in ("family", "lgbm", "et", "max_epochs", "seed", "patience", "cpus"):
            space[key] = tune.sample_from(lambda spec, key=key: configs[spec.config.i].get(key))

        def trainable(config, data):
            run_trial({k: v for k, v in config.items() if k != "i" and v is not None}, data)

        tuner = tune.Tuner(
            tune.with_parameters(trainable, data=data),
            param_space=space,
            tune_config=tune.TuneConfig(scheduler=scheduler, max_concurrent_trials=1, reuse_actors=True),
            run_config=tune.RunConfig(storage_path=str(tmp_path), name="prune", verbose=0),
        )
        results = tuner.fit()
    finally:
        ray.shutdown()
    epochs = {r.config["i"]: int(r.metrics_dataframe["epoch"].max()) for r in results}
    assert not any(r.error for r in results)
    assert epochs[0] == 4  # the first trial sets the rungs and runs to the end
    assert epochs[2] == 1 and epochs[3] == 1  # the 1e-4 trials are stopped at the first rung
    assert epochs[4] == 1  # et reports once
    assert all(r.checkpoint is not None for r in results)


def test_stack_with_lgbm_member_and_pyfunc_featurizes_new_structures(phonons, tmp_path):
    """An lgbm + et stack on the default descriptors; the saved pyfunc model computes the same
    descriptor sets from raw structures (JSON and CIF text) and reproduces the predictions."""
    from matfusion.ensembles.export import featurizer_spec, make_card, save_ensemble_model
    from matfusion.ensembles.stacking import StackedEnsemble, member_name
    from matfusion.families import group_of

    ds, split, fs, _ = phonons
    members = [LGBM, {"family": "et", "et": {"n_estimators": 40}, "seed": 0, "cpus": 1}]
    assert [member_name(m) for m in members] == ["lgbm", "et"]
    assert group_of({"family": "lgbm", "fusion": "-"}) == "lgbm"  # a leaderboard row
    rows = np.sort(np.concatenate([split.train, split.val]))
    ens = StackedEnsemble(members, n_folds=3).fit(fs.descriptors, None, ds.targets, rows)
    assert not ens.needs_graphs and ens.n_features_ == fs.descriptors.shape[1]
    picked = split.test[:6]
    expect, expect_std = ens.predict(fs.descriptors, None, picked)
    spec = featurizer_spec(ens, 6.0, 12, descriptors=fs.descriptor_sets)
    assert spec["descriptors"] == ["magpie", "density", "symmetry", "bonds"] and not spec["graphs"]
    assert featurizer_spec(ens, 6.0, 12)["descriptors"] == spec["descriptors"]  # inferred from the width
    with pytest.raises(ValueError, match="make 132 columns"):
        featurizer_spec(ens, 6.0, 12, descriptors=["magpie"])
    out = tmp_path / "model"
    save_ensemble_model(
        str(out), ens, spec, make_card(ens, ds.name, 0, {"test_mae": 1.0}), [ds.structures[int(r)] for r in picked[:2]]
    )
    # JSON rows are exact; CIF text rounds coordinates, which moves bond lengths by ~1e-6 A: a tree
    # split may then flip, so the CIF row is compared loosely
    cells = [json.dumps(ds.structures[int(r)].as_dict()) for r in picked] + [
        ds.structures[int(picked[0])].to(fmt="cif")
    ]
    script = (
        "import json, sys, mlflow, pandas as pd\n"
        f"m = mlflow.pyfunc.load_model({str(out)!r})\n"
        f"df = m.predict(pd.DataFrame({{'structure': json.loads({json.dumps(json.dumps(cells))})}}))\n"
        "print(json.dumps({'p': df['prediction'].tolist(), 's': df['std'].tolist()}))\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    np.testing.assert_allclose(got["p"][:-1], expect, rtol=0, atol=1e-6)
    np.testing.assert_allclose(got["s"][:-1], expect_std, rtol=0, atol=1e-6)
    assert got["p"][-1] == pytest.approx(expect[0], rel=0.02)


@pytest.mark.slow
def test_search_mixing_tabular_and_gnn_families_end_to_end(tmp_path, data_dir):
    """`matfusion search` with lgbm, et and cgcnn on 120 phonons rows (real Ray, MLflow); then
    `matfusion ensemble` stacks an lgbm member with the others."""
    from mlflow.tracking import MlflowClient

    db = tmp_path / "mlruns.db"
    common = ["--set", f"mlflow.tracking_uri=sqlite:///{db}"]
    cmd = [
        sys.executable,
        "-m",
        "matfusion.cli",
        "search",
        str(REPO / "configs" / "smoke.yaml"),
        "--data-dir",
        str(data_dir),
        "--quiet",
        "--set",
        "data.limit=120",
        "--set",
        "search.num_samples=5",
        "--set",
        "search.max_epochs=3",
        "--set",
        "search.grace_period=1",
        "--set",
        "search.families=[lgbm, et, cgcnn]",
        "--set",
        "search.fusions=[none, early]",
        "--set",
        "search.preset=quick",
        "--set",
        f"mlflow.artifact_location={tmp_path / 'artifacts'}",
        "--set",
        f"search.storage_path={tmp_path / 'ray'}",
        *common,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    client = MlflowClient(f"sqlite:///{db}")
    exp = client.get_experiment_by_name("phonons-smoke")
    runs = client.search_runs([exp.experiment_id])
    nested = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    families = {r.data.tags["family"] for r in nested}
    assert {"lgbm", "et", "cgcnn"} <= families, families  # the default points seed one trial per family
    for r in nested:
        assert r.data.tags["status"] in {"completed", "pruned"}, r.data.tags
        steps = [m.step for m in client.get_metric_history(r.info.run_id, "val_mae")]
        if r.data.tags["family"] == "lgbm":
            assert r.data.tags["fusion"] == "-" and r.data.tags["encoder"] == "-"
            assert len(steps) >= 1 and steps == list(range(1, len(steps) + 1))
            if r.data.tags["status"] == "completed":
                assert len(steps) == 3  # one val_mae per chunk of rounds, max_epochs chunks
        if r.data.tags["family"] == "et":
            assert steps == [1]
    ens = subprocess.run(
        [
            sys.executable,
            "-m",
            "matfusion.cli",
            "ensemble",
            "--experiment",
            "phonons-smoke",
            "--k",
            "1",
            "--folds",
            "2",
            "--max-epochs",
            "2",
            "--data-dir",
            str(data_dir),
            "--tracking-uri",
            f"sqlite:///{db}",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=900,
    )
    assert ens.returncode == 0, ens.stdout[-3000:] + ens.stderr[-3000:]
    assert "member lgbm" in ens.stdout and "member et" in ens.stdout
