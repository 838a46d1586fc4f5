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

``results.json.gz`` and the matbench side: :mod:`matfusion.benchmark.matbench_io`; importances:
:mod:`matfusion.benchmark.importances`; the report: :mod:`matfusion.benchmark.report`.
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from ..config import TABULAR_FAMILIES
from .base import N_OFFICIAL_FOLDS, REPORT_FILE, RESULTS_FILE, STATE_FILE, BenchmarkError
from .importances import modality_importance, rf_importance
from .matbench_io import (check_alignment, check_task, ensure_matminer_data, fold_scores, open_benchmark,
                          recorded_folds, write_results)

__all__ = ["BenchmarkError", "BenchmarkResult", "N_OFFICIAL_FOLDS", "REPORT_FILE", "RESULTS_FILE", "STATE_FILE",
           "composition_only_families", "fold_config", "format_result", "parse_folds", "prepare_config",
           "read_state", "run_benchmark", "write_state"]

# config keys that may differ between the first call of a benchmark and its resumption
_RESUME_FREE_KEYS = ("data.data_dir", "features.n_jobs", "features.cache_dir", "search.address",
                     "search.storage_path", "mlflow.")


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


# -- folds --------------------------------------------------------------------------------------

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
    from ..tracking.logger import flatten

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


# -- one fold ---------------------------------------------------------------------------------------

def _search_dataset(full, fold_cfg):
    """The dataset the fold's search loads (``load_dataset`` = the task, then ``limit_rows``)."""
    from ..data import limit_rows

    return limit_rows(full, fold_cfg.data.limit, seed=fold_cfg.search.seed)


def _check_search_run(client, parent_id: str, search_ds, split) -> None:
    """The search run was made on the dataset and split rebuilt here (hash and sizes)."""
    run = client.get_run(parent_id)
    tags, params = run.data.tags, run.data.params
    if tags.get("dataset_hash") != search_ds.content_hash or tags.get("fold") != str(split.fold):
        raise BenchmarkError(f"search run {parent_id}: dataset hash/fold {tags.get('dataset_hash')}/{tags.get('fold')} "
                             f"differ from the rebuilt {search_ds.content_hash}/{split.fold}")
    for key, n in (("n_train", len(split.train)), ("n_val", len(split.val)), ("n_test", len(split.test))):
        if params.get(key) not in (None, str(n)):
            raise BenchmarkError(f"search run {parent_id}: {key} {params.get(key)} logged, {n} rebuilt")


def stacked_groups(ordered: list[str], max_groups: int, graph_member: bool = False) -> list[str]:
    """The first ``max_groups`` of ``ordered`` (groups, best inner-val MAE first); with
    ``graph_member`` the best graph-model group is added when none of them is one."""
    groups = list(ordered[:max_groups])
    graph_groups = [g for g in ordered if g not in TABULAR_FAMILIES]
    if graph_member and graph_groups and not set(groups) & set(graph_groups):
        groups.append(graph_groups[0])
    return groups


def _select(client, experiment_id: str, parent_id: str, k: int, families, max_groups: Optional[int],
            graph_member: bool = False):
    """The stack's members: the best ``max_groups`` groups by inner-validation MAE; with
    ``graph_member``, plus the best graph-model group if none of those is one."""
    from ..ensembles.select import load_trial_config, ranked_candidates

    chosen = ranked_candidates(client, experiment_id, parent_id, k=k, families=families)
    if chosen.empty:
        raise BenchmarkError(f"search run {parent_id} has no finished trial with a val_mae"
                             f" among families {', '.join(families)}")
    if max_groups:
        groups = stacked_groups(list(dict.fromkeys(chosen["group"])), max_groups, graph_member)
        chosen = chosen[chosen["group"].isin(groups)].reset_index(drop=True)
    return chosen, [load_trial_config(client, run_id) for run_id in chosen["run_id"]]


def _leak_check(where: str, ids, test_ids: set) -> None:
    leaked = sorted(set(ids) & test_ids)
    if leaked:
        raise BenchmarkError(f"{where}: {len(leaked)} test-fold rows would be used (first: {leaked[0]}); "
                             "refusing to record this fold")


def run_fold(cfg, task: str, fold: int, full, mb, test_ids: list[str], out: Path, state: dict,
             progress: bool = True) -> Optional[dict]:
    """Search, stack, predict, record one fold (see the module docstring).  Returns the fold's
    summary, or None when the search was interrupted (resumable)."""
    import pandas as pd
    from mlflow.tracking import MlflowClient

    from ..data import split_fold
    from ..data.featurize import featurize
    from ..ensembles.evaluate import evaluate_ensemble, log_evaluation
    from ..ensembles.stacking import StackedEnsemble
    from ..search.tuner import run_search
    from ..tracking.leaderboard import search_trials
    from ..tracking.logger import resolve_tracking_uri

    say = _say(progress)
    t_fold = time.time()
    fold_dir = out / f"fold_{fold}"
    fold_dir.mkdir(parents=True, exist_ok=True)
    test_set = set(test_ids)
    fcfg = fold_config(cfg, fold, len(full), len(test_ids))
    search_ds = _search_dataset(full, fcfg)
    split = split_fold(search_ds, fold, fcfg.data.val_fraction, seed=fcfg.search.seed, n_folds=fcfg.data.n_folds)
    search_train_ids = [search_ds.ids[r] for r in split.train]
    search_val_ids = [search_ds.ids[r] for r in split.val]
    _leak_check(f"fold {fold} search", search_train_ids + search_val_ids, test_set)
    say(f"\n=== {task} fold {fold}: search on {len(split.train)} train + {len(split.val)} inner-val rows "
        + (f"(budget {fcfg.search.time_budget_s:g} s)" if fcfg.search.time_budget_s else "(no time budget)")
        + f"; {len(test_ids)} test rows held out ===")

    # -- search (or reuse / resume it)
    tracking_uri = resolve_tracking_uri(fcfg.mlflow.tracking_uri)
    client = MlflowClient(tracking_uri)
    fstate = state.setdefault("folds", {}).setdefault(str(fold), {})
    parent_id = fstate.get("search_run_id") if fstate.get("status") in ("searched", "recorded") else None
    if parent_id is not None:
        try:
            run = client.get_run(parent_id)
            ok = run.data.tags.get("status") == "completed" and run.info.lifecycle_stage == "active"
        except Exception:  # noqa: BLE001 - gone from the store
            ok = False
        if not ok:
            say(f"fold {fold}: search run {parent_id} is not a completed search in {tracking_uri}; searching again")
            parent_id = None
    search_wall = fstate.get("search_wall_s", 0.0)
    if parent_id is None:
        resume = fstate.get("status") == "searching"
        fstate.update(status="searching", search_name=fcfg.name)
        write_state(out, state)
        t0 = time.time()
        res = run_search(fcfg, progress=progress, resume=resume)
        search_wall = time.time() - t0
        if res.interrupted:
            fstate.update(search_run_id=res.parent_run_id)
            write_state(out, state)
            say(f"fold {fold}: the search was interrupted; run the same command again to resume it")
            return None
        parent_id = res.parent_run_id
        fstate.update(status="searched", search_run_id=parent_id, search_wall_s=search_wall,
                      experiment_id=res.experiment_id)
        write_state(out, state)
    else:
        say(f"fold {fold}: reusing the completed search run {parent_id}")
    parent = client.get_run(parent_id)
    experiment_id = parent.info.experiment_id
    _check_search_run(client, parent_id, search_ds, split)
    trials = search_trials(client, experiment_id, parent_id)

    # -- stacking on exactly the search's rows, prediction of every test row
    t_stack = time.time()
    families = list(fcfg.search.families)
    chosen, members = _select(client, experiment_id, parent_id, cfg.ensemble.k, families, cfg.benchmark.max_groups,
                              cfg.benchmark.graph_member)
    say(f"fold {fold}: stacking {len(members)} member(s): " + ", ".join(
        f"{g} (val {v:.4g})" for g, v in zip(chosen["group"], chosen["val_mae"])))
    stack_ids = sorted(search_train_ids + search_val_ids)
    _leak_check(f"fold {fold} stacking", stack_ids, test_set)
    pos_full = {rid: i for i, rid in enumerate(full.ids)}
    if fcfg.data.limit is None:
        eval_ds = full  # same rows (and content hash) as the search: its cached features are reused
    else:
        eval_ds = full.subset(sorted({pos_full[i] for i in stack_ids} | {pos_full[i] for i in test_ids}))
    pos = {rid: i for i, rid in enumerate(eval_ds.ids)}
    stack_rows = np.array(sorted(pos[i] for i in stack_ids), dtype=np.int64)
    test_rows = np.array([pos[i] for i in test_ids], dtype=np.int64)  # matbench's order
    line = "alignn" in families or any(m.get("family") == "alignn" for m in members)
    features_cfg = fcfg.features.model_copy(update={"line_graph": True}) if line else fcfg.features
    features = featurize(eval_ds, features_cfg, progress=progress)
    ensemble = StackedEnsemble(members, meta=cfg.ensemble.meta, n_folds=cfg.ensemble.n_folds, seed=fcfg.search.seed,
                               refit=cfg.ensemble.refit,
                               graph_max_epochs=cfg.ensemble.max_epochs)
    ensemble.fit(features.magpie, features.graphs, eval_ds.targets, stack_rows,
                 graph_params={"gaussian_bins": fcfg.features.gaussian_bins,
                               "gaussian_width": fcfg.features.gaussian_width}, progress=progress)
    used = set(ensemble.meta_rows_.tolist())
    for part in (*ensemble.fold_train_rows_, *ensemble.fold_es_rows_, *ensemble.fold_heldout_rows_,
                 ensemble.refit_train_rows_, ensemble.refit_es_rows_):
        used |= set(np.asarray(part).tolist())
    used_ids = sorted(eval_ds.ids[r] for r in used)
    _leak_check(f"fold {fold} fitted ensemble", used_ids, test_set)
    if not set(used_ids) <= set(stack_ids):
        raise BenchmarkError(f"fold {fold}: the ensemble trained on rows it was not given")
    evaluation = evaluate_ensemble(ensemble, features.magpie, features.graphs, eval_ds.targets, test_rows)
    stack_wall = time.time() - t_stack
    frame = evaluation.predictions
    if [eval_ds.ids[r] for r in frame["row"]] != test_ids:
        raise BenchmarkError(f"fold {fold}: predictions are not in matbench's test order")
    pred = frame["prediction"].to_numpy(dtype=np.float64)
    std = frame["std"].to_numpy(dtype=np.float64)
    if not np.all(np.isfinite(pred)):
        raise BenchmarkError(f"fold {fold}: the ensemble predicted non-finite values for "
                             f"{int((~np.isfinite(pred)).sum())} test rows")
    scale = float(np.std(eval_ds.targets[stack_rows])) or 1.0
    std_rec = np.maximum(np.where(np.isfinite(std), std, 0.0), 1e-9 * scale)  # matbench needs std > 0
    run_tags = {"dataset": task, "fold": fold, "dataset_hash": eval_ds.content_hash, "search_run_id": parent_id,
                "benchmark": cfg.name}
    ens_run = log_evaluation(client, experiment_id, parent_id, evaluation, tags=run_tags, run_name=f"ensemble-fold{fold}")
    client.set_terminated(ens_run, "FINISHED")

    # -- record in matbench, write results.json.gz
    m = evaluation.metrics
    best_member = min(ensemble.names_, key=lambda n: m[f"member.{n}_mae"])
    params = {"matfusion_config": cfg.name, "search_run_id": parent_id, "ensemble_run_id": ens_run,
              "members": ",".join(ensemble.names_), "meta": ensemble.meta, "n_folds_stacking": ensemble.n_folds,
              "n_train_rows": int(len(stack_rows)), "time_budget_s": float(fcfg.search.time_budget_s or 0.0),
              "search_families": ",".join(families)}
    mb_task = mb.tasks_map[task]
    mb_task.record(fold, pred, std=std_rec, params=params)
    results_path = write_results(mb, out / RESULTS_FILE)
    scores = dict(mb_task.results[mb_task.folds_map[fold]]["scores"])
    if not math.isclose(scores["mae"], m["ensemble_mae"], rel_tol=1e-6, abs_tol=1e-9):
        raise BenchmarkError(f"fold {fold}: matbench scored MAE {scores['mae']} but our evaluation says "
                             f"{m['ensemble_mae']}; rows are misaligned")
    say(f"fold {fold}: recorded {len(pred)} test predictions; test MAE {scores['mae']:.4g} (ensemble), best member "
        f"{best_member} {m[f'member.{best_member}_mae']:.4g}, plain average {m['average_mae']:.4g}")

    # -- files of the fold
    out_frame = pd.DataFrame({"id": test_ids, "y": frame["y"], "prediction": pred, "std": std})
    for col in frame.columns:
        if col.startswith("member.") or col == "average":
            out_frame[col] = frame[col].to_numpy()
    out_frame.to_csv(fold_dir / "predictions.csv", index=False)
    cols = [c for c in ("trial_id", "run_id", "family", "fusion", "status", "val_mae", "epochs", "start_time")
            if c in trials.columns]
    trials[cols].to_csv(fold_dir / "trials.csv", index=False)
    member_rows = []
    for name, (_, row) in zip(ensemble.names_, chosen.iterrows()):
        member_rows.append({"member": name, "group": row["group"], "trial_id": row["trial_id"],
                            "val_mae": float(row["val_mae"]), "test_mae": m[f"member.{name}_mae"],
                            "test_rmse": m[f"member.{name}_rmse"], "test_r2": m[f"member.{name}_r2"],
                            "weight": (evaluation.weights or {}).get(name)})
    pd.DataFrame(member_rows).to_csv(fold_dir / "members.csv", index=False)
    rows_audit = {"task": task, "fold": fold, "test_ids": test_ids, "search_train_ids": search_train_ids,
                  "search_val_ids": search_val_ids, "stacking_ids": stack_ids, "ensemble_used_ids": used_ids,
                  "search_dataset_hash": search_ds.content_hash}
    (fold_dir / "rows.json").write_text(json.dumps(rows_audit))
    status_counts = trials["status"].value_counts().to_dict() if len(trials) else {}
    summary = {
        "task": task, "fold": fold, "config": cfg.name, "search_run_id": parent_id, "ensemble_run_id": ens_run,
        "experiment_id": experiment_id, "tracking_uri": tracking_uri,
        "n_search_train": len(split.train), "n_search_val": len(split.val), "n_stack_rows": int(len(stack_rows)),
        "n_test": len(test_ids), "time_budget_s": fcfg.search.time_budget_s, "families": families,
        "n_trials": int(len(trials)), "trial_status": {str(k): int(v) for k, v in status_counts.items()},
        "best_val_mae": float(parent.data.metrics.get("best_val_mae", float("nan"))),
        "best_test_mae_info": float(parent.data.metrics.get("best_test_mae_info", float("nan"))),
        "best_family": parent.data.tags.get("best_family"),
        "members": list(ensemble.names_), "weights": evaluation.weights, "meta": ensemble.meta,
        "ensemble_mae": m["ensemble_mae"], "ensemble_rmse": m["ensemble_rmse"], "ensemble_r2": m["ensemble_r2"],
        "average_mae": m["average_mae"], "best_member": best_member, "best_member_mae": m[f"member.{best_member}_mae"],
        "calib_within_1std": m["calib_within_1std"], "calib_within_2std": m["calib_within_2std"],
        "matbench_scores": scores, "search_wall_s": search_wall, "stack_wall_s": stack_wall,
    }
    (fold_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=float))
    fstate.update(status="recorded", ensemble_run_id=ens_run, test_mae=scores["mae"])
    write_state(out, state)

    # -- feature importances (after recording: they never feed back into the prediction)
    t_imp = time.time()
    repeats = cfg.benchmark.permutation_repeats
    notes = []
    importance: dict = {"fold": fold, "rows": "test rows of the fold (after recording)"}
    try:
        importance["rf"] = rf_importance(ensemble, features.magpie, eval_ds.targets, test_rows,
                                         features.magpie_columns, repeats=repeats, seed=fcfg.search.seed)
        if features.graphs is not None:
            importance["modality"] = modality_importance(ensemble, features.magpie, features.graphs,
                                                         eval_ds.targets, test_rows, repeats=repeats,
                                                         seed=fcfg.search.seed)
    except Exception as err:  # noqa: BLE001 - a report extra must not lose a recorded fold
        notes.append(f"importance failed: {type(err).__name__}: {err}")
        say(f"fold {fold}: feature importance failed ({err}); the fold is recorded")
    importance["notes"] = notes
    (fold_dir / "importance.json").write_text(json.dumps(importance, default=float))
    summary["importance_wall_s"] = time.time() - t_imp
    summary["fold_wall_s"] = time.time() - t_fold
    (fold_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=float))

    # -- MLflow: the fold's parent run gets the benchmark's numbers and files
    from mlflow.entities import Metric, RunTag

    now = int(time.time() * 1000)
    client.log_batch(parent_id, metrics=[Metric(f"benchmark_test_{k}", float(v), now, 0) for k, v in scores.items()]
                     + [Metric("benchmark_fold_wall_s", summary["fold_wall_s"], now, 0),
                        Metric("benchmark_stack_wall_s", stack_wall, now, 0)],
                     tags=[RunTag("benchmark", cfg.name), RunTag("benchmark_task", task),
                           RunTag("benchmark_fold", str(fold)), RunTag("benchmark_ensemble_run_id", ens_run)])
    for path in sorted(fold_dir.iterdir()):
        if path.name != "rows.json":
            client.log_artifact(parent_id, str(path), artifact_path="benchmark")
    client.log_artifact(parent_id, str(results_path), artifact_path="benchmark")
    say(f"fold {fold}: done in {summary['fold_wall_s']:.0f} s (search {search_wall:.0f} s, stacking "
        f"{stack_wall:.0f} s, importances {summary['importance_wall_s']:.0f} s)")
    return summary


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
