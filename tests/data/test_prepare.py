"""prepare_fold: the one fold-preparation step of search, ensemble and benchmark.

Real matbench_phonons rows (a seeded subset through data.limit), the real featurizer and cache:
prepare_fold must give exactly what the manual path (load_dataset -> split_fold -> featurize ->
pack) gives, under the same cache keys, and never put a test row into the trial data.
"""

import numpy as np
import pytest

from matfusion.config import config_from_dict
from matfusion.data import load_dataset, split_fold
from matfusion.data.featurize import featurize
from matfusion.data.prepare import features_config, fold_split, needs_graphs, needs_line_graph, prepare_fold
from matfusion.trainables.trial_data import pack_rows, pack_trial_data


def _cfg(data_dir, families=("rf", "cgcnn"), limit=40, source="matbench_phonons", **data):
    return config_from_dict(
        {
            "name": "prep",
            "data": {"source": source, "limit": limit, "data_dir": str(data_dir), "fold": 1, **data},
            "features": {"cutoff": 4.0, "max_neighbors": 6, "descriptors": ["magpie"], "n_jobs": 1},
            "search": {"families": list(families), "seed": 3},
        }
    )


def _same_graphs(a, b):
    assert (a is None) == (b is None)
    if a is None:
        return
    for name, arr in a.arrays().items():
        np.testing.assert_array_equal(arr, b.arrays()[name], err_msg=name)


def test_same_rows_features_and_cache_keys_as_the_manual_path(data_dir):
    cfg = _cfg(data_dir)
    prep = prepare_fold(cfg, progress=False)

    dataset = load_dataset(cfg.data, seed=cfg.search.seed)
    split = split_fold(dataset, cfg.data.fold, cfg.data.val_fraction, seed=cfg.search.seed, n_folds=cfg.data.n_folds)
    features = featurize(dataset, cfg.features, progress=False, graphs=True)
    assert features.from_cache  # prepare_fold featurized under the same cache keys
    assert list(prep.dataset.ids) == list(dataset.ids) and prep.dataset.content_hash == dataset.content_hash
    assert len(prep.dataset) == 40
    for part in ("train", "val", "test"):
        np.testing.assert_array_equal(getattr(prep.split, part), getattr(split, part))
    np.testing.assert_array_equal(prep.descriptors, features.descriptors)
    assert prep.columns == features.descriptor_columns
    _same_graphs(prep.graphs, features.graphs)
    assert not prep.graphs.has_line_graph  # no alignn, no line graph

    manual = pack_trial_data(
        features.descriptors,
        features.graphs,
        dataset.targets,
        split.train,
        split.val,
        gaussian_bins=cfg.features.gaussian_bins,
        gaussian_width=cfg.features.gaussian_width,
    )
    assert prep.trial_data.keys() == manual.keys() and prep.trial_data["graph_params"] == manual["graph_params"]
    for part in ("train", "val"):
        assert prep.trial_data[part].keys() == manual[part].keys()
        for key, arr in manual[part].items():
            np.testing.assert_array_equal(prep.trial_data[part][key], arr, err_msg=f"{part}/{key}")
    test = pack_rows(features.descriptors, features.graphs, dataset.targets, split.test)
    for key, arr in test.items():
        np.testing.assert_array_equal(prep.test_part[key], arr, err_msg=key)
    assert prep.graph_params == manual["graph_params"]
    assert prep.target_names == [dataset.target_name]
    assert fold_split(cfg, dataset).test.tolist() == split.test.tolist()


def test_test_rows_never_reach_the_trial_data(data_dir):
    prep = prepare_fold(_cfg(data_dir), progress=False)
    train = set(prep.trial_data["train"]["row"].tolist())
    val = set(prep.trial_data["val"]["row"].tolist())
    test = set(prep.test_part["row"].tolist())
    assert train and val and test
    assert not (train | val) & test and not train & val
    assert train | val | test == set(range(len(prep.dataset)))
    assert test == set(prep.split.test.tolist())
    # the packed rows are the dataset's rows: targets line up
    np.testing.assert_array_equal(prep.trial_data["train"]["y"], prep.targets[sorted(train)])
    # graphs of the trial data hold the train + val structures only
    n_graphs = len(prep.trial_data["train"]["graph/node_ptr"]) - 1 + len(prep.trial_data["val"]["graph/node_ptr"]) - 1
    assert n_graphs == len(train | val)


def test_line_graph_toggle():
    assert not needs_line_graph(["rf", "cgcnn"])
    assert needs_line_graph(["rf", "alignn"])
    assert needs_line_graph(["rf"], [{"family": "rf"}, {"family": "alignn"}])
    assert not needs_line_graph([], [{"family": "cgcnn"}])
    cfg = config_from_dict(
        {"name": "x", "data": {"source": "matbench_phonons"}, "features": {"cutoff": 4.5, "gaussian_bins": 20}}
    )
    on = features_config(cfg.features, ["alignn"])
    assert on.line_graph and on.cutoff == 4.5 and on.gaussian_bins == 20
    assert not cfg.features.line_graph  # the config itself is left as it was
    assert features_config(cfg.features, ["cgcnn"]) is cfg.features
    assert needs_graphs(["rf", "cgcnn"]) and not needs_graphs(["rf", "lgbm", "et"])


def test_alignn_fold_builds_line_graphs(data_dir):
    prep = prepare_fold(_cfg(data_dir, families=("alignn",), limit=20), progress=False)
    assert prep.features_config.line_graph and prep.graphs.has_line_graph
    assert "graph/line_index" in prep.trial_data["train"]


def test_tabular_only_skips_graphs_unless_asked(data_dir):
    cfg = _cfg(data_dir, families=("rf", "lgbm"))
    prep = prepare_fold(cfg, progress=False)
    assert prep.graphs is None and "graph/z" not in prep.trial_data["train"]
    assert "graph/z" not in prep.test_part
    both = prepare_fold(cfg, prep.dataset, graphs=True, progress=False)
    assert both.graphs is not None and len(both.graphs) == len(prep.dataset)
    np.testing.assert_array_equal(both.descriptors, prep.descriptors)


def test_graph_family_on_compositions_is_refused_by_name(data_dir):
    cfg = _cfg(data_dir, families=("rf", "cgcnn"), source="matbench_expt_gap", limit=30)
    with pytest.raises(ValueError, match="compositions only; family 'cgcnn' needs crystal structures"):
        prepare_fold(cfg, progress=False)
    prep = prepare_fold(cfg, families=["rf"], progress=False)
    assert prep.graphs is None and prep.trial_data["train"]["descriptors"].shape[1] == 132
