"""`matfusion benchmark`: nested CV over matbench's official folds, results.json.gz, resume, report.

Real parts only: real matbench data and the matbench package (offline through MATMINER_DATA),
real local Ray, a real sqlite MLflow store in tmp_path.  Leakage is checked on the rows that were
actually packed for the search's trials and for the stacking's fold models (the real functions,
wrapped to record their arguments), not on what the benchmark says it did.
"""

import gzip
import json
import re
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from conftest import REPO

from matfusion.benchmark import matbench_io as mio
from matfusion.benchmark import report as rp
from matfusion.benchmark import runner as bm
from matfusion.config import ConfigError, config_from_dict


def _mini(tmp_path, name="mini", families=("rf", "cgcnn"), **search):
    raw = {
        "name": name,
        "data": {"source": "matbench_phonons"},
        "features": {"cutoff": 5.0, "max_neighbors": 8},
        "search": {
            "families": list(families),
            "fusions": ["early"],
            "preset": "quick",
            "num_samples": 2,
            "max_epochs": 2,
            "grace_period": 1,
            "seed": 0,
            "max_concurrent": 2,
            "storage_path": str(tmp_path / "ray"),
            **search,
        },
        "ensemble": {"k": 1, "n_folds": 2, "meta": "nnls"},
        "benchmark": {"train_limit": 60, "permutation_repeats": 1},
        "mlflow": {
            "tracking_uri": f"sqlite:///{tmp_path / 'mlruns.db'}",
            "artifact_location": str(tmp_path / "artifacts"),
        },
    }
    space = {"rf.n_estimators": 40}
    if "cgcnn" in families:
        space.update({"cgcnn.hidden": 32, "cgcnn.n_conv": 2})
    raw["search"]["space"] = space
    return config_from_dict(raw)


def _official_test_ids(task):
    from matbench.metadata import mbv01_validation

    return {int(k.split("_")[1]): list(v["test"]) for k, v in mbv01_validation.splits[task].items()}


class RowRecorder:
    """Wraps the real functions that pack rows for fitting and records what they were given:
    the search's dataset (matfusion.search.tuner) and its trial rows (matfusion.data.prepare), and the dataset the
    benchmark featurizes for stacking and the rows its fold models are fitted on."""

    def __init__(self, monkeypatch):
        import matfusion.data.featurize as featurize_mod
        import matfusion.data.prepare as prepare
        import matfusion.search.tuner as tuner
        import matfusion.trainables.trial_data as trial_data

        self.search = []  # (dataset ids, train ids, val ids) per search
        self.stacking = []  # (fit ids, early-stopping ids) per fold model fit
        self._search_ds = None
        self._eval_ds = None
        real_load, real_pack, real_feat = tuner.load_dataset, prepare.pack_trial_data, featurize_mod.featurize
        real_stack_pack = trial_data.pack_trial_data

        def load(*a, **kw):
            self._search_ds = real_load(*a, **kw)
            return self._search_ds

        def pack_search(descriptors, graphs, targets, train, val, **kw):
            ids = self._search_ds.ids
            self.search.append(([ids[r] for r in train], [ids[r] for r in val]))
            return real_pack(descriptors, graphs, targets, train, val, **kw)

        def feat(dataset, *a, **kw):
            self._eval_ds = dataset
            return real_feat(dataset, *a, **kw)

        def pack_stack(descriptors, graphs, targets, train, val, **kw):
            ids = self._eval_ds.ids
            self.stacking.append(([ids[r] for r in train], [ids[r] for r in val]))
            return real_stack_pack(descriptors, graphs, targets, train, val, **kw)

        monkeypatch.setattr(tuner, "load_dataset", load)
        monkeypatch.setattr(prepare, "pack_trial_data", pack_search)
        monkeypatch.setattr(featurize_mod, "featurize", feat)
        monkeypatch.setattr(trial_data, "pack_trial_data", pack_stack)


# -- fast checks ----------------------------------------------------------------------------------


def test_parse_folds_and_task_errors_name_the_item():
    assert bm.parse_folds("1, 0,1") == [0, 1]
    assert bm.parse_folds(None) is None
    with pytest.raises(bm.BenchmarkError, match="fold 7 does not exist"):
        bm.parse_folds("0,7")
    with pytest.raises(bm.BenchmarkError, match="'x' is not a fold number"):
        bm.parse_folds("0,x")
    with pytest.raises(bm.BenchmarkError, match="matbench_nope.*not a matbench v0.1 task"):
        mio.check_task("matbench_nope")
    with pytest.raises(bm.BenchmarkError, match="classification"):
        mio.check_task("matbench_glass")


def test_config_section_and_data_limit_refused(tmp_path):
    cfg = _mini(tmp_path)
    assert cfg.benchmark.train_limit == 60
    with pytest.raises(ConfigError, match="benchmark.train_limit"):
        config_from_dict({"name": "x", "data": {"source": "matbench_phonons"}, "benchmark": {"train_limit": 1}})
    with pytest.raises(ConfigError, match="benchmark.nope: unknown key"):
        config_from_dict({"name": "x", "data": {"source": "matbench_phonons"}, "benchmark": {"nope": 1}})
    limited = config_from_dict({"name": "x", "data": {"source": "matbench_phonons", "limit": 100}})
    with pytest.raises(ConfigError, match="data.limit .*benchmark.train_limit"):
        bm.prepare_config(limited, "matbench_phonons")
    # the fold's seeded subset is sized so that its training part has about train_limit rows
    fcfg = bm.fold_config(bm.prepare_config(cfg, "matbench_phonons"), 3, 1265, 253)
    assert fcfg.data.fold == 3 and fcfg.name == "mini-fold3" and fcfg.data.limit == 75
    assert fcfg.mlflow.experiment == "mini" and not fcfg.ensemble.enabled


def test_composition_only_keeps_tabular_families():
    kept, dropped = bm.composition_only_families(["rf", "cgcnn", "alignn"], "matbench_expt_gap")
    assert kept == ["rf"] and dropped == ["cgcnn", "alignn"]
    with pytest.raises(bm.BenchmarkError, match="compositions only.*cgcnn.*rf"):
        bm.composition_only_families(["cgcnn"], "matbench_expt_gap")


def test_our_rows_line_up_with_matbench_and_a_missing_test_row_is_named(tmp_path, data_dir, monkeypatch):
    from matbench.bench import MatbenchBenchmark

    from matfusion.data.matbench import load_matbench

    monkeypatch.delenv("MATMINER_DATA", raising=False)
    assert mio.ensure_matminer_data("matbench_phonons", data_dir) == str(data_dir / "matbench")
    mb = MatbenchBenchmark(autoload=False, subset=["matbench_phonons"])
    task = mb.tasks_map["matbench_phonons"]
    task.load()
    ds = load_matbench("matbench_phonons", data_dir)
    ids = mio.check_alignment(task, ds)
    official = _official_test_ids("matbench_phonons")
    assert ids == official and sum(len(v) for v in ids.values()) == len(ds)
    missing = official[2][5]
    keep = [i for i, rid in enumerate(ds.ids) if rid != missing]
    with pytest.raises(bm.BenchmarkError, match=f"fold 2: 1 of matbench's test rows .*first: {missing}"):
        mio.check_alignment(task, ds.subset(keep))
    # a partial results file round-trips (hash checked) and a tampered one is refused
    rng = np.random.default_rng(0)
    y = task.get_test_data(0, as_type="df", include_target=True)[task.metadata.target].to_numpy()
    task.record(0, y + rng.normal(0, 1, len(y)))
    path = mio.write_results(mb, tmp_path / "results.json.gz")
    assert path.read_bytes()[:2] == b"\x1f\x8b"
    back = mio.open_benchmark("matbench_phonons", path)
    assert mio.recorded_folds(back, "matbench_phonons") == [0]
    d = mio.read_results_dict(path)
    d["tasks"]["matbench_phonons"]["results"]["fold_0"]["scores"]["mae"] = 0.0
    with gzip.open(path, "wt") as fh:
        json.dump(d, fh)
    with pytest.raises(bm.BenchmarkError, match="hash does not match"):
        mio.open_benchmark("matbench_phonons", path)


def test_leaderboard_constants_match_anchors_file():
    anchors = (REPO / ".." / "shared" / "ANCHORS.md").resolve()
    if not anchors.is_file():
        pytest.fail(f"{anchors} not found")
    rows = [line for line in anchors.read_text().splitlines() if line.startswith("| ") and "---" not in line]
    header = [c.strip() for c in rows[0].strip("|").split("|")]
    tasks = [h.split()[0] for h in header[1:]]
    for line in rows[1:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        model = cells[0]
        for task, cell in zip(tasks, cells[1:]):
            value = cell.strip("*")
            if value in ("—", "-", ""):
                assert model not in dict(rp.LEADERBOARD.get(task, {}).get("entries", [])), (task, model)
                continue
            assert dict(rp.LEADERBOARD[task]["entries"])[model] == pytest.approx(float(value)), (task, model)
    text = anchors.read_text()
    for entries in rp.LOCAL_ANCHORS.values():
        for _, mean, per_fold in entries:
            assert f"{mean:.2f}" in text or f"{mean:.4f}" in text
            assert all(re.search(rf"\b{v:.2f}\b" if v > 1 else rf"{v:.4f}", text) for v in per_fold)


def test_cli_help_lists_benchmark_and_report():
    proc = subprocess.run(
        [sys.executable, "-m", "matfusion.cli", "benchmark", "--help"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0 and "--folds" in proc.stdout and "resumes" in proc.stdout
    proc = subprocess.run(
        [sys.executable, "-m", "matfusion.cli", "report", "--help"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0 and "report.md" in proc.stdout
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "matfusion.cli",
            "benchmark",
            "matbench_phonons",
            "--config",
            str(REPO / "configs" / "benchmark.yaml"),
            "--folds",
            "9",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "fold 9 does not exist" in proc.stderr


# -- end to end ---------------------------------------------------------------------------------------


@pytest.mark.slow
def test_miniature_benchmark_two_folds_records_reports_and_resumes(tmp_path, data_dir, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MATMINER_DATA", raising=False)
    rec = RowRecorder(monkeypatch)
    cfg = _mini(tmp_path)
    out = tmp_path / "results"
    res = bm.run_benchmark(cfg, "matbench_phonons", folds=[0, 1], out=out, progress=False)
    assert res.folds_run == [0, 1] and not res.interrupted and res.folds_skipped == []

    # matbench's file: both folds recorded, every test row predicted, in matbench's id order
    official = _official_test_ids("matbench_phonons")
    d = mio.read_results_dict(out / "results.json.gz")
    results = d["tasks"]["matbench_phonons"]["results"]
    for k in (0, 1):
        assert list(results[f"fold_{k}"]["data"]) == official[k]
        preds = pd.read_csv(out / f"fold_{k}" / "predictions.csv")
        assert list(preds["id"]) == official[k]
        assert results[f"fold_{k}"]["scores"]["mae"] == pytest.approx(np.mean(np.abs(preds["prediction"] - preds["y"])))
        assert res.fold_mae[k] == pytest.approx(results[f"fold_{k}"]["scores"]["mae"])
        assert all(u["std"] > 0 for u in results[f"fold_{k}"]["uncertainty"].values())
        # the conformal interval and the old spread travel with the predictions; the summary holds
        # their test coverage at the nominal levels (calibrated on the stacking rows only)
        assert {"lower", "upper", "spread"} <= set(preds.columns)
        assert (preds["lower"] < preds["prediction"]).all() and (preds["prediction"] < preds["upper"]).all()
        summary = json.loads((out / f"fold_{k}" / "summary.json").read_text())
        inside = np.mean((preds["y"] >= preds["lower"]) & (preds["y"] <= preds["upper"]))
        assert summary["coverage_90"] == pytest.approx(inside) and summary["calibration"]["difficulty"] == "model"
        assert summary["width_90"] == pytest.approx(np.mean(preds["upper"] - preds["lower"]))
        assert (out / f"fold_{k}" / "reliability.png").stat().st_size > 1000
    assert not results["fold_2"]["data"]
    back = mio.open_benchmark("matbench_phonons", out / "results.json.gz")
    assert mio.recorded_folds(back, "matbench_phonons") == [0, 1]

    # no test-fold row reached a search trial or a stacking fit (rows actually packed)
    # 2 folds x (2 stacking folds + the refit on all stacking rows); members share them
    assert len(rec.search) == 2 and len(rec.stacking) == 2 * 3
    refits = [rec.stacking[2], rec.stacking[5]]
    for k, (fit_ids, es_ids) in zip((0, 1), refits):  # the refit trains on all the stacking rows
        audit = json.loads((out / f"fold_{k}" / "rows.json").read_text())
        assert sorted(set(fit_ids) | set(es_ids)) == sorted(audit["stacking_ids"])
    for k, (train, val) in zip((0, 1), rec.search):
        test = set(official[k])
        assert train and val and not (set(train) | set(val)) & test
        audit = json.loads((out / f"fold_{k}" / "rows.json").read_text())
        assert audit["search_train_ids"] == train and audit["search_val_ids"] == val
        assert audit["test_ids"] == official[k]
        assert not set(audit["stacking_ids"]) & test and not set(audit["ensemble_used_ids"]) & test
        assert 40 <= len(audit["stacking_ids"]) <= 80  # train_limit 60
    for k, fits in zip((0, 1), (rec.stacking[:3], rec.stacking[3:])):
        audit = json.loads((out / f"fold_{k}" / "rows.json").read_text())
        for fit_ids, es_ids in fits:
            assert not (set(fit_ids) | set(es_ids)) & set(official[k])
            assert set(fit_ids) | set(es_ids) <= set(audit["stacking_ids"])

    # MLflow: one search parent run per fold, the ensemble nested in it
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlruns.db'}")
    exp = client.get_experiment_by_name("mini")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("kind") == "search"]
    assert sorted(r.data.tags["benchmark_fold"] for r in parents) == ["0", "1"]
    for p in parents:
        assert p.data.tags["status"] == "completed" and p.data.metrics["benchmark_test_mae"] > 0
        nested = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == p.info.run_id]
        assert [r.data.tags["kind"] for r in nested if r.data.tags.get("kind") == "ensemble"] == ["ensemble"]
        assert "benchmark/results.json.gz" in {a.path for a in client.list_artifacts(p.info.run_id, "benchmark")}

    # the report
    text = (out / "report.md").read_text()
    assert "| 0 | **" in text and "| 1 | **" in text and "MEGNet" in text and "not comparable" in text
    assert "## Uncertainty" in text and "| 0 | model + averaging |" in text and "| 1 | model + averaging |" in text
    for png in (
        "fold_mae.png",
        "families.png",
        "parity.png",
        "search_history.png",
        "rf_importance.png",
        "coverage.png",
    ):
        assert (out / png).stat().st_size > 1000, png
    imp = json.loads((out / "fold_0" / "importance.json").read_text())
    assert len(imp["rf"]["impurity"]) == len(imp["rf"]["columns"]) and imp["rf"]["permutation"] is not None
    assert "ensemble" in imp["modality"]["graph"]

    # resume: a second call skips the recorded folds and starts no search
    before = (out / "results.json.gz").read_bytes()
    n_runs = len(runs)
    again = bm.run_benchmark(cfg, "matbench_phonons", folds=[0, 1], out=out, progress=False, report=False)
    assert again.folds_skipped == [0, 1] and again.folds_run == []
    assert (out / "results.json.gz").read_bytes() == before
    assert len(client.search_runs([exp.experiment_id])) == n_runs and len(rec.search) == 2
    # a different config in the same folder is refused, naming the key
    other = _mini(tmp_path, num_samples=3)
    with pytest.raises(bm.BenchmarkError, match="search.num_samples: 2 then, 3 now"):
        bm.run_benchmark(other, "matbench_phonons", folds=[2], out=out, progress=False)


@pytest.mark.slow
def test_composition_only_task_all_folds_loads_back_in_matbench(tmp_path, data_dir, monkeypatch, capsys):
    from matbench.bench import MatbenchBenchmark

    monkeypatch.delenv("MATMINER_DATA", raising=False)
    rec = RowRecorder(monkeypatch)
    cfg = _mini(tmp_path, name="mini-gap", families=("rf", "cgcnn"), num_samples=1)
    out = tmp_path / "gap"
    res = bm.run_benchmark(cfg, "matbench_expt_gap", folds=[0, 1, 2, 3, 4], out=out, progress=True)
    printed = capsys.readouterr().out
    assert "compositions only" in printed and "left out cgcnn" in printed
    assert res.folds_run == [0, 1, 2, 3, 4]
    official = _official_test_ids("matbench_expt_gap")
    for k, (train, val) in enumerate(rec.search):
        assert not (set(train) | set(val)) & set(official[k])
    for k in range(5):
        summary = json.loads((out / f"fold_{k}" / "summary.json").read_text())
        assert summary["families"] == ["rf"] and summary["members"] == ["rf"]
        assert summary["n_test"] == len(official[k])
    assert len(rec.stacking) == 5 * 3  # 5 folds x (2 stacking folds + the refit)
    for k in range(5):
        for fit_ids, es_ids in rec.stacking[3 * k : 3 * k + 3]:
            assert fit_ids and not (set(fit_ids) | set(es_ids)) & set(official[k])

    # matbench loads the complete file back with its own validation (from_file reads plain JSON)
    plain = tmp_path / "results.json"
    plain.write_bytes(gzip.decompress((out / "results.json.gz").read_bytes()))
    mb = MatbenchBenchmark.from_file(str(plain))
    task = mb.tasks_map["matbench_expt_gap"]
    assert task.all_folds_recorded
    assert task.scores["mae"]["mean"] == pytest.approx(res.mean_mae)
    assert mio.load_results(out / "results.json.gz").tasks_map["matbench_expt_gap"].all_folds_recorded
    text = (out / "report.md").read_text()
    assert "MODNet" in text and "not comparable" not in text and "composition-only" in text
    assert not (out / "modality_importance.png").exists()

    # `matfusion report` rebuilds it from the folder alone
    (out / "report.md").unlink()
    proc = subprocess.run(
        [sys.executable, "-m", "matfusion.cli", "report", str(out)], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (out / "report.md").is_file()


def test_stacked_groups_keeps_the_best_graph_group():
    from matfusion.benchmark.fold import stacked_groups

    ordered = ["lgbm", "et", "rf", "cgcnn-early", "cgcnn-late"]
    assert stacked_groups(ordered, 3) == ["lgbm", "et", "rf"]
    assert stacked_groups(ordered, 3, graph_member=True) == ["lgbm", "et", "rf", "cgcnn-early"]
    assert stacked_groups(ordered, 4, graph_member=True) == ["lgbm", "et", "rf", "cgcnn-early"]
    assert stacked_groups(["cgcnn-late", "lgbm", "et"], 2, graph_member=True) == ["cgcnn-late", "lgbm"]
    assert stacked_groups(["lgbm", "et"], 1, graph_member=True) == ["lgbm"]  # no graph group searched


@pytest.mark.slow
def test_sigterm_during_a_folds_stacking_is_143_and_the_rerun_reuses_its_search(
    tmp_path, data_dir, monkeypatch, capsys
):
    """`matfusion benchmark` stopped by SIGTERM after its search, while it stacks: one line, exit
    143, the fold not recorded; the same command again reuses the completed search and records it."""
    import os
    import signal
    import threading
    import time

    import yaml

    from matfusion.cli import main

    monkeypatch.delenv("MATMINER_DATA", raising=False)
    config, out = tmp_path / "mini.yaml", tmp_path / "results"
    config.write_text(yaml.safe_dump(_mini(tmp_path, name="mini-sigterm").model_dump(mode="json")))
    argv = ["benchmark", "matbench_phonons", "--config", str(config), "--folds", "0", "--out", str(out)]
    argv += ["--data-dir", str(data_dir), "--quiet"]
    state = out / "benchmark_state.json"

    def fold_status():
        try:
            return json.loads(state.read_text())["folds"]["0"]["status"]
        except (OSError, ValueError, KeyError):
            return None

    def term_once_searched():
        deadline = time.time() + 300
        while time.time() < deadline and fold_status() != "searched":
            time.sleep(0.02)
        os.kill(os.getpid(), signal.SIGTERM)  # the main thread is stacking now

    watcher = threading.Thread(target=term_once_searched, daemon=True)
    watcher.start()
    assert main(argv) == 143
    watcher.join(timeout=10)
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == "matfusion: interrupted (SIGTERM)" and "Traceback" not in err, err[-2000:]
    assert fold_status() == "searched"  # searched, not recorded
    assert main(argv[:-1]) == 0  # again, with progress: the search is reused, the fold recorded
    text = capsys.readouterr().out
    assert "fold 0: reusing the completed search run" in text, text[-2000:]
    assert fold_status() == "recorded"
