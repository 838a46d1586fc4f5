"""From a finished search to a registered ensemble: what ``matfusion ensemble`` runs.

1. The latest search parent run (tag ``kind=search``) of the experiment and its
   ``config.json``; the dataset and the outer fold are rebuilt exactly as the search built them
   (``load_dataset`` / ``split_fold`` / ``featurize`` with the same config and seed; the
   dataset hash and fold are checked against the parent's tags).
2. Members: :func:`~matfusion.ensembles.select.select_members` (top-k per group by inner-val MAE).
3. :class:`~matfusion.ensembles.stacking.StackedEnsemble` fitted on the fold's train + inner
   val rows (the search's whole training part); the test rows are not passed to it.
4. Evaluation on the test rows, logged as a nested run (``kind=ensemble``) of the search.
5. The pyfunc model logged into that run and registered as ``matfusion-<task>``.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from .evaluate import Evaluation, evaluate_ensemble, log_evaluation
from .export import featurizer_spec, log_ensemble_model, make_card, register_ensemble
from ..tracking.runs import latest_search_parent, load_run_dict
from .select import ranked_candidates, select_members
from .stacking import StackedEnsemble


@dataclass
class EnsembleResult:
    run_id: str
    parent_run_id: str
    experiment_id: str
    task: str
    fold: int
    evaluation: Evaluation
    ensemble: StackedEnsemble
    model_uri: str
    version: Optional[str]
    champion_moved: bool
    wall_s: float


def build_ensemble_from_search(experiment: Optional[str], tracking_uri: Optional[str] = None, k: int = 2,
                               meta: str = "mae", n_folds: int = 5, context_features: int = 0, seed: int = 0,
                               max_epochs: Optional[int] = None, families: Optional[Sequence[str]] = None,
                               data_dir: Optional[str] = None, register: bool = True,
                               progress: bool = True, parent_run_id: Optional[str] = None,
                               refit: bool = True) -> EnsembleResult:
    """Stack the latest search of ``experiment`` or, given ``parent_run_id``, that search
    parent run (``experiment`` is then not needed)."""
    from mlflow.tracking import MlflowClient

    from ..config import config_from_dict
    from ..data import load_dataset, split_fold
    from ..data.featurize import featurize
    from ..tracking.logger import resolve_tracking_uri
    from ..search.tuner import target_names

    t0 = time.time()
    say = print if progress else (lambda *a, **kw: None)
    tracking_uri = resolve_tracking_uri(tracking_uri)
    client = MlflowClient(tracking_uri)
    if parent_run_id:
        parent = client.get_run(parent_run_id)
        if parent.data.tags.get("kind") != "search":
            raise ValueError(f"run {parent_run_id} is not a search parent run (tag kind=search)")
    elif experiment:
        parent = latest_search_parent(client, experiment)
    else:
        raise ValueError("name an experiment or a search parent run id")
    parent_id, experiment_id = parent.info.run_id, parent.info.experiment_id
    cfg = config_from_dict(load_run_dict(client, parent_id, "config.json"), origin=f"run {parent_id} config.json")
    if data_dir:
        cfg.data.data_dir = str(data_dir)
    dataset = load_dataset(cfg.data, seed=cfg.search.seed)
    tags = parent.data.tags
    if tags.get("dataset_hash") and tags["dataset_hash"] != dataset.content_hash:
        raise ValueError(f"the data changed since search run {parent_id}: dataset hash {dataset.content_hash} "
                         f"now, {tags['dataset_hash']} then")
    split = split_fold(dataset, cfg.data.fold, cfg.data.val_fraction, seed=cfg.search.seed, n_folds=cfg.data.n_folds)
    if tags.get("fold") is not None and tags["fold"] != str(split.fold):
        raise ValueError(f"search run {parent_id} was on fold {tags['fold']}, its config says {split.fold}")

    chosen = ranked_candidates(client, experiment_id, parent_id, k=k, families=families)
    members = select_members(client, experiment_id, parent_id, k=k, families=families)
    say(f"search run {parent_id} ({dataset.name}, fold {split.fold}): {len(members)} members")
    if len(chosen):
        say(chosen[["trial_id", "group", "val_mae"]].to_string(index=False))
    line = "alignn" in cfg.search.families or any(m["family"] == "alignn" for m in members)
    features_cfg = cfg.features.model_copy(update={"line_graph": True}) if line else cfg.features
    features = featurize(dataset, features_cfg, progress=progress)
    rows = np.sort(np.concatenate([split.train, split.val]))
    ensemble = StackedEnsemble(members, meta=meta, n_folds=n_folds, context_features=context_features, seed=seed,
                               refit=refit,
                               graph_max_epochs=max_epochs)
    ensemble.fit(features.descriptors, features.graphs, dataset.targets, rows,
                 graph_params={"gaussian_bins": cfg.features.gaussian_bins,
                               "gaussian_width": cfg.features.gaussian_width}, progress=progress,
                 target_names=target_names(dataset) if dataset.targets.ndim == 2 else None)
    evaluation = evaluate_ensemble(ensemble, features.descriptors, features.graphs, dataset.targets, split.test)
    run_tags = {"dataset": dataset.name, "fold": split.fold, "dataset_hash": dataset.content_hash,
                "search_run_id": parent_id}
    run_id = log_evaluation(client, experiment_id, parent_id, evaluation, tags=run_tags)
    try:
        featurizer = featurizer_spec(ensemble, cfg.features.cutoff, cfg.features.max_neighbors,
                                     descriptors=features.descriptor_sets)
        card = make_card(ensemble, dataset.name, split.fold, evaluation.metrics, data={
            "source": cfg.data.source, "target": dataset.target_name, "rows": len(dataset),
            "limit": cfg.data.limit, "dataset_hash": dataset.content_hash, "train_rows": len(rows),
            "test_rows": len(split.test), "search_run_id": parent_id, "ensemble_run_id": run_id,
            "cutoff": cfg.features.cutoff, "max_neighbors": cfg.features.max_neighbors})
        info = log_ensemble_model(run_id, ensemble, featurizer, card,
                                  [dataset.structures[int(r)] for r in split.test[:2]], tracking_uri=tracking_uri)
        version, moved = None, False
        if register:
            mv, moved = register_ensemble(tracking_uri, info.model_uri, dataset.name, split.fold, evaluation.test_mae)
            version = str(mv.version)
            client.set_tag(run_id, "registered_version", version)
            client.set_tag(run_id, "champion", str(moved).lower())
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    client.set_terminated(run_id, "FINISHED")
    return EnsembleResult(run_id, parent_id, experiment_id, dataset.name, split.fold, evaluation, ensemble,
                          info.model_uri, version, moved, time.time() - t0)


def format_result(res: EnsembleResult) -> str:
    m = res.evaluation.metrics
    lines = [f"\nStacked ensemble ({res.ensemble.meta}, {res.ensemble.n_folds} folds) on {res.task} fold {res.fold}, "
             f"{int(m['n_test'])} test rows:",
             f"  {'model':<28} {'MAE':>10} {'RMSE':>10} {'R2':>8}"]

    def row(label, prefix, sfx=""):
        lines.append(f"  {label:<28} {m[prefix + '_mae' + sfx]:>10.4g} {m[prefix + '_rmse' + sfx]:>10.4g} "
                     f"{m[prefix + '_r2' + sfx]:>8.3f}")

    for sfx in [f"_{t}" for t in res.evaluation.targets] or [""]:
        if sfx:
            lines.append(f"  target {sfx[1:]} ({int(m['n_test' + sfx])} labelled test rows):")
        row("ensemble", "ensemble", sfx)
        row("plain average", "average", sfx)
        for name in res.ensemble.names_:
            row(f"member {name}", f"member.{name}", sfx)
        lines.append(f"  calibration: {m['calib_within_1std' + sfx]:.0%} within 1 std, "
                     f"{m['calib_within_2std' + sfx]:.0%} within 2 std")
    for sfx in [f"_{t}" for t in res.evaluation.targets] or [""]:
        best = min(res.ensemble.names_, key=lambda n: m[f"member.{n}_mae{sfx}"])
        lines.append(f"  test MAE{' ' + sfx[1:] if sfx else ''}: ensemble {m['ensemble_mae' + sfx]:.4g}, best member "
                     f"{best} {m[f'member.{best}_mae{sfx}']:.4g}, plain average {m['average_mae' + sfx]:.4g}")
    weights = res.ensemble.weights_ or {}
    for target, w in weights.items() if res.evaluation.targets else [("", weights)]:
        if w:
            lines.append(f"  weights{' ' + target if target else ''}: "
                         + ", ".join(f"{k}={v:.3g}" for k, v in w.items()))
    lines.append(f"MLflow run {res.run_id} (nested in search run {res.parent_run_id}); model {res.model_uri}")
    if res.version:
        lines.append(f"registered matfusion-{res.task} version {res.version}"
                     + ("; alias 'champion' moved to it" if res.champion_moved else "; 'champion' kept (not better)"))
    lines.append(f"wall time {res.wall_s:.1f} s")
    return "\n".join(lines)
