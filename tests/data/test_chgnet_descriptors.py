"""The ``chgnet`` descriptor set: the pretrained CHGNet's 64-dim crystal feature on tiny
structures built here (shape, determinism, atom-order invariance, the feature cache, a structure
it cannot embed, the config and the missing-package message)."""

import logging

import numpy as np
import pytest
from pymatgen.core import Lattice, Structure

from matfusion.config import FeaturesConfig, config_from_dict
from matfusion.data import chgnet_embedding as C
from matfusion.data import descriptors as D
from matfusion.data.dataset import Dataset
from matfusion.data.featurize import featurize

needs_chgnet = pytest.mark.skipif(not C.available(), reason='the chgnet extra: pip install "matfusion[chgnet]"')


@pytest.fixture(scope="module")
def crystals():
    cscl = Structure(Lattice.cubic(4.2), ["Cs", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    rocksalt = Structure.from_spacegroup("Fm-3m", Lattice.cubic(5.64), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    silicon = Structure(Lattice.cubic(5.43), ["Si"] * 2, [[0, 0, 0], [0.25, 0.25, 0.25]])
    return [cscl, rocksalt, silicon]


def _dataset(items, name):
    return Dataset(
        name=name,
        ids=[f"s{i}" for i in range(len(items))],
        structures=list(items),
        targets=np.arange(len(items), dtype=float),
        target_name="y",
        content_hash=f"{name}-{len(items)}",
    )


@needs_chgnet
def test_64_features_per_structure_the_same_on_a_second_call(crystals):
    first = D.compute_sets(crystals, ["chgnet"])["chgnet"]
    assert first.shape == (3, 64) and np.isfinite(first).all()
    assert np.abs(first).max() > 0 and not np.allclose(first[0], first[1])  # different crystals, different vectors
    np.testing.assert_array_equal(D.compute_sets(crystals, ["chgnet"])["chgnet"], first)
    # batched (one batch of 3) or one at a time: the same vectors up to float32 noise
    alone = np.vstack([C.chgnet_vector(s) for s in crystals])
    np.testing.assert_allclose(alone, first, atol=1e-5)
    # three batches of two over two forked workers: the rows of one process, in place
    forked, failures = C.embed(crystals * 2, n_jobs=2, batch_size=2)
    assert not failures
    np.testing.assert_allclose(forked, np.vstack([first, first]), atol=1e-5)
    assert D.columns_of(["chgnet"])[0] == "chgnet:crystal_fea_0" and D.width_of(["chgnet"]) == 64


@needs_chgnet
def test_invariant_to_the_order_of_the_atoms(crystals):
    rocksalt = crystals[1]
    shuffled = Structure.from_sites([rocksalt.sites[i] for i in np.random.default_rng(0).permutation(len(rocksalt))])
    assert [s.species_string for s in shuffled] != [s.species_string for s in rocksalt]
    a, b = C.embed([rocksalt, shuffled])[0]
    np.testing.assert_allclose(a, b, atol=1e-5)


@needs_chgnet
def test_a_structure_it_cannot_embed_is_a_nan_row_named_in_the_log(crystals, caplog):
    """An isolated atom (the graph converter refuses it) and americium (beyond CHGNet's 94
    elements: the model fails on the whole batch, which is rerun one structure at a time): their
    rows are NaN, counted and named; the good rows are the ones computed without them."""
    lone = Structure(Lattice.cubic(20.0), ["Na"], [[0, 0, 0]])
    americium = Structure(Lattice.cubic(3.5), ["Am"], [[0, 0, 0]])
    good = D.compute_sets(crystals, ["chgnet"])["chgnet"]
    with caplog.at_level(logging.WARNING, logger="matfusion.data"):
        out = D.compute_sets([crystals[0], lone, crystals[1], americium, crystals[2]], ["chgnet", "magpie"])
    X = out["chgnet"]
    assert np.isnan(X[[1, 3]]).all()
    np.testing.assert_allclose(X[[0, 2, 4]], good, atol=1e-5)
    assert np.isfinite(out["magpie"][[0, 1, 2, 4]]).all()  # the other sets of those rows are computed
    assert "descriptors chgnet: 2 of 5 item(s) could not be featurized" in caplog.text
    assert "item 1: ValueError" in caplog.text and "isolated atom" in caplog.text and "item 3: " in caplog.text


@needs_chgnet
def test_cached_second_call_reads_the_cache_and_opt_in(tmp_path, crystals, monkeypatch):
    from dataclasses import replace

    calls = []
    real = D.registry()

    def counted(items, **kwargs):
        calls.append(len(items))
        return real["chgnet"].batch(items, **kwargs)

    monkeypatch.setattr(D, "registry", lambda: {**real, "chgnet": replace(real["chgnet"], batch=counted)})
    ds = _dataset(crystals, "chgnet-toy")
    cfg = FeaturesConfig(cache_dir=str(tmp_path), n_jobs=1, descriptors=["magpie", "chgnet"])
    fs = featurize(ds, cfg, progress=False, graphs=False)
    assert calls == [3] and not fs.from_cache
    assert fs.descriptor_sets == ("magpie", "chgnet") and fs.descriptors.shape == (3, 132 + 64)
    assert len(list(tmp_path.glob("desc-chgnet-*.npz"))) == 1
    again = featurize(ds, cfg, progress=False, graphs=False)
    assert calls == [3] and again.from_cache  # not embedded again
    np.testing.assert_array_equal(again.descriptors, fs.descriptors)
    # never part of the default sets
    assert "chgnet" not in D.resolve_sets(None, True) and "chgnet" not in D.DEFAULT_STRUCTURE_SETS


def test_config_takes_the_name_and_a_missing_package_is_one_clear_line(monkeypatch):
    cfg = config_from_dict(
        {"name": "x", "data": {"source": "matbench_phonons"}, "features": {"descriptors": ["magpie", "chgnet"]}}
    )
    assert cfg.features.descriptors == ["magpie", "chgnet"]
    monkeypatch.setattr(C, "available", lambda: False)
    with pytest.raises(C.ChgnetUnavailable, match=r'pip install "matfusion\[chgnet\]"') as err:
        D.resolve_sets(["magpie", "chgnet"], True)
    assert "\n" not in str(err.value)
    assert D.resolve_sets(["magpie"], True) == ["magpie"]  # the other sets do not need it
