import subprocess
import sys
import time

import pytest
from conftest import REPO

from matfusion.config import ConfigError, apply_overrides, config_from_dict, load_config

BASE = {
    "name": "t",
    "data": {"source": "matbench_phonons", "fold": 0, "limit": 200},
    "search": {"num_samples": 3, "max_epochs": 2, "seed": 0, "max_concurrent": 2, "grace_period": 1},
}


def _with(**sections):
    import copy

    raw = copy.deepcopy(BASE)
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    return raw


def test_shipped_configs_validate():
    for path in sorted((REPO / "configs").glob("*.yaml")):
        cfg = load_config(path)
        assert cfg.name


def test_required_keys_of_the_issue_exist():
    cfg = config_from_dict(BASE)
    assert (cfg.data.source, cfg.data.fold, cfg.data.limit) == ("matbench_phonons", 0, 200)
    assert (cfg.search.num_samples, cfg.search.max_epochs, cfg.search.seed, cfg.search.max_concurrent) == (3, 2, 0, 2)


def test_unknown_key_is_named():
    with pytest.raises(ConfigError, match=r"search\.num_sample: unknown key"):
        config_from_dict(_with(search={"num_sample": 3}))
    with pytest.raises(ConfigError, match=r"bogus: unknown key"):
        config_from_dict({**BASE, "bogus": 1})


def test_unknown_family_lists_allowed_values():
    with pytest.raises(ConfigError) as err:
        config_from_dict(_with(search={"families": ["rf", "transformer"]}))
    msg = str(err.value)
    assert "search.families.1" in msg and "'transformer'" in msg and "'rf'" in msg and "'cgcnn'" in msg


def test_bad_values_are_named():
    with pytest.raises(ConfigError, match=r"search\.max_concurrent"):
        config_from_dict(_with(search={"max_concurrent": 0}))
    with pytest.raises(ConfigError, match=r"data\.limit"):
        config_from_dict(_with(data={"limit": -5}))
    with pytest.raises(ConfigError, match=r"features\.max_neighbors"):
        config_from_dict(_with(features={"max_neighbors": -1}))
    with pytest.raises(ConfigError, match=r"grace_period"):
        config_from_dict(_with(search={"grace_period": 5, "max_epochs": 2}))
    with pytest.raises(ConfigError, match=r"data: required key is missing"):
        config_from_dict({"name": "x"})


def test_overrides_parse_yaml_scalars_and_create_sections():
    raw = apply_overrides(
        _with(), ["search.num_samples=7", "data.limit=50", "features.cutoff=5.5", "search.families=[rf]"]
    )
    cfg = config_from_dict(raw)
    assert cfg.search.num_samples == 7 and cfg.data.limit == 50 and cfg.features.cutoff == 5.5
    assert cfg.search.families == ["rf"]
    with pytest.raises(ConfigError, match="expected dotted.key=value"):
        apply_overrides({}, ["search.num_samples"])


def test_invalid_config_fails_fast_before_ray(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ndata: {source: matbench_phonons}\nsearch: {families: [rf, gpt]}\n")
    t0 = time.time()
    proc = subprocess.run(
        [sys.executable, "-m", "matfusion.cli", "search", str(bad)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "search.families.1" in proc.stderr and "'gpt'" in proc.stderr
    assert "Started a local Ray" not in proc.stderr + proc.stdout
    assert not (tmp_path / "mlruns.db").exists()
    assert time.time() - t0 < 60


def test_missing_config_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
