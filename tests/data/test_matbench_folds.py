"""Matbench tasks from the data dir and their official folds (real data); the inner train/val
split and the seeded row limit (on a small dataset of structures made here)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from pymatgen.core import Composition, Lattice, Structure

from matfusion.config import DataConfig
from matfusion.data import DataError, Dataset, default_data_dir, limit_rows, load_dataset, outer_folds, split_fold

TASK = "matbench_phonons"


@pytest.fixture(scope="module")
def phonons():
    return load_dataset(DataConfig(source=TASK))


@pytest.fixture(scope="module")
def validation_splits():
    """matbench's official folds, read straight from the package's file (no matfusion code)."""
    spec = importlib.util.find_spec("matbench")
    path = Path(list(spec.submodule_search_locations)[0]) / "matbench_v0.1_validation.json"
    return json.loads(path.read_text())["splits"]


@pytest.fixture(scope="module")
def toy():
    """60 rows of rock salt at 60 lattice constants, with 5 "official" folds of 12 rows
    (rows i with i % 5 == k, as a matbench task holds them: positions into the rows)."""
    n = 60
    structures = [
        Structure(Lattice.cubic(5.0 + 0.01 * i), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]]) for i in range(n)
    ]
    return Dataset(
        name="toy",
        ids=[f"toy-{i:02d}" for i in range(n)],
        structures=structures,
        targets=np.linspace(1.0, 2.0, n),
        target_name="y",
        content_hash="toy-60",
        official_folds=[np.arange(k, n, 5) for k in range(5)],
    )


def fold_of(ds) -> dict:
    return {ds.ids[p]: k for k, fold in enumerate(ds.official_folds) for p in fold}


def test_phonons_rows_and_ids(phonons):
    assert len(phonons) == 1265
    assert phonons.ids[:3] == ["mb-phonons-0001", "mb-phonons-0002", "mb-phonons-0003"]
    assert phonons.ids[-1] == "mb-phonons-1265"
    assert len(set(phonons.ids)) == 1265
    assert phonons.target_name == "last phdos peak"
    assert phonons.has_structures and all(isinstance(s, Structure) for s in phonons.structures)
    assert np.all(np.isfinite(phonons.targets)) and phonons.targets.min() > 0
    assert not phonons.skipped


def test_official_folds(phonons, validation_splits):
    folds = outer_folds(phonons)
    assert len(folds) == 5
    assert len(folds[0]) == 253
    all_rows = np.concatenate(folds)
    assert len(all_rows) == len(set(all_rows.tolist())) == 1265  # disjoint and covering
    assert set(all_rows.tolist()) == set(range(1265))
    official = validation_splits[TASK]
    for k, fold in enumerate(folds):
        ours = {phonons.ids[p] for p in fold}
        assert ours == set(official[f"fold_{k}"]["test"])
        assert set(phonons.ids) - ours == set(official[f"fold_{k}"]["train"])


def test_split_fold(toy):
    n, n_test = 60, 12
    sp = split_fold(toy, 0, val_fraction=0.1, seed=0)
    train, val, test = (set(x.tolist()) for x in (sp.train, sp.val, sp.test))
    assert not (train & val or train & test or val & test)
    assert train | val | test == set(range(n))
    assert test == set(toy.official_folds[0].tolist())
    assert len(val) == round(0.1 * (n - n_test)) == 5

    again = split_fold(toy, 0, val_fraction=0.1, seed=0)
    np.testing.assert_array_equal(again.train, sp.train)
    np.testing.assert_array_equal(again.val, sp.val)
    other = split_fold(toy, 0, val_fraction=0.1, seed=1)
    np.testing.assert_array_equal(other.test, sp.test)  # the official test part never moves
    assert set(other.val.tolist()) != val
    assert set(other.train.tolist()) | set(other.val.tolist()) == train | val
    # each fold has its own inner split, and its own test part
    one = split_fold(toy, 1, seed=0)
    assert not set(one.test.tolist()) & test
    assert set(one.val.tolist()) != val


def test_split_fold_of_the_real_phonons_task(phonons):
    sp = split_fold(phonons, 0, val_fraction=0.1, seed=0)
    assert len(sp.test) == 253 and len(sp.val) == round(0.1 * (1265 - 253))
    assert len(sp.train) + len(sp.val) + len(sp.test) == 1265


@pytest.mark.parametrize("fold", [-1, 5, 17])
def test_bad_fold_number(toy, fold):
    with pytest.raises(DataError, match=rf"toy: fold {fold} does not exist \(folds 0..4\)"):
        split_fold(toy, fold)


def test_limit_rows_keeps_fold_membership(toy):
    full_fold = fold_of(toy)
    for seed in (0, 3):
        sub = limit_rows(toy, 20, seed=seed)
        assert len(sub) == 20 and len(set(sub.ids)) == 20
        assert sum(len(f) for f in sub.official_folds) == 20
        for k, fold in enumerate(sub.official_folds):
            for p in fold:
                assert full_fold[sub.ids[p]] == k
        # rows keep their structure and target
        pos = {rid: i for i, rid in enumerate(toy.ids)}
        for i in (0, 7, 19):
            j = pos[sub.ids[i]]
            assert sub.targets[i] == toy.targets[j] and sub.structures[i] is toy.structures[j]
        sp = split_fold(sub, 2, seed=seed)
        assert {sub.ids[p] for p in sp.test} == {rid for rid in sub.ids if full_fold[rid] == 2}
    assert limit_rows(toy, 20, seed=0).ids != limit_rows(toy, 20, seed=3).ids
    assert limit_rows(toy, None) is toy and limit_rows(toy, 60) is toy


def test_load_dataset_applies_the_seeded_limit(phonons):
    assert load_dataset(DataConfig(source=TASK, limit=200)).ids == limit_rows(phonons, 200, seed=0).ids


def test_composition_task_expt_gap(validation_splits):
    ds = load_dataset(DataConfig(source="matbench_expt_gap"))
    assert len(ds) == 4604
    assert ds.ids[0] == "mb-expt-gap-0001"
    assert all(isinstance(c, Composition) for c in ds.structures)
    assert not ds.has_structures
    assert ds.target_name == "gap expt" and np.all(ds.targets >= 0)
    assert len(ds.official_folds) == 5
    assert {ds.ids[p] for p in ds.official_folds[3]} == set(validation_splits["matbench_expt_gap"]["fold_3"]["test"])


def test_steels_ids_have_three_digits_like_matbench(validation_splits):
    # 312 rows: matbench pads the row number to 3 digits (mb-steels-001), not 4
    ds = load_dataset(DataConfig(source="matbench_steels"))
    assert len(ds) == 312 and ds.ids[0] == "mb-steels-001" and ds.ids[-1] == "mb-steels-312"
    for k in range(5):
        official = set(validation_splits["matbench_steels"][f"fold_{k}"]["test"])
        assert {ds.ids[p] for p in ds.official_folds[k]} == official


def test_unknown_task_names_it():
    with pytest.raises(DataError, match="matbench_no_such_task"):
        load_dataset(DataConfig(source="matbench_no_such_task"))


def test_not_a_source():
    with pytest.raises(DataError, match="not_a_task_or_file"):
        load_dataset(DataConfig(source="not_a_task_or_file"))


def test_missing_data_dir(tmp_path):
    missing = tmp_path / "does" / "not" / "exist"
    with pytest.raises(DataError) as err:
        load_dataset(DataConfig(source=TASK, data_dir=str(missing)))
    assert str(missing) in str(err.value) and TASK in str(err.value)


def test_against_matbench_package(monkeypatch, phonons):
    """matbench's own loader and folds (via matminer, offline) agree with ours on fold 0."""
    monkeypatch.setenv("MATMINER_DATA", str(default_data_dir() / "matbench"))
    from matbench.bench import MatbenchBenchmark

    mb = MatbenchBenchmark(autoload=False, subset=[TASK])
    (task,) = list(mb.tasks)
    task.load()
    x_test, y_test = task.get_test_data(0, include_target=True)
    sp = split_fold(phonons, 0)
    ours = {phonons.ids[p]: phonons.targets[p] for p in sp.test}
    assert set(x_test.index) == set(ours)
    theirs = y_test.to_dict()
    np.testing.assert_allclose([ours[i] for i in theirs], list(theirs.values()), rtol=0, atol=1e-9)
    # and the structures are the same crystals
    pos = {rid: i for i, rid in enumerate(phonons.ids)}
    for rid in list(x_test.index)[:5]:
        assert x_test[rid] == phonons.structures[pos[rid]]
    x_train, _ = task.get_train_and_val_data(0)
    assert set(x_train.index) == {phonons.ids[p] for p in np.concatenate([sp.train, sp.val])}


def test_task_name_beats_a_same_named_folder(tmp_path, monkeypatch):
    # `matfusion benchmark matbench_steels --out matbench_steels` run twice: the second run must
    # load the task, not read the output folder as a CIF folder
    (tmp_path / "matbench_steels").mkdir()
    monkeypatch.chdir(tmp_path)
    ds = load_dataset(DataConfig(source="matbench_steels"))
    assert len(ds) == 312 and ds.official_folds is not None
    with pytest.raises(DataError, match="id_prop.csv"):
        load_dataset(DataConfig(source="./matbench_steels"))
