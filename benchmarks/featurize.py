"""Featurization throughput: a cold run (empty cache: the crystal graphs and the default
descriptor sets, Magpie included, computed) and a warm run (same cache dir: everything read
back from disk), in structures per second.  Measured figures: docs/notes-data.md.

    python benchmarks/featurize.py [--task matbench_phonons] [--data-dir DIR] [--n-jobs N]

Targets (2 cores): cold >= 300 structures/s, warm >= 20,000 structures/s.  Exits 1 when a
target is missed.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

COLD_TARGET = 300.0
WARM_TARGET = 20_000.0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--task", default="matbench_phonons", help="matbench task with structures (default: %(default)s)"
    )
    parser.add_argument("--data-dir", default=None, help="data dir (default: $MATFUSION_DATA or ../shared/data)")
    parser.add_argument("--n-jobs", type=int, default=0, help="worker processes; 0 = all cores (default)")
    args = parser.parse_args(argv)

    from matfusion.config import DataConfig, FeaturesConfig
    from matfusion.data import load_dataset
    from matfusion.data.cache import FeatureCache
    from matfusion.data.descriptors import magpie_columns
    from matfusion.data.featurize import featurize
    from matfusion.data.parallel import default_n_jobs, usable_cores

    ds = load_dataset(DataConfig(source=args.task, data_dir=args.data_dir))
    n = len(ds)
    magpie_columns()  # import matminer and build the featurizer once, outside the timings
    n_jobs = default_n_jobs(args.n_jobs)

    with tempfile.TemporaryDirectory(prefix="matfusion-bench-") as cache_dir:
        features = FeaturesConfig(cache_dir=cache_dir, n_jobs=args.n_jobs)
        t = time.perf_counter()
        cold = featurize(ds, features, progress=False, cache=FeatureCache(cache_dir))
        cold_s = time.perf_counter() - t
        t = time.perf_counter()
        warm = featurize(ds, features, progress=False, cache=FeatureCache(cache_dir))
        warm_s = time.perf_counter() - t
        cache_mb = sum(os.path.getsize(os.path.join(cache_dir, f)) for f in os.listdir(cache_dir)) / 2**20
    if cold.from_cache or not warm.from_cache:
        print(f"error: expected a cold then a warm run (from_cache: {cold.from_cache}, {warm.from_cache})")
        return 2

    cold_rate, warm_rate = n / cold_s, n / warm_s
    graphs = cold.graphs
    print(
        f"{ds.name}: {n} structures, {'with' if graphs is not None else 'no'} graphs"
        + (
            f" ({len(graphs.distance)} edges, cutoff {graphs.cutoff} A, max {graphs.max_neighbors} neighbours)"
            if graphs is not None
            else ""
        )
        + f"; {n_jobs} worker(s) on {usable_cores()} usable core(s); cache {cache_mb:.1f} MiB"
    )
    rows = [
        ("cold (compute + save)", cold_s, cold_rate, COLD_TARGET),
        ("warm (load from cache)", warm_s, warm_rate, WARM_TARGET),
    ]
    print(f"{'run':<24}{'seconds':>10}{'structures/s':>15}{'target':>12}  result")
    ok = True
    for name, secs, rate, target in rows:
        passed = rate >= target
        ok &= passed
        print(
            f"{name:<24}{secs:>10.3f}{rate:>15,.0f}{'>= ' + format(target, ',.0f'):>12}  {'PASS' if passed else 'FAIL'}"
        )
    print(f"warm / cold speed-up: {warm_rate / cold_rate:,.0f}x")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
