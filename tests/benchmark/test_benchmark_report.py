"""The benchmark report's Uncertainty section (matfusion/benchmark/report.py): coverage per fold
beside the nominal levels, and the folders benchmarked before the conformal intervals."""

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd

from matfusion.benchmark import report as rp

COMMITTED = Path(__file__).resolve().parents[2] / "results" / "matbench_phonons"


def _copy(tmp_path) -> Path:
    out = tmp_path / "matbench_phonons"
    shutil.copytree(COMMITTED, out, ignore=shutil.ignore_patterns("*.png", "report.md"))
    return out


def _within_std(pred: pd.DataFrame) -> float:
    return float(np.mean(np.abs(pred["y"] - pred["prediction"]) <= pred["std"]))


def test_a_folder_from_before_the_intervals_reports_its_spread_coverage(tmp_path):
    out = _copy(tmp_path)
    section = "\n".join(rp.uncertainty_section(rp.collect(out), out))
    assert section.startswith("## Uncertainty")
    assert "Folds benchmarked before the conformal intervals (0, 1, 2, 3, 4)" in section
    for k in range(5):
        pred = pd.read_csv(out / f"fold_{k}" / "predictions.csv")
        assert f"fold {k} {_within_std(pred):.2g}" in section  # e.g. fold 0 0.34: the figures
    assert "nominal: coverage (width)" not in section  # no conformal table without conformal folds
    assert (out / "coverage.png").stat().st_size > 1000


def test_conformal_folds_show_coverage_beside_the_nominal_levels(tmp_path):
    """Fold 0 rewritten as a benchmark with intervals writes it (summary keys and predictions.csv
    columns of benchmark/fold.py); the other folds stay old-style: both kinds in one report."""
    out = _copy(tmp_path)
    fdir = out / "fold_0"
    pred = pd.read_csv(fdir / "predictions.csv")
    err = np.abs(pred["y"] - pred["prediction"])
    half = {68: 1.0 * err.median() * 1.5, 90: 3.0 * err.median(), 95: 4.0 * err.median()}  # constant widths
    summary = json.loads((fdir / "summary.json").read_text())
    summary["spread_within_1std"] = _within_std(pred)
    for lv, h in half.items():
        summary[f"coverage_{lv}"] = float(np.mean(err <= h))
        summary[f"width_{lv}"] = 2.0 * h
    summary["calibration"] = {"difficulty": "constant", "coverage": 0.9}
    (fdir / "summary.json").write_text(json.dumps(summary))
    pred["spread"] = pred["std"]
    pred["std"] = half[68]
    pred["lower"], pred["upper"] = pred["prediction"] - half[90], pred["prediction"] + half[90]
    pred.to_csv(fdir / "predictions.csv", index=False)

    table = rp.coverage_table(rp.collect(out))
    row = table.set_index("fold").loc[0]
    assert bool(row["conformal"]) and row["coverage_90"] == summary["coverage_90"]
    assert row["within_std"] == float(np.mean(err <= half[68]))
    assert row["within_spread"] == summary["spread_within_1std"]
    assert not table.set_index("fold").loc[1, "conformal"] and np.isnan(table.set_index("fold").loc[1, "coverage_90"])

    text = rp.write_report(out).read_text()
    section = text[text.index("## Uncertainty") : text.index("## Next to the matbench leaderboard")]
    assert "| fold | calibration | 68 % nominal: coverage (width) | 90 % nominal: coverage (width) |" in section
    cells = [f"{summary[f'coverage_{lv}']:.3g} ({summary[f'width_{lv}']:.4g})" for lv in (68, 90, 95)]
    assert f"| 0 | constant | {cells[0]} | {cells[1]} | {cells[2]} |" in section
    assert "Folds benchmarked before the conformal intervals (1, 2, 3, 4)" in section
    # the correction the intervals carry is named beside the difficulty
    assert rp.calibration_label({"difficulty": "model", "averaging": False, "refit_gain": True}) == "model + refit gain"
    recorded = {"difficulty": "model", "refit_gain": True, "refit_factor_68": 0.8862, "refit_factor_se_68": 0.0517}
    assert rp.calibration_label(recorded) == "model + refit gain 0.89 ± 0.05 at 68 %"
    assert rp.calibration_label({"difficulty": "model", "averaging": True, "refit_gain": False}) == "model + averaging"
    assert rp.calibration_label(None) == "-"
    assert (out / "coverage.png").stat().st_size > 1000
