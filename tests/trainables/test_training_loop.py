"""The training loop and the trainable on a small real subset of matbench_phonons (CPU torch)."""

from __future__ import annotations

import copy
import os

import numpy as np
import pytest
import torch

from matfusion import families
from matfusion.config import DataConfig, FeaturesConfig
from matfusion.data import load_dataset, split_fold
from matfusion.data.featurize import featurize
from matfusion.trainables.loop import CHECKPOINT_FILE, LocalSession, NonFiniteLossError, write_torch_state
from matfusion.trainables.trial import fit_family, predict_from_checkpoint
from matfusion.trainables.trial_data import pack_rows, pack_trial_data

CGCNN_CONFIG = {
    "family": "cgcnn",
    "cgcnn": {"hidden": 32, "n_conv": 2, "head_hidden": 32, "lr": 5e-3, "batch_size": 32},
    "max_epochs": 6,
    "seed": 0,
    # one torch thread: deterministic, and on a busy 2-core machine two OpenMP threads made each
    # fit ~10x slower (spin-waiting); the loop's behaviour does not depend on it
    "cpus": 1,
}
RF_CONFIG = {"family": "rf", "rf": {"n_estimators": 100}, "seed": 0, "cpus": 2}


class Interrupted(Exception):
    pass


class InterruptedSession(LocalSession):
    """A session whose process 'dies' right after the report of epoch ``stop_after``."""

    def __init__(self, stop_after: int) -> None:
        super().__init__()
        self.stop_after = stop_after

    def report(self, metrics: dict, state: dict) -> None:
        super().report(metrics, state)
        if metrics["epoch"] == self.stop_after:
            raise Interrupted


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    ds = load_dataset(DataConfig(source="matbench_phonons", limit=160))
    split = split_fold(ds, 0)
    feats = featurize(ds, FeaturesConfig(cache_dir=str(tmp_path_factory.mktemp("cache")), n_jobs=2), progress=False)
    data = pack_trial_data(feats.descriptors, feats.graphs, ds.targets, split.train, split.val)
    test_part = pack_rows(feats.descriptors, feats.graphs, ds.targets, split.test, ids=ds.ids)
    return ds, split, data, test_part


@pytest.fixture(scope="module")
def reference(setup):
    """The uninterrupted 6-epoch CGCNN run."""
    session = LocalSession()
    state = fit_family(copy.deepcopy(CGCNN_CONFIG), setup[2], session)
    return session, state


def curve(history, key):
    return np.array([h[key] for h in history])


def test_cgcnn_learns(reference, setup):
    session, state = reference
    h = session.history
    assert [m["epoch"] for m in h] == [1, 2, 3, 4, 5, 6]
    loss, val = curve(h, "train_loss"), curve(h, "val_mae")
    assert np.all(np.isfinite(loss)) and np.all(np.isfinite(val))
    assert loss[-1] < loss[0]
    assert val.min() < val[0]
    np.testing.assert_allclose(curve(h, "best_val_mae"), np.minimum.accumulate(val))
    assert [m["trial_finished"] for m in h] == [False] * 5 + [True]
    assert np.all(np.diff(curve(h, "lr")) < 0)  # cosine decay
    assert state["epoch"] == 6 and state["best_val_mae"] == val.min()
    assert state["best_epoch"] == int(np.argmin(val)) + 1
    y = setup[2]["train"]["y"]
    np.testing.assert_allclose(state["y_mean"], [y.mean()])


def test_same_seed_same_history(reference, setup):
    again = LocalSession()
    fit_family(copy.deepcopy(CGCNN_CONFIG), setup[2], again)
    assert again.history == reference[0].history
    other = LocalSession()
    fit_family(dict(copy.deepcopy(CGCNN_CONFIG), seed=1), setup[2], other)
    assert curve(other.history, "val_mae").tolist() != curve(again.history, "val_mae").tolist()


def test_random_forest_family(setup):
    data = setup[2]
    session = LocalSession()
    state = fit_family(dict(RF_CONFIG), data, session)
    assert len(session.history) == 1
    (m,) = session.history
    assert m["trial_finished"] and m["epoch"] == 1 and np.isfinite(m["val_mae"])
    baseline = np.mean(np.abs(data["val"]["y"] - data["train"]["y"].mean()))
    assert m["val_mae"] < baseline  # Magpie features carry real signal for phonon peaks
    np.testing.assert_allclose(
        np.mean(np.abs(state["rf"][0].predict(data["val"]["descriptors"]) - data["val"]["y"])), m["val_mae"]
    )


def test_absurd_learning_rate_raises(setup):
    # (a NaN target is a missing label now, masked out of the loss, so it cannot be the trigger)
    session = LocalSession()
    config = copy.deepcopy(CGCNN_CONFIG)
    config["cgcnn"]["lr"] = 1e8
    with pytest.raises(
        NonFiniteLossError, match=r"training loss became nan at epoch 1 \(lr=100000000\.0\).*lower the learning rate"
    ):
        fit_family(config, setup[2], session)
    assert session.history == []  # nothing was reported for the failed epoch


def _assert_same_epochs(resumed, reference, epochs):
    assert [m["epoch"] for m in resumed] == epochs
    ref = {m["epoch"]: m for m in reference}
    for m in resumed:
        for key in ("train_loss", "val_mae", "best_val_mae", "lr"):
            assert m[key] == pytest.approx(ref[m["epoch"]][key], rel=1e-6, abs=1e-6), (m["epoch"], key)
        assert m["trial_finished"] == ref[m["epoch"]]["trial_finished"]


def test_resume_matches_uninterrupted_run(reference, setup, tmp_path):
    """Stop a 6-epoch run after epoch 3 and resume it from its checkpoint state: epochs 4..6 are
    those of the uninterrupted run (model, optimizer, scheduler, shuffling and RNG all restored)."""
    data = setup[2]
    first = InterruptedSession(stop_after=3)
    with pytest.raises(Interrupted):
        fit_family(copy.deepcopy(CGCNN_CONFIG), data, first)
    assert [m["epoch"] for m in first.history] == [1, 2, 3]
    _assert_same_epochs(first.history, reference[0].history, [1, 2, 3])
    state = first.last_state
    assert state["epoch"] == 3

    resumed = LocalSession(resume_state=state)
    final = fit_family(copy.deepcopy(CGCNN_CONFIG), data, resumed)
    _assert_same_epochs(resumed.history, reference[0].history, [4, 5, 6])
    assert final["best_val_mae"] == pytest.approx(reference[1]["best_val_mae"], rel=1e-6)

    # resuming a second time from the same in-memory state gives the same run again
    # (the first resume must not have mutated it)
    twice = LocalSession(resume_state=state)
    fit_family(copy.deepcopy(CGCNN_CONFIG), data, twice)
    _assert_same_epochs(twice.history, reference[0].history, [4, 5, 6])

    # and so does a state that went through the checkpoint file, as under Ray Tune
    write_torch_state(state, str(tmp_path))
    loaded = torch.load(tmp_path / CHECKPOINT_FILE, map_location="cpu", weights_only=False)
    from_disk = LocalSession(resume_state=loaded)
    fit_family(copy.deepcopy(CGCNN_CONFIG), data, from_disk)
    _assert_same_epochs(from_disk.history, reference[0].history, [4, 5, 6])


def test_predict_from_checkpoint_cgcnn(reference, setup, tmp_path):
    _, split, data, test_part = setup
    session, state = reference
    write_torch_state(state, str(tmp_path))
    assert os.listdir(tmp_path) == [CHECKPOINT_FILE]
    pred = predict_from_checkpoint(copy.deepcopy(CGCNN_CONFIG), str(tmp_path), test_part, data["graph_params"])
    assert pred.shape == (len(split.test),) and np.all(np.isfinite(pred))
    # the checkpoint holds the best weights: on the validation part they give the best val MAE
    val_pred = predict_from_checkpoint(copy.deepcopy(CGCNN_CONFIG), str(tmp_path), data["val"], data["graph_params"])
    assert val_pred.shape == (len(split.val),)
    np.testing.assert_allclose(np.mean(np.abs(val_pred - data["val"]["y"])), state["best_val_mae"], rtol=1e-5)
    assert np.std(pred) > 0  # not a constant


def test_predict_from_checkpoint_rf(setup, tmp_path):
    _, split, data, test_part = setup
    state = fit_family(dict(RF_CONFIG), data, LocalSession())
    families.get("rf").write_checkpoint(state, str(tmp_path))
    pred = predict_from_checkpoint(dict(RF_CONFIG), str(tmp_path), test_part, data["graph_params"])
    assert pred.shape == (len(split.test),)
    # (equal up to rounding: the forest sums its trees in threads)
    np.testing.assert_allclose(pred, state["rf"][0].predict(test_part["descriptors"]), rtol=1e-12)


class RecordingSession(LocalSession):
    """Records which epochs came with a checkpoint state."""

    def __init__(self) -> None:
        super().__init__()
        self.checkpointed: list[int] = []

    def report(self, metrics: dict, state) -> None:
        super().report(metrics, state)
        if state is not None:
            self.checkpointed.append(metrics["epoch"])


def test_checkpoint_every_n_epochs_and_always_the_last(reference, setup):
    session = RecordingSession()
    state = fit_family({**copy.deepcopy(CGCNN_CONFIG), "checkpoint_every": 4}, setup[2], session)
    assert [h["epoch"] for h in session.history] == [1, 2, 3, 4, 5, 6]
    assert session.checkpointed == [4, 6]
    # fewer checkpoints change nothing about training: same history and best model as every-epoch
    ref_session, ref_state = reference
    np.testing.assert_allclose(curve(session.history, "val_mae"), curve(ref_session.history, "val_mae"), rtol=1e-6)
    assert state["best_epoch"] == ref_state["best_epoch"]


def test_learning_rate_restarts_at_given_epochs(reference, setup):
    """``lr_restarts`` cuts the cosine schedule into cycles that each anneal (ASHA's rungs use
    it); each epoch reports the learning rate it trained with; a run resumed right after a
    cycle's end continues exactly as the uninterrupted one."""
    from matfusion.trainables.loop import lr_cycles, lr_factor

    data = setup[2]
    config = dict(copy.deepcopy(CGCNN_CONFIG), lr_restarts=[2])
    session = LocalSession()
    fit_family(copy.deepcopy(config), data, session)
    lrs = curve(session.history, "lr")
    cycles = lr_cycles(6, [2])
    assert cycles == [(0, 2), (2, 6)]
    np.testing.assert_allclose(lrs, [5e-3 * lr_factor(t, cycles) for t in range(6)], rtol=1e-9)
    assert lrs[1] < 0.3 * lrs[0] and lrs[2] > 0.9 * lrs[0]  # annealed at the end of cycle 1, restarted at epoch 3
    assert np.all(np.diff(lrs[2:]) < 0)
    # without restarts: one cosine cycle, which reaches the floor at the last epoch
    ref_lrs = curve(reference[0].history, "lr")
    np.testing.assert_allclose(ref_lrs, [5e-3 * lr_factor(t, lr_cycles(6)) for t in range(6)], rtol=1e-9)
    assert np.all(np.diff(ref_lrs) < 0) and ref_lrs[-1] < 0.05 * ref_lrs[0]

    first = InterruptedSession(stop_after=2)
    with pytest.raises(Interrupted):
        fit_family(copy.deepcopy(config), data, first)
    resumed = LocalSession(resume_state=first.last_state)
    fit_family(copy.deepcopy(config), data, resumed)
    _assert_same_epochs(resumed.history, session.history, [3, 4, 5, 6])


def test_batch_norm_refresh_matches_the_current_weights(setup):
    """refresh_batch_norm sets every BatchNorm's running statistics to those of the current
    weights on the given graphs (what a fresh pass in training mode sees), restores the
    momentum and the mode, and leaves models without BatchNorm alone."""
    from torch import nn

    from matfusion.trainables.loop import refresh_batch_norm
    from matfusion.trainables.trial import _feature_widths, _graphs_with_descriptors, build_torch_model

    data = setup[2]
    graphs = _graphs_with_descriptors(data["train"], data["graph_params"], None)[:64]
    node_f, edge_f, _ = _feature_widths(graphs[0])
    torch.manual_seed(0)
    model = build_torch_model(CGCNN_CONFIG, node_f, edge_f, 1)
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm1d)]
    assert norms and all(float(m.running_var.mean()) == 1.0 for m in norms)  # PyTorch's initial state
    # what the first BatchNorm sees: its input on all 64 graphs at once, in one pass
    seen = []
    hook = norms[0].register_forward_hook(lambda mod, inp, out: seen.append(inp[0].detach()))
    model.train()
    with torch.no_grad():
        from torch_geometric.data import Batch

        model(Batch.from_data_list(graphs))
    hook.remove()
    x = seen[0]
    for m in norms:
        m.reset_running_stats()
    model.eval()
    assert refresh_batch_norm(model, graphs, batch_size=64) is True
    assert not model.training and all(m.momentum == 0.1 for m in norms)
    torch.testing.assert_close(norms[0].running_mean, x.mean(dim=0), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(norms[0].running_var, x.var(dim=0, unbiased=True), rtol=1e-3, atol=1e-5)
    assert refresh_batch_norm(nn.Sequential(nn.Linear(2, 2)), graphs, 64) is False
