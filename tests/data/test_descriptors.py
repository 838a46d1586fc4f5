"""Descriptor sets: each featurizer on a known structure (CsCl), NaN handling that keeps every
row, set resolution and its errors, the cached descriptor matrix of ``featurize``."""

import logging
import math

import numpy as np
import pytest
from pymatgen.core import Composition, Lattice, Structure

from matfusion.config import ConfigError, DataConfig, FeaturesConfig, config_from_dict
from matfusion.data import descriptors as D
from matfusion.data.dataset import Dataset
from matfusion.data.descriptors import magpie_features
from matfusion.data.featurize import featurize

A = 4.2  # CsCl: Cs at the corner, Cl at the body centre


@pytest.fixture(scope="module")
def cscl():
    return Structure(Lattice.cubic(A), ["Cs", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])


def test_density_of_cscl(cscl):
    density, vpa, packing = D.density_features(cscl)
    mass = (132.905 + 35.453) / 6.02214e23  # g per formula unit
    assert density == pytest.approx(mass / (A**3 * 1e-24), rel=1e-3)
    assert vpa == pytest.approx(A**3 / 2)
    assert 0 < packing < 2


def test_symmetry_of_cscl(cscl):
    sg, system, centro, order = D.symmetry_features(cscl)
    assert (sg, system, centro, order) == (221, 1, 1, 48)  # Pm-3m, cubic, centrosymmetric, m-3m
    # the same crystal in a 2x1x1 supercell, or rock salt in its conventional and primitive cells:
    # the same values (the number of operations of the cell would differ)
    np.testing.assert_array_equal(D.symmetry_features(cscl * (2, 1, 1)), D.symmetry_features(cscl))
    rocksalt = Structure.from_spacegroup("Fm-3m", Lattice.cubic(5.64), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    primitive = rocksalt.get_primitive_structure()
    assert len(rocksalt) == 8 and len(primitive) == 2
    np.testing.assert_array_equal(D.symmetry_features(rocksalt), D.symmetry_features(primitive))
    assert list(D.symmetry_features(primitive)) == [225, 1, 1, 48]


def test_bonds_of_cscl(cscl):
    v = dict(zip(D.BOND_COLUMNS, D.bond_features(cscl)))
    nn = A * math.sqrt(3) / 2
    for stat in ("min", "mean", "max"):
        assert v[f"nn_dist_{stat}"] == pytest.approx(nn, rel=1e-6)
        assert v[f"cn_{stat}"] == 8  # 8 Cl around Cs (the 6 Cs at 4.2 A are 15 % further: second shell)
    assert v["nn_dist_std"] == pytest.approx(0.0, abs=1e-9) and v["cn_std"] == 0
    assert v["bond_mean"] == pytest.approx(nn) and v["bond_spread_mean"] == pytest.approx(0.0, abs=1e-9)
    assert v["nn_rel_cov_mean"] == pytest.approx(nn / (2.44 + 1.02), rel=0.05)  # Magpie covalent radii
    # a CIF round trip (coordinates rounded) gives the same descriptors
    from matfusion.ensembles.export import parse_structure

    again = parse_structure(cscl.to(fmt="cif"))
    for fz in (D.bond_features, D.density_features, D.symmetry_features):
        np.testing.assert_array_equal(fz(again), fz(cscl))
    assert v["n_sites_log"] == pytest.approx(math.log(2))
    # a wider shell tolerance counts the 6 next-nearest too
    wide = dict(zip(D.BOND_COLUMNS, D.bond_features(cscl, tolerance=0.2)))
    assert wide["cn_mean"] == 14


def test_stoichiometry_and_magpie_of_cscl(cscl):
    s = D.stoichiometry_features(cscl)
    assert s.shape == (6,) and s[0] == 2 and s[1] == pytest.approx(math.sqrt(0.5))
    assert magpie_features([cscl]).shape == (1, 132)


def test_magpie_is_one_entry_of_the_registry_with_its_old_cache_key(cscl):
    """Magpie is computed by the registry's machinery like every set, and keeps the cache key
    (kind, parameters, array name) it had before it joined the registry: caches on disk stay valid."""
    from matfusion.data.cache import cache_key

    reg = D.registry()
    assert list(reg) == list(D.DESCRIPTOR_SETS)
    magpie = reg["magpie"]
    assert magpie.width == D.MAGPIE_WIDTH == 132 and magpie.columns == tuple(D.magpie_columns())
    assert not magpie.structural and not magpie.prefixed
    assert magpie.cache_key("h") == cache_key("magpie", "h", {"preset": "magpie", "width": 132})
    assert magpie.cache_array == "magpie"
    assert reg["bonds"].cache_key("h") == cache_key(
        "desc-bonds", "h", {"set": "bonds", "version": 2, "width": len(D.BOND_COLUMNS)}
    )
    assert reg["stoichiometry"].cache_key("h") == cache_key(
        "desc-stoichiometry", "h", {"set": "stoichiometry", "version": 1, "width": 6}
    )
    np.testing.assert_array_equal(D.compute_sets([cscl], ["magpie"])["magpie"][0], D.magpie_vector(cscl))
    np.testing.assert_array_equal(D.magpie_vector(cscl), D.magpie_vector(cscl.composition))


def test_a_set_failing_on_one_item_leaves_only_that_set_nan(cscl, caplog):
    """One pass computes every set per item: a string (no composition) makes magpie and
    stoichiometry fail on that item only, and the log names the first failure."""
    with caplog.at_level(logging.WARNING, logger="matfusion.data"):
        out = D.compute_sets([cscl, "not a crystal"], ["magpie", "stoichiometry"], n_jobs=1)
    assert np.isfinite(out["magpie"][0]).all() and np.isnan(out["magpie"][1]).all()
    assert np.isfinite(out["stoichiometry"][0]).all() and np.isnan(out["stoichiometry"][1]).all()
    assert "2 featurizer call(s) failed" in caplog.text and "first: item 1, magpie" in caplog.text


def test_isolated_atom_gives_nan_not_an_error():
    lone = Structure(Lattice.cubic(20.0), ["Na"], [[0, 0, 0]])  # no neighbour within 6 A
    v = dict(zip(D.BOND_COLUMNS, D.bond_features(lone)))
    assert math.isnan(v["nn_dist_mean"]) and math.isnan(v["cn_mean"]) and math.isnan(v["bond_mean"])
    assert v["n_within_radius_mean"] == 0 and v["n_sites_log"] == 0


def test_compute_sets_keeps_rows_a_featurizer_fails_on(cscl, caplog):
    bad = Composition("NaCl")  # no lattice: every structural featurizer raises on it
    with caplog.at_level(logging.WARNING, logger="matfusion.data"):
        out = D.compute_sets([cscl, bad, cscl], ["density", "symmetry", "bonds"])
    for name, width in (("density", 3), ("symmetry", 4), ("bonds", len(D.BOND_COLUMNS))):
        assert out[name].shape == (3, width)
        assert np.isfinite(out[name][[0, 2]]).all() and np.isnan(out[name][1]).all()
    assert "3 featurizer call(s) failed" in caplog.text
    X = D.descriptor_matrix([cscl, bad], ["magpie", "density"])
    assert X.shape == (2, 135) and np.isfinite(X[0]).all() and np.isnan(X[1, 132:]).all()


def test_median_imputer_counts_and_uses_training_medians():
    X = np.array([[1.0, np.nan], [3.0, np.nan], [np.nan, np.nan]])
    imp = D.MedianImputer().fit(X)
    out = imp.transform(np.array([[np.nan, np.inf], [5.0, 1.0]]))
    np.testing.assert_array_equal(out, [[2.0, 0.0], [5.0, 1.0]])
    assert imp.n_imputed_ == 2


def test_resolve_sets_defaults_order_and_errors():
    assert D.resolve_sets(None, True) == ["magpie", "density", "symmetry", "bonds"]
    assert D.resolve_sets(None, False) == ["magpie"]
    assert D.resolve_sets(["bonds", "magpie", "bonds"], True) == ["magpie", "bonds"]  # registry order, no dupes
    with pytest.raises(D.DescriptorError, match=r"\['density'\] need crystal structures"):
        D.resolve_sets(["magpie", "density"], False)
    with pytest.raises(D.DescriptorError, match="unknown set"):
        D.resolve_sets(["soap"], True)
    assert D.columns_of(["magpie", "density"])[-1] == "density:packing_fraction"
    assert D.infer_sets(132) == ["magpie"] and D.infer_sets(D.width_of(D.DEFAULT_STRUCTURE_SETS)) == list(
        D.DEFAULT_STRUCTURE_SETS
    )


def test_config_names_a_bad_descriptor_set():
    with pytest.raises(ConfigError, match="features.descriptors.1: 'soap' is not allowed"):
        config_from_dict(
            {"name": "x", "data": {"source": "matbench_phonons"}, "features": {"descriptors": ["magpie", "soap"]}}
        )


def _dataset(items, name="toy"):
    return Dataset(
        name=name,
        ids=[str(i) for i in range(len(items))],
        structures=list(items),
        targets=np.arange(len(items), dtype=float),
        target_name="y",
        content_hash=f"{name}-{len(items)}",
    )


def test_featurize_builds_and_caches_the_descriptor_matrix(tmp_path, cscl):
    nacl = Structure(Lattice.cubic(5.64), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    ds = _dataset([cscl, nacl, cscl])
    cfg = FeaturesConfig(cache_dir=str(tmp_path), n_jobs=1)
    fs = featurize(ds, cfg, progress=False)
    assert fs.descriptor_sets == ("magpie", "density", "symmetry", "bonds")
    assert fs.descriptors.shape == (3, 132 + 3 + 4 + len(D.BOND_COLUMNS)) == (3, len(fs.descriptor_columns))
    np.testing.assert_array_equal(fs.descriptors[0], fs.descriptors[2])
    desc_files = sorted(p.name for p in tmp_path.glob("desc-*.npz"))
    assert [f.split("-")[1] for f in desc_files] == ["bonds", "density", "symmetry"]
    again = featurize(ds, cfg, progress=False)  # every set from the cache now
    np.testing.assert_array_equal(again.descriptors, fs.descriptors)
    # a different choice of sets is a different matrix, and only magpie + density columns
    only = featurize(ds, cfg.model_copy(update={"descriptors": ["density", "magpie"]}), progress=False)
    np.testing.assert_array_equal(only.descriptors, fs.descriptors[:, :135])


def test_composition_only_data_gets_magpie_and_a_clear_error(tmp_path):
    ds = _dataset([Composition("NaCl"), Composition("Fe2O3")], name="comps")
    cfg = FeaturesConfig(cache_dir=str(tmp_path), n_jobs=1)
    fs = featurize(ds, cfg, progress=False)
    assert fs.descriptor_sets == ("magpie",) and fs.descriptors.shape == (2, 132) and fs.graphs is None
    stoich = featurize(ds, cfg.model_copy(update={"descriptors": ["magpie", "stoichiometry"]}), progress=False)
    assert stoich.descriptors.shape == (2, 138)
    with pytest.raises(D.DescriptorError, match="symmetry"):
        featurize(ds, cfg.model_copy(update={"descriptors": ["symmetry"]}), progress=False)


def test_real_phonons_descriptors_are_finite(tmp_path, data_dir):
    from matfusion.data import load_dataset

    ds = load_dataset(DataConfig(source="matbench_phonons", limit=40, data_dir=str(data_dir)))
    fs = featurize(ds, FeaturesConfig(cache_dir=str(tmp_path), n_jobs=1), progress=False)
    assert fs.descriptors.shape == (40, D.width_of(D.DEFAULT_STRUCTURE_SETS))
    assert np.isfinite(fs.descriptors[:, 132:]).all()  # the structural sets have a value for every phonons row
