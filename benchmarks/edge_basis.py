"""Bond features stored per edge vs expanded per batch from the stored lengths.

A graph trial used to hold its graphs with ``edge_attr`` expanded (``gaussian_bins`` float32 per
edge); now it holds the bond length ``edge_dist`` (one float per edge) and the models expand it
per batch (``matfusion/trainables/edge_basis.py``).  On a matbench task's graphs (all rows), this
prints side by side: the bytes of bond features held, the time to build the data list, and the time
of one training pass (forward + backward, CGCNN with its family's defaults, batches of 64) over
every graph, stored vs lazy in alternation (``--reps`` each), so machine noise hits both alike.

    python benchmarks/edge_basis.py [--task matbench_phonons] [--reps 3] [--limit N]
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", default="matbench_phonons")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--limit", type=int, default=None, help="seeded subset of the rows")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()

    import torch
    from torch_geometric.loader import DataLoader

    from matfusion import families
    from matfusion.config import DataConfig, FeaturesConfig
    from matfusion.data import load_dataset
    from matfusion.data.featurize import featurize

    torch.set_num_threads(args.threads)
    ds = load_dataset(DataConfig(source=args.task, limit=args.limit))
    gs = featurize(ds, FeaturesConfig(), progress=False).graphs
    y = ds.targets.reshape(len(ds), -1)
    print(
        f"{args.task}: {len(gs)} graphs, {len(gs.distance)} edges; cores {os.cpu_count()}, load {os.getloadavg()[0]:.1f}"
    )

    built, lists = {}, {}
    for name, expand in (("stored", True), ("lazy", False)):
        t = time.perf_counter()
        lists[name] = gs.to_data_list(range(len(gs)), y, expand_edges=expand)
        built[name] = time.perf_counter() - t
    held = {
        "stored": sum(d.edge_attr.numel() * d.edge_attr.element_size() for d in lists["stored"]),
        "lazy": sum(d.edge_dist.numel() * 4 + d.edge_basis.numel() * 8 for d in lists["lazy"]),
    }

    cgcnn = families.get("cgcnn")
    params = cgcnn.parse({"fusion": "none"})
    d0 = lists["stored"][0]
    torch.manual_seed(0)
    model = cgcnn.build(params, d0.x.shape[1], d0.edge_attr.shape[1], 1, 0, 1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def one_pass(items) -> float:
        t = time.perf_counter()
        for batch in DataLoader(items, batch_size=64, shuffle=False):
            opt.zero_grad()
            model(batch).abs().mean().backward()
            opt.step()
        return time.perf_counter() - t

    passes = {"stored": [], "lazy": []}
    for _ in range(args.reps):
        for name in ("stored", "lazy"):
            passes[name].append(one_pass(lists[name]))
    med = {k: float(np.median(v)) for k, v in passes.items()}
    print(f"{'':28s} {'stored':>10s} {'lazy':>10s} {'lazy/stored':>12s}")
    print(
        f"{'bond features held, MB':28s} {held['stored'] / 1e6:10.1f} {held['lazy'] / 1e6:10.1f} {held['lazy'] / held['stored']:12.3f}"
    )
    print(
        f"{'data list built, s':28s} {built['stored']:10.2f} {built['lazy']:10.2f} {built['lazy'] / built['stored']:12.3f}"
    )
    print(
        f"{'training pass, s (median)':28s} {med['stored']:10.2f} {med['lazy']:10.2f} {med['lazy'] / med['stored']:12.3f}"
    )
    print(f"passes: stored {['%.2f' % v for v in passes['stored']]}, lazy {['%.2f' % v for v in passes['lazy']]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
