"""Graphs on disk (``features.graph_store: disk``): checksummed shard files written once by the driver,
read a graph at a time by a trial; the same items, batches and seeded training as the graphs in memory."""

from __future__ import annotations

import copy
import logging

import numpy as np
import pytest
import torch
from test_graph_store import assert_same_data, graph_set
from torch.utils.data import Subset
from torch_geometric.loader import DataLoader

from matfusion.config import FeaturesConfig
from matfusion.data.graph_store import (
    DiskGraphDataset,
    DiskGraphSet,
    GraphStoreError,
    LazyGraphDataset,
    write_graph_store,
)
from matfusion.trainables.loop import LocalSession, stacked_targets
from matfusion.trainables.trial import fit_family
from matfusion.trainables.trial_data import graph_dataset, pack_trial_data


def test_the_setting_defaults_to_memory():
    assert FeaturesConfig().graph_store == "memory"
    assert FeaturesConfig(graph_store="disk").graph_store == "disk"
    with pytest.raises(ValueError, match="graph_store"):
        FeaturesConfig(graph_store="lmdb")


@pytest.mark.parametrize("with_line_graph", [False, True])
def test_disk_items_and_shuffled_batches_equal_the_memory_ones(tmp_path, with_line_graph):
    gs = graph_set(11, with_line_graph)
    y = np.arange(22.0).reshape(11, 2)
    desc = np.random.default_rng(2).normal(size=(11, 4)).astype(np.float32)
    index = write_graph_store(gs, tmp_path, rows_per_shard=3)
    assert [(s["start"], s["stop"]) for s in index["shards"]] == [(0, 3), (3, 6), (6, 9), (9, 11)]
    memory = LazyGraphDataset(gs, y, desc, gaussian_bins=16)
    disk = DiskGraphDataset(index, y, desc, gaussian_bins=16)
    assert len(disk) == 11
    for k in range(11):
        assert_same_data(disk[k], memory[k])
    assert_same_data(disk[-1], memory[-1])
    with pytest.raises(IndexError, match="graph 11 out of range for 11 graphs"):
        disk[11]
    loaders = [
        DataLoader(items, batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(5))
        for items in (memory, disk)
    ]
    batches = list(zip(*loaders))
    assert len(batches) == 3
    for a, b in batches:
        assert_same_data(a, b)
    torch.testing.assert_close(disk.y, memory.y, atol=0, rtol=0)
    np.testing.assert_array_equal(stacked_targets(disk), y)


def test_a_loader_over_some_rows_reads_only_the_shards_of_their_batches(tmp_path):
    gs = graph_set(24)
    index = write_graph_store(gs, tmp_path, rows_per_shard=4)  # 6 shards
    store = DiskGraphSet(index)
    assert store.locate(0) == (0, 0) and store.locate(9) == (2, 1) and store.locate(23) == (5, 3)
    rows = [1, 2, 9, 10, 21]
    disk = DiskGraphDataset(store, np.arange(24.0))
    loader = iter(DataLoader(Subset(disk, rows), batch_size=2, shuffle=False))
    expected = lambda rs: {index["shards"][store.locate(r)[0]]["file"] for r in rs}  # noqa: E731
    next(loader)  # rows 1, 2: shard 0 only
    assert disk.shards_read == expected([1, 2]) == {"shard-00000.bin"}
    for _ in loader:
        pass
    assert disk.shards_read == expected(rows) == {"shard-00000.bin", "shard-00002.bin", "shard-00005.bin"}
    assert disk.accesses == len(rows)


def test_a_second_write_reuses_the_store(tmp_path):
    gs = graph_set(9)
    first = write_graph_store(gs, tmp_path, rows_per_shard=4)
    files = sorted((tmp_path / first["key"]).iterdir())
    mtimes = [p.stat().st_mtime_ns for p in files]
    second = write_graph_store(gs, tmp_path, rows_per_shard=4)
    assert second == first and second["rebuilt"] == 0
    assert [p.stat().st_mtime_ns for p in sorted((tmp_path / first["key"]).iterdir())] == mtimes
    assert [p.name for p in files] == ["index.json", "shard-00000.bin", "shard-00001.bin", "shard-00002.bin"]
    # other graphs (or another shard size) are another store
    assert write_graph_store(graph_set(8), tmp_path, rows_per_shard=4)["key"] != first["key"]
    assert write_graph_store(gs, tmp_path, rows_per_shard=3)["key"] != first["key"]


def test_a_corrupt_shard_fails_the_trial_by_name_and_the_driver_rebuilds_it(tmp_path, caplog):
    gs = graph_set(12)
    y = np.arange(12.0)
    index = write_graph_store(gs, tmp_path, rows_per_shard=4)
    bad = tmp_path / index["key"] / "shard-00001.bin"
    raw = bytearray(bad.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    bad.write_bytes(bytes(raw))

    trial_side = DiskGraphDataset(index, y)
    trial_side[0]  # shard 0 is sound
    with pytest.raises(GraphStoreError, match=r"graph store shard .*shard-00001\.bin is corrupt \(checksum mismatch\)"):
        trial_side[5]
    assert trial_side.shards_read == {"shard-00000.bin"}

    with caplog.at_level(logging.WARNING, logger="matfusion.data.graph_store"):
        again = write_graph_store(gs, tmp_path, rows_per_shard=4)
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [f"graph store shard {bad} is corrupt (checksum mismatch); rebuilding it"]
    assert again["rebuilt"] == 1 and again["shards"] == index["shards"]
    memory = LazyGraphDataset(gs, y)
    fixed = DiskGraphDataset(again, y)
    for k in range(12):
        assert_same_data(fixed[k], memory[k])


def test_a_missing_shard_says_the_store_needs_shared_storage(tmp_path, caplog):
    gs = graph_set(8)
    index = write_graph_store(gs, tmp_path, rows_per_shard=4)
    gone = tmp_path / index["key"] / "shard-00001.bin"
    gone.unlink()
    with pytest.raises(GraphStoreError, match=r"shard-00001\.bin is missing: .*storage shared by the driver and every"):
        DiskGraphDataset(index)[6]
    with caplog.at_level(logging.WARNING, logger="matfusion.data.graph_store"):
        again = write_graph_store(gs, tmp_path, rows_per_shard=4)
    assert [r.getMessage() for r in caplog.records] == [f"graph store shard {gone} is missing; rebuilding it"]
    assert again["rebuilt"] == 1 and gone.is_file()


def test_a_seeded_cgcnn_trial_trains_the_same_from_disk_as_from_memory(tmp_path):
    n = 24
    gs = graph_set(n)
    rng = np.random.default_rng(4)
    descriptors = rng.normal(size=(n, 5))
    y = rng.normal(size=n) + np.array([len(gs.graph(g)[0]) for g in range(n)], float)
    train, val = np.arange(0, 18), np.arange(18, 24)
    memory = pack_trial_data(descriptors, gs, y, train, val, gaussian_bins=12)
    disk = pack_trial_data(descriptors, gs, y, train, val, gaussian_bins=12, graph_store_dir=tmp_path / "graph-shards")
    assert not any(k.startswith("graph/") for k in disk["train"])  # the part carries the index only
    assert isinstance(graph_dataset(disk["train"], disk["graph_params"]), DiskGraphDataset)
    config = {
        "family": "cgcnn",
        "cgcnn": {"hidden": 16, "n_conv": 2, "head_hidden": 16, "fusion": "early", "comp_hidden": 16, "lr": 3e-3},
        "max_epochs": 2,
        "seed": 0,
        "cpus": 1,
    }
    config["cgcnn"]["batch_size"] = 5
    histories = {}
    for name, data in (("memory", memory), ("disk", disk)):
        session = LocalSession()
        fit_family(copy.deepcopy(config), data, session)
        histories[name] = session.history
    assert [m["epoch"] for m in histories["disk"]] == [1, 2]
    assert np.isfinite(histories["disk"][-1]["val_mae"])
    assert histories["disk"] == histories["memory"]


def test_prepare_fold_writes_the_trial_graphs_under_the_cache_when_asked(data_dir, tmp_path):
    from matfusion.config import config_from_dict
    from matfusion.data.prepare import prepare_fold

    def cfg(store):
        return config_from_dict(
            {
                "name": "disk-store",
                "data": {"source": "matbench_phonons", "limit": 20, "data_dir": str(data_dir), "fold": 1},
                "features": {
                    "cutoff": 4.0,
                    "max_neighbors": 6,
                    "descriptors": ["magpie"],
                    "n_jobs": 1,
                    "cache_dir": str(tmp_path),
                    "graph_store": store,
                },
                "search": {"families": ["cgcnn"], "seed": 3},
            }
        )

    memory, disk = (prepare_fold(cfg(store), progress=False) for store in ("memory", "disk"))
    assert memory.graph_store_dir is None and "graph_store" not in memory.trial_data["train"]
    assert disk.graph_store_dir == tmp_path / "graph-shards"
    for part in ("train", "val"):
        index = disk.trial_data[part]["graph_store"]
        assert index["dir"].startswith(str(tmp_path / "graph-shards")) and index["n"] == len(disk.trial_data[part]["y"])
        np.testing.assert_array_equal(disk.trial_data[part]["row"], memory.trial_data[part]["row"])
        params = disk.trial_data["graph_params"]
        a, b = graph_dataset(memory.trial_data[part], params), graph_dataset(disk.trial_data[part], params)
        assert isinstance(b, DiskGraphDataset) and len(a) == len(b)
        for k in range(len(a)):
            assert_same_data(a[k], b[k])
    assert "graph_store" not in disk.test_part  # the driver's after-search evaluation keeps the arrays
