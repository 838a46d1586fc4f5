"""From a finished search to a registered ensemble: what ``matfusion ensemble`` runs.

1. The latest search parent run (tag ``kind=search``) of the experiment and its
   ``config.json``; the dataset and the outer fold are rebuilt exactly as the search built them
   (``load_dataset``, then :func:`~matfusion.data.prepare.prepare_fold` with the same config and
   seed; the dataset hash and fold are checked against the parent's tags).
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

from ..tracking.runs import latest_search_parent, load_run_dict
from .evaluate import Evaluation, evaluate_ensemble, log_evaluation
from .export import featurizer_spec, log_ensemble_model, make_card, register_ensemble
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


def build_ensemble_from_search(
    experiment: Optional[str] = None,
    *,
    settings=None,
    tracking_uri: Optional[str] = None,
    families: Optional[Sequence[str]] = None,
    data_dir: Optional[str] = None,
    context_features: int = 0,
    seed: int = 0,
    progress: bool = True,
    parent_run_id: Optional[str] = None,
) -> EnsembleResult:
    """Stack the latest search of ``experiment`` or, given ``parent_run_id``, that search
    parent run (``experiment`` is then not needed).  ``settings``: a
    :class:`~matfusion.config.EnsembleConfig` (k, meta, n_folds, max_epochs, refit, register;
    default ``EnsembleConfig()``)."""
    from mlflow.tracking import MlflowClient

    from ..config import EnsembleConfig
    from ..data.prepare import prepare_fold
    from ..tracking.logger import resolve_tracking_uri

    t0 = time.time()
    settings = EnsembleConfig() if settings is None else settings
    say = print if progress else (lambda *a, **kw: None)
    tracking_uri = resolve_tracking_uri(tracking_uri)
    client = MlflowClient(tracking_uri)
    parent = _search_parent(client, experiment, parent_run_id)
    cfg = _search_config(client, parent, data_dir)
    dataset = _search_dataset(cfg, parent)
    chosen, members = _members(client, parent, settings.k, families)
    say(f"search run {parent.info.run_id} ({dataset.name}, fold {cfg.data.fold}): {len(members)} members")
    if len(chosen):
        say(chosen[["trial_id", "group", "val_mae"]].to_string(index=False))
    # graphs whenever the data has structures, as the members were trained
    prep = prepare_fold(cfg, dataset, families=cfg.search.families, members=members, graphs=True, progress=progress)
    ensemble = _fit_ensemble(prep, members, settings, context_features, seed, progress)
    evaluation = evaluate_ensemble(ensemble, prep.descriptors, prep.graphs, prep.targets, prep.split.test)
    run_id = log_evaluation(
        client, parent.info.experiment_id, parent.info.run_id, evaluation, tags=_run_tags(prep, parent)
    )
    info, version, moved = _log_and_register(
        client, run_id, cfg, prep, ensemble, evaluation, parent, settings, tracking_uri
    )
    return EnsembleResult(
        run_id,
        parent.info.run_id,
        parent.info.experiment_id,
        prep.dataset.name,
        prep.split.fold,
        evaluation,
        ensemble,
        info.model_uri,
        version,
        moved,
        time.time() - t0,
    )


def _search_parent(client, experiment: Optional[str], parent_run_id: Optional[str]):
    """The search parent run named by id, else the latest one of ``experiment``."""
    if parent_run_id:
        parent = client.get_run(parent_run_id)
        if parent.data.tags.get("kind") != "search":
            raise ValueError(f"run {parent_run_id} is not a search parent run (tag kind=search)")
        return parent
    if experiment:
        return latest_search_parent(client, experiment)
    raise ValueError("name an experiment or a search parent run id")


def _search_config(client, parent, data_dir: Optional[str]):
    """The search's own config (its ``config.json``), with ``data_dir`` in place of its data
    folder when given."""
    from ..config import config_from_dict

    parent_id = parent.info.run_id
    cfg = config_from_dict(load_run_dict(client, parent_id, "config.json"), origin=f"run {parent_id} config.json")
    if data_dir:
        cfg.data.data_dir = str(data_dir)
    return cfg


def _search_dataset(cfg, parent):
    """The search's dataset rebuilt as the search built it, checked against the parent run's
    dataset hash and fold."""
    from ..data import load_dataset

    parent_id, tags = parent.info.run_id, parent.data.tags
    dataset = load_dataset(cfg.data, seed=cfg.search.seed)
    if tags.get("dataset_hash") and tags["dataset_hash"] != dataset.content_hash:
        raise ValueError(
            f"the data changed since search run {parent_id}: dataset hash {dataset.content_hash} "
            f"now, {tags['dataset_hash']} then"
        )
    if tags.get("fold") is not None and tags["fold"] != str(cfg.data.fold):
        raise ValueError(f"search run {parent_id} was on fold {tags['fold']}, its config says {cfg.data.fold}")
    return dataset


def _members(client, parent, k: int, families: Optional[Sequence[str]]):
    """(ranked table, member configs): the top ``k`` trials per group by inner-val MAE."""
    experiment_id, parent_id = parent.info.experiment_id, parent.info.run_id
    chosen = ranked_candidates(client, experiment_id, parent_id, k=k, families=families)
    members = select_members(client, experiment_id, parent_id, k=k, families=families)
    return chosen, members


def _fit_ensemble(prep, members, settings, context_features: int, seed: int, progress: bool) -> StackedEnsemble:
    """The stack fitted on the fold's train + inner val rows (the search's whole training part);
    the test rows are not passed to it."""
    rows = np.sort(np.concatenate([prep.split.train, prep.split.val]))
    ensemble = StackedEnsemble(
        members,
        meta=settings.meta,
        n_folds=settings.n_folds,
        context_features=context_features,
        seed=seed,
        refit=settings.refit,
        graph_max_epochs=settings.max_epochs,
        **interval_settings(settings),
    )
    ensemble.fit(
        prep.descriptors,
        prep.graphs,
        prep.targets,
        rows,
        graph_params=prep.graph_params,
        progress=progress,
        target_names=prep.target_names if prep.targets.ndim == 2 else None,
    )
    return ensemble


def interval_settings(settings) -> dict:
    """``coverage``, ``difficulty`` and ``refit_gain`` of the conformal intervals (EnsembleConfig's fields)."""
    return {
        "coverage": settings.coverage,
        "difficulty": settings.difficulty,
        "refit_gain": settings.refit_gain,
    }


def _run_tags(prep, parent) -> dict:
    return {
        "dataset": prep.dataset.name,
        "fold": prep.split.fold,
        "dataset_hash": prep.dataset.content_hash,
        "search_run_id": parent.info.run_id,
    }


def _log_and_register(client, run_id: str, cfg, prep, ensemble, evaluation, parent, settings, tracking_uri: str):
    """Log the pyfunc model (featurizer spec, model card, two example structures) into the
    ensemble run and, with ``settings.register``, register it (champion if better); the run ends
    FINISHED, or FAILED on any error.  Returns (model info, version or None, champion moved)."""
    dataset, split = prep.dataset, prep.split
    n_train = len(split.train) + len(split.val)
    try:
        featurizer = featurizer_spec(
            ensemble, cfg.features.cutoff, cfg.features.max_neighbors, descriptors=prep.features.descriptor_sets
        )
        card = make_card(
            ensemble,
            dataset.name,
            split.fold,
            evaluation.metrics,
            data={
                "source": cfg.data.source,
                "target": dataset.target_name,
                "rows": len(dataset),
                "limit": cfg.data.limit,
                "dataset_hash": dataset.content_hash,
                "train_rows": n_train,
                "test_rows": len(split.test),
                "search_run_id": parent.info.run_id,
                "ensemble_run_id": run_id,
                "cutoff": cfg.features.cutoff,
                "max_neighbors": cfg.features.max_neighbors,
            },
            reliability=evaluation.reliability,
        )
        info = log_ensemble_model(
            run_id,
            ensemble,
            featurizer,
            card,
            [dataset.structures[int(r)] for r in split.test[:2]],
            tracking_uri=tracking_uri,
        )
        version, moved = None, False
        if settings.register:
            mv, moved = register_ensemble(tracking_uri, info.model_uri, dataset.name, split.fold, evaluation.test_mae)
            version = str(mv.version)
            client.set_tag(run_id, "registered_version", version)
            client.set_tag(run_id, "champion", str(moved).lower())
    except KeyboardInterrupt:  # SIGINT, or SIGTERM (cli.command_signals): the run was stopped, not broken
        client.set_tag(run_id, "status", "interrupted")
        client.set_terminated(run_id, "KILLED")
        raise
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    client.set_terminated(run_id, "FINISHED")
    return info, version, moved


def format_result(res: EnsembleResult) -> str:
    m = res.evaluation.metrics
    lines = [
        f"\nStacked ensemble ({res.ensemble.meta}, {res.ensemble.n_folds} folds) on {res.task} fold {res.fold}, "
        f"{int(m['n_test'])} test rows:",
        f"  {'model':<28} {'MAE':>10} {'RMSE':>10} {'R2':>8}",
    ]

    def row(label, prefix, sfx=""):
        lines.append(
            f"  {label:<28} {m[prefix + '_mae' + sfx]:>10.4g} {m[prefix + '_rmse' + sfx]:>10.4g} "
            f"{m[prefix + '_r2' + sfx]:>8.3f}"
        )

    for sfx in [f"_{t}" for t in res.evaluation.targets] or [""]:
        if sfx:
            lines.append(f"  target {sfx[1:]} ({int(m['n_test' + sfx])} labelled test rows):")
        row("ensemble", "ensemble", sfx)
        row("plain average", "average", sfx)
        for name in res.ensemble.names_:
            row(f"member {name}", f"member.{name}", sfx)
        lines.append(
            f"  calibration: {m['calib_within_1std' + sfx]:.0%} within 1 std, "
            f"{m['calib_within_2std' + sfx]:.0%} within 2 std"
        )
        if "coverage_90" + sfx in m:
            lines.append(
                "  intervals (test coverage at nominal 68/90/95 %): "
                + ", ".join(
                    f"{m[f'coverage_{lv}{sfx}']:.0%} (width {m[f'width_{lv}{sfx}']:.4g})" for lv in (68, 90, 95)
                )
                + f"; uncalibrated spread: {m['spread_within_1std' + sfx]:.0%} within 1 std"
            )
    for sfx in [f"_{t}" for t in res.evaluation.targets] or [""]:
        best = min(res.ensemble.names_, key=lambda n: m[f"member.{n}_mae{sfx}"])
        lines.append(
            f"  test MAE{' ' + sfx[1:] if sfx else ''}: ensemble {m['ensemble_mae' + sfx]:.4g}, best member "
            f"{best} {m[f'member.{best}_mae{sfx}']:.4g}, plain average {m['average_mae' + sfx]:.4g}"
        )
    weights = res.ensemble.weights_ or {}
    for target, w in weights.items() if res.evaluation.targets else [("", weights)]:
        if w:
            lines.append(
                f"  weights{' ' + target if target else ''}: " + ", ".join(f"{k}={v:.3g}" for k, v in w.items())
            )
    lines.append(f"MLflow run {res.run_id} (nested in search run {res.parent_run_id}); model {res.model_uri}")
    if res.version:
        lines.append(
            f"registered matfusion-{res.task} version {res.version}"
            + ("; alias 'champion' moved to it" if res.champion_moved else "; 'champion' kept (not better)")
        )
    lines.append(f"wall time {res.wall_s:.1f} s")
    return "\n".join(lines)
