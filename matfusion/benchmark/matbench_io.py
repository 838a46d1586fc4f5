"""matbench I/O: the task's metadata, matminer's data folder, the results file
(``results.json.gz``: exactly what matbench's ``MatbenchBenchmark.as_dict()`` returns, gzip),
and the check that our rows line up with matbench's folds.

matbench 0.6's ``from_file`` opens files as plain text; :func:`load_results` reads both gzip and
plain JSON and validates with matbench's ``from_dict``.
"""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path
from typing import Optional

import numpy as np

from .base import N_OFFICIAL_FOLDS, RESULTS_FILE, BenchmarkError

__all__ = [
    "N_OFFICIAL_FOLDS",
    "RESULTS_FILE",
    "check_alignment",
    "check_task",
    "ensure_matminer_data",
    "fold_scores",
    "load_results",
    "open_benchmark",
    "read_results_dict",
    "recorded_folds",
    "write_results",
]


def check_task(task: str) -> dict:
    """matbench's metadata of ``task``; a clear error for unknown or classification tasks."""
    from matbench.metadata import mbv01_metadata

    if task not in mbv01_metadata:
        raise BenchmarkError(f"{task!r} is not a matbench v0.1 task; tasks: {', '.join(sorted(mbv01_metadata))}")
    meta = mbv01_metadata[task]
    if meta.task_type != "regression":
        raise BenchmarkError(f"{task} is a {meta.task_type} task; matfusion benchmarks regression tasks only")
    return meta


def ensure_matminer_data(task: str, data_dir: Optional[Path]) -> str:
    """Point matminer (which matbench loads through) at our data dir unless ``MATMINER_DATA`` is
    set already, so that matbench works offline.  Returns the folder used."""
    from ..data.matbench import find_matbench_file

    current = os.environ.get("MATMINER_DATA")
    if current:
        if not (Path(current) / f"{task}.json.gz").is_file():
            raise BenchmarkError(
                f"MATMINER_DATA={current} has no {task}.json.gz; matbench would try to download it. "
                "Unset MATMINER_DATA (matfusion then uses <data_dir>/matbench) or point it at the "
                "folder that holds the file"
            )
        return current
    path = find_matbench_file(task, data_dir)
    if path is None or not path.name.endswith(".json.gz"):
        raise BenchmarkError(
            f"no {task}.json.gz under the data dir {data_dir} (looked in <data_dir>/matbench/ and "
            "<data_dir>/); matbench needs it to score the predictions"
        )
    os.environ["MATMINER_DATA"] = str(path.parent)
    return str(path.parent)


def _hash_ok(d: dict) -> bool:
    from matbench.util import hash_dictionary

    d = dict(d)
    stored = d.pop("hash", None)
    return stored is not None and hash_dictionary(d) == stored


def read_results_dict(path: Path) -> dict:
    """The dict in a results file (gzip or plain JSON, as matbench 0.6's ``to_file`` writes it)."""
    raw = Path(path).read_bytes()
    try:
        text = gzip.decompress(raw).decode() if raw[:2] == b"\x1f\x8b" else raw.decode()
        return json.loads(text)
    except (OSError, ValueError) as err:
        raise BenchmarkError(f"{path}: not a matbench results file ({err})") from None


def load_results(path: Path):
    """A ``MatbenchBenchmark`` read back from ``path`` with matbench's own validation
    (``from_dict``: hash check and every task validated, so every fold must be recorded)."""
    from matbench.bench import MatbenchBenchmark

    return MatbenchBenchmark.from_dict(read_results_dict(path))


def open_benchmark(task: str, path: Path):
    """A ``MatbenchBenchmark(autoload=False, subset=[task])``, with the folds already recorded in
    ``path`` (if it exists) restored.  A partial file cannot go through matbench's ``from_dict``
    (it validates complete tasks only), so its hash is checked here and the task's results are
    set directly."""
    from matbench.bench import MatbenchBenchmark
    from matbench.util import RecursiveDotDict

    mb = MatbenchBenchmark(autoload=False, subset=[task])
    if not Path(path).is_file():
        return mb
    d = read_results_dict(path)
    if not _hash_ok(d):
        raise BenchmarkError(
            f"{path}: its hash does not match its content (modified or truncated); move it aside "
            "to start the benchmark afresh"
        )
    tasks = d.get("tasks") or {}
    if set(tasks) != {task}:
        raise BenchmarkError(f"{path} holds results of {sorted(tasks)}, not {task}; use another --out")
    mb.tasks_map[task].results = RecursiveDotDict(tasks[task]["results"])
    mb.user_metadata = d.get("user_metadata") or {}
    return mb


def write_results(mb, path: Path) -> Path:
    """``mb.as_dict()`` (what matbench's ``to_file`` writes) as gzip JSON, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with gzip.open(tmp, "wt") as fh:
        json.dump(mb.as_dict(), fh)
    os.replace(tmp, path)
    return path


def recorded_folds(mb, task: str) -> list[int]:
    return [k for k, done in mb.tasks_map[task].is_recorded.items() if done]


def fold_scores(mb, task: str) -> dict:
    """fold -> matbench's scores dict (mae, rmse, mape, max_error) of every recorded fold."""
    t = mb.tasks_map[task]
    return {k: dict(t.results[t.folds_map[k]]["scores"]) for k in recorded_folds(mb, task)}


def check_alignment(mb_task, dataset) -> dict[int, list[str]]:
    """Check that our rows line up with matbench's: for every official fold, matbench's test ids
    (in ``get_test_data`` order) are exactly our fold's test ids, and the targets agree.  Returns
    fold -> matbench's test ids in matbench's order.  Raises :class:`BenchmarkError` naming the
    first mismatch (e.g. a test row our loader skipped)."""
    if dataset.official_folds is None:
        raise BenchmarkError(f"{dataset.name}: no official folds attached to the dataset")
    pos = {rid: i for i, rid in enumerate(dataset.ids)}
    target = mb_task.metadata.target
    out = {}
    for k in mb_task.folds:
        test_df = mb_task.get_test_data(k, as_type="df", include_target=True)
        ids = [str(i) for i in test_df.index]
        if ids != [str(i) for i in mb_task.validation[mb_task.folds_map[k]].test]:
            raise BenchmarkError(
                f"{dataset.name} fold {k}: matbench's get_test_data order differs from its validation ids"
            )
        missing = [i for i in ids if i not in pos]
        if missing:
            raise BenchmarkError(
                f"{dataset.name} fold {k}: {len(missing)} of matbench's test rows are not in our "
                f"dataset (first: {missing[0]}); every test row must be predicted. Rows our loader "
                f"skipped: {dict(dataset.skipped) or 'none'} (disordered structures: set "
                "data.disordered: majority)"
            )
        ours = sorted(dataset.ids[p] for p in dataset.official_folds[k])
        if ours != sorted(ids):
            raise BenchmarkError(
                f"{dataset.name} fold {k}: our fold's test ids differ from matbench's "
                f"({len(set(ours) ^ set(ids))} ids differ)"
            )
        y_mb = np.asarray(test_df[target], dtype=np.float64)
        y_ours = np.asarray(dataset.targets, dtype=np.float64)[[pos[i] for i in ids]]
        bad = np.flatnonzero(~np.isclose(y_mb, y_ours, rtol=1e-7, atol=1e-9))
        if len(bad):
            i = int(bad[0])
            raise BenchmarkError(
                f"{dataset.name} fold {k}: target of {ids[i]} is {y_ours[i]!r} in our rows and "
                f"{y_mb[i]!r} in matbench's; the rows do not line up"
            )
        out[k] = ids
    return out
