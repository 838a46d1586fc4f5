"""``matfusion benchmark TASK``: nested cross-validation over matbench's 5 official folds.

For every official fold k of a matbench v0.1 regression task:

1. **Search** (:func:`~matfusion.search.tuner.run_search`) on the fold's training part only:
   the search splits it into train + inner validation and never trains, selects or early-stops
   on the fold's test part.  Its budget is the config's ``search.time_budget_s`` (per fold).
2. **Stack** the best trials of that search (top ``ensemble.k`` per group, at most
   ``benchmark.max_groups`` groups) out of fold on exactly the rows the search saw
   (:class:`~matfusion.ensembles.stacking.StackedEnsemble`).
3. **Predict** every test row of the fold and ``record`` the predictions (and the ensemble's
   std) in a matbench ``MatbenchBenchmark``; ``results.json.gz`` is rewritten after every fold.
4. Write the fold's files under ``<out>/fold_<k>/`` (predictions, trials, member metrics,
   feature importances, the rows used: ``rows.json``) and log them to MLflow: the fold's
   search parent run is the fold's parent run; the ensemble is a nested run of it.

Row alignment: our rows are read from ``<task>.json.gz`` with ids ``mb-<task>-NNNN``; the
test ids of each fold are matbench's own (``MatbenchTask.validation``), and before anything runs
every fold's test ids and targets are checked against matbench's ``get_test_data`` (same ids,
same targets), so predictions are recorded in matbench's order for matbench's ids.

Leakage guards (checked, not assumed): the search's dataset, fold and split are rebuilt here with
the search's own functions and checked against the search run's logged dataset hash and sizes;
the rows given to the stacking and every row the fitted ensemble reports having trained on, early
stopped on or fitted the meta-learner on must be disjoint from matbench's test ids of the fold,
else the fold fails before anything is recorded.  ``rows.json`` lists them by id.

Resume: a fold recorded in ``results.json.gz`` is skipped; a fold whose search completed is
stacked from that search's MLflow run; a fold whose search was interrupted continues it
(``run_search(resume=True)``).  ``benchmark_state.json`` keeps the per-fold progress and the
settings the benchmark started with (a different config in the same ``--out`` is refused).

Composition-only tasks (e.g. matbench_expt_gap): no crystal graphs; only the tabular families
(:data:`matfusion.config.TABULAR_FAMILIES`) are searched, and the config's graph families are
left out with a message.

``results.json.gz`` holds exactly what matbench's ``MatbenchBenchmark.as_dict()`` returns (what
its ``to_file`` writes), gzip-compressed as the name says.  matbench 0.6's ``from_file`` opens
files as plain text; :func:`load_results` reads both and validates with matbench's ``from_dict``.
"""
from __future__ import annotations

import argparse
import gzip
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from ..config import TABULAR_FAMILIES

RESULTS_FILE = "results.json.gz"
STATE_FILE = "benchmark_state.json"
REPORT_FILE = "report.md"
N_OFFICIAL_FOLDS = 5
# config keys that may differ between the first call of a benchmark and its resumption
_RESUME_FREE_KEYS = ("data.data_dir", "features.n_jobs", "features.cache_dir", "search.address",
                     "search.storage_path", "mlflow.")


class BenchmarkError(ValueError):
    """A benchmark that cannot run as asked; the message names the task, fold or key."""


@dataclass
class BenchmarkResult:
    task: str
    out_dir: Path
    results_path: Path
    folds_run: list = field(default_factory=list)       # folds recorded by this call
    folds_skipped: list = field(default_factory=list)   # already recorded before this call
    summaries: dict = field(default_factory=dict)       # fold -> summary dict (this call's folds)
    fold_mae: dict = field(default_factory=dict)        # fold -> test MAE, every recorded fold
    interrupted: bool = False
    report_path: Optional[Path] = None
    wall_s: float = 0.0

    @property
    def mean_mae(self) -> float:
        return float(np.mean(list(self.fold_mae.values()))) if self.fold_mae else float("nan")


def _say(progress: bool):
    return (lambda *a: print(*a, flush=True)) if progress else (lambda *a: None)


# -- families -----------------------------------------------------------------------------------

def composition_only_families(families: Sequence[str], task: str) -> tuple[list, list]:
    """(kept, dropped): the tabular families of ``families`` and the others; raises
    :class:`BenchmarkError` when none is tabular."""
    kept = [f for f in families if f in TABULAR_FAMILIES]
    dropped = [f for f in families if f not in TABULAR_FAMILIES]
    if not kept:
        raise BenchmarkError(f"{task} has compositions only (no crystal structures), and none of search.families "
                             f"{list(families)} works without structures; add a composition family: "
                             f"{', '.join(TABULAR_FAMILIES)}")
    return kept, dropped


# -- matbench -----------------------------------------------------------------------------------

def parse_folds(text: Optional[str]) -> Optional[list[int]]:
    """``"0,1,3"`` -> [0, 1, 3]; None -> None (all folds).  Names a bad item."""
    if text is None or str(text).strip() == "":
        return None
    folds = []
    for item in str(text).split(","):
        item = item.strip()
        try:
            k = int(item)
        except ValueError:
            raise BenchmarkError(f"--folds: {item!r} is not a fold number (0..{N_OFFICIAL_FOLDS - 1})") from None
        if not 0 <= k < N_OFFICIAL_FOLDS:
            raise BenchmarkError(f"--folds: fold {k} does not exist (matbench has folds 0..{N_OFFICIAL_FOLDS - 1})")
        if k not in folds:
            folds.append(k)
    return sorted(folds)


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
            raise BenchmarkError(f"MATMINER_DATA={current} has no {task}.json.gz; matbench would try to download it. "
                                 "Unset MATMINER_DATA (matfusion then uses <data_dir>/matbench) or point it at the "
                                 "folder that holds the file")
        return current
    path = find_matbench_file(task, data_dir)
    if path is None or not path.name.endswith(".json.gz"):
        raise BenchmarkError(f"no {task}.json.gz under the data dir {data_dir} (looked in <data_dir>/matbench/ and "
                             "<data_dir>/); matbench needs it to score the predictions")
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
        raise BenchmarkError(f"{path}: its hash does not match its content (modified or truncated); move it aside "
                             "to start the benchmark afresh")
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
            raise BenchmarkError(f"{dataset.name} fold {k}: matbench's get_test_data order differs from its "
                                 "validation ids")
        missing = [i for i in ids if i not in pos]
        if missing:
            raise BenchmarkError(f"{dataset.name} fold {k}: {len(missing)} of matbench's test rows are not in our "
                                 f"dataset (first: {missing[0]}); every test row must be predicted. Rows our loader "
                                 f"skipped: {dict(dataset.skipped) or 'none'} (disordered structures: set "
                                 "data.disordered: majority)")
        ours = sorted(dataset.ids[p] for p in dataset.official_folds[k])
        if ours != sorted(ids):
            raise BenchmarkError(f"{dataset.name} fold {k}: our fold's test ids differ from matbench's "
                                 f"({len(set(ours) ^ set(ids))} ids differ)")
        y_mb = np.asarray(test_df[target], dtype=np.float64)
        y_ours = np.asarray(dataset.targets, dtype=np.float64)[[pos[i] for i in ids]]
        bad = np.flatnonzero(~np.isclose(y_mb, y_ours, rtol=1e-7, atol=1e-9))
        if len(bad):
            i = int(bad[0])
            raise BenchmarkError(f"{dataset.name} fold {k}: target of {ids[i]} is {y_ours[i]!r} in our rows and "
                                 f"{y_mb[i]!r} in matbench's; the rows do not line up")
        out[k] = ids
    return out


# -- config ---------------------------------------------------------------------------------------

def prepare_config(cfg, task: str):
    """The config a benchmark of ``task`` runs with: ``data.source`` set to the task (the name
    gets the task appended when the config named another source).  ``data.limit`` is refused:
    it would drop test rows; ``benchmark.train_limit`` limits the training rows instead."""
    from ..config import ConfigError

    if cfg.data.limit is not None:
        raise ConfigError(f"data.limit ({cfg.data.limit}) would also drop test rows of the folds; in a benchmark "
                          "use benchmark.train_limit (training rows per fold; every test row is predicted)")
    update = {}
    if cfg.data.source != task:
        update["name"] = f"{cfg.name}-{task}"
        print(f"benchmark of {task}: data.source {cfg.data.source!r} of the config replaced by {task}", flush=True)
    data = cfg.data.model_copy(update={"source": task, "target": None})
    return cfg.model_copy(update={**update, "data": data})


def _flat(cfg) -> dict:
    from ..search.mlflow_logging import flatten

    return {k: v for k, v in flatten(cfg.model_dump(mode="json")).items()
            if not any(k == p or k.startswith(p) for p in _RESUME_FREE_KEYS) and k != "data.fold"}


def fold_config(cfg, fold: int, n_rows: int, n_test: int):
    """The search config of one fold: ``data.fold``, the search name ``<name>-fold<k>``, the
    MLflow experiment (``mlflow.experiment`` or the benchmark's name), no ensemble step of its
    own, and, with ``benchmark.train_limit``, ``data.limit`` sized so that the fold's training
    part of the seeded subset has about that many rows (the subset's test rows are held out by
    the search as always)."""
    from ..config import config_from_dict

    raw = cfg.model_dump(mode="json")
    raw["name"] = f"{cfg.name}-fold{fold}"
    raw["data"]["fold"] = fold
    raw["data"]["limit"] = None
    n_train = n_rows - n_test
    limit = cfg.benchmark.train_limit
    if limit is not None and limit < n_train:
        raw["data"]["limit"] = min(n_rows, int(math.ceil(limit * n_rows / n_train)))
    raw["mlflow"]["experiment"] = cfg.mlflow.experiment or cfg.name
    raw["ensemble"]["enabled"] = False
    return config_from_dict(raw, origin=f"benchmark fold {fold}")


# -- state ----------------------------------------------------------------------------------------

def read_state(out: Path) -> dict:
    try:
        return json.loads((out / STATE_FILE).read_text())
    except FileNotFoundError:
        return {}
    except ValueError as err:
        raise BenchmarkError(f"{out / STATE_FILE} is not valid JSON ({err}); move it aside to start afresh") from None


def write_state(out: Path, state: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".{STATE_FILE}.tmp"
    tmp.write_text(json.dumps(state, indent=2, default=str))
    os.replace(tmp, out / STATE_FILE)


def _check_same_settings(state: dict, settings: dict, out: Path) -> None:
    before = state.get("settings")
    if not before:
        return
    keys = sorted(set(before) | set(settings))
    diff = [k for k in keys if before.get(k) != settings.get(k)]
    if diff:
        shown = ", ".join(f"{k}: {before.get(k)!r} then, {settings.get(k)!r} now" for k in diff[:5])
        raise BenchmarkError(f"{out} holds a benchmark started with other settings ({shown}"
                             f"{'' if len(diff) <= 5 else f', and {len(diff) - 5} more'}); resume it with the same "
                             "config, or pass another --out")


# -- importances ------------------------------------------------------------------------------------

def _mae(pred, y) -> float:
    return float(np.mean(np.abs(np.asarray(pred, dtype=np.float64) - y)))


def uses_modalities(config: dict) -> tuple[bool, bool]:
    """(uses the crystal graph, uses the Magpie vector) of a member config."""
    family = config.get("family")
    if family in TABULAR_FAMILIES:
        return False, True
    fusion = str((config.get(family) or {}).get("fusion", "none"))
    return True, fusion in ("early", "attention", "late")


def modality_importance(ensemble, magpie: np.ndarray, graphs, targets: np.ndarray, rows: Sequence[int],
                        repeats: int = 3, seed: int = 0) -> dict:
    """Permutation importance of the two modalities on ``rows``: the rise in MAE when the crystal
    graphs (or the Magpie vectors) are shuffled across the rows while the other input stays in
    place, for every member that uses both (fused models) and for the whole ensemble.
    ``{"base_mae": {...}, "graph": {...}, "magpie": {...}}`` keyed by member name and
    ``ensemble``; each value the mean over ``repeats`` shuffles."""
    from ..trainables.trial_data import pack_rows

    rows = np.asarray(rows, dtype=np.int64)
    y = np.asarray(targets, dtype=np.float64)[rows]
    base_part = pack_rows(magpie, graphs, targets, rows)
    base = ensemble.part_outputs(base_part, magpie, rows)
    uses = [uses_modalities(m) for m in ensemble.members]
    fused = [j for j, (g, m) in enumerate(uses) if g and m]
    names = ["ensemble"] + [ensemble.names_[j] for j in fused]

    def scores(out):
        return {"ensemble": _mae(out["mean"], y), **{ensemble.names_[j]: _mae(out["members"][:, j], y) for j in fused}}

    base_scores = scores(base)
    out = {"base_mae": base_scores, "graph": dict.fromkeys(names, 0.0), "magpie": dict.fromkeys(names, 0.0),
           "repeats": repeats, "n_rows": int(len(rows)), "fused_members": [ensemble.names_[j] for j in fused]}
    if graphs is None or repeats < 1:
        return out
    rng = np.random.default_rng([seed, 4242])
    for _ in range(repeats):
        perm = rng.permutation(len(rows))
        # graphs shuffled, Magpie in place
        part = pack_rows(magpie, graphs, targets, rows[perm])
        part.update(magpie=base_part["magpie"], y=base_part["y"], row=rows)
        s = scores(ensemble.part_outputs(part, magpie, rows, [j for j, u in enumerate(uses) if u[0]], base))
        for n in names:
            out["graph"][n] += (s[n] - base_scores[n]) / repeats
        # Magpie shuffled, graphs in place
        part = dict(base_part, magpie=np.ascontiguousarray(base_part["magpie"][perm]))
        s = scores(ensemble.part_outputs(part, magpie, rows, [j for j, u in enumerate(uses) if u[1]], base))
        for n in names:
            out["magpie"][n] += (s[n] - base_scores[n]) / repeats
    return out


def rf_importance(ensemble, magpie: np.ndarray, targets: np.ndarray, rows: Sequence[int], columns: Sequence[str],
                  repeats: int = 3, seed: int = 0) -> Optional[dict]:
    """Of the ensemble's first ``rf`` member (else its first tabular member), over its K fold
    models: the impurity importance of each descriptor (Magpie) column, mean over the fold models
    (where the models have ``feature_importances_``), and, with ``repeats`` > 0, the permutation
    importance on ``rows``: the rise in MAE of the member's fold-averaged prediction when one
    column is shuffled across the rows.  None without a tabular member."""
    from ..trainables.trial import predict_from_state

    candidates = [i for i, m in enumerate(ensemble.members) if m.get("family") == "rf"]
    candidates += [i for i, m in enumerate(ensemble.members) if m.get("family") in TABULAR_FAMILIES and i not in candidates]
    if not candidates:
        return None
    j = candidates[0]
    family = ensemble.members[j]["family"]
    states = [fold_states[j] for fold_states in ensemble.fold_states_]
    configs = [ensemble._member_config(j, k) for k in range(len(states))]
    width = magpie.shape[1]
    names = list(columns) if len(columns) == width else [f"feature_{i}" for i in range(width)]
    impurity = None
    models = [st.get(family) for st in states]
    if all(isinstance(m, (list, tuple)) and m and hasattr(m[0], "feature_importances_") for m in models):
        impurity = np.mean([m[0].feature_importances_ for m in models], axis=0).tolist()
    out = {"member": ensemble.names_[j], "family": family, "columns": names, "impurity": impurity,
           "permutation": None, "repeats": repeats}
    if repeats < 1:
        return out
    rows = np.asarray(rows, dtype=np.int64)
    y = np.asarray(targets, dtype=np.float64)[rows]
    X = np.array(magpie[rows], dtype=np.float64)

    def predict(x):
        part = {"magpie": x, "y": y, "row": rows}
        return np.mean([np.asarray(predict_from_state(c, st, part, ensemble.graph_params_), dtype=np.float64)
                        .reshape(len(rows)) for c, st in zip(configs, states)], axis=0)

    base = _mae(predict(X), y)
    rng = np.random.default_rng([seed, 777])
    perm_imp = np.zeros(width)
    for c in range(width):
        original = X[:, c].copy()
        for _ in range(repeats):
            X[:, c] = original[rng.permutation(len(rows))]
            perm_imp[c] += (_mae(predict(X), y) - base) / repeats
        X[:, c] = original
    out["permutation"] = perm_imp.tolist()
    out["base_mae"] = base
    return out


# -- one fold: matfusion.benchmark.fold.run_fold ------------------------------------------------------

# -- the benchmark ------------------------------------------------------------------------------------

def run_benchmark(cfg, task: str, folds: Optional[Sequence[int]] = None, out: Optional[Path] = None,
                  progress: bool = True, report: bool = True) -> BenchmarkResult:
    """Run (or resume) the benchmark of ``task`` over ``folds`` (default all 5); see the module
    docstring.  Returns what was recorded; ``interrupted`` when a search was interrupted."""
    from matbench.constants import MBV01_KEY  # noqa: F401 - fails early without matbench

    from ..data import default_data_dir, load_dataset

    t0 = time.time()
    say = _say(progress)
    import logging

    logging.getLogger("matbench").setLevel(logging.WARNING)  # its INFO lines would drown the progress output
    check_task(task)
    cfg = prepare_config(cfg, task)
    out = Path(out) if out else Path("results") / task
    out.mkdir(parents=True, exist_ok=True)
    folds = list(range(N_OFFICIAL_FOLDS)) if folds is None else sorted(set(int(k) for k in folds))
    data_dir = Path(cfg.data.data_dir) if cfg.data.data_dir else default_data_dir()
    say(f"matbench data for scoring: MATMINER_DATA={ensure_matminer_data(task, data_dir)}")

    full = load_dataset(cfg.data, seed=cfg.search.seed)
    say(full.summary())
    if not full.has_structures:
        kept, dropped = composition_only_families(cfg.search.families, task)
        if dropped:
            say(f"{task} has compositions only (no crystal structures): searching the composition (tabular) "
                f"families {', '.join(kept)} only; left out {', '.join(dropped)}")
            raw = cfg.model_dump(mode="json")
            raw["search"]["families"] = kept
            raw["search"]["space"] = {k: v for k, v in (raw["search"].get("space") or {}).items()
                                      if k.split(".")[0] in kept}
            from ..config import config_from_dict

            cfg = config_from_dict(raw, origin=f"benchmark of {task} (composition families)")

    state = read_state(out)
    settings = _flat(cfg)
    if state.get("task") not in (None, task):
        raise BenchmarkError(f"{out} holds a benchmark of {state.get('task')}, not {task}; use another --out")
    _check_same_settings(state, settings, out)
    state.update(task=task, config_name=cfg.name, settings=state.get("settings") or settings,
                 dataset_hash=full.content_hash)
    if state.get("dataset_hash_first") not in (None, full.content_hash):
        raise BenchmarkError(f"{out}: the data of {task} changed since this benchmark started; use another --out")
    state.setdefault("dataset_hash_first", full.content_hash)
    write_state(out, state)

    results_path = out / RESULTS_FILE
    mb = open_benchmark(task, results_path)
    done = recorded_folds(mb, task)
    result = BenchmarkResult(task=task, out_dir=out, results_path=results_path)
    todo = [k for k in folds if k not in done]
    result.folds_skipped = [k for k in folds if k in done]
    for k in result.folds_skipped:
        say(f"fold {k}: already recorded in {results_path}; skipped")
    if todo:
        mb_task = mb.tasks_map[task]
        mb_task.load()
        test_ids = check_alignment(mb_task, full)
        say(f"matbench's test rows line up with ours on all {len(test_ids)} folds (ids and targets)")
        if not mb.user_metadata:
            from .. import __version__

            mb.add_metadata({"algorithm": "matfusion", "matfusion_version": __version__, "config": cfg.name,
                             "description": "Ray Tune + Optuna TPE + ASHA search over RF on Magpie and "
                             "CGCNN/ALIGNN (fused with Magpie), out-of-fold stacked ensemble per fold"})
        from ..benchmark.fold import run_fold  # here: fold.py imports this module

        for k in todo:
            summary = run_fold(cfg, task, k, full, mb, test_ids[k], out, state, progress=progress)
            if summary is None:
                result.interrupted = True
                break
            result.folds_run.append(k)
            result.summaries[k] = summary
    result.fold_mae = {k: float(s["mae"]) for k, s in fold_scores(mb, task).items()}
    if report and result.fold_mae:
        from .report import write_report

        result.report_path = write_report(out)
        say(f"report: {result.report_path}")
    result.wall_s = time.time() - t0
    return result


def format_result(res: BenchmarkResult) -> str:
    lines = [f"\nBenchmark of {res.task}: {len(res.fold_mae)}/{N_OFFICIAL_FOLDS} folds recorded in {res.results_path}"]
    for k in sorted(res.fold_mae):
        tag = " (this run)" if k in res.folds_run else ""
        lines.append(f"  fold {k}: test MAE {res.fold_mae[k]:.4g}{tag}")
    if res.fold_mae:
        lines.append(f"  mean over {len(res.fold_mae)} fold(s): {res.mean_mae:.4g}"
                     + ("" if len(res.fold_mae) == N_OFFICIAL_FOLDS else " (not comparable to the leaderboard until "
                                                                        "all 5 folds are recorded)"))
    if res.interrupted:
        lines.append("interrupted: run the same command again to resume at the first unfinished fold")
    if res.report_path:
        lines.append(f"report: {res.report_path}")
    lines.append(f"wall time {res.wall_s:.0f} s")
    return "\n".join(lines)


# -- CLI -----------------------------------------------------------------------------------------------

BENCHMARK_EPILOG = """\
examples:
  matfusion benchmark matbench_phonons --config configs/benchmark.yaml
  matfusion benchmark matbench_phonons --config configs/benchmark.yaml --folds 0 --out results/try
  matfusion benchmark matbench_dielectric --config configs/benchmark_dielectric.yaml
  matfusion benchmark matbench_expt_gap --config configs/benchmark.yaml    composition only: the tabular families
  matfusion report results/matbench_phonons

Per fold: search the fold's training part (budget search.time_budget_s), stack the best trials
(ensemble.k per family/fusion, benchmark.max_groups groups at most), predict every test row,
record it in matbench and rewrite <out>/results.json.gz.  Running the same command again resumes
at the first unfinished fold (recorded folds are skipped).  One MLflow parent run per fold (the
fold's search; the ensemble is nested in it).  Exit status 130 when a search was interrupted.
"""


def add_parsers(subparsers) -> None:
    """Register ``benchmark`` and ``report`` on the main parser's subparsers."""
    fmt = argparse.RawDescriptionHelpFormatter
    p = subparsers.add_parser(
        "benchmark", formatter_class=fmt, epilog=BENCHMARK_EPILOG,
        help="nested cross-validation over matbench's 5 official folds: search, stack, record results.json.gz",
        description="Benchmark matfusion on a matbench v0.1 task: for each official fold, a search on the fold's\n"
        "training part, a stacked ensemble, and its predictions of the test fold recorded with matbench.")
    p.add_argument("task", help="matbench task, e.g. matbench_phonons")
    p.add_argument("--config", required=True, help="YAML config (see configs/benchmark.yaml)")
    p.add_argument("--folds", default=None, help="comma-separated folds to run, e.g. 0,1 (default: all 5)")
    p.add_argument("--out", default=None, help="output folder (default: results/<task>)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set search.time_budget_s=180 (repeatable)")
    p.add_argument("--data-dir", help="folder with the datasets (default: $MATFUSION_DATA or ../shared/data)")
    p.add_argument("--no-report", action="store_true", help="do not write the report at the end")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    p.set_defaults(func=cmd_benchmark)

    p = subparsers.add_parser(
        "report", formatter_class=fmt, help="write the markdown report + plots of a benchmark folder",
        description="Write <out>/report.md and its PNGs from the files `matfusion benchmark` wrote there\n"
        "(results.json.gz, fold_<k>/*): per-fold and mean MAE next to the matbench leaderboard, model\n"
        "families, parity plots, search history, feature and modality importances.",
        epilog="example: matfusion report results/matbench_phonons")
    p.add_argument("out", metavar="DIR", help="benchmark output folder, e.g. results/matbench_phonons")
    p.set_defaults(func=cmd_report)


def cmd_benchmark(args) -> int:
    from ..config import load_config

    overrides = list(args.overrides)
    if args.data_dir:
        overrides.append(f"data.data_dir={args.data_dir}")
    try:
        folds = parse_folds(args.folds)
        cfg = load_config(args.config, overrides)
        res = run_benchmark(cfg, args.task, folds=folds, out=Path(args.out) if args.out else None,
                            progress=not args.quiet, report=not args.no_report)
    except BenchmarkError as err:
        print(f"matfusion benchmark: error: {err}", file=sys.stderr)
        return 2
    print(format_result(res), flush=True)
    return 130 if res.interrupted else 0


def cmd_report(args) -> int:
    from .report import write_report

    try:
        path = write_report(Path(args.out))
    except BenchmarkError as err:
        print(f"matfusion report: error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0
