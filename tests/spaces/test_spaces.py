import optuna
import pytest

from matfusion.spaces import SearchSpace

optuna.logging.set_verbosity(optuna.logging.WARNING)


def _sample(space, n=30, seed=0):
    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=seed))
    out = []
    for _ in range(n):
        trial = study.ask()
        constants = space(trial)
        out.append({**trial.params, **constants})
        study.tell(trial, 1.0)
    return out


def test_each_family_brings_only_its_own_params():
    space = SearchSpace(["rf", "cgcnn"], {"max_epochs": 3}, fusions=["none", "early", "attention", "late"])
    samples = _sample(space)
    assert {s["family"] for s in samples} == {"rf", "cgcnn"}
    for s in samples:
        fam = s["family"]
        own = [k for k in s if "/" in k]
        assert all(k.startswith(fam + "/") for k in own), s
        if fam == "cgcnn":
            assert s["cgcnn/fusion"] in {"none", "early", "attention", "late"}
            has_comp = "cgcnn/comp_hidden" in s
            assert has_comp == (s["cgcnn/fusion"] in {"early", "attention"})
        assert s["max_epochs"] == 3


def test_same_seed_same_configs_other_seed_differs():
    space = SearchSpace(["rf", "cgcnn"], {}, fusions=["none", "early"])
    assert _sample(space, 8, seed=1) == _sample(space, 8, seed=1)
    assert _sample(space, 8, seed=1) != _sample(space, 8, seed=2)


def test_multitask_weighting_choices():
    space = SearchSpace(
        ["cgcnn"],
        {},
        fusions=["none"],
        targets=["a", "b"],
        task_weighting=["fixed", "tuned", "uncertainty"],
        task_weights={"b": 0.5},
    )
    samples = _sample(space, 30)
    seen = {s["multitask/weighting"] for s in samples}
    assert seen == {"fixed", "tuned", "uncertainty"}
    for s in samples:
        if s["multitask/weighting"] == "tuned":
            assert 0.1 <= s["multitask/w_a"] <= 1.0 and 0.1 <= s["multitask/w_b"] <= 1.0
        elif s["multitask/weighting"] == "fixed":
            assert (s["multitask/w_a"], s["multitask/w_b"]) == (1.0, 0.5)
        else:
            assert "multitask/w_a" not in s


def test_single_target_has_no_multitask_params():
    samples = _sample(SearchSpace(["cgcnn"], {}, fusions=["none"], targets=["y"]), 5)
    assert not any(k.startswith("multitask/") for s in samples for k in s)


def test_unknown_family_and_task_weight_rejected():
    with pytest.raises(ValueError, match="unknown model families"):
        SearchSpace(["rf", "gpt"], {})
    with pytest.raises(ValueError, match="task_weights names"):
        SearchSpace(["cgcnn"], {}, targets=["a"], task_weights={"zzz": 1.0})


# -- presets, fixing and narrowing, seeded default points ------------------------------------

from matfusion.config import ConfigError, config_from_dict  # noqa: E402
from matfusion.spaces import SpaceError, resolve_specs  # noqa: E402


def test_presets_change_ranges():
    quick = resolve_specs(["cgcnn"], "quick")["cgcnn"]
    default = resolve_specs(["cgcnn"], "default")["cgcnn"]
    thorough = resolve_specs(["cgcnn"], "thorough")["cgcnn"]
    assert set(quick["hidden"].choices) < set(default["hidden"].choices) < set(thorough["hidden"].choices)
    assert thorough["n_conv"].high > default["n_conv"].high > quick["n_conv"].high


def test_fix_and_narrow_parameters_in_samples():
    space = SearchSpace(
        ["rf", "cgcnn"],
        {"max_epochs": 2},
        fusions=["none", "early", "attention"],
        overrides={
            "cgcnn.hidden": 64,
            "cgcnn.lr": {"low": 1e-3, "high": 2e-3},
            "cgcnn.fusion": ["none", "early"],
            "rf": {"max_depth": [10, 20]},
        },
    )
    for s in _sample(space, 30):
        if s["family"] == "cgcnn":
            assert s["cgcnn/hidden"] == 64  # fixed: returned as a constant, not an Optuna param
            assert 1e-3 <= s["cgcnn/lr"] <= 2e-3
            assert s["cgcnn/fusion"] in {"none", "early"}
        else:
            assert s["rf/max_depth"] in {10, 20}


@pytest.mark.parametrize(
    "override, message",
    [
        ({"cgcnn.hiden": 64}, "unknown parameter 'hiden' of cgcnn"),
        ({"cgcnn.hidden": 48}, "48 not allowed; allowed values: [32, 64, 128]"),
        ({"cgcnn.lr": {"low": 1e-6, "high": 1e-3}}, "is not inside the space"),
        ({"cgcnn.n_conv": 2.5}, "expected an integer"),
        ({"gpt.size": 3}, "unknown family 'gpt'"),
        ({"alignn.hidden": 64}, "not in search.families"),
    ],
)
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(SpaceError, match=None) as err:
        resolve_specs(["rf", "cgcnn"], "default", ("none", "early"), override)
    assert message in str(err.value)
    key = next(iter(override))
    assert key.split(".")[0] in str(err.value)


def test_unknown_parameter_after_a_fixed_one_lists_the_fixed_one_too():
    """The known parameters are listed with what the earlier overrides made of them."""
    with pytest.raises(SpaceError) as err:
        resolve_specs(["cgcnn"], "default", ("none",), {"cgcnn.hidden": 64, "cgcnn.rounds_per_epoch": 1})
    assert "unknown parameter 'rounds_per_epoch' of cgcnn" in str(err.value)
    assert "hidden (fixed 64)" in str(err.value)


def test_bad_override_in_config_fails_validation_naming_the_key():
    raw = {
        "name": "x",
        "data": {"source": "matbench_phonons"},
        "search": {"families": ["rf", "cgcnn"], "space": {"cgcnn.hidden": -4}},
    }
    with pytest.raises(ConfigError) as err:
        config_from_dict(raw)
    assert "search.space.cgcnn.hidden" in str(err.value) and "allowed values" in str(err.value)


def test_default_points_are_valid_and_respect_narrowing():
    space = SearchSpace(
        ["rf", "cgcnn", "alignn"],
        {},
        fusions=["none", "attention"],
        overrides={"cgcnn.lr": {"low": 5e-4, "high": 1e-3}, "alignn.hidden": 32},
    )
    points = space.default_points()
    assert [p["family"] for p in points] == ["rf", "cgcnn", "alignn"]
    cg = points[1]
    assert cg["cgcnn/fusion"] == "attention" and cg["cgcnn/lr"] == 1e-3 and "cgcnn/fusion_dim" in cg
    assert "alignn/hidden" not in points[2]  # fixed parameters are constants, not points
    # an enqueued default point is what the space then produces
    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=0))
    for p in points:
        study.enqueue_trial(p)
    for p in points:
        trial = study.ask()
        space(trial)
        assert {k: trial.params[k] for k in p} == p
        study.tell(trial, 1.0)
