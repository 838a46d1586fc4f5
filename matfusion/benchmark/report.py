"""The report of a benchmark folder (``matfusion report DIR``; ``matfusion benchmark`` writes it
at the end): ``report.md`` and PNGs, read only from the files the benchmark wrote there
(``results.json.gz``, ``benchmark_state.json``, ``fold_<k>/{summary.json, members.csv,
predictions.csv, trials.csv, importance.json}``), so a report can be rebuilt anywhere, without
MLflow.

Figures: ``fold_mae.png`` (ensemble test MAE per fold next to the local anchors),
``families.png`` (best configuration of each family/fusion, retrained as an ensemble member, and
the ensemble: mean test MAE over the folds, with the leaderboard's figures as lines),
``parity.png``, ``search_history.png`` (inner-validation MAE of every trial in start order and the
running best, per fold), ``rf_importance.png`` (impurity and permutation importance of the Magpie
features in the RF member), ``modality_importance.png`` (rise in test MAE when the graphs or the
Magpie vectors are shuffled, for the fused members and the ensemble).

``coverage.png`` (share of test rows inside the conformal intervals at 68 / 90 / 95 %
per fold, beside the nominal levels; folds benchmarked before the intervals existed show the
share of errors within their uncalibrated std, computed from ``predictions.csv``).

Test MAEs of single members are for information: members were chosen by inner-validation MAE
only, and the importances are computed after the fold's predictions were recorded.
"""

from __future__ import annotations

import json
import math
from numbers import Real
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd

from .. import plotting
from .base import N_OFFICIAL_FOLDS, REPORT_FILE, RESULTS_FILE, STATE_FILE, BenchmarkError
from .matbench_io import read_results_dict

LEADERBOARD_SOURCE = (
    "matbench v0.1 leaderboard (https://matbench.materialsproject.org), mean MAE over the 5 "
    "official folds; figures as copied into ../shared/ANCHORS.md"
)
# (model, mean MAE) from the matbench v0.1 leaderboard, via ../shared/ANCHORS.md
LEADERBOARD = {
    "matbench_phonons": {
        "unit": "cm^-1",
        "entries": [
            ("Dummy (predicts the mean)", 323.98),
            ("RF-SCM/Magpie", 67.61),
            ("CGCNN", 57.76),
            ("MODNet", 34.28),
            ("ALIGNN", 29.54),
            ("coNGN", 28.89),
            ("MEGNet", 28.76),
        ],
    },
    "matbench_dielectric": {
        "unit": "",
        "entries": [
            ("Dummy (predicts the mean)", 0.8088),
            ("RF-SCM/Magpie", 0.4196),
            ("CGCNN", 0.5988),
            ("MODNet", 0.2711),
            ("ALIGNN", 0.3449),
            ("coGN", 0.3088),
            ("AMMExpress", 0.3150),
            ("CrabNet", 0.3234),
        ],
    },
    "matbench_expt_gap": {
        "unit": "eV",
        "entries": [("MODNet", 0.3327), ("CrabNet (Ax/SAASBO)", 0.3310), ("Darwin (fine-tuned LLM)", 0.2865)],
    },
    "matbench_steels": {"unit": "MPa", "entries": [("MODNet", 87.76)]},
}
LOCAL_SOURCE = "measured on the project's 2-core machine with the official folds (../shared/ANCHORS.md)"
# (label, mean, per-fold MAEs) measured locally, via ../shared/ANCHORS.md
LOCAL_ANCHORS = {
    "matbench_phonons": [
        ("RandomForest (300 trees) on Magpie", 65.36, [81.75, 71.17, 58.83, 55.50, 59.57]),
        ("AutoGluon-tabular best_quality, 150 s/fold, Magpie", 51.67, [65.21, 48.72, 44.82, 50.31, 49.31]),
    ],
    "matbench_dielectric": [
        ("RandomForest (300 trees) on Magpie", 0.4175, [0.3178, 0.4203, 0.5165, 0.3949, 0.4378]),
        ("AutoGluon-tabular best_quality, 150 s/fold, Magpie", 0.3271, [0.2258, 0.2992, 0.4499, 0.3189, 0.3417]),
    ],
}
TOP_FEATURES = 20


def _fmt(v, digits: int = 4) -> str:
    try:
        v = float(v)
    except (TypeError, ValueError):
        return "-"
    return f"{v:.{digits}g}" if math.isfinite(v) else "-"


def _seconds(v) -> str:
    try:
        v = float(v)
    except (TypeError, ValueError):
        return "-"
    return f"{v:.0f}" if math.isfinite(v) else "-"


def _table(header: list, rows: list) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def _read_csv(path: Path) -> Optional[pd.DataFrame]:
    return pd.read_csv(path) if path.is_file() else None


# -- reading the folder ---------------------------------------------------------------------------


def collect(out: Path) -> dict:
    """Everything the report needs from a benchmark folder; raises :class:`BenchmarkError` when
    the folder holds no results."""
    out = Path(out)
    results_path = out / RESULTS_FILE
    if not results_path.is_file():
        raise BenchmarkError(f"{out}: no {RESULTS_FILE} (run `matfusion benchmark TASK --out {out}` first)")
    d = read_results_dict(results_path)
    tasks = d.get("tasks") or {}
    if len(tasks) != 1:
        raise BenchmarkError(f"{results_path}: expected the results of one task, found {sorted(tasks)}")
    task, tdict = next(iter(tasks.items()))
    scores = {}
    for k in range(N_OFFICIAL_FOLDS):
        fold = (tdict.get("results") or {}).get(f"fold_{k}") or {}
        if fold.get("data"):
            scores[k] = fold.get("scores") or {}
    try:
        state = json.loads((out / STATE_FILE).read_text())
    except (OSError, ValueError):
        state = {}
    folds = {}
    for k in sorted(scores):
        fdir = out / f"fold_{k}"
        entry = {"scores": scores[k]}
        try:
            entry["summary"] = json.loads((fdir / "summary.json").read_text())
        except (OSError, ValueError):
            entry["summary"] = {}
        try:
            entry["importance"] = json.loads((fdir / "importance.json").read_text())
        except (OSError, ValueError):
            entry["importance"] = {}
        for name in ("members", "predictions", "trials"):
            entry[name] = _read_csv(fdir / f"{name}.csv")
        folds[k] = entry
    return {
        "task": task,
        "out": out,
        "folds": folds,
        "state": state,
        "user_metadata": d.get("user_metadata") or {},
        "datestamp": d.get("datestamp"),
    }


# -- figures ----------------------------------------------------------------------------------------


def plot_fold_mae(info: dict, path: Path) -> str:
    task, folds = info["task"], info["folds"]
    ks = sorted(folds)
    fig = plotting.new_figure(7, 4)
    ax = fig.add_subplot()
    ax.bar([str(k) for k in ks], [folds[k]["scores"]["mae"] for k in ks], color="tab:blue", label="matfusion ensemble")
    markers = ["v", "s", "^"]
    for i, (label, _, per_fold) in enumerate(LOCAL_ANCHORS.get(task, [])):
        ax.scatter(
            [str(k) for k in ks], [per_fold[k] for k in ks], marker=markers[i % 3], color="k", zorder=3, label=label
        )
    ax.set_xlabel("official fold")
    ax.set_ylabel(f"test MAE {LEADERBOARD.get(task, {}).get('unit', '')}".strip())
    ax.set_title(f"{task}: test MAE per fold")
    ax.legend(fontsize=7)
    ax.grid(axis="y", alpha=0.3)
    plotting.save_figure(fig, path)
    return path.name


def family_table(info: dict) -> pd.DataFrame:
    """Rows: each group's best member (first by val_mae), the plain average and the ensemble;
    columns: test MAE per fold and the mean over the folds that have it."""
    rows: dict = {}
    for k, f in info["folds"].items():
        members = f.get("members")
        if members is not None and len(members):
            for group, part in members.groupby("group", sort=False):
                best = part.sort_values("val_mae", kind="stable").iloc[0]
                rows.setdefault(str(group), {})[k] = float(best["test_mae"])
        s = f.get("summary") or {}
        if "average_mae" in s:
            rows.setdefault("plain average of members", {})[k] = float(s["average_mae"])
        rows.setdefault("stacked ensemble", {})[k] = float(f["scores"]["mae"])
    frame = pd.DataFrame.from_dict(rows, orient="index")
    frame = frame.reindex(columns=sorted(frame.columns))
    frame.columns = [f"fold {c}" for c in frame.columns]
    frame["mean"] = frame.mean(axis=1)
    frame["n_folds"] = frame.drop(columns="mean").notna().sum(axis=1)
    return frame


def plot_families(info: dict, table: pd.DataFrame, path: Path) -> str:
    task = info["task"]
    order = [g for g in table.index if g not in ("plain average of members", "stacked ensemble")]
    order = sorted(order, key=lambda g: -table.loc[g, "mean"]) + [
        g for g in ("plain average of members", "stacked ensemble") if g in table.index
    ]
    fig = plotting.new_figure(10, 0.45 * len(order) + 1.8)
    ax = fig.add_subplot()
    colors = [
        "tab:blue" if g == "stacked ensemble" else "tab:gray" if g.startswith("plain") else "tab:orange" for g in order
    ]
    values = [table.loc[g, "mean"] for g in order]
    ax.barh(order, values, color=colors)
    for i, v in enumerate(values):
        ax.text(v, i, f" {v:.4g}", va="center", fontsize=8)
    board = dict(LEADERBOARD.get(task, {}).get("entries", []))
    styles = {"RF-SCM/Magpie": ("tab:green", "--"), "CGCNN": ("tab:red", "--")}
    best = min(board.items(), key=lambda kv: kv[1]) if board else None
    for name, (color, ls) in styles.items():
        if name in board:
            ax.axvline(board[name], color=color, ls=ls, lw=1.2, label=f"leaderboard {name} {board[name]:g}")
    if best:
        ax.axvline(best[1], color="k", ls=":", lw=1.2, label=f"best published ({best[0]}) {best[1]:g}")
    n = len(info["folds"])
    ax.set_xlabel(f"mean test MAE over {n} fold(s)")
    ax.set_title(f"{task}: best configuration of each family/fusion vs the ensemble", fontsize=10)
    if board:  # a task without leaderboard figures draws no reference line
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(axis="x", alpha=0.3)
    plotting.save_figure(fig, path)
    return path.name


def plot_parity(info: dict, path: Path) -> Optional[str]:
    frames = [(k, f["predictions"]) for k, f in info["folds"].items() if f.get("predictions") is not None]
    if not frames:
        return None
    fig = plotting.new_figure(5.5, 5.5)
    ax = fig.add_subplot()
    lo, hi = math.inf, -math.inf
    for k, df in frames:
        ax.scatter(
            df["y"], df["prediction"], s=8, alpha=0.6, label=f"fold {k} (MAE {info['folds'][k]['scores']['mae']:.4g})"
        )
        lo = min(lo, float(df["y"].min()), float(df["prediction"].min()))
        hi = max(hi, float(df["y"].max()), float(df["prediction"].max()))
    ax.plot([lo, hi], [lo, hi], "k--", lw=1)
    unit = LEADERBOARD.get(info["task"], {}).get("unit", "")
    ax.set_xlabel(f"true {unit}".strip())
    ax.set_ylabel(f"predicted {unit}".strip())
    ax.set_title(f"{info['task']}: test predictions of the ensemble")
    ax.legend(fontsize=7, loc="upper left")
    plotting.save_figure(fig, path)
    return path.name


def plot_search_history(info: dict, path: Path) -> Optional[str]:
    frames = [(k, f["trials"]) for k, f in info["folds"].items() if f.get("trials") is not None and len(f["trials"])]
    if not frames:
        return None
    fig = plotting.new_figure(8, 4.5)
    ax = fig.add_subplot()
    families = sorted({str(x) for _, df in frames for x in df["family"]})
    fam_color = plotting.family_colors(families)
    for k, df in frames:
        vals = df["val_mae"].to_numpy(dtype=float)
        order = np.arange(1, len(df) + 1)
        ok = np.isfinite(vals)
        ax.scatter(order[ok], vals[ok], s=14, alpha=0.6, c=[fam_color[str(f)] for f in df["family"][ok]])
        plotting.plot_running_best(ax, vals, label=f"fold {k}: best so far")
    from matplotlib.lines import Line2D

    handles, _ = ax.get_legend_handles_labels()
    handles += [Line2D([], [], marker="o", ls="", color=fam_color[f], label=f) for f in families]
    plotting.maybe_log_y(ax, np.concatenate([df["val_mae"].to_numpy(dtype=float) for _, df in frames]))
    ax.set_xlabel("trial (start order)")
    ax.set_ylabel("inner-validation MAE of the trial")
    ax.set_title(f"{info['task']}: search history per fold")
    ax.legend(handles=handles, fontsize=7)
    ax.grid(alpha=0.3)
    plotting.save_figure(fig, path)
    return path.name


def rf_importance_table(info: dict) -> Optional[pd.DataFrame]:
    """Mean over folds of the tabular (RF) member's impurity and permutation importance per
    descriptor column (folds whose member has other columns are left out)."""
    parts = [f["importance"].get("rf") for f in info["folds"].values() if (f.get("importance") or {}).get("rf")]
    if not parts:
        return None
    cols = parts[0]["columns"]
    parts = [p for p in parts if p["columns"] == cols]
    imps = [p["impurity"] for p in parts if p.get("impurity") is not None]
    perms = [p["permutation"] for p in parts if p.get("permutation") is not None]
    frame = pd.DataFrame({"feature": cols})
    frame["impurity"] = np.mean(imps, axis=0) if imps else np.nan
    frame["permutation"] = np.mean(perms, axis=0) if perms else np.nan
    frame.attrs.update(
        n_folds=len(imps), n_perm_folds=len(perms), members=sorted({str(p.get("member")) for p in parts})
    )
    key = "impurity" if imps else "permutation"
    return frame.sort_values(key, ascending=False).reset_index(drop=True)


def plot_rf_importance(table: pd.DataFrame, path: Path, task: str) -> str:
    kinds = [k for k in ("impurity", "permutation") if table[k].notna().any()]
    fig = plotting.new_figure(6 * len(kinds), 0.28 * TOP_FEATURES + 1.5)
    axes = fig.subplots(1, len(kinds), squeeze=False)[0]
    titles = {
        "impurity": f"impurity importance (mean of {table.attrs.get('n_folds')} fold(s))",
        "permutation": f"permutation importance: rise in test MAE ({table.attrs.get('n_perm_folds')} fold(s))",
    }
    for ax, kind, color in zip(axes, kinds, ("tab:green", "tab:purple")):
        top = table.sort_values(kind, ascending=False).head(TOP_FEATURES).iloc[::-1]
        ax.barh(top["feature"], top[kind], color=color)
        ax.set_title(titles[kind], fontsize=10)
        ax.tick_params(axis="y", labelsize=7)
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle(
        f"{task}: member {', '.join(table.attrs.get('members', []))}, top {TOP_FEATURES} features", fontsize=11
    )
    plotting.save_figure(fig, path)
    return path.name


def modality_table(info: dict) -> Optional[pd.DataFrame]:
    rows = []
    for k, f in info["folds"].items():
        mod = (f.get("importance") or {}).get("modality")
        if not mod:
            continue
        for name in mod["graph"]:
            rows.append(
                {
                    "fold": k,
                    "model": name,
                    "base_mae": mod["base_mae"].get(name),
                    "graph": mod["graph"][name],
                    "magpie": mod["magpie"][name],
                }
            )
    if not rows:
        return None
    df = pd.DataFrame(rows)
    return (
        df.groupby("model", sort=False)
        .agg(
            base_mae=("base_mae", "mean"), graph=("graph", "mean"), magpie=("magpie", "mean"), n_folds=("fold", "count")
        )
        .reset_index()
    )


def plot_modality(table: pd.DataFrame, path: Path, task: str) -> str:
    fig = plotting.new_figure(7, 0.5 * len(table) + 1.8)
    ax = fig.add_subplot()
    y = np.arange(len(table))
    ax.barh(y - 0.2, table["graph"], height=0.4, color="tab:blue", label="graphs shuffled")
    ax.barh(y + 0.2, table["magpie"], height=0.4, color="tab:orange", label="Magpie shuffled")
    ax.set_yticks(y, table["model"])
    ax.set_xlabel("rise in test MAE (mean over folds)")
    ax.set_title(f"{task}: permutation importance of the two modalities")
    ax.legend(fontsize=8)
    ax.grid(axis="x", alpha=0.3)
    plotting.save_figure(fig, path)
    return path.name


# -- uncertainty ------------------------------------------------------------------------------------

COVERAGE_LEVELS = (68, 90, 95)


def _within(df: Optional[pd.DataFrame], column: str) -> float:
    """Share of the test rows of ``predictions.csv`` whose |error| is within ``column``."""
    if df is None or column not in df.columns or not {"y", "prediction"} <= set(df.columns):
        return float("nan")
    err = np.abs(df["y"].to_numpy(dtype=float) - df["prediction"].to_numpy(dtype=float))
    return float(np.mean(err <= df[column].to_numpy(dtype=float)))


def coverage_table(info: dict) -> pd.DataFrame:
    """Per fold: test coverage and mean width of the conformal intervals at 68 / 90 / 95 % (NaN for
    a fold benchmarked before them), the share of errors within the recorded std, and within the
    uncalibrated spread (the std of the older folds)."""
    rows = []
    for k in sorted(info["folds"]):
        f = info["folds"][k]
        s, df = f.get("summary") or {}, f.get("predictions")
        row = {"fold": k, "conformal": "coverage_90" in s}
        for lv in COVERAGE_LEVELS:
            row[f"coverage_{lv}"] = float(s.get(f"coverage_{lv}", np.nan))
            row[f"width_{lv}"] = float(s.get(f"width_{lv}", np.nan))
        row["within_std"] = _within(df, "std")
        spread = s.get("spread_within_1std")
        # before the intervals the recorded std was the spread
        row["within_spread"] = (
            float(spread) if spread is not None else (np.nan if row["conformal"] else row["within_std"])
        )
        row["difficulty"] = calibration_label(s.get("calibration"))
        rows.append(row)
    return pd.DataFrame(rows)


def calibration_label(calib) -> str:
    """``model + refit gain`` / ``model + averaging`` / ``constant``: the fold's difficulty and the
    correction its intervals carry (docs/uncertainty.md), the refit gain with its factor at 68 % and
    that factor's bootstrap standard error where the fold recorded them; ``-`` without a
    calibration record."""
    if not isinstance(calib, dict) or "difficulty" not in calib:
        return "-"
    if calib.get("refit_gain"):
        label = f"{calib['difficulty']} + refit gain"
        if isinstance(calib.get("refit_factor_68"), Real) and isinstance(calib.get("refit_factor_se_68"), Real):
            label += f" {calib['refit_factor_68']:.2f} ± {calib['refit_factor_se_68']:.2f} at 68 %"
        return label
    if calib.get("averaging"):
        return f"{calib['difficulty']} + averaging"
    return str(calib["difficulty"])


def plot_coverage(table: pd.DataFrame, path: Path, task: str) -> str:
    fig = plotting.new_figure(7, 4)
    ax = fig.add_subplot()
    x = np.arange(len(table))
    width = 0.25
    colors = {68: "tab:blue", 90: "tab:orange", 95: "tab:green"}
    for i, lv in enumerate(COVERAGE_LEVELS):
        ax.bar(x + (i - 1) * width, table[f"coverage_{lv}"], width, color=colors[lv], label=f"conformal {lv} %")
        ax.axhline(lv / 100.0, color=colors[lv], ls="--", lw=1)
    old = table["within_spread"].to_numpy(dtype=float)
    if np.isfinite(old).any():
        ax.scatter(x, old, marker="x", color="k", zorder=3, label="uncalibrated spread: within 1 std")
    ax.set_xticks(x, [str(k) for k in table["fold"]])
    ax.set_xlabel("official fold")
    ax.set_ylabel("share of test rows inside")
    ax.set_ylim(0, 1.05)
    ax.set_title(f"{task}: test coverage of the intervals (dashed: nominal)")
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(axis="y", alpha=0.3)
    plotting.save_figure(fig, path)
    return path.name


def uncertainty_section(info: dict, out: Path) -> list[str]:
    """The report's "Uncertainty" section: coverage per fold beside the nominal levels."""
    table = coverage_table(info)
    if table.empty:
        return []
    md = ["## Uncertainty", ""]
    conformal = table[table["conformal"]]
    if len(conformal):
        md += [
            "Conformal intervals (normalized split conformal on the stack's out-of-fold residuals of the "
            "training rows; the test rows only measure them, see docs/uncertainty.md): share of test rows "
            "inside the interval at each nominal coverage, and the mean interval width"
            + (f" {LEADERBOARD.get(info['task'], {}).get('unit', '')}".rstrip())
            + ". The last column is the uncalibrated fold-model spread, for reference.",
            "",
        ]
        rows = []
        for r in conformal.itertuples():
            rows.append(
                [r.fold, r.difficulty]
                + [
                    f"{_fmt(getattr(r, f'coverage_{lv}'), 3)} ({_fmt(getattr(r, f'width_{lv}'))})"
                    for lv in COVERAGE_LEVELS
                ]
                + [_fmt(r.within_std, 3), _fmt(r.within_spread, 3)]
            )
        if len(conformal) > 1:
            rows.append(
                ["mean", ""]
                + [
                    f"{_fmt(conformal[f'coverage_{lv}'].mean(), 3)} ({_fmt(conformal[f'width_{lv}'].mean())})"
                    for lv in COVERAGE_LEVELS
                ]
                + [_fmt(conformal["within_std"].mean(), 3), _fmt(conformal["within_spread"].mean(), 3)]
            )
        md.append(
            _table(
                ["fold", "calibration"]
                + [f"{lv} % nominal: coverage (width)" for lv in COVERAGE_LEVELS]
                + ["within 1 std (calibrated)", "within 1 spread (uncalibrated)"],
                rows,
            )
        )
        md.append("")
    older = table[~table["conformal"]]
    if len(older):
        md += [
            "Folds benchmarked before the conformal intervals ("
            + ", ".join(str(k) for k in older["fold"])
            + "): their std is the uncalibrated spread of the K fold-model stacks; share of test errors within "
            "1 std (a calibrated Gaussian std: 0.68): "
            + ", ".join(f"fold {r.fold} {_fmt(r.within_std, 2)}" for r in older.itertuples())
            + ".",
            "",
        ]
    md += [f"![coverage per fold]({plot_coverage(table, out / 'coverage.png', info['task'])})", ""]
    return md


# -- markdown ---------------------------------------------------------------------------------------


def _leaderboard_rows(task: str, ours: float, complete: bool) -> list:
    entries = list(LEADERBOARD.get(task, {}).get("entries", []))
    label = "**matfusion (this benchmark)**" + ("" if complete else " (partial: not all 5 folds)")
    rows = [(name, mae, "matbench leaderboard") for name, mae in entries]
    rows += [(name, mean, "local anchor") for name, mean, _ in LOCAL_ANCHORS.get(task, [])]
    rows.append((label, ours, "this run"))
    rows.sort(key=lambda r: r[1])
    return [
        (i + 1, name, f"**{_fmt(mae)}**" if src == "this run" else _fmt(mae), src)
        for i, (name, mae, src) in enumerate(rows)
    ]


def write_report(out: Path) -> Path:
    """Write ``<out>/report.md`` and its PNGs; returns the markdown's path."""
    info = collect(Path(out))
    out, task, folds = info["out"], info["task"], info["folds"]
    unit = LEADERBOARD.get(task, {}).get("unit", "")
    ks = sorted(folds)
    maes = [float(folds[k]["scores"]["mae"]) for k in ks]
    mean = float(np.mean(maes)) if maes else float("nan")
    complete = len(ks) == N_OFFICIAL_FOLDS
    summaries = {k: folds[k]["summary"] for k in ks}
    any_s = next((s for s in summaries.values() if s), {})
    budget = any_s.get("time_budget_s")
    md = [f"# matfusion benchmark: {task}", ""]
    md.append(
        f"Config `{info['state'].get('config_name', any_s.get('config', '?'))}`; folds recorded: "
        f"{', '.join(map(str, ks)) or 'none'} of 0-{N_OFFICIAL_FOLDS - 1}; search budget per fold: "
        f"{_fmt(budget) + ' s' if budget else 'none'}; searched families: "
        f"{', '.join(any_s.get('families', [])) or '?'}; matbench results: `{RESULTS_FILE}` "
        f"(written {info.get('datestamp') or '?'} UTC)."
    )
    md.append("")
    md.append(
        f"**Mean test MAE over {len(ks)} fold(s): {_fmt(mean)}{' ' + unit if unit else ''}**"
        + ("" if complete else " — not comparable to the leaderboard until all 5 folds are recorded.")
    )
    md += ["", "## Test MAE per fold", ""]
    rows = []
    for k in ks:
        s, sc = summaries[k], folds[k]["scores"]
        wall = s.get("fold_wall_s")
        rows.append(
            [
                k,
                f"**{_fmt(sc['mae'])}**",
                _fmt(sc.get("rmse")),
                _fmt(s.get("ensemble_r2"), 3),
                f"{s.get('best_member', '-')} {_fmt(s.get('best_member_mae'))}",
                _fmt(s.get("average_mae")),
                f"{_fmt(s.get('best_val_mae'))} / {_fmt(s.get('best_test_mae_info'))}",
                s.get("n_trials", "-"),
                s.get("n_stack_rows", "-"),
                s.get("n_test", "-"),
                " / ".join(_seconds(v) for v in (s.get("search_wall_s"), s.get("stack_wall_s"), wall)),
            ]
        )
    if ks:
        rows.append(
            [
                "mean",
                f"**{_fmt(mean)}**",
                _fmt(np.mean([folds[k]["scores"].get("rmse", np.nan) for k in ks])),
                "",
                "",
                "",
                "",
                "",
                "",
                "",
                "",
            ]
        )
        if len(ks) > 1:
            rows.append(["std", _fmt(np.std(maes)), "", "", "", "", "", "", "", "", ""])
    md.append(
        _table(
            [
                "fold",
                "ensemble MAE",
                "RMSE",
                "R^2",
                "best member (test MAE)",
                "plain average",
                "best trial val / test (info)",
                "trials",
                "train rows",
                "test rows",
                "wall s: search / stack / fold",
            ],
            rows,
        )
    )
    md += [
        "",
        "Members are chosen by inner-validation MAE only; member and best-trial test MAEs are for "
        "information. The ensemble's std is recorded with the predictions (see Uncertainty).",
        "",
    ]
    md += uncertainty_section(info, out)

    md += ["## Next to the matbench leaderboard", ""]
    if task in LEADERBOARD or task in LOCAL_ANCHORS:
        md.append(
            _table(["rank", "model", f"mean MAE {unit}".strip(), "source"], _leaderboard_rows(task, mean, complete))
        )
        md += ["", f"Leaderboard figures: {LEADERBOARD_SOURCE}. Local anchors: {LOCAL_SOURCE}.", ""]
        anchors = LOCAL_ANCHORS.get(task, [])
        if anchors and ks:
            md.append(
                _table(
                    ["fold", "matfusion"] + [a[0] for a in anchors],
                    [[k, _fmt(folds[k]["scores"]["mae"])] + [_fmt(a[2][k]) for a in anchors] for k in ks],
                )
            )
            md.append("")
    else:
        md += [f"No leaderboard figures are stored for {task}.", ""]
    figs = []
    if ks:
        figs.append(("fold_mae.png", plot_fold_mae(info, out / "fold_mae.png")))
    md += ["![test MAE per fold](fold_mae.png)", ""] if ks else []

    md += ["## Model families", ""]
    table = family_table(info)
    plot_families(info, table, out / "families.png")
    md += [
        "Best configuration (by inner-validation MAE) of each family/fusion, retrained out of fold as an "
        "ensemble member, its test MAE for information; the plain average of the members; the stacked ensemble.",
        "",
        "![families](families.png)",
        "",
    ]
    md.append(
        _table(
            ["model"] + list(table.columns),
            [[g] + [_fmt(v) if c != "n_folds" else int(v) for c, v in row.items()] for g, row in table.iterrows()],
        )
    )
    md.append("")
    weights = [(k, summaries[k].get("weights")) for k in ks if summaries[k].get("weights")]
    if weights:
        md += [
            "Meta-learner weights per fold: "
            + "; ".join(f"fold {k}: " + ", ".join(f"{n} {_fmt(w, 3)}" for n, w in ws.items()) for k, ws in weights),
            "",
        ]

    md += ["## Parity", ""]
    if plot_parity(info, out / "parity.png"):
        md += ["![parity](parity.png)", ""]
    md += ["## Search history", ""]
    if plot_search_history(info, out / "search_history.png"):
        counts = "; ".join(
            f"fold {k}: " + ", ".join(f"{n} {s}" for s, n in (summaries[k].get("trial_status") or {}).items())
            for k in ks
            if summaries[k]
        )
        md += [
            "Inner-validation MAE of each trial in start order, coloured by family, and the running best per fold "
            f"({counts}).",
            "",
            "![search history](search_history.png)",
            "",
        ]
    else:
        md += ["No trial history was recorded.", ""]

    md += ["## Feature importance", ""]
    rf = rf_importance_table(info)
    if rf is not None:
        plot_rf_importance(rf, out / "rf_importance.png", task)
        md += [
            f"Member {', '.join(rf.attrs['members'])} (the best random forest of each fold's search, its K fold "
            f"models): impurity importance (mean over {rf.attrs['n_folds']} fold(s)) and permutation importance on "
            f"the test rows (rise in MAE when one Magpie/descriptor column is shuffled; {rf.attrs['n_perm_folds']} "
            "fold(s)), computed after the predictions were recorded.",
            "",
            "![rf importance](rf_importance.png)",
            "",
        ]
        top = rf.head(10)
        md.append(
            _table(
                ["feature", "impurity", "permutation (MAE rise)"],
                [[r.feature, _fmt(r.impurity, 3), _fmt(r.permutation, 3)] for r in top.itertuples()],
            )
        )
        md.append("")
    else:
        md += ["No RF member in the ensembles: no Magpie feature importance.", ""]
    mod = modality_table(info)
    if mod is not None and len(mod) > 1:
        plot_modality(mod, out / "modality_importance.png", task)
        md += [
            "Permutation importance of the two modalities (test rows, after recording): rise in MAE when the "
            "crystal graphs, or the Magpie vectors, are shuffled across rows while the other input stays, for "
            "each fused member (early/attention/late/residual fusion) and the whole ensemble.",
            "",
            "![modality importance](modality_importance.png)",
            "",
        ]
        md.append(
            _table(
                ["model", "test MAE", "graphs shuffled: MAE rise", "Magpie shuffled: MAE rise", "folds"],
                [[r.model, _fmt(r.base_mae), _fmt(r.graph), _fmt(r.magpie), r.n_folds] for r in mod.itertuples()],
            )
        )
        md.append("")
    elif mod is not None:
        md += [
            "No fused member (early/attention/late/residual) in the ensembles; modality importance of the ensemble only: "
            + "; ".join(
                f"graphs shuffled +{_fmt(r.graph)}, Magpie shuffled +{_fmt(r.magpie)}" for r in mod.itertuples()
            ),
            "",
        ]
    else:
        md += ["No crystal graphs (composition-only task) or no importances recorded: no modality importance.", ""]
    notes = [n for k in ks for n in (folds[k].get("importance") or {}).get("notes", [])]
    if notes:
        md += ["Notes: " + "; ".join(notes), ""]
    md += [
        "## Files",
        "",
        f"`{RESULTS_FILE}`: matbench's results (`MatbenchBenchmark.as_dict()`, gzip); `fold_<k>/`: predictions.csv "
        "(id, truth, prediction, std, lower, upper, spread, members), members.csv, reliability.png, trials.csv, summary.json, importance.json, rows.json "
        "(ids used by the search and the stacking, and the test ids); `benchmark_state.json`: resume state.",
        "",
    ]
    path = out / REPORT_FILE
    path.write_text("\n".join(md))
    return path
