"""Datasets, folds, featurizers and the feature cache.

- ``dataset``: the in-memory :class:`Dataset` and the row checks every loader shares
- ``tables`` / ``matbench``: loaders (user tables and CIF folders; matbench tasks), and the public
  parsers of one structure (``tables.parse_structure``, ``tables.parse_structure_file``)
- ``folds``: outer folds and the inner train/validation split
- ``descriptors``: the descriptor-set registry (Magpie is one entry) and the descriptor matrix
- ``crystal_graph`` / ``line_graph``: neighbour graphs, their packing, ALIGNN's line graph
- ``parallel``: the one parallel map both featurizers use
- ``featurize``: graphs + descriptor matrix + cache for a dataset (``cache``: the on-disk store)
- ``distributed``: featurization shards as Ray tasks (``features.backend: ray``; imported only then)

Imports run one way: ``featurize`` -> ``descriptors`` / ``crystal_graph`` / ``line_graph`` /
``distributed`` (lazily) -> ``parallel`` / ``cache``; no module imports ``featurize``.
"""

from .dataset import DataError, Dataset, default_data_dir
from .folds import FoldSplit, limit_rows, outer_folds, split_fold

__all__ = [
    "DataError",
    "Dataset",
    "FoldSplit",
    "default_data_dir",
    "limit_rows",
    "outer_folds",
    "split_fold",
    "load_dataset",
]


def _is_task_name(source: str) -> bool:
    return source.startswith("matbench_") and "/" not in source and "\\" not in source


def _task_file_exists(source: str, data_dir) -> bool:
    from .matbench import find_matbench_file

    try:
        return find_matbench_file(source, data_dir) is not None
    except DataError:  # no data dir at all: said below if the source is not a folder either
        return False


def _load_task(source: str, data_config, data_dir) -> Dataset:
    from .matbench import load_matbench

    ds = load_matbench(source, data_dir, disordered=data_config.disordered)
    if data_config.target and data_config.target != ds.target_name:
        raise DataError(
            f"{source}: target {data_config.target!r} does not exist; the task's target is {ds.target_name!r}"
        )
    return ds


def load_dataset(data_config, seed: int = 0) -> Dataset:
    """Load what ``data_config.source`` names: a matbench task, a CSV/JSON table or a CIF folder.
    Applies ``limit`` (seeded subset)."""
    from pathlib import Path

    source = data_config.source
    data_dir = Path(data_config.data_dir) if data_config.data_dir else None
    path = Path(source).expanduser()
    # a task name is the task even beside a same-named folder (a benchmark's --out, say);
    # ./matbench_x means the folder
    is_task = _is_task_name(source) and _task_file_exists(source, data_dir)
    if not is_task and not path.exists() and not path.is_absolute() and not source.startswith("matbench_"):
        # a relative path is looked up in the working directory, then in the data dir
        base = data_dir if data_dir is not None else default_data_dir()
        if (base / path).exists():
            path = base / path
    if is_task:
        ds = _load_task(source, data_config, data_dir)
    elif path.is_dir():
        from .tables import load_cif_folder

        ds = load_cif_folder(path, disordered=data_config.disordered)
    elif path.is_file():
        if not data_config.target:
            raise DataError(f"data.target is required for a table source ({source}): name the target column")
        from .tables import load_table

        ds = load_table(
            path,
            target=data_config.target,
            structure_column=data_config.structure_column,
            id_column=data_config.id_column,
            disordered=data_config.disordered,
        )
    elif source.startswith("matbench_"):
        if data_dir is None:
            default_data_dir()  # raises a clear error when no data dir exists at all
        ds = _load_task(source, data_config, data_dir)
    else:
        raise DataError(
            f"data.source {source!r}: not a matbench task name (matbench_*), nor an existing file or folder"
        )
    return limit_rows(ds, data_config.limit, seed=seed)
