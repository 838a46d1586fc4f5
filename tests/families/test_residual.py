"""Residual fusion (delta learning): the GNN learns y - t(x) of a tabular model t on the descriptor
matrix and predicts t(x) + GNN(x).  t's predictions on the training rows are out of fold (K
seeded folds of the training rows); no validation or test row reaches a t fit.  Tiny data from
pymatgen structures; real matbench rows for the search and the export round trip."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
import textwrap

import numpy as np
import pandas as pd
import pytest
from conftest import DATA_DIR, REPO
from pymatgen.core import Lattice, Structure

from matfusion import families
from matfusion.families import TrialConfig, fusion
from matfusion.trainables.loop import LocalSession, predict, target_stats, validation_score
from matfusion.trainables.trial import (
    _feature_widths,
    _graphs_with_descriptors,
    build_torch_model,
    choose_residual_beta,
    fit_family,
    fit_residual_base,
    load_trial_state,
    predict_from_state,
    predict_residual_base,
)

PAIRS = [("Cs", "Cl"), ("Na", "Cl"), ("K", "Br"), ("Rb", "I"), ("Li", "F"), ("Cs", "Br"), ("Tl", "Cl"), ("Ag", "I")]
N = 48
TRAIN, VAL, TEST = np.arange(0, 32), np.arange(32, 40), np.arange(40, 48)
TINY_CGCNN = {"hidden": 8, "n_conv": 1, "head_hidden": 8, "batch_size": 8, "fusion": "residual"}
TINY_RF = {"n_estimators": 10}


def _cfg(base="lgbm", folds=4, **extra):
    cfg = {
        "family": "cgcnn",
        "cgcnn": dict(TINY_CGCNN, residual_base=base, residual_folds=folds),
        "max_epochs": 3,
        "seed": 0,
        "patience": 5,
        "cpus": 1,
        **extra,
    }
    if base == "rf":
        cfg["rf"] = TINY_RF
    return cfg


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """48 CsCl-type cells with lattice constants 3.2 .. 4.6 A; targets: the constant and the
    cell volume (the second with some labels hidden: NaN)."""
    from matfusion.config import FeaturesConfig
    from matfusion.data.dataset import Dataset
    from matfusion.data.featurize import featurize
    from matfusion.trainables.trial_data import pack_rows, pack_trial_data

    rng = np.random.default_rng(1)
    structures, targets = [], []
    for k in range(N):
        a, b = PAIRS[k % len(PAIRS)]
        c = float(rng.uniform(3.2, 4.6))
        structures.append(Structure(Lattice.cubic(c), [a, b], [[0, 0, 0], [0.5, 0.5, 0.5]]))
        targets.append(c)
    y = np.array(targets)
    ds = Dataset(
        name="tiny",
        ids=[f"c{k}" for k in range(N)],
        structures=structures,
        targets=y,
        target_name="a",
        content_hash="tiny-cscl-residual",
    )
    fs = featurize(
        ds,
        FeaturesConfig(cutoff=5.0, max_neighbors=8, n_jobs=1, cache_dir=str(tmp_path_factory.mktemp("cache"))),
        progress=False,
    )
    two = np.stack([y, y**3], axis=1)
    two[[1, 5, 9, 20, 33, 41], 1] = np.nan  # missing labels in train, val and test rows
    return {
        "one": pack_trial_data(fs.descriptors, fs.graphs, y, TRAIN, VAL),
        "one_test": pack_rows(fs.descriptors, fs.graphs, y, TEST),
        "two": pack_trial_data(fs.descriptors, fs.graphs, two, TRAIN, VAL),
        "two_test": pack_rows(fs.descriptors, fs.graphs, two, TEST),
    }


def test_residual_is_a_fusion_with_typed_params_and_space():
    assert "residual" in families.FUSIONS and "residual" in fusion.USES
    params = families.get("cgcnn").parse({"fusion": "residual"})
    assert (params.residual_base, params.residual_folds, params.residual_blend) == ("lgbm", 5, True)
    assert fusion.DEFAULTS["residual_base"] == "lgbm"
    specs = families.get("alignn").search_specs()
    # every registered tabular family may be t, and the search tries each
    assert "residual" in specs["fusion"].choices and set(specs["residual_base"].choices) == set(families.TABULAR)
    assert TrialConfig.parse({"family": "cgcnn", "cgcnn": {"residual_base": "et"}}).params.residual_base == "et"
    for bad in ("alignn", "xgb"):
        with pytest.raises(families.TrialConfigError, match=f"residual_base: .*{bad!r} is not a tabular family"):
            TrialConfig.parse({"family": "cgcnn", "cgcnn": {"fusion": "residual", "residual_base": bad}})
    with pytest.raises(families.TrialConfigError, match="residual_folds"):
        TrialConfig.parse({"family": "cgcnn", "cgcnn": {"fusion": "residual", "residual_folds": 1}})
    assert families.group_of({"family": "cgcnn", "cgcnn": {"fusion": "residual"}}) == "cgcnn-residual"
    # the search's default point keeps preferring early fusion
    from matfusion.config import SearchConfig
    from matfusion.spaces import SearchSpace

    assert "residual" in SearchConfig().fusions
    space = SearchSpace(["cgcnn"], {}, fusions=["none", "early", "residual"])
    assert space.default_points()[0]["cgcnn/fusion"] == "early"
    only = SearchSpace(["cgcnn"], {}, fusions=["residual"]).default_points()[0]
    assert only["cgcnn/fusion"] == "residual" and only["cgcnn/residual_base"] == "lgbm"


def _sample(space, n=12):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=0))
    out = []
    for _ in range(n):
        trial = study.ask()
        constants = space(trial)
        out.append({**trial.params, **constants})
        study.tell(trial, 1.0)
    return out


def test_residual_base_is_searched_and_the_folds_only_when_search_space_names_them():
    from matfusion.spaces import SearchSpace

    plain = _sample(SearchSpace(["cgcnn"], {}, fusions=["residual", "early"]))
    residual = [s for s in plain if s["cgcnn/fusion"] == "residual"]
    assert residual and all(s["cgcnn/residual_base"] in families.TABULAR for s in residual)
    assert not any("cgcnn/residual_folds" in s for s in plain)  # fixed at its default 5
    assert not any("cgcnn/residual_blend" in s for s in plain)  # fixed at its default (on)
    assert not any("cgcnn/residual_base" in s for s in plain if s["cgcnn/fusion"] == "early")
    searched = _sample(SearchSpace(["cgcnn"], {}, fusions=["residual"], overrides={"cgcnn.residual_folds": [3, 7]}))
    assert {s["cgcnn/residual_folds"] for s in searched} <= {3, 7} and len(searched) == 12
    fixed = _sample(SearchSpace(["cgcnn"], {}, fusions=["residual"], overrides={"cgcnn.residual_folds": 4}), n=2)
    assert all(s["cgcnn/residual_folds"] == 4 for s in fixed)
    # the blend can be switched off for a search (searching it would be moot: on the validation rows
    # that select, the chosen beta is never worse than beta = 1)
    off = _sample(SearchSpace(["cgcnn"], {}, fusions=["residual"], overrides={"cgcnn.residual_blend": False}), n=2)
    assert all(s["cgcnn/residual_blend"] is False for s in off)
    from matfusion.spaces.params import SpaceError

    with pytest.raises(SpaceError, match="residual_folds"):
        SearchSpace(["cgcnn"], {}, fusions=["residual"], overrides={"cgcnn.residual_folds": {"low": 1, "high": 5}})


@pytest.mark.parametrize("base, folds", [("lgbm", 4), ("rf", 4), ("et", 2)])  # et: 500 trees (its defaults)
def test_out_of_fold_t_never_sees_validation_or_test_rows(tiny, base, folds):
    data = tiny["one"]
    state = fit_family(_cfg(base, folds), data, LocalSession())
    res = state["residual"]
    assert res["base"] == base and len(res["models"]) == 1
    train, others = set(TRAIN.tolist()), set(VAL.tolist()) | set(TEST.tolist())
    fit_rows = res["fit_rows"][0]
    assert len(fit_rows) == folds + 1  # the fold models, then the one on all training rows
    np.testing.assert_array_equal(np.sort(fit_rows[-1]), TRAIN)
    np.testing.assert_array_equal(res["train_rows"], data["train"]["row"])
    for j, rows in enumerate(fit_rows[:-1]):
        assert set(rows.tolist()) <= train and not set(rows.tolist()) & others
        held = res["train_rows"][res["fold"] == j]
        assert len(held) > 0 and not set(held.tolist()) & set(rows.tolist())  # fold j is predicted, not fitted
        assert set(held.tolist()) | set(rows.tolist()) == train
    # every training row is predicted out of fold: the prediction of the model that did not see it
    assert np.isfinite(res["train_pred"]).all()
    full_on_train = predict_residual_base(res, data["train"]["descriptors"])
    assert not np.allclose(full_on_train, res["train_pred"])  # in-sample would differ from out of fold
    # the folds are seeded: the same trial gives the same folds and OOF predictions (fitted again
    # here, not taken from the memo of the last fits)
    from matfusion.trainables import trial as trial_module

    trial_module._RESIDUAL_MEMO.clear()
    again = fit_residual_base(_cfg(base, folds), data["train"])
    assert again is not res
    np.testing.assert_array_equal(again["fold"], res["fold"])
    np.testing.assert_allclose(again["train_pred"], res["train_pred"])
    # a second trial with the same t settings on the same rows reuses that t; another seed does not
    assert fit_residual_base(_cfg(base, folds), data["train"]) is again
    other = fit_residual_base(_cfg(base, folds, seed=1), data["train"])
    assert other is not again and not np.array_equal(other["fold"], again["fold"])
    # the slim state (ensemble members) keeps what prediction needs
    assert "residual" in families.get("cgcnn").slim_state(state)


def test_prediction_is_t_full_plus_gnn_and_val_score_is_on_the_real_target(tiny, tmp_path):
    data, test = tiny["one"], tiny["one_test"]
    config = _cfg("lgbm")
    session = LocalSession()
    state = fit_family(config, data, session)
    trial = TrialConfig.parse(config)
    assert state["fusion"] == "residual"
    # the GNN is standardized on the residuals y - t_oof(x), not on y
    y_tr = data["train"]["y"].reshape(-1, 1)
    np.testing.assert_allclose(state["y_mean"], np.nanmean(y_tr - state["residual"]["train_pred"], axis=0), atol=1e-6)
    # recompute both parts: t fitted on all training rows, and the encoder alone (its best weights)
    items = _graphs_with_descriptors(test, data["graph_params"], None)
    model = build_torch_model(trial, *_feature_widths(items[0])[:2], 1, 0, test["descriptors"].shape[1])
    model.load_state_dict(state["best_model"])
    assert not hasattr(model, "composition")  # the encoder alone, as fusion none
    gnn = predict(model, items, state["y_mean"], state["y_std"])
    t_full = predict_residual_base(state["residual"], test["descriptors"])
    from matfusion.families import get

    lgbm = get("lgbm").build(get("lgbm").parse({}), seed=0, n_jobs=1)
    lgbm.fit(data["train"]["descriptors"], data["train"]["y"], rounds=get("lgbm").parse({}).n_estimators)
    np.testing.assert_allclose(t_full[:, 0], lgbm.predict(test["descriptors"]), rtol=1e-9)
    # beta: chosen at the best epoch on the validation rows (and only them), stored with the weights
    hook = state["best_hook_state"]
    np.testing.assert_array_equal(hook["beta_rows"], VAL)
    beta = hook["beta"]
    assert beta.shape == (1,) and 0.0 <= beta[0] <= 1.0
    items_val = _graphs_with_descriptors(data["val"], data["graph_params"], None)
    gnn_val = predict(model, items_val, state["y_mean"], state["y_std"])
    t_val = predict_residual_base(state["residual"], data["val"]["descriptors"])
    np.testing.assert_allclose(beta, choose_residual_beta(t_val, gnn_val, data["val"]["y"]), rtol=1e-6)
    betas = [h["residual_beta"] for h in session.history]
    assert len(betas) == 3 and all(0.0 <= b <= 1.0 for b in betas)
    assert betas[state["best_epoch"] - 1] == pytest.approx(beta[0])
    pred = predict_from_state(config, state, test, data["graph_params"])
    np.testing.assert_allclose(pred, (t_full + beta * gnn)[:, 0], rtol=1e-6)
    assert np.abs(gnn).max() > 0  # the GNN part is there
    # the reported validation MAE is that of t + GNN on the real validation targets
    val_pred = predict_from_state(config, state, data["val"], data["graph_params"])
    assert validation_score(val_pred, data["val"]["y"], np.ones(1))[0] == pytest.approx(state["best_val_mae"], rel=1e-5)
    base_val = validation_score(
        predict_residual_base(state["residual"], data["val"]["descriptors"]), data["val"]["y"], np.ones(1)
    )[0]
    assert all(h["residual_base_val_mae"] == pytest.approx(base_val) for h in session.history)
    # checkpoint round trip
    families.get("cgcnn").write_checkpoint(state, str(tmp_path))
    np.testing.assert_allclose(
        predict_from_state(config, load_trial_state(config, str(tmp_path)), test, data["graph_params"]), pred, rtol=1e-6
    )


def test_beta_is_the_validation_mae_minimizer_in_0_1():
    """Function level, synthetic: r = y - t is what the GNN should predict."""
    rng = np.random.default_rng(0)
    n = 2000
    t = rng.normal(size=(n, 3))
    r = rng.normal(size=(n, 3))
    y = t + r
    gnn = np.stack([r[:, 0] + 0.05 * rng.normal(size=n), rng.normal(size=n), 2.0 * r[:, 2]], axis=1)
    beta = choose_residual_beta(t, gnn, y)
    # carries the residual: ~1; pure noise: ~0 (clipped at 0); twice the residual: 1/2
    assert beta[0] == pytest.approx(1.0, abs=0.02) and beta[1] <= 0.1 and beta[2] == pytest.approx(0.5)
    assert ((beta >= 0) & (beta <= 1)).all()
    mae = lambda b, k: np.mean(np.abs(y[:, k] - t[:, k] - b * gnn[:, k]))  # noqa: E731
    for k in range(3):  # no beta of a fine grid of [0, 1] does better on these rows
        assert mae(beta[k], k) <= min(mae(b, k) for b in np.linspace(0, 1, 201)) + 1e-12
    # an over-shrunk GNN (half the residual) would want beta 2: clipped to 1
    assert choose_residual_beta(t[:, :1], 0.5 * r[:, :1], y[:, :1])[0] == 1.0
    # missing labels leave their rows out; a target without a labelled row keeps beta 1
    y_missing = y.copy()
    y_missing[: n // 2, 0] = np.nan
    y_missing[:, 1] = np.nan
    gnn_bad = gnn.copy()
    gnn_bad[: n // 2, 0] = 100.0  # only on the unlabelled rows
    got = choose_residual_beta(t[:, :2], gnn_bad[:, :2], y_missing[:, :2])
    assert got[0] == pytest.approx(choose_residual_beta(t[n // 2 :, :1], gnn[n // 2 :, :1], y[n // 2 :, :1])[0])
    assert got[1] == 1.0


def test_blend_off_predicts_t_plus_gnn(tiny):
    data, test = tiny["one"], tiny["one_test"]
    config = _cfg("lgbm")
    config["cgcnn"]["residual_blend"] = False
    session = LocalSession()
    state = fit_family(config, data, session)
    assert all(h["residual_beta"] == 1.0 for h in session.history)
    np.testing.assert_array_equal(state["best_hook_state"]["beta"], [1.0])
    trial = TrialConfig.parse(config)
    items = _graphs_with_descriptors(test, data["graph_params"], None)
    model = build_torch_model(trial, *_feature_widths(items[0])[:2], 1, 0, test["descriptors"].shape[1])
    model.load_state_dict(state["best_model"])
    gnn = predict(model, items, state["y_mean"], state["y_std"])
    t_full = predict_residual_base(state["residual"], test["descriptors"])
    pred = predict_from_state(config, state, test, data["graph_params"])
    np.testing.assert_allclose(pred, (t_full + gnn)[:, 0], rtol=1e-6)


def test_multi_target_with_missing_labels(tiny):
    data, test = tiny["two"], tiny["two_test"]
    config = _cfg("rf", targets=["a", "v"])
    session = LocalSession()
    state = fit_family(config, data, session)
    res = state["residual"]
    assert len(res["models"]) == 2
    y = data["train"]["y"]
    missing = ~np.isfinite(y[:, 1])
    assert missing.sum() == 4  # rows 1, 5, 9 and 20 (33 is a validation row, 41 a test row)
    # one t per target on its labelled rows: the second target's t never saw an unlabelled row
    unlabelled = set(data["train"]["row"][missing].tolist())
    for rows in res["fit_rows"][1]:
        assert not set(rows.tolist()) & unlabelled
    np.testing.assert_array_equal(np.sort(res["fit_rows"][1][-1]), np.sort(data["train"]["row"][~missing]))
    np.testing.assert_array_equal(np.sort(res["fit_rows"][0][-1]), TRAIN)
    # the residual is NaN (masked in the loss) exactly where the label is missing
    r = y - res["train_pred"]
    assert np.array_equal(~np.isfinite(r[:, 1]), missing) and np.isfinite(r[:, 0]).all()
    assert all(np.isfinite(h["val_mae"]) and {"val_mae_a", "val_mae_v"} <= set(h) for h in session.history)
    # the multi-task score scales by the real targets' std (not the residuals')
    _, y_std = target_stats(y)
    val_pred = predict_from_state(config, state, data["val"], data["graph_params"])
    assert validation_score(val_pred, data["val"]["y"], y_std)[0] == pytest.approx(state["best_val_mae"], rel=1e-5)
    pred = predict_from_state(config, state, test, data["graph_params"])
    assert pred.shape == (len(TEST), 2) and np.isfinite(pred).all()
    # one beta per target, each in [0, 1], logged per target
    beta = state["best_hook_state"]["beta"]
    assert beta.shape == (2,) and ((beta >= 0) & (beta <= 1)).all()
    best = session.history[state["best_epoch"] - 1]
    assert (best["residual_beta_a"], best["residual_beta_v"]) == pytest.approx(tuple(beta))
    assert best["residual_beta"] == pytest.approx(beta.mean())


# -- real matbench rows: a search with fusions [residual]; export -> fresh-process predict ---------

TASK = "matbench_phonons"


@pytest.mark.slow
def test_real_search_with_residual_fusion_runs_and_logs(tmp_path, monkeypatch, capsys):
    import yaml
    from mlflow.tracking import MlflowClient

    from matfusion.cli import main

    if DATA_DIR is None:
        pytest.fail("real data not found: set MATFUSION_DATA or place ../shared/data beside the repo")
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    config = tmp_path / "residual.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "name": "residual-e2e",
                "data": {"source": TASK, "limit": 80, "data_dir": str(DATA_DIR)},
                "features": {"n_jobs": 1},
                "search": {
                    "families": ["cgcnn"],
                    "fusions": ["residual"],
                    "preset": "quick",
                    "num_samples": 2,
                    "max_epochs": 2,
                    "grace_period": 1,
                    "max_concurrent": 2,
                    "storage_path": str(tmp_path / "ray"),
                    "space": {"cgcnn.hidden": 32, "cgcnn.batch_size": 32, "cgcnn.n_conv": 2},
                },
                "mlflow": {"tracking_uri": uri, "artifact_location": str(tmp_path / "artifacts")},
            }
        )
    )
    assert main(["search", str(config), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "Leaderboard of search 'residual-e2e'" in out and "residual" in out
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("residual-e2e").experiment_id
    parent = client.search_runs([exp], filter_string="tags.kind = 'search'")[0]
    trials = client.search_runs(
        [exp], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}' and tags.trial_id != ''"
    )
    assert len(trials) == 2
    for run in trials:
        assert run.data.tags["fusion"] == run.data.params["cgcnn.fusion"] == "residual"
        assert run.data.params["cgcnn.residual_base"] in families.TABULAR
        history = client.get_metric_history(run.info.run_id, "val_mae")
        assert len(history) >= 1 and all(np.isfinite(m.value) for m in history)
        betas = client.get_metric_history(run.info.run_id, "residual_beta")  # the blend's weight, per epoch
        assert len(betas) == len(history) and all(0.0 <= m.value <= 1.0 for m in betas), betas


@pytest.fixture(scope="module")
def phonons(tmp_path_factory):
    from matfusion.config import DataConfig, FeaturesConfig
    from matfusion.data import load_dataset, split_fold
    from matfusion.data.featurize import featurize

    if DATA_DIR is None:
        pytest.fail("real data not found: set MATFUSION_DATA or place ../shared/data beside the repo")
    ds = load_dataset(DataConfig(source=TASK, limit=100, data_dir=str(DATA_DIR)))
    split = split_fold(ds, 0)
    features = FeaturesConfig(n_jobs=1, cache_dir=str(tmp_path_factory.mktemp("fcache")))
    return ds, split, features, featurize(ds, features, progress=False)


def test_export_then_fresh_process_predict_with_a_residual_member(tmp_path, phonons):
    from matfusion.ensembles import StackedEnsemble, evaluate_ensemble
    from matfusion.ensembles.export import featurizer_spec, make_card, save_ensemble_model

    ds, split, features, fs = phonons
    rows = np.sort(np.concatenate([split.train, split.val]))
    residual = {
        "family": "cgcnn",
        "cgcnn": {
            "hidden": 16,
            "n_conv": 2,
            "head_hidden": 16,
            "batch_size": 32,
            "fusion": "residual",
            "residual_base": "lgbm",
            "residual_folds": 3,
        },
        "max_epochs": 2,
        "seed": 0,
        "patience": 5,
        "cpus": 1,
    }
    rf = {"family": "rf", "rf": {"n_estimators": 20}, "seed": 0, "cpus": 1}
    ens = StackedEnsemble([rf, residual], meta="nnls", n_folds=2, seed=0)
    ens.fit(fs.descriptors, fs.graphs, ds.targets, rows, {"gaussian_bins": 40, "gaussian_width": None})
    assert "cgcnn-residual" in ens.weights_
    # the members' t models were fitted on their own fold's training rows only
    for k, fold_states in enumerate(ens.fold_states_):
        res = fold_states[1]["residual"]
        assert set(res["fit_rows"][0][-1].tolist()) == set(ens.fold_train_rows_[k].tolist())
        assert not set(res["fit_rows"][0][-1].tolist()) & set(split.test.tolist())
        # beta was chosen on the fold's early-stopping rows (never a test row) and travels in the slim state
        hook = fold_states[1]["best_hook_state"]
        assert set(hook["beta_rows"].tolist()) == set(ens.fold_es_rows_[k].tolist())
        assert not set(hook["beta_rows"].tolist()) & set(split.test.tolist())
        assert hook["beta"].shape == (1,) and 0.0 <= hook["beta"][0] <= 1.0
    betas = [fold_states[1]["best_hook_state"]["beta"].tolist() for fold_states in ens.fold_states_]
    ev = evaluate_ensemble(ens, fs.descriptors, fs.graphs, ds.targets, split.test)
    card = make_card(ens, ds.name, split.fold, ev.metrics, data={"source": TASK, "limit": 100})
    path = tmp_path / "model"
    save_ensemble_model(
        str(path),
        ens,
        featurizer_spec(ens, features.cutoff, features.max_neighbors),
        card,
        [ds.structures[i] for i in split.test[:2]],
    )
    picked = [int(r) for r in split.test[:4]]
    expect, _ = ens.predict(fs.descriptors, fs.graphs, np.array(picked))
    member = ens.member_predictions(fs.descriptors, fs.graphs, np.array(picked))
    assert member.shape == (len(picked), 2) and np.isfinite(member).all()

    cifs = tmp_path / "cifs"
    cifs.mkdir()
    for r in picked:
        (cifs / f"{ds.ids[r]}.cif").write_text(ds.structures[r].to(fmt="cif"))
    table = tmp_path / "structures.json"
    table.write_text(json.dumps([ds.structures[r].as_dict() for r in picked]))
    inputs = tmp_path / "inputs.pkl"
    with open(inputs, "wb") as fh:
        pickle.dump((fs.descriptors, fs.graphs, picked), fh)
    script = textwrap.dedent(f"""
        import json, pickle, sys
        import mlflow, numpy as np, pandas as pd
        model = mlflow.pyfunc.load_model({str(path)!r})
        structures = json.load(open({str(table)!r}))
        out = model.predict(pd.DataFrame({{"structure": [json.dumps(s) for s in structures]}}))
        print(json.dumps(out["prediction"].tolist()))
        # the residual member itself (whatever its stacking weight), from the exported pickle
        ens = pickle.load(open({str(path / "artifacts" / "ensemble.pkl")!r}, "rb"))
        descriptors, graphs, picked = pickle.load(open({str(inputs)!r}, "rb"))
        print("MEMBERS", json.dumps(ens.member_predictions(descriptors, graphs, np.array(picked)).tolist()))
        print("BETAS", json.dumps([st[1]["best_hook_state"]["beta"].tolist() for st in ens.fold_states_]))
        from matfusion.cli import main
        sys.exit(main(["predict", {str(path)!r}, {str(cifs)!r}, "--out", {str(tmp_path / "preds.csv")!r}]))
    """)
    env = {
        "PYTHONPATH": str(REPO),
        "MATFUSION_DATA": str(DATA_DIR),
        "PATH": "/usr/bin:/bin",
        "HOME": str(tmp_path),
        "OMP_NUM_THREADS": "1",
    }
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=400, cwd=tmp_path, env=env
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("[")))
    np.testing.assert_allclose(got, expect, atol=1e-6)
    members = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("MEMBERS"))[8:])
    np.testing.assert_allclose(members, member, atol=1e-6)
    assert json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("BETAS"))[6:]) == betas
    df = pd.read_csv(tmp_path / "preds.csv").set_index("id")
    np.testing.assert_allclose(df.loc[[ds.ids[r] for r in picked], "prediction"].to_numpy(), expect, atol=1e-6)
