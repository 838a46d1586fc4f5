"""Load a user's own data: a CSV/JSON table of structures, or a folder of CIF/POSCAR files.

``load_table`` reads a CSV (``.csv``, ``.csv.gz``; matminer's ``# ref:`` comment line is
skipped) or JSON file (``.json``, ``.json.gz``: a list of records, pandas' "split" or
"columns" orient, or matbench's ``{"index", "columns", "data"}`` layout).  Each row's
structure cell may be a pymatgen ``Structure`` dict (or its JSON / Python-literal text), CIF
text or POSCAR text.

``load_cif_folder`` reads the CGCNN/ALIGNN layout: a folder of ``<id>.cif`` (or POSCAR) files
plus ``id_prop.csv`` with rows ``id,target`` (no header; a first line whose target is not a
number and whose id names no file is taken as a header, and said so in the messages).  Structure
files that no row names are counted (``unlisted file``) and named.

Bad rows never abort a load: each one is counted by reason in ``Dataset.skipped`` and
described in ``Dataset.messages`` (see :class:`~matfusion.data.dataset.RowCollector`).

The parsers underneath are public, for code that reads structures one at a time (``matfusion
predict``):

- :func:`parse_structure` (a ``Structure``, its dict, dict text, CIF or POSCAR text -> ``Structure``)
- :func:`parse_structure_file` (a file's name and text -> ``Structure``; CIF by suffix or content)
- :func:`read_csv_table`, :func:`read_json_table` (a table file -> pandas DataFrame of text cells)
- :func:`error_reason` (an exception -> one short line for a skip message); a parse failure is a
  :class:`StructureParseError` whose message says why in words (:func:`parse_failure`)
"""

from __future__ import annotations

import ast
import csv
import gzip
import io
import json
import math
import re
import warnings
from pathlib import Path
from typing import Optional, Sequence, Union

from tqdm.auto import tqdm

from .dataset import DataError, Dataset, RowCollector, hash_bytes, hash_file, log

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
    return _from_text(text, "cif" if "_cell_length_a" in text or text.startswith("data_") else "poscar")


class StructureParseError(ValueError):
    """A structure text that cannot be parsed; the message says why in words (not pymatgen's
    exception text alone), ``reason`` is the loaders' skip counter for it."""

    def __init__(self, message: str, reason: str = "unparseable structure") -> None:
        super().__init__(message)
        self.reason = reason


def _skip_reason(err: Exception) -> str:
    return getattr(err, "reason", None) or "unparseable structure"


def _from_text(text: str, fmt: str):
    """``Structure.from_str(text, fmt)``; a failure is a :class:`StructureParseError` saying why."""
    from pymatgen.core import Structure

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return Structure.from_str(text, fmt=fmt)
    except Exception as err:  # noqa: BLE001 - pymatgen raises many types
        message = parse_failure(text, fmt, err)
        reason = "overlapping atoms" if message.startswith(_OVERLAP) else "unparseable structure"
        raise StructureParseError(message, reason) from err


_OVERLAP = "two or more atoms at one position"


def _is_binary(text: str) -> bool:
    return "\0" in text or text.count("\ufffd") > max(2, len(text) // 100)


def _cif_failure(text: str, err: Exception) -> str:
    lower = text.lower()
    missing = [k for k in ("_cell_length_a", "_cell_length_b", "_cell_length_c") if k not in lower]
    if missing:
        return f"not a usable CIF: no unit cell ({', '.join(missing)} missing)"
    if "_atom_site_fract_x" not in lower and "_atom_site_cartn_x" not in lower:
        return "not a usable CIF: no atom sites (no _atom_site_fract_x / _atom_site_Cartn_x loop)"
    from pymatgen.io.cif import CifParser

    parser = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            parser = CifParser.from_str(text)
            parser.parse_structures(primitive=False)
    except Exception:  # noqa: BLE001 - the same failure; the parser's warnings say why
        pass
    notes = [str(n) for n in getattr(parser, "warnings", None) or []]
    joined = " ".join(notes)
    if "sum to > 1" in joined or "exceeded tolerance" in joined:
        occ = re.search(r"occupancies \(\[([^\]]*)\]\)", joined)
        total = f" (occupancies sum to {occ.group(1)})" if occ else ""
        return f"{_OVERLAP}{total}: overlapping sites"
    detail = next((n.splitlines()[-1] for n in reversed(notes) if "no structure parsed" in n.lower()), "")
    return f"not a usable CIF ({detail or error_reason(err)})"


def _poscar_failure(text: str, err: Exception) -> str:
    layout = "comment, scale, 3 lattice vectors, element symbols, atom counts, Direct/Cartesian, one line per atom"
    lines = [ln.split() for ln in text.strip().splitlines()]
    if len(lines) < 7:
        return f"not a valid POSCAR: {len(lines)} line(s), expected at least 8 ({layout})"
    counts_at = 5 if lines[5] and _is_number(lines[5][0]) else 6  # VASP 4 files have no symbols line
    try:
        n_atoms = sum(int(c) for c in lines[counts_at])
    except ValueError:
        return f"not a valid POSCAR: line {counts_at + 1} {' '.join(lines[counts_at])!r} is not atom counts ({layout})"
    mode_at = counts_at + 1
    if mode_at < len(lines) and lines[mode_at] and lines[mode_at][0][:1].lower() == "s":  # Selective dynamics
        mode_at += 1
    given = max(0, len(lines) - mode_at - 1)
    if given < n_atoms:
        return f"not a valid POSCAR: the counts say {n_atoms} atom(s), {given} coordinate line(s) follow"
    return f"not a valid POSCAR ({layout}): {error_reason(err)}"


def parse_failure(text: str, fmt: str, err: Exception) -> str:
    """One line saying why ``text`` could not be parsed as ``fmt`` (``"cif"`` / ``"poscar"``):
    empty, binary, a CIF without a cell or atom sites, overlapping CIF sites, a POSCAR with too
    few lines; else the format and pymatgen's first line."""
    if not text.strip():
        return "the file is empty"
    if _is_binary(text):
        return "not a text file (binary content)"
    if fmt == "cif":
        return _cif_failure(text, err)
    return _poscar_failure(text, err)


def error_reason(err: Exception) -> str:
    """``"<ExceptionType>: <first line of its message>"`` (the type alone for an empty message);
    a :class:`StructureParseError`'s message alone (it is already in words)."""
    text = str(err).strip().splitlines()
    first = text[0] if text else ""
    if isinstance(err, StructureParseError):
        return first
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
            collector.skip(_skip_reason(err), f"{where}: cannot parse structure: {error_reason(err)}")
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
    text looks like CIF, else POSCAR; a :class:`StructureParseError` saying why when it cannot be
    parsed."""
    suffix = file.suffix.lower()
    cif = suffix == ".cif" or "_cell_length_a" in text or text.lstrip().startswith("data_")
    return _from_text(text, "cif" if cif else "poscar")


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
    header = None
    if (
        rows
        and len(rows[0][1]) >= 2
        and not _is_number(rows[0][1][1])
        and _structure_file(folder, rows[0][1][0]) is None
    ):
        # a header line ("id,target"): its target is not a number and no structure file bears its id
        # (a first line whose id names a file is a data row with a bad target, skipped and counted)
        header = rows[0][1]
        rows = rows[1:]
    if not rows:
        raise DataError(f"{id_prop}: no data rows (expected lines 'id,target')")

    name = folder.resolve().name or "cif_folder"
    collector = RowCollector(name, disordered=disordered)
    if header is not None:
        collector.messages.append(f"{_ID_PROP} line 1 {','.join(header)!r} read as a header (not a data row)")
    chunks = [prop_bytes]
    seen: dict[str, int] = {}
    used: set[str] = set()
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
        file = _structure_file(folder, rid)
        if file is not None:
            used.add(file.name)
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
                _skip_reason(err),
                f"{where}: cannot parse structure file {file.name}: {error_reason(err)}",
            )
            continue
        if collector.add(rid, structure, value, f"{where} [{file.name}]"):
            chunks += [file.name.encode(), b"\0", data]
    _report_unlisted(folder, used, collector)
    chunks.append(f"|{disordered}".encode())
    return collector.build("target", hash_bytes(*chunks))


def _report_unlisted(folder: Path, used: set, collector: RowCollector) -> None:
    """Count (as ``unlisted file``) and name the structure files of ``folder`` that no row of
    ``id_prop.csv`` names: they are not loaded."""
    unlisted = sorted(
        p.name for p in folder.iterdir() if p.name not in used and p.is_file() and _looks_like_structure_file(p.name)
    )
    if unlisted:
        shown = ", ".join(unlisted[:5]) + (f" and {len(unlisted) - 5} more" if len(unlisted) > 5 else "")
        collector.skipped["unlisted file"] += len(unlisted)
        collector.messages.append(
            f"{folder}: {len(unlisted)} structure file(s) named by no {_ID_PROP} row, not loaded: {shown} "
            f"(add a line 'id,target' for each to use it)"
        )
        log.warning(collector.messages[-1])


def _looks_like_structure_file(name: str) -> bool:
    lower = name.lower()
    return lower.endswith((".cif", ".vasp", ".poscar")) or name.startswith("POSCAR_")


def _structure_file(folder: Path, rid: str) -> Optional[Path]:
    """The first existing file of :func:`_candidate_names` for ``rid`` (None for an id that is not
    a plain file name)."""
    if Path(rid).name != rid or rid in (".", "..") or not rid:
        return None
    return next((folder / n for n in _candidate_names(rid) if (folder / n).is_file()), None)
