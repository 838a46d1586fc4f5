"""Conformal intervals of the stacked ensemble on matbench's official folds: coverage and width.

For each task (default matbench_phonons and matbench_dielectric) and each official fold, the
product's ensemble path is fitted once: :class:`~matfusion.ensembles.stacking.StackedEnsemble`
with ``EnsembleConfig``'s defaults (meta, n_folds, refit) and its interval settings
(``ensembles.pipeline.interval_settings``), as ``matfusion ensemble`` and a benchmark fold build it,
on the fold's whole training part (the benchmark's stacking rows), with a cheap FIXED pair of
tabular members (rf and lgbm on the default descriptors, no search).  The test fold only measures:
it is checked to be disjoint from every row the ensemble used.

The same fitted stack is then calibrated four ways (the calibration only, the members are not
retrained): difficulty ``model`` (normalized) with the refit-gain correction (``model+refit``:
per-level factors from the calibration rows the refit held out, in place of the averaging
correction), with the averaging correction (``model+avg``), with neither (``model``), and
``constant`` (plain conformal, one width; neither correction applies to it); docs/uncertainty.md.  Per fold and variant it
prints the test coverage at 68.27 / 90 / 95 %, the mean and median interval widths and the mean
width at equal coverage (each variant's intervals rescaled by the one factor that makes its test
coverage exactly nominal: an efficiency comparison only, never a product output).  A diagnostic
line per fold shows the test MAE and the coverage of the *single* fold-model stacks with the plain
quantiles: the predictor whose errors the calibration residuals are.

Target (issue 20): the default variant (``model`` with the calibrator's default corrections) within
+-4 points of nominal at all three levels on every fold; exits 1 when missed.  The folds within
+-4 are printed for every ``model`` variant, side by side.

    python benchmarks/calibration.py                                  # both tasks, 5 folds, ~5-8 min on 2 cores
    python benchmarks/calibration.py --tasks matbench_phonons --folds 0,1 --json out.json
    python benchmarks/calibration.py --summary results/calibration/calibration.json   # reprint, no fit
    python benchmarks/calibration.py --from-results results/matbench_dielectric_fair   # a recorded benchmark

The summary also prints what the target asks of a perfectly calibrated predictor on folds of the
same test sizes (``oracle_odds``): the expected number of folds outside +-4 points at each level
and the chance that every fold-level is within them.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Optional

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import numpy as np

from matfusion.config import DataConfig, EnsembleConfig, FeaturesConfig
from matfusion.data import load_dataset, split_fold
from matfusion.data.featurize import featurize
from matfusion.ensembles.calibration import (
    AVERAGING_FLOOR,
    ONE_SIGMA,
    ConformalCalibrator,
    conformal_quantile,
    refit_gain_applies,
)
from matfusion.ensembles.pipeline import interval_settings
from matfusion.ensembles.stacking import StackedEnsemble

MEMBERS = [  # fixed, cheap, no search
    {"family": "rf", "rf": {"n_estimators": 100, "max_features": 0.3}, "seed": 0, "cpus": 1},
    {"family": "lgbm", "lgbm": {"n_estimators": 300, "learning_rate": 0.05}, "seed": 0, "cpus": 1, "max_epochs": 3},
]
LEVELS = (ONE_SIGMA, 0.90, 0.95)
NAMES = ("68", "90", "95")
# (difficulty, averaging, refit_gain); refit_gain, when estimated, replaces averaging; constant: plain
VARIANTS = (("model", True, True), ("model", True, False), ("model", False, False), ("constant", False, False))
TOLERANCE = 0.04


def variant_name(difficulty: str, averaging: bool, refit_gain: bool = False) -> str:
    return f"{difficulty}{'+refit' if refit_gain else '+avg' if averaging else ''}"


def default_variant(refit_rows: int) -> str:
    """The variant the defaults give a stack whose refit held out ``refit_rows`` calibration rows."""
    refit = refit_gain_applies(EnsembleConfig().refit_gain, refit_rows)
    return variant_name(EnsembleConfig().difficulty, ConformalCalibrator().averaging and not refit, refit)


def interval_stats(err: np.ndarray, half: dict) -> dict:
    """Coverage, mean / median width and the mean width at exactly nominal test coverage."""
    out = {}
    for lv, name in zip(LEVELS, NAMES):
        h = half[lv]
        scale = float(np.quantile(err / h, lv))  # the common factor that makes test coverage = lv
        out[f"coverage_{name}"] = float(np.mean(err <= h))
        out[f"width_{name}"] = float(np.mean(2 * h))
        out[f"median_width_{name}"] = float(np.median(2 * h))
        out[f"width_at_equal_coverage_{name}"] = float(np.mean(2 * h * scale))
    return out


def recalibrate(ens: StackedEnsemble, descriptors: np.ndarray, difficulty: str, averaging: bool, refit_gain: bool):
    """The fitted stack's calibrators refitted with ``difficulty`` (the stack's own calibration
    step, on the same training rows), with or without the averaging and refit-gain corrections."""
    if ens.difficulty != difficulty or not ens.calibrated:
        ens.difficulty = difficulty
        rows = ens.meta_rows_
        fold = np.array([ens.fold_of_row_[int(r)] for r in rows])
        ens._calibrate(descriptors, rows, fold, ens.oof_y_.reshape(len(rows), 1), ens.oof_[:, :, None])
    for cal in ens.calibrators_:
        cal.averaging, cal.refit_gain = averaging, refit_gain


def single_fold_diagnosis(ens: StackedEnsemble, out: dict, descriptors, test: np.ndarray, y: np.ndarray) -> dict:
    """The predictor the calibration residuals come from, on the test rows: each single fold-model
    stack ``meta(fold-k members)`` (pooled over the K stacks) with its own difficulty (the
    calibrator's model on the fold-k features, as the calibration rows had them) and with the
    plain quantiles; and the test MAE of a single stack, of their average and of the refit."""
    cal = ens.calibrators_[0]
    stacks = ens.stack_folds(out["per_fold"], descriptors, test)  # (K, n)
    err = np.abs(y[None, :] - stacks)
    sigma = np.stack(
        [
            cal.difficulty_sigma(*ens._difficulty_features(out["per_fold"][k], stacks[k], descriptors, test))
            for k in range(len(stacks))
        ]
    )
    plain = np.sort(np.abs(ens.oof_y_ - ens.calibration_oof_[0]))
    rec = {
        "test_mae": float(err.mean()),
        "fold_average_test_mae": float(np.mean(np.abs(y - stacks.mean(axis=0)))),
        "refit_test_mae": float(np.mean(np.abs(y - out["mean"]))),
    }
    for lv, n in zip(LEVELS, NAMES):
        rec[f"coverage_{n}"] = float(np.mean(err <= conformal_quantile(cal.scores_, lv) * sigma))
        rec[f"plain_coverage_{n}"] = float(np.mean(err <= conformal_quantile(plain, lv)))
    return rec


def run_fold(task: str, ds, descriptors: np.ndarray, fold: int, settings: EnsembleConfig) -> dict:
    t0 = time.time()
    split = split_fold(ds, fold)
    rows = np.sort(np.concatenate([split.train, split.val]))  # the benchmark's stacking rows
    test = split.test
    ens = StackedEnsemble(
        MEMBERS,
        meta=settings.meta,
        n_folds=settings.n_folds,
        seed=0,
        refit=settings.refit,
        **interval_settings(settings),
    ).fit(descriptors, None, ds.targets, rows)
    used = set(ens.meta_rows_.tolist()).union(*(set(np.asarray(p).tolist()) for p in ens.calibration_rows_))
    for part in (*ens.fold_train_rows_, *ens.fold_es_rows_, ens.refit_train_rows_, ens.refit_es_rows_):
        used |= set(np.asarray(part).tolist())
    if used & set(test.tolist()) or not used <= set(rows.tolist()):
        raise SystemExit(f"{task} fold {fold}: the ensemble used test rows or rows it was not given")
    fit_s = time.time() - t0
    y = ds.targets[test]
    record = {
        "task": task,
        "fold": fold,
        "n_calibration": int(len(ens.calibration_rows_[0])),
        "n_test": int(len(test)),
        "fit_s": round(fit_s, 1),
        "oof_mae": float(np.mean(np.abs(ens.oof_y_ - ens.calibration_oof_[0]))),
        "variants": {},
    }
    refit_cal = ens.calibrators_[0]
    record["refit_gain_rows"] = int(len(ens.refit_gain_rows_[0]))
    if not set(ens.refit_gain_rows_[0].tolist()) <= set(ens.calibration_rows_[0].tolist()) - set(
        ens.refit_train_rows_.tolist()
    ):
        raise SystemExit(f"{task} fold {fold}: the refit-gain rows are not calibration rows held out from the refit")
    record["refit_gain_reason"] = refit_cal.refit_gain_reason_
    record["refit_factor"] = {n: refit_cal.refit_factor(lv, force=True) for lv, n in zip(LEVELS, NAMES)}
    record["refit_factor_se"] = dict(getattr(refit_cal, "refit_factor_se_", {}))
    for difficulty, averaging, refit_gain in VARIANTS:
        recalibrate(ens, descriptors, difficulty, averaging, refit_gain)
        out = ens.predict_all(descriptors, None, test)
        err = np.abs(y - out["mean"])
        cal = ens.calibrators_[0]
        stats = interval_stats(err, {lv: cal.quantile(lv) * out["sigma"] for lv in LEVELS})
        stats["within_1std"] = float(np.mean(err <= out["std"]))
        record["variants"][variant_name(difficulty, averaging, refit_gain)] = stats
        if refit_gain and record["refit_factor_se"]:
            record["factor_band"] = factor_band(cal, err, out["sigma"], record["refit_factor_se"])
        record["test_mae"] = float(err.mean())
        record["spread_within_1std"] = float(np.mean(err <= out["spread"]))
        if difficulty == "model" and averaging and not refit_gain:
            record["single_fold_stacks"] = single_fold_diagnosis(ens, out, descriptors, test, y)
    record["wall_s"] = round(time.time() - t0, 1)
    return record


def factor_band(cal: ConformalCalibrator, err: np.ndarray, sigma: np.ndarray, se: dict) -> dict:
    """The refit-gain variant's test coverage at each level with its factor moved down and up by
    one bootstrap standard error: how much of a fold's deviation the factor's sampling error alone
    can make."""
    band = {}
    for lv, n in zip(LEVELS, NAMES):
        q, g = conformal_quantile(cal.scores_, lv), cal.refit_factor(lv)
        band[n] = [float(np.mean(err <= q * max(g + d * se[n], 0.0) * sigma)) for d in (-1.0, 1.0)]
    return band


def factor_band_line(rec: dict) -> str:
    se = rec.get("refit_factor_se") or {}
    if not se:
        return ""
    band = rec.get("factor_band")
    text = "  refit-gain factor's bootstrap se 68/90/95 " + " ".join(f"{se[n]:.3f}" for n in NAMES)
    if band:
        text += "; model+refit coverage with the factor -1 / +1 se: " + "  ".join(
            f"{band[n][0]:.3f}-{band[n][1]:.3f}" for n in NAMES
        )
    return text + "\n"


def fmt_row(label: str, v: dict) -> str:
    cov = " ".join(f"{v[f'coverage_{n}']:.3f}" for n in NAMES)
    wid = " ".join(f"{v[f'width_{n}']:8.4g}" for n in NAMES)
    eq = " ".join(f"{v[f'width_at_equal_coverage_{n}']:8.4g}" for n in NAMES)
    med = " ".join(f"{v[f'median_width_{n}']:8.4g}" for n in NAMES)
    return f"  {label:<22} {cov}   {wid}   {eq}   {med}"


HEADER = (
    f"  {'variant':<22} {'coverage 68/90/95':<17}   {'mean width 68/90/95':<26}   "
    f"{'width at equal coverage':<26}   median width 68/90/95"
)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", default="matbench_phonons,matbench_dielectric")
    ap.add_argument("--folds", default="0,1,2,3,4")
    ap.add_argument("--data-dir", default=os.environ.get("MATFUSION_DATA", "../shared/data"))
    ap.add_argument("--n-jobs", type=int, default=1, help="featurization workers (cached after the first run)")
    ap.add_argument("--json", help="write every number to this JSON file")
    ap.add_argument(
        "--summary", metavar="JSON", help="print the summary of a recorded run (its --json file); fits nothing"
    )
    ap.add_argument(
        "--from-results",
        nargs="+",
        metavar="DIR",
        help="recorded `matfusion benchmark` folders (results/<task>): each fold's coverage with the averaging "
        "and with the refit-gain correction, from its predictions.csv and summary.json; fits nothing",
    )
    args = ap.parse_args(argv)
    if args.from_results:
        for folder in args.from_results:
            print_recorded(Path(folder))
        return 0
    if args.summary:
        return 0 if summarize(json.loads(Path(args.summary).read_text())["folds"]) else 1
    settings = EnsembleConfig()
    folds = [int(f) for f in args.folds.split(",")]
    print(
        f"members: rf (100 trees, max_features 0.3) + lgbm (300 rounds, lr 0.05), default descriptors; "
        f"meta {settings.meta}, {settings.n_folds}-fold stacking, refit {settings.refit}; "
        f"cores {os.cpu_count()}, load {os.getloadavg()[0]:.2f}",
        flush=True,
    )
    records = []
    for task in args.tasks.split(","):
        ds = load_dataset(DataConfig(source=task, data_dir=args.data_dir))
        descriptors = featurize(ds, FeaturesConfig(n_jobs=args.n_jobs), progress=False, graphs=False).descriptors
        for fold in folds:
            rec = run_fold(task, ds, descriptors, fold, settings)
            records.append(rec)
            sf = rec["single_fold_stacks"]
            print(
                f"\n{task} fold {fold}: {rec['n_calibration']} calibration rows, {rec['n_test']} test rows; "
                f"OOF MAE {rec['oof_mae']:.4g}, test MAE {rec['test_mae']:.4g}; {rec['wall_s']:.0f} s",
                flush=True,
            )
            print(
                "  refit-gain factor 68/90/95 "
                + " ".join(f"{rec['refit_factor'][n]:.3f}" for n in NAMES)
                + f" from {rec['refit_gain_rows']} calibration rows the refit held out"
                + (f" ({rec['refit_gain_reason']})" if rec["refit_gain_reason"] else "")
            )
            print(factor_band_line(rec), end="")
            print(HEADER)
            for name, v in rec["variants"].items():
                print(fmt_row(name, v))
            print(
                single_stacks_line(sf, "single fold-model stacks (the residuals' predictor)")
                + f"; old spread within 1 std {rec['spread_within_1std']:.3f}",
                flush=True,
            )
    ok = summarize(records)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"members": MEMBERS, "folds": records}, indent=1) + "\n")
    return 0 if ok else 1


def single_stacks_line(sf: dict, label: str) -> str:
    """The fold-model stacks' own coverage (with their own difficulty, and plain) and test MAEs."""
    return (
        f"  {label}: coverage with their own difficulty "
        + " ".join(f"{sf[f'coverage_{n}']:.3f}" for n in NAMES)
        + ", plain "
        + " ".join(f"{sf[f'plain_coverage_{n}']:.3f}" for n in NAMES)
        + f"; test MAE single {sf['test_mae']:.4g}, their average {sf['fold_average_test_mae']:.4g}, "
        f"refit {sf['refit_test_mae']:.4g}"
    )


def oracle_odds(test_rows: list, draws: int = 200_000, seed: int = 0) -> dict:
    """What the target asks of a perfectly calibrated predictor on folds of these test sizes.

    For such a predictor each test row falls inside the 68 / 90 / 95 % intervals independently with
    the nominal probabilities, so a fold's three coverages are one multinomial draw over the four
    nested bands.  Returns, per level, the chance one fold is within +-TOLERANCE and the expected
    number of folds outside it, and the chance that every level of every fold is within it (the
    issue's target), from ``draws`` seeded draws per fold.
    """
    rng = np.random.default_rng(seed)
    bands = np.diff(np.concatenate([[0.0], LEVELS, [1.0]]))  # inside 68, 68-90, 90-95, outside 95
    per_level = np.zeros((len(test_rows), len(LEVELS)))
    every_level = np.ones(len(test_rows))
    for i, n in enumerate(test_rows):
        counts = rng.multinomial(n, bands, size=draws)
        cov = np.cumsum(counts[:, :-1], axis=1) / n
        within = np.abs(cov - np.asarray(LEVELS)) <= TOLERANCE + 1e-12
        per_level[i] = within.mean(0)
        every_level[i] = within.all(1).mean()
    return {
        "p_fold_within": dict(zip(NAMES, per_level.mean(0).round(4).tolist())),
        "expected_misses": dict(zip(NAMES, (1 - per_level).sum(0).round(3).tolist())),
        "p_all_within": float(np.prod(every_level)),
    }


def noise_budget(recs: list) -> Optional[dict]:
    """What an unbiased calibration with this run's own sampling errors would miss: per fold and
    level, a Gaussian deviation with the binomial errors of the test coverage and of the conformal
    quantile (``sqrt(c (1 - c) / n)`` on the test and the calibration rows) and the refit-gain
    factor's (half the width of the fold's one-se coverage band, ``factor_band``).  Returns the
    mean standard deviation in points and the expected folds outside +-TOLERANCE per level; None
    for records without a band (runs before it, or without the refit gain)."""
    if not all(r.get("factor_band") for r in recs):
        return None
    sd = np.array(
        [
            [
                math.sqrt(
                    lv * (1 - lv) / r["n_test"]
                    + lv * (1 - lv) / r["n_calibration"]
                    + ((r["factor_band"][n][1] - r["factor_band"][n][0]) / 2) ** 2
                )
                for lv, n in zip(LEVELS, NAMES)
            ]
            for r in recs
        ]
    )
    misses = np.vectorize(lambda x: math.erfc(TOLERANCE / x / math.sqrt(2)))(sd).sum(0)
    return {
        "sd_points": dict(zip(NAMES, (100 * sd.mean(0)).round(2).tolist())),
        "expected_misses": dict(zip(NAMES, misses.round(2).tolist())),
    }


def noise_line(recs: list, observed: dict) -> str:
    b = noise_budget(recs)
    if b is None:
        return ""
    return (
        "  an unbiased model+refit with this run's sampling errors (test rows, calibration rows, the factor's se): "
        "sd per fold 68/90/95 "
        + " ".join(f"{b['sd_points'][n]:.1f}" for n in NAMES)
        + " points; expected folds outside +-4 "
        + " ".join(f"{b['expected_misses'][n]:.2f}" for n in NAMES)
        + " (observed "
        + " ".join(str(observed[n]) for n in NAMES)
        + ")\n"
    )


def oracle_line(test_rows: list) -> str:
    o = oracle_odds(test_rows)
    return (
        f"  a perfectly calibrated predictor on {len(test_rows)} folds of {min(test_rows)}-{max(test_rows)} test rows: "
        "expected folds outside +-4 at 68/90/95 "
        + " ".join(f"{o['expected_misses'][n]:.2f}" for n in NAMES)
        + f"; chance that all {len(test_rows) * len(LEVELS)} fold-levels are within +-4: {o['p_all_within']:.3f}"
    )


RECORDED_LEVELS = ((0.68, "68"), (0.90, "90"), (0.95, "95"))  # the levels a benchmark fold records


def recorded_scales(pred, cal: dict):
    """Per test row of a recorded benchmark fold, its difficulty ``sigma`` and averaging factor
    ``rho``, recovered exactly from what the fold wrote: ``std = q_std * sigma * rho`` (refit gain
    off; ``rho = sqrt(V / (V + s^2))``, ``V = sigma^2 m2``, floored) or ``std = q_std * sigma``
    (refit gain on, whose ``q_*`` include the factor), with ``s`` the recorded ``spread``."""
    a = pred["std"].to_numpy(float) / cal["q_std"]
    if cal.get("refit_gain") or not cal.get("averaging"):
        return a, np.ones_like(a)
    s, m2 = pred["spread"].to_numpy(float), float(cal["score_m2"])
    # a^2 = sigma^2 rho^2 = u^2 / ((u + s^2) m2) with u = sigma^2 m2: the positive root of a quadratic
    u = (a**2 * m2 + np.sqrt(a**4 * m2**2 + 4 * a**2 * m2 * s**2)) / 2
    sigma, rho = np.sqrt(u / m2), np.sqrt(u / np.maximum(u + s**2, 1e-300))
    floored = rho < AVERAGING_FLOOR
    return np.where(floored, a / AVERAGING_FLOOR, sigma), np.where(floored, AVERAGING_FLOOR, rho)


def recorded_variants(folder: Path) -> list:
    """The test coverage of a recorded benchmark (``results/<task>``) with the averaging and with
    the refit-gain correction, per fold, from its ``predictions.csv`` and ``summary.json`` only
    (the refit-gain factors every refitted fold records); nothing is refitted or recalibrated."""
    import pandas as pd

    out = []
    for fold_dir in sorted(d for d in folder.glob("fold_*") if (d / "summary.json").is_file()):
        summary = json.loads((fold_dir / "summary.json").read_text())
        cal = summary.get("calibration") or {}
        if "refit_factor_68" not in cal:
            print(f"  {fold_dir}: no refit-gain factors recorded (a fold from before them); skipped")
            continue
        pred = pd.read_csv(fold_dir / "predictions.csv")
        sigma, rho = recorded_scales(pred, cal)
        err = np.abs(pred["y"].to_numpy(float) - pred["prediction"].to_numpy(float))
        rec = {"fold": summary["fold"], "refit_gain_rows": cal["refit_gain_rows"], "n_test": len(pred)}
        for _level, n in RECORDED_LEVELS:
            g = cal[f"refit_factor_{n}"]
            q = cal[f"q_{n}"] / (g if cal.get("refit_gain") else 1.0)  # the plain conformal quantile
            recorded = summary[f"coverage_{n}"]
            avg, refit = float(np.mean(err <= q * sigma * rho)), float(np.mean(err <= q * g * sigma))
            if abs((refit if cal.get("refit_gain") else avg) - recorded) > 1e-9:
                raise SystemExit(f"{fold_dir}: recomputed coverage at {n} % differs from the recorded {recorded}")
            rec[f"g_{n}"], rec[f"avg_{n}"], rec[f"refit_{n}"] = g, avg, refit
            rec[f"se_{n}"] = cal.get(f"refit_factor_se_{n}")  # folds recorded before it: None
        out.append(rec)
    return out


def print_recorded(folder: Path) -> None:
    recs = recorded_variants(folder)
    if not recs:
        print(f"{folder}: no fold with recorded refit-gain factors")
        return
    print(f"\n== {folder}: test coverage 68/90/95 per fold, averaging vs refit-gain correction (recorded fold outputs)")
    for r in recs:
        print(
            f"  fold {r['fold']}: {r['refit_gain_rows']} held-out rows, factor "
            + " ".join(f"{r[f'g_{n}']:.3f}" for _, n in RECORDED_LEVELS)
            + (
                " (bootstrap se " + " ".join(f"{r[f'se_{n}']:.3f}" for _, n in RECORDED_LEVELS) + ")"
                if all(r[f"se_{n}"] is not None for _, n in RECORDED_LEVELS)
                else ""
            )
            + "; averaging "
            + " ".join(f"{r[f'avg_{n}']:.3f}" for _, n in RECORDED_LEVELS)
            + "; refit gain "
            + " ".join(f"{r[f'refit_{n}']:.3f}" for _, n in RECORDED_LEVELS)
        )
    for variant in ("avg", "refit"):
        hits = [sum(abs(r[f"{variant}_{n}"] - lv) <= TOLERANCE for r in recs) for lv, n in RECORDED_LEVELS]
        print(
            f"  {'averaging' if variant == 'avg' else 'refit gain'}: folds within +-4 at 68/90/95: "
            + " / ".join(f"{h}/{len(recs)}" for h in hits)
        )


def summarize(records: list) -> bool:
    ok = True
    print("\n== mean over folds (coverage 68/90/95, mean width 68/90/95, width at equal coverage 68/90/95)")
    for task in dict.fromkeys(r["task"] for r in records):
        recs = [r for r in records if r["task"] == task]
        print(f"{task} ({len(recs)} folds):")
        print(HEADER)
        for name in recs[0]["variants"]:
            mean = {k: float(np.mean([r["variants"][name][k] for r in recs])) for k in recs[0]["variants"][name]}
            print(fmt_row(name, mean))
        sf = {k: float(np.mean([r["single_fold_stacks"][k] for r in recs])) for k in recs[0]["single_fold_stacks"]}
        print(
            single_stacks_line(sf, "single fold-model stacks")
            + f"; OOF MAE {np.mean([r['oof_mae'] for r in recs]):.4g}"
        )
        print(
            "  refit-gain factor 68/90/95 (mean over folds) "
            + " ".join(f"{np.mean([r['refit_factor'][n] for r in recs]):.3f}" for n in NAMES)
            + (
                "; bootstrap se " + " ".join(f"{np.mean([r['refit_factor_se'][n] for r in recs]):.3f}" for n in NAMES)
                if all(r.get("refit_factor_se") for r in recs)
                else ""
            )
        )
        default = default_variant(min(r["refit_gain_rows"] for r in recs))
        for name in [v for v in recs[0]["variants"] if v.startswith("model")]:
            for lv, n in zip(LEVELS, NAMES):
                devs = [r["variants"][name][f"coverage_{n}"] - lv for r in recs]
                hit = sum(abs(d) <= TOLERANCE for d in devs)
                verdict = ("PASS" if hit == len(recs) else "FAIL") if name == default else ""
                ok &= hit == len(recs) or name != default
                print(
                    f"  {name:<12} at {n} %: {hit}/{len(recs)} folds within +-4 points "
                    f"(deviations {' '.join(f'{100 * d:+.1f}' for d in devs)}) {verdict}".rstrip()
                )
        print(f"  (default: {default})")
        refit = [r["variants"].get("model+refit") for r in recs]
        if all(refit):
            observed = {n: sum(abs(v[f"coverage_{n}"] - lv) > TOLERANCE for v in refit) for lv, n in zip(LEVELS, NAMES)}
            print(noise_line(recs, observed), end="")
        print(oracle_line([r["n_test"] for r in recs]))
    all_rows = [r["n_test"] for r in records]
    if len({r["task"] for r in records}) > 1:
        print("all tasks:\n" + oracle_line(all_rows))
    return ok


if __name__ == "__main__":
    sys.exit(main())
