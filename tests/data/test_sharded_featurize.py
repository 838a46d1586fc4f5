"""Featurization in shards: the assembled features are byte-identical to one pass over every row,
an interrupted featurization resumes from its finished shard files, and the Ray backend on a real
2-node cluster (tests/ray_cluster_helper.py, loopback) gives the same bytes with shards on both
nodes.  40 small crystals made here."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO
from pymatgen.core import Lattice, Structure
from ray_cluster import RayCluster

from matfusion.config import FeaturesConfig
from matfusion.data import descriptors as desc
from matfusion.data.cache import FeatureCache
from matfusion.data.dataset import Dataset
from matfusion.data.featurize import build_graphs, featurize, shard_cache

N = 40
SETS = ["magpie", "density", "symmetry", "bonds"]


def crystals(n: int, seed: int = 7) -> list[Structure]:
    """``n`` crystals of 1 to 4 atoms (rock salt, CsCl, bcc Fe, diamond Si), strained and shaken, seeded."""
    rng = np.random.default_rng(seed)
    protos = [
        (Lattice.from_parameters(3.99, 3.99, 3.99, 60, 60, 60), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]]),
        (Lattice.cubic(4.12), ["Cs", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]]),
        (Lattice.cubic(2.87), ["Fe", "Fe"], [[0, 0, 0], [0.5, 0.5, 0.5]]),
        (Lattice.from_parameters(3.87, 3.87, 3.87, 60, 60, 60), ["Si", "Si"], [[0, 0, 0], [0.25, 0.25, 0.25]]),
    ]
    out = []
    for i in range(n):
        lattice, species, coords = protos[i % len(protos)]
        strain = np.eye(3) + rng.uniform(-0.02, 0.02, (3, 3))
        frac = np.array(coords, float) + rng.normal(0, 0.01, (len(coords), 3))
        out.append(Structure(Lattice(lattice.matrix @ strain), species, frac))
    return out


@pytest.fixture(scope="module")
def dataset() -> Dataset:
    return Dataset("sharded", [f"s{i}" for i in range(N)], crystals(N), np.arange(N, dtype=float), "y", "sharded-40")


def config(cache_dir, **kw) -> FeaturesConfig:
    return FeaturesConfig(**{"cache_dir": str(cache_dir), "line_graph": True, "descriptors": SETS, "n_jobs": 1, **kw})


@pytest.fixture(scope="module")
def one_pass(dataset):
    """The features computed as before shards: every graph in one pass, every set in one pass."""
    cfg = config("unused")
    graphs = build_graphs(dataset, cfg.cutoff, cfg.max_neighbors, with_line_graph=True)
    blocks = desc.compute_sets(dataset.structures, SETS)
    return graphs, np.hstack([blocks[name] for name in SETS])


def assert_same_bytes(fs, one_pass) -> None:
    graphs, matrix = one_pass
    assert fs.descriptors.dtype == matrix.dtype and fs.descriptors.tobytes() == matrix.tobytes()
    mine, theirs = fs.graphs.arrays(), graphs.arrays()
    assert sorted(mine) == sorted(theirs) and "line_index" in mine
    for name, a in theirs.items():
        assert (mine[name].dtype, mine[name].shape) == (a.dtype, a.shape), name
        assert mine[name].tobytes() == a.tobytes(), name


def test_shards_assemble_byte_identical_to_one_pass(dataset, one_pass, tmp_path):
    written = []

    def check_shard(index: int, path: Path) -> None:  # each shard file holds its own rows, as one pass has them
        start, stop = 7 * index, min(N, 7 * index + 7)
        with np.load(path) as npz:
            arrays = {k: npz[k] for k in npz.files}
        np.testing.assert_array_equal(arrays["desc.bonds"], one_pass[1][start:stop, -len(desc.BOND_COLUMNS) :])
        sub = one_pass[0].subset(range(start, stop))
        for name, a in sub.arrays().items():
            assert arrays[f"graph.{name}"].tobytes() == a.tobytes(), (index, name)
        written.append(index)

    fs = featurize(dataset, config(tmp_path / "serial"), progress=False, shard_size=7, on_shard=check_shard)
    assert sorted(written) == list(range(6))  # 40 rows in shards of 7: the last holds 5
    assert (fs.shards.total, fs.shards.computed, fs.shards.reused) == (6, 6, 0) and not fs.from_cache
    assert_same_bytes(fs, one_pass)
    # the rest of matfusion reads the cache entries of today; the shard files are gone
    assert sorted(p.name.split("-")[0] for p in (tmp_path / "serial").glob("*.npz")) == ["desc"] * 3 + [
        "graph",
        "magpie",
    ]
    assert not (tmp_path / "serial" / "shards").exists()
    again = featurize(dataset, config(tmp_path / "serial"), progress=False, shard_size=7)
    assert again.from_cache and again.shards is None
    assert_same_bytes(again, one_pass)

    forked = featurize(dataset, config(tmp_path / "forked", n_jobs=2), progress=False, shard_size=7)
    assert forked.shards.computed == 6
    assert_same_bytes(forked, one_pass)
    whole = featurize(dataset, config(tmp_path / "one-shard"), progress=False, shard_size=1000)
    assert whole.shards.total == 1
    assert_same_bytes(whole, one_pass)


class Interrupted(BaseException):
    """What a Ctrl-C is to the featurizer: not an error of one shard."""


def test_an_interrupted_featurization_resumes_from_its_finished_shards(dataset, one_pass, tmp_path):
    cfg = config(tmp_path)
    store = shard_cache(FeatureCache(tmp_path))
    first: list = []

    def interrupt_after_three(index: int, path: Path) -> None:
        first.append(path)
        if len(first) == 3:
            raise Interrupted()

    with pytest.raises(Interrupted):
        featurize(dataset, cfg, progress=False, shard_size=8, on_shard=interrupt_after_three)
    finished = sorted(store.directory.glob("shard-*.npz"))
    assert finished == sorted(first) and len(finished) == 3
    assert not list(tmp_path.glob("*.npz"))  # nothing assembled yet
    stamps = {p: p.stat().st_mtime_ns for p in finished}

    second: list = []

    def untouched(index: int, path: Path) -> None:
        second.append(path)
        assert {p: p.stat().st_mtime_ns for p in finished} == stamps  # the finished shards were not rewritten

    fs = featurize(dataset, cfg, progress=False, shard_size=8, on_shard=untouched)
    assert (fs.shards.total, fs.shards.computed, fs.shards.reused) == (5, 2, 3)
    assert len(second) == 2 and not set(second) & set(finished)
    assert_same_bytes(fs, one_pass)
    assert not store.directory.exists()


def test_a_damaged_shard_file_is_computed_again(dataset, one_pass, tmp_path):
    cfg = config(tmp_path)

    def stop_after_two(index: int, path: Path) -> None:
        if index == 1:
            raise Interrupted()

    with pytest.raises(Interrupted):
        featurize(dataset, cfg, progress=False, shard_size=20, on_shard=stop_after_two)
    (a, b) = sorted(shard_cache(FeatureCache(tmp_path)).directory.glob("shard-*.npz"))
    a.write_bytes(a.read_bytes()[:100])  # truncated: fails its checksum, is reported and rebuilt
    fs = featurize(dataset, cfg, progress=False, shard_size=20)
    assert (fs.shards.computed, fs.shards.reused) == (1, 1)
    assert_same_bytes(fs, one_pass)


def test_what_a_shard_logs_reaches_the_driver_once_with_its_rows(tmp_path, caplog):
    """A featurizer failing on a structure (solid He has no atomic radius: density is NaN) is logged
    by the driver with the shard's rows, once per kind, however many shards logged it."""
    import logging

    structures = crystals(12)
    for i in (5, 9):  # in shards 1 and 2 of 4 rows each
        structures[i] = Structure(Lattice.cubic(3.0), ["He"], [[0, 0, 0]])
    ds = Dataset("helium", [f"h{i}" for i in range(12)], structures, np.zeros(12), "y", "helium-12")
    with caplog.at_level(logging.DEBUG, logger="matfusion.data"):
        fs = featurize(ds, config(tmp_path, descriptors=["density"]), progress=False, graphs=False, shard_size=4)
    assert np.isnan(fs.descriptors[[5, 9]]).all() and np.isfinite(np.delete(fs.descriptors, [5, 9], axis=0)).all()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert warnings[0].startswith("shard 1 (rows 4-7): descriptors: 1 featurizer call(s) failed")
    # the item is the dataset's row (5), as one pass over every row names it, not the shard's (1)
    assert "first: item 5, density" in warnings[0] and "1 more such message(s)" in warnings[0]
    debug = [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG]
    assert any(m.startswith("shard 2 (rows 8-11): descriptors: 1 featurizer call(s) failed") for m in debug)
    assert any("shard 2 (rows 8-11)" in m and "first: item 9, density" in m for m in debug)


def test_a_graph_failure_leaves_no_shard_file_after_prepare_fold(tmp_path, monkeypatch):
    """prepare_fold featurizes again without the row the graph builder fails on (a composition):
    the first pass's shards after that row hold other rows in the second pass; none is left."""
    from functools import partial

    from pymatgen.core import Composition

    from matfusion.config import config_from_dict
    from matfusion.data import featurize as featurize_module
    from matfusion.data.prepare import prepare_fold

    structures = crystals(12)
    structures[5] = Composition("NaCl")  # shard 1 (rows 4-7) fails; shards 0 and 2 are written
    ds = Dataset("broken", [f"b{i}" for i in range(12)], structures, np.arange(12.0), "y", "broken-12")
    written: list = []
    monkeypatch.setattr(
        featurize_module, "featurize", partial(featurize, shard_size=4, on_shard=lambda i, p: written.append(p))
    )
    cfg = config_from_dict(
        {
            "name": "broken",
            "data": {"source": "unused", "fold": 0, "n_folds": 3},
            "features": {"cache_dir": str(tmp_path), "n_jobs": 1, "descriptors": ["magpie"]},
            "search": {"families": ["cgcnn"], "seed": 0},
        }
    )
    prep = prepare_fold(cfg, ds, progress=False)
    assert "b5" not in prep.dataset.ids and prep.dataset.skipped["graph failed"] == 1 and len(prep.graphs) == 11
    # first pass: rows 0-3 and 8-11 written; second: 0-3 reused, 4-7 and 8-10 written.  The
    # first pass's rows 8-11 are of no use to the second: without the clean-up it stays
    assert len(written) == 4 and written[1].name not in {p.name for p in written[2:]}, written
    assert not (tmp_path / "shards").exists(), sorted(os.listdir(tmp_path / "shards"))


# -- the ray backend on a real 2-node cluster ------------------------------------------------


def cluster_env(root: Path) -> dict:
    """The cluster's environment: its temp dir ``root``, no other Ray's address or token, and
    this tree's matfusion for its workers."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_AUTH", "RAY_ADDRESS"))}
    env.update(RAY_TMPDIR=str(root), RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_USAGE_STATS_ENABLED="0")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])  # for the workers
    return env


@pytest.fixture(scope="module")
def cluster():
    root = Path(tempfile.mkdtemp(prefix="mfs", dir="/tmp"))  # short: Ray's socket paths are limited
    c = RayCluster(cluster_env(root))
    try:
        yield c
    finally:
        c.shutdown()
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.slow
def test_ray_backend_on_two_nodes_is_byte_identical_with_shards_on_both(dataset, one_pass, cluster, tmp_path):
    import ray

    assert not ray.is_initialized()
    cfg = config(tmp_path, backend="ray")
    fs = featurize(dataset, cfg, progress=False, shard_size=5, ray_address=cluster.address)
    assert not ray.is_initialized()  # it joined the cluster for the shards only
    assert (fs.shards.backend, fs.shards.total, fs.shards.computed) == ("ray", 8, 8)
    assert set(fs.shards.per_node) == cluster.nodes and sum(fs.shards.per_node.values()) == 8
    assert_same_bytes(fs, one_pass)
    assert not (tmp_path / "shards").exists()
