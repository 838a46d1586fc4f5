import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # the suite never talks to the internet
os.environ.setdefault("PIP_DISABLE_PIP_VERSION_CHECK", "1")
# the `mlflow ui` / `mlflow server` processes the tests start: no job runner (~10 idle consumer processes)
os.environ.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")

REPO = Path(__file__).resolve().parents[1]


def _find_data() -> Path | None:
    env = os.environ.get("MATFUSION_DATA")
    if env and Path(env).is_dir():
        return Path(env)
    cand = (REPO / ".." / "shared" / "data").resolve()
    return cand if cand.is_dir() else None


DATA_DIR = _find_data()
if DATA_DIR is not None:
    os.environ.setdefault("MATFUSION_DATA", str(DATA_DIR))


@pytest.fixture(autouse=True, scope="module")
def _no_ray_across_modules():
    """Ray started in this process by a module's tests (an in-process search or benchmark) ends
    with the module: the next module starts without it (a fork beside Ray's threads can hang, so
    parallel_map does not fork while Ray runs here, and its tests need the fork)."""
    yield
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()


@pytest.fixture(autouse=True)
def _log_streams_outlive_capsys():
    """A library that binds a log handler to ``sys.stderr`` while a test's capsys holds it (Optuna
    does on first import: its handler and its colorlog formatter) writes to that closed stream in
    every later test, each record a "--- Logging error ---" traceback on the live stderr (a test
    that asserts no traceback fails in one order and passes in another).  After each test (capsys
    is torn down first), such handlers and formatters are pointed at the live ``sys.stderr``."""
    yield
    import logging

    loggers = [logging.getLogger()]
    loggers += [lg for lg in logging.Logger.manager.loggerDict.values() if isinstance(lg, logging.Logger)]
    for handler in (h for lg in loggers for h in lg.handlers):
        if isinstance(handler, logging.StreamHandler) and getattr(handler.stream, "closed", False):
            handler.stream = sys.stderr  # not setStream: it flushes the closed stream first
        formatter = handler.formatter
        if getattr(getattr(formatter, "stream", None), "closed", False):
            formatter.stream = sys.stderr


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Feature cache per test session, never the user's ~/.cache."""
    cache = tmp_path_factory.getbasetemp() / "feature-cache"
    monkeypatch.setenv("MATFUSION_CACHE", str(cache))


@pytest.fixture
def data_dir() -> Path:
    if DATA_DIR is None:
        pytest.fail("real data not found: set MATFUSION_DATA or place ../shared/data beside the repo")
    return DATA_DIR


def pytest_terminal_summary(terminalreporter):
    """What the suite ran on, beside pytest's durations: a slow CI log then says whether the
    machine had fewer cores or more load than the 2 idle cores the README's time is for."""
    import shutil

    from matfusion.data.parallel import usable_cores

    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    shm = shutil.disk_usage("/dev/shm").total / 2**30 if os.path.isdir("/dev/shm") else 0.0
    terminalreporter.write_line(
        f"matfusion: {usable_cores()} usable core(s) of {os.cpu_count()} reported; load average {load}; "
        f"/dev/shm {shm:.1f} GiB (Ray's object store moves to /tmp, much slower, when it is small)"
    )
