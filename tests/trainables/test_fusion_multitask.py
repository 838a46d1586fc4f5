"""Fusion (early, attention, late) and multi-task heads: shapes, training, and the
properties the design promises (attention weights sum to one, masked missing labels,
learned uncertainty weights move, late alpha chosen on validation rows only)."""

import numpy as np
import pytest
import torch
from torch_geometric.loader import DataLoader

from matfusion.config import DataConfig, FeaturesConfig
from matfusion.data import load_dataset, split_fold
from matfusion.data.featurize import featurize
from matfusion.trainables.edge_basis import bond_width
from matfusion.trainables.loop import LocalSession, validation_score
from matfusion.trainables.multitask import MultiTaskLoss
from matfusion.trainables.trial import (
    _graphs_with_descriptors,
    build_torch_model,
    choose_late_alpha,
    fit_family,
    fit_scaler,
    predict_from_state,
)
from matfusion.trainables.trial_data import pack_rows, pack_trial_data


@pytest.fixture(scope="module")
def phonons_small():
    ds = load_dataset(DataConfig(source="matbench_phonons", limit=160), seed=0)
    split = split_fold(ds, 0, 0.2, seed=0)
    fs = featurize(ds, FeaturesConfig(), progress=False)
    data = pack_trial_data(fs.descriptors, fs.graphs, ds.targets, split.train, split.val)
    test = pack_rows(fs.descriptors, fs.graphs, ds.targets, split.test)
    return ds, split, data, test


def _cfg(fusion, **extra):
    return {
        "family": "cgcnn",
        "cgcnn": {
            "hidden": 32,
            "n_conv": 2,
            "head_hidden": 32,
            "lr": 3e-3,
            "batch_size": 32,
            "fusion": fusion,
            "comp_hidden": 32,
        },
        "max_epochs": 5,
        "seed": 0,
        "cpus": 1,
        **extra,
    }


@pytest.mark.parametrize("fusion", ["early", "attention"])
def test_fused_forward_shapes(phonons_small, fusion):
    _, _, data, _ = phonons_small
    scaler = fit_scaler(data["train"]["descriptors"])
    items = _graphs_with_descriptors(data["train"], data["graph_params"], scaler)[:5]
    for n_targets in (1, 3):
        model = build_torch_model(
            _cfg(fusion),
            items[0].x.shape[1],
            bond_width(items[0]),
            n_targets,
            descriptor_features=data["train"]["descriptors"].shape[1],
        )  # the descriptor matrix
        batch = next(iter(DataLoader(items, batch_size=5)))
        out = model(batch)
        assert out.shape == (5, n_targets) and torch.isfinite(out).all()


def test_attention_weights_sum_to_one_and_are_per_sample(phonons_small):
    _, _, data, _ = phonons_small
    scaler = fit_scaler(data["train"]["descriptors"])
    items = _graphs_with_descriptors(data["train"], data["graph_params"], scaler)[:8]
    model = build_torch_model(
        _cfg("attention"),
        items[0].x.shape[1],
        bond_width(items[0]),
        1,
        descriptor_features=data["train"]["descriptors"].shape[1],
    )
    batch = next(iter(DataLoader(items, batch_size=8)))
    pred, weights = model.forward_with_attention(batch)
    assert weights.shape == (8, 2)
    assert torch.allclose(weights.sum(dim=1), torch.ones(8), atol=1e-6)
    assert (weights > 0).all()
    assert weights[:, 0].std() > 0  # per sample, not one global weight


@pytest.mark.parametrize("fusion", ["none", "early", "attention", "late"])
def test_each_fusion_trains_and_predicts(phonons_small, fusion):
    _, _, data, test = phonons_small
    session = LocalSession()
    state = fit_family(_cfg(fusion), data, session)
    hist = session.history
    assert len(hist) == 5
    assert hist[-1]["train_loss"] < hist[0]["train_loss"]
    assert min(h["val_mae"] for h in hist) < hist[0]["val_mae"] or fusion == "late"
    pred = predict_from_state(_cfg(fusion), state, test, data["graph_params"])
    assert pred.shape == (len(test["y"]),) and np.isfinite(pred).all()
    if fusion == "attention":
        assert all(0.0 < h["attention_graph"] < 1.0 for h in hist)


def test_late_alpha_is_chosen_on_validation_rows_only(phonons_small):
    _, split, data, test = phonons_small
    state = fit_family(_cfg("late"), data, LocalSession())
    hook = state["best_hook_state"]
    assert 0.0 <= hook["alpha"] <= 1.0
    np.testing.assert_array_equal(np.sort(hook["alpha_rows"]), np.sort(split.val))
    assert not set(hook["alpha_rows"].tolist()) & set(split.train.tolist())
    assert not set(hook["alpha_rows"].tolist()) & set(split.test.tolist())
    # the reported best validation score equals the blend at that alpha on the val rows
    pred_val = predict_from_state(_cfg("late"), state, data["val"], data["graph_params"])
    score, _ = validation_score(pred_val, data["val"]["y"], np.array([data["train"]["y"].std()]))
    assert score == pytest.approx(state["best_val_mae"], rel=1e-4)


def test_choose_late_alpha_picks_the_better_member():
    rng = np.random.default_rng(0)
    y = rng.normal(size=(50, 1))
    good = y + rng.normal(scale=0.01, size=y.shape)
    bad = y + rng.normal(scale=1.0, size=y.shape)
    assert choose_late_alpha(good, bad, y, np.ones(1))[0] >= 0.9
    assert choose_late_alpha(bad, good, y, np.ones(1))[0] <= 0.1


def test_multitask_loss_masks_missing_labels():
    pred = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    target = torch.tensor([[1.0, float("nan")], [2.0, 5.0]])
    loss = MultiTaskLoss(2, weights=[1.0, 2.0])
    per_task = loss.task_losses(pred, target)
    assert per_task.tolist() == pytest.approx([0.5, 1.0])  # task 1 only sees row 1
    assert loss(pred, target).item() == pytest.approx(0.5 + 2.0 * 1.0)
    all_missing = torch.tensor([[1.0, float("nan")], [2.0, float("nan")]])
    assert torch.isfinite(loss(pred, all_missing))


def _elastic(limit=140):
    ds = load_dataset(DataConfig(source="matminer/elastic_tensor.csv.gz", target=["K_VRH", "G_VRH"], limit=limit))
    # hide some G_VRH labels: missing labels must be masked, not dropped or fatal
    y = ds.targets.copy()
    y[::4, 1] = np.nan
    split = split_fold(ds, 0, 0.2, seed=0)
    fs = featurize(ds, FeaturesConfig(), progress=False)
    return ds, split, pack_trial_data(fs.descriptors, fs.graphs, y, split.train, split.val)


def test_multitask_with_missing_labels_and_uncertainty_weights_change():
    ds, split, data = _elastic()
    assert ds.targets.shape == (140, 2)
    cfg = {
        "family": "cgcnn",
        "cgcnn": {"hidden": 32, "n_conv": 2, "lr": 5e-3, "batch_size": 32, "fusion": "early"},
        "multitask": {"weighting": "uncertainty"},
        "targets": ["K_VRH", "G_VRH"],
        "max_epochs": 5,
        "seed": 0,
        "cpus": 1,
    }
    session = LocalSession()
    state = fit_family(cfg, data, session)
    hist = session.history
    assert all(np.isfinite(h["train_loss"]) and np.isfinite(h["val_mae"]) for h in hist)
    assert {"val_mae_K_VRH", "val_mae_G_VRH", "task_weight_K_VRH", "task_weight_G_VRH"} <= set(hist[0])
    w0 = (hist[0]["task_weight_K_VRH"], hist[0]["task_weight_G_VRH"])
    w1 = (hist[-1]["task_weight_K_VRH"], hist[-1]["task_weight_G_VRH"])
    assert w0 != pytest.approx(w1, abs=1e-4)  # learned weights moved
    assert state["criterion"]["log_var"].abs().sum() > 0


def test_multitask_fixed_weights_come_from_config():
    _, _, data = _elastic()
    cfg = {
        "family": "cgcnn",
        "cgcnn": {"hidden": 32, "n_conv": 2, "lr": 3e-3, "fusion": "none"},
        "multitask": {"weighting": "fixed", "w_K_VRH": 1.0, "w_G_VRH": 0.25},
        "targets": ["K_VRH", "G_VRH"],
        "max_epochs": 2,
        "seed": 0,
        "cpus": 1,
    }
    session = LocalSession()
    fit_family(cfg, data, session)
    assert session.history[-1]["task_weight_G_VRH"] == pytest.approx(0.25)
    assert session.history[-1]["task_weight_K_VRH"] == pytest.approx(1.0)


def test_rf_multitarget_handles_missing_labels():
    _, _, data = _elastic()
    session = LocalSession()
    fit_family({"family": "rf", "rf": {"n_estimators": 50}, "targets": ["K_VRH", "G_VRH"], "seed": 0}, data, session)
    h = session.history[0]
    assert np.isfinite(h["val_mae"]) and np.isfinite(h["val_mae_G_VRH"])
