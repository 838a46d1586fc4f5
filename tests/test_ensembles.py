"""Stacked ensembles: member selection from MLflow, out-of-fold stacking without leaks, evaluation,
pyfunc export + registry champion alias, prediction on files, and the CLI commands.

Real matbench_phonons rows (150), real MLflow (sqlite in tmp dirs), real (tiny) models."""
import argparse
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from conftest import DATA_DIR, REPO
from matfusion.config import DataConfig, FeaturesConfig
from matfusion.data import load_dataset, split_fold
from matfusion.data.featurize import featurize
from matfusion.ensembles import (StackedEnsemble, evaluate_ensemble, export_model, log_ensemble_model, log_evaluation,
                                 predict_structures, register_ensemble, select_members)
from matfusion.ensembles.commands import add_parsers
from matfusion.ensembles.export import featurizer_spec, make_card
from matfusion.ensembles.stacking import GBMMeta, NNLSMeta, RidgeMeta

LIMIT = 150
TASK = "matbench_phonons"
RF = {"family": "rf", "rf": {"n_estimators": 30, "max_features": 0.5}, "seed": 0, "cpus": 1}
CGCNN = {"family": "cgcnn", "cgcnn": {"hidden": 16, "n_conv": 2, "head_hidden": 16, "fusion": "early", "comp_hidden": 16,
                                      "comp_layers": 1, "fusion_dim": 16, "lr": 3e-3, "batch_size": 32},
         "max_epochs": 2, "seed": 0, "patience": 5, "cpus": 1}
WEAK = {"family": "rf", "rf": {"n_estimators": 2, "max_depth": 1}, "seed": 0, "cpus": 1}
GRAPH_PARAMS = {"gaussian_bins": 40, "gaussian_width": None}


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="session")
def phonons(tmp_path_factory):
    if DATA_DIR is None:
        pytest.fail("real data not found: set MATFUSION_DATA or place ../shared/data beside the repo")
    ds = load_dataset(DataConfig(source=TASK, limit=LIMIT, data_dir=str(DATA_DIR)))
    split = split_fold(ds, 0)
    fs = featurize(ds, FeaturesConfig(n_jobs=2, cache_dir=str(tmp_path_factory.mktemp("fcache"))), progress=False)
    return ds, split, fs


@pytest.fixture(scope="session")
def fitted(phonons):
    ds, split, fs = phonons
    rows = np.sort(np.concatenate([split.train, split.val]))
    ens = StackedEnsemble([RF, CGCNN], meta="nnls", n_folds=3, seed=0)
    return ens.fit(fs.magpie, fs.graphs, ds.targets, rows, GRAPH_PARAMS)


def _tracking(tmp: Path, name: str = "ens-test") -> tuple[str, MlflowClient, str]:
    uri = f"sqlite:///{tmp / 'mlruns.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment(name, artifact_location=(tmp / f"artifacts-{name}").as_uri())
    return uri, client, exp


@pytest.fixture(scope="session")
def shared_store(tmp_path_factory):
    """One sqlite store for the tests that only add runs (a new store costs seconds of migrations)."""
    return tmp_path_factory.mktemp("store")


def _log_model(uri, client, exp, ens, phonons, metrics):
    ds, split, _ = phonons
    run_id = client.create_run(exp, run_name="model").info.run_id
    featurizer = featurizer_spec(ens, 6.0, 12)
    card = make_card(ens, ds.name, split.fold, metrics, data={"source": TASK, "limit": LIMIT})
    info = log_ensemble_model(run_id, ens, featurizer, card, [ds.structures[i] for i in split.test[:2]], tracking_uri=uri)
    client.set_terminated(run_id)
    return info.model_uri


@pytest.fixture(scope="session")
def registry(tmp_path_factory, phonons, fitted):
    """The real ensemble logged and registered (champion) in a fresh sqlite store."""
    tmp = tmp_path_factory.mktemp("registry")
    uri, client, exp = _tracking(tmp)
    ds, split, fs = phonons
    ev = evaluate_ensemble(fitted, fs.magpie, fs.graphs, ds.targets, split.test)
    model_uri = _log_model(uri, client, exp, fitted, phonons, ev.metrics)
    mv, moved = register_ensemble(uri, model_uri, ds.name, split.fold, ev.test_mae)
    assert moved and mv.version in ("1", 1)
    return {"uri": uri, "client": client, "exp": exp, "model_uri": model_uri, "evaluation": ev, "tmp": tmp}


def _parser():
    parser = argparse.ArgumentParser(prog="matfusion")
    add_parsers(parser.add_subparsers(dest="command", required=True))
    return parser


def _mae(a, b):
    return float(np.mean(np.abs(np.asarray(a) - np.asarray(b))))


# ----------------------------------------------------------------------------- meta-learners
def _members(seed=0, n=400, disjoint=True):
    """Targets and an OOF matrix of two members plus an anti-correlated junk column.  With
    ``disjoint`` member a errs only on the first half of the rows and b only on the second;
    otherwise both err everywhere, independently."""
    rng = np.random.default_rng(seed)
    y = rng.normal(10.0, 3.0, n)
    half = np.arange(n) < n // 2
    if disjoint:
        a = y + np.where(half, rng.normal(0, 2.0, n), rng.normal(0, 0.05, n))
        b = y + np.where(~half, rng.normal(0, 2.0, n), rng.normal(0, 0.05, n))
    else:
        a, b = y + rng.normal(0, 1.0, n), y + rng.normal(0, 1.0, n)
    junk = -y + rng.normal(0, 1.0, n)
    return y, np.column_stack([a, b, junk]), half


def _rmse(p, y):
    return float(np.sqrt(np.mean((np.asarray(p) - y) ** 2)))


def test_nnls_meta_beats_best_member_with_independent_errors():
    y, X, _ = _members(disjoint=False)
    meta = NNLSMeta().fit(X, y)
    assert np.all(meta.coef_ >= 0) and meta.coef_[2] == 0.0  # the anti-correlated member is dropped
    assert meta.coef_[0] == pytest.approx(0.5, abs=0.1) and meta.coef_[1] == pytest.approx(0.5, abs=0.1)
    y2, X2, _ = _members(seed=1, disjoint=False)  # fresh rows
    best = min(_mae(X2[:, j], y2) for j in range(2))
    assert _mae(meta.predict(X2), y2) < 0.8 * best  # independent errors: 1/sqrt(2) of a member's


def test_meta_learners_on_errors_in_disjoint_halves():
    y, X, half = _members()
    y2, X2, half2 = _members(seed=1)
    best_mae = min(_mae(X2[:, j], y2) for j in range(2))
    best_rmse = min(_rmse(X2[:, j], y2) for j in range(2))
    # a constant blend cannot pick per row, but it matches the best member's MAE and beats its RMSE
    for meta in (NNLSMeta(), RidgeMeta()):
        pred = meta.fit(X, y).predict(X2)
        assert _mae(pred, y2) <= 1.02 * best_mae and _rmse(pred, y2) < 0.8 * best_rmse, meta.name
    # given the "which half" context, the gbm picks the good member per row
    ctx, ctx2 = np.column_stack([X, half]), np.column_stack([X2, half2])
    assert _mae(GBMMeta().fit(ctx, y).predict(ctx2), y2) < 0.6 * best_mae


def test_nnls_intercept_by_centering():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(200, 2))
    meta = NNLSMeta().fit(x, 2.0 * x[:, 0] + 3.0)
    assert meta.coef_ == pytest.approx([2.0, 0.0], abs=1e-9) and meta.intercept_ == pytest.approx(3.0)


def test_bad_arguments_are_named(phonons):
    ds, split, fs = phonons
    with pytest.raises(ValueError, match="meta-learner"):
        StackedEnsemble([RF], meta="svm")
    with pytest.raises(ValueError, match="context_features needs meta"):
        StackedEnsemble([RF], meta="nnls", context_features=3)
    with pytest.raises(ValueError, match="single target"):
        StackedEnsemble([RF], n_folds=2).fit(fs.magpie, None, np.column_stack([ds.targets, ds.targets]), split.train)
    with pytest.raises(RuntimeError, match="not fitted"):
        StackedEnsemble([RF]).predict(fs.magpie, None, split.test)


# ----------------------------------------------------------------------------- real stacking
def test_meta_learner_and_fold_models_never_see_test_rows(phonons, fitted):
    ds, split, fs = phonons
    train_rows = set(split.train.tolist()) | set(split.val.tolist())
    test_rows = set(split.test.tolist())
    assert set(fitted.meta_rows_.tolist()) == train_rows
    assert not set(fitted.meta_rows_.tolist()) & test_rows
    assert len(fitted.meta_rows_) == fitted.oof_.shape[0] and np.all(np.isfinite(fitted.oof_))
    held_union = set()
    for k in range(fitted.n_folds):
        fit_rows, es_rows, held = (set(a.tolist()) for a in (fitted.fold_train_rows_[k], fitted.fold_es_rows_[k],
                                                             fitted.fold_heldout_rows_[k]))
        assert fit_rows | es_rows <= train_rows                 # training rows only
        assert not (fit_rows | es_rows) & held                  # never the fold it predicts
        assert not fit_rows & es_rows and es_rows
        held_union |= held
        # the fold's torch model standardized its targets on exactly its training rows
        state = fitted.fold_states_[k][1]
        assert float(np.ravel(state["y_mean"])[0]) == pytest.approx(ds.targets[fitted.fold_train_rows_[k]].mean())
    assert held_union == train_rows


def test_real_stacking_matches_or_beats_best_member(phonons, fitted):
    ds, split, fs = phonons
    y = fitted.oof_y_
    rmse = lambda p: float(np.sqrt(np.mean((p - y) ** 2)))  # noqa: E731
    stacked = fitted.meta_model_.predict(fitted.oof_)
    # nnls with intercept minimizes the OOF squared error over blends that include each single member
    assert rmse(stacked) <= min(rmse(fitted.oof_[:, j]) for j in range(2)) + 1e-9
    ev = evaluate_ensemble(fitted, fs.magpie, fs.graphs, ds.targets, split.test)
    members = [ev.metrics[f"member.{n}_mae"] for n in fitted.names_]
    assert ev.metrics["ensemble_mae"] <= 1.05 * min(members)
    # the 2-epoch cgcnn is poor: the meta-learner down-weights it, the plain average cannot
    assert ev.metrics["ensemble_mae"] < ev.metrics["average_mae"]


def test_predict_mean_and_std(phonons, fitted):
    ds, split, fs = phonons
    mean, std = fitted.predict(fs.magpie, fs.graphs, split.test)
    assert mean.shape == std.shape == (len(split.test),)
    assert np.all(std >= 0) and np.any(std > 0)
    # nnls is linear: mean of the stacked fold predictions == weights applied to member fold-averages
    w = fitted.meta_model_.coef_
    expect = fitted.member_predictions(fs.magpie, fs.graphs, split.test) @ w + fitted.meta_model_.intercept_
    np.testing.assert_allclose(mean, expect, rtol=0, atol=1e-8)
    np.testing.assert_allclose(fitted.predict(fs.magpie, fs.graphs, split.test, return_std=False), mean)


def test_ridge_with_context_features(phonons):
    ds, split, fs = phonons
    rows = np.sort(np.concatenate([split.train, split.val]))
    ens = StackedEnsemble([RF, WEAK], meta="ridge", n_folds=3, context_features=4, seed=1)
    ens.fit(fs.magpie, None, ds.targets, rows)
    assert set(ens.weights_) == {"rf", "rf#2", "context_0", "context_1", "context_2", "context_3", "intercept"}
    mean, std = ens.predict(fs.magpie, None, split.test)
    assert np.all(np.isfinite(mean)) and mean.shape == (len(split.test),)


# ----------------------------------------------------------------------------- MLflow: select + log
def _trial_run(client, exp, parent, trial_id, config, val_maes, status, with_artifact=True):
    run = client.create_run(exp, run_name=trial_id, tags={"mlflow.parentRunId": parent, "trial_id": trial_id,
                                                           "family": config["family"], "status": status})
    rid = run.info.run_id
    from matfusion.search.mlflow_logging import flatten

    client.log_batch(rid, params=[mlflow.entities.Param(k, str(v)) for k, v in flatten(config).items()],
                     metrics=[mlflow.entities.Metric("val_mae", v, 0, i + 1) for i, v in enumerate(val_maes)])
    if with_artifact:
        client.log_dict(rid, config, "trial_config.json")
    client.set_terminated(rid, "FAILED" if status == "failed" else "FINISHED")
    return rid


def _fake_search(client, exp, ds, name="phonons-tiny"):
    """A search parent (as run_search logs it) with hand-made trial runs."""
    from matfusion.config import config_from_dict

    cfg = config_from_dict({"name": name, "data": {"source": TASK, "limit": LIMIT, "data_dir": str(DATA_DIR)},
                            "search": {"families": ["rf", "cgcnn"], "num_samples": 4, "max_epochs": 2,
                                       "grace_period": 1}})
    parent = client.create_run(exp, run_name=f"search-{name}", tags={
        "kind": "search", "dataset": ds.name, "fold": "0", "dataset_hash": ds.content_hash, "status": "completed"})
    pid = parent.info.run_id
    client.log_dict(pid, cfg.model_dump(mode="json"), "config.json")
    late = dict(CGCNN, cgcnn=dict(CGCNN["cgcnn"], fusion="none"))
    _trial_run(client, exp, pid, "t_rf_a", dict(RF, rf=dict(RF["rf"], n_estimators=20)), [30.0], "completed")
    _trial_run(client, exp, pid, "t_rf_b", RF, [25.0], "completed")
    _trial_run(client, exp, pid, "t_rf_fail", WEAK, [1.0], "failed")  # best score but failed: skipped
    _trial_run(client, exp, pid, "t_cg_a", CGCNN, [90.0, 40.0], "completed")
    _trial_run(client, exp, pid, "t_cg_b", dict(CGCNN, seed=5), [80.0, 60.0], "pruned")
    _trial_run(client, exp, pid, "t_cg_none", late, [70.0, 50.0], "completed", with_artifact=False)
    client.set_terminated(pid)
    return pid, cfg


def test_select_members_top_k_per_family_and_fusion(shared_store, phonons):
    uri, client, exp = _tracking(shared_store, "select")
    pid, _ = _fake_search(client, exp, phonons[0])
    members = select_members(client, exp, pid, k=1)
    assert [(m["family"], m.get(m["family"], {}).get("fusion")) for m in members] == [
        ("rf", None), ("cgcnn", "early"), ("cgcnn", "none")]
    assert members[0] == RF and members[1] == CGCNN
    # rebuilt from params (no artifact): the same nested config, with typed values
    assert members[2]["cgcnn"] == dict(CGCNN["cgcnn"], fusion="none") and members[2]["max_epochs"] == 2
    two = select_members(client, exp, pid, k=2)
    assert len(two) == 5 and all(m["rf"] != WEAK["rf"] for m in two if m["family"] == "rf")
    only_rf = select_members(client, exp, pid, k=2, families=["rf"])
    assert [m["rf"]["n_estimators"] for m in only_rf] == [30, 20]
    with pytest.raises(ValueError, match="no finished trial"):
        select_members(client, exp, pid, families=["alignn"])


def test_evaluate_logs_nested_ensemble_run(tmp_path, shared_store, phonons, fitted):
    ds, split, fs = phonons
    uri, client, exp = _tracking(shared_store, "evaluate")
    parent = client.create_run(exp, tags={"kind": "search"}).info.run_id
    ev = evaluate_ensemble(fitted, fs.magpie, fs.graphs, ds.targets, split.test)
    for key in ("ensemble_mae", "ensemble_rmse", "ensemble_r2", "average_mae", "member.rf_mae",
                "member.cgcnn-early_r2", "calib_within_1std", "calib_within_2std"):
        assert np.isfinite(ev.metrics[key]), key
    assert 0 <= ev.metrics["calib_within_1std"] <= ev.metrics["calib_within_2std"] <= 1
    assert ev.metrics["ensemble_mae"] == pytest.approx(_mae(ev.predictions["prediction"], ds.targets[split.test]))
    run_id = log_evaluation(client, exp, parent, ev, tags={"dataset": ds.name, "fold": 0})
    run = client.get_run(run_id)
    assert run.data.tags["mlflow.parentRunId"] == parent and run.data.tags["kind"] == "ensemble"
    assert run.data.metrics["ensemble_mae"] == pytest.approx(ev.test_mae)
    assert run.data.metrics["weight.rf"] == pytest.approx(fitted.weights_["rf"])
    arts = {a.path for a in client.list_artifacts(run_id)}
    assert {"parity.png", "weights.json", "members.json", "test_predictions.csv"} <= arts
    png = Path(client.download_artifacts(run_id, "parity.png", str(tmp_path)))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="test rows were used"):
        evaluate_ensemble(fitted, fs.magpie, fs.graphs, ds.targets, split.train[:5])


# ----------------------------------------------------------------------------- registry + export + predict
def test_champion_alias_moves_only_on_improvement(phonons, fitted, registry):
    ds, split, fs = phonons
    uri, client, exp = registry["uri"], registry["client"], registry["exp"]
    rows = np.sort(np.concatenate([split.train, split.val]))
    weak = StackedEnsemble([WEAK], n_folds=2).fit(fs.magpie, None, ds.targets, rows)
    weak_ev = evaluate_ensemble(weak, fs.magpie, None, ds.targets, split.test)
    good_mae = registry["evaluation"].test_mae
    assert weak_ev.test_mae > good_mae  # precondition: the stumps really are worse
    weak_uri = _log_model(uri, client, exp, weak, phonons, weak_ev.metrics)
    task = "alias-test"  # its own registered model in the registry fixture's store
    name = f"matfusion-{task}"
    champion = lambda: client.get_model_version_by_alias(name, "champion")  # noqa: E731
    v1, moved = register_ensemble(uri, weak_uri, task, 0, weak_ev.test_mae)
    assert moved and str(champion().version) == str(v1.version)
    v2, moved = register_ensemble(uri, registry["model_uri"], task, 0, good_mae)   # better: moves
    assert moved and str(champion().version) == str(v2.version)
    v3, moved = register_ensemble(uri, weak_uri, task, 0, weak_ev.test_mae)       # worse: stays
    assert not moved and str(champion().version) == str(v2.version)
    assert client.get_model_version(name, v3.version).tags == {"task": task, "fold": "0",
                                                                "test_mae": repr(float(weak_ev.test_mae))}
    v4, moved = register_ensemble(uri, weak_uri, task, 1, 0.0)  # another fold is not comparable
    assert not moved and str(champion().version) == str(v2.version)
    # the real task's champion is untouched
    assert str(client.get_model_version_by_alias(f"matfusion-{TASK}", "champion").version) == "1"


def test_fresh_process_loads_champion_and_reproduces_predictions(tmp_path, phonons, fitted, registry):
    ds, split, fs = phonons
    expect, expect_std = fitted.predict(fs.magpie, fs.graphs, split.test)
    inputs = tmp_path / "inputs.json"
    # half as dict JSON text, half as CIF text: both featurize to the same graphs
    cells = [json.dumps(ds.structures[r].as_dict()) if i % 2 else ds.structures[r].to(fmt="cif")
             for i, r in enumerate(split.test)]
    inputs.write_text(json.dumps(cells))
    out = tmp_path / "out.csv"
    script = textwrap.dedent(f"""
        import json, mlflow, pandas as pd
        mlflow.set_tracking_uri({registry['uri']!r})
        model = mlflow.pyfunc.load_model("models:/matfusion-{TASK}@champion")
        df = pd.DataFrame({{"structure": json.load(open({str(inputs)!r}))}})
        model.predict(df).to_csv({str(out)!r}, index=False, float_format="%.12g")
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = pd.read_csv(out)
    assert list(got.columns) == ["prediction", "std"]
    np.testing.assert_allclose(got["prediction"], expect, rtol=0, atol=1e-6)
    np.testing.assert_allclose(got["std"], expect_std, rtol=0, atol=1e-6)


def test_export_and_predict_commands_skip_a_bad_cif(tmp_path, phonons, fitted, registry, capsys):
    ds, split, fs = phonons
    parser = _parser()
    to = tmp_path / "exported"
    args = parser.parse_args(["export", f"models:/matfusion-{TASK}@champion", "--to", str(to),
                              "--tracking-uri", registry["uri"]])
    assert args.func(args) == 0
    assert (to / "MLmodel").is_file() and (to / "artifacts" / "ensemble.pkl").is_file()
    card = (to / "README.md").read_text()
    assert "nnls" in card and "| rf |" in card and "| cgcnn-early |" in card and "ensemble_mae" in card
    assert f"{fitted.weights_['rf']:.4g}" in card and "torch" in card and "outer fold: 0" in card

    cifs = tmp_path / "cifs"
    cifs.mkdir()
    picked = [int(r) for r in split.test[:3]]
    for r in picked:
        (cifs / f"{ds.ids[r]}.cif").write_text(ds.structures[r].to(fmt="cif"))
    (cifs / "broken.cif").write_text("data_broken\n_cell_length_a 3.0\nthis is not a CIF loop\n")
    out = tmp_path / "preds.csv"
    capsys.readouterr()
    args = parser.parse_args(["predict", str(to), str(cifs), "--out", str(out)])
    assert args.func(args) == 0
    err = capsys.readouterr().err
    assert "broken.cif" in err and "cannot parse" in err
    df = pd.read_csv(out)
    assert list(df.columns) == ["id", "prediction", "std"]
    assert sorted(df["id"]) == sorted(ds.ids[r] for r in picked)
    expect, _ = fitted.predict(fs.magpie, fs.graphs, np.array(picked))
    got = df.set_index("id").loc[[ds.ids[r] for r in picked], "prediction"].to_numpy()
    np.testing.assert_allclose(got, expect, atol=1e-6)

    # a table input with one unparseable row, via the API
    table = tmp_path / "table.csv"
    pd.DataFrame({"id": ["a", "b"], "structure": [json.dumps(ds.structures[picked[0]].as_dict()), "garbage"]}).to_csv(
        table, index=False)
    res = predict_structures(str(to), [table])
    assert list(res["id"]) == ["a"] and res["prediction"].iloc[0] == pytest.approx(expect[0], abs=1e-6)
    assert "row 1 (id b)" in capsys.readouterr().err


def test_ensemble_command_end_to_end(tmp_path, phonons, capsys):
    """`matfusion ensemble` on a search parent (config.json + trial runs with trial_config.json)."""
    uri, client, exp = _tracking(tmp_path)
    pid, cfg = _fake_search(client, exp, phonons[0])
    parser = _parser()
    args = parser.parse_args(["ensemble", "--experiment", "ens-test", "--k", "1", "--folds", "2", "--families", "rf",
                              "cgcnn", "--tracking-uri", uri, "--quiet"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "Stacked ensemble (nnls, 2 folds)" in out and "registered matfusion-matbench_phonons version 1" in out
    runs = client.search_runs([exp], filter_string="tags.kind = 'ensemble'")
    assert len(runs) == 1
    run = runs[0]
    assert run.data.tags["mlflow.parentRunId"] == pid and run.info.status == "FINISHED"
    assert run.data.tags["members"] == "rf,cgcnn-early,cgcnn-none"
    assert run.data.metrics["n_test"] == len(phonons[1].test)
    mv = client.get_model_version_by_alias(f"matfusion-{TASK}", "champion")
    assert mv.tags["test_mae"] and float(mv.tags["test_mae"]) == pytest.approx(run.data.metrics["ensemble_mae"])
    # unknown experiment: a clear error, exit 2
    args = parser.parse_args(["ensemble", "--experiment", "nope", "--tracking-uri", uri, "--quiet"])
    assert args.func(args) == 2
    assert "no MLflow experiment named 'nope'" in capsys.readouterr().err


def test_help_texts():
    parser = _parser()
    for cmd in ("ensemble", "export", "predict"):
        with pytest.raises(SystemExit) as exc:
            parser.parse_args([cmd, "--help"])
        assert exc.value.code == 0


@pytest.mark.slow
def test_real_search_then_ensemble_command(tmp_path, capsys, monkeypatch):
    """A tiny real search (Ray Tune + Optuna + MLflow), then `matfusion ensemble` on it."""
    from matfusion.config import config_from_dict
    from matfusion.search.tuner import run_search

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    cfg = config_from_dict({
        "name": "ens-e2e", "data": {"source": TASK, "limit": 120, "data_dir": str(DATA_DIR)},
        "features": {"n_jobs": 2},
        "search": {"families": ["rf", "cgcnn"], "fusions": ["none", "early"], "preset": "quick", "num_samples": 4,
                   "max_epochs": 2, "grace_period": 1, "max_concurrent": 2, "storage_path": str(tmp_path / "ray")},
        "mlflow": {"tracking_uri": uri, "artifact_location": str(tmp_path / "artifacts")}})
    res = run_search(cfg, progress=False)
    client = MlflowClient(uri)
    trials = client.search_runs([res.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{res.parent_run_id}'")
    assert len(trials) == 4
    args = _parser().parse_args(["ensemble", "--experiment", "ens-e2e", "--k", "1", "--folds", "2",
                                 "--tracking-uri", uri, "--quiet"])
    assert args.func(args) == 0
    assert "Stacked ensemble (nnls, 2 folds)" in capsys.readouterr().out
    run = client.search_runs([res.experiment_id], filter_string="tags.kind = 'ensemble'")[0]
    assert run.data.tags["mlflow.parentRunId"] == res.parent_run_id
    assert run.data.metrics["ensemble_mae"] > 0
    mv = client.get_model_version_by_alias(f"matfusion-{TASK}", "champion")
    assert mv.run_id == run.info.run_id
