"""The model family registry (matfusion.families): names and kinds, typed hyperparameters whose
defaults are the spaces' DEFAULTS and the models' own, the trial config parsed once (round trip of
what the search space emits, unknown keys rejected by name), the fusion / group labels, and fit +
checkpoint write/read + predict of every family on a tiny dataset of pymatgen structures."""

from __future__ import annotations

import inspect

import numpy as np
import optuna
import pytest
from pymatgen.core import Lattice, Structure

from matfusion import families
from matfusion.config import FAMILIES, FUSIONS, SearchConfig
from matfusion.families import TrialConfig, TrialConfigError, fusion
from matfusion.spaces import SearchSpace
from matfusion.spaces.params import Categorical

optuna.logging.set_verbosity(optuna.logging.WARNING)


def test_registry_names_kinds_and_config_literals():
    assert families.names() == ("rf", "lgbm", "et", "cgcnn", "alignn")
    assert families.TABULAR == ("rf", "lgbm", "et") and families.GRAPH == ("cgcnn", "alignn")
    assert families.ONE_SHOT == ("rf", "et")
    assert families.FUSIONS == ("none", "early", "attention", "late", "residual")
    assert (FAMILIES, FUSIONS) == (families.names(), families.FUSIONS)  # the schema's literals
    assert SearchConfig().families == list(families.names())
    for name in families.names():
        family = families.get(name)
        assert family.name == name and family.kind in ("tabular", "graph")
        assert family.graph == (name in families.GRAPH)
    assert families.get("alignn").needs_line_graph and not families.get("cgcnn").needs_line_graph
    assert families.needs_line_graph(["rf", "alignn"]) and not families.needs_line_graph(["rf", "cgcnn"])
    with pytest.raises(families.UnknownFamilyError, match="unknown model family 'gpt'; known: rf, lgbm, et"):
        families.get("gpt")


def test_importing_the_registry_imports_no_model():
    import subprocess
    import sys

    code = (
        "import sys, matfusion.families, matfusion.spaces, matfusion.config\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'sklearn', 'lightgbm', 'ray'}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("name", families.names())
def test_defaults_are_the_typed_defaults_and_lie_in_the_space(name):
    family = families.get(name)
    params = family.Params()  # every field has a default
    assert family.DEFAULTS == {k: getattr(params, k) for k in family.PARAMS}
    module = __import__(f"matfusion.families.{name}", fromlist=["DEFAULTS"])
    assert module.DEFAULTS == family.DEFAULTS  # the module's DEFAULTS is that, not a copy to keep in step
    assert set(family.PARAMS) <= set(family.Params.model_fields)
    for param, value in family.DEFAULTS.items():
        spec = family.PARAMS[param]
        if isinstance(spec, Categorical):
            assert value in spec.choices, (name, param)
        else:
            assert spec.low <= value <= spec.high, (name, param)
    for preset in family.PRESETS.values():
        assert set(preset) <= set(family.PARAMS)


def test_fusion_defaults_are_typed_and_graph_params_include_them():
    assert fusion.DEFAULTS == {k: getattr(fusion.FusionParams(), k) for k in fusion.PARAMS}
    for name in families.GRAPH:
        assert set(fusion.FusionParams.model_fields) <= set(families.get(name).Params.model_fields)
        assert families.get(name).Params().fusion == "none"
    assert set(fusion.USES) == set(families.FUSIONS)


def test_model_constructors_have_no_defaults_of_their_own_that_drift():
    """The scikit-learn / LightGBM builders take the family's values (no defaults); the torch
    modules' signature defaults equal the family defaults."""
    from matfusion.trainables.alignn import ALIGNN
    from matfusion.trainables.cgcnn import CGCNN
    from matfusion.trainables.forest import forest
    from matfusion.trainables.fusion import FusedModel
    from matfusion.trainables.lgbm import ChunkedLGBM

    def defaults(fn, skip=("seed", "n_jobs")):
        return {
            k: p.default
            for k, p in inspect.signature(fn).parameters.items()
            if p.default is not inspect.Parameter.empty and k not in skip
        }

    assert defaults(forest, skip=("seed", "n_jobs", "bootstrap")) == {} and defaults(ChunkedLGBM.__init__) == {}
    for cls, name in ((CGCNN, "cgcnn"), (ALIGNN, "alignn")):
        typed = families.get(name).Params()
        for k, v in defaults(cls, skip=("n_targets",)).items():
            assert getattr(typed, k) == v, (name, k)
    typed = fusion.FusionParams()
    for k in ("comp_hidden", "comp_layers", "fusion_dim"):
        assert defaults(FusedModel)[k] == getattr(typed, k)


# -- the trial config ---------------------------------------------------------------------------


def _unflatten(flat: dict) -> dict:
    """What Ray's OptunaSearch does with the define-by-run output (keys split at '/')."""
    out: dict = {}
    for key, value in flat.items():
        node = out
        *parents, leaf = key.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


def test_every_trial_the_space_emits_parses_and_round_trips():
    constants = {
        "max_epochs": 6,
        "seed": 3,
        "patience": 4,
        "cpus": 1.0,
        "targets": ["a", "b"],
        "checkpoint_every": 2,
        "lr_restarts": [2, 4],
        "checkpoint_at": [2],
    }
    space = SearchSpace(
        list(families.names()),
        constants,
        fusions=list(families.FUSIONS),
        targets=["a", "b"],
        task_weighting=["fixed", "tuned", "uncertainty"],
        task_weights={"b": 0.5},
        overrides={"cgcnn.hidden": 32, "rf.n_estimators": 100},
    )  # fixed params are constants
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for p in space.default_points():
        study.enqueue_trial(p)
    seen = set()
    for _ in range(60):
        trial = study.ask()
        constants = space(trial)
        config = _unflatten({**trial.params, **constants})
        study.tell(trial, 1.0)
        parsed = TrialConfig.parse(config)
        assert parsed.to_dict() == config
        assert TrialConfig.parse(parsed.to_dict()) == parsed
        assert TrialConfig.parse(parsed) is parsed  # parsed once: a TrialConfig passes through
        assert parsed.max_epochs == 6 and parsed.lr_restarts == (2, 4) and parsed.threads == 1
        if parsed.family == "cgcnn":
            assert parsed.params.hidden == 32
        if "multitask" in config and config["multitask"]["weighting"] == "fixed":
            assert (parsed.multitask.weight("a"), parsed.multitask.weight("b")) == (1.0, 0.5)
        seen.add(families.group_of(config))
    assert {"rf", "lgbm", "et"} <= seen and any(g.startswith("cgcnn-") for g in seen)


def test_omitted_hyperparameters_take_the_family_defaults():
    trial = TrialConfig.parse({"family": "rf", "rf": {"n_estimators": 50}})
    assert trial.params.max_features == 0.35 and trial.params.n_estimators == 50
    assert TrialConfig.parse({"family": "lgbm"}).params.learning_rate == 0.03
    cg = TrialConfig.parse({"family": "cgcnn", "cgcnn": {"fusion": "late"}})
    assert cg.params.lr == 3e-3 and TrialConfig.parse({"family": "alignn"}).params.lr == 2e-3
    assert cg.late_forest == families.get("rf").Params()  # late fusion's forests: rf's defaults
    with_rf = TrialConfig.parse({"family": "cgcnn", "cgcnn": {"fusion": "late"}, "rf": {"n_estimators": 20}})
    assert with_rf.late_forest.n_estimators == 20 and with_rf.to_dict()["rf"] == {"n_estimators": 20}
    assert cg.max_epochs == 30 and cg.patience == 20 and cg.multitask.weighting == "fixed"


@pytest.mark.parametrize(
    "config, names",
    [
        ({"family": "cgcnn", "cgcnn": {"hiden": 64}}, ["cgcnn.hiden: unknown key"]),
        ({"family": "rf", "rf": {"n_estimators": 10, "fusion": "early"}}, ["rf.fusion: unknown key"]),
        ({"family": "rf", "max_epoch": 3}, ["max_epoch: unknown key"]),
        (
            {"family": "cgcnn", "multitask": {"weighting": "fixed", "lambda_a": 1.0}},
            ["multitask.lambda_a: unknown key"],
        ),
        ({"family": "lgbm", "et": {}}, ["et: a section of another family"]),
        ({"family": "cgcnn", "cgcnn": {"fusion": "middle"}}, ["cgcnn.fusion", "'middle'"]),
        (
            {"family": "lgbm", "lgbm": {"objective": "l3"}, "rf": {}, "seed": "x"},
            ["lgbm.objective", "rf: a section of another family"],
        ),
    ],
)
def test_unknown_or_bad_keys_are_errors_naming_them(config, names):
    with pytest.raises(TrialConfigError) as err:
        TrialConfig.parse(config)
    for n in names:
        assert n in str(err.value)


def test_an_unknown_family_is_an_error():
    with pytest.raises(ValueError, match="unknown model family 'gpt'"):
        TrialConfig.parse({"family": "gpt"})
    with pytest.raises(TrialConfigError, match="'family' key"):
        TrialConfig.parse({"rf": {}})


def test_fusion_and_group_labels():
    assert families.fusion_of({"family": "rf", "rf": {}}) == "none"
    assert families.group_of({"family": "lgbm"}) == "lgbm"
    assert families.fusion_of({"family": "cgcnn", "cgcnn": {}}) == "none"
    assert families.group_of({"family": "cgcnn", "cgcnn": {"fusion": "early"}}) == "cgcnn-early"
    assert families.group_of({"family": "alignn", "alignn": {"hidden": 32}}) == "alignn-none"
    assert families.group_of(TrialConfig.parse({"family": "cgcnn", "cgcnn": {"fusion": "late"}})) == "cgcnn-late"
    # a flat row (family and fusion columns, as in a leaderboard) reads the same
    assert families.group_of({"family": "cgcnn", "fusion": "attention"}) == "cgcnn-attention"
    assert families.group_of({"family": "et", "fusion": "-"}) == "et"


# -- fit, checkpoint, predict on a tiny dataset of pymatgen structures ----------------------------

PAIRS = [("Cs", "Cl"), ("Na", "Cl"), ("K", "Br"), ("Rb", "I"), ("Li", "F"), ("Cs", "Br"), ("Tl", "Cl"), ("Ag", "I")]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """32 CsCl-type cells (2 atoms) with lattice constants 3.2 .. 4.6 A; target: the constant."""
    from matfusion.config import FeaturesConfig
    from matfusion.data.dataset import Dataset
    from matfusion.data.featurize import featurize
    from matfusion.trainables.trial_data import pack_rows, pack_trial_data

    rng = np.random.default_rng(0)
    structures, targets = [], []
    for k in range(32):
        a, b = PAIRS[k % len(PAIRS)]
        lattice_constant = float(rng.uniform(3.2, 4.6))
        structures.append(Structure(Lattice.cubic(lattice_constant), [a, b], [[0, 0, 0], [0.5, 0.5, 0.5]]))
        targets.append(lattice_constant)
    ds = Dataset(
        name="tiny",
        ids=[f"c{k}" for k in range(32)],
        structures=structures,
        targets=np.array(targets),
        target_name="a",
        content_hash="tiny-cscl-0",
    )
    fs = featurize(
        ds,
        FeaturesConfig(
            line_graph=True, cutoff=5.0, max_neighbors=8, n_jobs=1, cache_dir=str(tmp_path_factory.mktemp("cache"))
        ),
        progress=False,
    )
    train, val, test = np.arange(0, 20), np.arange(20, 26), np.arange(26, 32)
    data = pack_trial_data(fs.descriptors, fs.graphs, ds.targets, train, val)
    return data, pack_rows(fs.descriptors, fs.graphs, ds.targets, test)


TINY = {
    "rf": {"n_estimators": 10},
    "et": {"n_estimators": 10},
    "lgbm": {"n_estimators": 20, "min_child_samples": 3, "num_leaves": 7},
    "cgcnn": {
        "hidden": 8,
        "n_conv": 1,
        "head_hidden": 8,
        "batch_size": 8,
        "fusion": "early",
        "comp_hidden": 8,
        "comp_layers": 1,
    },
    "alignn": {"hidden": 8, "n_layers": 1, "n_gcn": 0, "head_hidden": 8, "batch_size": 8},
}


@pytest.mark.parametrize("name", families.names())
def test_fit_checkpoint_and_predict_every_family(tiny, tmp_path, name):
    from matfusion.trainables.loop import LocalSession
    from matfusion.trainables.trial import fit_family, load_trial_state, predict_from_state

    assert set(TINY) == set(families.names()), "a new family needs its tiny config here"
    data, test = tiny
    config = {"family": name, name: TINY[name], "max_epochs": 2, "seed": 0, "patience": 5, "cpus": 1}
    family = families.get(name)
    session = LocalSession()
    state = fit_family(config, data, session)
    assert len(session.history) == (1 if family.one_shot else 2)
    assert all(np.isfinite(h["val_mae"]) for h in session.history)
    pred = predict_from_state(config, state, test, data["graph_params"])
    assert pred.shape == (len(test["y"]),) and np.isfinite(pred).all()
    family.write_checkpoint(state, str(tmp_path))
    assert [p.name for p in tmp_path.iterdir()] == [family.checkpoint_file]
    np.testing.assert_allclose(
        predict_from_state(config, load_trial_state(config, str(tmp_path)), test, data["graph_params"]), pred, rtol=1e-6
    )
    np.testing.assert_allclose(
        predict_from_state(TrialConfig.parse(config), family.slim_state(state), test, data["graph_params"]),
        pred,
        rtol=1e-6,
    )


def test_late_fusion_forests_use_the_rf_section_else_rf_defaults(tiny):
    from matfusion.trainables.loop import LocalSession
    from matfusion.trainables.trial import fit_family

    data, _ = tiny
    base = {"family": "cgcnn", "cgcnn": dict(TINY["cgcnn"], fusion="late"), "max_epochs": 1, "seed": 0, "cpus": 1}
    default = fit_family(base, data, LocalSession())["rf"][0]
    assert default.max_features == families.get("rf").Params().max_features == 0.35
    assert default.n_estimators == families.get("rf").Params().n_estimators
    given = fit_family(dict(base, rf={"n_estimators": 7, "max_features": 1.0}), data, LocalSession())["rf"][0]
    assert (given.n_estimators, given.max_features) == (7, 1.0)
