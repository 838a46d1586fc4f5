"""One fold of ``matfusion benchmark``: search, stack, predict, record (see :mod:`.runner`).

``run_fold`` is a short sequence of named steps:

1. the search's rows (the fold config's dataset and split, rebuilt as the search builds them),
   checked disjoint from matbench's test ids;
2. the fold's search: a completed one is reused, an interrupted one resumed, else a new one;
   its run is checked against the rebuilt dataset and split;
3. the members (best groups by inner-validation MAE) and the stacking rows (exactly the
   search's train + inner-val rows) and test rows (matbench's order), featurized with
   :func:`~matfusion.data.prepare.prepare_fold`;
4. the stacked ensemble, fitted on the stacking rows; every row it reports having used is
   checked against the test ids;
5. the test predictions, recorded in matbench (``results.json.gz``) and cross-checked with our MAE;
6. the fold's files (predictions with the conformal interval, trials, members, ``rows.json``,
   ``summary.json`` with the test coverage of the intervals, ``reliability.png``), the
   importances (after recording), and the fold's numbers and files in MLflow.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from ..families import TABULAR
from .base import RESULTS_FILE, BenchmarkError, printer, write_state
from .importances import modality_importance, rf_importance
from .matbench_io import write_results


@dataclass
class _Fold:
    """What the steps of one fold share: the configs, the fold's ids and its bookkeeping."""

    cfg: object  # the benchmark's config
    fcfg: object  # the fold's search config (fold_config)
    task: str
    fold: int
    test_ids: list  # matbench's test ids of the fold, in its order
    out: Path
    state: dict  # the benchmark state (benchmark_state.json)
    fstate: dict  # this fold's entry of it
    fold_dir: Path
    say: object
    client: object = None
    tracking_uri: str = ""

    @property
    def test_set(self) -> set:
        return set(self.test_ids)

    def save_state(self) -> None:
        write_state(self.out, self.state)


def run_fold(
    cfg, task: str, fold: int, full, mb, test_ids: list[str], out: Path, state: dict, progress: bool = True
) -> Optional[dict]:
    """Search, stack, predict, record one fold (see the module docstring).  Returns the fold's
    summary, or None when the search was interrupted (resumable)."""
    t_fold = time.time()
    f = _open_fold(cfg, task, fold, full, test_ids, out, state, progress)
    search_ds, split = _search_rows(f, full)
    searched = _search(f, progress)
    if searched is None:
        return None
    parent_id, search_wall = searched
    parent, trials = _checked_search_run(f, parent_id, search_ds, split)

    t_stack = time.time()
    families = list(f.fcfg.search.families)
    chosen, members = _select(
        f.client,
        parent.info.experiment_id,
        parent_id,
        cfg.ensemble.k,
        families,
        cfg.benchmark.max_groups,
        cfg.benchmark.graph_member,
    )
    f.say(
        f"fold {fold}: stacking {len(members)} member(s): "
        + ", ".join(f"{g} (val {v:.4g})" for g, v in zip(chosen["group"], chosen["val_mae"]))
    )
    stack_ids = _stacking_ids(f, search_ds, split)
    prep = _prepare_stacking(f, full, stack_ids, families, members, progress)
    ensemble = _fit_ensemble(f, prep, members, progress)
    used_ids = _used_rows(f, ensemble, prep, stack_ids)
    evaluation, pred, std = _predict_test(f, ensemble, prep)
    stack_wall = time.time() - t_stack
    ens_run = _log_ensemble_run(f, parent, evaluation, prep)

    scores, results_path = _record(f, mb, prep, ensemble, evaluation, pred, std, parent_id, ens_run, families)
    _write_fold_tables(f, evaluation, pred, std, trials, ensemble, chosen)
    _write_rows_audit(f, search_ds, split, stack_ids, used_ids)
    summary = _summary(
        f, parent, split, prep, trials, ensemble, evaluation, families, ens_run, scores, search_wall, stack_wall
    )
    _write_summary(f, summary)
    f.fstate.update(status="recorded", ensemble_run_id=ens_run, test_mae=scores["mae"])
    f.save_state()

    t_imp = time.time()
    _importances(f, ensemble, prep)
    summary["importance_wall_s"] = time.time() - t_imp
    summary["fold_wall_s"] = time.time() - t_fold
    _write_summary(f, summary)
    _log_to_parent(f, parent_id, scores, summary, stack_wall, ens_run, results_path)
    f.say(
        f"fold {fold}: done in {summary['fold_wall_s']:.0f} s (search {search_wall:.0f} s, stacking "
        f"{stack_wall:.0f} s, importances {summary['importance_wall_s']:.0f} s)"
    )
    return summary


# -- the steps ---------------------------------------------------------------------------------------


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


def _open_fold(cfg, task: str, fold: int, full, test_ids: list[str], out: Path, state: dict, progress: bool) -> _Fold:
    """The fold's config, folder, state entry and MLflow client."""
    from mlflow.tracking import MlflowClient

    from ..tracking.logger import resolve_tracking_uri

    fold_dir = out / f"fold_{fold}"
    fold_dir.mkdir(parents=True, exist_ok=True)
    fcfg = fold_config(cfg, fold, len(full), len(test_ids))
    tracking_uri = resolve_tracking_uri(fcfg.mlflow.tracking_uri)
    fstate = state.setdefault("folds", {}).setdefault(str(fold), {})
    return _Fold(
        cfg=cfg,
        fcfg=fcfg,
        task=task,
        fold=fold,
        test_ids=list(test_ids),
        out=out,
        state=state,
        fstate=fstate,
        fold_dir=fold_dir,
        say=printer(progress),
        client=MlflowClient(tracking_uri),
        tracking_uri=tracking_uri,
    )


def _search_dataset(full, fold_cfg):
    """The dataset the fold's search loads (``load_dataset`` = the task, then ``limit_rows``)."""
    from ..data import limit_rows

    return limit_rows(full, fold_cfg.data.limit, seed=fold_cfg.search.seed)


def _search_rows(f: _Fold, full):
    """(dataset, split) of the fold's search, rebuilt with the search's own functions; its train
    and inner-val rows checked disjoint from the test ids; announced."""
    from ..data.prepare import fold_split

    search_ds = _search_dataset(full, f.fcfg)
    split = fold_split(f.fcfg, search_ds)
    _leak_check(f"fold {f.fold} search", _ids(search_ds, split.train) + _ids(search_ds, split.val), f.test_set)
    budget = f.fcfg.search.time_budget_s
    f.say(
        f"\n=== {f.task} fold {f.fold}: search on {len(split.train)} train + {len(split.val)} inner-val rows "
        + (f"(budget {budget:g} s)" if budget else "(no time budget)")
        + f"; {len(f.test_ids)} test rows held out ==="
    )
    return search_ds, split


def _ids(dataset, rows) -> list[str]:
    return [dataset.ids[r] for r in rows]


def _completed_search(f: _Fold) -> Optional[str]:
    """The fold's search run recorded in the state when it is still a completed search in the
    store, else None (said when it is gone)."""
    parent_id = f.fstate.get("search_run_id") if f.fstate.get("status") in ("searched", "recorded") else None
    if parent_id is None:
        return None
    try:
        run = f.client.get_run(parent_id)
        ok = run.data.tags.get("status") == "completed" and run.info.lifecycle_stage == "active"
    except Exception:  # noqa: BLE001 - gone from the store
        ok = False
    if not ok:
        f.say(f"fold {f.fold}: search run {parent_id} is not a completed search in {f.tracking_uri}; searching again")
        return None
    return parent_id


def _search(f: _Fold, progress: bool) -> Optional[tuple[str, float]]:
    """(search parent run id, search seconds): the completed search of the fold reused, or the
    search run (resumed when the state says it was interrupted); None when it was interrupted."""
    from ..search.tuner import run_search

    parent_id = _completed_search(f)
    if parent_id is not None:
        f.say(f"fold {f.fold}: reusing the completed search run {parent_id}")
        return parent_id, f.fstate.get("search_wall_s", 0.0)
    resume = f.fstate.get("status") == "searching"
    f.fstate.update(status="searching", search_name=f.fcfg.name)
    f.save_state()
    t0 = time.time()
    res = run_search(f.fcfg, progress=progress, resume=resume)
    search_wall = time.time() - t0
    if res.interrupted:
        f.fstate.update(search_run_id=res.parent_run_id)
        f.save_state()
        f.say(f"fold {f.fold}: the search was interrupted; run the same command again to resume it")
        return None
    f.fstate.update(
        status="searched", search_run_id=res.parent_run_id, search_wall_s=search_wall, experiment_id=res.experiment_id
    )
    f.save_state()
    if res.tracking_unsent:  # its trials are not all in MLflow, where stacking reads them: search again later
        from ..search.faults import TrackingUnreachable

        raise TrackingUnreachable(
            f"fold {f.fold}: the tracking server {res.tracking_uri} did not answer again before the search ended; "
            "run the same command again once it answers (this fold is searched again)"
        )
    return res.parent_run_id, search_wall


def _checked_search_run(f: _Fold, parent_id: str, search_ds, split):
    """(parent run, trials table) of the fold's search, after checking it ran on ``search_ds`` and
    ``split``."""
    from ..tracking.leaderboard import search_trials

    parent = f.client.get_run(parent_id)
    _check_search_run(f.client, parent_id, search_ds, split)
    return parent, search_trials(f.client, parent.info.experiment_id, parent_id)


def _check_search_run(client, parent_id: str, search_ds, split) -> None:
    """The search run was made on the dataset and split rebuilt here (hash and sizes)."""
    run = client.get_run(parent_id)
    tags, params = run.data.tags, run.data.params
    if tags.get("dataset_hash") != search_ds.content_hash or tags.get("fold") != str(split.fold):
        raise BenchmarkError(
            f"search run {parent_id}: dataset hash/fold {tags.get('dataset_hash')}/{tags.get('fold')} "
            f"differ from the rebuilt {search_ds.content_hash}/{split.fold}"
        )
    for key, n in (("n_train", len(split.train)), ("n_val", len(split.val)), ("n_test", len(split.test))):
        if params.get(key) not in (None, str(n)):
            raise BenchmarkError(f"search run {parent_id}: {key} {params.get(key)} logged, {n} rebuilt")


def stacked_groups(ordered: list[str], max_groups: int, graph_member: bool = False) -> list[str]:
    """The first ``max_groups`` of ``ordered`` (groups, best inner-val MAE first); with
    ``graph_member`` the best graph-model group is added when none of them is one."""
    groups = list(ordered[:max_groups])
    graph_groups = [g for g in ordered if g not in TABULAR]
    if graph_member and graph_groups and not set(groups) & set(graph_groups):
        groups.append(graph_groups[0])
    return groups


def _select(
    client, experiment_id: str, parent_id: str, k: int, families, max_groups: Optional[int], graph_member: bool = False
):
    """The stack's members: the best ``max_groups`` groups by inner-validation MAE; with
    ``graph_member``, plus the best graph-model group if none of those is one."""
    from ..ensembles.select import load_trial_config, ranked_candidates

    chosen = ranked_candidates(client, experiment_id, parent_id, k=k, families=families)
    if chosen.empty:
        raise BenchmarkError(
            f"search run {parent_id} has no finished trial with a val_mae among families {', '.join(families)}"
        )
    if max_groups:
        groups = stacked_groups(list(dict.fromkeys(chosen["group"])), max_groups, graph_member)
        chosen = chosen[chosen["group"].isin(groups)].reset_index(drop=True)
    return chosen, [load_trial_config(client, run_id) for run_id in chosen["run_id"]]


def _leak_check(where: str, ids, test_ids: set) -> None:
    leaked = sorted(set(ids) & test_ids)
    if leaked:
        raise BenchmarkError(
            f"{where}: {len(leaked)} test-fold rows would be used (first: {leaked[0]}); refusing to record this fold"
        )


def _stacking_ids(f: _Fold, search_ds, split) -> list[str]:
    """The stacking's rows: exactly the search's train + inner-val rows (by id), checked."""
    stack_ids = sorted(_ids(search_ds, split.train) + _ids(search_ds, split.val))
    _leak_check(f"fold {f.fold} stacking", stack_ids, f.test_set)
    return stack_ids


def _prepare_stacking(f: _Fold, full, stack_ids: list[str], families, members, progress: bool):
    """The stacking rows and the test rows (matbench's order) featurized by ``prepare_fold`` as
    the fold's split (train = stacking rows, no inner val, test = test rows).  Without
    ``data.limit`` the rows are the full dataset's (same content hash as the search: its cached
    features are reused); with it, the subset of the stacking + test rows."""
    from ..data import FoldSplit
    from ..data.prepare import prepare_fold

    pos_full = {rid: i for i, rid in enumerate(full.ids)}
    if f.fcfg.data.limit is None:
        eval_ds = full
    else:
        eval_ds = full.subset(sorted({pos_full[i] for i in stack_ids} | {pos_full[i] for i in f.test_ids}))
    pos = {rid: i for i, rid in enumerate(eval_ds.ids)}
    split = FoldSplit(
        fold=f.fold,
        train=np.array(sorted(pos[i] for i in stack_ids), dtype=np.int64),
        val=np.array([], dtype=np.int64),
        test=np.array([pos[i] for i in f.test_ids], dtype=np.int64),
    )
    # graphs whenever the task has structures (the modality importance shuffles them)
    return prepare_fold(
        f.fcfg, eval_ds, families=families, members=members, graphs=True, split=split, progress=progress
    )


def _fit_ensemble(f: _Fold, prep, members, progress: bool):
    """The stacked ensemble of ``members`` fitted on the stacking rows only."""
    from ..ensembles.pipeline import interval_settings
    from ..ensembles.stacking import StackedEnsemble

    e = f.cfg.ensemble
    ensemble = StackedEnsemble(
        members,
        meta=e.meta,
        n_folds=e.n_folds,
        seed=f.fcfg.search.seed,
        refit=e.refit,
        graph_max_epochs=e.max_epochs,
        **interval_settings(e),
    )
    ensemble.fit(
        prep.descriptors, prep.graphs, prep.targets, prep.split.train, graph_params=prep.graph_params, progress=progress
    )
    return ensemble


def _used_rows(f: _Fold, ensemble, prep, stack_ids: list[str]) -> list[str]:
    """Every row (id) the fitted ensemble reports having trained on, early stopped on or fitted
    the meta-learner on: none a test row, all among the stacking rows."""
    used = set(ensemble.meta_rows_.tolist())
    for part in (
        *ensemble.fold_train_rows_,
        *ensemble.fold_es_rows_,
        *ensemble.fold_heldout_rows_,
        ensemble.refit_train_rows_,
        ensemble.refit_es_rows_,
    ):
        used |= set(np.asarray(part).tolist())
    used_ids = sorted(prep.dataset.ids[r] for r in used)
    _leak_check(f"fold {f.fold} fitted ensemble", used_ids, f.test_set)
    if not set(used_ids) <= set(stack_ids):
        raise BenchmarkError(f"fold {f.fold}: the ensemble trained on rows it was not given")
    return used_ids


def _predict_test(f: _Fold, ensemble, prep):
    """(evaluation, predictions, stds) of every test row, in matbench's order, all finite."""
    from ..ensembles.evaluate import evaluate_ensemble

    evaluation = evaluate_ensemble(ensemble, prep.descriptors, prep.graphs, prep.targets, prep.split.test)
    frame = evaluation.predictions
    if [prep.dataset.ids[r] for r in frame["row"]] != f.test_ids:
        raise BenchmarkError(f"fold {f.fold}: predictions are not in matbench's test order")
    pred = frame["prediction"].to_numpy(dtype=np.float64)
    std = frame["std"].to_numpy(dtype=np.float64)
    if not np.all(np.isfinite(pred)):
        raise BenchmarkError(
            f"fold {f.fold}: the ensemble predicted non-finite values for {int((~np.isfinite(pred)).sum())} test rows"
        )
    return evaluation, pred, std


def _log_ensemble_run(f: _Fold, parent, evaluation, prep) -> str:
    """The ensemble's evaluation as a finished run nested in the fold's search run."""
    from ..ensembles.evaluate import log_evaluation

    run_tags = {
        "dataset": f.task,
        "fold": f.fold,
        "dataset_hash": prep.dataset.content_hash,
        "search_run_id": parent.info.run_id,
        "benchmark": f.cfg.name,
    }
    ens_run = log_evaluation(
        f.client,
        parent.info.experiment_id,
        parent.info.run_id,
        evaluation,
        tags=run_tags,
        run_name=f"ensemble-fold{f.fold}",
    )
    f.client.set_terminated(ens_run, "FINISHED")
    from ..ensembles.evaluate import reliability_plot

    reliability_plot(evaluation, str(f.fold_dir / "reliability.png"), title=f"{f.task} fold {f.fold}: intervals")
    return ens_run


def _record(f: _Fold, mb, prep, ensemble, evaluation, pred, std, parent_id: str, ens_run: str, families):
    """Record the predictions (std > 0, as matbench needs) in matbench and rewrite
    ``results.json.gz``; matbench's MAE must be ours.  Returns (scores, results path)."""
    m = evaluation.metrics
    stack_rows = prep.split.train
    scale = float(np.std(prep.targets[stack_rows])) or 1.0
    std_rec = np.maximum(np.where(np.isfinite(std), std, 0.0), 1e-9 * scale)  # matbench needs std > 0
    params = {
        "matfusion_config": f.cfg.name,
        "search_run_id": parent_id,
        "ensemble_run_id": ens_run,
        "members": ",".join(ensemble.names_),
        "meta": ensemble.meta,
        "n_folds_stacking": ensemble.n_folds,
        "n_train_rows": int(len(stack_rows)),
        "time_budget_s": float(f.fcfg.search.time_budget_s or 0.0),
        "search_families": ",".join(families),
    }
    mb_task = mb.tasks_map[f.task]
    mb_task.record(f.fold, pred, std=std_rec, params=params)
    results_path = write_results(mb, f.out / RESULTS_FILE)
    scores = dict(mb_task.results[mb_task.folds_map[f.fold]]["scores"])
    if not math.isclose(scores["mae"], m["ensemble_mae"], rel_tol=1e-6, abs_tol=1e-9):
        raise BenchmarkError(
            f"fold {f.fold}: matbench scored MAE {scores['mae']} but our evaluation says "
            f"{m['ensemble_mae']}; rows are misaligned"
        )
    best = _best_member(ensemble, m)
    f.say(
        f"fold {f.fold}: recorded {len(pred)} test predictions; test MAE {scores['mae']:.4g} (ensemble), best "
        f"member {best} {m[f'member.{best}_mae']:.4g}, plain average {m['average_mae']:.4g}"
    )
    return scores, results_path


def _best_member(ensemble, metrics: dict) -> str:
    return min(ensemble.names_, key=lambda n: metrics[f"member.{n}_mae"])


def _write_fold_tables(f: _Fold, evaluation, pred, std, trials, ensemble, chosen) -> None:
    """predictions.csv (by matbench id), trials.csv and members.csv of the fold."""
    import pandas as pd

    m, frame = evaluation.metrics, evaluation.predictions
    out_frame = pd.DataFrame({"id": f.test_ids, "y": frame["y"], "prediction": pred, "std": std})
    for col in frame.columns:
        if col in ("lower", "upper", "spread") or col.startswith("member.") or col == "average":
            out_frame[col] = frame[col].to_numpy()
    out_frame.to_csv(f.fold_dir / "predictions.csv", index=False)
    cols = [
        c
        for c in ("trial_id", "run_id", "family", "fusion", "status", "val_mae", "epochs", "start_time")
        if c in trials.columns
    ]
    trials[cols].to_csv(f.fold_dir / "trials.csv", index=False)
    member_rows = []
    for name, (_, row) in zip(ensemble.names_, chosen.iterrows()):
        member_rows.append(
            {
                "member": name,
                "group": row["group"],
                "trial_id": row["trial_id"],
                "val_mae": float(row["val_mae"]),
                "test_mae": m[f"member.{name}_mae"],
                "test_rmse": m[f"member.{name}_rmse"],
                "test_r2": m[f"member.{name}_r2"],
                "weight": (evaluation.weights or {}).get(name),
            }
        )
    pd.DataFrame(member_rows).to_csv(f.fold_dir / "members.csv", index=False)


def _write_rows_audit(f: _Fold, search_ds, split, stack_ids: list[str], used_ids: list[str]) -> None:
    """rows.json: every row the fold used, by id (the leakage audit)."""
    rows_audit = {
        "task": f.task,
        "fold": f.fold,
        "test_ids": f.test_ids,
        "search_train_ids": _ids(search_ds, split.train),
        "search_val_ids": _ids(search_ds, split.val),
        "stacking_ids": stack_ids,
        "ensemble_used_ids": used_ids,
        "search_dataset_hash": search_ds.content_hash,
    }
    (f.fold_dir / "rows.json").write_text(json.dumps(rows_audit))


def _summary(
    f: _Fold,
    parent,
    split,
    prep,
    trials,
    ensemble,
    evaluation,
    families,
    ens_run: str,
    scores: dict,
    search_wall: float,
    stack_wall: float,
) -> dict:
    """The fold's summary.json."""
    m = evaluation.metrics
    best_member = _best_member(ensemble, m)
    status_counts = trials["status"].value_counts().to_dict() if len(trials) else {}
    return {
        "task": f.task,
        "fold": f.fold,
        "config": f.cfg.name,
        "search_run_id": parent.info.run_id,
        "ensemble_run_id": ens_run,
        "experiment_id": parent.info.experiment_id,
        "tracking_uri": f.tracking_uri,
        "n_search_train": len(split.train),
        "n_search_val": len(split.val),
        "n_stack_rows": int(len(prep.split.train)),
        "n_test": len(f.test_ids),
        "time_budget_s": f.fcfg.search.time_budget_s,
        "families": families,
        "n_trials": int(len(trials)),
        "trial_status": {str(k): int(v) for k, v in status_counts.items()},
        "best_val_mae": float(parent.data.metrics.get("best_val_mae", float("nan"))),
        "best_test_mae_info": float(parent.data.metrics.get("best_test_mae_info", float("nan"))),
        "best_family": parent.data.tags.get("best_family"),
        "members": list(ensemble.names_),
        "weights": evaluation.weights,
        "meta": ensemble.meta,
        "ensemble_mae": m["ensemble_mae"],
        "ensemble_rmse": m["ensemble_rmse"],
        "ensemble_r2": m["ensemble_r2"],
        "average_mae": m["average_mae"],
        "best_member": best_member,
        "best_member_mae": m[f"member.{best_member}_mae"],
        "calib_within_1std": m["calib_within_1std"],
        "calib_within_2std": m["calib_within_2std"],
        # conformal intervals (calibrated on the stacking rows only): test coverage and mean width
        **{k: v for k, v in m.items() if k.startswith(("coverage_", "width_")) or k == "spread_within_1std"},
        "calibration": ensemble.calibration_summary(),
        "matbench_scores": scores,
        "search_wall_s": search_wall,
        "stack_wall_s": stack_wall,
    }


def _write_summary(f: _Fold, summary: dict) -> None:
    (f.fold_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=float))


def _importances(f: _Fold, ensemble, prep) -> None:
    """importance.json: rf feature importances and (with graphs) the modality importance on the
    test rows, after recording (they never feed back into the prediction); a failure is noted,
    the fold stays recorded."""
    repeats, seed = f.cfg.benchmark.permutation_repeats, f.fcfg.search.seed
    test_rows = prep.split.test
    notes = []
    importance: dict = {"fold": f.fold, "rows": "test rows of the fold (after recording)"}
    try:
        importance["rf"] = rf_importance(
            ensemble, prep.descriptors, prep.targets, test_rows, prep.columns, repeats=repeats, seed=seed
        )
        if prep.graphs is not None:
            importance["modality"] = modality_importance(
                ensemble, prep.descriptors, prep.graphs, prep.targets, test_rows, repeats=repeats, seed=seed
            )
    except Exception as err:  # noqa: BLE001 - a report extra must not lose a recorded fold
        notes.append(f"importance failed: {type(err).__name__}: {err}")
        f.say(f"fold {f.fold}: feature importance failed ({err}); the fold is recorded")
    importance["notes"] = notes
    (f.fold_dir / "importance.json").write_text(json.dumps(importance, default=float))


def _log_to_parent(
    f: _Fold, parent_id: str, scores: dict, summary: dict, stack_wall: float, ens_run: str, results_path: Path
) -> None:
    """The fold's search parent run gets the benchmark's numbers, tags and files (not rows.json)."""
    from mlflow.entities import Metric, RunTag

    now = int(time.time() * 1000)
    f.client.log_batch(
        parent_id,
        metrics=[Metric(f"benchmark_test_{k}", float(v), now, 0) for k, v in scores.items()]
        + [
            Metric("benchmark_fold_wall_s", summary["fold_wall_s"], now, 0),
            Metric("benchmark_stack_wall_s", stack_wall, now, 0),
        ],
        tags=[
            RunTag("benchmark", f.cfg.name),
            RunTag("benchmark_task", f.task),
            RunTag("benchmark_fold", str(f.fold)),
            RunTag("benchmark_ensemble_run_id", ens_run),
        ],
    )
    for path in sorted(f.fold_dir.iterdir()):
        if path.name != "rows.json":
            f.client.log_artifact(parent_id, str(path), artifact_path="benchmark")
    f.client.log_artifact(parent_id, str(results_path), artifact_path="benchmark")
