"""Does the ``chgnet`` descriptor set help?  One fixed LightGBM on matbench's official folds.

For each task and official fold: LightGBM with the lgbm family's default hyperparameters
(``LGBMParams()``: 1500 rounds, learning rate 0.03, ..., no early stopping, seed 0) is fitted on
the fold's whole training part (train + inner val) and scored on the test fold, once on the
default descriptor sets (magpie, density, symmetry, bonds) and once on the default sets +
``chgnet`` (the pretrained CHGNet's 64-dim crystal feature).  The test fold only measures.
Prints the test MAE per fold side by side, their means, and the embedding throughput (structures
per second of the chgnet set, when it was computed and not read from the cache).

    python benchmarks/chgnet_embedding.py                              # both tasks, folds 0-4
    python benchmarks/chgnet_embedding.py --tasks matbench_dielectric --folds 0,1,2 --fresh-cache
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import numpy as np

from matfusion.config import DataConfig, FeaturesConfig
from matfusion.data import load_dataset, split_fold
from matfusion.data.cache import FeatureCache
from matfusion.data.descriptors import DEFAULT_STRUCTURE_SETS, registry
from matfusion.data.featurize import featurize
from matfusion.data.parallel import usable_cores
from matfusion.families import get as family

SETS = {"default": list(DEFAULT_STRUCTURE_SETS), "default+chgnet": [*DEFAULT_STRUCTURE_SETS, "chgnet"]}


def run_task(task: str, folds: list[int], cache_dir: str, n_jobs: int) -> dict:
    ds = load_dataset(DataConfig(source=task))
    cache = FeatureCache(cache_dir)
    cached = cache.path(registry()["chgnet"].cache_key(ds.content_hash)).is_file()
    featurize(ds, FeaturesConfig(descriptors=SETS["default"], cache_dir=cache_dir), graphs=False)
    t0 = time.time()  # the default sets are in the cache now: this times the chgnet set alone
    wide = featurize(ds, FeaturesConfig(descriptors=SETS["default+chgnet"], cache_dir=cache_dir), graphs=False)
    seconds = time.time() - t0
    narrow_width = len(wide.descriptor_columns) - registry()["chgnet"].width
    matrices = {"default": wide.descriptors[:, :narrow_width], "default+chgnet": wide.descriptors}
    nan_rows = int(np.isnan(wide.descriptors[:, narrow_width:]).all(axis=1).sum())
    lgbm = family("lgbm")
    params = lgbm.Params()
    y = np.asarray(ds.targets, dtype=np.float64).reshape(len(ds), -1)[:, 0]
    maes: dict = {name: [] for name in SETS}
    for fold in folds:
        split = split_fold(ds, fold)
        train = np.sort(np.concatenate([split.train, split.val]))  # the fold's whole training part
        assert not set(train.tolist()) & set(split.test.tolist())
        for name, X in matrices.items():
            model = lgbm.fit_matrix(params, X[train], y[train], seed=0, n_jobs=n_jobs)
            pred = np.asarray(lgbm.predict_matrix(model, X[split.test])).reshape(len(split.test), -1)[:, 0]
            maes[name].append(float(np.mean(np.abs(pred - y[split.test]))))
        print(
            f"{task} fold {fold}: " + ", ".join(f"{n} {maes[n][-1]:.4f}" for n in SETS),
            file=sys.stderr,
            flush=True,
        )
    return {
        "rows": len(ds),
        "maes": maes,
        "featurize_s": seconds,
        "chgnet_cached": cached,
        "nan_rows": nan_rows,
        "target": ds.target_name,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", default="matbench_dielectric,matbench_phonons")
    p.add_argument("--folds", default="0,1,2,3,4")
    p.add_argument("--cache-dir", default=None, help="feature cache (default: the usual one)")
    p.add_argument("--fresh-cache", action="store_true", help="a new temporary cache: the embedding is timed")
    p.add_argument("--n-jobs", type=int, default=0, help="LightGBM / torch threads; 0 = every usable core")
    args = p.parse_args(argv)
    folds = [int(f) for f in args.folds.split(",")]
    n_jobs = args.n_jobs or usable_cores()
    tmp = tempfile.TemporaryDirectory() if args.fresh_cache else None
    cache_dir = tmp.name if tmp else args.cache_dir
    print(f"LightGBM: lgbm family defaults, {n_jobs} thread(s); load average {os.getloadavg()[0]:.1f}")
    for task in args.tasks.split(","):
        r = run_task(task, folds, cache_dir, n_jobs)
        a, b = r["maes"]["default"], r["maes"]["default+chgnet"]
        print(f"\n{task} ({r['rows']} rows, target {r['target']}), test MAE")
        print("| fold | default | default + chgnet | change |")
        print("|---|---|---|---|")
        for fold, x, z in zip(folds, a, b):
            print(f"| {fold} | {x:.4f} | {z:.4f} | {z - x:+.4f} ({100 * (z - x) / x:+.1f} %) |")
        ma, mb = float(np.mean(a)), float(np.mean(b))
        print(f"| mean | {ma:.4f} | {mb:.4f} | {mb - ma:+.4f} ({100 * (mb - ma) / ma:+.1f} %) |")
        print(f"chgnet rows all NaN (not embeddable): {r['nan_rows']}")
        if r["chgnet_cached"]:
            print(f"featurization (every set from the cache, chgnet included): {r['featurize_s']:.1f} s")
        else:
            print(
                f"chgnet embedding: {r['featurize_s']:.1f} s for {r['rows']} structures, "
                f"{r['rows'] / r['featurize_s']:.1f} structures/s ({n_jobs} torch thread(s))"
            )
    if tmp:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
