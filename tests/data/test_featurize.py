"""Crystal graphs, Magpie features, the feature cache and the parallel map: on small structures
made here, and (where real-data behaviour is the point) on 40 phonons structures."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from pymatgen.core import Lattice, Structure
from torch_geometric.data import Batch

from matfusion.config import DataConfig, FeaturesConfig
from matfusion.data import load_dataset
from matfusion.data.cache import FeatureCache, cache_key
from matfusion.data.crystal_graph import GraphSet, element_feature_table, gaussian_expansion, neighbor_graph
from matfusion.data.dataset import DataError, Dataset
from matfusion.data.descriptors import MAGPIE_WIDTH, magpie_columns, magpie_features
from matfusion.data.featurize import featurize
from matfusion.data.parallel import Failure, parallel_map
from matfusion.trainables.cgcnn import CGCNN

NACL_A = 5.64
NN1 = NACL_A / 2  # Na-Cl, 6 per atom
NN2 = NACL_A / np.sqrt(2)  # Na-Na / Cl-Cl, 12 per atom


def nacl() -> Structure:
    return Structure.from_spacegroup("Fm-3m", Lattice.cubic(NACL_A), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])


def lone_helium() -> Structure:
    return Structure(Lattice.cubic(20.0), ["He"], [[0.5, 0.5, 0.5]])


@pytest.fixture(scope="module")
def phonons40():
    return load_dataset(DataConfig(source="matbench_phonons", limit=40))


def toy_structures(n: int = 24, seed: int = 0) -> list[Structure]:
    """``n`` small crystals: rock salt (primitive), CsCl, simple-cubic Na (a = 5.5 A: its only
    neighbours within 6 A are at 5.5 A) and bcc Fe, each scaled and jiggled (seeded)."""
    rng = np.random.default_rng(seed)
    protos = [
        Structure(Lattice.from_parameters(3.99, 3.99, 3.99, 60, 60, 60), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]]),
        Structure(Lattice.cubic(4.12), ["Cs", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]]),
        Structure(Lattice.cubic(5.5), ["Na"], [[0, 0, 0]]),
        Structure(Lattice.cubic(2.87), ["Fe", "Fe"], [[0, 0, 0], [0.5, 0.5, 0.5]]),
    ]
    out = []
    for i in range(n):
        p = protos[i % len(protos)]
        lattice = Lattice(p.lattice.matrix * (1 + 0.04 * rng.random()))
        coords = p.frac_coords + (rng.normal(0, 0.01, p.frac_coords.shape) if i >= len(protos) else 0)
        out.append(Structure(lattice, p.species, coords))
    return out


def toy_dataset(n: int = 24, seed: int = 0, name: str = "toy") -> Dataset:
    return Dataset(
        name=name,
        ids=[f"{name}-{i}" for i in range(n)],
        structures=toy_structures(n, seed),
        targets=np.arange(n, dtype=float),
        target_name="y",
        content_hash=f"{name}-{n}-{seed}",
    )


@pytest.fixture(scope="module")
def toy24():
    return toy_dataset(24)


def assert_graphs_equal(a: GraphSet, b: GraphSet) -> None:
    for name, x in a.arrays().items():
        np.testing.assert_array_equal(x, b.arrays()[name], err_msg=name)
    assert (a.cutoff, a.max_neighbors) == (b.cutoff, b.max_neighbors)


def assert_features_equal(a, b) -> None:
    np.testing.assert_array_equal(a.descriptors, b.descriptors)  # NaN == NaN for assert_array_equal
    assert a.descriptor_columns == b.descriptor_columns
    assert_graphs_equal(a.graphs, b.graphs)


# --------------------------------------------------------------------------- neighbour graphs


def test_nacl_first_shell_only():
    s = nacl()
    assert len(s) == 8
    z, ei, dist, vec = neighbor_graph(s, cutoff=3.0, max_neighbors=100)
    assert z.tolist() == [site.specie.Z for site in s]
    np.testing.assert_allclose(np.linalg.norm(vec, axis=1), dist, atol=1e-4)
    assert ei.shape == (2, 8 * 6) and dist.shape == (8 * 6,)
    assert np.bincount(ei[1], minlength=8).tolist() == [6] * 8
    np.testing.assert_allclose(dist, NN1, atol=1e-4)
    # the first shell of rock salt is all unlike atoms
    assert np.all(z[ei[0]] != z[ei[1]])


def test_nacl_two_shells_and_max_neighbors():
    s = nacl()
    z, ei, dist, _ = neighbor_graph(s, cutoff=4.1, max_neighbors=100)
    assert np.bincount(ei[1], minlength=8).tolist() == [18] * 8
    for centre in range(8):
        d = np.sort(dist[ei[1] == centre])
        np.testing.assert_allclose(d[:6], NN1, atol=1e-4)
        np.testing.assert_allclose(d[6:], NN2, atol=1e-4)
        # second shell: like atoms
        mask = (ei[1] == centre) & (np.abs(dist - NN2) < 1e-3)
        assert np.all(z[ei[0][mask]] == z[centre])

    z, ei, dist, _ = neighbor_graph(s, cutoff=4.1, max_neighbors=12)
    assert np.bincount(ei[1], minlength=8).tolist() == [12] * 8
    for centre in range(8):
        d = np.sort(dist[ei[1] == centre])
        np.testing.assert_allclose(d[:6], NN1, atol=1e-4)  # all 6 nearest are kept
        np.testing.assert_allclose(d[6:], NN2, atol=1e-4)  # then 6 of the 12 second-shell ones


def test_edge_direction_is_neighbour_to_centre():
    # A at 0, B 1.9 A away on one side, C 2.0 A away on the other, in a big cell.
    # cutoff 3: A sees B and C; B and C see only A (B-C is 3.9 A).  max_neighbors=1: A keeps B.
    lat = Lattice.cubic(30.0)
    s = Structure(lat, ["Li", "O", "F"], lat.get_fractional_coords([[10, 10, 10], [11.9, 10, 10], [8.0, 10, 10]]))
    _, ei, dist, vec = neighbor_graph(s, cutoff=3.0, max_neighbors=1)
    edges = {(int(a), int(b)): (float(d), v) for a, b, d, v in zip(ei[0], ei[1], dist, vec)}
    assert set(edges) == {(1, 0), (0, 1), (0, 2)}  # (source=neighbour, target=centre)
    assert edges[(1, 0)][0] == pytest.approx(1.9, abs=1e-4)
    assert edges[(0, 2)][0] == pytest.approx(2.0, abs=1e-4)
    # bond vectors point from the centre to the neighbour
    np.testing.assert_allclose(edges[(1, 0)][1], [1.9, 0, 0], atol=1e-4)
    np.testing.assert_allclose(edges[(0, 1)][1], [-1.9, 0, 0], atol=1e-4)
    np.testing.assert_allclose(edges[(0, 2)][1], [2.0, 0, 0], atol=1e-4)
    assert np.bincount(ei[1]).max() == 1  # the cap applies per centre
    assert np.bincount(ei[0]).tolist() == [2, 1]  # A is the source of two edges


def test_isolated_atom_has_no_edges_but_a_valid_graph():
    z, ei, dist, vec = neighbor_graph(lone_helium(), cutoff=6.0, max_neighbors=12)
    assert z.tolist() == [2] and ei.shape == (2, 0) and dist.shape == (0,) and vec.shape == (0, 3)
    gs = GraphSet.from_parts([(z, ei, dist, vec), neighbor_graph(nacl(), 6.0, 12)], cutoff=6.0, max_neighbors=12)
    assert len(gs) == 2 and gs.num_edges(0) == 0 and gs.num_edges(1) == 8 * 12
    (data,) = gs.to_data_list([0], targets=np.array([1.5, 2.5]))
    data.validate(raise_on_error=True)
    assert data.num_nodes == 1
    assert data.edge_index.shape == (2, 0) and data.edge_attr.shape == (0, 40)
    assert data.x.shape == (1, element_feature_table().shape[1])
    assert data.y.tolist() == [[1.5]]

    torch.manual_seed(0)
    model = CGCNN(data.x.shape[1], data.edge_attr.shape[1], hidden=16, n_conv=2, head_hidden=16).eval()
    with torch.no_grad():
        out = model(Batch.from_data_list([data]))
        both = model(Batch.from_data_list(gs.to_data_list([0, 1])))
    assert out.shape == (1, 1) and torch.isfinite(out).all()
    assert both.shape == (2, 1) and torch.isfinite(both).all()
    # batching the isolated atom with another crystal does not change its prediction
    torch.testing.assert_close(both[0], out[0])


# --------------------------------------------------------------------------- node/edge features


def test_gaussian_expansion_shape_and_peaks():
    cutoff, bins = 6.0, 40
    centers = np.linspace(0.0, cutoff, bins)
    d = np.array([0.0, centers[10], centers[25], cutoff, 3.1])
    e = gaussian_expansion(d, cutoff, bins)
    assert e.shape == (5, bins) and e.dtype == np.float32
    assert np.argmax(e, axis=1).tolist() == [0, 10, 25, 39, int(np.argmin(np.abs(centers - 3.1)))]
    np.testing.assert_allclose(e[1, 10], 1.0, rtol=1e-6)
    step, width = centers[1], cutoff / bins  # default width
    np.testing.assert_allclose(e[1, 11], np.exp(-((step / width) ** 2)), rtol=1e-5)
    np.testing.assert_allclose(e[1, 9], e[1, 11], rtol=1e-5)
    wide = gaussian_expansion(d, cutoff, bins, width=1.0)
    assert wide[1, 11] > e[1, 11]
    assert gaussian_expansion(np.zeros(0), cutoff, bins).shape == (0, bins)


def test_element_feature_table():
    table = element_feature_table()
    assert table.shape[0] == 104 and table.shape[1] >= 25 + 18 + 9
    assert np.all(np.isfinite(table))
    assert not np.array_equal(table[11], table[17])  # Na vs Cl
    assert np.all(table[0] == 0)
    # one-hot period (row): Na and Cl both in period 3, H in period 1
    row_onehot = table[:, -9:]
    assert row_onehot[11].argmax() == row_onehot[17].argmax() == 2 and row_onehot[1].argmax() == 0
    assert np.all(row_onehot[1:].sum(axis=1) == 1)


def test_magpie_width_on_real_structures(phonons40):
    cols = magpie_columns()
    assert len(cols) == MAGPIE_WIDTH == 132 and len(set(cols)) == 132
    items = [nacl(), *phonons40.structures[:4]]
    m = magpie_features(items)
    assert m.shape == (5, 132)
    assert np.isfinite(m).mean() > 0.9
    # NaCl: mean atomic number (11 + 17) / 2, range 6
    assert m[0, cols.index("MagpieData mean Number")] == pytest.approx(14.0)
    assert m[0, cols.index("MagpieData range Number")] == pytest.approx(6.0)
    # a structure and its composition give the same features
    np.testing.assert_array_equal(magpie_features([items[1].composition]), m[1:2])


# --------------------------------------------------------------------------- featurize + cache


def test_featurize_then_cache_hit(phonons40, tmp_path):
    cfg = FeaturesConfig(cache_dir=str(tmp_path), n_jobs=1)
    first = featurize(phonons40, cfg, progress=False)
    assert not first.from_cache
    # the descriptor matrix: Magpie's 132 columns, then the default structural sets
    from matfusion.data.descriptors import DEFAULT_STRUCTURE_SETS, width_of

    assert first.descriptors.shape == (40, width_of(DEFAULT_STRUCTURE_SETS)) and len(first.graphs) == 40
    assert first.descriptor_sets == DEFAULT_STRUCTURE_SETS
    np.testing.assert_array_equal(first.descriptors[:5, :132], magpie_features(phonons40.structures[:5]))
    for g in range(40):  # same graphs as building them one by one
        z, ei, dist, vec = neighbor_graph(phonons40.structures[g], cfg.cutoff, cfg.max_neighbors)
        gz, gei, gd, gv = first.graphs.graph(g)
        np.testing.assert_array_equal(gv, vec)
        np.testing.assert_array_equal(gz, z)
        np.testing.assert_array_equal(gei, ei)
        np.testing.assert_array_equal(gd, dist)
    assert sorted(p.name.split("-")[0] for p in tmp_path.glob("*.npz")) == ["desc"] * 3 + ["graph", "magpie"]

    second = featurize(phonons40, cfg, progress=False)
    assert second.from_cache
    assert_features_equal(first, second)


def test_tabular_only_featurization_builds_no_graphs(toy24, tmp_path):
    """A search of tabular families only asks for no graphs: none are built or cached, and the
    descriptor matrix is the same as with graphs."""
    cfg = FeaturesConfig(cache_dir=str(tmp_path), n_jobs=1)
    tab = featurize(toy24, cfg, progress=False, graphs=False)
    assert tab.graphs is None and not list(tmp_path.glob("graph-*.npz"))
    full = featurize(toy24, cfg, progress=False)
    assert full.graphs is not None and len(full.graphs) == 24
    np.testing.assert_array_equal(tab.descriptors, full.descriptors)


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _flip_middle(path):
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    for i in range(mid, mid + 16):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("kind", ["graph", "magpie"])
@pytest.mark.parametrize("damage", [_truncate, _flip_middle], ids=["truncate", "flip-bytes"])
def test_corrupt_cache_is_detected_and_rebuilt(toy24, tmp_path, kind, damage):
    cfg = FeaturesConfig(cache_dir=str(tmp_path), n_jobs=1)
    original = featurize(toy24, cfg, progress=False)
    (victim,) = tmp_path.glob(f"{kind}-*.npz")
    damage(victim)

    cache = FeatureCache(tmp_path)
    rebuilt = featurize(toy24, cfg, progress=False, cache=cache)
    assert cache.rebuilt == [victim.stem]
    assert not rebuilt.from_cache
    assert_features_equal(original, rebuilt)
    assert victim.is_file()

    again_cache = FeatureCache(tmp_path)
    again = featurize(toy24, cfg, progress=False, cache=again_cache)
    assert again.from_cache and again_cache.rebuilt == []
    assert_features_equal(original, again)


def test_cache_key_depends_on_cutoff(toy24, tmp_path):
    h = toy24.content_hash
    assert cache_key("graph", h, {"cutoff": 6.0, "max_neighbors": 12}) != cache_key(
        "graph", h, {"cutoff": 5.0, "max_neighbors": 12}
    )
    assert cache_key("graph", h, {"cutoff": 6.0, "max_neighbors": 12}) == cache_key(
        "graph", h, {"max_neighbors": 12, "cutoff": 6.0}
    )

    six = featurize(toy24, FeaturesConfig(cache_dir=str(tmp_path), n_jobs=1), progress=False)
    five = featurize(toy24, FeaturesConfig(cache_dir=str(tmp_path), n_jobs=1, cutoff=5.0), progress=False)
    assert not five.from_cache  # the 6 A graphs must not be reused for 5 A
    assert len(list(tmp_path.glob("graph-*.npz"))) == 2 and len(list(tmp_path.glob("magpie-*.npz"))) == 1
    assert five.graphs.cutoff == 5.0
    assert len(five.graphs.distance) < len(six.graphs.distance)
    assert five.graphs.distance.max() <= 5.0 + 1e-5 and six.graphs.distance.max() > 5.0
    np.testing.assert_array_equal(five.descriptors, six.descriptors)


def test_parallel_equals_serial(toy24, tmp_path):
    cfg = FeaturesConfig(
        n_jobs=1, line_graph=True, descriptors=["magpie", "stoichiometry", "density", "symmetry", "bonds"]
    )
    serial = featurize(toy24, cfg.model_copy(update={"cache_dir": str(tmp_path / "serial")}), progress=False)
    parallel = featurize(
        toy24, cfg.model_copy(update={"cache_dir": str(tmp_path / "parallel"), "n_jobs": 2}), progress=False
    )
    assert not serial.from_cache and not parallel.from_cache
    assert_features_equal(serial, parallel)
    assert serial.graphs.has_line_graph and np.isfinite(serial.descriptors).all()


def test_graphset_subset_round_trip():
    structures = [
        nacl(),
        lone_helium(),
        nacl().copy().scale_lattice(200.0),
        Structure(Lattice.cubic(3.0), ["Cu"], [[0, 0, 0]]),
    ]
    parts = [neighbor_graph(s, 4.0, 8) for s in structures]
    gs = GraphSet.from_parts(parts, cutoff=4.0, max_neighbors=8)
    assert len(gs) == 4
    order = [3, 1, 0, 3]
    sub = gs.subset(order)
    assert len(sub) == 4 and (sub.cutoff, sub.max_neighbors) == (4.0, 8)
    for i, g in enumerate(order):
        for mine, theirs in zip(sub.graph(i), parts[g]):
            np.testing.assert_array_equal(mine, theirs)
    # subset of everything, in order, is the same packing
    assert_graphs_equal(gs.subset(range(4)), gs)
    # through the arrays (as the cache stores them) and back
    assert_graphs_equal(GraphSet(**sub.arrays(), cutoff=4.0, max_neighbors=8), sub)
    assert len(gs.subset([])) == 0


# --------------------------------------------------------------------------- the parallel map


def _inverse(x: float) -> float:
    return 1.0 / x


def test_parallel_map_keeps_order_and_reports_each_failing_item():
    items = [float(i % 7) for i in range(100)]  # 0.0 at positions 0, 7, 14, ...
    serial, serial_failed = parallel_map(_inverse, items, n_jobs=1)
    forked, forked_failed = parallel_map(_inverse, items, n_jobs=2, chunk=8)  # 13 chunks: forks
    assert forked == serial and forked_failed == serial_failed
    zeros = [i for i, x in enumerate(items) if x == 0]
    assert [f.index for f in forked_failed] == zeros and len(zeros) == 15
    assert forked_failed[0] == Failure(0, "ZeroDivisionError", "float division by zero")
    assert all(forked[i] is None for i in zeros)
    assert forked[1] == 1.0 and forked[99] == pytest.approx(1 / 1)  # 99 % 7 == 1
    assert parallel_map(_inverse, [], n_jobs=2) == ([], [])


def test_default_workers_are_the_usable_cores_not_the_hosts():
    """0 workers means the cores this process may use: its affinity, capped by a cgroup quota
    (a container limited to 2 of 64 cores must not start 64 workers)."""
    import os

    from matfusion.data.parallel import default_n_jobs, usable_cores

    cores = usable_cores()
    assert 1 <= cores <= len(os.sched_getaffinity(0)) <= (os.cpu_count() or 1)
    assert default_n_jobs(0) == cores and default_n_jobs(3) == 3
    try:
        quota, period = open("/sys/fs/cgroup/cpu.max").read().split()[:2]
    except OSError:
        quota = "max"
    if quota == "max":
        assert cores == len(os.sched_getaffinity(0))
    else:
        assert cores == max(1, min(len(os.sched_getaffinity(0)), int(float(quota) / float(period))))


def test_parallel_map_hands_the_work_to_forked_children_unpickled():
    """A closure over an unpicklable object works with 2 workers: fn and items reach the
    children through the fork, not through pickling; the parent keeps no task state."""
    import os
    import threading

    from matfusion.data import parallel

    lock = threading.Lock()  # cannot be pickled

    def pid_and_square(x):
        with lock:
            return os.getpid(), x * x

    values, failures = parallel_map(pid_and_square, list(range(60)), n_jobs=2, chunk=5)
    assert not failures and [v[1] for v in values] == [x * x for x in range(60)]
    assert os.getpid() not in {v[0] for v in values}  # computed in the children
    assert parallel._TASK is None


def test_a_structure_the_graph_builder_fails_on_is_named(toy24, tmp_path):
    from pymatgen.core import Composition

    bad = Dataset(
        name="mixed",
        ids=["a", "b", "c"],
        structures=[nacl(), Composition("NaCl"), nacl()],
        targets=np.zeros(3),
        target_name="y",
        content_hash="mixed-3",
    )
    with pytest.raises(DataError, match=r"mixed: cannot build the crystal graph of 1 structure\(s\): row 1 \(id b\)"):
        featurize(bad, FeaturesConfig(cache_dir=str(tmp_path), n_jobs=1, descriptors=["magpie"]), progress=False)


def test_no_import_circle_in_the_data_package():
    """The imports between matfusion.data modules (at the top or inside functions) form no
    cycle (featurize uses descriptors, never the reverse), and each module imports alone in a
    fresh interpreter."""
    import ast
    import os
    import subprocess
    import sys
    from pathlib import Path

    import matfusion.data

    root = Path(matfusion.data.__file__).parent
    modules = sorted(p.stem for p in root.glob("*.py") if p.stem != "__init__")
    graph = {}
    for m in modules:
        deps = set()
        for node in ast.walk(ast.parse((root / f"{m}.py").read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                if node.module:
                    deps.add(node.module.split(".")[0])
                else:
                    deps.update(a.name for a in node.names)
        graph[m] = deps & set(modules)
    assert "featurize" not in graph["descriptors"] and "descriptors" in graph["featurize"]

    def visit(m, path):
        assert m not in path, f"import circle: {' -> '.join(path + [m])}"
        for d in graph[m]:
            visit(d, path + [m])

    for m in modules:
        visit(m, [])
    for m in modules:
        subprocess.run(
            [sys.executable, "-c", f"import matfusion.data.{m}"],
            check=True,
            timeout=120,
            env={**os.environ, "PYTHONPATH": str(root.parents[1])},
        )


def test_parallel_map_does_not_fork_a_process_that_runs_ray():
    """Forking beside Ray's threads can hang the child: with Ray up, the items run in this process."""
    import os

    import ray

    from matfusion.data.parallel import can_fork

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        assert not can_fork()
        values, failures = parallel_map(lambda x: (os.getpid(), x + 1), list(range(40)), n_jobs=2, chunk=5)
        assert not failures and {v[0] for v in values} == {os.getpid()} and [v[1] for v in values] == list(range(1, 41))
    finally:
        if started:
            ray.shutdown()
    assert can_fork()


def test_pool_workers_end_by_sigterm_whatever_handler_the_parent_has():
    """The pool ends its workers with SIGTERM: a worker must not keep a handler inherited from the
    parent that returns (it would wait for tasks forever and the pool's exit would join it)."""
    import signal

    from matfusion.data.parallel import can_fork, parallel_map

    if not can_fork():
        pytest.skip("no fork on this platform")
    saved = signal.signal(signal.SIGTERM, lambda signum, frame: None)
    try:
        values, failures = parallel_map(
            lambda _: (
                signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
                and signal.SIGTERM not in signal.pthread_sigmask(signal.SIG_BLOCK, [])
            ),
            list(range(12)),
            n_jobs=2,
            chunk=2,
        )
    finally:
        signal.signal(signal.SIGTERM, saved)
    assert failures == [] and values == [True] * 12
    assert signal.SIGTERM not in signal.pthread_sigmask(signal.SIG_BLOCK, [])  # the parent's mask is back


def test_a_sigterm_before_the_workers_start_up_still_ends_it():
    """The race behind a CI hang: the pool sent SIGTERM to a worker just forked, before its start-up
    had put the default action back, and the handler it inherited swallowed it.  Workers are forked
    with SIGTERM blocked, so such a signal waits and ends the worker at its start-up.  Here a child
    forked the same way gets SIGTERM under a handler that returns, then runs the start-up."""
    import signal

    from matfusion.data import parallel

    if not parallel.can_fork():
        pytest.skip("no fork on this platform")
    saved = signal.signal(signal.SIGTERM, lambda signum, frame: None)
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    try:
        pid = os.fork()
        if pid == 0:  # the child: as a pool worker before its start-up
            try:
                os.kill(os.getpid(), signal.SIGTERM)  # pending: blocked
                parallel._install(len, [])
            finally:
                os._exit(3)  # reached only if the SIGTERM was swallowed
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
        signal.signal(signal.SIGTERM, saved)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGTERM, status
