"""Scale: featurization and one CGCNN trial's memory as the dataset grows, eager vs lazy vs on-disk graphs.

A synthetic table of N structures is made from matminer's flla_2015 (3,938 crystals, under
``$MATFUSION_DATA/matminer``): structure ``k`` is crystal ``k mod 3938`` with a random symmetric
lattice strain of at most +-2 % per component and Gaussian site displacements (sigma 0.02 A),
seeded, its target the crystal's formation energy.  For every N (each in a fresh subprocess, so
that peak RSS is that N's alone):

1. featurize (empty cache, ``FeaturesConfig()`` defaults: graphs, then the descriptor matrix):
   wall time, structures/s, and the driver's peak RSS (and that of its largest forked worker);
2. pack the trial data (80 % train / 10 % inner validation rows, seeded), ``ray.put`` it, and run
   one CGCNN trial (its family's defaults, fusion none, 1 epoch, 1 thread) as a Ray task in a fresh
   worker (``max_calls=1``), three times: graphs built up front (``MATFUSION_EAGER_GRAPHS=1``, the path
   before), lazily from the packed arrays in the object store (``LazyGraphDataset``, the default), and
   from disk (``features.graph_store: disk``: the graphs written as shard files under the cache dir,
   the trial given their index and reading a graph per item; the store's write time, size and a
   second, reusing write are reported too).  Inside the worker: peak RSS
   (``getrusage``; it counts the pages of Ray's shared object store the trial touched), peak USS
   (private memory, sampled every 0.2 s with psutil), the RSS right before training started, and the
   time from the task's start (its ``ray.get`` of the data included) to its first epoch's report.

Then the growth ratios (largest N / smallest N) side by side.  Issue 23's target: per-trial peak RSS
at the larger N within 1.5x of that at 4k.

    nice -n 10 python benchmarks/scale.py [--sizes 4000,40000] [--large] [--out results/scale]

``--large`` adds N = 130,000 (needs ~25 min and several GB on 2 cores).

``--search N`` runs instead a real search through the config path (``run_search``: real Ray, MLflow
in sqlite under ``--work``): 2 CGCNN trials (fusion none, 1 epoch, 1 CPU each, 2 concurrent, fifo)
on the synthetic N-structure table, written as a JSON table (its own process) and featurized by the
search (graphs + magpie; the table's content hash is not the in-memory dataset's, so ``--sizes``'
cache is not reused), ``features.graph_store`` from ``--graph-store`` (default disk).  The search runs
in a child process; every 0.5 s the summed RSS of it and its descendants (the Ray processes) and the
machine's used memory are sampled.  Reported: completed or not, run_search's wall time, the peaks
(search_<N>_<store>.json/.txt).  ``--work DIR`` keeps the table, cache and runs for a second call.

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
MODES = ("eager", "lazy", "disk")


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


def trial_task(data_ref_list: list, mode: str) -> dict:
    """One CGCNN trial in this (fresh) Ray worker: its memory and the time to its first epoch.  ``mode``:
    eager (every graph built up front), lazy (built per batch from the packed arrays in the object
    store) or disk (read per batch from the graph store's shard files; the data carries their index)."""
    import ray

    t0 = time.perf_counter()
    eager = mode == "eager"
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
        "mode": mode,
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
    t = time.perf_counter()
    ds = synthetic_dataset(n, data_dir)
    made_s = time.perf_counter() - t
    rss_dataset = peak_rss_mb()
    holder = [ds]  # measure_size drops the structures once featurized
    del ds
    with tempfile.TemporaryDirectory(prefix="matfusion-scale-") as cache_dir:
        out = measure_size(holder, n, made_s, rss_dataset, cache_dir)
    return out


def measure_size(holder: list, n: int, made_s: float, rss_dataset: float, cache_dir: str) -> dict:
    """Featurize ``holder``'s dataset into ``cache_dir``, then the three trials (see the module's docstring)."""
    import ray

    from matfusion.config import FeaturesConfig
    from matfusion.data.cache import FeatureCache
    from matfusion.data.featurize import cached_graphs, featurize
    from matfusion.data.parallel import default_n_jobs
    from matfusion.trainables.trial_data import pack_trial_data

    ds = holder.pop()
    features = FeaturesConfig(cache_dir=cache_dir)
    cache = FeatureCache(cache_dir)
    t = time.perf_counter()
    cached_graphs(ds, features, cache, n_jobs=default_n_jobs(0))
    graphs_s = time.perf_counter() - t
    t = time.perf_counter()
    fs = featurize(ds, features, progress=False, cache=cache)  # the graphs from the cache, descriptors computed
    desc_s = time.perf_counter() - t
    cache_mb = sum(p.stat().st_size for p in Path(cache_dir).iterdir() if p.is_file()) / 2**20
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
    store_root = Path(cache_dir) / "graph-shards"
    t = time.perf_counter()
    data_disk = pack_trial_data(fs.descriptors, fs.graphs, ds.targets, train, val, graph_store_dir=store_root)
    out["graph_store_write_s"] = time.perf_counter() - t
    t = time.perf_counter()
    again = pack_trial_data(fs.descriptors, fs.graphs, ds.targets, train, val, graph_store_dir=store_root)
    out["graph_store_reuse_s"] = time.perf_counter() - t  # checksums checked, nothing written
    out["graph_store_reused"] = again["train"]["graph_store"] == data_disk["train"]["graph_store"]
    out["graph_store_mb"] = sum(p.stat().st_size for p in store_root.rglob("*") if p.is_file()) / 2**20
    out["graph_store_shards"] = sum(len(data_disk[part]["graph_store"]["shards"]) for part in ("train", "val"))
    out["trial_arrays_disk_mb"] = (
        sum(v.nbytes for part in ("train", "val") for v in data_disk[part].values() if isinstance(v, np.ndarray))
        / 2**20
    )
    del fs, ds, again
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    try:
        task = ray.remote(num_cpus=1, max_calls=1)(trial_task)
        ref = ray.put(data)
        out["trials"] = [ray.get(task.remote([ref], mode)) for mode in ("eager", "lazy")]
        del ref
        ref = ray.put(data_disk)
        out["trials"].append(ray.get(task.remote([ref], "disk")))
    finally:
        ray.shutdown()
    return out


def write_table(n: int, data_dir: str, path: str) -> None:
    """The synthetic table of ``n`` structures as a JSON list of records (``id``, ``target``, ``structure``:
    lattice matrix and sites with fractional coordinates), for the search's config path."""
    ds = synthetic_dataset(n, data_dir)
    with open(path, "w") as fh:
        fh.write("[")
        for k, (sid, s, y) in enumerate(zip(ds.ids, ds.structures, ds.targets)):
            sites = [
                {"species": [{"element": str(site.specie), "occu": 1}], "abc": [float(c) for c in site.frac_coords]}
                for site in s
            ]
            rec = {
                "id": sid,
                "target": float(y),
                "structure": {"lattice": {"matrix": s.lattice.matrix.tolist()}, "sites": sites},
            }
            fh.write(("," if k else "") + json.dumps(rec))
        fh.write("]")


def search_config(table: str, work: str, n: int, store: str) -> dict:
    """2 CGCNN trials (fusion none, 1 epoch, 1 CPU each), 2 at a time, on the table; MLflow in sqlite under
    ``work``; the graphs as ``features.graph_store: store``."""
    return {
        "name": f"scale-search-{n}",
        "data": {"source": table, "target": "target", "structure_column": "structure", "id_column": "id"},
        "features": {"descriptors": ["magpie"], "cache_dir": f"{work}/cache", "graph_store": store},
        "search": {
            "families": ["cgcnn"],
            "fusions": ["none"],
            "num_samples": 2,
            "max_concurrent": 2,
            "max_epochs": 1,
            "grace_period": 1,
            "cpus_per_trial": 1,
            "scheduler": "fifo",
            "seed": 0,
            "storage_path": f"{work}/ray_results",
        },
        "mlflow": {"tracking_uri": f"sqlite:///{work}/mlflow.db", "artifact_location": f"{work}/mlartifacts"},
    }


def search_one(table: str, work: str, n: int, store: str) -> dict:
    """Run the search of :func:`search_config` (in this process: the parent samples its memory)."""
    from matfusion.config import Config
    from matfusion.search.tuner import run_search

    t = time.perf_counter()
    result = run_search(Config(**search_config(table, work, n, store)), progress=False)
    return {
        "wall_s": time.perf_counter() - t,
        "n_trials": result.n_trials,
        "n_succeeded": result.n_succeeded,
        "n_failed": result.n_failed,
        "interrupted": result.interrupted,
        "best_val_mae": result.best_val_mae,
        "best_test_mae": result.best_test_mae,
        "completed": bool(result.n_succeeded == 2 and not result.interrupted),
    }


def tree_rss(proc) -> tuple[float, int]:
    """(sum of the RSS of ``proc`` and every descendant (the Ray processes), MiB; how many)."""
    import psutil

    total, count = 0, 0
    try:
        procs = [proc, *proc.children(recursive=True)]
    except psutil.Error:
        return 0.0, 0
    for p in procs:
        try:
            total += p.memory_info().rss
            count += 1
        except psutil.Error:
            pass
    return total / 2**20, count


def search_step(n: int, data_dir: str, work: str, store: str) -> dict:
    """Write the table (its own process), then run the search in a child process while sampling, every
    0.5 s, the summed RSS of the child and its descendants and the machine's used memory."""
    import psutil

    table = f"{work}/synthetic-{n}.json"
    out = {"n": n, "graph_store": store}
    t = time.perf_counter()
    if not Path(table).is_file():
        subprocess.run([sys.executable, __file__, "--table", str(n), table, "--data-dir", data_dir], check=True)
    out["table_s"] = time.perf_counter() - t
    out["table_mb"] = Path(table).stat().st_size / 2**20
    used0 = psutil.virtual_memory().used
    t = time.perf_counter()
    child = subprocess.Popen(
        [sys.executable, __file__, "--search-one", str(n), table, work, store],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    proc = psutil.Process(child.pid)
    peak = {"tree_rss_mb": 0.0, "processes": 0, "used_mb": 0.0}
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            rss, count = tree_rss(proc)
            if rss > peak["tree_rss_mb"]:
                peak["tree_rss_mb"], peak["processes"] = rss, count
            peak["used_mb"] = max(peak["used_mb"], psutil.virtual_memory().used / 2**20)
            stop.wait(0.5)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    log_lines = child.stdout.read().splitlines()
    child.wait()
    stop.set()
    sampler.join()
    out["process_wall_s"] = time.perf_counter() - t
    out["exit"] = child.returncode
    line = next((x for x in log_lines if x.startswith("SEARCH-JSON ")), None)
    out.update(json.loads(line[len("SEARCH-JSON ") :]) if line else {"completed": False})
    out["peak_tree_rss_mb"] = peak["tree_rss_mb"]
    out["processes_at_peak"] = peak["processes"]
    out["machine_used_before_mb"] = used0 / 2**20
    out["machine_used_peak_mb"] = peak["used_mb"]
    out["machine_total_mb"] = psutil.virtual_memory().total / 2**20
    out["log_tail"] = log_lines[-15:]
    return out


def search_report(r: dict) -> str:
    return (
        f"search N={r['n']:,} (2 CGCNN trials, 2 concurrent, 1 epoch, 1 CPU each; graph_store {r['graph_store']}): "
        f"completed {r['completed']} (exit {r['exit']}, trials {r.get('n_succeeded', 0)} succeeded / "
        f"{r.get('n_failed', '-')} failed), run_search wall {r.get('wall_s', float('nan')):.0f} s "
        f"(process {r['process_wall_s']:.0f} s; table {r['table_mb']:.0f} MiB written in {r['table_s']:.0f} s); "
        f"best val MAE {r.get('best_val_mae', float('nan')):.4f}, its test MAE {r.get('best_test_mae', float('nan')):.4f}\n"
        f"  peak memory: driver + Ray processes (summed RSS, shared pages counted in each) "
        f"{r['peak_tree_rss_mb']:.0f} MiB over {r['processes_at_peak']} processes; machine used "
        f"{r['machine_used_peak_mb']:.0f} MiB at peak ({r['machine_used_before_mb']:.0f} before, other users "
        f"included; {r['machine_total_mb']:.0f} MiB total)"
    )


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
            f"trial arrays {r['trial_arrays_mb']:.0f} MiB; graph store {r['graph_store_mb']:.0f} MiB in "
            f"{r['graph_store_shards']} shards written in {r['graph_store_write_s']:.1f} s (reused in "
            f"{r['graph_store_reuse_s']:.1f} s: {r['graph_store_reused']}), trial arrays with it "
            f"{r['trial_arrays_disk_mb']:.0f} MiB"
        )
    head = f"{'trial (1 CGCNN epoch)':<34}" + "".join(f"{'N=' + format(r['n'], ','):>14}" for r in results)
    lo, hi = results[0], results[-1]
    head += f"{'ratio ' + format(hi['n'], ',') + '/' + format(lo['n'], ','):>18}"
    lines += ["", head]
    for mode in MODES:
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
        e, z, d = (next(t for t in r["trials"] if t["mode"] == m) for m in MODES)
        lines.append(
            f"N={r['n']:,}: lazy/eager peak RSS {z['peak_rss_mb'] / e['peak_rss_mb']:.2f}, peak USS "
            f"{z['peak_uss_mb'] / e['peak_uss_mb']:.2f}; disk/eager peak RSS {d['peak_rss_mb'] / e['peak_rss_mb']:.2f}, "
            f"peak USS {d['peak_uss_mb'] / e['peak_uss_mb']:.2f}; val MAE eager {e['val_mae']:.6f}, "
            f"lazy {z['val_mae']:.6f}, disk {d['val_mae']:.6f}"
        )
    for mode in MODES:
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
    ap.add_argument(
        "--search",
        type=int,
        default=None,
        metavar="N",
        help="run a real search (2 concurrent CGCNN trials, 1 epoch) on the synthetic N-structure table instead",
    )
    ap.add_argument(
        "--graph-store", default="disk", choices=("memory", "disk"), help="the search's features.graph_store"
    )
    ap.add_argument(
        "--work", default=None, help="--search: folder kept for the table, cache, MLflow (default: a temp one)"
    )
    ap.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)  # internal: one N, JSON on stdout
    ap.add_argument("--table", nargs=2, default=None, help=argparse.SUPPRESS)  # internal: N, path
    ap.add_argument("--search-one", nargs=4, default=None, help=argparse.SUPPRESS)  # internal: N, table, work, store
    args = ap.parse_args(argv)
    if args.table is not None:
        write_table(int(args.table[0]), args.data_dir, args.table[1])
        return 0
    if args.search_one is not None:
        n, table, work, store = args.search_one
        print("SEARCH-JSON " + json.dumps(search_one(table, work, int(n), store)), flush=True)
        return 0
    if args.search is not None:
        work = args.work or tempfile.mkdtemp(prefix="matfusion-search-")
        Path(work).mkdir(parents=True, exist_ok=True)
        result = search_step(args.search, args.data_dir, str(Path(work).resolve()), args.graph_store)
        header = (
            f"benchmarks/scale.py --search {args.search} --graph-store {args.graph_store}: {os.cpu_count()} cores, "
            f"load {os.getloadavg()[0]:.1f} at the end, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
        )
        text = search_report(result)
        print(header + "\n" + text)
        if not result["completed"]:
            print("\n".join(result["log_tail"]), file=sys.stderr)
        if args.out:
            out = Path(args.out)
            out.mkdir(parents=True, exist_ok=True)
            stem = f"search_{args.search}_{args.graph_store}"
            (out / f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n")
            (out / f"{stem}.txt").write_text(header + "\n" + text + "\n")
        return 0 if result["completed"] else 1
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
