"""Descriptor sets: the tabular feature matrix of the tabular families (rf, lgbm, et) and of the
descriptor branch of fused GNNs.

A descriptor set turns one structure (or composition) into a fixed-width float vector.  The
sets, chosen with ``features.descriptors`` (in this order in the matrix):

=================  =========  ==============================================================
name               needs      what
=================  =========  ==============================================================
``magpie``         comp.      132 Magpie statistics of elemental properties (matminer
                              ``ElementProperty``, magpie preset)
``stoichiometry``  comp.      6 p-norms of the element fractions (matminer ``Stoichiometry``)
``density``        structure  density, volume per atom, packing fraction (matminer
                              ``DensityFeatures``)
``symmetry``       structure  space-group number, crystal-system int (matminer's 1 cubic ..
                              7 triclinic), centrosymmetric, point-group order (spglib via
                              pymatgen; all independent of the cell choice)
``bonds``          structure  site statistics of nearest-neighbour distance, coordination
                              number and first-shell bond lengths, also relative to the sum of
                              covalent radii (our own periodic neighbour list, no CrystalNN)
``chgnet``         structure  64-dim crystal feature of the pretrained CHGNet potential
                              (optional: ``pip install "matfusion[chgnet]"``; opt-in, never in
                              the default; batched, see :mod:`~matfusion.data.chgnet_embedding`)
=================  =========  ==============================================================

``features.descriptors: null`` (the default) means ``magpie, density, symmetry, bonds`` for a
dataset with structures and ``magpie`` for a composition-only one (:func:`resolve_sets`).

NaN handling never drops a row: a value a featurizer cannot compute (a failing spglib call,
an isolated atom, an element without a covalent radius) stays NaN (inf becomes NaN too), the
number of NaN cells and rows is logged per set, tree models (rf, et, lgbm) take NaN natively,
and models that cannot are given :class:`MedianImputer` (fitted on their training rows only)
or the standardizer of the fused GNNs (NaN -> 0 = the training mean).

Every set is computed by the same machinery (:func:`compute_sets`: one pass over the items with
:func:`~matfusion.data.parallel.parallel_map`, every missing set per item) and cached on its own
(:func:`cached_blocks` / :func:`save_block`; ``desc-<name>`` files keyed by the dataset's content hash, the set's name
and its version; Magpie keeps the ``magpie-`` key it had before it joined the registry, so the
caches already on disk stay valid), so adding a set to the config featurizes only that set.
A set with a ``batch`` function (chgnet) is computed by it, over all the items at once (it spreads
its own batches over workers), after the per-item sets' pass.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Callable, Optional, Sequence

import numpy as np

from ..config import DESCRIPTOR_SETS  # the set names of the schema; registry() implements each
from . import chgnet_embedding
from .cache import cache_key as _cache_key
from .parallel import parallel_map

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


MAGPIE_WIDTH = 132


@lru_cache(maxsize=1)
def _magpie():
    from matminer.featurizers.composition import ElementProperty

    return ElementProperty.from_preset("magpie", impute_nan=False)


@lru_cache(maxsize=1)
def _magpie_columns() -> tuple[str, ...]:
    return tuple(_magpie().feature_labels())


def magpie_columns() -> list[str]:
    """The 132 Magpie column names (matminer's labels, e.g. ``MagpieData mean Number``)."""
    return list(_magpie_columns())


def magpie_vector(item) -> np.ndarray:
    """132 Magpie statistics (minimum, maximum, range, mean, average deviation, mode of 22
    elemental properties) of a structure's or composition's elements."""
    return np.asarray(_magpie().featurize(_as_composition(item)), dtype=np.float64)


def magpie_features(items) -> np.ndarray:
    """(n, 132) Magpie features of structures or compositions (NaN where one cannot be computed)."""
    return compute_sets(items, ["magpie"])["magpie"]


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
    "nn_dist_min",
    "nn_dist_mean",
    "nn_dist_max",
    "nn_dist_std",
    "cn_min",
    "cn_mean",
    "cn_max",
    "cn_std",
    "bond_mean",
    "bond_std",
    "bond_spread_mean",
    "nn_rel_cov_min",
    "nn_rel_cov_mean",
    "nn_rel_cov_max",  # min over the first shell of d / (r_i + r_j)
    "n_within_radius_mean",
    "n_sites_log",
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
    out = [
        *_stats(d0),
        *_stats(cn),
        float(np.nanmean(bond_mean)) if np.isfinite(bond_mean).any() else np.nan,
        float(all_bonds.std()) if len(all_bonds) else np.nan,
        float(np.nanmean(spread)) if np.isfinite(spread).any() else np.nan,
    ]
    rc = _stats(rel_cov)
    out += [rc[0], rc[1], rc[2], float(count.mean()), float(np.log(n))]
    # rounded: float noise (a std of 1e-15 for equal bonds, 1e-8 A from a CIF round trip) must
    # not decide a tree split
    return np.round(np.asarray(out, dtype=np.float64), 6)


@dataclass(frozen=True)
class DescriptorSet:
    """One descriptor set: ``featurize(item) -> (width,)``; ``structural`` sets need structures.

    ``prefixed``: its matrix columns are named ``<name>:<column>`` (Magpie's keep matminer's
    names).  ``prepare``: builds its featurizer / tables once in the parent, before workers fork.
    ``cache_kind`` / ``cache_params`` / ``cache_array``: its feature-cache entry (by default
    ``desc-<name>`` keyed by name, version and width, array ``x``).  ``batch``: computes the set
    over many items at once, ``batch(items, n_jobs, progress) -> ((n, width), [(position,
    reason)])`` (NaN rows where it failed), instead of ``featurize`` per item.  ``check``: raises
    a clear error when the set cannot run here (a missing optional package)."""

    name: str
    columns: tuple
    featurize: Callable
    structural: bool
    version: int = 1
    prefixed: bool = True
    prepare: Optional[Callable] = field(default=None, compare=False)
    cache_kind: str = ""
    cache_params: Optional[dict] = field(default=None, compare=False, hash=False)
    cache_array: str = "x"
    batch: Optional[Callable] = field(default=None, compare=False)
    check: Optional[Callable] = field(default=None, compare=False)

    @property
    def width(self) -> int:
        return len(self.columns)

    def cache_key(self, content_hash: str) -> str:
        params = self.cache_params
        if params is None:
            params = {"set": self.name, "version": self.version, "width": self.width}
        return _cache_key(self.cache_kind or f"desc-{self.name}", content_hash, params)


@lru_cache(maxsize=1)
def registry() -> dict:
    """name -> :class:`DescriptorSet`, in matrix order."""
    return {
        # Magpie's cache entry is the one it had before it joined the registry (kind "magpie",
        # array "magpie"): the files already on disk stay valid
        "magpie": DescriptorSet(
            "magpie",
            _magpie_columns(),
            magpie_vector,
            structural=False,
            prefixed=False,
            prepare=_magpie,
            cache_kind="magpie",
            cache_params={"preset": "magpie", "width": MAGPIE_WIDTH},
            cache_array="magpie",
        ),
        "stoichiometry": DescriptorSet(
            "stoichiometry",
            ("0-norm", "2-norm", "3-norm", "5-norm", "7-norm", "10-norm"),
            stoichiometry_features,
            structural=False,
            prepare=_stoichiometry,
        ),
        "density": DescriptorSet(
            "density",
            ("density", "vpa", "packing_fraction"),
            density_features,
            structural=True,
            version=2,
            prepare=_density,
        ),
        "symmetry": DescriptorSet("symmetry", SYMMETRY_COLUMNS, symmetry_features, structural=True, version=2),
        "bonds": DescriptorSet(
            "bonds", BOND_COLUMNS, bond_features, structural=True, version=2, prepare=_covalent_radii
        ),
        "chgnet": DescriptorSet(
            "chgnet",
            chgnet_embedding.CHGNET_COLUMNS,
            chgnet_embedding.chgnet_vector,
            structural=True,
            cache_params={
                "set": "chgnet",
                "version": 1,
                "width": chgnet_embedding.CHGNET_WIDTH,
                "model": chgnet_embedding.CHGNET_MODEL,
                "chgnet": chgnet_embedding.package_version(),
            },
            batch=chgnet_embedding.embed,
            check=chgnet_embedding.require,
        ),
    }


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
        raise DescriptorError(
            "features.descriptors is empty; name at least one set of "
            f"{', '.join(DESCRIPTOR_SETS)} (or leave it out for the default)"
        )
    unknown = [n for n in names if n not in DESCRIPTOR_SETS]
    if unknown:
        raise DescriptorError(f"features.descriptors: unknown set(s) {unknown}; known: {', '.join(DESCRIPTOR_SETS)}")
    if not has_structures:
        structural = [n for n in names if registry()[n].structural]
        if structural:
            raise DescriptorError(
                f"features.descriptors: {structural} need crystal structures, and this dataset has "
                "compositions only (use magpie and/or stoichiometry)"
            )
    for n in names:
        if registry()[n].check is not None:
            registry()[n].check()
    return [n for n in DESCRIPTOR_SETS if n in names]


def columns_of(names: Sequence[str]) -> list[str]:
    """Column names of the matrix of the given sets (magpie columns keep their matminer names;
    the others are prefixed with their set's name)."""
    out = []
    for n in names:
        ds = registry()[n]
        out.extend([f"{n}:{c}" for c in ds.columns] if ds.prefixed else ds.columns)
    return out


def width_of(names: Sequence[str]) -> int:
    return sum(registry()[n].width for n in names)


def infer_sets(width: int, has_structures: bool = True) -> list[str]:
    """The descriptor sets of a matrix of ``width`` columns, for models saved without their
    names: magpie alone, or the default set for structures.  Raises naming the width."""
    for candidate in (DEFAULT_COMPOSITION_SETS, DEFAULT_STRUCTURE_SETS if has_structures else ()):
        if candidate and width_of(candidate) == width:
            return list(candidate)
    raise DescriptorError(f"cannot tell which descriptor sets make {width} columns; pass the descriptor set names")


# -- sets over many items (parallel), with their failures counted ---------------------------


def _featurize_one(fz: Callable, item, width: int) -> np.ndarray:
    """``fz(item)`` as a (width,) float vector, inf turned into NaN; raises on a wrong width."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        v = np.asarray(fz(item), dtype=np.float64).reshape(-1)
    if v.shape != (width,):
        raise ValueError(f"got {v.shape[0]} values, expected {width}")
    return np.where(np.isfinite(v), v, np.nan)


class _Row:
    """The descriptor row of one item over the sets ``names``: a set whose featurizer raises
    stays NaN (the row and the other sets are kept); returns (row, failures as (set, reason))."""

    def __init__(self, names: Sequence[str]) -> None:
        self.sets = [registry()[n] for n in names]

    def __call__(self, item) -> tuple[np.ndarray, list]:
        parts, failed = [], []
        for ds in self.sets:
            try:
                parts.append(_featurize_one(ds.featurize, item, ds.width))
            except Exception as err:  # noqa: BLE001 - a featurizer failing on one structure leaves NaN
                parts.append(np.full(ds.width, np.nan))
                failed.append((ds.name, f"{type(err).__name__}: {str(err).strip()[:200]}"))
        return (np.concatenate(parts) if parts else np.zeros(0)), failed


def compute_sets(
    items: Sequence, names: Sequence[str], n_jobs: int = 1, progress: bool = False, first: int = 0
) -> dict:
    """``{name: (n, width)}`` for each set in ``names`` (NaN where a value could not be
    computed; an exception of a featurizer on one item leaves that item's set NaN, logged with
    the count and the first failure).  ``first``: the position of ``items[0]`` in the dataset
    (a featurization shard's first row), so that the log names the dataset's item."""
    names = list(dict.fromkeys(names))
    n = len(items)
    if not names or not n:
        return {name: np.zeros((n, registry()[name].width)) for name in names}
    batched = [name for name in names if registry()[name].batch is not None]
    names = [name for name in names if name not in batched]
    out = {} if not names else _compute_per_item(items, names, n_jobs, progress, first)
    for name in batched:  # after the per-item sets' pool; each batch function runs its own workers
        out[name] = _compute_batched(items, name, n_jobs, progress, first)
    return out


def _compute_batched(items: Sequence, name: str, n_jobs: int, progress: bool, first: int = 0) -> np.ndarray:
    """One set with a ``batch`` function over every item; its failures counted and named."""
    matrix, failed = registry()[name].batch(items, n_jobs=n_jobs, progress=progress)
    if failed:
        shown = "; ".join(f"item {first + i}: {reason}" for i, reason in failed[:5])
        log.warning(
            "descriptors %s: %d of %d item(s) could not be featurized; their rows are NaN (rows kept): %s%s",
            name,
            len(failed),
            len(items),
            shown,
            " ..." if len(failed) > 5 else "",
        )
    return matrix


def _compute_per_item(items: Sequence, names: Sequence[str], n_jobs: int, progress: bool, first: int = 0) -> dict:
    """The sets ``names`` computed item by item in one :func:`parallel_map` pass."""
    n = len(items)
    for name in names:  # featurizers built once here: forked workers inherit them
        if registry()[name].prepare is not None:
            registry()[name].prepare()
    rows, crashed = parallel_map(
        _Row(names), items, n_jobs=n_jobs, progress=progress, desc=f"descriptors ({', '.join(names)})"
    )
    matrix = np.full((n, width_of(names)), np.nan)
    failed = [(f.index, "all sets", f"{f.error}: {f.message}") for f in crashed]  # _Row itself does not raise
    for i, row in enumerate(rows):
        if row is not None:
            matrix[i] = row[0]
            failed.extend((i, name, reason) for name, reason in row[1])
    if failed:
        i, name, reason = min(failed)
        log.warning(
            "descriptors: %d featurizer call(s) failed on a structure; their values are NaN (rows kept); "
            "first: item %d, %s: %s",
            len(failed),
            first + i,
            name,
            reason,
        )
    out, col = {}, 0
    for name in names:
        w = registry()[name].width
        out[name] = matrix[:, col : col + w]
        col += w
    return out


def descriptor_matrix(items: Sequence, names: Sequence[str], n_jobs: int = 1) -> np.ndarray:
    """The (n, width) matrix of ``names`` for ``items`` (what a saved model computes at predict
    time)."""
    blocks = compute_sets(items, names, n_jobs=n_jobs)
    parts = [blocks[name] for name in names]
    return np.hstack(parts) if parts else np.zeros((len(items), 0))


def cached_blocks(dataset, names: Sequence[str], cache) -> dict:
    """``{set: (rows, width) block}`` of the sets ``names`` that the feature cache holds for
    ``dataset`` (an entry of the wrong shape counts as missing)."""
    blocks = {}
    for ds in (registry()[n] for n in names):
        arrays = cache.load(ds.cache_key(dataset.content_hash))
        if arrays is not None and ds.cache_array in arrays and arrays[ds.cache_array].shape == (len(dataset), ds.width):
            blocks[ds.name] = arrays[ds.cache_array]
    return blocks


def save_block(dataset, name: str, block: np.ndarray, cache) -> None:
    """Cache set ``name``'s block of ``dataset`` (what :func:`cached_blocks` reads)."""
    ds = registry()[name]
    cache.save(ds.cache_key(dataset.content_hash), {ds.cache_array: block})


def matrix_of_blocks(names: Sequence[str], blocks: dict, n_rows: int) -> np.ndarray:
    """The descriptor matrix: the blocks of ``names`` side by side, in that order (inf as NaN),
    the NaN counts logged per set."""
    parts = []
    for n in names:
        block = np.asarray(blocks[n], dtype=np.float64)
        nan = ~np.isfinite(block)
        if nan.any():
            log.info(
                "descriptors %s: %d NaN values in %d of %d rows (kept: trees take NaN, other models impute)",
                n,
                int(nan.sum()),
                int(nan.any(axis=1).sum()),
                len(block),
            )
        parts.append(np.where(nan, np.nan, block))
    return np.hstack(parts) if parts else np.zeros((n_rows, 0))


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
