"""Model benchmarks on matbench_phonons, outer fold 0 (train / inner val from ``split_fold``).

Default run (about 4-5 minutes on a 2-core machine; more when other jobs share it):

1. Throughput: training graphs/s of each graph family (CGCNN, ALIGNN, CGCNN + early /
   attention fusion, ALIGNN + early fusion), trained by matfusion's own ``fit_family`` with
   a ``LocalSession`` (no Ray): one warm-up epoch, then ``--epochs`` timed epochs.  "epoch"
   = the whole epoch of ``train_torch_model`` (training pass, validation on the inner val
   part, scoring, checkpoint-state building); the validation ``predict`` and the rest
   (scoring + checkpoint state) are also shown on their own.  The families take turns epoch
   by epoch (each in its own Python thread, one running at a time), so that other jobs on
   the machine slow them alike.
2. Loop overhead: CGCNN under ``train_torch_model`` ("ours": per-epoch validation and
   checkpoint state, no Ray) vs a bare PyG loop ("bare": same model class and init, same
   DataLoader settings, AdamW, L1 on standardized targets; no validation, no checkpoint
   state, no gradient clipping).  The two alternate epoch by epoch in one process (A, B,
   A, B, ...: each bare epoch runs inside the session's report of the preceding ours
   epoch), so machine noise hits both alike.  Target: ours / bare >= 0.9 graphs/s.  A
   breakdown shows where ours spends its extra time.

With ``--accuracy`` (long; run it in the background), instead: a fixed budget of ``--budget``
epochs (rf: 300 trees) per family, the best epoch chosen on the inner val part only, val
and test MAE per family (test MAE via ``predict_from_state``).

    python benchmarks/models.py [--threads 2] [--epochs 3] [--quick]
    nohup python benchmarks/models.py --accuracy [--budget 40] > accuracy.log 2>&1 &

Every run prints the core count and load average: on a shared machine the absolute numbers
move with other people's jobs (the interleaved ratio much less).  Exits 1 when the loop
overhead target is missed (default run) or a family's MAE is not finite (``--accuracy``).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import threading
import time
from contextlib import contextmanager

LOOP_RATIO_TARGET = 0.9

HP = {
    "cgcnn": {"hidden": 64, "n_conv": 3, "head_hidden": 128, "dropout": 0.0, "lr": 1e-3, "batch_size": 64},
    "alignn": {
        "hidden": 64,
        "n_layers": 2,
        "n_gcn": 1,
        "head_hidden": 128,
        "dropout": 0.0,
        "lr": 1e-3,
        "batch_size": 64,
    },
}
# (label, family, fusion)
THROUGHPUT_FAMILIES = [
    ("cgcnn", "cgcnn", "none"),
    ("alignn", "alignn", "none"),
    ("cgcnn+early", "cgcnn", "early"),
    ("cgcnn+attention", "cgcnn", "attention"),
    ("alignn+early", "alignn", "early"),
]
ACCURACY_FAMILIES = [
    ("rf", "rf", None),
    ("cgcnn", "cgcnn", "none"),
    ("cgcnn+early", "cgcnn", "early"),
    ("cgcnn+attention", "cgcnn", "attention"),
    ("cgcnn+late", "cgcnn", "late"),
    ("alignn", "alignn", "none"),
    ("alignn+early", "alignn", "early"),
]


def family_config(family: str, fusion, max_epochs: int, threads: int, seed: int = 0, trees: int = 300) -> dict:
    cfg = {
        "family": family,
        "max_epochs": max_epochs,
        "patience": max_epochs + 1,
        "seed": seed,
        "cpus": threads,
        "rf": {"n_estimators": trees},
    }
    if family != "rf":
        cfg[family] = dict(HP[family], fusion=fusion)
    return cfg


def machine_note(threads: int = 1) -> str:
    load, cores = os.getloadavg(), os.cpu_count() or 1
    note = (
        f"machine: {cores} core(s), load average {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f} "
        "(1/5/15 min; the machine is shared: other jobs move absolute timings)"
    )
    if threads > 1 and load[0] > 0.5 * cores:
        note += (
            f"\nwarning: busy machine and {threads} torch threads: OpenMP threads spin-wait for a descheduled "
            "peer, so epochs can run several times slower and vary widely; compare with --threads 1"
        )
    return note


# -- data ------------------------------------------------------------------------------------


def load_fold(args):
    """Packed trial data (train + inner val) and the packed test part of phonons fold 0."""
    import numpy as np

    from matfusion.config import DataConfig, FeaturesConfig
    from matfusion.data import load_dataset, split_fold
    from matfusion.data.featurize import featurize
    from matfusion.trainables.trial_data import pack_rows, pack_trial_data

    ds = load_dataset(DataConfig(source=args.task, data_dir=args.data_dir))
    split = split_fold(ds, 0, 0.1, seed=0)
    feats = featurize(ds, FeaturesConfig(line_graph=True), progress=False)
    train, val = split.train, split.val
    if args.limit_train:
        rng = np.random.default_rng(0)
        train = np.sort(rng.choice(train, size=min(args.limit_train, len(train)), replace=False))
        val = np.sort(rng.choice(val, size=min(max(16, args.limit_train // 4), len(val)), replace=False))
    data = pack_trial_data(feats.descriptors, feats.graphs, ds.targets, train, val)
    test_part = pack_rows(feats.descriptors, feats.graphs, ds.targets, split.test)
    return ds, data, test_part


# -- timing instruments ------------------------------------------------------------------------


@contextmanager
def timed_validation(logs: dict):
    """Wrap the loop's ``predict`` (its validation pass) to record (start, end) of each call,
    in ``logs[thread id]``."""
    from matfusion.trainables import loop

    original = loop.predict

    def predict(*a, **kw):
        t = time.perf_counter()
        try:
            return original(*a, **kw)
        finally:
            logs.setdefault(threading.get_ident(), []).append((t, time.perf_counter()))

    loop.predict = predict
    try:
        yield
    finally:
        loop.predict = original


def _session_class():
    from matfusion.trainables.loop import LocalSession

    class TimingSession(LocalSession):
        """Records when each epoch's report arrives and when the loop gets control back;
        ``between`` (optional) runs inside each report, outside the timed ours-epochs."""

        def __init__(self, between=None) -> None:
            super().__init__()
            self.called, self.returned, self.between = [], [], between

        def report(self, metrics: dict, state: dict) -> None:
            self.called.append(time.perf_counter())
            super().report(metrics, state)
            if self.between is not None:
                self.between(metrics["epoch"])
            self.returned.append(time.perf_counter())

    return TimingSession


def epoch_breakdown(session, val_log: list, skip: int = 1) -> dict:
    """Per timed epoch (after ``skip`` warm-up epochs): total, train pass, val predict, rest."""
    total, train, val, rest = [], [], [], []
    for e in range(skip, len(session.called)):
        start, end = session.returned[e - 1], session.called[e]
        v0, v1 = val_log[e]
        total.append(end - start)
        train.append(v0 - start)
        val.append(v1 - v0)
        rest.append(end - v1)
    return {
        "epochs": len(total),
        "total_s": sum(total),
        "train_s": sum(train),
        "val_s": sum(val),
        "rest_s": sum(rest),
        "best_epoch_s": min(total),
        "epoch_s": total,
    }


# -- part 1: throughput ------------------------------------------------------------------------


class Ring:
    """Threads that take turns in a fixed circular order, exactly one running at a time."""

    def __init__(self, n: int) -> None:
        self.cond = threading.Condition()
        self.active = list(range(n))
        self.turn = 0

    def _next(self, i: int):
        later = [j for j in self.active if j > i]
        return (later or self.active or [None])[0]

    def wait(self, i: int) -> None:
        with self.cond:
            self.cond.wait_for(lambda: self.turn == i)

    def pass_on(self, i: int) -> None:
        with self.cond:
            self.turn = self._next(i)
            self.cond.notify_all()

    def leave(self, i: int) -> None:
        with self.cond:
            self.active.remove(i)
            if self.turn == i:
                self.turn = self._next(i)
            self.cond.notify_all()


def throughput(data: dict, args) -> list[dict]:
    """Every family trained by ``fit_family`` in its own Python thread; the threads take turns
    epoch by epoch (round robin, one at a time: never concurrent), so that the other jobs of
    a shared machine slow every family alike.  Each epoch is timed within its own turn."""
    import torch

    from matfusion.trainables.trial import fit_family

    TimingSession = _session_class()
    n_train, n_val = len(data["train"]["y"]), len(data["val"]["y"])
    ring = Ring(len(THROUGHPUT_FAMILIES))
    sessions, idents, errors = {}, {}, {}
    val_logs: dict = {}

    def worker(i: int, cfg: dict) -> None:
        idents[i] = threading.get_ident()
        try:
            ring.wait(i)
            torch.set_num_threads(args.threads)  # per OS thread under OpenMP (fit_family sets it too)
            sessions[i] = TimingSession(between=lambda epoch: (ring.pass_on(i), ring.wait(i)))
            fit_family(cfg, data, session=sessions[i])
        except BaseException as err:  # reported below; the others go on
            errors[i] = err
        finally:
            ring.leave(i)

    with timed_validation(val_logs):
        threads = [
            threading.Thread(
                target=worker,
                args=(i, family_config(family, fusion, 1 + args.epochs, args.threads)),
                name=label,
                daemon=True,
            )
            for i, (label, family, fusion) in enumerate(THROUGHPUT_FAMILIES)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    if errors:
        i, err = next(iter(errors.items()))
        raise RuntimeError(f"throughput run of {THROUGHPUT_FAMILIES[i][0]} failed") from err
    rows = []
    for i, (label, _, _) in enumerate(THROUGHPUT_FAMILIES):
        b = epoch_breakdown(sessions[i], val_logs[idents[i]])
        b.update(
            label=label,
            n_train=n_train,
            n_val=n_val,
            graphs_per_s=n_train * b["epochs"] / b["total_s"],
            best_graphs_per_s=n_train / b["best_epoch_s"],
            train_graphs_per_s=n_train * b["epochs"] / b["train_s"],
            val_graphs_per_s=n_val * b["epochs"] / b["val_s"],
        )
        rows.append(b)
    return rows


def print_throughput(rows: list[dict], args) -> None:
    base = rows[0]["graphs_per_s"]
    print(
        f"\nThroughput: {rows[0]['n_train']} training graphs, {rows[0]['n_val']} inner-val graphs, batch 64, "
        f"{args.threads} torch thread(s), {args.epochs} timed epoch(s) after 1 warm-up; families interleaved "
        "epoch by epoch (round robin, one at a time)"
    )
    print(
        f"{'family':<17}{'graphs/s':>10}{'vs cgcnn':>10}{'best ep':>9}{'s/epoch':>9}{'train s':>9}{'val s':>8}"
        f"{'rest s':>8}{'train g/s':>11}{'val g/s':>9}"
    )
    for r in rows:
        e = r["epochs"]
        print(
            f"{r['label']:<17}{r['graphs_per_s']:>10.1f}{r['graphs_per_s'] / base:>9.2f}x{r['best_graphs_per_s']:>9.1f}"
            f"{r['total_s'] / e:>9.2f}{r['train_s'] / e:>9.2f}{r['val_s'] / e:>8.2f}{r['rest_s'] / e:>8.3f}"
            f"{r['train_graphs_per_s']:>11.1f}{r['val_graphs_per_s']:>9.1f}"
        )
    print(
        "(graphs/s: training graphs per second over the timed whole epochs, validation included; best ep: the same "
        "for the fastest epoch (least disturbed by other jobs); train/val/rest s: per epoch, rest = scoring + "
        "checkpoint state + report)"
    )


# -- part 2: loop overhead ---------------------------------------------------------------------


def bare_epoch_fn(model, train_list, settings, y_mean, y_std):
    """One epoch of a plain PyG loop per call: same DataLoader settings, AdamW, L1 on
    standardized targets; nothing else."""
    import torch
    from torch_geometric.loader import DataLoader

    gen = torch.Generator().manual_seed(settings.seed)
    loader = DataLoader(train_list, batch_size=settings.batch_size, shuffle=True, generator=gen, drop_last=False)
    opt = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    mean = torch.tensor(y_mean, dtype=torch.float32)
    std = torch.tensor(y_std, dtype=torch.float32)
    loss_fn = torch.nn.L1Loss()

    def epoch() -> None:
        model.train()
        for batch in loader:
            opt.zero_grad()
            pred = model(batch)
            loss = loss_fn(pred, (batch.y.view(pred.shape) - mean) / std)
            loss.backward()
            opt.step()

    return epoch


def loop_overhead(data: dict, args) -> dict:
    import numpy as np
    import torch

    from matfusion.trainables.loop import LoopSettings, seed_everything, target_stats, train_torch_model
    from matfusion.trainables.trial import _feature_widths, _graphs_with_descriptors, build_torch_model

    torch.set_num_threads(args.threads)
    TimingSession = _session_class()
    train_list = _graphs_with_descriptors(data["train"], data["graph_params"], None)
    val_list = _graphs_with_descriptors(data["val"], data["graph_params"], None)
    epochs = args.loop_epochs
    cfg = family_config("cgcnn", "none", 1 + epochs, args.threads)
    widths = _feature_widths(train_list[0])

    def new_model():
        seed_everything(0)
        return build_torch_model(cfg, widths[0], widths[1], 1, widths[2])

    settings = LoopSettings(max_epochs=1 + epochs, lr=1e-3, batch_size=64, patience=epochs + 2, seed=0)
    y_mean, y_std = target_stats(np.asarray(data["train"]["y"]).reshape(-1, 1))
    bare_model = new_model()
    bare_epoch = bare_epoch_fn(bare_model, train_list, settings, y_mean, y_std)
    bare_times: list[float] = []

    def between(epoch: int) -> None:  # B after each A: bare epoch 1 is the bare warm-up
        t = time.perf_counter()
        bare_epoch()
        bare_times.append(time.perf_counter() - t)

    session, val_logs = TimingSession(between=between), {}
    with timed_validation(val_logs):
        train_torch_model(new_model(), train_list, val_list, settings, session=session)
    ours = epoch_breakdown(session, val_logs[threading.get_ident()])
    n = len(train_list)
    bare_s = sum(bare_times[1:])
    res = {
        "n_train": n,
        "n_val": len(val_list),
        "epochs": ours["epochs"],
        "ours": ours,
        "bare_s": bare_s,
        "ours_graphs_per_s": n * ours["epochs"] / ours["total_s"],
        "bare_graphs_per_s": n * (len(bare_times) - 1) / bare_s,
    }
    res["ratio"] = res["ours_graphs_per_s"] / res["bare_graphs_per_s"]
    res["bare_epoch_s"] = bare_times[1:]
    pair_ratios = sorted(b / a for a, b in zip(ours["epoch_s"], bare_times[1:]))
    res["median_pair_ratio"] = float(np.median(pair_ratios))
    res["parts"] = overhead_parts(bare_model, train_list, settings)
    return res


def overhead_parts(model, train_list, settings) -> dict:
    """Direct timings (median of 51 calls) of what ours does beyond the bare loop: per
    training step (gradient clipping, the multi-task loss instead of L1Loss, the finite check
    + ``loss.item()``, ``batch.to(device)``) and per epoch (checkpoint-state copies)."""
    import torch
    from torch import nn
    from torch_geometric.loader import DataLoader

    from matfusion.trainables.loop import _to_cpu
    from matfusion.trainables.multitask import MultiTaskLoss

    batch = next(iter(DataLoader(train_list, batch_size=settings.batch_size, shuffle=False)))
    model.train()
    pred = model(batch)
    target = batch.y.view(pred.shape)
    loss = nn.functional.l1_loss(pred, target)
    loss.backward()
    params = list(model.parameters())

    def per_call(fn, reps: int = 51) -> float:  # median: robust to other jobs' bursts
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return sorted(times)[reps // 2]

    mtl, l1 = MultiTaskLoss(1, base="l1"), nn.L1Loss()
    p = pred.detach().requires_grad_(True)
    clip = per_call(lambda: nn.utils.clip_grad_norm_(params, settings.clip_norm))
    loss_mtl = per_call(lambda: mtl(p, target).backward())
    loss_l1 = per_call(lambda: l1(p, target).backward())
    check = per_call(lambda: (bool(torch.isfinite(loss)), loss.item()))
    to_device = per_call(lambda: batch.to(torch.device("cpu")))
    opt = torch.optim.AdamW(params, lr=1e-3)
    opt.step()
    state_copy = per_call(lambda: (_to_cpu(model.state_dict()), copy.deepcopy(opt.state_dict())))
    steps = -(-len(train_list) // settings.batch_size)
    return {
        "steps_per_epoch": steps,
        "clip_s": clip,
        "loss_extra_s": max(0.0, loss_mtl - loss_l1),
        "check_s": check,
        "to_device_s": to_device,
        "state_copy_s": state_copy,
    }


def print_loop(res: dict, args) -> bool:
    o, e = res["ours"], res["epochs"]
    passed = res["ratio"] >= LOOP_RATIO_TARGET
    print(
        f"\nLoop overhead: CGCNN, {res['n_train']} training graphs, {e} timed epoch(s) each after 1 warm-up, "
        f"interleaved ours/bare epoch by epoch, {args.threads} torch thread(s)"
    )
    print(f"{'loop':<44}{'s/epoch':>9}{'graphs/s':>10}")
    print(
        f"{'bare PyG loop (no val, no state, no clip)':<44}{res['bare_s'] / e:>9.2f}{res['bare_graphs_per_s']:>10.0f}"
    )
    print(f"{'ours: train_torch_model (LocalSession)':<44}{o['total_s'] / e:>9.2f}{res['ours_graphs_per_s']:>10.0f}")
    print(f"{'  of which training pass':<44}{o['train_s'] / e:>9.2f}")
    print(f"{'  of which validation predict (' + str(res['n_val']) + ' graphs)':<44}{o['val_s'] / e:>9.2f}")
    print(f"{'  of which scoring + checkpoint state':<44}{o['rest_s'] / e:>9.3f}")
    pairs = list(zip(o["epoch_s"], res["bare_epoch_s"]))
    print(
        "per epoch, ours / bare s: "
        + ", ".join(f"{a:.2f}/{b:.2f}" for a, b in pairs)
        + f"  (median per-epoch ours/bare graphs/s: {res['median_pair_ratio']:.3f})"
    )
    print(f"ours / bare graphs/s: {res['ratio']:.3f}  (target >= {LOOP_RATIO_TARGET})  {'PASS' if passed else 'FAIL'}")
    p, bare_epoch = res["parts"], res["bare_s"] / e
    steps = p["steps_per_epoch"]
    items = [
        ("validation predict", o["val_s"] / e),
        (f"gradient clipping ({steps} steps x {p['clip_s'] * 1e3:.2f} ms)", steps * p["clip_s"]),
        (f"multi-task loss vs L1Loss ({steps} x {p['loss_extra_s'] * 1e3:.2f} ms)", steps * p["loss_extra_s"]),
        (f"finite check + loss.item() ({steps} x {p['check_s'] * 1e3:.3f} ms)", steps * p["check_s"]),
        (f"batch.to(device) ({steps} x {p['to_device_s'] * 1e3:.3f} ms)", steps * p["to_device_s"]),
        ("state_dict copy + optimizer deepcopy", p["state_copy_s"]),
    ]
    print("where ours spends its extra time, per epoch (share of a bare epoch):")
    for name, secs in items:
        print(f"  {name:<52}{secs:>8.3f} s  {100 * secs / bare_epoch:>5.1f}%")
    print(
        f"  {'measured: ours training pass - bare epoch':<52}{o['train_s'] / e - bare_epoch:>8.3f} s  "
        f"{100 * (o['train_s'] / e - bare_epoch) / bare_epoch:>5.1f}%"
    )
    return passed


# -- accuracy ----------------------------------------------------------------------------------


def accuracy(data: dict, test_part: dict, args) -> list[dict]:
    import numpy as np

    from matfusion.trainables.loop import LocalSession
    from matfusion.trainables.trial import fit_family, predict_from_state

    y_test = np.asarray(test_part["y"], dtype=np.float64).reshape(-1)
    rows = []
    for label, family, fusion in ACCURACY_FAMILIES:
        if args.families and label not in args.families:
            continue
        cfg = family_config(family, fusion, args.budget, args.threads, trees=args.trees)
        session = LocalSession()
        t = time.perf_counter()
        state = fit_family(cfg, data, session=session)
        wall = time.perf_counter() - t
        pred = np.asarray(predict_from_state(cfg, state, test_part, data["graph_params"]), dtype=np.float64).reshape(-1)
        h = session.history
        row = {
            "label": label,
            "val_mae": float(min(m["val_mae"] for m in h)),
            "test_mae": float(np.mean(np.abs(pred - y_test))),
            "epochs": int(h[-1]["epoch"]),
            "best_epoch": int(state.get("best_epoch", 1)) if family != "rf" else 1,
            "wall_s": wall,
        }
        if fusion == "late":
            row["late_alpha"] = float(state["best_hook_state"]["alpha"])
        rows.append(row)
        print(
            f"  {label}: val MAE {row['val_mae']:.2f}, test MAE {row['test_mae']:.2f}, "
            f"best epoch {row['best_epoch']}/{row['epochs']}, {wall:.0f} s",
            flush=True,
        )
    return rows


def print_accuracy(rows: list[dict], data: dict, test_part: dict, args) -> bool:
    import numpy as np

    print(
        f"\nFixed-budget accuracy, phonons fold 0: train {len(data['train']['y'])}, inner val "
        f"{len(data['val']['y'])}, test {len(test_part['y'])}; {args.budget} epochs (rf: {args.trees} trees), "
        f"best epoch on inner val; {args.threads} torch thread(s); MAE in cm^-1"
    )
    print(f"{'family':<17}{'val MAE':>9}{'test MAE':>10}{'best ep':>9}{'epochs':>8}{'wall s':>9}{'s/epoch':>9}")
    ok = True
    for r in rows:
        ok &= bool(np.isfinite(r["val_mae"]) and np.isfinite(r["test_mae"]))
        extra = f"  alpha={r['late_alpha']:.2f}" if "late_alpha" in r else ""
        per_epoch = "-" if r["label"] == "rf" else f"{r['wall_s'] / r['epochs']:.1f}"
        print(
            f"{r['label']:<17}{r['val_mae']:>9.2f}{r['test_mae']:>10.2f}{r['best_epoch']:>9}{r['epochs']:>8}"
            f"{r['wall_s']:>9.0f}{per_epoch:>9}{extra}"
        )
    print("(wall s: the whole fit_family call, graph building and, for late fusion, the forest included)")
    return ok


# -- main --------------------------------------------------------------------------------------


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--task", default="matbench_phonons", help="matbench task with structures (default: %(default)s)"
    )
    parser.add_argument("--data-dir", default=None, help="data dir (default: $MATFUSION_DATA or ../shared/data)")
    parser.add_argument(
        "--threads", type=int, default=2, help="torch threads, the same for every model (default: %(default)s)"
    )
    parser.add_argument(
        "--epochs", type=int, default=3, help="timed epochs after the warm-up epoch (default: %(default)s)"
    )
    parser.add_argument(
        "--loop-epochs",
        type=int,
        default=6,
        help="loop overhead: timed epochs of each loop after the warm-up (default: %(default)s)",
    )
    parser.add_argument(
        "--limit-train",
        type=int,
        default=0,
        help="use a seeded subset of this many training rows (and a quarter as many val rows)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="fast check: 192 training rows, 2 timed epochs (loop: 3); with --accuracy 3 epochs, 50 trees",
    )
    parser.add_argument("--skip-throughput", action="store_true", help="loop-overhead comparison only")
    parser.add_argument("--accuracy", action="store_true", help="fixed-budget accuracy table instead (long)")
    parser.add_argument(
        "--budget", type=int, default=40, help="--accuracy: epochs per torch family (default: %(default)s)"
    )
    parser.add_argument("--trees", type=int, default=300, help="--accuracy: random-forest trees (default: %(default)s)")
    parser.add_argument(
        "--families",
        nargs="*",
        default=None,
        help="--accuracy: only these labels (rf cgcnn cgcnn+early cgcnn+attention cgcnn+late alignn alignn+early)",
    )
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    if args.quick:
        args.limit_train = args.limit_train or 192
        args.epochs = min(args.epochs, 2)
        args.loop_epochs = min(args.loop_epochs, 3)
        args.budget = min(args.budget, 3)
        args.trees = min(args.trees, 50)

    import torch

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    print(machine_note(args.threads), flush=True)
    ds, data, test_part = load_fold(args)
    print(
        f"{ds.name}: {len(ds)} rows; fold 0: train {len(data['train']['y'])}, inner val {len(data['val']['y'])}, "
        f"test {len(test_part['y'])}; torch {torch.__version__}, {args.threads} thread(s)",
        flush=True,
    )
    out: dict = {"args": vars(args), "load_before": os.getloadavg()}
    ok = True
    if args.accuracy:
        rows = accuracy(data, test_part, args)
        ok = print_accuracy(rows, data, test_part, args)
        out["accuracy"] = rows
    else:
        if not args.skip_throughput:
            print("throughput (fit_family + LocalSession, families interleaved epoch by epoch)...", flush=True)
            out["throughput"] = throughput(data, args)
            print_throughput(out["throughput"], args)
        print("\nloop overhead (interleaved ours/bare epochs)...", flush=True)
        out["loop"] = loop_overhead(data, args)
        ok = print_loop(out["loop"], args)
    out["load_after"] = os.getloadavg()
    out["wall_s"] = time.perf_counter() - t0
    print(f"\n{machine_note(args.threads)}\ntotal wall time {out['wall_s']:.0f} s")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=2, default=float)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
