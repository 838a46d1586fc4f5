"""Errors on the command line: one line each (what, which item, what to do), a distinct exit
status per kind (the table in docs/reliability.md), the traceback only with ``--debug``.  Run
in this process through ``matfusion.cli.main``; nothing here starts Ray or loads data."""

import re
import socket
import time

import pytest
from conftest import REPO

import matfusion.search.tuner  # noqa: F401 - imported here, so that the timing below is the probe's
from matfusion import cli
from matfusion.ensembles import commands as ensemble_commands


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then closed)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(capsys, *argv):
    rc = cli.main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_an_unreachable_tracking_server_is_one_line_naming_it_fast(capsys, tmp_path):
    uri = f"http://127.0.0.1:{closed_port()}"
    t0 = time.time()
    rc, out, err = run(
        capsys,
        "search",
        str(REPO / "configs" / "smoke.yaml"),
        "--set",
        f"mlflow.tracking_uri={uri}",
        "--set",
        f"search.storage_path={tmp_path / 'ray'}",
    )
    took = time.time() - t0
    assert rc == cli.EXIT_TRACKING_UNREACHABLE == 5, err
    assert err.count("\n") == 1 and err.startswith("matfusion: error: "), err
    assert f"the MLflow tracking server {uri} (mlflow.tracking_uri) does not answer (connection refused)" in err
    assert "matfusion mlflow-server" in err
    # MLflow's own retries (7, with backoff) would take minutes; the probe tries once
    assert took < 20, took
    assert not (tmp_path / "ray").exists()  # stopped before any work (no data loaded, no Ray, no folder)


@pytest.mark.parametrize(
    "argv",
    [
        ["leaderboard"],
        ["ensemble", "--experiment", "x"],
        ["predict", "models:/matfusion-matbench_phonons@champion", "cifs/"],
        ["export", "models:/matfusion-matbench_phonons@champion", "--to", "out/"],
    ],
)
def test_commands_reading_the_tracking_server_say_at_once_when_it_does_not_answer(capsys, argv):
    uri = f"http://127.0.0.1:{closed_port()}"
    t0 = time.time()
    rc, _, err = run(capsys, *argv, "--tracking-uri", uri)
    assert rc == cli.EXIT_TRACKING_UNREACHABLE, err
    assert err.count("\n") == 1, err
    assert f"the MLflow tracking server {uri} (--tracking-uri, else $MLFLOW_TRACKING_URI) does not answer" in err
    assert time.time() - t0 < 20


def test_the_traceback_only_with_debug(capsys):
    bogus = ["leaderboard", "--tracking-uri", "bogus://nowhere"]  # MLflow refuses the scheme: an unexpected error
    rc, _, err = run(capsys, *bogus)
    assert rc == cli.EXIT_ERROR
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert re.fullmatch(
        r"matfusion: error: UnsupportedModelRegistryStoreURIException: .*bogus://nowhere.* "
        r"\(an unexpected error: run with --debug for its traceback\)\n",
        err,
    ), err

    for argv in (["--debug", *bogus], [*bogus, "--debug"]):  # before or after the command
        rc, _, err = run(capsys, *argv)
        assert rc == cli.EXIT_ERROR
        assert err.startswith("Traceback (most recent call last):"), err[:500]
        last = err.strip().splitlines()[-1]
        assert (
            last.startswith("matfusion: error: UnsupportedModelRegistryStoreURIException: ") and "--debug" not in last
        )

    # an expected error (here: the tracking server) keeps its line and gets the traceback with --debug
    uri = f"http://127.0.0.1:{closed_port()}"
    rc, _, err = run(
        capsys, "--debug", "search", str(REPO / "configs" / "smoke.yaml"), "--set", f"mlflow.tracking_uri={uri}"
    )
    assert rc == cli.EXIT_TRACKING_UNREACHABLE
    assert "Traceback (most recent call last):" in err and "TrackingUnreachable" in err
    assert err.strip().splitlines()[-1].startswith(f"matfusion: error: the MLflow tracking server {uri}")


def test_a_bad_yaml_config_is_one_line(capsys, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nsearch: {families: [rf\n  num_samples: 2\n")
    rc, _, err = run(capsys, "validate", str(bad))
    assert rc == cli.EXIT_BAD_INPUT
    assert err.count("\n") == 1 and "bad.yaml is not valid YAML" in err and "line" in err, err


def test_every_exit_status_is_in_the_documented_table():
    doc = (REPO / "docs" / "reliability.md").read_text()
    table = doc[doc.index("## Exit status") :]
    documented = {int(m.group(1)) for m in re.finditer(r"^\| (\d+) \|", table, re.M)}
    codes = {v for k, v in vars(cli).items() if k.startswith("EXIT_") and isinstance(v, int)}
    codes |= {v for k, v in vars(ensemble_commands).items() if k.startswith("EXIT_") and isinstance(v, int)}
    assert codes | {130, 143} == documented
    assert ensemble_commands.EXIT_MODEL_NOT_FOUND == cli.EXIT_MODEL_NOT_FOUND
    assert (
        len(
            {
                cli.EXIT_ERROR,
                cli.EXIT_BAD_INPUT,
                cli.EXIT_MODEL_NOT_FOUND,
                cli.EXIT_NO_TRIAL_SUCCEEDED,
                cli.EXIT_TRACKING_UNREACHABLE,
            }
        )
        == 5
    )


@pytest.mark.parametrize("command", ["search", "ensemble", "predict", "benchmark", "leaderboard"])
def test_help_lists_the_exit_statuses(capsys, command):
    with pytest.raises(SystemExit):
        cli.main([command, "--help"])
    out = capsys.readouterr().out
    assert "Exit status: 0 done; 1 a step failed" in " ".join(out.split()), out[-1500:]
