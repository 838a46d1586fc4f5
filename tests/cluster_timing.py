"""Wall time of the same small search on a 1-node and on a 2-node Ray cluster (loopback).

    python tests/cluster_timing.py [--repeats 1] [--data-dir DIR]

Each cluster is tests/ray_cluster_helper.py (one raylet per node, one CPU per node, token
authentication on), the search is `matfusion search --address HOST:PORT` on configs/smoke.yaml
(120 rows, rf + cgcnn, 4 trials, 3 epochs, 2 trials at a time), logging to a sqlite store in
a temp dir; the feature cache is warmed first so both runs only search.  Prints the search's
own wall time and that of the whole command, per run, and which node ran which trial.

On one machine the "nodes" share its cores: with 2 cores shared by other work no speed-up
is expected; the number says what the cluster machinery costs, not what a real cluster gains.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HELPER = REPO / "tests" / "ray_cluster_helper.py"


def search_cmd(name: str, address: str, root: Path, data_dir: str) -> list[str]:
    cmd = [
        sys.executable,
        "-m",
        "matfusion.cli",
        "search",
        str(REPO / "configs" / "smoke.yaml"),
        "--quiet",
        "--data-dir",
        data_dir,
        "--set",
        f"name={name}",
        "--set",
        "data.limit=120",
        "--set",
        "search.preset=quick",
        "--set",
        "search.num_samples=4",
        "--set",
        "search.max_epochs=3",
        "--set",
        "search.grace_period=1",
        "--set",
        f"search.storage_path={root / 'ray'}",
        "--set",
        f"mlflow.tracking_uri=sqlite:///{root / 'mlruns.db'}",
        "--set",
        f"mlflow.artifact_location={root / 'artifacts'}",
    ]
    return cmd + (["--address", address] if address else [])


def run(nodes: int, root: Path, env: dict, data_dir: str, tag: str) -> dict:
    helper = subprocess.Popen(
        [sys.executable, str(HELPER), "--workers", str(nodes - 1), "--cpus", "1"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=dict(env, RAY_AUTH_MODE="token"),
        start_new_session=True,
    )
    try:
        info = json.loads(helper.stdout.readline())
        names = {info["head"]: "head", **{w: f"worker{i + 1}" for i, w in enumerate(info["workers"])}}
        t0 = time.time()
        proc = subprocess.run(
            search_cmd(tag, info["address"], root, data_dir),
            capture_output=True,
            text=True,
            env=env,
            cwd=root,
            timeout=900,
        )
        total = time.time() - t0
        if proc.returncode != 0:
            raise RuntimeError(proc.stdout[-2000:] + proc.stderr[-2000:])
        wall = float(re.search(r"wall time ([\d.]+) s", proc.stdout).group(1))
        placement = {}
        for f in (root / "ray" / tag).glob("*/result.json"):
            for line in f.read_text().splitlines():
                r = json.loads(line)
                placement.setdefault(r["trial_id"], set()).add(names.get(r.get("node_id"), "?"))
        return {
            "nodes": nodes,
            "search_wall_s": wall,
            "command_s": total,
            "placement": {t: sorted(v) for t, v in sorted(placement.items())},
        }
    finally:
        helper.stdin.write("shutdown\n")
        helper.stdin.flush()
        try:
            helper.wait(timeout=90)
        except subprocess.TimeoutExpired:
            os.killpg(helper.pid, 9)
            helper.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--data-dir", default=os.environ.get("MATFUSION_DATA", str(REPO.parent / "shared" / "data")))
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="mft", dir="/tmp"))
    token = root / "auth_token"
    token.write_text(os.urandom(32).hex())
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_AUTH", "RAY_ADDRESS"))}
    env.update(
        RAY_TMPDIR=str(root),
        RAY_AUTH_TOKEN_PATH=str(token),
        RAY_USAGE_STATS_ENABLED="0",
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
        MATFUSION_CACHE=str(root / "cache"),
    )
    try:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "matfusion.cli",
                "featurize",
                str(REPO / "configs" / "smoke.yaml"),
                "--data-dir",
                args.data_dir,
                "--set",
                "data.limit=120",
            ],
            env=env,
            check=True,
            capture_output=True,
        )
        rows = []
        for k in range(args.repeats):
            for nodes in (1, 2) if k % 2 == 0 else (2, 1):
                r = run(nodes, root, env, args.data_dir, f"timing-{nodes}node-{k}")
                rows.append(r)
                print(json.dumps(r), flush=True)
        print(f"\nload average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
        for nodes in (1, 2):
            w = [r["search_wall_s"] for r in rows if r["nodes"] == nodes]
            c = [r["command_s"] for r in rows if r["nodes"] == nodes]
            print(
                f"{nodes} node(s) x 1 CPU: search wall {sum(w) / len(w):.1f} s, whole command {sum(c) / len(c):.1f} s "
                f"(mean of {len(w)})"
            )
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
