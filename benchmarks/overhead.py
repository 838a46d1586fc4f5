"""Overhead of running trainings under Ray Tune (with matfusion's reporting, checkpoints and
MLflow logging) vs the same trainings in a bare Python loop.

Both arms train the same N CGCNN configs on the same data, one at a time with the same thread
count; the Tune arm uses matfusion's trainable (`run_trial`: a report + checkpoint per epoch)
and its MLflow callback.  Ray is started before timing (a one-off cost printed separately).
Target: Tune / bare wall-time ratio <= 1.10 for ~30-second trials.

    python benchmarks/overhead.py                 # 3 trials of ~30 s per arm
    python benchmarks/overhead.py --epochs 5 --trials 2   # quick look
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
os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")

from matfusion.config import DataConfig, FeaturesConfig
from matfusion.data import load_dataset, split_fold
from matfusion.data.featurize import featurize
from matfusion.trainables.loop import LocalSession
from matfusion.trainables.trial import fit_family, run_trial
from matfusion.trainables.trial_data import pack_trial_data


def trial_configs(n: int, epochs: int, threads: int, checkpoint_every: int = 1) -> list[dict]:
    return [
        {
            "family": "cgcnn",
            "cgcnn": {"hidden": 64, "n_conv": 3, "lr": 2e-3 * (1 + i), "batch_size": 64, "fusion": "none"},
            "max_epochs": epochs,
            "patience": 10 * epochs,
            "seed": i,
            "cpus": threads,
            "checkpoint_every": checkpoint_every,
        }
        for i in range(n)
    ]


def bare(configs, data) -> float:
    t0 = time.perf_counter()
    for cfg in configs:
        fit_family(cfg, data, LocalSession())
    return time.perf_counter() - t0


def _tune_trainable(config, data):
    run_trial(config["trial"], data)


def under_tune(configs, data, threads: int, workdir: Path) -> float:
    """One Tuner running the N configs one at a time (grid over them), with matfusion's
    trainable and MLflow callback."""
    from mlflow.tracking import MlflowClient
    from ray import tune
    from ray.tune import CheckpointConfig, RunConfig, TuneConfig, Tuner

    from matfusion.tracking.logger import MlflowTrialLogger, ensure_experiment

    uri = f"sqlite:///{workdir / 'mlruns.db'}"
    client = MlflowClient(uri)
    exp = ensure_experiment(client, "overhead", str(workdir / "artifacts"))
    parent = client.create_run(exp, run_name="overhead").info.run_id
    tuner = Tuner(
        tune.with_resources(tune.with_parameters(_tune_trainable, data=data), {"cpu": threads}),
        param_space={"trial": tune.grid_search(configs)},
        tune_config=TuneConfig(num_samples=1, max_concurrent_trials=1, reuse_actors=True),
        run_config=RunConfig(
            name="overhead",
            storage_path=str(workdir / "ray"),
            verbose=0,
            callbacks=[MlflowTrialLogger(uri, exp, parent)],
            checkpoint_config=CheckpointConfig(num_to_keep=1),
        ),
    )
    t0 = time.perf_counter()
    result = tuner.fit()
    wall = time.perf_counter() - t0
    if result.errors:
        raise RuntimeError(f"trial failed under Tune: {result.errors}")
    return wall


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trials", type=int, default=4)
    p.add_argument("--epochs", type=int, default=25, help="epochs per trial (~30 s per trial on 2 cores at 25)")
    p.add_argument("--limit", type=int, default=None, help="rows of matbench_phonons (default: all)")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads per trial (1: on 2 cores, 2 OpenMP threads spin-wait beside Ray and add noise)",
    )
    p.add_argument("--checkpoint-every", type=int, default=1, help="epochs between checkpoints (both arms)")
    p.add_argument("--target", type=float, default=1.10)
    args = p.parse_args(argv)

    import ray

    ds = load_dataset(DataConfig(source="matbench_phonons", limit=args.limit))
    split = split_fold(ds, 0, 0.1, seed=0)
    fs = featurize(ds, FeaturesConfig(), progress=False)
    data = pack_trial_data(fs.descriptors, fs.graphs, ds.targets, split.train, split.val)
    configs = trial_configs(args.trials, args.epochs, args.threads, args.checkpoint_every)

    t0 = time.perf_counter()
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    ray_start = time.perf_counter() - t0

    with tempfile.TemporaryDirectory() as tmp:
        # A-B-B-A: bare, Tune, Tune, bare halves, so that drifting machine load hits both alike
        half = max(1, len(configs) // 2)
        first, second = configs[:half], configs[half:]
        walls = {"bare": 0.0, "tune": 0.0}
        walls["bare"] += bare(first, data)
        walls["tune"] += under_tune(first, data, args.threads, Path(tmp) / "a")
        if second:
            walls["tune"] += under_tune(second, data, args.threads, Path(tmp) / "b")
            walls["bare"] += bare(second, data)
        print(f"  bare {walls['bare']:.1f} s, tune {walls['tune']:.1f} s", flush=True)
    ratio = walls["tune"] / walls["bare"]
    per_trial = walls["bare"] / len(configs)
    verdict = "PASS" if ratio <= args.target else "FAIL"
    print(
        f"\n{len(configs)} trials x {args.epochs} epochs (~{per_trial:.0f} s per trial), {args.threads} threads, "
        f"checkpoint every {args.checkpoint_every} epoch(s)"
    )
    print(f"bare loop   {walls['bare']:8.1f} s")
    print(f"under Tune  {walls['tune']:8.1f} s   (Ray start, paid once: {ray_start:.1f} s, not included)")
    print(f"ratio Tune/bare: {ratio:.3f} (target <= {args.target:.2f}): {verdict}")
    return 0 if verdict == "PASS" else 1


if __name__ == "__main__":
    sys.exit(main())
