"""Load a matbench v0.1 task from the data dir, with its official folds.

Files use matbench's layout (``<task>.json.gz``: ``{"index", "columns", "data"}``); row i is
id ``mb-<short>-<i+1>``, zero-padded to the digits of the row count (``mb-phonons-0001`` of 1,265
rows, ``mb-steels-001`` of 312), as matbench numbers them.  The official folds come from the matbench
package's ``matbench_v0.1_validation.json`` (read as a file; matbench itself is not imported).
"""

from __future__ import annotations

import gzip
import importlib.util
import json
from functools import lru_cache
from pathlib import Path
from typing import Optional

import numpy as np
from tqdm.auto import tqdm

from .dataset import DataError, Dataset, RowCollector, default_data_dir, hash_file


def _validation_file() -> Path:
    spec = importlib.util.find_spec("matbench")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the matbench package is not installed (pip install --no-deps matbench==0.6)")
    path = Path(list(spec.submodule_search_locations)[0]) / "matbench_v0.1_validation.json"
    if not path.is_file():
        raise DataError(f"matbench's official folds file is missing: {path}")
    return path


@lru_cache(maxsize=1)
def official_splits() -> dict:
    return json.loads(_validation_file().read_text())["splits"]


def matbench_id(task: str, row: int, n_rows: int) -> str:
    """matbench's id of ``row`` (0-based) of a task with ``n_rows`` rows: the number is padded to
    as many digits as ``n_rows`` has."""
    short = task.removeprefix("matbench_")
    return f"mb-{short.replace('_', '-')}-{row + 1:0{len(str(n_rows))}d}"


def find_matbench_file(task: str, data_dir: Optional[Path] = None) -> Optional[Path]:
    data_dir = Path(data_dir) if data_dir else default_data_dir()
    for candidate in (
        data_dir / "matbench" / f"{task}.json.gz",
        data_dir / f"{task}.json.gz",
        data_dir / "matbench" / f"{task}.json",
        data_dir / f"{task}.json",
    ):
        if candidate.is_file():
            return candidate
    return None


def load_matbench(task: str, data_dir: Optional[Path] = None, disordered: str = "skip") -> Dataset:
    """Read ``<task>.json.gz`` and attach the official folds (positions of each fold's test ids)."""
    path = find_matbench_file(task, data_dir)
    if path is None:
        raise DataError(
            f"matbench task {task!r}: no {task}.json.gz under {data_dir or default_data_dir()} "
            "(looked in <data_dir>/matbench/ and <data_dir>/)"
        )
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt") as fh:
            raw = json.load(fh)
        columns, rows = raw["columns"], raw["data"]
    except (OSError, ValueError, KeyError) as err:
        raise DataError(f"{path}: not a matbench JSON file ({err})") from None
    if len(columns) != 2:
        raise DataError(f"{path}: expected 2 columns (input, target), found {columns}")
    input_col, target_col = columns
    collector = RowCollector(task, disordered=disordered)
    is_structure = input_col == "structure"
    if is_structure:
        from pymatgen.core import Structure
    else:
        from pymatgen.core import Composition
    for i, (inp, target) in enumerate(tqdm(rows, desc=f"load {task}", unit="row", leave=False)):
        rid = matbench_id(task, i, len(rows))
        where = f"{path.name} row {i} ({rid})"
        try:
            obj = Structure.from_dict(inp) if is_structure else Composition(inp)
        except Exception as err:  # noqa: BLE001 - pymatgen raises many types
            collector.skip("unparseable input", f"{where}: cannot parse {input_col}: {err}")
            continue
        collector.add(rid, obj, target, where)

    folds = None
    splits = official_splits().get(task)
    if splits is not None:
        pos = {rid: i for i, rid in enumerate(collector.ids)}
        folds = [
            np.array([pos[r] for r in splits[f"fold_{k}"]["test"] if r in pos], dtype=np.int64)
            for k in range(len(splits))
        ]
    return collector.build(target_col, hash_file(path, extra=f"|{disordered}"), official_folds=folds)
