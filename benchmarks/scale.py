"""Scale: featurization and one CGCNN trial's memory as the dataset grows, eager vs lazy graphs.

A synthetic table of N structures is made from matminer's flla_2015 (3,938 crystals, under
``$MATFUSION_DATA/matminer``): structure ``k`` is crystal ``k mod 3938`` with a random symmetric
lattice strain of at most +-2 % per component and Gaussian site displacements (sigma 0.02 A),
seeded, its target the crystal's formation energy.  For every N (each in a fresh subprocess, so
that peak RSS is that N's alone):

1. featurize (empty cache, ``FeaturesConfig()`` defaults: graphs, then the descriptor matrix):
   wall time, structures/s, and the driver's peak RSS (and that of its largest forked worker);
2. pack the trial data (80 % train / 10 % inner validation rows, seeded), ``ray.put`` it, and run
   one CGCNN trial (its family's defaults, fusion none, 1 epoch, 1 thread) as a Ray task in a fresh
   worker (``max_calls=1``), twice: graphs built up front (``MATFUSION_EAGER_GRAPHS=1``, the path
   before) and lazily (``LazyGraphDataset``, the default).  Inside the worker: peak RSS
   (``getrusage``; it counts the pages of Ray's shared object store the trial touched), peak USS
   (private memory, sampled every 0.2 s with psutil), the RSS right before training started, and the
   time from the task's start (its ``ray.get`` of the data included) to its first epoch's report.

Then the growth ratios (largest N / smallest N) side by side.  Issue 23's target: per-trial peak RSS
at the larger N within 1.5x of that at 4k.

    nice -n 10 python benchmarks/scale.py [--sizes 4000,40000] [--large] [--out results/scale]

``--large`` adds N = 130,000 (needs ~25 min and several GB on 2 cores).

``--backends N`` measures instead featurization itself at N (default 4,000), in its own process,
with an empty cache each time: ``features.backend: local`` (the forked workers, every core) and
``features.backend: ray`` on a 2-node loopback cluster (``ray.cluster_utils.Cluster``: a head and a
worker raylet, 1 CPU each, on this machine): wall time, structures/s, the shards computed on each
node, and whether the two gave byte-identical arrays (written to featurize_backends.json/.txt).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

SEED = 23
STRAIN = 0.02  # +- per component of the symmetric strain
SHAKE = 0.02  # Angstrom, std of the site displacements
TRIAL = {"family": "cgcnn", "cgcnn": {"fusion": "none"}, "max_epochs": 1, "seed": 0, "cpus": 1}
TARGET_RATIO = 1.5


def peak_rss_mb(who=resource.RUSAGE_SELF) -> float:
    return resource.getrusage(who).ru_maxrss / 1024.0  # Linux: KiB


def synthetic_dataset(n: int, data_dir: str):
    """The seeded table of ``n`` strained and shaken flla_2015 crystals (see the module's docstring)."""
    from pymatgen.core import Lattice, Structure

    from matfusion.config import DataConfig
    from matfusion.data import load_dataset
    from matfusion.data.dataset import Dataset

    base = load_dataset(
        DataConfig(
            source=str(Path(data_dir) / "matminer" / "flla_2015.csv.gz"),
            target="formation_energy_per_atom",
            structure_column="structure",
        )
    )
    rng = np.random.default_rng([SEED, n])
    structures, ids = [], []
    for k in range(n):
        s = base.structures[k % len(base)]
        eps = rng.uniform(-STRAIN, STRAIN, (3, 3))
        eps = (eps + eps.T) / 2
        lattice = Lattice(s.lattice.matrix @ (np.eye(3) + eps))
        frac = s.frac_coords + rng.normal(0.0, SHAKE, (len(s), 3)) @ np.linalg.inv(lattice.matrix)
        structures.append(Structure(lattice, s.species, frac))
        ids.append(f"{base.ids[k % len(base)]}-{k}")
    targets = base.targets[np.arange(n) % len(base)]
    digest = hashlib.sha256(f"{base.content_hash} scale seed={SEED} n={n}".encode()).hexdigest()
    return Dataset("flla_2015-synthetic", ids, structures, targets, base.target_name, digest)


def trial_task(data_ref_list: list, eager: bool) -> dict:
    """One CGCNN trial in this (fresh) Ray worker: its memory and the time to its first epoch."""
    import ray

    t0 = time.perf_counter()
    if eager:
        os.environ["MATFUSION_EAGER_GRAPHS"] = "1"
    else:
        os.environ.pop("MATFUSION_EAGER_GRAPHS", None)
    import psutil

    from matfusion.trainables.loop import LocalSession
    from matfusion.trainables.trial import fit_family

    proc = psutil.Process()
    peak_uss, stop = [0], threading.Event()

    def sample() -> None:
        while not stop.is_set():
            try:
                peak_uss[0] = max(peak_uss[0], proc.memory_full_info().uss)
            except psutil.Error:
                pass
            stop.wait(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    rss_imported = proc.memory_info().rss
    data = ray.get(data_ref_list[0])
    first = {}

    class FirstEpoch(LocalSession):
        def report(self, metrics, state):
            first.setdefault("s", time.perf_counter() - t0)
            first.setdefault("rss", proc.memory_info().rss)
            super().report(metrics, state)

    session = FirstEpoch()
    fit_family(dict(TRIAL), data, session)
    total = time.perf_counter() - t0
    stop.set()
    sampler.join()
    peak_uss[0] = max(peak_uss[0], proc.memory_full_info().uss)
    return {
        "mode": "eager" if eager else "lazy",
        "peak_rss_mb": peak_rss_mb(),
        "peak_uss_mb": peak_uss[0] / 2**20,
        "rss_after_imports_mb": rss_imported / 2**20,
        "rss_at_first_report_mb": first["rss"] / 2**20,
        "first_epoch_s": first["s"],
        "total_s": total,
        "val_mae": session.history[0]["val_mae"],
        "pid": os.getpid(),
    }


def one_size(n: int, data_dir: str) -> dict:
    """Everything measured for N = ``n`` (run in its own process)."""
    import ray

    from matfusion.config import FeaturesConfig
    from matfusion.data.cache import FeatureCache
    from matfusion.data.featurize import cached_graphs, featurize
    from matfusion.data.parallel import default_n_jobs
    from matfusion.trainables.trial_data import pack_trial_data

    t = time.perf_counter()
    ds = synthetic_dataset(n, data_dir)
    made_s = time.perf_counter() - t
    rss_dataset = peak_rss_mb()
    with tempfile.TemporaryDirectory(prefix="matfusion-scale-") as cache_dir:
        features = FeaturesConfig(cache_dir=cache_dir)
        cache = FeatureCache(cache_dir)
        t = time.perf_counter()
        cached_graphs(ds, features, cache, n_jobs=default_n_jobs(0))
        graphs_s = time.perf_counter() - t
        t = time.perf_counter()
        fs = featurize(ds, features, progress=False, cache=cache)  # the graphs from the cache, descriptors computed
        desc_s = time.perf_counter() - t
        cache_mb = sum(p.stat().st_size for p in Path(cache_dir).iterdir()) / 2**20
    out = {
        "n": n,
        "edges": int(len(fs.graphs.distance)),
        "atoms": int(len(fs.graphs.z)),
        "descriptor_columns": int(fs.descriptors.shape[1]),
        "dataset_made_s": made_s,
        "featurize_graphs_s": graphs_s,
        "featurize_descriptors_s": desc_s,
        "featurize_s": graphs_s + desc_s,
        "graphs_per_s": n / graphs_s,
        "descriptors_per_s": n / desc_s,
        "cache_mb": cache_mb,
        "driver_peak_rss_after_dataset_mb": rss_dataset,
        "driver_peak_rss_mb": peak_rss_mb(),
        "featurize_worker_peak_rss_mb": peak_rss_mb(resource.RUSAGE_CHILDREN),
    }
    rows = np.random.default_rng(SEED).permutation(n)
    train, val = np.sort(rows[: int(0.8 * n)]), np.sort(rows[int(0.8 * n) : int(0.9 * n)])
    data = pack_trial_data(fs.descriptors, fs.graphs, ds.targets, train, val)
    out["trial_arrays_mb"] = sum(v.nbytes for part in ("train", "val") for v in data[part].values()) / 2**20
    del fs, ds
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    try:
        ref = ray.put(data)
        task = ray.remote(num_cpus=1, max_calls=1)(trial_task)
        out["trials"] = [ray.get(task.remote([ref], eager)) for eager in (True, False)]
    finally:
        ray.shutdown()
    return out


def featurize_backends(n: int, data_dir: str) -> dict:
    """Featurize wall time at N = ``n``, local vs ray backend on a 2-node loopback cluster."""
    from matfusion.config import FeaturesConfig
    from matfusion.data.featurize import featurize

    ds = synthetic_dataset(n, data_dir)
    out = {"n": n}
    runs = {}
    with tempfile.TemporaryDirectory(prefix="matfusion-backends-") as tmp:
        t = time.perf_counter()
        runs["local"] = featurize(ds, FeaturesConfig(cache_dir=f"{tmp}/local"), progress=False)
        out["local_s"] = time.perf_counter() - t
        out["local_shards"] = runs["local"].shards.total

        # the cluster's processes: a private temp dir (short: Ray's socket paths are limited), matfusion importable
        os.environ["RAY_TMPDIR"] = ray_tmp = tempfile.mkdtemp(prefix="mfb", dir="/tmp")
        root = str(Path(__file__).resolve().parents[1])
        os.environ["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [os.environ.get("PYTHONPATH")])])
        from ray.cluster_utils import Cluster

        t = time.perf_counter()
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        out["cluster_start_s"] = time.perf_counter() - t
        try:
            t = time.perf_counter()
            cfg = FeaturesConfig(cache_dir=f"{tmp}/ray", backend="ray")
            runs["ray"] = featurize(ds, cfg, progress=False, ray_address=cluster.address)
            out["ray_s"] = time.perf_counter() - t
        finally:
            cluster.shutdown()
            shutil.rmtree(ray_tmp, ignore_errors=True)
    stats = runs["ray"].shards
    out["ray_shards"] = stats.total
    out["ray_shards_per_node"] = dict(stats.per_node)
    a, b = runs["local"], runs["ray"]
    out["identical"] = bool(
        a.descriptors.tobytes() == b.descriptors.tobytes()
        and all(v.tobytes() == b.graphs.arrays()[k].tobytes() for k, v in a.graphs.arrays().items())
    )
    return out


def backends_report(r: dict) -> str:
    nodes = ", ".join(f"{node[:8]}: {k}" for node, k in sorted(r["ray_shards_per_node"].items()))
    return (
        f"featurize N={r['n']:,} (graphs + default descriptor sets, empty cache):\n"
        f"  local (forked workers, every core): {r['local_s']:.1f} s = {r['n'] / r['local_s']:.0f} structures/s, "
        f"{r['local_shards']} shards\n"
        f"  ray (2-node loopback cluster, 1 CPU per node; cluster started in {r['cluster_start_s']:.1f} s): "
        f"{r['ray_s']:.1f} s = {r['n'] / r['ray_s']:.0f} structures/s, {r['ray_shards']} shards; "
        f"per node {nodes}\n"
        f"  byte-identical arrays: {r['identical']}"
    )


def ratio(big: float, small: float) -> str:
    return f"{big / small:.2f}x" if small else "-"


def report(results: list[dict]) -> str:
    lines = []
    for r in results:
        lines.append(
            f"N={r['n']:,}: {r['atoms']:,} atoms, {r['edges']:,} edges, {r['descriptor_columns']} descriptor columns; "
            f"dataset made in {r['dataset_made_s']:.1f} s; featurize {r['featurize_s']:.1f} s "
            f"(graphs {r['featurize_graphs_s']:.1f} s = {r['graphs_per_s']:.0f}/s, descriptors "
            f"{r['featurize_descriptors_s']:.1f} s = {r['descriptors_per_s']:.0f}/s), cache {r['cache_mb']:.0f} MiB; "
            f"driver peak RSS {r['driver_peak_rss_mb']:.0f} MiB ({r['driver_peak_rss_after_dataset_mb']:.0f} after "
            f"making the structures), largest featurize worker {r['featurize_worker_peak_rss_mb']:.0f} MiB; "
            f"trial arrays {r['trial_arrays_mb']:.0f} MiB"
        )
    head = f"{'trial (1 CGCNN epoch)':<34}" + "".join(f"{'N=' + format(r['n'], ','):>14}" for r in results)
    lo, hi = results[0], results[-1]
    head += f"{'ratio ' + format(hi['n'], ',') + '/' + format(lo['n'], ','):>18}"
    lines += ["", head]
    for mode in ("eager", "lazy"):
        for key, label, fmt in (
            ("peak_rss_mb", "peak RSS, MiB", ".0f"),
            ("peak_uss_mb", "peak USS (private), MiB", ".0f"),
            ("rss_after_imports_mb", "RSS after imports, MiB", ".0f"),
            ("first_epoch_s", "time to first epoch, s", ".1f"),
        ):
            vals = [next(t for t in r["trials"] if t["mode"] == mode)[key] for r in results]
            lines.append(
                f"{mode + ': ' + label:<34}"
                + "".join(f"{v:>14{fmt}}" for v in vals)
                + f"{ratio(vals[-1], vals[0]):>18}"
            )
    for r in results:
        e, z = (next(t for t in r["trials"] if t["mode"] == m) for m in ("eager", "lazy"))
        lines.append(
            f"N={r['n']:,}: lazy/eager peak RSS {z['peak_rss_mb'] / e['peak_rss_mb']:.2f}, peak USS "
            f"{z['peak_uss_mb'] / e['peak_uss_mb']:.2f}; val MAE eager {e['val_mae']:.6f}, lazy {z['val_mae']:.6f}"
        )
    for mode in ("eager", "lazy"):
        vals = [next(t for t in r["trials"] if t["mode"] == mode)["peak_rss_mb"] for r in results]
        ok = vals[-1] / vals[0] <= TARGET_RATIO
        lines.append(
            f"target (issue 23): {mode} per-trial peak RSS at N={hi['n']:,} within {TARGET_RATIO}x of N={lo['n']:,}: "
            f"{vals[-1] / vals[0]:.2f}x {'PASS' if ok else 'FAIL'}"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="4000,40000", help="comma-separated N (default: %(default)s)")
    ap.add_argument("--large", action="store_true", help="also N = 130,000")
    ap.add_argument("--data-dir", default=os.environ.get("MATFUSION_DATA", "../shared/data"))
    ap.add_argument("--out", default=None, help="folder for scale.json and scale.txt")
    ap.add_argument(
        "--backends",
        type=int,
        nargs="?",
        const=4000,
        default=None,
        metavar="N",
        help="measure featurization local vs ray on a 2-node loopback cluster at N (default 4000) instead",
    )
    ap.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)  # internal: one N, JSON on stdout
    args = ap.parse_args(argv)
    if args.one is not None:
        print("SCALE-JSON " + json.dumps(one_size(args.one, args.data_dir)), flush=True)
        return 0
    if args.backends is not None:
        result = featurize_backends(args.backends, args.data_dir)
        header = (
            f"benchmarks/scale.py --backends {args.backends}: {os.cpu_count()} cores, "
            f"load {os.getloadavg()[0]:.1f} at the end, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
        )
        print(header + "\n" + backends_report(result))
        if args.out:
            out = Path(args.out)
            out.mkdir(parents=True, exist_ok=True)
            (out / "featurize_backends.json").write_text(json.dumps(result, indent=1) + "\n")
            (out / "featurize_backends.txt").write_text(header + "\n" + backends_report(result) + "\n")
        return 0
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()] + ([130_000] if args.large else [])
    results = []
    for n in sizes:
        t = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, __file__, "--one", str(n), "--data-dir", args.data_dir],
            capture_output=True,
            text=True,
        )
        line = next((x for x in proc.stdout.splitlines() if x.startswith("SCALE-JSON ")), None)
        if proc.returncode != 0 or line is None:
            print(proc.stdout[-3000:] + proc.stderr[-3000:], file=sys.stderr)
            print(f"error: N={n} failed (exit {proc.returncode})", file=sys.stderr)
            return 1
        results.append(json.loads(line[len("SCALE-JSON ") :]))
        print(f"N={n:,} done in {time.perf_counter() - t:.0f} s", flush=True)
    text = report(results)
    header = (
        f"benchmarks/scale.py --sizes {','.join(map(str, sizes))}: {os.cpu_count()} cores, "
        f"load {os.getloadavg()[0]:.1f} at the end, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
    )
    print(header + "\n" + text)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "scale.json").write_text(json.dumps(results, indent=1) + "\n")
        (out / "scale.txt").write_text(header + "\n" + text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
