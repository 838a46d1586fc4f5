"""Descriptor sets: the tabular feature matrix of the tabular families (rf, lgbm, et) and of the
descriptor branch of fused GNNs.

A descriptor set turns one structure (or composition) into a fixed-width float vector.  The
sets, chosen with ``features.descriptors`` (in this order in the matrix):

=================  =========  ==============================================================
name               needs      what
=================  =========  ==============================================================
``magpie``         comp.      132 Magpie statistics of elemental properties (matminer
                              ``ElementProperty``; computed and cached by ``featurize``)
``stoichiometry``  comp.      6 p-norms of the element fractions (matminer ``Stoichiometry``)
``density``        structure  density, volume per atom, packing fraction (matminer
                              ``DensityFeatures``)
``symmetry``       structure  space-group number, crystal-system int (matminer's 1 cubic ..
                              7 triclinic), centrosymmetric, point-group order (spglib via
                              pymatgen; all independent of the cell choice)
``bonds``          structure  site statistics of nearest-neighbour distance, coordination
                              number and first-shell bond lengths, also relative to the sum of
                              covalent radii (our own periodic neighbour list, no CrystalNN)
=================  =========  ==============================================================

``features.descriptors: null`` (the default) means ``magpie, density, symmetry, bonds`` for a
dataset with structures and ``magpie`` for a composition-only one (:func:`resolve_sets`).

NaN handling never drops a row: a value a featurizer cannot compute (a failing spglib call,
an isolated atom, an element without a covalent radius) stays NaN (inf becomes NaN too), the
number of NaN cells and rows is logged per set, tree models (rf, et, lgbm) take NaN natively,
and models that cannot are given :class:`MedianImputer` (fitted on their training rows only)
or the standardizer of the fused GNNs (NaN -> 0 = the training mean).

Each structural set is cached on its own (``desc-<name>`` files keyed by the dataset's content
hash, the set's name and its version), so adding a set to the config featurizes only that set.
"""
from __future__ import annotations

import logging
import multiprocessing as mp
import os
import time
import warnings
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Optional, Sequence

import numpy as np

log = logging.getLogger("matfusion.data")

# neighbours searched within this radius for the bond statistics (Angstrom); a site with no
# neighbour inside keeps NaN for its distances (rare: isolated atoms in very sparse cells)
BOND_RADIUS = 6.0
# a neighbour is in the first coordination shell when its distance <= (1 + tol) * nearest
SHELL_TOLERANCE = 0.15


class DescriptorError(ValueError):
    """A descriptor set that cannot be used (unknown name, structures missing); names it."""


# -- the featurizers of one structure ---------------------------------------------------------

def _as_composition(item):
    return item.composition if hasattr(item, "composition") else item


@lru_cache(maxsize=1)
def _stoichiometry():
    from matminer.featurizers.composition import Stoichiometry

    return Stoichiometry()


def stoichiometry_features(item) -> np.ndarray:
    """6 p-norms (p = 0, 2, 3, 5, 7, 10) of the element fractions."""
    return np.asarray(_stoichiometry().featurize(_as_composition(item)), dtype=np.float64)


@lru_cache(maxsize=1)
def _density():
    from matminer.featurizers.structure import DensityFeatures

    return DensityFeatures()


def density_features(structure) -> np.ndarray:
    """density (g/cm^3), volume per atom (A^3), packing fraction (atomic spheres / cell);
    rounded to 6 decimals like the bond statistics."""
    return np.round(np.asarray(_density().featurize(structure), dtype=np.float64), 6)


SYMMETRY_COLUMNS = ("spacegroup_num", "crystal_system_int", "is_centrosymmetric", "point_group_order")
# space-group number ranges of the crystal systems, numbered as matminer's GlobalSymmetryFeatures
_SYSTEMS = ((2, 7), (15, 6), (74, 5), (142, 4), (167, 3), (194, 2), (230, 1))


@lru_cache(maxsize=64)
def point_group_order(symbol: str) -> int:
    """Number of operations of the crystallographic point group ``symbol`` (Hermann-Mauguin)."""
    from pymatgen.symmetry.groups import PointGroup

    return len(PointGroup(symbol).symmetry_ops)


def symmetry_features(structure, symprec: float = 0.01) -> np.ndarray:
    """space-group number, crystal system (1 cubic .. 7 triclinic), centrosymmetric (0/1) and
    point-group order of the space group spglib finds (``symprec`` 0.01 A).  All four depend on
    the crystal only, not on the cell: a primitive cell, a conventional one and a supercell give
    the same values (matminer's number of symmetry operations does not: it counts the operations
    of the given cell)."""
    from pymatgen.symmetry.analyzer import SpacegroupAnalyzer

    data = SpacegroupAnalyzer(structure, symprec=symprec).get_symmetry_dataset()
    number = int(data.number)
    symbol = str(data.pointgroup)
    centro = symbol in _CENTROSYMMETRIC
    system = next(code for top, code in _SYSTEMS if number <= top)
    return np.array([number, system, float(centro), point_group_order(symbol)], dtype=np.float64)


# the 11 centrosymmetric (Laue) point groups
_CENTROSYMMETRIC = frozenset({"-1", "2/m", "mmm", "4/m", "4/mmm", "-3", "-3m", "6/m", "6/mmm", "m-3", "m-3m"})


BOND_COLUMNS = (
    "nn_dist_min", "nn_dist_mean", "nn_dist_max", "nn_dist_std",
    "cn_min", "cn_mean", "cn_max", "cn_std",
    "bond_mean", "bond_std", "bond_spread_mean",
    "nn_rel_cov_min", "nn_rel_cov_mean", "nn_rel_cov_max",  # min over the first shell of d / (r_i + r_j)
    "n_within_radius_mean", "n_sites_log",
)


@lru_cache(maxsize=1)
def _covalent_radii() -> np.ndarray:
    """Covalent radius (A) per atomic number (Magpie's table, pm -> A); NaN where unknown."""
    from matminer.utils.data import MagpieData
    from pymatgen.core.periodic_table import Element

    table = MagpieData().all_elemental_props.get("CovalentRadius", {})
    out = np.full(119, np.nan)
    for z in range(1, 119):
        try:
            v = table.get(Element.from_Z(z).symbol)
        except ValueError:
            continue
        if v is not None and np.isfinite(float(v)) and float(v) > 0:
            out[z] = float(v) / 100.0
    return out


def _stats(values: np.ndarray) -> tuple[float, float, float, float]:
    v = values[np.isfinite(values)]
    if not len(v):
        return (np.nan,) * 4
    return float(v.min()), float(v.mean()), float(v.max()), float(v.std())


def bond_features(structure, radius: float = BOND_RADIUS, tolerance: float = SHELL_TOLERANCE) -> np.ndarray:
    """Site statistics of the local environment from the periodic neighbour list (radius
    ``radius``): per site its nearest-neighbour distance d0, its coordination number (neighbours
    within ``(1 + tolerance) * d0``), the mean and the relative spread ((max - min) / mean) of
    those first-shell bond lengths, d0 over the sum of the two covalent radii, and the number of
    neighbours within ``radius``; then min / mean / max / std over the sites, and log(n sites)."""
    n = len(structure)
    centers, neighbors, _, dist = structure.get_neighbor_list(r=radius)
    d0 = np.full(n, np.nan)
    cn = np.full(n, np.nan)
    bond_mean = np.full(n, np.nan)
    spread = np.full(n, np.nan)
    rel_cov = np.full(n, np.nan)
    count = np.zeros(n)
    shell_bonds = []
    if len(dist):
        z = np.array([site.specie.Z for site in structure])
        radii = _covalent_radii()[np.clip(z, 0, 118)]
        order = np.lexsort((dist, centers))
        centers, neighbors, dist = centers[order], neighbors[order], dist[order]
        starts = np.searchsorted(centers, np.arange(n), side="left")
        stops = np.searchsorted(centers, np.arange(n), side="right")
        for i in range(n):
            a, b = starts[i], stops[i]
            count[i] = b - a
            if b == a:
                continue
            d = dist[a:b]
            d0[i] = d[0]
            shell = d <= (1.0 + tolerance) * d[0]
            bonds = d[shell]
            cn[i] = float(shell.sum())
            bond_mean[i] = float(bonds.mean())
            spread[i] = float((bonds.max() - bonds.min()) / bonds.mean())
            shell_bonds.append(bonds)
            # over the whole first shell: no dependence on the order of equidistant neighbours
            rel_cov[i] = float(np.min(bonds / (radii[i] + radii[neighbors[a:b][shell]])))
    all_bonds = np.concatenate(shell_bonds) if shell_bonds else np.zeros(0)
    out = [*_stats(d0), *_stats(cn),
           float(np.nanmean(bond_mean)) if np.isfinite(bond_mean).any() else np.nan,
           float(all_bonds.std()) if len(all_bonds) else np.nan,
           float(np.nanmean(spread)) if np.isfinite(spread).any() else np.nan]
    rc = _stats(rel_cov)
    out += [rc[0], rc[1], rc[2], float(count.mean()), float(np.log(n))]
    # rounded: float noise (a std of 1e-15 for equal bonds, 1e-8 A from a CIF round trip) must
    # not decide a tree split
    return np.round(np.asarray(out, dtype=np.float64), 6)


@dataclass(frozen=True)
class DescriptorSet:
    """One descriptor set: ``featurize(item) -> (width,)``; ``structural`` sets need structures."""

    name: str
    columns: tuple
    featurize: Optional[Callable]  # None for magpie (computed by featurize.magpie_features)
    structural: bool
    version: int = 1


def _magpie_columns() -> tuple:
    from .featurize import magpie_columns

    return tuple(magpie_columns())


@lru_cache(maxsize=1)
def registry() -> dict:
    """name -> :class:`DescriptorSet`, in matrix order."""
    return {
        "magpie": DescriptorSet("magpie", _magpie_columns(), None, structural=False),
        "stoichiometry": DescriptorSet("stoichiometry", ("0-norm", "2-norm", "3-norm", "5-norm", "7-norm", "10-norm"),
                                       stoichiometry_features, structural=False),
        "density": DescriptorSet("density", ("density", "vpa", "packing_fraction"), density_features, structural=True,
                                 version=2),
        "symmetry": DescriptorSet("symmetry", SYMMETRY_COLUMNS, symmetry_features, structural=True, version=2),
        "bonds": DescriptorSet("bonds", BOND_COLUMNS, bond_features, structural=True, version=2),
    }


DESCRIPTOR_SETS = ("magpie", "stoichiometry", "density", "symmetry", "bonds")
DEFAULT_STRUCTURE_SETS = ("magpie", "density", "symmetry", "bonds")
DEFAULT_COMPOSITION_SETS = ("magpie",)


def resolve_sets(names: Optional[Sequence[str]], has_structures: bool) -> list[str]:
    """The descriptor sets to compute, in matrix order (the registry's), without duplicates.
    ``None``: the default for the data (structures: magpie + structural sets; compositions:
    magpie).  A structural set on composition-only data is an error naming it."""
    if names is None:
        return list(DEFAULT_STRUCTURE_SETS if has_structures else DEFAULT_COMPOSITION_SETS)
    names = list(names)
    if not names:
        raise DescriptorError("features.descriptors is empty; name at least one set of "
                              f"{', '.join(DESCRIPTOR_SETS)} (or leave it out for the default)")
    unknown = [n for n in names if n not in DESCRIPTOR_SETS]
    if unknown:
        raise DescriptorError(f"features.descriptors: unknown set(s) {unknown}; known: {', '.join(DESCRIPTOR_SETS)}")
    if not has_structures:
        structural = [n for n in names if registry()[n].structural]
        if structural:
            raise DescriptorError(f"features.descriptors: {structural} need crystal structures, and this dataset has "
                                  "compositions only (use magpie and/or stoichiometry)")
    return [n for n in DESCRIPTOR_SETS if n in names]


def columns_of(names: Sequence[str]) -> list[str]:
    """Column names of the matrix of the given sets (magpie columns keep their matminer names;
    the others are prefixed with their set's name)."""
    out = []
    for n in names:
        cols = registry()[n].columns
        out.extend(cols if n == "magpie" else [f"{n}:{c}" for c in cols])
    return out


def width_of(names: Sequence[str]) -> int:
    return sum(len(registry()[n].columns) for n in names)


def infer_sets(width: int, has_structures: bool = True) -> list[str]:
    """The descriptor sets of a matrix of ``width`` columns, for models saved without their
    names: magpie alone, or the default set for structures.  Raises naming the width."""
    for candidate in (DEFAULT_COMPOSITION_SETS, DEFAULT_STRUCTURE_SETS if has_structures else ()):
        if candidate and width_of(candidate) == width:
            return list(candidate)
    raise DescriptorError(f"cannot tell which descriptor sets make {width} columns; pass the descriptor set names")


# -- a set over many items (parallel), with its failures counted ------------------------------

def _featurize_one(fz: Callable, item, width: int) -> tuple[np.ndarray, bool]:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            v = np.asarray(fz(item), dtype=np.float64).reshape(-1)
        if v.shape != (width,):
            raise ValueError(f"got {v.shape[0]} values, expected {width}")
        return np.where(np.isfinite(v), v, np.nan), False
    except Exception:  # noqa: BLE001 - a featurizer failing on one structure leaves NaN, the row stays
        return np.full(width, np.nan), True


_WORK: dict = {}


def _chunk(bounds: tuple[int, int]):
    start, stop = bounds
    out, failed = [], 0
    for item in _WORK["items"][start:stop]:
        row = []
        for name in _WORK["names"]:
            ds = registry()[name]
            v, bad = _featurize_one(ds.featurize, item, len(ds.columns))
            row.append(v)
            failed += bad
        out.append(np.concatenate(row) if row else np.zeros(0))
    return start, np.array(out).reshape(stop - start, -1), failed


def compute_sets(items: Sequence, names: Sequence[str], n_jobs: int = 1, progress: bool = False) -> dict:
    """``{name: (n, width)}`` for each non-magpie set in ``names`` (NaN where a value could not be
    computed; an exception of a featurizer on one item leaves that item's set NaN)."""
    names = [n for n in names if n != "magpie"]
    if not names or not len(items):
        return {n: np.zeros((len(items), len(registry()[n].columns))) for n in names}
    from tqdm.auto import tqdm

    n = len(items)
    width = width_of(names)
    chunk = max(1, min(64, n // (4 * max(1, n_jobs)) or 1))
    bounds = [(i, min(n, i + chunk)) for i in range(0, n, chunk)]
    for name in names:  # build the featurizers (and lru caches) before forking
        registry()[name]
    _covalent_radii()
    _WORK.clear()
    _WORK.update(items=items, names=names)
    matrix = np.full((n, width), np.nan)
    failed = 0
    bar = tqdm(total=n, desc=f"descriptors ({', '.join(names)})", unit="struct", disable=not progress)
    try:
        if n_jobs > 1 and n > 2 * chunk and "fork" in mp.get_all_start_methods():
            with mp.get_context("fork").Pool(n_jobs) as pool:
                for start, block, bad in pool.imap_unordered(_chunk, bounds):
                    matrix[start:start + len(block)] = block
                    failed += bad
                    bar.update(len(block))
        else:
            for b in bounds:
                start, block, bad = _chunk(b)
                matrix[start:start + len(block)] = block
                failed += bad
                bar.update(len(block))
    finally:
        bar.close()
        _WORK.clear()
    if failed:
        log.warning("descriptors: %d featurizer call(s) failed on a structure; their values are NaN (rows kept)", failed)
    out, col = {}, 0
    for name in names:
        w = len(registry()[name].columns)
        out[name] = matrix[:, col:col + w]
        col += w
    return out


def descriptor_matrix(items: Sequence, names: Sequence[str], magpie: Optional[np.ndarray] = None,
                      n_jobs: int = 1) -> np.ndarray:
    """The (n, width) matrix of ``names`` for ``items`` (what a saved model computes at predict
    time); ``magpie`` may pass the already computed Magpie block."""
    blocks = compute_sets(items, names, n_jobs=n_jobs)
    parts = []
    for name in names:
        if name == "magpie":
            if magpie is None:
                from .featurize import magpie_features

                magpie = magpie_features(list(items))
            parts.append(np.asarray(magpie, dtype=np.float64))
        else:
            parts.append(blocks[name])
    return np.hstack(parts) if parts else np.zeros((len(items), 0))


def cached_matrix(dataset, names: Sequence[str], magpie: np.ndarray, cache, n_jobs: int = 1,
                  progress: bool = False) -> np.ndarray:
    """The descriptor matrix of every row of ``dataset``: each non-magpie set loaded from the
    feature cache or computed (only the missing sets) and saved; NaN counts logged per set."""
    from .cache import cache_key

    keys = {n: cache_key(f"desc-{n}", dataset.content_hash,
                         {"set": n, "version": registry()[n].version, "width": len(registry()[n].columns)})
            for n in names if n != "magpie"}
    blocks = {}
    for n, key in keys.items():
        arrays = cache.load(key)
        if arrays is not None and arrays["x"].shape == (len(dataset), len(registry()[n].columns)):
            blocks[n] = arrays["x"]
    missing = [n for n in keys if n not in blocks]
    if missing:
        t0 = time.time()
        fresh = compute_sets(dataset.structures, missing, n_jobs=n_jobs, progress=progress)
        log.info("descriptors %s: %.1f ms per structure", missing, 1e3 * (time.time() - t0) / max(1, len(dataset)))
        for n in missing:
            cache.save(keys[n], {"x": fresh[n]})
            blocks[n] = fresh[n]
    parts = []
    for n in names:
        block = np.asarray(magpie if n == "magpie" else blocks[n], dtype=np.float64)
        nan = ~np.isfinite(block)
        if nan.any():
            log.info("descriptors %s: %d NaN values in %d of %d rows (kept: trees take NaN, other models impute)",
                     n, int(nan.sum()), int(nan.any(axis=1).sum()), len(block))
        parts.append(np.where(nan, np.nan, block))
    return np.hstack(parts)


class MedianImputer:
    """Fills NaN with each column's median over the rows it was fitted on (0 for a column that is
    NaN everywhere); ``n_imputed_`` counts the cells filled by the last ``transform``."""

    def fit(self, X: np.ndarray) -> "MedianImputer":
        X = np.asarray(X, dtype=np.float64)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            med = np.nanmedian(np.where(np.isfinite(X), X, np.nan), axis=0)
        self.median_ = np.where(np.isfinite(med), med, 0.0)
        return self

    def transform(self, X: np.ndarray) -> np.ndarray:
        X = np.asarray(X, dtype=np.float64)
        bad = ~np.isfinite(X)
        self.n_imputed_ = int(bad.sum())
        return np.where(bad, self.median_[None, :], X)

    def fit_transform(self, X: np.ndarray) -> np.ndarray:
        return self.fit(X).transform(X)


def default_n_jobs(n_jobs: int = 0) -> int:
    return n_jobs or os.cpu_count() or 1
