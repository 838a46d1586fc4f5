"""The bad-input corpus (tests/data/bad/, described in its README.md) through the real CLI.

Each bad structure is a counted, named skip (the good rows load and featurize); a source that
does not exist, a wrong column, bad YAML are one ``matfusion: error:`` line and exit 2.  Also the
load-time sanity checks one by one, and prepare_fold skipping a structure the graph builder fails on.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from pymatgen.core import Composition, Lattice, Structure

from matfusion.cli import main
from matfusion.config import config_from_dict
from matfusion.data import load_dataset
from matfusion.data.dataset import MIN_DISTANCE, DataError, Dataset, structure_problem
from matfusion.data.featurize import GraphBuildError
from matfusion.data.prepare import fold_split, prepare_fold
from matfusion.data.tables import load_cif_folder, parse_structure

BAD = Path(__file__).resolve().parent / "bad"
CIFS = BAD / "cifs"

# what tests/data/bad/cifs/id_prop.csv must give: (reason, count) and a piece of each message
EXPECTED_SKIPS = {
    "bad target": 3,
    "zero volume": 1,
    "overlapping atoms": 2,
    "unknown element": 1,
    "disordered": 1,
    "unparseable structure": 4,
    "duplicate id": 1,
    "missing file": 1,
    "unlisted file": 1,
}
EXPECTED_MESSAGES = [
    "line 1 (id text_target) [text_target.cif]: target 'abc' is not a number",
    "line 6 (id nan_target) [nan_target.cif]: target is 'nan'",
    "line 7 (id inf_target) [inf_target.cif]: target is 'inf'",
    "line 8 (id collinear) [POSCAR_collinear]: cell volume 0 A^3 for 2 atom(s): the lattice vectors are collinear",
    "line 9 (id overlap) [POSCAR_overlap]: atoms 0 (Na) and 1 (Cl) are 0.000 A apart",
    "line 10 (id overlap_cif): cannot parse structure file overlap_cif.cif: two or more atoms at one position",
    "line 11 (id unknown_xx) [unknown_xx.cif]: unknown element symbol(s) Xx",
    "line 12 (id disordered) [disordered.cif]: structure has partially occupied sites",
    "line 13 (id malformed): cannot parse structure file malformed.cif: not a usable CIF: no unit cell",
    "line 14 (id empty): cannot parse structure file empty.cif: the file is empty",
    "line 15 (id binary): cannot parse structure file binary.cif: not a text file (binary content)",
    "line 16 (id truncated): cannot parse structure file truncated.vasp: not a valid POSCAR: the counts say 2 atom(s), "
    "1 coordinate line(s) follow",
    "line 17 (id good_cscl): id already used on line 3",
    "line 18 (id ghost): no structure file for id 'ghost'",
    "1 structure file(s) named by no id_prop.csv row, not loaded: extra_unlisted.cif",
]
GOOD_IDS = ["good_nacl", "good_cscl", "good_k", "isolated"]


def _config(tmp_path: Path, source, families=("rf",), **data) -> Path:
    path = tmp_path / "cfg.yaml"
    raw = {
        "name": "bad-inputs",
        "data": {"source": str(source), **data},
        "features": {"cache_dir": str(tmp_path / "cache"), "n_jobs": 1},
        "search": {"families": list(families)},
    }
    path.write_text(yaml.safe_dump(raw))
    return path


def _lines(text: str) -> list[str]:
    """The text lines of captured stderr without tqdm's carriage-return redraws."""
    return [ln.strip() for part in text.split("\n") for ln in part.split("\r")[-1:] if ln.strip()]


def _one_error_line(capsys, argv) -> str:
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2
    assert "Traceback" not in err
    errors = [ln for ln in _lines(err) if ln.startswith("matfusion: error:")]
    assert len(errors) == 1, err
    return errors[0]


# --------------------------------------------------------------------------- the CIF folder corpus


def test_corpus_folder_validate_names_and_counts_every_skip(tmp_path, capsys):
    rc = main(["validate", str(_config(tmp_path, CIFS))])
    out, err = capsys.readouterr()
    assert rc == 0
    assert yaml.safe_load(out)["data"]["source"] == str(CIFS)  # the config on stdout, defaults filled in
    summary = next(ln for ln in _lines(err) if ln.startswith("data: "))
    assert summary.startswith("data: cifs: 4 rows, target 'target'; skipped 15 (")
    for reason, n in EXPECTED_SKIPS.items():
        assert f"{n} {reason}" in summary
    for piece in EXPECTED_MESSAGES:
        assert any(piece in ln for ln in _lines(err)), piece
    assert "IndexError" not in err and "list index out of range" not in err and "Traceback" not in err


def test_corpus_folder_loads_the_good_rows_with_their_targets():
    ds = load_cif_folder(CIFS)
    assert ds.ids == GOOD_IDS
    np.testing.assert_allclose(ds.targets, [1.5, 2.5, 0.5, 0.1])
    assert dict(ds.skipped) == EXPECTED_SKIPS
    assert len(ds.messages) == sum(EXPECTED_SKIPS.values())


def test_corpus_folder_featurizes_the_good_rows(tmp_path, capsys):
    rc = main(["featurize", str(_config(tmp_path, CIFS, families=("rf", "cgcnn")))])
    out = capsys.readouterr().out
    assert rc == 0
    assert "cifs: 4 rows" in out
    assert "descriptors (4, 155); graphs 4 (" in out  # magpie 132 + density 3 + symmetry 4 + bonds 16


def test_isolated_atom_is_kept_with_an_empty_neighbourhood(tmp_path):
    cfg = config_from_dict(
        {
            "name": "iso",
            "data": {"source": str(CIFS), "n_folds": 2},
            "features": {"cache_dir": str(tmp_path), "n_jobs": 1, "cutoff": 6.0},
            "search": {"families": ["cgcnn"]},
        }
    )
    prep = prepare_fold(cfg, progress=False)
    g = prep.dataset.ids.index("isolated")
    assert prep.graphs.num_edges(g) == 0 and len(prep.graphs.graph(g)[0]) == 1  # He alone in 14 A
    assert np.isnan(prep.descriptors[g, prep.columns.index("bonds:nn_dist_min")])


# --------------------------------------------------------------------------- tables, sources, YAML


def test_table_with_bad_targets_and_a_bad_structure(tmp_path, capsys):
    rc = main(["validate", str(_config(tmp_path, BAD / "targets.csv", target="gap"))])
    err = capsys.readouterr().err
    assert rc == 0
    summary = next(ln for ln in _lines(err) if ln.startswith("data: "))
    assert summary == (
        "data: targets: 2 rows, target 'gap'; skipped 5 (3 bad target, 1 unparseable structure, 1 zero volume)"
    )
    for piece in (
        "targets.csv row 1 (id targets-row1): target is 'nan'",
        "targets.csv row 2 (id targets-row2): target is 'inf'",
        "targets.csv row 3 (id targets-row3): target 'abc' is not a number",
        "targets.csv row 5 (id targets-row5): cell volume 0 A^3",
        "targets.csv row 6 (id targets-row6): cannot parse structure: not a valid POSCAR",
    ):
        assert any(piece in ln for ln in _lines(err)), piece
    ds = load_dataset(config_from_dict(yaml.safe_load((tmp_path / "cfg.yaml").read_text())).data)
    assert ds.ids == ["targets-row0", "targets-row4"]


def test_wrong_columns_is_one_line(tmp_path, capsys):
    line = _one_error_line(capsys, ["validate", str(_config(tmp_path, BAD / "wrong_columns.csv", target="band_gap"))])
    assert "wrong_columns.csv: structure column 'structure' not found; columns present: 'cif', 'band_gap'" in line
    line = _one_error_line(capsys, ["validate", str(_config(tmp_path, BAD / "wrong_columns.csv", target="K_VRH"))])
    assert "target column 'K_VRH' not found" in line


def test_a_source_that_does_not_exist_is_one_line(tmp_path, capsys, data_dir):
    line = _one_error_line(capsys, ["validate", str(_config(tmp_path, "matbench_nope"))])
    assert "matbench task 'matbench_nope': no matbench_nope.json.gz under" in line
    line = _one_error_line(capsys, ["validate", str(_config(tmp_path, tmp_path / "no_such_folder"))])
    assert "no_such_folder" in line and "nor an existing file or folder" in line


def test_a_table_of_bad_rows_only_is_one_line(tmp_path, capsys):
    (tmp_path / "c.csv").write_text("structure,y\nnot a structure,1\n")
    line = _one_error_line(capsys, ["validate", str(_config(tmp_path, tmp_path / "c.csv", target="y"))])
    assert "c: the dataset is empty; every row was skipped: 1 unparseable structure" in line


def test_validate_checks_families_and_descriptor_sets_against_the_data(tmp_path, capsys, data_dir):
    line = _one_error_line(capsys, ["validate", str(_config(tmp_path, "matbench_steels", families=("cgcnn",)))])
    assert "matbench_steels has compositions only; family 'cgcnn' needs crystal structures" in line
    cfg = _config(tmp_path, "matbench_steels")
    raw = yaml.safe_load(cfg.read_text())
    raw["features"]["descriptors"] = ["magpie", "bonds"]
    cfg.write_text(yaml.safe_dump(raw))
    line = _one_error_line(capsys, ["validate", str(cfg)])
    assert "features.descriptors: ['bonds'] need crystal structures" in line


def test_bad_yaml_is_an_error_exit_2(capsys):
    rc = main(["validate", str(BAD / "bad.yaml")])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert err.startswith("matfusion: error: config ") and "bad.yaml is not valid YAML" in err
    assert len(err.strip().splitlines()) == 1 and " at line " in err  # one line, saying where


# --------------------------------------------------------------------------- id_prop.csv first line


def _folder_with(tmp_path: Path, prop: str, ids=("a", "b")) -> Path:
    folder = tmp_path / "f"
    folder.mkdir()
    shutil.copy(CIFS / "good_cscl.cif", folder / "x.cif")
    for i in ids:
        shutil.copy(CIFS / "good_nacl.cif", folder / f"{i}.cif")
    (folder / "id_prop.csv").write_text(prop)
    return folder


def test_first_line_naming_a_file_is_a_data_row_not_a_header(tmp_path):
    ds = load_cif_folder(_folder_with(tmp_path, "a,oops\nb,2.0\nx,3.0\n"))
    assert ds.ids == ["b", "x"] and ds.skipped["bad target"] == 1
    assert any("line 1 (id a) [a.cif]: target 'oops' is not a number" in m for m in ds.messages)


def test_a_header_line_is_said(tmp_path):
    ds = load_cif_folder(_folder_with(tmp_path, "id,band_gap\na,1.0\nb,2.0\nx,3.0\n"))
    assert ds.ids == ["a", "b", "x"] and not ds.skipped
    assert ds.messages == ["id_prop.csv line 1 'id,band_gap' read as a header (not a data row)"]


# --------------------------------------------------------------------------- the sanity checks


def _nacl() -> Structure:
    """Rock salt's primitive cell (a = 5.64 A)."""
    a = 5.64 / 2**0.5
    return Structure(Lattice.from_parameters(a, a, a, 60, 60, 60), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])


@pytest.mark.parametrize(
    "make, reason, detail",
    [
        (lambda: Structure(Lattice([[3, 0, 0], [6, 0, 0], [0, 0, 3]]), ["Na"], [[0, 0, 0]]), "zero volume", "0 A^3"),
        (  # near-degenerate: a positive volume, 1e-6 A^3 per atom
            lambda: Structure(Lattice([[3, 0, 0], [6, 1e-6 / 9, 0], [0, 0, 3]]), ["Na"], [[0, 0, 0]]),
            "zero volume",
            "collinear or coplanar",
        ),
        (lambda: Structure(Lattice.cubic(0.45), ["Na"], [[0, 0, 0]]), "overlapping atoms", "its own periodic image"),
        (
            lambda: Structure(Lattice.cubic(4), ["Na", "Cl"], [[0, 0, 0], [0.05, 0, 0]]),
            "overlapping atoms",
            "atoms 0 (Na) and 1 (Cl) are 0.200 A apart",
        ),
        (lambda: Structure(Lattice.cubic(4), ["Na", "Rf"], [[0, 0, 0], [0.5] * 3]), "unknown element", "Rf (Z=104)"),
        (lambda: Composition("Xx2O"), "unknown element", "Xx"),
        (lambda: Structure(Lattice.cubic(4), ["Na"], [[np.nan, 0, 0]]), "bad lattice", "NaN/inf"),
        (lambda: Structure(Lattice([[4, 0, 0], [0, np.inf, 0], [0, 0, 4]]), ["Na"], [[0, 0, 0]]), "bad lattice", "NaN"),
    ],
)
def test_structure_problem_names_the_reason(make, reason, detail):
    found = structure_problem(make())
    assert found is not None and found[0] == reason and detail in found[1], found


def test_valid_structures_pass_the_checks():
    assert structure_problem(_nacl()) is None
    assert structure_problem(Composition("NaCl")) is None
    h2 = Structure(Lattice.cubic(8), ["H", "H"], [[0, 0, 0], [0.74 / 8, 0, 0]])  # the shortest real bond
    assert structure_problem(h2) is None and 0.74 > MIN_DISTANCE


def test_unknown_element_in_a_table_cell_is_a_skip_not_a_magpie_crash(tmp_path):
    text = (CIFS / "unknown_xx.cif").read_text()
    assert "Xx0+" in [str(site.specie) for site in parse_structure(text)]  # pymatgen's DummySpecies
    path = tmp_path / "xx.csv"
    import pandas as pd

    pd.DataFrame({"structure": [text, _nacl().to(fmt="cif")], "y": [1.0, 2.0]}).to_csv(path, index=False)
    cfg = config_from_dict(
        {
            "name": "xx",
            "data": {"source": str(path), "target": "y"},
            "features": {"cache_dir": str(tmp_path / "c"), "n_jobs": 1, "descriptors": ["magpie"]},
            "search": {"families": ["rf"]},
        }
    )
    from matfusion.data.featurize import featurize

    ds = load_dataset(cfg.data)
    assert ds.ids == ["xx-row1"] and ds.skipped["unknown element"] == 1
    fs = featurize(ds, cfg.features, progress=False)
    assert np.isfinite(fs.descriptors).all() and len(fs.graphs) == 1


def test_a_2000_atom_cell_loads_and_featurizes(tmp_path):
    big = _nacl() * (10, 10, 10)
    assert len(big) == 2000
    folder = tmp_path / "big"
    folder.mkdir()
    (folder / "big.cif").write_text(big.to(fmt="cif"))
    (folder / "id_prop.csv").write_text("big,1.0\n")
    t0 = time.time()
    ds = load_cif_folder(folder)
    assert ds.ids == ["big"] and not ds.skipped
    from matfusion.config import FeaturesConfig
    from matfusion.data.featurize import featurize

    fs = featurize(ds, FeaturesConfig(cache_dir=str(tmp_path / "c"), n_jobs=1, max_neighbors=6), progress=False)
    assert len(fs.graphs.graph(0)[0]) == 2000 and fs.graphs.num_edges(0) == 2000 * 6
    assert np.isfinite(fs.descriptors).all()
    assert time.time() - t0 < 60


# --------------------------------------------------------------------------- graph failures


def _mixed(n_good: int = 12) -> Dataset:
    """Rock salt rows and one composition among them (the graph builder fails on it)."""
    structures = [_nacl() for _ in range(n_good)]
    structures.insert(3, Composition("NaCl"))
    return Dataset(
        name="mixed",
        ids=[f"r{i}" for i in range(n_good + 1)],
        structures=structures,
        targets=np.arange(n_good + 1, dtype=float),
        target_name="y",
        content_hash=f"mixed-{n_good}",
    )


def _mixed_cfg(tmp_path):
    return config_from_dict(
        {
            "name": "mixed",
            "data": {"source": "unused", "fold": 0, "n_folds": 3},
            "features": {"cache_dir": str(tmp_path), "n_jobs": 1, "descriptors": ["magpie"]},
            "search": {"families": ["cgcnn"], "seed": 0},
        }
    )


def test_prepare_fold_skips_a_structure_the_graph_builder_fails_on(tmp_path):
    cfg, ds = _mixed_cfg(tmp_path), _mixed()
    prep = prepare_fold(cfg, ds, progress=False)
    assert "r3" not in prep.dataset.ids and len(prep.dataset) == 12
    assert prep.dataset.skipped["graph failed"] == 1
    assert any(m.startswith("row 3 (id r3): ") and m.endswith("; skipped") for m in prep.dataset.messages)
    assert len(prep.graphs) == 12 and prep.descriptors.shape == (12, 132)
    split = prep.split
    rows = np.concatenate([split.train, split.val, split.test])
    assert sorted(rows.tolist()) == list(range(12))  # the split is of the rows kept
    np.testing.assert_array_equal(split.test, fold_split(cfg, prep.dataset).test)


def test_prepare_fold_with_a_given_split_names_the_failing_row(tmp_path):
    cfg, ds = _mixed_cfg(tmp_path), _mixed()
    split = fold_split(cfg, ds)
    with pytest.raises(
        GraphBuildError, match=r"mixed: cannot build the crystal graph of 1 structure\(s\): row 3 \(id r3\)"
    ):
        prepare_fold(cfg, ds, split=split, progress=False)
    assert issubclass(GraphBuildError, DataError)  # one line from the CLI, exit 2
