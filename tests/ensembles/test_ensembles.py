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
from conftest import DATA_DIR
from mlflow.tracking import MlflowClient

from matfusion.config import DataConfig, FeaturesConfig
from matfusion.data import load_dataset, split_fold
from matfusion.data.featurize import featurize
from matfusion.ensembles import (
    StackedEnsemble,
    evaluate_ensemble,
    export_model,
    log_ensemble_model,
    log_evaluation,
    predict_structures,
    register_ensemble,
    select_members,
)
from matfusion.ensembles.commands import add_parsers
from matfusion.ensembles.export import featurizer_spec, make_card
from matfusion.ensembles.stacking import ConvexMAEMeta, GBMMeta, InvalidParameterError, NNLSMeta, RidgeMeta

LIMIT = 150
TASK = "matbench_phonons"
RF = {"family": "rf", "rf": {"n_estimators": 30, "max_features": 0.5}, "seed": 0, "cpus": 1}
CGCNN = {
    "family": "cgcnn",
    "cgcnn": {
        "hidden": 16,
        "n_conv": 2,
        "head_hidden": 16,
        "fusion": "early",
        "comp_hidden": 16,
        "comp_layers": 1,
        "fusion_dim": 16,
        "lr": 3e-3,
        "batch_size": 32,
    },
    "max_epochs": 2,
    "seed": 0,
    "patience": 5,
    "cpus": 1,
}
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
    return ens.fit(fs.descriptors, fs.graphs, ds.targets, rows, GRAPH_PARAMS)


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
    info = log_ensemble_model(
        run_id, ens, featurizer, card, [ds.structures[i] for i in split.test[:2]], tracking_uri=uri
    )
    client.set_terminated(run_id)
    return info.model_uri


@pytest.fixture(scope="session")
def registry(tmp_path_factory, phonons, fitted):
    """The real ensemble logged and registered (champion) in a fresh sqlite store."""
    tmp = tmp_path_factory.mktemp("registry")
    uri, client, exp = _tracking(tmp)
    ds, split, fs = phonons
    ev = evaluate_ensemble(fitted, fs.descriptors, fs.graphs, ds.targets, split.test)
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
    # the MAE blend optimizes MAE only: it matches the best member's MAE, no worse in RMSE
    pred = ConvexMAEMeta().fit(X, y).predict(X2)
    assert _mae(pred, y2) <= 1.02 * best_mae and _rmse(pred, y2) <= best_rmse
    # given the "which half" context, the gbm picks the good member per row
    ctx, ctx2 = np.column_stack([X, half]), np.column_stack([X2, half2])
    assert _mae(GBMMeta().fit(ctx, y).predict(ctx2), y2) < 0.6 * best_mae


def test_mae_blend_is_convex_and_ignores_a_heavy_tail():
    """The MAE blend is a convex combination minimizing the absolute error: on a target with a
    few huge outliers that no member predicts, least squares rescales the members (and loses
    MAE on the typical rows), the MAE blend does not."""
    rng = np.random.default_rng(7)
    n = 600
    y = rng.normal(size=n)
    y[:12] += 40.0  # a heavy tail no member sees
    good = y + rng.normal(scale=0.2, size=n)
    good[:12] -= 40.0
    weak = y + rng.normal(scale=0.8, size=n)
    weak[:12] -= 40.0
    X = np.column_stack([good, weak])
    blend = ConvexMAEMeta().fit(X, y)
    assert np.all(blend.coef_ >= 0) and blend.coef_.sum() == pytest.approx(1.0) and blend.intercept_ == 0.0
    assert blend.coef_[0] > 0.8  # mostly the good member
    mae_blend = _mae(blend.predict(X), y)
    assert mae_blend <= _mae(good, y) + 1e-9  # the LP optimum is at least as good as any vertex
    assert mae_blend < _mae(NNLSMeta().fit(X, y).predict(X), y)
    # the same weights as brute force over a fine grid of convex weights
    grid = np.linspace(0, 1, 1001)
    brute = min(_mae(a * good + (1 - a) * weak, y) for a in grid)
    assert mae_blend == pytest.approx(brute, abs=1e-3)


def test_nnls_intercept_by_centering():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(200, 2))
    meta = NNLSMeta().fit(x, 2.0 * x[:, 0] + 3.0)
    assert meta.coef_ == pytest.approx([2.0, 0.0], abs=1e-9) and meta.intercept_ == pytest.approx(3.0)


def test_bad_arguments_are_named_in_fit(phonons):
    """__init__ stores anything (scikit-learn's manner); fit checks, naming the parameter."""
    ds, split, fs = phonons
    rows = split.train
    bad = [
        ({"meta": "svm"}, r"meta: unknown meta-learner 'svm'"),
        ({"meta": "nnls", "context_features": 3}, "context_features needs meta"),
        ({"context_features": -1, "meta": "ridge"}, "context_features must be an integer >= 0"),
        ({"n_folds": 1}, r"n_folds must be an integer >= 2 \(got 1\)"),
        ({"n_folds": 2.5}, "n_folds must be an integer"),
        ({"seed": "0"}, "seed must be an integer"),
        ({"es_fraction": 0.5}, r"es_fraction must be in \(0, 0.5\)"),
        ({"member_overrides": [("max_epochs", 1)]}, "member_overrides must be a dict"),
        ({"refit": "yes"}, "refit must be True or False"),
        ({"graph_max_epochs": 0}, "graph_max_epochs must be an integer >= 1"),
        ({"members": []}, "members: StackedEnsemble needs a non-empty list"),
        ({"members": [RF, {"rf": {}}]}, r"members\[1\]: a member is a trial config dict with a 'family' key"),
    ]
    for params, message in bad:
        ens = StackedEnsemble(**{"members": [RF], **params})  # no check here
        assert ens.get_params()[next(iter(params))] is params[next(iter(params))]
        with pytest.raises(InvalidParameterError, match=message):
            ens.fit(fs.descriptors, None, ds.targets, rows)
        assert not hasattr(ens, "members_") and not hasattr(ens, "names_")  # nothing fitted
    two = np.column_stack([ds.targets, ds.targets])
    two[split.train[0]] = np.nan  # a training row without any label
    with pytest.raises(ValueError, match="no finite label for any target"):
        StackedEnsemble([RF], n_folds=2).fit(fs.descriptors, None, two, split.train)
    with pytest.raises(RuntimeError, match="not fitted"):
        StackedEnsemble([RF]).predict(fs.descriptors, None, split.test)


def test_get_params_set_params_and_clone_round_trip():
    from sklearn.base import clone

    from matfusion.config import EnsembleConfig

    overrides = {"max_epochs": 3}
    ens = StackedEnsemble(
        [RF, CGCNN],
        meta="ridge",
        n_folds=3,
        context_features=2,
        seed=7,
        es_fraction=0.2,
        member_overrides=overrides,
        refit=False,
        graph_max_epochs=4,
        coverage=0.8,
        difficulty="spread",
        refit_gain=True,
    )
    params = ens.get_params()
    assert params == {
        "members": [RF, CGCNN],
        "meta": "ridge",
        "n_folds": 3,
        "context_features": 2,
        "seed": 7,
        "es_fraction": 0.2,
        "member_overrides": {"max_epochs": 3},
        "refit": False,
        "graph_max_epochs": 4,
        "coverage": 0.8,
        "difficulty": "spread",
        "refit_gain": True,
    }
    assert params["members"][0] is RF and params["member_overrides"] is overrides  # stored unchanged
    twin = clone(ens)
    assert type(twin) is StackedEnsemble and twin.get_params() == params
    assert twin.members is not ens.members and twin.members[1] is not CGCNN  # a fresh copy, equal
    assert twin.set_params(n_folds=4, meta="gbm") is twin and twin.n_folds == 4 and twin.meta == "gbm"
    assert ens.n_folds == 3
    with pytest.raises(ValueError, match="bogus"):
        ens.set_params(bogus=1)
    # the defaults are EnsembleConfig's (one set of numbers)
    d, plain = EnsembleConfig(), StackedEnsemble([RF])
    assert (plain.meta, plain.n_folds, plain.refit, plain.graph_max_epochs, plain.refit_gain) == (
        d.meta,
        d.n_folds,
        d.refit,
        d.max_epochs,
        d.refit_gain,
    )
    # the derived member configs are made in fit, not in __init__; the given ones stay as they were
    assert ens.members[1] is CGCNN and "lr_restarts" not in CGCNN and CGCNN["max_epochs"] == 2
    derived = ens._derived_members()
    assert [m["lr_restarts"] for m in derived] == [[], []]
    assert derived[0]["max_epochs"] == 3 and derived[1]["max_epochs"] == 4  # graph_max_epochs: graph members only
    assert derived[1]["cgcnn"] is not CGCNN["cgcnn"]  # fresh copies


def test_clone_of_a_fitted_ensemble_is_unfitted_and_fits_alike(phonons):
    from sklearn.base import clone
    from sklearn.utils.validation import check_is_fitted

    ds, split, fs = phonons
    rows = np.sort(np.concatenate([split.train, split.val]))
    ens = StackedEnsemble([RF, WEAK], meta="mae", n_folds=2, seed=3).fit(fs.descriptors, None, ds.targets, rows)
    check_is_fitted(ens)
    twin = clone(ens)
    assert not hasattr(twin, "members_") and not hasattr(twin, "oof_")
    with pytest.raises(RuntimeError, match="not fitted"):
        twin.predict(fs.descriptors, None, split.test)
    twin.fit(fs.descriptors, None, ds.targets, rows)
    np.testing.assert_array_equal(twin.oof_, ens.oof_)
    np.testing.assert_allclose(
        twin.predict(fs.descriptors, None, split.test, return_std=False),
        ens.predict(fs.descriptors, None, split.test, return_std=False),
    )
    # prediction reads fitted attributes only: changing a hyperparameter after fit changes nothing
    # until the next fit
    expect = ens.predict(fs.descriptors, None, split.test)
    ens.set_params(n_folds=4, members=[WEAK])
    for a, b in zip(ens.predict(fs.descriptors, None, split.test), expect):
        np.testing.assert_allclose(a, b)


def test_pickled_ensemble_predicts_in_a_fresh_process(tmp_path, phonons):
    """What the pyfunc model does: unpickle the fitted ensemble in a new interpreter and predict."""
    import pickle

    ds, split, fs = phonons
    rows = np.sort(np.concatenate([split.train, split.val]))
    ens = StackedEnsemble([RF, WEAK], meta="ridge", n_folds=2, context_features=3, seed=1).fit(
        fs.descriptors, None, ds.targets, rows
    )
    mean, std = ens.predict(fs.descriptors, None, split.test)
    (tmp_path / "ens.pkl").write_bytes(pickle.dumps(ens))
    np.save(tmp_path / "x.npy", fs.descriptors[split.test])
    script = textwrap.dedent(f"""
        import pickle, numpy as np
        ens = pickle.load(open({str(tmp_path / "ens.pkl")!r}, "rb"))
        x = np.load({str(tmp_path / "x.npy")!r})
        mean, std = ens.predict(x, None, np.arange(len(x)))
        np.save({str(tmp_path / "out.npy")!r}, np.stack([mean, std]))
    """)
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=tmp_path, check=False
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = np.load(tmp_path / "out.npy")
    np.testing.assert_allclose(got[0], mean, rtol=0, atol=1e-9)
    np.testing.assert_allclose(got[1], std, rtol=0, atol=1e-9)
    # a pickle made before the trained configs moved to members_ (they were kept in members)
    old = dict(ens.__dict__, members=ens.members_)
    del old["members_"]
    restored = pickle.loads(pickle.dumps(ens))
    restored.__dict__.clear()
    restored.__setstate__(old)
    assert restored.members_ == ens.members_
    np.testing.assert_allclose(restored.predict(fs.descriptors, None, split.test)[0], mean, rtol=0, atol=1e-12)


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
        fit_rows, es_rows, held = (
            set(a.tolist()) for a in (fitted.fold_train_rows_[k], fitted.fold_es_rows_[k], fitted.fold_heldout_rows_[k])
        )
        assert fit_rows | es_rows <= train_rows  # training rows only
        assert not (fit_rows | es_rows) & held  # never the fold it predicts
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
    ev = evaluate_ensemble(fitted, fs.descriptors, fs.graphs, ds.targets, split.test)
    members = [ev.metrics[f"member.{n}_mae"] for n in fitted.names_]
    assert ev.metrics["ensemble_mae"] <= 1.05 * min(members)
    # the 2-epoch cgcnn is poor: the meta-learner down-weights it, the plain average cannot
    assert ev.metrics["ensemble_mae"] < ev.metrics["average_mae"]


def test_predict_mean_and_std(phonons, fitted):
    ds, split, fs = phonons
    mean, std = fitted.predict(fs.descriptors, fs.graphs, split.test)
    assert mean.shape == std.shape == (len(split.test),)
    assert np.all(std >= 0) and np.any(std > 0)
    # nnls is linear: mean of the stacked fold predictions == weights applied to member fold-averages
    w = fitted.meta_model_.coef_
    expect = fitted.member_predictions(fs.descriptors, fs.graphs, split.test) @ w + fitted.meta_model_.intercept_
    np.testing.assert_allclose(mean, expect, rtol=0, atol=1e-8)
    np.testing.assert_allclose(fitted.predict(fs.descriptors, fs.graphs, split.test, return_std=False), mean)


def test_refit_members_train_on_all_training_rows_only(phonons, fitted):
    """The point prediction comes from members refitted on all the training rows (less an
    early-stopping share), never a test row; the K fold models remain for the spread."""
    ds, split, fs = phonons
    train_rows = set(split.train.tolist()) | set(split.val.tolist())
    fit_rows, es_rows = set(fitted.refit_train_rows_.tolist()), set(fitted.refit_es_rows_.tolist())
    assert fit_rows | es_rows == train_rows and not fit_rows & es_rows and es_rows
    assert len(fit_rows) > max(len(r) for r in fitted.fold_train_rows_)  # more rows than any fold model
    weighted = fitted.weighted_members()
    assert weighted and all(
        (fitted.refit_states_[j] is not None) == (j in weighted) for j in range(len(fitted.members_))
    )
    for j in weighted:
        if fitted.members_[j]["family"] == "cgcnn":  # standardized on exactly the refit's training rows
            assert float(np.ravel(fitted.refit_states_[j]["y_mean"])[0]) == pytest.approx(
                ds.targets[fitted.refit_train_rows_].mean()
            )
    assert fitted.summary()["refit"] == [fitted.names_[j] for j in weighted]
    assert all(m["lr_restarts"] == [] for m in fitted.members_)  # members anneal once, whatever the search did

    out = fitted.predict_all(fs.descriptors, fs.graphs, split.test)
    fold_mean = fitted.stack_folds(out["per_fold"], fs.descriptors, split.test).mean(axis=0)
    assert not np.allclose(out["mean"], fold_mean)  # the refit changes the point prediction ...
    spread = fitted.stack_folds(out["per_fold"], fs.descriptors, split.test).std(axis=0)
    np.testing.assert_allclose(out["spread"], spread)  # the fold-model spread, under its own name
    # ... and without refit states the ensemble predicts with its fold models, as refit=False does
    import copy

    plain = copy.copy(fitted)
    plain.refit_states_ = [None] * len(fitted.members_)
    np.testing.assert_allclose(plain.predict(fs.descriptors, fs.graphs, split.test, return_std=False), fold_mean)


def test_refit_false_fits_no_extra_model(phonons):
    ds, split, fs = phonons
    rows = np.sort(np.concatenate([split.train, split.val]))
    ens = StackedEnsemble([RF, WEAK], meta="mae", n_folds=2, seed=0, refit=False).fit(
        fs.descriptors, None, ds.targets, rows
    )
    assert ens.refit_states_ == [None, None] and not ens.refitted and ens.summary()["refit"] == []
    mean = ens.predict(fs.descriptors, None, split.test, return_std=False)
    per_fold = ens.fold_member_predictions(fs.descriptors, None, split.test)
    np.testing.assert_allclose(mean, ens.stack_folds(per_fold, fs.descriptors, split.test).mean(axis=0))
    # with refit the zero-weight member is not refitted
    ens2 = StackedEnsemble([RF, WEAK], meta="mae", n_folds=2, seed=0).fit(fs.descriptors, None, ds.targets, rows)
    zero = [j for j, n in enumerate(ens2.names_) if ens2.weights_[n] == 0.0]
    assert all(ens2.refit_states_[j] is None for j in zero)
    assert all(ens2.refit_states_[j] is not None for j in ens2.weighted_members())


def test_ridge_with_context_features(phonons):
    ds, split, fs = phonons
    rows = np.sort(np.concatenate([split.train, split.val]))
    ens = StackedEnsemble([RF, WEAK], meta="ridge", n_folds=3, context_features=4, seed=1)
    ens.fit(fs.descriptors, None, ds.targets, rows)
    assert set(ens.weights_) == {"rf", "rf_2", "context_0", "context_1", "context_2", "context_3", "intercept"}
    mean, std = ens.predict(fs.descriptors, None, split.test)
    assert np.all(np.isfinite(mean)) and mean.shape == (len(split.test),)


# ----------------------------------------------------------------------------- MLflow: select + log
def _trial_run(client, exp, parent, trial_id, config, val_maes, status, with_artifact=True):
    run = client.create_run(
        exp,
        run_name=trial_id,
        tags={"mlflow.parentRunId": parent, "trial_id": trial_id, "family": config["family"], "status": status},
    )
    rid = run.info.run_id
    from matfusion.tracking.logger import flatten

    client.log_batch(
        rid,
        params=[mlflow.entities.Param(k, str(v)) for k, v in flatten(config).items()],
        metrics=[mlflow.entities.Metric("val_mae", v, 0, i + 1) for i, v in enumerate(val_maes)],
    )
    if with_artifact:
        client.log_dict(rid, config, "trial_config.json")
    client.set_terminated(rid, "FAILED" if status == "failed" else "FINISHED")
    return rid


def _fake_search(client, exp, ds, name="phonons-tiny"):
    """A search parent (as run_search logs it) with hand-made trial runs."""
    from matfusion.config import config_from_dict

    cfg = config_from_dict(
        {
            "name": name,
            "data": {"source": TASK, "limit": LIMIT, "data_dir": str(DATA_DIR)},
            "search": {"families": ["rf", "cgcnn"], "num_samples": 4, "max_epochs": 2, "grace_period": 1},
        }
    )
    parent = client.create_run(
        exp,
        run_name=f"search-{name}",
        tags={
            "kind": "search",
            "dataset": ds.name,
            "fold": "0",
            "dataset_hash": ds.content_hash,
            "status": "completed",
        },
    )
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
        ("rf", None),
        ("cgcnn", "early"),
        ("cgcnn", "none"),
    ]
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
    ev = evaluate_ensemble(fitted, fs.descriptors, fs.graphs, ds.targets, split.test)
    for key in (
        "ensemble_mae",
        "ensemble_rmse",
        "ensemble_r2",
        "average_mae",
        "member.rf_mae",
        "member.cgcnn-early_r2",
        "calib_within_1std",
        "calib_within_2std",
    ):
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
        evaluate_ensemble(fitted, fs.descriptors, fs.graphs, ds.targets, split.train[:5])


# ----------------------------------------------------------------------------- registry + export + predict
def test_champion_alias_moves_only_on_improvement(phonons, fitted, registry):
    ds, split, fs = phonons
    uri, client, exp = registry["uri"], registry["client"], registry["exp"]
    rows = np.sort(np.concatenate([split.train, split.val]))
    weak = StackedEnsemble([WEAK], n_folds=2).fit(fs.descriptors, None, ds.targets, rows)
    weak_ev = evaluate_ensemble(weak, fs.descriptors, None, ds.targets, split.test)
    good_mae = registry["evaluation"].test_mae
    assert weak_ev.test_mae > good_mae  # precondition: the stumps really are worse
    weak_uri = _log_model(uri, client, exp, weak, phonons, weak_ev.metrics)
    task = "alias-test"  # its own registered model in the registry fixture's store
    name = f"matfusion-{task}"
    champion = lambda: client.get_model_version_by_alias(name, "champion")  # noqa: E731
    v1, moved = register_ensemble(uri, weak_uri, task, 0, weak_ev.test_mae)
    assert moved and str(champion().version) == str(v1.version)
    v2, moved = register_ensemble(uri, registry["model_uri"], task, 0, good_mae)  # better: moves
    assert moved and str(champion().version) == str(v2.version)
    v3, moved = register_ensemble(uri, weak_uri, task, 0, weak_ev.test_mae)  # worse: stays
    assert not moved and str(champion().version) == str(v2.version)
    assert client.get_model_version(name, v3.version).tags == {
        "task": task,
        "fold": "0",
        "test_mae": repr(float(weak_ev.test_mae)),
    }
    v4, moved = register_ensemble(uri, weak_uri, task, 1, 0.0)  # another fold is not comparable
    assert not moved and str(champion().version) == str(v2.version)
    # the real task's champion is untouched
    assert str(client.get_model_version_by_alias(f"matfusion-{TASK}", "champion").version) == "1"


def test_fresh_process_loads_champion_and_reproduces_predictions(tmp_path, phonons, fitted, registry):
    ds, split, fs = phonons
    expect = fitted.predict_interval(fs.descriptors, fs.graphs, split.test)
    wide = fitted.predict_interval(fs.descriptors, fs.graphs, split.test, coverage=0.95)
    inputs = tmp_path / "inputs.json"
    # half as dict JSON text, half as CIF text: both featurize to the same graphs
    cells = [
        json.dumps(ds.structures[r].as_dict()) if i % 2 else ds.structures[r].to(fmt="cif")
        for i, r in enumerate(split.test)
    ]
    inputs.write_text(json.dumps(cells))
    out = tmp_path / "out.csv"
    script = textwrap.dedent(f"""
        import json, mlflow, pandas as pd
        mlflow.set_tracking_uri({registry["uri"]!r})
        model = mlflow.pyfunc.load_model("models:/matfusion-{TASK}@champion")
        df = pd.DataFrame({{"structure": json.load(open({str(inputs)!r}))}})
        model.predict(df).to_csv({str(out)!r}, index=False, float_format="%.12g")
        model.predict(df, params={{"coverage": 0.95}}).to_csv({str(out) + ".95"!r}, index=False, float_format="%.12g")
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = pd.read_csv(out)
    # the calibrated std, the conformal interval at the model's 90 %, and the old spread by name
    assert list(got.columns) == ["prediction", "std", "lower", "upper", "spread"]
    np.testing.assert_allclose(got["prediction"], expect["mean"], rtol=0, atol=1e-6)
    for c in ("std", "lower", "upper", "spread"):
        np.testing.assert_allclose(got[c], expect[c], rtol=0, atol=1e-6, err_msg=c)
    assert (got["lower"] < got["prediction"]).all() and (got["prediction"] < got["upper"]).all()
    got95 = pd.read_csv(str(out) + ".95")
    np.testing.assert_allclose(got95["upper"], wide["upper"], rtol=0, atol=1e-6)
    assert (got95["upper"] - got95["lower"] > got["upper"] - got["lower"]).all()


def test_export_and_predict_commands_skip_a_bad_cif(tmp_path, phonons, fitted, registry, capsys):
    ds, split, fs = phonons
    parser = _parser()
    to = tmp_path / "exported"
    args = parser.parse_args(
        ["export", f"models:/matfusion-{TASK}@champion", "--to", str(to), "--tracking-uri", registry["uri"]]
    )
    assert args.func(args) == 0
    assert (to / "MLmodel").is_file() and (to / "artifacts" / "ensemble.pkl").is_file()
    card = (to / "README.md").read_text()
    assert "nnls" in card and "| rf |" in card and "| cgcnn-early |" in card and "ensemble_mae" in card
    assert f"{fitted.weights_['rf']:.4g}" in card and "torch" in card and "outer fold: 0" in card
    # the card says how the intervals were calibrated and how they covered the test rows
    m = registry["evaluation"].metrics
    assert "## Uncertainty" in card and f"| 90 % | {m['coverage_90']:.4g} | {m['width_90']:.4g} |" in card
    assert "out-of-fold residuals of the training rows" in card and "params={'coverage': 0.95}" in card
    # and which correction its calibration applied (this small stack's refit holds out too few rows)
    c = fitted.calibration_summary()
    assert c["refit_gain"] is False and f"refit gain not applied: {c['refit_gain_reason']}" in card

    cifs = tmp_path / "cifs"
    cifs.mkdir()
    picked = [int(r) for r in split.test[:3]]
    for r in picked:
        (cifs / f"{ds.ids[r]}.cif").write_text(ds.structures[r].to(fmt="cif"))
    (cifs / "broken.cif").write_text("data_broken\n_cell_length_a 3.0\nthis is not a CIF loop\n")
    # parseable but not featurizable (tests/data/bad): a zero-volume cell and an unknown element
    bad_dir = Path(__file__).resolve().parents[1] / "data" / "bad" / "cifs"
    (cifs / "POSCAR_collinear").write_text((bad_dir / "POSCAR_collinear").read_text())
    (cifs / "unknown_xx.cif").write_text((bad_dir / "unknown_xx.cif").read_text())
    out = tmp_path / "preds.csv"
    capsys.readouterr()
    args = parser.parse_args(["predict", str(to), str(cifs), "--out", str(out)])
    assert args.func(args) == 0
    err = capsys.readouterr().err
    assert "broken.cif" in err and "cannot parse" in err
    assert "POSCAR_collinear" in err and "volume" in err and "unknown_xx.cif" in err and "Xx" in err
    df = pd.read_csv(out)
    assert list(df.columns) == ["id", "prediction", "std", "lower", "upper", "spread"]
    assert sorted(df["id"]) == sorted(ds.ids[r] for r in picked)
    expect, _ = fitted.predict(fs.descriptors, fs.graphs, np.array(picked))
    got = df.set_index("id").loc[[ds.ids[r] for r in picked], "prediction"].to_numpy()
    np.testing.assert_allclose(got, expect, atol=1e-6)
    # --coverage: the interval at another level, the same point prediction and std
    out95 = tmp_path / "preds95.csv"
    args = parser.parse_args(["predict", str(to), str(cifs), "--out", str(out95), "--coverage", "0.95"])
    assert args.func(args) == 0
    df95 = pd.read_csv(out95).set_index("id").loc[df["id"]]
    np.testing.assert_allclose(df95["prediction"].to_numpy(), df["prediction"].to_numpy())
    np.testing.assert_allclose(df95["std"].to_numpy(), df["std"].to_numpy())
    assert ((df95["upper"] - df95["lower"]).to_numpy() > (df["upper"] - df["lower"]).to_numpy()).all()
    expect95 = fitted.predict_interval(fs.descriptors, fs.graphs, np.array(picked), coverage=0.95)
    np.testing.assert_allclose(
        df95.loc[[ds.ids[r] for r in picked], "upper"].to_numpy(), expect95["upper"], rtol=0, atol=1e-6
    )

    # a table input with one unparseable row, via the API
    table = tmp_path / "table.csv"
    pd.DataFrame({"id": ["a", "b"], "structure": [json.dumps(ds.structures[picked[0]].as_dict()), "garbage"]}).to_csv(
        table, index=False
    )
    res = predict_structures(str(to), [table])
    assert list(res["id"]) == ["a"] and res["prediction"].iloc[0] == pytest.approx(expect[0], abs=1e-6)
    assert "row 1 (id b)" in capsys.readouterr().err


def test_predict_and_export_of_a_model_that_does_not_exist_say_so_in_one_line(tmp_path, phonons, registry, capsys):
    """Issue 21 item 3: one line (what, which model, what to do) and exit 3, not an MLflow traceback."""
    from matfusion.cli import main
    from matfusion.ensembles.commands import EXIT_MODEL_NOT_FOUND

    ds, split, _ = phonons
    cif = tmp_path / "one.cif"
    cif.write_text(ds.structures[int(split.test[0])].to(fmt="cif"))
    missing_run = "0123456789abcdef0123456789abcdef"
    for ref in (
        missing_run,
        f"runs:/{missing_run}/model",
        "models:/matfusion-no-such-task@champion",
        str(tmp_path / "no-such-folder"),
    ):
        capsys.readouterr()
        rc = main(["predict", ref, str(cif), "--tracking-uri", registry["uri"]])
        err = capsys.readouterr().err.strip()
        assert rc == EXIT_MODEL_NOT_FOUND == 3, (ref, err)
        assert len(err.splitlines()) == 1 and "Traceback" not in err, err
        assert err.startswith("matfusion predict: no model at") and "check" in err
        assert (missing_run in err) if missing_run in ref else (ref.split("@")[0].split("/")[-1] in err)
    capsys.readouterr()
    rc = main(["export", f"runs:/{missing_run}/model", "--to", str(tmp_path / "x"), "--tracking-uri", registry["uri"]])
    err = capsys.readouterr().err.strip()
    assert rc == 3 and len(err.splitlines()) == 1 and missing_run in err
    # a model that exists but a bad --coverage is bad input (2), named
    rc = main(["predict", registry["model_uri"], str(cif), "--coverage", "1.5", "--tracking-uri", registry["uri"]])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "--coverage must be a number in (0, 1)" in err


def test_ensemble_command_end_to_end(tmp_path, phonons, capsys):
    """`matfusion ensemble` on a search parent (config.json + trial runs with trial_config.json)."""
    uri, client, exp = _tracking(tmp_path)
    pid, cfg = _fake_search(client, exp, phonons[0])
    parser = _parser()
    args = parser.parse_args(
        [
            "ensemble",
            "--experiment",
            "ens-test",
            "--k",
            "1",
            "--folds",
            "2",
            "--families",
            "rf",
            "cgcnn",
            "--tracking-uri",
            uri,
            "--quiet",
        ]
    )
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "Stacked ensemble (mae, 2 folds)" in out and "registered matfusion-matbench_phonons version 1" in out
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


def test_ensemble_flags_build_the_ensemble_config():
    """The flags not given keep EnsembleConfig's defaults; the given ones override them; a bad
    value is named by its flag."""
    from matfusion.config import EnsembleConfig
    from matfusion.ensembles.commands import settings_from_args

    parser = _parser()
    args = parser.parse_args(["ensemble", "--experiment", "x"])
    assert settings_from_args(args) == EnsembleConfig()
    assert (args.seed, args.context_features) == (StackedEnsemble([RF]).seed, StackedEnsemble([RF]).context_features)
    args = parser.parse_args(
        [
            "ensemble",
            "--experiment",
            "x",
            "--k",
            "1",
            "--meta",
            "gbm",
            "--folds",
            "3",
            "--max-epochs",
            "7",
            "--no-refit",
            "--no-register",
            "--coverage",
            "0.8",
            "--difficulty",
            "constant",
        ]
    )
    assert settings_from_args(args) == EnsembleConfig(
        k=1, meta="gbm", n_folds=3, max_epochs=7, refit=False, register=False, coverage=0.8, difficulty="constant"
    )
    args = parser.parse_args(["ensemble", "--experiment", "x", "--coverage", "1.5"])
    with pytest.raises(ValueError, match=r"--coverage: .*less than 1"):
        settings_from_args(args)
    args = parser.parse_args(["ensemble", "--experiment", "x", "--folds", "1", "--max-epochs", "0"])
    with pytest.raises(ValueError, match=r"--folds: .*greater than or equal to 2 \(got 1\).*--max-epochs"):
        settings_from_args(args)
    # run_ensemble reports it and exits 2 before touching MLflow
    assert args.func(args) == 2
    with pytest.raises(SystemExit):  # not an integer / not a meta-learner: argparse's own error
        parser.parse_args(["ensemble", "--experiment", "x", "--meta", "svm"])


def test_help_texts_show_the_config_defaults(capsys):
    from matfusion.config import EnsembleConfig

    parser = _parser()
    with pytest.raises(SystemExit):
        parser.parse_args(["ensemble", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    d = EnsembleConfig()
    assert f"members per group (default {d.k})" in text and f"(>= 2; default {d.n_folds})" in text
    assert f"gbm (default {d.meta})" in text


def test_help_texts():
    parser = _parser()
    for cmd in ("ensemble", "export", "predict"):
        with pytest.raises(SystemExit) as exc:
            parser.parse_args([cmd, "--help"])
        assert exc.value.code == 0


@pytest.mark.slow
def test_real_search_then_ensemble_command(tmp_path, capsys, monkeypatch):
    """`matfusion search` of a tiny real search (Ray Tune + Optuna + MLflow) with
    ensemble.enabled stacks it at the end; then `matfusion ensemble` on the same search."""
    import yaml

    from matfusion.cli import main

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    config = tmp_path / "e2e.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "name": "ens-e2e",
                "data": {"source": TASK, "limit": 120, "data_dir": str(DATA_DIR)},
                "features": {"n_jobs": 2},
                "search": {
                    "families": ["rf", "cgcnn"],
                    "fusions": ["none", "early"],
                    "preset": "quick",
                    "num_samples": 4,
                    "max_epochs": 2,
                    "grace_period": 1,
                    "max_concurrent": 2,
                    "storage_path": str(tmp_path / "ray"),
                },
                "mlflow": {"tracking_uri": uri, "artifact_location": str(tmp_path / "artifacts")},
                "ensemble": {"enabled": True, "k": 1, "n_folds": 2},
            }
        )
    )
    assert main(["search", str(config), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "Leaderboard of search 'ens-e2e'" in out and "Stacked ensemble (mae, 2 folds)" in out
    assert "registered matfusion-matbench_phonons version 1" in out
    client = MlflowClient(uri)
    parent = client.search_runs(
        [client.get_experiment_by_name("ens-e2e").experiment_id], filter_string="tags.kind = 'search'"
    )
    assert len(parent) == 1
    exp_id, parent_id = parent[0].info.experiment_id, parent[0].info.run_id
    trials = client.search_runs(
        [exp_id], filter_string=f"tags.mlflow.parentRunId = '{parent_id}' and tags.trial_id != ''"
    )
    assert len(trials) == 4
    hooked = client.search_runs([exp_id], filter_string="tags.kind = 'ensemble'")
    assert len(hooked) == 1 and hooked[0].data.tags["mlflow.parentRunId"] == parent_id
    assert hooked[0].data.metrics["ensemble_mae"] > 0
    mv = client.get_model_version_by_alias(f"matfusion-{TASK}", "champion")
    assert mv.run_id == hooked[0].info.run_id

    args = _parser().parse_args(
        [
            "ensemble",
            "--experiment",
            "ens-e2e",
            "--k",
            "1",
            "--folds",
            "2",
            "--tracking-uri",
            uri,
            "--quiet",
            "--no-register",
        ]
    )
    assert args.func(args) == 0
    assert "Stacked ensemble (mae, 2 folds)" in capsys.readouterr().out
    runs = client.search_runs([exp_id], filter_string="tags.kind = 'ensemble'")
    assert len(runs) == 2 and {r.data.tags["mlflow.parentRunId"] for r in runs} == {parent_id}
    # same search, fold, members and seed: the command reproduces the hook's ensemble
    again = next(r for r in runs if r.info.run_id != hooked[0].info.run_id)
    assert again.data.metrics["ensemble_mae"] == pytest.approx(hooked[0].data.metrics["ensemble_mae"], rel=1e-6)


# ----------------------------------------------------------------------------- multi-target
ELASTIC = "matminer/elastic_tensor.csv.gz"
ELASTIC_TARGETS = ["K_VRH", "G_VRH"]


@pytest.fixture(scope="session")
def elastic(tmp_path_factory):
    """150 rows of elastic_tensor (K_VRH, G_VRH), with some G_VRH labels hidden (NaN) in both
    the training and the test rows; and the 2-member stacked ensemble fitted on them."""
    if DATA_DIR is None:
        pytest.fail("real data not found: set MATFUSION_DATA or place ../shared/data beside the repo")
    ds = load_dataset(DataConfig(source=ELASTIC, target=ELASTIC_TARGETS, limit=LIMIT, data_dir=str(DATA_DIR)))
    split = split_fold(ds, 0)
    fs = featurize(ds, FeaturesConfig(n_jobs=2, cache_dir=str(tmp_path_factory.mktemp("fcache-el"))), progress=False)
    rows = np.sort(np.concatenate([split.train, split.val]))
    rng = np.random.default_rng(0)
    hidden = np.sort(np.concatenate([rng.choice(rows, 25, replace=False), rng.choice(split.test, 6, replace=False)]))
    targets = ds.targets.copy()
    assert np.isfinite(targets[hidden]).all()  # precondition: these labels exist and are really hidden
    targets[hidden, 1] = np.nan
    ens = StackedEnsemble([RF, CGCNN], meta="nnls", n_folds=3, seed=0)
    ens.fit(fs.descriptors, fs.graphs, targets, rows, GRAPH_PARAMS, target_names=ELASTIC_TARGETS)
    return ds, split, fs, targets, rows, hidden, ens


def test_multi_target_stacking_shapes_and_labelled_meta_rows(elastic):
    ds, split, fs, targets, rows, hidden, ens = elastic
    n, m, k = len(rows), 2, 2
    assert ens.multi_target and ens.target_names_ == ELASTIC_TARGETS
    assert all(c["targets"] == ELASTIC_TARGETS for c in ens.members_)
    assert all("targets" not in c for c in ens.members)  # the given configs are left as they were
    assert ens.oof_.shape == (n, m, k) and np.isfinite(ens.oof_).all()
    assert ens.oof_y_.shape == (n, k)
    # K_VRH: every training row; G_VRH: exactly the training rows that keep their label
    labelled_g = rows[np.isfinite(targets[rows, 1])]
    assert len(labelled_g) == n - 25
    np.testing.assert_array_equal(ens.meta_fit_rows_[0], rows)
    np.testing.assert_array_equal(ens.meta_fit_rows_[1], labelled_g)
    assert not set(ens.meta_fit_rows_[1].tolist()) & set(hidden.tolist())
    # the fitted G_VRH meta-learner is the one fitted on the labelled OOF rows only (a NaN label
    # in its fit rows would make its mean NaN and its weights differ)
    lab = np.isfinite(ens.oof_y_[:, 1])
    ref = NNLSMeta().fit(ens.oof_[lab, :, 1], ens.oof_y_[lab, 1])
    g_meta = ens.meta_models_[1]
    assert np.isfinite(g_meta.y_mean_) and g_meta.y_mean_ == pytest.approx(np.mean(targets[labelled_g, 1]))
    np.testing.assert_allclose(g_meta.coef_, ref.coef_, atol=1e-10)
    assert set(ens.weights_) == set(ELASTIC_TARGETS) and set(ens.weights_["G_VRH"]) == {
        "rf",
        "cgcnn-early",
        "intercept",
    }
    # the fold torch models standardized each target on its labelled training rows only
    state = ens.fold_states_[0][1]
    fit_rows = ens.fold_train_rows_[0]
    np.testing.assert_allclose(np.ravel(state["y_mean"]), np.nanmean(targets[fit_rows], axis=0))

    mean, std = ens.predict(fs.descriptors, fs.graphs, split.test)
    assert mean.shape == std.shape == (len(split.test), k)
    assert np.isfinite(mean).all() and (std >= 0).all() and (std > 0).any()
    assert ens.member_predictions(fs.descriptors, fs.graphs, split.test).shape == (len(split.test), m, k)
    # per-target linear blend of the member fold-averages, as for one target
    members = ens.member_predictions(fs.descriptors, fs.graphs, split.test)
    for t in range(k):
        expect = members[:, :, t] @ ens.meta_models_[t].coef_ + ens.meta_models_[t].intercept_
        np.testing.assert_allclose(mean[:, t], expect, atol=1e-8)

    ev = evaluate_ensemble(ens, fs.descriptors, fs.graphs, targets, split.test)
    y_g = targets[split.test, 1]
    n_lab = int(np.isfinite(y_g).sum())
    assert ev.metrics["n_test"] == len(split.test) and ev.metrics["n_test_G_VRH"] == n_lab == len(split.test) - 6
    assert ev.metrics["n_test_K_VRH"] == len(split.test)
    for key in (
        "ensemble_mae_K_VRH",
        "ensemble_rmse_G_VRH",
        "ensemble_r2_K_VRH",
        "average_mae_G_VRH",
        "member.rf_mae_G_VRH",
        "member.cgcnn-early_r2_K_VRH",
        "calib_within_1std_G_VRH",
    ):
        assert np.isfinite(ev.metrics[key]), key
    assert "ensemble_mae" not in ev.metrics
    lab_t = np.isfinite(y_g)
    assert ev.metrics["ensemble_mae_G_VRH"] == pytest.approx(_mae(mean[lab_t, 1], y_g[lab_t]))
    assert ev.test_mae == pytest.approx((ev.metrics["ensemble_mae_K_VRH"] + ev.metrics["ensemble_mae_G_VRH"]) / 2)
    assert {"prediction_K_VRH", "std_G_VRH", "y_G_VRH", "member.rf_K_VRH", "average_G_VRH"} <= set(ev.predictions)


def test_multi_target_pyfunc_and_predict_structures(tmp_path, elastic, capsys):
    from matfusion.ensembles.export import save_ensemble_model

    ds, split, fs, targets, rows, hidden, ens = elastic
    ev = evaluate_ensemble(ens, fs.descriptors, fs.graphs, targets, split.test)
    card = make_card(ens, ds.name, split.fold, ev.metrics, data={"source": ELASTIC, "limit": LIMIT})
    path = tmp_path / "model"
    save_ensemble_model(str(path), ens, featurizer_spec(ens, 6.0, 12), card, [ds.structures[i] for i in split.test[:2]])
    model = mlflow.pyfunc.load_model(str(path))
    picked = [int(r) for r in split.test[:4]]
    out = model.predict(pd.DataFrame({"structure": [json.dumps(ds.structures[r].as_dict()) for r in picked]}))
    kinds = ["prediction", "std", "lower", "upper", "spread"]
    assert list(out.columns) == [f"{c}_{t}" for t in ELASTIC_TARGETS for c in kinds]
    expect, expect_std = ens.predict(fs.descriptors, fs.graphs, np.array(picked))
    np.testing.assert_allclose(out[["prediction_K_VRH", "prediction_G_VRH"]].to_numpy(), expect, atol=1e-6)
    np.testing.assert_allclose(out[["std_K_VRH", "std_G_VRH"]].to_numpy(), expect_std, atol=1e-6)
    # one calibration per target: the interval widths of K and G differ
    half = out[["upper_K_VRH", "upper_G_VRH"]].to_numpy() - expect
    assert (half > 0).all() and not np.allclose(half[:, 0], half[:, 1])

    cifs = tmp_path / "cifs"
    cifs.mkdir()
    for r in picked[:2]:
        (cifs / f"{ds.ids[r]}.cif").write_text(ds.structures[r].to(fmt="cif"))
    parser = _parser()
    csv = tmp_path / "preds.csv"
    args = parser.parse_args(["predict", str(path), str(cifs), "--out", str(csv)])
    assert args.func(args) == 0
    df = pd.read_csv(csv)
    assert list(df.columns) == ["id"] + [f"{c}_{t}" for t in ELASTIC_TARGETS for c in kinds]
    got = df.set_index("id").loc[[ds.ids[r] for r in picked[:2]], ["prediction_K_VRH", "prediction_G_VRH"]]
    np.testing.assert_allclose(got.to_numpy(), expect[:2], atol=1e-6)
    exported = export_model(str(path), tmp_path / "exported")
    readme = (exported / "README.md").read_text()
    assert "| member | weight K_VRH | weight G_VRH |" in readme and "| cgcnn-early |" in readme


# ----------------------------------------------------------------------------- config section + search hook
def test_ensemble_config_section_validates():
    from matfusion.config import ConfigError, config_from_dict

    base = {"name": "x", "data": {"source": TASK}}
    assert config_from_dict(base).ensemble.model_dump() == {
        "enabled": False,
        "k": 2,
        "meta": "mae",
        "n_folds": 5,
        "max_epochs": None,
        "refit": True,
        "register": True,
        "coverage": 0.9,
        "difficulty": "model",
        "refit_gain": True,
    }
    cfg = config_from_dict(
        dict(base, ensemble={"enabled": True, "k": 1, "meta": "gbm", "max_epochs": 3, "register": False})
    )
    assert cfg.ensemble.enabled and cfg.ensemble.meta == "gbm" and cfg.ensemble.register is False
    with pytest.raises(ConfigError, match=r"ensemble\.bogus: unknown key"):
        config_from_dict(dict(base, ensemble={"enabled": True, "bogus": 1}))
    with pytest.raises(ConfigError, match=r"ensemble\.meta: 'svm' is not allowed"):
        config_from_dict(dict(base, ensemble={"meta": "svm"}))
    with pytest.raises(ConfigError, match=r"ensemble\.n_folds"):
        config_from_dict(dict(base, ensemble={"n_folds": 1}))
    with pytest.raises(ConfigError, match=r"ensemble\.coverage"):
        config_from_dict(dict(base, ensemble={"coverage": 1.0}))
    with pytest.raises(ConfigError, match=r"ensemble\.difficulty"):
        config_from_dict(dict(base, ensemble={"difficulty": "guess"}))
    with pytest.raises(ConfigError, match=r"ensemble\.refit_gain"):
        config_from_dict(dict(base, ensemble={"refit_gain": "sometimes"}))
    assert config_from_dict(dict(base, ensemble={"refit_gain": True})).ensemble.refit_gain is True


def test_search_hook_builds_ensemble_of_that_search(tmp_path, phonons, capsys):
    """cli.ensemble_after_search (what `matfusion search` runs after run_search) on a
    hand-made search parent: the ensemble is nested in *that* parent, not the latest one."""
    from matfusion.cli import ensemble_after_search
    from matfusion.config import EnsembleConfig
    from matfusion.search.tuner import SearchResult

    uri, client, exp = _tracking(tmp_path, "hook")
    pid, cfg = _fake_search(client, exp, phonons[0])
    _fake_search(client, exp, phonons[0])  # a later search of the same experiment: must not be picked
    result = SearchResult(
        name=cfg.name,
        experiment_id=exp,
        parent_run_id=pid,
        tracking_uri=uri,
        leaderboard=pd.DataFrame(),
        best_config=None,
        best_val_mae=25.0,
        best_test_mae=float("nan"),
        wall_s=0.0,
    )
    ensembles = lambda: client.search_runs([exp], filter_string="tags.kind = 'ensemble'")  # noqa: E731
    assert ensemble_after_search(cfg, result, progress=False) == 0 and not ensembles()  # not enabled: nothing
    cfg.ensemble = EnsembleConfig(enabled=True, k=1, n_folds=2, max_epochs=1, register=False)
    result.interrupted = True
    assert ensemble_after_search(cfg, result, progress=False) == 0 and not ensembles()  # interrupted: nothing
    result.interrupted = False
    assert ensemble_after_search(cfg, result, progress=False) == 0
    out = capsys.readouterr().out
    assert "Stacked ensemble (mae, 2 folds)" in out and "plain average" in out and "member rf" in out
    runs = ensembles()
    assert len(runs) == 1 and runs[0].data.tags["mlflow.parentRunId"] == pid
    assert runs[0].data.metrics["ensemble_mae"] > 0 and "registered_version" not in runs[0].data.tags
    m = runs[0].data.metrics
    best = min((k for k in m if k.startswith("member.") and k.endswith("_mae")), key=m.get)
    assert (
        f"test MAE: ensemble {m['ensemble_mae']:.4g}, best member {best[7:-4]} {m[best]:.4g}, "
        f"plain average {m['average_mae']:.4g}"
    ) in out


def test_member_names_of_one_group_are_valid_mlflow_keys(tmp_path):
    """k members of one group (ensemble.k defaults to 2) get names MLflow accepts as metric keys."""
    import re

    from matfusion.ensembles.stacking import unique_names

    configs = [{"family": "rf", "seed": s} for s in range(3)] + [
        {"family": "cgcnn", "cgcnn": {"fusion": "early"}},
        {"family": "cgcnn", "cgcnn": {"fusion": "early"}},
    ]
    names = unique_names(configs)
    assert names == ["rf", "rf_2", "rf_3", "cgcnn-early", "cgcnn-early_2"]
    allowed = re.compile(r"[A-Za-z0-9_\-. :/]+")  # MLflow 3's rule for metric and param names
    assert all(allowed.fullmatch(f"member.{n}_mae") for n in names)
    client = MlflowClient(f"sqlite:///{tmp_path / 'names.db'}")  # and a real store takes them
    run = client.create_run(client.create_experiment("names"))
    for n in names:
        client.log_metric(run.info.run_id, f"member.{n}_mae", 1.0)
    assert {f"member.{n}_mae" for n in names} <= set(client.get_run(run.info.run_id).data.metrics)


def test_a_model_whose_artifact_changed_is_refused_before_unpickling(tmp_path, elastic, caplog):
    """The manifest written at export holds each artifact's SHA-256: a changed ensemble.pkl is
    named and refused (nothing unpickled), in Python and by `matfusion predict` (one line, exit 2);
    the untouched model loads; a model without a manifest (saved before) loads with a warning."""
    from matfusion.ensembles.export import ManifestMismatchError, save_ensemble_model

    ds, split, fs, targets, rows, hidden, ens = elastic
    card = make_card(ens, ds.name, split.fold, {}, data={"source": ELASTIC, "limit": LIMIT})
    path = tmp_path / "model"
    save_ensemble_model(str(path), ens, featurizer_spec(ens, 6.0, 12), card, [ds.structures[i] for i in split.test[:2]])
    manifest = json.loads((path / "artifacts" / "manifest.json").read_text())["sha256"]
    assert set(manifest) == {"ensemble", "featurizer", "card"}
    mlflow.pyfunc.load_model(str(path))  # untouched: loads

    pkl = path / "artifacts" / "ensemble.pkl"
    original = pkl.read_bytes()
    pkl.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))  # one bit of the pickle changed
    with pytest.raises(ManifestMismatchError, match="'ensemble.pkl' changed since export"):
        mlflow.pyfunc.load_model(str(path))
    cif = tmp_path / "one.cif"
    cif.write_text(ds.structures[int(split.test[0])].to(fmt="cif"))
    proc = subprocess.run(
        [sys.executable, "-m", "matfusion.cli", "predict", str(path), str(cif)], capture_output=True, text=True
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "'ensemble.pkl' changed since export" in proc.stderr.strip().splitlines()[-1]

    pkl.write_bytes(original)
    (path / "artifacts" / "manifest.json").unlink()  # as a model saved before manifests existed
    text = (path / "MLmodel").read_text()
    (path / "MLmodel").write_text("\n".join(line for line in text.splitlines() if "manifest" not in line) + "\n")
    with caplog.at_level("WARNING", logger="matfusion.ensembles"):
        mlflow.pyfunc.load_model(str(path))
    assert "no artifact manifest" in caplog.text
