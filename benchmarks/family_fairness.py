"""Family-blind vs family-fair scheduling: the same search, the same data, the same wall budget.

Arms of the real `matfusion` search (Ray Tune, OptunaSearch TPE, ASHA, MLflow), families rf,
lgbm and cgcnn, fusions none and early:

- ``blind``: ``search.asha_scope: all`` and ``search.min_trials_per_group: 0`` (the search before
  issue 24: one set of ASHA rungs for every epoch-trained trial, TPE picks the groups from the
  first trial on);
- ``fair``: ``search.asha_scope: group`` and ``search.min_trials_per_group`` (default 2): each
  group (rf, lgbm, cgcnn-none, cgcnn-early) has its own rungs, and the first trials visit the
  groups in round robin; then TPE chooses the group (``search.budget_rule: tpe``);
- ``share`` (not run by default): ``fair`` with ``search.budget_rule: share``: after the round
  robin each trial goes to the group that has used the least training time (among those within
  ``search.share_margin`` of the best group), TPE picks its parameters.

Tasks: matbench_phonons (official fold 0) and matminer's flla_2015 table,
``formation_energy_per_atom`` (seeded 5-fold, fold 0).  For each task it prints, per group and
side by side per arm: trials, completed / pruned, best inner-validation MAE, epochs used in total.
With ``--stack`` it then stacks each arm's search (``matfusion ensemble``'s pipeline) and prints
the stack's test MAE, its weights and the permutation importance of the crystal graphs and of the
descriptors in the stack (test rows, after the evaluation).

    python benchmarks/family_fairness.py --tasks phonons --limit 800 --budget 240     # the reduced run
    python benchmarks/family_fairness.py --budget 900 --stack                          # both tasks, full size

The numbers measured are in benchmarks/README.md ("Family-fair scheduling").
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import pandas as pd

from matfusion.config import config_from_dict
from matfusion.search.tuner import run_search
from matfusion.tracking.leaderboard import group_summary

ARMS = {  # arm -> (asha_scope, min_trials_per_group or None for the --min-per-group value, budget_rule)
    "blind": ("all", 0, "tpe"),
    "fair": ("group", None, "tpe"),
    "share": ("group", None, "share"),
}


def task_data(task: str, data_dir: str, limit) -> dict:
    if task == "phonons":
        return {"source": "matbench_phonons", "fold": 0, "limit": limit}
    if task == "flla":
        return {
            "source": str(Path(data_dir) / "matminer" / "flla_2015.csv.gz"),
            "target": "formation_energy_per_atom",
            "structure_column": "structure",
            "fold": 0,
            "n_folds": 5,
            "limit": limit,
        }
    raise SystemExit(f"unknown task {task!r}; known: phonons, flla")


def arm_config(task: str, arm: str, args, workdir: Path) -> dict:
    scope, per_group, rule = ARMS[arm]
    return {
        "name": f"fair-{task}-{arm}",
        "data": {**task_data(task, args.data_dir, args.limit), "data_dir": args.data_dir},
        "features": {"n_jobs": 0},
        "search": {
            "families": ["rf", "lgbm", "cgcnn"],
            "fusions": ["none", "early"],
            "preset": args.preset,
            "asha_scope": scope,
            "budget_rule": rule,
            "min_trials_per_group": args.min_per_group if per_group is None else per_group,
            "asha_mode": args.asha_mode,
            "num_samples": args.trials,
            "time_budget_s": args.budget,
            "max_epochs": args.max_epochs,
            "grace_period": args.grace,
            "reduction_factor": 3,
            "seed": args.seed,
            "max_concurrent": args.concurrent,
            "cpus_per_trial": 1,
            "storage_path": str(workdir / "ray"),
        },
        "mlflow": {
            "tracking_uri": f"sqlite:///{workdir / 'mlruns.db'}",
            "artifact_location": str(workdir / "artifacts"),
        },
    }


def stack(res, cfg, args) -> dict:
    """Stack the arm's search; its test MAE and weights, and the modalities' permutation importance."""
    from matfusion.benchmark.importances import modality_importance
    from matfusion.config import EnsembleConfig
    from matfusion.data import load_dataset, split_fold
    from matfusion.data.featurize import featurize
    from matfusion.ensembles.pipeline import build_ensemble_from_search

    out = build_ensemble_from_search(
        parent_run_id=res.parent_run_id,
        tracking_uri=res.tracking_uri,
        progress=False,
        seed=args.seed,
        settings=EnsembleConfig(max_epochs=args.stack_epochs, k=args.stack_k, n_folds=args.stack_folds, register=False),
    )
    dataset = load_dataset(cfg.data, seed=cfg.search.seed)
    split = split_fold(dataset, cfg.data.fold, cfg.data.val_fraction, seed=cfg.search.seed, n_folds=cfg.data.n_folds)
    features = featurize(dataset, cfg.features, progress=False, graphs=True)
    imp = modality_importance(
        out.ensemble, features.descriptors, features.graphs, dataset.targets, split.test, repeats=3, seed=args.seed
    )
    return {
        "test_mae": float(out.evaluation.metrics["ensemble_mae"]),
        "weights": out.evaluation.weights,
        "graph_rise": imp["graph"]["ensemble"],
        "magpie_rise": imp["magpie"]["ensemble"],
        "wall_s": float(out.wall_s),
    }


def side_by_side(summaries: dict) -> pd.DataFrame:
    cols = []
    for arm, s in summaries.items():
        s = s.set_index("group")[["trials", "completed", "pruned", "best_val_mae", "epochs"]]
        s.columns = pd.MultiIndex.from_product([[arm], ["trials", "done", "pruned", "best val", "epochs"]])
        cols.append(s)
    return pd.concat(cols, axis=1)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--tasks", default="flla,phonons", help="comma-separated: flla, phonons (default both)")
    p.add_argument("--arms", default="blind,fair", help="comma-separated: blind, fair, share (default blind,fair)")
    p.add_argument("--budget", type=float, default=900.0, help="search wall budget per arm, seconds (default 900)")
    p.add_argument("--limit", type=int, default=None, help="seeded subset of this many rows (default: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--trials", type=int, default=400, help="num_samples (the wall budget ends the search first)")
    p.add_argument("--max-epochs", type=int, default=40)
    p.add_argument("--grace", type=int, default=4, help="ASHA grace period (epochs)")
    p.add_argument("--min-per-group", type=int, default=2, help="search.min_trials_per_group of the fair arm")
    p.add_argument("--asha-mode", choices=["stop", "promote"], default="stop")
    p.add_argument("--preset", default="default", choices=["quick", "default", "thorough"])
    p.add_argument("--concurrent", type=int, default=2, help="trials at once (1 CPU each)")
    p.add_argument("--stack", action="store_true", help="also stack each arm and measure the modalities")
    p.add_argument("--stack-epochs", type=int, default=40, help="epochs of the stack's GNN members")
    p.add_argument("--stack-k", type=int, default=2, help="stack members per group (ensemble.k; default 2)")
    p.add_argument(
        "--stack-folds", type=int, default=5, help="out-of-fold splits of the stack (ensemble.n_folds; default 5)"
    )
    p.add_argument("--data-dir", default=os.environ.get("MATFUSION_DATA", "/work/shared/data"))
    p.add_argument("--workdir", default=None, help="where the searches are stored (default: a temporary folder)")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = p.parse_args(argv)

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="family-fairness-"))
    workdir.mkdir(parents=True, exist_ok=True)
    report = {"args": vars(args), "tasks": {}}
    for task in [t.strip() for t in args.tasks.split(",") if t.strip()]:
        summaries, extra = {}, {}
        for arm in [a.strip() for a in args.arms.split(",") if a.strip()]:
            cfg = config_from_dict(arm_config(task, arm, args, workdir), origin=f"family_fairness {task}/{arm}")
            t0 = time.time()
            res = run_search(cfg, progress=False)
            summaries[arm] = group_summary(res.leaderboard)
            extra[arm] = {
                "wall_s": time.time() - t0,
                "n_trials": len(res.leaderboard),
                "best_val_mae": res.best_val_mae,
                "best_family": (res.best_config or {}).get("family"),
                "best_test_mae_info": res.best_test_mae,
            }
            if args.stack:
                extra[arm]["stack"] = stack(res, cfg, args)
            print(
                f"[{task} / {arm}] {extra[arm]['n_trials']} trials in {extra[arm]['wall_s']:.0f} s; best val "
                f"{res.best_val_mae:.4g} ({extra[arm]['best_family']})",
                flush=True,
            )
        table = side_by_side(summaries)
        print(
            f"\n== {task}: each group's best inner-val MAE and the epochs it used, per arm "
            f"(budget {args.budget:.0f} s, limit {args.limit}, seed {args.seed}) =="
        )
        with pd.option_context("display.width", 200, "display.max_columns", 50):
            print(table.to_string(float_format=lambda x: f"{x:.4g}", na_rep="-"))
        for arm, e in extra.items():
            line = (
                f"{arm}: {e['n_trials']} trials, best {e['best_val_mae']:.4g} ({e['best_family']}), "
                f"its test MAE (info) {e['best_test_mae_info']:.4g}"
            )
            if "stack" in e:
                s = e["stack"]
                w = ", ".join(f"{k} {v:.2f}" for k, v in (s["weights"] or {}).items())
                line += (
                    f"; stack test MAE {s['test_mae']:.4g} (weights: {w}); graphs shuffled +{s['graph_rise']:.4g}, "
                    f"descriptors shuffled +{s['magpie_rise']:.4g}; wall: search {e['wall_s']:.0f} s + "
                    f"stack {s['wall_s']:.0f} s = {e['wall_s'] + s['wall_s']:.0f} s"
                )
            print(line)
        report["tasks"][task] = {
            "groups": {arm: s.to_dict(orient="records") for arm, s in summaries.items()},
            "arms": extra,
        }
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2, default=float))
    print(f"\nsearches stored under {workdir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
