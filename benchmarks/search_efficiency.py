"""Search efficiency: ASHA + TPE vs random search (no pruning) vs TPE (no pruning).

All three run the real `matfusion` search (Ray Tune, OptunaSearch, MLflow) on matbench_phonons
fold 0 (a seeded subset), CGCNN trials only (GNN epochs are the budget axis), with the same
total budget of training epochs.  For each seed we replay every reported epoch in arrival order
(from MLflow's per-epoch metrics), and count the epochs each method needs before its best
inner-validation MAE reaches random search's final best.  Target: ASHA+TPE needs <= 1/3 of the
epochs random search needs (epochs summed over the seeds, so that one lucky early random trial
does not decide it; the mean of the per-seed ratios is printed too).  TPE and ASHA compare
trials by their best inner-validation MAE so far (``best_val_mae``), as the real search does.
None of the methods is seeded with the known-good defaults (``points_to_evaluate: false``).
Random search runs first and to the end (its final best is the target); TPE and ASHA+TPE then
stop as soon as a trial reaches that target (``search.stop_at_val_mae``: the epochs after it do
not change the count; ``--full-runs`` runs them to the end of the budget too).

    python benchmarks/search_efficiency.py                # 3 seeds x 3 methods x 1296 epochs, ~55 min on 2 cores
    python benchmarks/search_efficiency.py --seeds 0 --limit 300 --trials 8   # quick look
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import numpy as np
from mlflow.tracking import MlflowClient

from matfusion.config import config_from_dict
from matfusion.search.tuner import run_search

METHODS = {
    # name: (sampler, scheduler)
    "random": ("random", "fifo"),
    "tpe": ("tpe", "fifo"),
    "asha+tpe": ("tpe", "asha"),
}


def epoch_timeline(tracking_uri: str, experiment: str) -> list[float]:
    """val_mae of every reported epoch of every trial, in the order the driver received them."""
    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], max_results=10000)
    events = []
    for r in runs:
        if "mlflow.parentRunId" not in r.data.tags:
            continue
        for m in client.get_metric_history(r.info.run_id, "val_mae"):
            events.append((m.timestamp, r.info.start_time, m.step, m.value))
    events.sort()
    return [e[3] for e in events]


def epochs_to_reach(timeline: list[float], target: float) -> float:
    best = np.inf
    for i, v in enumerate(timeline, start=1):
        best = min(best, v)
        if best <= target:
            return float(i)
    return float("inf")


def run_method(method: str, seed: int, args, workdir: Path, stop_at=None) -> list[float]:
    sampler, scheduler = METHODS[method]
    budget = args.trials * args.max_epochs
    name = f"eff-{method.replace('+', '-')}-s{seed}"
    raw = {
        "name": name,
        "data": {"source": "matbench_phonons", "fold": 0, "limit": args.limit, "val_fraction": args.val_fraction},
        "features": {"n_jobs": 0},
        "search": {
            "families": ["cgcnn"],
            "fusions": ["none", "early"],
            "preset": "quick",
            "sampler": sampler,
            "scheduler": scheduler,
            "points_to_evaluate": False,
            "num_samples": args.trials if scheduler == "fifo" else args.trials * 20,
            "max_total_epochs": budget,
            "max_epochs": args.max_epochs,
            "stop_at_val_mae": stop_at,
            "grace_period": args.grace_period,
            "reduction_factor": args.reduction_factor,
            "asha_mode": args.asha_mode,
            "early_stopping_patience": 10 * args.max_epochs,
            "seed": seed,
            "max_concurrent": args.max_concurrent,
            "cpus_per_trial": 2 / args.max_concurrent,
            "storage_path": str(workdir / "ray"),
        },
        "mlflow": {
            "tracking_uri": f"sqlite:///{workdir / 'mlruns.db'}",
            "artifact_location": str(workdir / "artifacts"),
        },
    }
    if args.data_dir:
        raw["data"]["data_dir"] = args.data_dir
    if args.lr_schedule and scheduler == "asha":  # random search and TPE train one cosine cycle
        raw["search"]["lr_schedule"] = args.lr_schedule
    cfg = config_from_dict(raw, origin=name)
    t0 = time.time()
    res = run_search(cfg, progress=False)
    timeline = epoch_timeline(res.tracking_uri, name)[:budget]
    cut = " (stopped at the target)" if stop_at is not None and min(timeline) <= stop_at else ""
    print(
        f"  {method:9s} seed {seed}: {len(res.leaderboard)} trials, {len(timeline)} epochs{cut}, "
        f"best val_mae {min(timeline):.2f}, {time.time() - t0:.0f} s",
        flush=True,
    )
    return timeline


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--limit", type=int, default=1000, help="rows of matbench_phonons used (seeded subset)")
    p.add_argument(
        "--val-fraction",
        type=float,
        default=0.3,
        help="inner validation share of the fold's training part (1,000 rows: ~560 train / ~240 val)",
    )
    p.add_argument("--trials", type=int, default=48, help="random search trials; budget = trials x max_epochs")
    p.add_argument("--max-epochs", type=int, default=27)
    p.add_argument("--grace-period", type=int, default=1, help="ASHA's first rung (rungs 1, 3, 9, 27)")
    p.add_argument("--reduction-factor", type=int, default=3)
    p.add_argument(
        "--asha-mode",
        choices=["stop", "promote"],
        default="promote",
        help="ASHA's rule at a rung (search.asha_mode): Ray's stopping rule or the paper's promotion rule",
    )
    p.add_argument(
        "--lr-schedule",
        choices=["cosine", "rungs"],
        default=None,
        help="GNN learning rate (search.lr_schedule; default: the search's default, cosine): one cosine "
        "cycle over max_epochs, or cycles that end at ASHA's rungs (applied to ASHA+TPE only; "
        "random search and TPE always train one cosine cycle)",
    )
    p.add_argument("--max-concurrent", type=int, default=2)
    p.add_argument("--data-dir", default=None)
    p.add_argument(
        "--full-runs",
        action="store_true",
        help="run TPE and ASHA+TPE to the end of the budget (default: stop once random's best is reached)",
    )
    p.add_argument(
        "--target", type=float, default=1 / 3, help="pass if ASHA+TPE needs <= this share of random's epochs"
    )
    p.add_argument(
        "--methods",
        nargs="+",
        choices=[m for m in METHODS if m != "random"],
        default=[m for m in METHODS if m != "random"],
        help="methods run against random search (always run: it sets the target); "
        "e.g. --methods asha+tpe to leave out TPE without pruning",
    )
    args = p.parse_args(argv)
    if "asha+tpe" not in args.methods:
        p.error("--methods must include asha+tpe (the verdict compares it with random search)")

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            print(f"seed {seed}: budget {args.trials * args.max_epochs} epochs per method", flush=True)
            timelines = {"random": run_method("random", seed, args, Path(tmp) / f"random-{seed}")}
            target = min(timelines["random"])
            for m in args.methods:
                timelines[m] = run_method(
                    m, seed, args, Path(tmp) / f"{m}-{seed}", stop_at=None if args.full_runs else target
                )
            need = {m: epochs_to_reach(t, target) for m, t in timelines.items()}
            print(
                f"  seed {seed}: target {target:.4f}, epochs needed: " + ", ".join(f"{m} {need[m]:.0f}" for m in need),
                flush=True,
            )
            rows.append((seed, target, need))

    print("\nepochs needed to reach random search's final best inner-validation MAE")
    print(f"{'seed':>4} {'target':>9} {'random':>7} {'tpe':>7} {'asha+tpe':>9} {'asha/random':>12} {'tpe/random':>11}")
    ran_tpe = "tpe" in args.methods
    ratios = []
    for seed, target, need in rows:
        r_asha = need["asha+tpe"] / need["random"]
        ratios.append(r_asha)
        tpe = (
            (f"{need['tpe']:>7.0f}", f"{need['tpe'] / need['random']:>11.3f}")
            if ran_tpe
            else (f"{'not run':>7}", f"{'-':>11}")
        )
        print(
            f"{seed:>4} {target:>9.2f} {need['random']:>7.0f} {tpe[0]} {need['asha+tpe']:>9.0f} "
            f"{r_asha:>12.3f} {tpe[1]}"
        )
    total = {m: float(sum(need[m] for _, _, need in rows)) for m in ["random", *args.methods]}
    ratio = total["asha+tpe"] / total["random"]
    tpe_total = f"tpe {total['tpe']:.0f}, " if ran_tpe else "tpe not run, "
    print(
        f"\nall seeds together: random {total['random']:.0f}, {tpe_total}"
        f"asha+tpe {total['asha+tpe']:.0f} epochs (inf: not reached within the budget)"
    )
    print(f"mean of the per-seed ratios: {float(np.mean(ratios)):.3f}")
    verdict = "PASS" if ratio <= args.target else "FAIL"
    tpe_ratio = f", TPE / random: {total['tpe'] / total['random']:.3f}" if ran_tpe else ""
    print(
        f"ASHA+TPE / random epochs ratio (summed over seeds): {ratio:.3f}{tpe_ratio} "
        f"(target <= {args.target:.3f}): {verdict}"
    )
    return 0 if verdict == "PASS" else 1


if __name__ == "__main__":
    sys.exit(main())
