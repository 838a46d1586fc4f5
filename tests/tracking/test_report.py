"""Search report: trials frame, leaderboard, plots and the `leaderboard` subcommand, read from
a real MLflow sqlite store whose trial runs are written by the search's own MlflowTrialLogger."""

import math
import time
from types import SimpleNamespace

import matplotlib.image
import mlflow.artifacts
import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient
from search_records import MAIN_RANKED, MAIN_TRIALS, cgcnn, rf, write_search

from matfusion.cli import main
from matfusion.tracking.leaderboard import (
    BASE_COLUMNS,
    LEADERBOARD_COLUMNS,
    leaderboard,
    search_leaderboard,
    search_trials,
)
from matfusion.tracking.logger import ensure_experiment
from matfusion.tracking.report import log_search_report, param_importances
from matfusion.tracking.runs import latest_search_parent, latest_search_run, nested_runs


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mlflow-report")
    uri = f"sqlite:///{tmp / 'mlruns.db'}"
    client = MlflowClient(uri)
    exps = {
        name: ensure_experiment(client, name, str(tmp / "artifacts" / name))
        for name in ("rf-only", "nothing-finished", "main")
    }
    hour = 3600 * 1000
    now = int(time.time() * 1000)
    ids = {}
    ids["rf-only"] = write_search(
        client,
        exps["rf-only"],
        {
            "r1": (rf(150, max_features=0.3), [0.31], "completed"),
            "r2": (rf(250, max_depth=0), [0.27], "completed"),
            "r3": (rf(350, max_features=0.7), [0.29], "completed"),
            "r4": (rf(450, max_depth=40), [0.35], "completed"),
        },
        start_time=now - 3 * hour,
        tmp_path=tmp,
    )
    ids["no-trials"] = write_search(client, exps["nothing-finished"], {}, start_time=now - 2 * hour - 1, tmp_path=tmp)
    ids["nothing-finished"] = write_search(
        client,
        exps["nothing-finished"],
        {
            "f1": (cgcnn(64), [], "failed"),
            "f2": (rf(200), [], "failed"),
            "f3": (cgcnn(32), [], "running"),
        },
        start_time=now - 2 * hour,
        tmp_path=tmp,
    )
    # an older search of the main experiment, with a better trial that the CLI must not show
    ids["main-old"] = write_search(
        client, exps["main"], {"old_rf": (rf(100), [0.01], "completed")}, start_time=now - hour, tmp_path=tmp
    )
    ids["main"] = write_search(client, exps["main"], MAIN_TRIALS, tmp_path=tmp)
    return SimpleNamespace(uri=uri, client=client, exps=exps, ids=ids, tmp=tmp)


def _tags(store, key):
    run = store.client.get_run(store.ids[key])
    return run.data.tags, run.data.metrics


def _artifacts(store, key):
    return sorted(a.path for a in store.client.list_artifacts(store.ids[key]))


# ----------------------------------------------------------------------------- frame
def test_search_trials_frame(store):
    df = search_trials(store.client, store.exps["main"], store.ids["main"])
    assert list(df.columns[: len(BASE_COLUMNS)]) == BASE_COLUMNS
    assert sorted(df["trial_id"]) == sorted(MAIN_TRIALS)  # not the older search's trial
    assert list(df["trial_id"]) == list(MAIN_TRIALS)  # start order
    by_id = df.set_index("trial_id")
    for trial_id, (config, curve, end) in MAIN_TRIALS.items():
        row = by_id.loc[trial_id]
        assert row["family"] == config["family"]
        assert row["status"] == end
        assert row["epochs"] == len(curve)
        if curve:
            assert row["val_mae"] == pytest.approx(min(curve))
        else:
            assert math.isnan(row["val_mae"])
        assert (
            row["run_id"]
            == store.client.search_runs([store.exps["main"]], f"tags.trial_id = '{trial_id}'")[0].info.run_id
        )
    assert by_id.loc["cg_a", "val_mae"] == pytest.approx(0.55)  # the minimum, not the last epoch
    assert by_id.loc["cg_b", "fusion"] == "early" and by_id.loc["cg_d", "fusion"] == "attention"
    assert by_id.loc["cg_a", "fusion"] == "none" and by_id.loc["rf_a", "fusion"] == "-"
    assert by_id.loc["cg_a", "encoder"] == "cgcnn"
    # every param of the trial config, flattened, as MLflow stores it
    assert by_id.loc["rf_b", "params.rf.n_estimators"] == "300"
    assert by_id.loc["cg_b", "params.cgcnn.comp_hidden"] == "128"
    assert pd.isna(by_id.loc["cg_a", "params.cgcnn.comp_hidden"])
    assert pd.isna(by_id.loc["rf_a", "params.cgcnn.hidden"])
    assert (df["params.max_epochs"] == "4").all() and (df["params.family"] == df["family"]).all()
    assert df["start_time"].is_monotonic_increasing


def test_leaderboard_per_family_and_overall(store):
    df = search_trials(store.client, store.exps["main"], store.ids["main"])
    best = leaderboard(df)
    assert list(best["trial_id"]) == ["cg_b", "rf_b"]
    assert list(best["val_mae"]) == pytest.approx([0.40, 0.45])
    for family, group in df.groupby("family"):
        assert best.set_index("family").loc[family, "val_mae"] == pytest.approx(group["val_mae"].min())
    two_each = leaderboard(df, top=2)
    assert list(two_each["trial_id"]) == ["cg_b", "cg_a", "rf_b", "rf_a"]
    assert list(leaderboard(df, top=3, per_family=False)["trial_id"]) == ["cg_b", "rf_b", "rf_a"]
    assert list(leaderboard(df, top=20, per_family=False)["trial_id"]) == MAIN_RANKED[:-1]  # no val_mae: out
    everything = leaderboard(df, per_family=False)
    assert list(everything["trial_id"]) == MAIN_RANKED  # the failed trial last
    with pytest.raises(ValueError):
        leaderboard(df, top=0)


def test_search_leaderboard_is_every_trial_best_first(store):
    board = search_leaderboard(store.client, store.exps["main"], store.ids["main"])
    assert list(board.columns) == LEADERBOARD_COLUMNS
    assert list(board["trial_id"]) == MAIN_RANKED  # the failed trial (no val_mae) last
    scored = board["val_mae"].dropna().to_numpy()
    assert len(scored) == len(MAIN_RANKED) - 1 and (np.diff(scored) >= 0).all()
    row = board.set_index("trial_id").loc["cg_b"]
    assert (row["family"], row["fusion"], row["epochs"], row["status"]) == ("cgcnn", "early", 4, "completed")
    assert row["val_mae"] == pytest.approx(0.40)
    empty = search_leaderboard(store.client, store.exps["nothing-finished"], store.ids["no-trials"])
    assert empty.empty and list(empty.columns) == LEADERBOARD_COLUMNS


def test_latest_search_parent_prefers_a_completed_search(tmp_path):
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlruns.db'}")
    exp = ensure_experiment(client, "latest", str(tmp_path / "artifacts"))
    other = ensure_experiment(client, "other", str(tmp_path / "artifacts-other"))
    now = int(time.time() * 1000)
    done = client.create_run(exp, start_time=now - 3000, tags={"kind": "search", "status": "completed"})
    client.create_run(exp, start_time=now - 1000, tags={"kind": "ensemble"})  # not a search
    cut = client.create_run(exp, start_time=now - 2000, tags={"kind": "search", "status": "interrupted"})
    newest = client.create_run(other, start_time=now, tags={"kind": "search", "status": "running"})
    assert latest_search_parent(client, "latest").info.run_id == done.info.run_id
    assert latest_search_run(client, [exp]).info.run_id == cut.info.run_id
    assert latest_search_run(client, [exp, other]).info.run_id == newest.info.run_id
    assert latest_search_run(client, [exp], prefer_completed=True).info.run_id == done.info.run_id
    assert latest_search_run(client, []) is None
    with pytest.raises(ValueError, match="no MLflow experiment named 'nope'.*latest"):
        latest_search_parent(client, "nope")
    ensure_experiment(client, "empty", str(tmp_path / "artifacts-empty"))
    with pytest.raises(ValueError, match="'empty' has no search run"):
        latest_search_parent(client, "empty")


def test_nested_runs_are_the_trials_oldest_first(store):
    runs = nested_runs(store.client, store.exps["main"], store.ids["main"])
    assert [r.data.tags["trial_id"] for r in runs] == list(MAIN_TRIALS)
    assert (
        nested_runs(store.client, store.exps["main"], store.ids["main"], "tags.trial_id = 'rf_b'")[0].data.tags[
            "family"
        ]
        == "rf"
    )


# ----------------------------------------------------------------------------- importances
def _synthetic(n=16, seed=0):
    rng = np.random.default_rng(seed)
    n_est = rng.choice([100, 200, 300, 400, 500], size=n)
    depth = rng.choice(["0", "10", "20", "40"], size=n)
    feats = rng.uniform(0.2, 1.0, size=n)
    val = n_est / 100.0 + rng.normal(0, 0.02, size=n)
    return pd.DataFrame(
        {
            "trial_id": [f"t{i}" for i in range(n)],
            "family": "rf",
            "status": "completed",
            "val_mae": val,
            "params.family": "rf",
            "params.seed": "0",
            "params.rf.n_estimators": [str(v) for v in n_est],
            "params.rf.max_depth": depth,
            "params.rf.max_features": [str(v) for v in feats],
        }
    )


@pytest.mark.parametrize("method", ["fanova", "forest"])
def test_param_importances_find_the_parameter_that_matters(method):
    imp, note = param_importances(_synthetic(), "rf", method=method)
    assert note == ""
    assert set(imp) == {"n_estimators", "max_depth", "max_features"}  # constants dropped, prefix stripped
    assert list(imp)[0] == "n_estimators" and imp["n_estimators"] > 0.6
    assert sum(imp.values()) == pytest.approx(1.0)


def test_param_importances_need_three_finished_trials_with_spread():
    df = _synthetic()
    few = df.head(3).assign(status=["completed", "failed", "pruned"])
    imp, note = param_importances(few, "rf")
    assert imp == {} and "2 finished" in note
    flat = df.assign(val_mae=0.5)
    imp, note = param_importances(flat, "rf")
    assert imp == {} and "same" in note


# ----------------------------------------------------------------------------- logged report
def _image(store, key, name):
    path = mlflow.artifacts.download_artifacts(
        run_id=store.ids[key], artifact_path=name, dst_path=str(store.tmp / f"dl-{key}"), tracking_uri=store.uri
    )
    img = matplotlib.image.imread(path)
    assert img.ndim == 3 and img.shape[0] >= 300 and img.shape[1] >= 500, img.shape
    assert float(img[..., :3].std()) > 0.05  # something is drawn
    return img


def test_log_search_report_logs_leaderboard_plots_and_best_trial(store):
    df = log_search_report(store.client, store.ids["main"], store.exps["main"])
    assert sorted(df["trial_id"]) == sorted(MAIN_TRIALS)
    arts = _artifacts(store, "main")
    for name in (
        "leaderboard.csv",
        "optimization_history.png",
        "param_importances.png",
        "val_mae_per_epoch.png",
        "param_importances.csv",
    ):
        assert name in arts
    assert "report_notes.txt" not in arts  # rf (3) and cgcnn (4 finished) both get importances
    for name in ("optimization_history.png", "param_importances.png", "val_mae_per_epoch.png"):
        _image(store, "main", name)

    csv = pd.read_csv(
        mlflow.artifacts.download_artifacts(
            run_id=store.ids["main"],
            artifact_path="leaderboard.csv",
            dst_path=str(store.tmp / "dl-csv"),
            tracking_uri=store.uri,
        )
    )
    assert list(csv["trial_id"]) == MAIN_RANKED and list(csv["rank"]) == list(range(1, 9))
    assert csv.loc[0, "val_mae"] == pytest.approx(0.40) and math.isnan(csv.loc[7, "val_mae"])
    assert {"family", "fusion", "status", "epochs", "params.cgcnn.hidden"} <= set(csv.columns)

    imp = pd.read_csv(
        mlflow.artifacts.download_artifacts(
            run_id=store.ids["main"],
            artifact_path="param_importances.csv",
            dst_path=str(store.tmp / "dl-imp"),
            tracking_uri=store.uri,
        )
    )
    assert set(imp["family"]) == {"cgcnn", "rf"}
    for _, group in imp.groupby("family"):
        assert group["importance"].sum() == pytest.approx(1.0)

    tags, metrics = _tags(store, "main")
    assert tags["best_trial_id"] == "cg_b" and tags["best_family"] == "cgcnn" and tags["best_fusion"] == "early"
    assert tags["best_run_id"] == df.set_index("trial_id").loc["cg_b", "run_id"]
    assert metrics["report_best_val_mae"] == pytest.approx(0.40)
    assert metrics["best_val_mae.rf"] == pytest.approx(0.45)
    assert metrics["best_val_mae.cgcnn"] == pytest.approx(0.40)
    assert (metrics["n_trials_completed"], metrics["n_trials_pruned"], metrics["n_trials_failed"]) == (5, 2, 1)


def test_log_search_report_rf_only_single_epoch(store):
    df = log_search_report(store.client, store.ids["rf-only"], store.exps["rf-only"])
    assert (df["epochs"] == 1).all() and (df["fusion"] == "-").all()
    arts = _artifacts(store, "rf-only")
    assert {"leaderboard.csv", "optimization_history.png", "param_importances.png", "val_mae_per_epoch.png"} <= set(
        arts
    )
    _image(store, "rf-only", "val_mae_per_epoch.png")
    tags, metrics = _tags(store, "rf-only")
    assert tags["best_trial_id"] == "r2" and tags["best_family"] == "rf" and tags["best_fusion"] == "-"
    assert metrics["report_best_val_mae"] == pytest.approx(0.27)


def test_log_search_report_without_finished_trials(store):
    df = log_search_report(store.client, store.ids["nothing-finished"], store.exps["nothing-finished"])
    assert sorted(df["trial_id"]) == ["f1", "f2", "f3"]
    assert df["val_mae"].isna().all() and (df["epochs"] == 0).all()
    assert dict(zip(df["trial_id"], df["status"])) == {"f1": "failed", "f2": "failed", "f3": "running"}
    arts = _artifacts(store, "nothing-finished")
    assert "leaderboard.csv" in arts and "report_notes.txt" in arts
    assert not [a for a in arts if a.endswith(".png")]
    notes_path = mlflow.artifacts.download_artifacts(
        run_id=store.ids["nothing-finished"],
        artifact_path="report_notes.txt",
        dst_path=str(store.tmp / "dl-notes"),
        tracking_uri=store.uri,
    )
    notes = open(notes_path).read()
    assert "optimization_history.png" in notes and "val_mae_per_epoch.png" in notes
    assert "cgcnn: 0 finished" in notes and "rf: 0 finished" in notes
    tags, metrics = _tags(store, "nothing-finished")
    assert "best_trial_id" not in tags and "report_best_val_mae" not in metrics
    assert metrics["n_trials_failed"] == 2


def test_log_search_report_without_trials(store):
    df = log_search_report(store.client, store.ids["no-trials"], store.exps["nothing-finished"])
    assert df.empty and list(df.columns) == BASE_COLUMNS
    assert "leaderboard.csv" in _artifacts(store, "no-trials")


def test_log_search_report_uses_a_given_optuna_study(store):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    study.optimize(
        lambda t: (
            (
                t.suggest_categorical("family", ["rf"]),
                t.suggest_int("rf/n_estimators", 100, 500),
                t.suggest_float("rf/max_features", 0.2, 1.0),
            )[1]
            / 100.0
        ),
        n_trials=12,
    )
    log_search_report(store.client, store.ids["rf-only"], store.exps["rf-only"], study=study)
    imp = pd.read_csv(
        mlflow.artifacts.download_artifacts(
            run_id=store.ids["rf-only"],
            artifact_path="param_importances.csv",
            dst_path=str(store.tmp / "dl-study"),
            tracking_uri=store.uri,
        )
    )
    assert list(imp["param"]) == ["n_estimators", "max_features"]  # from the study, not the 4 MLflow runs
    assert imp["importance"].iloc[0] > 0.6


# ----------------------------------------------------------------------------- CLI
def _row(out, trial_id):
    rows = [line.split() for line in out.splitlines() if line.split()[:1] == [trial_id]]
    assert len(rows) == 1, out
    return rows[0]


def test_cli_leaderboard_best_per_family_of_latest_search(store, capsys, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert main(["leaderboard", "--tracking-uri", store.uri]) == 0
    out = capsys.readouterr().out
    assert "experiment 'main'" in out and store.ids["main"] in out
    assert _row(out, "cg_b") == ["cg_b", "cgcnn", "early", "0.4", "4", "completed"]
    assert _row(out, "rf_b") == ["rf_b", "rf", "-", "0.45", "1", "completed"]
    assert out.index("cg_b") < out.index("rf_b")
    header = [line.split() for line in out.splitlines() if line.split()[:1] == ["trial_id"]]
    assert header == [["trial_id", "family", "fusion", "val_mae", "epochs", "status"]]
    for other in ("rf_a", "cg_a", "old_rf"):  # not the family's best; not the latest search
        assert other not in out


def test_cli_leaderboard_top_and_all(store, capsys):
    assert main(["leaderboard", "--tracking-uri", store.uri, "--top", "3"]) == 0
    out = capsys.readouterr().out
    assert [out.index(t) for t in ("cg_b", "rf_b", "rf_a")] == sorted(out.index(t) for t in ("cg_b", "rf_b", "rf_a"))
    assert "cg_a" not in out
    assert main(["leaderboard", "--tracking-uri", store.uri, "--all", "--experiment", "main"]) == 0
    out = capsys.readouterr().out
    positions = [out.index(t + " ") for t in MAIN_RANKED]
    assert positions == sorted(positions)
    assert _row(out, "cg_e") == ["cg_e", "cgcnn", "none", "-", "0", "failed"]
    assert _row(out, "cg_c") == ["cg_c", "cgcnn", "none", "1.2", "1", "pruned"]


def test_cli_leaderboard_reads_tracking_uri_from_env(store, capsys, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store.uri)
    assert main(["leaderboard", "--experiment", "rf-only"]) == 0
    out = capsys.readouterr().out
    assert _row(out, "r2") == ["r2", "rf", "-", "0.27", "1", "completed"]
    assert "r1" not in out
    assert main(["leaderboard", "--experiment", "nothing-finished"]) == 0
    out = capsys.readouterr().out
    assert "3 trials" in out and "no trial has a val_mae yet" in out


def test_cli_leaderboard_unknown_experiment(store, capsys):
    assert main(["leaderboard", "--tracking-uri", store.uri, "--experiment", "nope"]) == 2
    err = capsys.readouterr().err
    assert "'nope' not found" in err
    for name in ("main", "rf-only", "nothing-finished", "Default"):
        assert name in err


def test_cli_leaderboard_without_store_creates_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    assert main(["leaderboard"]) == 2
    assert "no MLflow store" in capsys.readouterr().err
    assert not (tmp_path / "mlruns.db").exists()
    # a store without any search run
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlruns.db'}")
    client.create_experiment("empty")
    client.delete_experiment(client.create_experiment("gone"))
    assert main(["leaderboard"]) == 2
    err = capsys.readouterr().err
    assert "no search runs" in err and "empty" in err and "gone" not in err
    assert main(["leaderboard", "--experiment", "gone"]) == 2  # deleted experiments do not count
    assert "'gone' not found" in capsys.readouterr().err
