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
    space = SearchSpace(["cgcnn"], {}, fusions=["none"], targets=["a", "b"],
                        task_weighting=["fixed", "tuned", "uncertainty"], task_weights={"b": 0.5})
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
