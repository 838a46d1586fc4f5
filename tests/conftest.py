import os
from pathlib import Path

import pytest

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

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
