"""User-data loaders: CSV/JSON tables of structures and CGCNN-style CIF folders."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from pymatgen.core import Lattice, Structure

from matfusion.data.dataset import DataError
from matfusion.data.tables import load_cif_folder, load_table

ELASTIC = Path("/work/shared/data/matminer/elastic_tensor.csv.gz")


def nacl(a: float = 5.64) -> Structure:
    return Structure.from_spacegroup("Fm-3m", Lattice.cubic(a), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])


def cscl(a: float = 4.12) -> Structure:
    return Structure(Lattice.cubic(a), ["Cs", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])


def disordered_alloy() -> Structure:
    return Structure(Lattice.cubic(2.87), [{"Fe": 0.5, "Co": 0.5}, "Fe"], [[0, 0, 0], [0.5, 0.5, 0.5]])


def cif(s: Structure) -> str:
    return s.to(fmt="cif")


def poscar(s: Structure) -> str:
    return s.to(fmt="poscar")


# --------------------------------------------------------------------------- load_table


def test_csv_with_cif_column(tmp_path):
    path = tmp_path / "mine.csv"
    pd.DataFrame({"structure": [cif(nacl()), cif(cscl()), cif(nacl(5.5))], "gap": [5.0, 4.1, 5.2]}).to_csv(
        path, index=False
    )
    ds = load_table(path, "gap")
    assert len(ds) == 3
    assert ds.name == "mine"
    assert ds.target_name == "gap"
    assert ds.ids == ["mine-row0", "mine-row1", "mine-row2"]
    np.testing.assert_allclose(ds.targets, [5.0, 4.1, 5.2])
    assert ds.structures[0].composition.reduced_formula == "NaCl"
    assert len(ds.structures[0]) == 8  # conventional cell kept, not reduced to primitive
    assert ds.structures[1].composition.reduced_formula == "CsCl"
    assert not ds.skipped
    # the hash depends on the target/structure choice, and is stable
    assert ds.content_hash == load_table(path, "gap").content_hash


def test_gzipped_csv_with_comment_line_and_dict_text(tmp_path):
    path = tmp_path / "ref.csv.gz"
    body = pd.DataFrame({"structure": [str(nacl().as_dict()), json.dumps(cscl().as_dict())], "y": [1.0, 2.0]}).to_csv(
        index=False
    )
    with gzip.open(path, "wt") as fh:
        fh.write("# ref: someone et al. (2015)\n" + body)
    ds = load_table(path, "y")
    assert ds.name == "ref"
    assert [s.composition.reduced_formula for s in ds.structures] == ["NaCl", "CsCl"]


def test_json_records_with_structure_dicts(tmp_path):
    path = tmp_path / "recs.json"
    records = [
        {"material_id": "mp-22862", "structure": nacl().as_dict(), "e_form": -2.1},
        {"material_id": "mp-573697", "structure": cscl().as_dict(), "e_form": -2.2},
    ]
    path.write_text(json.dumps(records))
    ds = load_table(path, "e_form", id_column="material_id")
    assert ds.ids == ["mp-22862", "mp-573697"]
    np.testing.assert_allclose(ds.targets, [-2.1, -2.2])
    assert ds.structures[1] == cscl()


@pytest.mark.parametrize("orient", ["split", "columns", "matbench"])
def test_json_pandas_orients(tmp_path, orient):
    df = pd.DataFrame({"structure": [nacl().as_dict(), cscl().as_dict()], "y": [1.5, 2.5]})
    if orient == "matbench":
        raw = {"index": [0, 1], "columns": ["structure", "y"], "data": df.values.tolist()}
    else:
        raw = json.loads(df.to_json(orient=orient))
    path = tmp_path / "t.json.gz"
    with gzip.open(path, "wt") as fh:
        json.dump(raw, fh)
    ds = load_table(path, "y")
    np.testing.assert_allclose(ds.targets, [1.5, 2.5])
    assert [s.composition.reduced_formula for s in ds.structures] == ["NaCl", "CsCl"]


def test_poscar_column_and_id_column(tmp_path):
    path = tmp_path / "pos.csv"
    pd.DataFrame({"id": ["a1", "b2"], "poscar": [poscar(nacl()), poscar(cscl())], "k": [24.0, 17.0]}).to_csv(
        path, index=False
    )
    ds = load_table(path, "k", structure_column="poscar", id_column="id")
    assert ds.ids == ["a1", "b2"]
    assert ds.structures[0].composition.reduced_formula == "NaCl"
    assert ds.structures[1].composition.reduced_formula == "CsCl"


def test_bad_structure_row_is_skipped_not_fatal(tmp_path):
    path = tmp_path / "bad.csv"
    pd.DataFrame({"structure": [cif(nacl()), "this is not a structure", ""], "y": [1.0, 2.0, 3.0]}).to_csv(
        path, index=False
    )
    ds = load_table(path, "y")
    assert ds.ids == ["bad-row0"]
    assert ds.skipped["unparseable structure"] == 2
    assert any("bad.csv row 1 (id bad-row1): cannot parse structure" in m for m in ds.messages)


def test_disordered_structure_skipped_or_ordered(tmp_path):
    path = tmp_path / "dis.json"
    path.write_text(
        json.dumps(
            [
                {"structure": nacl().as_dict(), "y": 1.0},
                {"structure": disordered_alloy().as_dict(), "y": 2.0},
            ]
        )
    )
    ds = load_table(path, "y")
    assert ds.ids == ["dis-row0"]
    assert ds.skipped["disordered"] == 1
    assert any("dis-row1" in m and "disordered" in m for m in ds.messages)

    kept = load_table(path, "y", disordered="majority")
    assert len(kept) == 2 and not kept.skipped
    ordered = kept.structures[1]
    assert ordered.is_ordered
    assert len(ordered) == 2
    assert kept.content_hash != ds.content_hash


def test_nan_and_inf_targets_are_dropped(tmp_path):
    path = tmp_path / "nan.csv"
    s = cif(nacl())
    pd.DataFrame({"structure": [s, s, s, s], "y": ["1.0", "nan", "inf", "2.0"]}).to_csv(path, index=False)
    ds = load_table(path, "y")
    assert ds.ids == ["nan-row0", "nan-row3"]
    np.testing.assert_allclose(ds.targets, [1.0, 2.0])
    assert ds.skipped["bad target"] == 2
    assert any("nan.csv row 1 (id nan-row1)" in m for m in ds.messages)
    assert any("nan.csv row 2 (id nan-row2)" in m for m in ds.messages)


def test_empty_table_is_an_error(tmp_path):
    path = tmp_path / "empty.csv"
    path.write_text("structure,y\n")
    with pytest.raises(DataError, match=r"empty\.csv.*no data rows"):
        load_table(path, "y")
    zero = tmp_path / "zero.csv"
    zero.write_text("")
    with pytest.raises(DataError, match=r"zero\.csv.*empty"):
        load_table(zero, "y")
    none = tmp_path / "none.json"
    none.write_text("[]")
    with pytest.raises(DataError, match="none.json"):
        load_table(none, "y")


def test_all_rows_bad_is_an_error(tmp_path):
    path = tmp_path / "allbad.csv"
    pd.DataFrame({"structure": ["junk", cif(nacl())], "y": [1.0, float("nan")]}).to_csv(path, index=False)
    with pytest.raises(DataError, match="dataset is empty.*every row was skipped"):
        load_table(path, "y")


def test_missing_columns_name_the_column_and_list_present(tmp_path):
    path = tmp_path / "cols.csv"
    pd.DataFrame({"structure": [cif(nacl())], "band_gap": [1.0]}).to_csv(path, index=False)
    with pytest.raises(DataError) as err:
        load_table(path, "K_VRH")
    msg = str(err.value)
    assert "'K_VRH'" in msg and "'structure'" in msg and "'band_gap'" in msg
    with pytest.raises(DataError, match=r"structure column 'cif'.*'band_gap'"):
        load_table(path, "band_gap", structure_column="cif")
    with pytest.raises(DataError, match=r"id column 'mpid'.*'structure'"):
        load_table(path, "band_gap", id_column="mpid")
    with pytest.raises(DataError, match="no such file"):
        load_table(tmp_path / "nope.csv", "y")


def test_duplicate_ids_are_counted(tmp_path):
    path = tmp_path / "dup.csv"
    s = cif(nacl())
    pd.DataFrame({"id": ["x", "x", "y"], "structure": [s, s, s], "t": [1, 2, 3]}).to_csv(path, index=False)
    ds = load_table(path, "t", id_column="id")
    assert ds.ids == ["x", "y"]
    assert ds.skipped["duplicate id"] == 1


# --------------------------------------------------------------------------- load_cif_folder


def _folder(tmp_path: Path, prop: str) -> Path:
    folder = tmp_path / "cifs"
    folder.mkdir()
    (folder / "id_prop.csv").write_text(prop)
    return folder


def test_cif_folder_loads_all_file_kinds(tmp_path):
    folder = _folder(tmp_path, "a,1.0\nb,2.0\nc,3.0\nd,4.0\n")
    (folder / "a.cif").write_text(cif(nacl()))
    (folder / "b").write_text(poscar(cscl()))
    (folder / "POSCAR_c").write_text(poscar(nacl(5.5)))
    (folder / "d.vasp").write_text(poscar(cscl(4.0)))
    ds = load_cif_folder(folder)
    assert ds.ids == ["a", "b", "c", "d"]
    assert ds.target_name == "target"
    np.testing.assert_allclose(ds.targets, [1, 2, 3, 4])
    assert ds.structures[1].composition.reduced_formula == "CsCl"
    assert not ds.skipped
    h = ds.content_hash
    (folder / "a.cif").write_text(cif(nacl(5.7)))
    assert load_cif_folder(folder).content_hash != h


def test_cif_folder_header_line_is_not_a_bad_row(tmp_path):
    folder = _folder(tmp_path, "id,band_gap\na,1.0\n")
    (folder / "a.cif").write_text(cif(nacl()))
    ds = load_cif_folder(folder)
    assert ds.ids == ["a"] and not ds.skipped


def test_malformed_cif_names_the_file_and_others_load(tmp_path):
    folder = _folder(tmp_path, "good1,1.0\nbroken,2.0\ngood2,3.0\n")
    (folder / "good1.cif").write_text(cif(nacl()))
    (folder / "good2.cif").write_text(cif(cscl()))
    (folder / "broken.cif").write_text("data_broken\n_cell_length_a 5.0\nloop_\n_atom_site_label\n")
    ds = load_cif_folder(folder)
    assert ds.ids == ["good1", "good2"]
    assert ds.skipped["unparseable structure"] == 1
    assert any("broken.cif" in m for m in ds.messages)


def test_cif_folder_missing_file_is_counted(tmp_path):
    folder = _folder(tmp_path, "a,1.0\nghost,2.0\n")
    (folder / "a.cif").write_text(cif(nacl()))
    ds = load_cif_folder(folder)
    assert ds.ids == ["a"]
    assert ds.skipped["missing file"] == 1
    msg = next(m for m in ds.messages if "ghost" in m)
    assert "ghost.cif" in msg and "POSCAR_ghost" in msg


def test_cif_folder_disordered_and_bad_targets(tmp_path):
    folder = _folder(tmp_path, "a,1.0\nalloy,2.0\nb,nan\n")
    (folder / "a.cif").write_text(cif(nacl()))
    (folder / "b.cif").write_text(cif(cscl()))
    (folder / "alloy.cif").write_text(cif(disordered_alloy()))
    ds = load_cif_folder(folder)
    assert ds.ids == ["a"]
    assert ds.skipped["disordered"] == 1 and ds.skipped["bad target"] == 1
    kept = load_cif_folder(folder, disordered="majority")
    assert kept.ids == ["a", "alloy"] and kept.structures[1].is_ordered


def test_cif_folder_without_id_prop_is_an_error(tmp_path):
    folder = tmp_path / "noprop"
    folder.mkdir()
    (folder / "a.cif").write_text(cif(nacl()))
    with pytest.raises(DataError, match=r"noprop.*id_prop\.csv"):
        load_cif_folder(folder)
    empty = _folder(tmp_path, "")
    with pytest.raises(DataError, match="no data rows"):
        load_cif_folder(empty)


def test_target_names_one_per_target_column(tmp_path):
    path = tmp_path / "two.csv"
    pd.DataFrame({"structure": [cif(nacl()), cif(cscl())], "K_VRH": [24.0, 17.0], "G_VRH": [14.0, ""]}).to_csv(
        path, index=False
    )
    two = load_table(path, ["K_VRH", "G_VRH"])
    assert two.targets.shape == (2, 2) and two.target_names == ["K_VRH", "G_VRH"]
    assert load_table(path, "K_VRH").target_names == ["K_VRH"]
    # a name with a comma of its own cannot be split into one name per column: t0, t1
    odd = two.subset([0, 1])
    odd.target_name = "a,b,c"
    assert odd.target_names == ["t0", "t1"]
    odd.target_name = "last phdos peak"
    assert odd.subset([0]).targets.shape == (1, 2) and odd.target_names == ["t0", "t1"]


# --------------------------------------------------------------------------- real data


@pytest.mark.skipif(not ELASTIC.is_file(), reason=f"{ELASTIC} not present")
def test_real_matminer_elastic_tensor():
    ds = load_table(ELASTIC, "K_VRH")
    assert len(ds) == 1181
    assert not ds.skipped
    assert ds.name == "elastic_tensor"
    assert np.isfinite(ds.targets).all()
