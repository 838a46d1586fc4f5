"""Serving the registered champion: ``mlflow models serve -m models:/matfusion-<task>@champion``
answers REST requests (CIF text and pymatgen dicts) with the in-process predictions, and the model
records what a fresh environment needs (pinned requirements, matfusion as its code).

A real (tiny) tabular stack on real matbench_phonons rows, a real sqlite MLflow registry, a real
server subprocess; see docs/serving.md."""

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import DATA_DIR
from mlflow.tracking import MlflowClient

from matfusion.config import DataConfig, FeaturesConfig
from matfusion.data import load_dataset, split_fold
from matfusion.data.featurize import featurize
from matfusion.ensembles import StackedEnsemble, evaluate_ensemble, log_ensemble_model, register_ensemble
from matfusion.ensembles.export import SERVING_PACKAGES, featurizer_spec, make_card, registered_name

TASK = "matbench_phonons"
LIMIT = 40
RF = {"family": "rf", "rf": {"n_estimators": 20, "max_features": 0.5}, "seed": 0, "cpus": 1}
BIN = Path(sys.executable).parent  # the venv's bin: `mlflow models serve` runs `uvicorn` from PATH

# a sqlite registry, a fitted stack and subprocesses (a server, a second environment): ~50 s in all
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def champion(tmp_path_factory):
    """A calibrated one-member stack on 40 phonons rows, logged and registered as champion."""
    if DATA_DIR is None:
        pytest.fail("real data not found: set MATFUSION_DATA or place ../shared/data beside the repo")
    tmp = tmp_path_factory.mktemp("serve")
    ds = load_dataset(DataConfig(source=TASK, limit=LIMIT, data_dir=str(DATA_DIR)))
    split = split_fold(ds, 0)
    fs = featurize(ds, FeaturesConfig(n_jobs=1, cache_dir=str(tmp / "fcache")), progress=False)
    rows = np.sort(np.concatenate([split.train, split.val]))
    ens = StackedEnsemble([RF], meta="nnls", n_folds=3, seed=0).fit(fs.descriptors, fs.graphs, ds.targets, rows, {})
    ev = evaluate_ensemble(ens, fs.descriptors, fs.graphs, ds.targets, split.test)
    uri = f"sqlite:///{tmp / 'mlruns.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("serve-test", artifact_location=(tmp / "artifacts").as_uri())
    run_id = client.create_run(exp, run_name="ensemble").info.run_id
    card = make_card(ens, ds.name, split.fold, ev.metrics)
    test_structures = [ds.structures[i] for i in split.test]
    info = log_ensemble_model(run_id, ens, featurizer_spec(ens, 6.0, 12), card, test_structures[:2], tracking_uri=uri)
    client.set_terminated(run_id)
    _, moved = register_ensemble(uri, info.model_uri, ds.name, split.fold, ev.test_mae)
    assert moved
    return {"uri": uri, "tmp": tmp, "structures": test_structures[:2], "name": registered_name(ds.name)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_ping(proc: subprocess.Popen, port: int, log: Path, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"mlflow models serve exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.5)
    pytest.fail(f"mlflow models serve did not answer /ping within {timeout:.0f} s:\n{log.read_text()[-4000:]}")


def _post(port: int, body: dict) -> dict:
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/invocations",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as err:
        pytest.fail(f"/invocations answered {err.code}: {err.read().decode()[:2000]}")


def test_served_champion_answers_cif_and_pymatgen_dict_like_in_process(champion, tmp_path):
    import mlflow

    cif = champion["structures"][0].to(fmt="cif")
    as_dict = champion["structures"][1].as_dict()
    mlflow.set_tracking_uri(champion["uri"])
    model_uri = f"models:/{champion['name']}@champion"
    expect = mlflow.pyfunc.load_model(model_uri).predict(pd.DataFrame({"structure": [cif, as_dict]}))

    port = _free_port()
    env = dict(os.environ, MLFLOW_TRACKING_URI=champion["uri"], PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    log = tmp_path / "serve.log"
    cmd = [str(BIN / "mlflow"), "models", "serve", "-m", model_uri, "--env-manager", "local"]
    cmd += ["--host", "127.0.0.1", "--port", str(port)]
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_for_ping(proc, port, log)
        # one row CIF text, one row a pymatgen Structure dict (a JSON object in the request)
        split = _post(port, {"dataframe_split": {"columns": ["structure"], "data": [[cif], [as_dict]]}})
        # the dict as JSON text too, and a row that is no structure: NaN there, the others predicted
        rows = [{"structure": cif}, {"structure": json.dumps(as_dict)}, {"structure": "not a structure"}]
        records = _post(port, {"dataframe_records": rows})
        wide = _post(
            port,
            {"dataframe_split": {"columns": ["structure"], "data": [[cif], [as_dict]]}, "params": {"coverage": 0.95}},
        )
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=30)
    bad = pd.DataFrame(records["predictions"]).iloc[2]
    assert bad.isna().all(), bad
    assert "row 2: cannot parse structure" in log.read_text()
    for answer in (split, {"predictions": records["predictions"][:2]}):
        got = pd.DataFrame(answer["predictions"])
        assert list(got.columns) == ["prediction", "std", "lower", "upper", "spread"]
        assert len(got) == 2 and np.isfinite(got.to_numpy()).all()
        for c in got.columns:
            np.testing.assert_allclose(got[c], expect[c], rtol=0, atol=1e-6, err_msg=c)
    got95 = pd.DataFrame(wide["predictions"])
    np.testing.assert_allclose(got95["prediction"], expect["prediction"], rtol=0, atol=1e-6)
    assert (got95["upper"] - got95["lower"] > expect["upper"] - expect["lower"]).all()


def test_model_records_pinned_requirements_and_its_matfusion_code(champion):
    """The champion's requirements pin the serving libraries (matfusion is no requirement), and
    its ``code`` holds the matfusion package: an environment without matfusion loads and predicts."""
    import mlflow

    mlflow.set_tracking_uri(champion["uri"])
    local = Path(mlflow.artifacts.download_artifacts(f"models:/{champion['name']}@champion", dst_path=champion["tmp"]))
    reqs = (local / "requirements.txt").read_text().split()
    names = [r.split("==")[0] for r in reqs]
    assert all("==" in r and "+" not in r for r in reqs), reqs
    assert "matfusion" not in names and {"mlflow", "scikit-learn", "pymatgen", "matminer", "torch"} <= set(names)
    assert (local / "code" / "matfusion" / "ensembles" / "export.py").is_file()
    assert not list((local / "code").rglob("__pycache__"))
    meta = (local / "MLmodel").read_text()
    assert "code: code" in meta and "matfusion_version: " in meta

    # an environment with the venv's libraries but without matfusion (its .pth files are not run)
    bare = champion["tmp"] / "bare-env"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(bare)], check=True, timeout=60)
    site = next((bare / "lib").glob("python*/site-packages"))
    libs = [p for p in map(Path, sys.path) if p.name == "site-packages" and p.is_dir()]
    (site / "libs.pth").write_text("\n".join(map(str, libs)) + "\n")
    python = bare / "bin" / "python"
    script = textwrap.dedent(f"""
        import importlib.util, json, sys
        assert importlib.util.find_spec("matfusion") is None, "matfusion is importable without the model"
        import mlflow, pandas as pd
        model = mlflow.pyfunc.load_model({str(local)!r})
        out = model.predict(pd.DataFrame({{"structure": {json.dumps([s.to(fmt="cif") for s in champion["structures"]])}}}))
        import matfusion
        from importlib.metadata import packages_distributions
        dists = packages_distributions()
        imported = sorted({{d for m in list(sys.modules) for d in dists.get(m.split(".")[0], [])}})
        print(json.dumps({{"matfusion": matfusion.__file__, "prediction": out["prediction"].tolist(), "imported": imported}}))
    """)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(
        [str(python), "-c", script], capture_output=True, text=True, timeout=300, cwd=champion["tmp"], env=env
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert Path(got["matfusion"]).is_relative_to(local / "code")
    assert np.isfinite(got["prediction"]).all() and len(got["prediction"]) == 2
    expect = mlflow.pyfunc.load_model(str(local)).predict(
        pd.DataFrame({"structure": [s.to(fmt="cif") for s in champion["structures"]]})
    )
    np.testing.assert_allclose(got["prediction"], expect["prediction"], rtol=0, atol=1e-6)
    # every matfusion dependency that loading and predicting imported is a recorded requirement
    from importlib.metadata import requires

    from packaging.requirements import Requirement

    def norm(name: str) -> str:
        return name.lower().replace("_", "-")

    declared = {norm(Requirement(r).name) for r in requires("matfusion")}
    used = {norm(d) for d in got["imported"]} & declared
    recorded = {norm(n) for n in names}
    assert {"scikit-learn", "pymatgen", "matminer", "numpy"} <= used, used
    assert used <= recorded, f"imported but not recorded: {used - recorded}"
    assert {norm(p) for p in SERVING_PACKAGES} >= recorded
