"""Our tabular arm vs AutoGluon-tabular, on the same descriptors, official folds and wall budget.

For every task and official matbench fold:

* **ours**: the real search (:func:`matfusion.search.tuner.run_search`: Ray Tune, Optuna TPE,
  ASHA, MLflow) over the tabular families ``rf``, ``lgbm`` and ``et`` with
  ``search.time_budget_s`` = ``--search-share`` of the budget; then (``--final stack``, the
  default) the best trial of each family stacked out-of-fold (:class:`StackedEnsemble`, nnls,
  ``--stack-folds`` folds) on the fold's training rows, as many members as the rest of the budget
  allows (each member's cost projected from its trial's wall time; fewer than two: the best
  trial alone), or (``--final best``) the best trial alone.  The whole arm (search
  start-up, trials, MLflow, stacking, prediction) is timed.
* **AutoGluon**: ``TabularPredictor(eval_metric="mean_absolute_error").fit(presets=
  "best_quality", time_limit=budget)`` on the same descriptor matrix of the same training rows
  (train + inner val of the fold), run by ``--autogluon-python`` (a separate venv: AutoGluon is
  never a dependency of matfusion) in a subprocess; features go through an ``.npz`` file.

Neither arm sees the test rows before predicting them.  Prints both test MAEs per fold, their
ratio (ours / AutoGluon; < 1 means we are better) and both wall times; ``--json`` saves them.

    python benchmarks/vs_autogluon.py --autogluon-python /work/agvenv/bin/python \\
        --tasks matbench_phonons --budget 60
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

AG_SCRIPT = r"""
import json, sys, time
import numpy as np, pandas as pd
from autogluon.tabular import TabularPredictor

npz, out_dir, budget, presets, cpus, seed = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4], int(sys.argv[5]), int(sys.argv[6])
d = np.load(npz)
cols = [f"f{i}" for i in range(d["X_train"].shape[1])]
train = pd.DataFrame(d["X_train"], columns=cols)
train["y"] = d["y_train"]
test = pd.DataFrame(d["X_test"], columns=cols)
np.random.seed(seed)
t0 = time.time()
note = ""
try:
    predictor = TabularPredictor(label="y", eval_metric="mean_absolute_error", path=out_dir, verbosity=0).fit(
        train, presets=presets, time_limit=budget, num_cpus=cpus)
except AssertionError as err:  # best_quality's dynamic stacking used up the budget: fit again without it
    note = f"first fit failed ({str(err)[:120]}); refit with dynamic_stacking=False, same time_limit"
    t0 = time.time()
    predictor = TabularPredictor(label="y", eval_metric="mean_absolute_error", path=out_dir + "-nodystack",
                                 verbosity=0).fit(train, presets=presets, time_limit=budget, num_cpus=cpus,
                                                  dynamic_stacking=False)
fit_s = time.time() - t0
pred = predictor.predict(test).to_numpy()
lb = predictor.leaderboard(silent=True)
json.dump({"pred": pred.tolist(), "fit_s": fit_s, "predict_s": time.time() - t0 - fit_s,
           "best_model": str(predictor.model_best), "n_models": int(len(lb)), "note": note}, open(out_dir + "/result.json", "w"))
"""


def load_task(task: str, data_dir, descriptors):
    from matfusion.config import DataConfig, FeaturesConfig
    from matfusion.data import load_dataset
    from matfusion.data.featurize import featurize

    data_cfg = DataConfig(source=task, data_dir=str(data_dir) if data_dir else None)
    ds = load_dataset(data_cfg)
    t0 = time.time()
    features_cfg = FeaturesConfig(descriptors=descriptors)
    fs = featurize(ds, features_cfg, progress=False)
    return ds, fs, features_cfg, time.time() - t0


def run_ours(task: str, fold: int, args, workdir: Path, features_cfg, ds, fs, overhead: float) -> dict:
    """The searched tabular arm on one fold; returns its test MAE and timings.  ``overhead``: the
    expected wall time of ``run_search`` outside Tune's fit (data, MLflow, report), measured on
    the previous fold: the search gets ``search_share * (budget - overhead)`` seconds."""
    from mlflow.tracking import MlflowClient

    from matfusion.config import config_from_dict
    from matfusion.data import split_fold
    from matfusion.ensembles.select import ranked_candidates, select_members
    from matfusion.ensembles.stacking import StackedEnsemble
    from matfusion.search.tuner import run_search
    from matfusion.trainables.trial import predict_from_checkpoint  # noqa: F401 (import cost outside the timing)

    t0 = time.time()
    name = f"vsag-{task.replace('matbench_', '')}-f{fold}-{int(t0)}"
    raw = {
        "name": name,
        "data": {"source": task, "fold": fold, "data_dir": str(args.data_dir) if args.data_dir else None},
        "features": features_cfg.model_dump(),
        "search": {
            "families": ["rf", "lgbm", "et"],
            "num_samples": 500,
            "max_epochs": args.max_epochs,
            "grace_period": 2,
            "reduction_factor": 3,
            "seed": args.seed,
            "max_concurrent": args.cpus,
            "cpus_per_trial": 1,
            "time_budget_s": args.tune_budget or max(10.0, args.search_share * (args.budget - overhead)),
            "early_stopping_patience": 5,
            "storage_path": str(workdir / "ray"),
        },
        "mlflow": {
            "tracking_uri": f"sqlite:///{workdir / 'mlruns.db'}",
            "experiment": name,
            "artifact_location": str(workdir / "mlartifacts"),
        },
    }
    cfg = config_from_dict(raw, origin="vs_autogluon")
    res = run_search(cfg, progress=False)
    search_s = time.time() - t0
    if res.best_config is None:
        raise RuntimeError(
            f"{task} fold {fold}: no trial finished within search.time_budget_s="
            f"{cfg.search.time_budget_s:.0f} s; raise --budget or --search-share"
        )
    split = split_fold(ds, fold, cfg.data.val_fraction, seed=args.seed)
    y_test = ds.targets[split.test]
    out = {
        "search_s": search_s,
        "tune_budget_s": cfg.search.time_budget_s,
        "overhead_s": search_s - cfg.search.time_budget_s,
        "n_trials": int(len(res.leaderboard)),
        "best_family": res.best_config.get("family"),
        "best_trial_test_mae": float(res.best_test_mae),
        "best_val_mae": float(res.best_val_mae),
        "trials_per_family": res.leaderboard["family"].value_counts().to_dict(),
        "pruned": int((res.leaderboard["status"] == "pruned").sum()),
    }
    if args.final == "best":
        out.update(mae=float(res.best_test_mae), wall_s=time.time() - t0, final="best", members=[])
        return out
    client = MlflowClient(res.tracking_uri)
    chosen = ranked_candidates(client, res.experiment_id, res.parent_run_id, k=1)
    members = select_members(client, res.experiment_id, res.parent_run_id, k=1)
    # time-aware: a member's stacking cost is about n_folds fits on (K-1)/K of the training rows,
    # its trial's wall time is one fit on 90 %; members are dropped (most expensive first) until the
    # projected cost fits what is left of the budget; with none left, the best trial alone is used
    cost = []
    for run_id in chosen["run_id"]:
        info = client.get_run(run_id).info
        cost.append(max(0.5, ((info.end_time or info.start_time) - info.start_time) / 1000.0))
    scale = args.stack_folds * (args.stack_folds - 1) / args.stack_folds / 0.9
    keep = list(range(len(members)))
    left = args.budget - (time.time() - t0) - 2.0
    while keep and (len(keep) < 2 or sum(cost[j] for j in keep) * scale > left):
        if len(keep) < 2:
            keep = []
            break
        keep.remove(max(keep, key=lambda j: cost[j]))
    out["projected_stack_s"] = float(sum(cost[j] for j in keep) * scale)
    if not keep:
        out.update(mae=float(res.best_test_mae), wall_s=time.time() - t0, final="best", members=[])
        return out
    members = [dict(members[j], cpus=1) for j in keep]  # 1 thread: no OpenMP spin on a busy machine
    rows = np.sort(np.concatenate([split.train, split.val]))
    ens = StackedEnsemble(members, meta="nnls", n_folds=args.stack_folds, seed=args.seed)
    ens.fit(fs.descriptors, None, ds.targets, rows)
    pred = ens.predict(fs.descriptors, None, split.test, return_std=False)
    out.update(
        mae=float(np.mean(np.abs(pred - y_test))),
        wall_s=time.time() - t0,
        final="stack",
        stack_s=time.time() - t0 - search_s,
        members=[chosen["group"].iloc[j] for j in keep],
        weights={k: round(v, 3) for k, v in (ens.weights_ or {}).items()},
    )
    return out


def run_autogluon(task: str, fold: int, args, workdir: Path, ds, fs) -> dict:
    from matfusion.data import split_fold

    split = split_fold(ds, fold, 0.1, seed=args.seed)
    rows = np.sort(np.concatenate([split.train, split.val]))
    npz = workdir / f"ag-{task}-{fold}.npz"
    np.savez(npz, X_train=fs.descriptors[rows], y_train=ds.targets[rows], X_test=fs.descriptors[split.test])
    out_dir = workdir / f"ag-{task}-{fold}"
    t0 = time.time()
    proc = subprocess.run(
        [
            args.autogluon_python,
            "-c",
            AG_SCRIPT,
            str(npz),
            str(out_dir),
            str(args.budget),
            args.presets,
            str(args.cpus),
            str(args.seed),
        ],
        capture_output=True,
        text=True,
        timeout=args.budget * 6 + 600,
    )
    wall = time.time() - t0
    if proc.returncode != 0:
        print(f"AutoGluon failed on {task} fold {fold}:\n{proc.stderr[-2000:]}", file=sys.stderr, flush=True)
        return {
            "mae": float("nan"),
            "wall_s": wall,
            "fit_s": float("nan"),
            "best_model": "failed",
            "n_models": 0,
            "note": proc.stderr[-300:],
        }
    r = json.loads((out_dir / "result.json").read_text())
    pred = np.asarray(r["pred"], dtype=np.float64)
    if r.get("note"):
        print(f"  AutoGluon {task} fold {fold}: {r['note']}", flush=True)
    return {
        "mae": float(np.mean(np.abs(pred - ds.targets[split.test]))),
        "wall_s": wall,
        "fit_s": r["fit_s"],
        "best_model": r["best_model"],
        "n_models": r["n_models"],
        "note": r.get("note", ""),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--autogluon-python", required=True, help="python of a venv with autogluon.tabular installed")
    p.add_argument("--tasks", nargs="+", default=["matbench_phonons"])
    p.add_argument("--folds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    p.add_argument("--budget", type=float, default=60.0, help="wall seconds per fold per method")
    p.add_argument(
        "--search-share",
        type=float,
        default=0.6,
        help="share of the budget given to the search (search.time_budget_s); the rest stacks "
        "(members whose projected stacking time does not fit are left out)",
    )
    p.add_argument("--final", choices=["stack", "best"], default="stack")
    p.add_argument(
        "--tune-budget",
        type=float,
        default=None,
        help="fixed search.time_budget_s (default: search_share x (budget - measured overhead))",
    )
    p.add_argument(
        "--overhead",
        type=float,
        default=20.0,
        help="expected run_search time outside Tune's fit on the first fold (later folds: measured)",
    )
    p.add_argument("--stack-folds", type=int, default=3)
    p.add_argument("--max-epochs", type=int, default=20, help="lgbm chunks per trial (ASHA's axis)")
    p.add_argument("--descriptors", nargs="*", default=None, help="descriptor sets (default: the data's default)")
    p.add_argument("--presets", default="best_quality")
    p.add_argument("--cpus", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-dir", default=os.environ.get("MATFUSION_DATA"))
    p.add_argument("--workdir", default=None)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="vs_autogluon-"))
    workdir.mkdir(parents=True, exist_ok=True)
    print(
        f"budget {args.budget:.0f} s per fold per method, {args.cpus} cpus, load average {os.getloadavg()}, "
        f"workdir {workdir}",
        flush=True,
    )
    # Ray is started once, before any timing (like a cluster that is up); AutoGluon's imports
    # are inside its wall time but outside its time_limit
    from matfusion.search.tuner import init_ray

    init_ray(None, num_cpus=args.cpus)
    overhead = args.overhead
    results = []
    for task in args.tasks:
        ds, fs, features_cfg, feat_s = load_task(task, args.data_dir, args.descriptors)
        print(
            f"{task}: {len(ds)} rows, descriptors {list(fs.descriptor_sets)} ({fs.descriptors.shape[1]} columns), "
            f"featurized/loaded in {feat_s:.1f} s (cached; not part of either arm)",
            flush=True,
        )
        for fold in args.folds:
            ours = run_ours(task, fold, args, workdir, features_cfg, ds, fs, overhead)
            overhead = ours["overhead_s"]
            ag = run_autogluon(task, fold, args, workdir, ds, fs)
            row = {"task": task, "fold": fold, "ours": ours, "autogluon": ag, "ratio": ours["mae"] / ag["mae"]}
            results.append(row)
            print(
                f"  fold {fold}: ours {ours['mae']:.4g} ({ours['wall_s']:.0f} s, {ours['n_trials']} trials, "
                f"{ours['final']} {'+'.join(ours['members'])}, "
                f"best single {ours['best_family']} {ours['best_trial_test_mae']:.4g}) | AutoGluon {ag['mae']:.4g} "
                f"({ag['wall_s']:.0f} s, best {ag['best_model']}) | ratio {row['ratio']:.3f}",
                flush=True,
            )
            if args.json:
                Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=1, default=str))
    print(f"\nload average {os.getloadavg()}")
    print(f"{'task':<22} {'fold':>4} {'ours MAE':>10} {'AG MAE':>10} {'ours/AG':>8} {'ours s':>7} {'AG s':>7}")
    ok = True
    for task in args.tasks:
        rows = [r for r in results if r["task"] == task]
        for r in rows:
            print(
                f"{task:<22} {r['fold']:>4} {r['ours']['mae']:>10.4g} {r['autogluon']['mae']:>10.4g} "
                f"{r['ratio']:>8.3f} {r['ours']['wall_s']:>7.0f} {r['autogluon']['wall_s']:>7.0f}"
            )
        if rows:
            mo = float(np.mean([r["ours"]["mae"] for r in rows]))
            ma = float(np.mean([r["autogluon"]["mae"] for r in rows]))
            verdict = "PASS" if mo <= ma else "FAIL"
            ok &= mo <= ma
            print(
                f"{task:<22} {'mean':>4} {mo:>10.4g} {ma:>10.4g} {mo / ma:>8.3f}   target ours <= AutoGluon: {verdict}"
            )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
