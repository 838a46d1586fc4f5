"""Load a user's own data: a CSV/JSON table of structures, or a folder of CIF/POSCAR files.

``load_table`` reads a CSV (``.csv``, ``.csv.gz``; matminer's ``# ref:`` comment line is
skipped) or JSON file (``.json``, ``.json.gz``: a list of records, pandas' "split" or
"columns" orient, or matbench's ``{"index", "columns", "data"}`` layout).  Each row's
structure cell may be a pymatgen ``Structure`` dict (or its JSON / Python-literal text), CIF
text or POSCAR text.

``load_cif_folder`` reads the CGCNN/ALIGNN layout: a folder of ``<id>.cif`` (or POSCAR) files
plus ``id_prop.csv`` with rows ``id,target`` (no header; a first line whose target is not a
number is taken as a header).

Bad rows never abort a load: each one is counted by reason in ``Dataset.skipped`` and
described in ``Dataset.messages`` (see :class:`~matfusion.data.dataset.RowCollector`).

The parsers underneath are public, for code that reads structures one at a time (``matfusion
predict``):

- :func:`parse_structure` (a ``Structure``, its dict, dict text, CIF or POSCAR text -> ``Structure``)
- :func:`parse_structure_file` (a file's name and text -> ``Structure``; CIF by suffix or content)
- :func:`read_csv_table`, :func:`read_json_table` (a table file -> pandas DataFrame of text cells)
- :func:`error_reason` (an exception -> one short line for a skip message)
"""

from __future__ import annotations

import ast
import csv
import gzip
import io
import json
import math
import warnings
from pathlib import Path
from typing import Optional, Sequence, Union

from tqdm.auto import tqdm

from .dataset import DataError, Dataset, RowCollector, hash_bytes, hash_file

__all__ = [
    "error_reason",
    "load_cif_folder",
    "load_table",
    "parse_structure",
    "parse_structure_file",
    "read_csv_table",
    "read_json_table",
]

_DISORDERED_CHOICES = ("skip", "majority")


# --------------------------------------------------------------------------- helpers


def _check_disordered(disordered: str) -> None:
    if disordered not in _DISORDERED_CHOICES:
        raise DataError(f"disordered={disordered!r} is not one of {', '.join(_DISORDERED_CHOICES)}")


def _stem(path: Path) -> str:
    """File name without ``.gz`` and the format suffix (``a.csv.gz`` -> ``a``)."""
    name = path.name
    if name.lower().endswith(".gz"):
        name = name[:-3]
    for ext in (".csv", ".json"):
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return Path(name).stem


def _kind(path: Path) -> str:
    """``"csv"`` or ``"json"`` from the suffix, else by sniffing the first character."""
    name = path.name.lower()
    if name.endswith(".gz"):
        name = name[:-3]
    if name.endswith(".csv"):
        return "csv"
    if name.endswith(".json"):
        return "json"
    try:
        with _open_text(path) as fh:
            head = fh.read(4096).lstrip()
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: cannot read ({err})") from None
    return "json" if head[:1] in ("[", "{") else "csv"


def _open_text(path: Path):
    if path.name.lower().endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8-sig", newline="")
    return open(path, "rt", encoding="utf-8-sig", newline="")


def _is_missing(value) -> bool:
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return isinstance(value, str) and not value.strip()


def parse_structure(value):
    """A pymatgen Structure from a dict, dict text, CIF text or POSCAR text.

    Raises ``ValueError`` (with a short reason) when the value cannot be parsed.
    """
    from pymatgen.core import Structure

    if isinstance(value, Structure):
        return value
    if _is_missing(value):
        raise ValueError("the structure cell is empty")
    if isinstance(value, dict):
        return Structure.from_dict(value)
    if not isinstance(value, str):
        raise ValueError(f"expected a structure dict, CIF or POSCAR text, got {type(value).__name__}")
    text = value.strip()
    if text.startswith("{"):
        try:
            obj = json.loads(text)
        except ValueError:
            try:
                obj = ast.literal_eval(text)
            except (ValueError, SyntaxError, MemoryError, RecursionError) as err:
                raise ValueError(f"structure text starts with '{{' but is not a dict ({err})") from None
        if not isinstance(obj, dict):
            raise ValueError(f"structure text is a {type(obj).__name__}, not a dict")
        return Structure.from_dict(obj)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if "_cell_length_a" in text or text.startswith("data_"):
            return Structure.from_str(text, fmt="cif")
        return Structure.from_str(text, fmt="poscar")


def error_reason(err: Exception) -> str:
    """``"<ExceptionType>: <first line of its message>"`` (the type alone for an empty message)."""
    text = str(err).strip().splitlines()
    first = text[0] if text else ""
    return f"{type(err).__name__}: {first}" if first else type(err).__name__


def _count_comment_lines(path: Path) -> int:
    """How many leading lines start with ``#`` (matminer's ``# ref: ...`` line)."""
    n = 0
    with _open_text(path) as fh:
        for line in fh:
            if line.startswith("#"):
                n += 1
            else:
                break
    return n


def read_csv_table(path: Path):
    """A CSV file (``.gz`` too; leading ``#`` lines skipped) as a DataFrame of text cells; raises
    :class:`DataError` naming the file when it is empty or unreadable."""
    import pandas as pd

    try:
        skip = _count_comment_lines(path)
        # Everything as text: ids stay exactly as written; targets are checked per row.
        return pd.read_csv(path, skiprows=skip, dtype=str, keep_default_na=False, skipinitialspace=False)
    except pd.errors.EmptyDataError:
        raise DataError(f"{path}: the file is empty (no header and no rows)") from None
    except (OSError, UnicodeDecodeError, pd.errors.ParserError) as err:
        raise DataError(f"{path}: not a readable CSV file ({err})") from None


def read_json_table(path: Path):
    """A JSON table (list of records, pandas "split" / "columns" orient, ``{column: [values]}``,
    matbench's layout; ``.gz`` too) as a DataFrame; raises :class:`DataError` naming the file
    and the layout problem."""
    import pandas as pd

    try:
        with _open_text(path) as fh:
            text = fh.read()
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: cannot read ({err})") from None
    if not text.strip():
        raise DataError(f"{path}: the file is empty")
    try:
        raw = json.loads(text)
    except ValueError as err:
        raise DataError(f"{path}: not valid JSON ({err})") from None

    if isinstance(raw, list):
        if not raw:
            return pd.DataFrame()
        bad = next((i for i, r in enumerate(raw) if not isinstance(r, dict)), None)
        if bad is not None:
            raise DataError(
                f"{path}: a JSON list must hold one object per row; item {bad} is a {type(raw[bad]).__name__}"
            )
        return pd.DataFrame.from_records(raw)
    if not isinstance(raw, dict):
        raise DataError(f"{path}: expected a JSON list of records or an object, got {type(raw).__name__}")
    if "columns" in raw and "data" in raw:  # pandas "split" orient / matbench layout
        columns, data = raw["columns"], raw["data"]
        if not isinstance(columns, list) or not isinstance(data, list):
            raise DataError(f"{path}: 'columns' and 'data' must be lists")
        short = [i for i, r in enumerate(data) if not isinstance(r, list) or len(r) != len(columns)]
        if short:
            raise DataError(f"{path}: data row {short[0]} does not have {len(columns)} values ({columns})")
        return pd.DataFrame(data, columns=columns)
    if raw and all(isinstance(v, dict) for v in raw.values()):  # pandas "columns" orient
        # {column: {index: value}}; rows in the order of the first column's index.
        index: list = []
        seen = set()
        for col in raw.values():
            for k in col:
                if k not in seen:
                    seen.add(k)
                    index.append(k)
        return pd.DataFrame({c: [v.get(k) for k in index] for c, v in raw.items()})
    if raw and all(isinstance(v, list) for v in raw.values()):  # {column: [values]}
        lengths = {len(v) for v in raw.values()}
        if len(lengths) != 1:
            raise DataError(f"{path}: the columns have different lengths {sorted(lengths)}")
        return pd.DataFrame(raw)
    if not raw:
        return pd.DataFrame()
    raise DataError(
        f"{path}: unrecognised JSON layout (keys {list(raw)[:10]}); expected a list of records, "
        "pandas 'split' ({index, columns, data}) or 'columns' ({column: {index: value}}) orient"
    )


def _missing_column(path: Path, what: str, name: str, columns) -> DataError:
    present = ", ".join(repr(str(c)) for c in columns) or "(none)"
    return DataError(f"{path}: {what} column {name!r} not found; columns present: {present}")


# --------------------------------------------------------------------------- loaders


def load_table(
    path: Union[str, Path],
    target: Union[str, Sequence[str]],
    structure_column: str = "structure",
    id_column: Optional[str] = None,
    disordered: str = "skip",
) -> Dataset:
    """Load a CSV/JSON table with one structure per row and a numeric target column.

    ``target`` is a column name (a list of names gives a multi-target dataset).  Row ids come
    from ``id_column`` when given, else ``"<file stem>-row<i>"`` (i counts data rows from 0).
    """
    path = Path(path)
    _check_disordered(disordered)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    targets = [target] if isinstance(target, str) else list(target)
    if not targets:
        raise DataError(f"{path}: no target column given")

    df = read_csv_table(path) if _kind(path) == "csv" else read_json_table(path)
    columns = [str(c) for c in df.columns]
    df.columns = columns
    for t in targets:
        if t not in columns:
            raise _missing_column(path, "target", t, columns)
    if structure_column not in columns:
        raise _missing_column(path, "structure", structure_column, columns)
    if id_column is not None and id_column not in columns:
        raise _missing_column(path, "id", id_column, columns)
    if len(df) == 0:
        raise DataError(f"{path}: the file has no data rows (columns: {', '.join(columns)})")

    name = _stem(path)
    collector = RowCollector(name, disordered=disordered)
    structures = df[structure_column].tolist()
    target_values = [df[t].tolist() for t in targets]
    ids = df[id_column].tolist() if id_column is not None else None
    seen: dict[str, int] = {}
    for i in tqdm(range(len(df)), desc=f"load {path.name}", unit="row", leave=False):
        if ids is not None:
            if _is_missing(ids[i]):
                collector.skip("missing id", f"{path.name} row {i}: id column {id_column!r} is empty")
                continue
            rid = str(ids[i]).strip()
        else:
            rid = f"{name}-row{i}"
        where = f"{path.name} row {i} (id {rid})"
        if rid in seen:
            collector.skip("duplicate id", f"{where}: id already used by row {seen[rid]}; row skipped")
            continue
        seen[rid] = i
        try:
            structure = parse_structure(structures[i])
        except Exception as err:  # noqa: BLE001 - pymatgen raises many types
            collector.skip("unparseable structure", f"{where}: cannot parse structure: {error_reason(err)}")
            continue
        value = target_values[0][i] if len(targets) == 1 else [col[i] for col in target_values]
        collector.add(rid, structure, value, where)

    target_name = targets[0] if len(targets) == 1 else ",".join(targets)
    content_hash = hash_file(path, extra=f"|{target_name}|{structure_column}|{disordered}")
    return collector.build(target_name, content_hash)


_ID_PROP = "id_prop.csv"


def _candidate_names(rid: str) -> list[str]:
    return [f"{rid}.cif", rid, f"{rid}.vasp", f"POSCAR_{rid}", f"{rid}.poscar"]


def parse_structure_file(file: Path, text: str):
    """A pymatgen Structure from the ``text`` of ``file``: CIF when the suffix is ``.cif`` or the
    text looks like CIF, else POSCAR; pymatgen's exception when it cannot be parsed."""
    from pymatgen.core import Structure

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        suffix = file.suffix.lower()
        if suffix == ".cif" or "_cell_length_a" in text or text.lstrip().startswith("data_"):
            return Structure.from_str(text, fmt="cif")
        return Structure.from_str(text, fmt="poscar")


def _is_number(text: str) -> bool:
    try:
        float(text)
    except (TypeError, ValueError):
        return False
    return True


def load_cif_folder(path: Union[str, Path], disordered: str = "skip") -> Dataset:
    """Load a CGCNN/ALIGNN folder: structure files plus ``id_prop.csv`` (``id,target`` rows).

    For each id the first existing file of ``<id>.cif``, ``<id>``, ``<id>.vasp``,
    ``POSCAR_<id>``, ``<id>.poscar`` is read.
    """
    folder = Path(path)
    _check_disordered(disordered)
    if not folder.is_dir():
        raise DataError(f"{folder}: not a folder (expected structure files plus {_ID_PROP})")
    id_prop = folder / _ID_PROP
    if not id_prop.is_file():
        raise DataError(f"{id_prop}: missing (a CIF folder needs {_ID_PROP} with rows 'id,target')")
    prop_bytes = id_prop.read_bytes()
    try:
        text = prop_bytes.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise DataError(f"{id_prop}: not UTF-8 text ({err})") from None
    rows = [
        (n, [c.strip() for c in row])
        for n, row in enumerate(csv.reader(io.StringIO(text)), start=1)
        if row and any(c.strip() for c in row)
    ]
    if rows and len(rows[0][1]) >= 2 and not _is_number(rows[0][1][1]):
        rows = rows[1:]  # a header line ("id,target"), not a bad row
    if not rows:
        raise DataError(f"{id_prop}: no data rows (expected lines 'id,target')")

    name = folder.resolve().name or "cif_folder"
    collector = RowCollector(name, disordered=disordered)
    chunks = [prop_bytes]
    seen: dict[str, int] = {}
    for line_no, row in tqdm(rows, desc=f"load {name}", unit="row", leave=False):
        if len(row) < 2 or not row[0]:
            collector.skip("bad row", f"{_ID_PROP} line {line_no}: expected 'id,target', got {','.join(row)!r}")
            continue
        rid, value = row[0], row[1]
        where = f"{_ID_PROP} line {line_no} (id {rid})"
        if rid in seen:
            collector.skip("duplicate id", f"{where}: id already used on line {seen[rid]}; skipped")
            continue
        seen[rid] = line_no
        tried = _candidate_names(rid)
        file = None
        if Path(rid).name == rid and rid not in (".", ".."):
            file = next((folder / n for n in tried if (folder / n).is_file()), None)
        if file is None:
            collector.skip(
                "missing file",
                f"{where}: no structure file for id {rid!r} in {folder} (tried {', '.join(tried)})",
            )
            continue
        try:
            data = file.read_bytes()
            structure = parse_structure_file(file, data.decode("utf-8", errors="replace"))
        except Exception as err:  # noqa: BLE001 - pymatgen raises many types
            collector.skip(
                "unparseable structure",
                f"{where}: cannot parse structure file {file.name}: {error_reason(err)}",
            )
            continue
        if collector.add(rid, structure, value, f"{where} [{file.name}]"):
            chunks += [file.name.encode(), b"\0", data]
    chunks.append(f"|{disordered}".encode())
    return collector.build("target", hash_bytes(*chunks))
