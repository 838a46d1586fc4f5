"""matfusion on a real Ray cluster, proven on this machine (loopback only).

* cluster.yaml and docs/cluster-aws.yaml pass Ray's own schema validation (the raw file
  against Ray's ray-schema.json, and the config `ray up` builds from it, through Ray's
  validate_config).
* A real 2-node Ray cluster (tests/ray_cluster_helper.py: a head and a worker raylet, one CPU
  each, token authentication on) and a real MLflow tracking server (`matfusion mlflow-server`
  on 127.0.0.1, a free port): `matfusion search --address HOST:PORT` places trials on both
  nodes (each result carries the Ray node id), and every trial's nested run is on the server,
  its artifacts proxied by it.
* The worker node killed mid-search: the trial it ran is retried on the head from its last
  checkpoint (search.max_failures), the search completes, every planned trial ends and has
  exactly one MLflow run, none left RUNNING, every epoch logged once.
* A driver without the cluster's token is refused with a message that says what to do.

Every process started here (the cluster helper with its Ray processes, the MLflow server, the
searches) is stopped by its own process id at the end.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from conftest import DATA_DIR, REPO
from ray_cluster import RayCluster
from ray_cluster import stop_group as _stop_group

CLUSTER_CONFIGS = [REPO / "cluster.yaml", REPO / "docs" / "cluster-aws.yaml"]
EXP_2NODE, EXP_FAILOVER = "cluster-2node", "cluster-failover"


# -- cluster-launcher configs --------------------------------------------------------------


def _ray_schema() -> dict:
    import ray.autoscaler

    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


@pytest.mark.parametrize("path", CLUSTER_CONFIGS, ids=lambda p: p.name)
def test_cluster_config_passes_rays_schema_validation(path):
    import jsonschema

    from matfusion.search import compat

    raw = yaml.safe_load(path.read_text())
    jsonschema.validate(raw, _ray_schema())  # the file as written
    compat.validate_cluster_config(copy.deepcopy(raw))  # the config `ray up` builds and checks

    text = path.read_text()
    assert not re.search(r"AKIA[0-9A-Z]{16}|PRIVATE KEY|aws_secret_access_key|^\s*ssh_private_key:", text, re.M)
    assert "~/.ray/auth_token" in raw["file_mounts"]  # the token travels as a file, never inline
    setup = "\n".join(raw["setup_commands"])
    # the Makefile's order: the torch CPU wheel, matbench without deps, then the project
    steps = [setup.index("torch==2.13.0"), setup.index("--no-deps matbench==0.6"), setup.index("pip install -q -e")]
    assert steps == sorted(steps), setup
    for cmd in raw["head_start_ray_commands"] + raw["worker_start_ray_commands"]:
        assert "ray stop" in cmd or "RAY_AUTH_MODE=token" in cmd, cmd


def test_rays_schema_rejects_a_top_level_min_workers():
    import jsonschema

    raw = yaml.safe_load((REPO / "cluster.yaml").read_text())
    raw["min_workers"] = 1
    with pytest.raises(jsonschema.ValidationError, match="min_workers"):
        jsonschema.validate(raw, _ray_schema())


# -- token authentication and the server command (no processes) ----------------------------


def test_explicit_address_turns_on_token_auth_only_with_a_token(tmp_path, monkeypatch):
    from matfusion.search import ray_auth

    for var in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.ray/auth_token
    assert ray_auth.prepare_ray_auth("10.0.0.1:6379") is None and "RAY_AUTH_MODE" not in os.environ

    token = tmp_path / "token"
    token.write_text("x" * 32)
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(token))
    assert ray_auth.prepare_ray_auth("auto") is None  # Ray itself handles "auto"
    assert ray_auth.prepare_ray_auth(None) is None  # a new local Ray: Ray's default applies
    assert ray_auth.prepare_ray_auth("10.0.0.1:6379") == str(token)
    assert os.environ["RAY_AUTH_MODE"] == "token"

    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # an explicit choice is kept
    assert ray_auth.prepare_ray_auth("10.0.0.1:6379") is None and os.environ["RAY_AUTH_MODE"] == "disabled"


def test_mlflow_server_command_is_loopback_sql_and_proxied(tmp_path, monkeypatch):
    from matfusion.tracking.server import server_command, tracking_uri

    monkeypatch.chdir(tmp_path)
    cmd = server_command()
    assert cmd[1:4] == ["-m", "mlflow", "server"]
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1"
    assert cmd[cmd.index("--backend-store-uri") + 1] == f"sqlite:///{tmp_path / 'mlruns.db'}"
    assert "--serve-artifacts" in cmd and cmd[cmd.index("--artifacts-destination") + 1] == str(tmp_path / "mlartifacts")
    pg = server_command("postgresql://mlflow@db.internal/mlflow", "s3://bucket/mlflow", host="10.0.0.5", port=5001)
    assert pg[pg.index("--backend-store-uri") + 1] == "postgresql://mlflow@db.internal/mlflow"
    assert pg[pg.index("--artifacts-destination") + 1] == "s3://bucket/mlflow"
    assert tracking_uri("10.0.0.5", 5001) == "http://10.0.0.5:5001"


# -- the real thing: processes -------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture(scope="module")
def ray_env(tmp_path_factory):
    """Environment of the cluster's processes: a private Ray temp dir (never /tmp/ray, whose
    address file other Ray users on this machine would pick up) and a token of its own."""
    root = Path(tempfile.mkdtemp(prefix="mfr", dir="/tmp"))  # short: Ray's socket paths are limited
    token = root / "auth_token"
    token.write_text(os.urandom(32).hex())
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_AUTH", "RAY_ADDRESS"))}
    env.update(RAY_TMPDIR=str(root), RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_USAGE_STATS_ENABLED="0")
    # the feature cache of this test session (conftest's), also for module-scoped searches
    cache = str(tmp_path_factory.getbasetemp() / "feature-cache")
    yield {"env": env, "token": token, "root": root, "cache": cache}
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def data_root() -> Path:
    if DATA_DIR is None:
        pytest.fail("real data not found: set MATFUSION_DATA or place ../shared/data beside the repo")
    return DATA_DIR


@pytest.fixture(scope="module")
def ray_cluster(ray_env):
    env = dict(ray_env["env"], RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(ray_env["token"]))
    cluster = RayCluster(env, workers=1, cpus=1)
    try:
        yield cluster
    finally:
        cluster.shutdown()


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """`matfusion mlflow-server` on 127.0.0.1 and a free port, sqlite backend, proxied artifacts."""
    d = tmp_path_factory.mktemp("mlflow-server")
    port = _free_port()
    log = open(d / "server.log", "w")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "matfusion.cli",
            "mlflow-server",
            "--port",
            str(port),
            "--workers",
            "1",
            "--backend-store-uri",
            f"sqlite:///{d / 'mlflow.db'}",
            "--artifacts-destination",
            str(d / "artifacts"),
            "--experiment",
            EXP_2NODE,
            "--experiment",
            EXP_FAILOVER,
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=d,
        start_new_session=True,
    )
    try:
        deadline = time.time() + 180
        while "tracking URI:" not in (d / "server.log").read_text():
            assert proc.poll() is None and time.time() < deadline, (d / "server.log").read_text()[-3000:]
            time.sleep(0.5)
        uri = re.search(r"tracking URI: (\S+)", (d / "server.log").read_text()).group(1)
        assert uri == f"http://127.0.0.1:{port}"
        yield {"uri": uri, "port": port, "artifacts": d / "artifacts", "dir": d}
    finally:
        _stop_group(proc)
        log.close()
    assert not _port_open(port), "the MLflow server still answers after it was stopped"


def _driver_env(ray_env, token: bool = True) -> dict:
    """This process's environment now (the feature cache of this test session included) plus the
    cluster's Ray temp dir.  With ``token``, the driver is told where the token is, not the auth
    mode: matfusion turns token authentication on for an explicit address."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_AUTH", "RAY_ADDRESS"))}
    env.update(RAY_TMPDIR=ray_env["env"]["RAY_TMPDIR"], RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    env.setdefault("MATFUSION_CACHE", ray_env["cache"])
    if token:
        env["RAY_AUTH_TOKEN_PATH"] = str(ray_env["token"])
    return env


def _search_cmd(name: str, address: str, uri: str, storage: Path, data_dir: Path, *sets: str) -> list[str]:
    cmd = [
        sys.executable,
        "-m",
        "matfusion.cli",
        "search",
        str(REPO / "configs" / "smoke.yaml"),
        "--data-dir",
        str(data_dir),
        "--quiet",
        "--address",
        address,
        "--set",
        f"name={name}",
        "--set",
        "data.limit=120",
        "--set",
        "search.preset=quick",
        "--set",
        "search.max_failures=2",
        "--set",
        f"search.storage_path={storage}",
        "--set",
        f"mlflow.tracking_uri={uri}",
    ]
    for s in sets:
        cmd += ["--set", s]
    return cmd


def _trial_results(experiment: Path) -> dict[str, list[dict]]:
    """trial_id -> every result Tune recorded for it (result.json of each trial folder)."""
    out: dict[str, list[dict]] = {}
    for f in experiment.glob("*/result.json"):
        for line in f.read_text().splitlines():
            try:
                r = json.loads(line)
            except ValueError:  # being written
                continue
            out.setdefault(r["trial_id"], []).append(r)
    return out


def _mlflow_search(uri: str, experiment: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1, [r.info.run_name for r in parents]
    nested = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    return client, exp, parents[0], nested


def _node_summary(results: dict, names: dict) -> str:
    return "; ".join(
        f"{t}: " + ",".join(dict.fromkeys(names.get(r.get("node_id"), "?") for r in rs))
        for t, rs in sorted(results.items())
    )


@pytest.fixture(scope="module")
def two_node_search(ray_cluster, ray_env, mlflow_server, data_root, tmp_path_factory):
    """A small search (rf + cgcnn, 3 trials, 2 at a time: one CPU each, one CPU per node) run by
    `matfusion search --address HOST:PORT` against the 2-node cluster, logging to the server."""
    tmp = tmp_path_factory.mktemp("two-node")
    storage, n = tmp / "ray", 3
    cmd = _search_cmd(
        EXP_2NODE,
        ray_cluster.address,
        mlflow_server["uri"],
        storage,
        data_root,
        f"search.num_samples={n}",
        "search.max_epochs=2",
        "search.grace_period=1",
    )
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp, env=_driver_env(ray_env), timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return {"proc": proc, "n": n, "results": _trial_results(storage / EXP_2NODE)}


@pytest.mark.slow
def test_search_places_trials_on_both_nodes_and_logs_to_one_server(two_node_search, ray_cluster, mlflow_server):
    proc, results, n = two_node_search["proc"], two_node_search["results"], two_node_search["n"]
    assert f"Open the MLflow UI at {mlflow_server['uri']}/#/experiments/" in proc.stdout
    assert len(results) == n
    names = {ray_cluster.head: "head", ray_cluster.workers[0]: "worker"}
    nodes = {r.get("node_id") for rs in results.values() for r in rs}
    print(
        f"\n2-node search: {_node_summary(results, names)}; " + re.search(r"wall time [\d.]+ s", proc.stdout).group(0)
    )
    assert nodes == {ray_cluster.head, ray_cluster.workers[0]}, nodes

    client, exp, parent, nested = _mlflow_search(mlflow_server["uri"], EXP_2NODE)
    assert parent.info.status == "FINISHED" and parent.data.tags["status"] == "completed"
    assert sorted(r.data.tags["trial_id"] for r in nested) == sorted(results)
    for r in nested:
        assert r.info.status == "FINISHED" and r.data.tags["status"] in {"completed", "pruned"}, r.data.tags
        steps = [m.step for m in client.get_metric_history(r.info.run_id, "val_mae")]
        assert sorted(steps) == list(range(1, len(steps) + 1)) and steps, (r.data.tags["trial_id"], steps)
    # artifacts went through the server (proxied), into its artifact store
    assert exp.artifact_location.startswith("mlflow-artifacts:"), exp.artifact_location
    assert "leaderboard.csv" in [a.path for a in client.list_artifacts(parent.info.run_id)]
    stored = {p.name for p in mlflow_server["artifacts"].rglob("*") if p.is_file()}
    assert {"leaderboard.csv", "trial_config.json"} <= stored, stored


CLOSE_SIDE_PANEL = """(() => {
  const close = [...document.querySelectorAll('button')].filter(
    b => /close/i.test(b.getAttribute('aria-label') || '') && b.closest('aside, [role=complementary], div'));
  if (close.length) { close[close.length - 1].click(); }
  return close.length;
})()"""


# the runs table as the page shows it: its header cells and its rows (the grid splits a row
# between its pinned and scrolling parts: joined by row index), each cell by its column key
RUNS_TABLE = """(() => {
  const rows = {}, headers = {};
  for (const h of document.querySelectorAll('.ag-header-cell[col-id]')) {
    headers[h.getAttribute('col-id')] = h.innerText.trim();
  }
  for (const r of document.querySelectorAll('.ag-row[row-index]')) {
    const cells = rows[r.getAttribute('row-index')] = rows[r.getAttribute('row-index')] || {};
    for (const c of r.querySelectorAll('.ag-cell[col-id]')) { cells[c.getAttribute('col-id')] = c.innerText.trim(); }
  }
  return {headers, rows: Object.keys(rows).sort((a, b) => a - b).map(k => rows[k])};
})()"""


def _runs_table(browser, columns: list[str], n_rows: int, timeout: float = 60) -> dict:
    """The runs table once it shows every column of ``columns`` and ``n_rows`` rows."""
    deadline = time.time() + timeout
    while True:
        table = browser.evaluate(RUNS_TABLE)
        if set(columns) <= set(table["headers"]) and len(table["rows"]) >= n_rows:
            return table
        if time.time() > deadline:
            raise AssertionError(f"the runs table never showed the columns {columns}: {table}")
        time.sleep(0.5)


def _shown_metric(text: str, value: float) -> bool:
    """Whether a metric cell's text is ``value`` as the UI rounds it (3 decimals below 10, 2 below
    100, 1 above)."""
    return text not in ("", "-") and abs(float(text) - value) <= max(5e-4, abs(value) * 5e-4)


@pytest.mark.slow
def test_mlflow_ui_in_chromium_shows_the_search_and_its_trials(two_node_search, mlflow_server, tmp_path):
    """Debian's chromium, headless, opens the page the search printed for the local server: it is
    the experiment's runs list, with the search's parent run and every trial run, and the
    leaderboard's columns (best_val_mae, epochs_trained, family, fusion, status) shown without
    touching "Columns": each trial's values as MLflow has them, best best_val_mae first."""
    from cdp_browser import Chromium, find_chromium

    from matfusion.search.tuner import ui_runs_url
    from matfusion.tracking.ui import VIEW_METRICS, VIEW_NAME, VIEW_TAGS, column_key, view_columns

    binary = find_chromium()
    if binary is None:
        pytest.skip(
            os.environ.get("MATFUSION_CHROMIUM_MISSING")
            or "chromium is not installed (.ci/run installs it: apt-get install -y chromium)"
        )
    _, exp, parent, nested = _mlflow_search(mlflow_server["uri"], EXP_2NODE)
    trial_runs = sorted(r.info.run_name for r in nested)
    assert len(trial_runs) == two_node_search["n"]
    shot = tmp_path / "mlflow-ui.png"
    browser = Chromium(binary, str(tmp_path / "profile"), log_path=str(tmp_path / "chromium.log"))
    try:
        # the page the search printed: the runs list (MLflow 3.17 would open its GenAI overview otherwise)
        page = re.search(r"Open the MLflow UI at (\S+)", two_node_search["proc"].stdout).group(1)
        assert page == ui_runs_url(mlflow_server["uri"], exp.experiment_id)
        browser.open(page)
        browser.wait_for_text([EXP_2NODE, parent.info.run_name, "matching runs"])
        assert f"#/experiments/{exp.experiment_id}/runs" in browser.evaluate("location.href")
        text = browser.wait_for_text(trial_runs + [VIEW_NAME])  # listed flat, best val MAE first
        browser.evaluate(CLOSE_SIDE_PANEL)
        table = _runs_table(browser, view_columns(), len(trial_runs) + 1)
        time.sleep(1)
        browser.screenshot(str(shot))
    finally:
        browser.close()
    assert f"{len(trial_runs) + 1} matching runs" in text, text[-800:]
    # the leaderboard's columns, headed by their names, as the page opened (no "Columns" clicked)
    assert [table["headers"][c] for c in view_columns()] == [*VIEW_METRICS, *VIEW_TAGS], table["headers"]
    rows = {row[column_key("attributes", "Run Name")].splitlines()[-1]: row for row in table["rows"]}
    assert sorted(rows) == sorted(trial_runs + [parent.info.run_name]), list(rows)
    for run in nested:  # each trial's row shows its run's values
        row = rows[run.info.run_name]
        for tag in VIEW_TAGS:
            assert row[column_key("tags", tag)] == run.data.tags[tag], (run.info.run_name, tag, row)
        for metric in VIEW_METRICS:
            shown = row[column_key("metrics", metric)]
            assert _shown_metric(shown, run.data.metrics[metric]), (run.info.run_name, metric, shown, run.data.metrics)
    # sorted by best_val_mae, best first (the parent's is its best trial's)
    shown = [float(row[column_key("metrics", "best_val_mae")]) for row in table["rows"]]
    assert shown == sorted(shown), shown
    png = shot.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000
    if os.environ.get("MATFUSION_UPDATE_SCREENSHOT"):  # refresh the one in docs/
        shutil.copy(shot, REPO / "docs" / "mlflow-ui.png")


@pytest.mark.slow
def test_search_survives_a_killed_worker_node(ray_cluster, ray_env, mlflow_server, data_dir, tmp_path):
    assert ray_cluster.workers, "needs the worker node"
    storage, n, epochs = tmp_path / "ray", 2, 5
    worker = ray_cluster.workers[0]
    cmd = _search_cmd(
        EXP_FAILOVER,
        ray_cluster.address,
        mlflow_server["uri"],
        storage,
        data_dir,
        f"search.num_samples={n}",
        f"search.max_epochs={epochs}",
        "search.families=[cgcnn]",
        "search.scheduler=fifo",
    )
    out, err = open(tmp_path / "search.out", "w+"), open(tmp_path / "search.err", "w+")
    # each report a second late, so the trial is still running when the worker dies: at full speed
    # a CI machine ran all 5 epochs on the worker between being caught at epoch 1 and the kill
    env = {**_driver_env(ray_env), "MATFUSION_INJECT_FAULTS": "cgcnn@1=slow"}
    proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True, cwd=tmp_path, env=env, start_new_session=True)
    killed_trial = None
    try:
        deadline = time.time() + 400
        while killed_trial is None and proc.poll() is None and time.time() < deadline:
            for trial_id, rs in _trial_results(storage / EXP_FAILOVER).items():
                running_on_worker = [r for r in rs if r.get("node_id") == worker and not r.get("trial_finished")]
                if running_on_worker and not rs[-1].get("trial_finished"):
                    assert ray_cluster.command("kill-worker") == {"killed": worker}
                    ray_cluster.workers.remove(worker)
                    killed_trial = (trial_id, max(r["epoch"] for r in rs))
                    break
            else:
                time.sleep(0.2)
        assert killed_trial is not None, (
            "no trial was caught running on the worker node: " + (tmp_path / "search.err").read_text()[-3000:]
        )
        rc = proc.wait(timeout=600)
    finally:
        if proc.poll() is None:
            _stop_group(proc)
        out.close()
        err.close()
    stdout, stderr = (tmp_path / "search.out").read_text(), (tmp_path / "search.err").read_text()
    assert rc == 0, stdout[-3000:] + stderr[-3000:]

    # every planned trial ended; the killed one went on from its checkpoint on the head node
    from ray.tune import ExperimentAnalysis

    trials = ExperimentAnalysis(str(storage / EXP_FAILOVER)).trials
    assert len(trials) == n and all(t.status == "TERMINATED" for t in trials), [(t, t.status) for t in trials]
    results = _trial_results(storage / EXP_FAILOVER)
    names = {ray_cluster.head: "head", worker: "worker (killed)"}
    print(
        f"\nfailover search: killed the worker during trial {killed_trial[0]} after epoch {killed_trial[1]}; "
        f"{_node_summary(results, names)}; " + re.search(r"wall time [\d.]+ s", stdout).group(0)
    )
    trial_id, at_epoch = killed_trial
    after = [r for r in results[trial_id] if r.get("node_id") == ray_cluster.head]
    assert after and max(r["epoch"] for r in after) == epochs and after[-1]["trial_finished"], results[trial_id]
    # resumed from its last checkpoint (every epoch has one), not from epoch 1 anew: right after the
    # last epoch the worker reported (it may report a few more between being caught at `at_epoch`
    # and its raylet dying, more on an idle machine)
    on_worker = [r["epoch"] for r in results[trial_id] if r.get("node_id") == worker]
    assert on_worker and min(on_worker) == 1 and max(on_worker) >= at_epoch, results[trial_id]
    assert 1 < min(r["epoch"] for r in after) == max(on_worker) + 1, results[trial_id]
    retried = {t.trial_id: t.run_metadata.num_failures for t in trials}
    assert retried[trial_id] >= 1, retried

    # MLflow: one run per trial, none left RUNNING, every epoch exactly once (none lost, none doubled)
    client, _, parent, nested = _mlflow_search(mlflow_server["uri"], EXP_FAILOVER)
    assert parent.info.status == "FINISHED"
    assert sorted(r.data.tags["trial_id"] for r in nested) == sorted(t.trial_id for t in trials)
    for r in nested:
        assert r.info.status == "FINISHED" and r.data.tags["status"] == "completed", (r.info.status, r.data.tags)
        steps = sorted(m.step for m in client.get_metric_history(r.info.run_id, "val_mae"))
        assert steps == list(range(1, epochs + 1)), (r.data.tags["trial_id"], steps)


@pytest.mark.slow
def test_driver_without_the_token_is_refused_with_a_clear_message(ray_cluster, ray_env, data_dir, tmp_path):
    env = _driver_env(ray_env, token=False)
    env["HOME"] = str(tmp_path)  # no ~/.ray/auth_token either
    cmd = _search_cmd(
        "cluster-no-token",
        ray_cluster.address,
        f"sqlite:///{tmp_path / 'mlruns.db'}",
        tmp_path / "ray",
        data_dir,
        "search.num_samples=1",
        "search.max_epochs=1",
        "search.grace_period=1",
    )
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "requires its authentication token" in proc.stderr and "RAY_AUTH_MODE=token" in proc.stderr
    # the refused search left no MLflow run RUNNING: its parent run is closed as failed
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlruns.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert runs and all(r.info.status == "FAILED" for r in runs), [(r.info.run_name, r.info.status) for r in runs]


def test_new_experiment_on_the_server_keeps_its_artifacts_on_the_server(mlflow_server):
    """A search that creates its experiment on a tracking server leaves artifact storage to the
    server (proxied), not to a folder on the driver's machine."""
    from mlflow.tracking import MlflowClient

    from matfusion.tracking.logger import ensure_experiment
    from matfusion.tracking.runs import EXPERIMENT_KIND_TAG, MODEL_TRAINING
    from matfusion.tracking.ui import VIEW_TAG

    client = MlflowClient(mlflow_server["uri"])
    exp_id = ensure_experiment(client, "created-by-a-search")
    assert client.get_experiment(exp_id).artifact_location.startswith("mlflow-artifacts:")
    # model-training experiments, whether a search or `matfusion mlflow-server --experiment` (REST) made them
    for exp in (client.get_experiment(exp_id), client.get_experiment_by_name(EXP_2NODE)):
        assert exp.tags.get(EXPERIMENT_KIND_TAG) == MODEL_TRAINING, (exp.name, exp.tags)
        assert VIEW_TAG in exp.tags, (exp.name, exp.tags)  # the runs table's "Leaderboard" view
    run = client.create_run(exp_id)
    client.log_dict(run.info.run_id, {"a": 1}, "trial_config.json")
    client.set_terminated(run.info.run_id)
    stored = list(Path(mlflow_server["artifacts"]).rglob("trial_config.json"))
    assert any(run.info.run_id in str(f) for f in stored), stored
