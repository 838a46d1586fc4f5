"""The in-memory dataset every loader returns, and the checks every loader shares.

A :class:`Dataset` holds parsed pymatgen structures (or compositions), one or more float
targets and a content hash.  Loaders never drop a row silently: every skipped row is
counted by reason in :attr:`Dataset.skipped` and described in :attr:`Dataset.messages`.
Every row passes :func:`structure_problem` (finite positive volume, known elements, no
overlapping atoms) before a featurizer sees it.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

log = logging.getLogger("matfusion.data")


class DataError(ValueError):
    """Input data that cannot be used; the message names the file/row/id and the problem."""


@dataclass
class Dataset:
    """Rows of (id, structure, target).

    ``structures`` holds pymatgen ``Structure`` objects (or ``Composition`` objects for
    composition-only tasks).  ``official_folds`` holds, for matbench tasks, the test
    positions of each official fold (positions into this dataset's rows).
    """

    name: str
    ids: list[str]
    structures: list
    targets: np.ndarray
    target_name: str
    content_hash: str
    official_folds: Optional[list[np.ndarray]] = None
    skipped: Counter = field(default_factory=Counter)
    messages: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.targets = np.asarray(self.targets, dtype=np.float64)
        if not (len(self.ids) == len(self.structures) == len(self.targets)):
            raise DataError(
                f"{self.name}: ids ({len(self.ids)}), structures ({len(self.structures)}) and "
                f"targets ({len(self.targets)}) differ in length"
            )

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def has_structures(self) -> bool:
        from pymatgen.core import Structure

        return bool(self.structures) and isinstance(self.structures[0], Structure)

    @property
    def target_names(self) -> list[str]:
        """One name per target column: ``target_name`` split at commas (how multi-target tables
        join their names), or ``t0, t1, ...`` when that does not give one name per column."""
        n = 1 if self.targets.ndim == 1 else self.targets.shape[1]
        names = [t.strip() for t in str(self.target_name).split(",")]
        return names if len(names) == n else [f"t{k}" for k in range(n)]

    def subset(self, positions: Sequence[int]) -> "Dataset":
        """A new dataset with the given rows (folds are remapped, hash is re-derived)."""
        positions = np.asarray(positions, dtype=np.int64)
        remap = {int(p): i for i, p in enumerate(positions)}
        folds = None
        if self.official_folds is not None:
            folds = [
                np.array([remap[int(p)] for p in f if int(p) in remap], dtype=np.int64) for f in self.official_folds
            ]
        digest = hashlib.sha256(self.content_hash.encode() + positions.tobytes()).hexdigest()
        return Dataset(
            name=self.name,
            ids=[self.ids[p] for p in positions],
            structures=[self.structures[p] for p in positions],
            targets=self.targets[positions],
            target_name=self.target_name,
            content_hash=digest,
            official_folds=folds,
            skipped=Counter(self.skipped),
            messages=list(self.messages),
        )

    def summary(self) -> str:
        text = f"{self.name}: {len(self)} rows, target {self.target_name!r}"
        if self.skipped:
            parts = ", ".join(f"{n} {reason}" for reason, n in sorted(self.skipped.items()))
            text += f"; skipped {sum(self.skipped.values())} ({parts})"
        return text


def default_data_dir() -> Path:
    """``$MATFUSION_DATA``, else ``../shared/data`` (from the cwd or the package) when present."""
    env = os.environ.get("MATFUSION_DATA")
    if env:
        return Path(env)
    candidates = [
        Path.cwd() / ".." / "shared" / "data",
        Path(__file__).resolve().parents[2] / ".." / "shared" / "data",
    ]
    for c in candidates:
        if c.is_dir():
            return c.resolve()
    raise DataError(
        "no data dir: set MATFUSION_DATA or pass --data-dir (looked for ../shared/data "
        f"at {', '.join(str(c) for c in candidates)})"
    )


def hash_bytes(*chunks: bytes) -> str:
    h = hashlib.sha256()
    for c in chunks:
        h.update(c)
    return h.hexdigest()


def hash_file(path: Path, extra: str = "") -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    h.update(extra.encode())
    return h.hexdigest()


def is_disordered(structure) -> bool:
    return not structure.is_ordered


def order_by_majority(structure):
    """Replace each partially occupied site by its majority species (occupancy 1)."""
    from pymatgen.core import Structure

    species, coords = [], []
    for site in structure:
        sp, _ = max(site.species.items(), key=lambda kv: kv[1])
        species.append(sp)
        coords.append(site.frac_coords)
    return Structure(structure.lattice, species, coords)


def check_target(value, where: str) -> tuple[Optional[float], Optional[str]]:
    """Return (float value, None) or (None, reason) for a NaN/inf/non-numeric target."""
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None, f"{where}: target {value!r} is not a number"
    if not np.isfinite(x):
        return None, f"{where}: target is {value!r} (NaN/inf)"
    return x, None


def _is_nan(value) -> bool:
    try:
        return bool(np.isnan(float(value)))
    except (TypeError, ValueError):
        return False


# -- sanity checks of one structure, before any featurizer sees it ---------------------------

# two atoms (or an atom and its own periodic image) closer than this are one position twice
# (Angstrom).  The shortest distance in matbench_phonons and matbench_dielectric is 0.75 A (H-H);
# see docs/notes-data.md.
MIN_DISTANCE = 0.5
# below this volume per atom (A^3) the cell is degenerate (collinear / coplanar lattice vectors).
# Implied by MIN_DISTANCE (points 0.5 A apart fill at least 0.088 A^3 each); checked first because
# the neighbour list of a near-zero-volume cell divides by zero or searches without end.
MIN_VOLUME_PER_ATOM = 0.05
# the element feature table of the crystal graphs covers H .. Lr
MAX_Z = 103


def _unknown_species(species) -> list[str]:
    from pymatgen.core.periodic_table import Element

    bad = []
    for sp in species:
        element = getattr(sp, "element", sp)  # Species (with oxidation state) -> its Element
        if not isinstance(element, Element):
            bad.append(str(getattr(sp, "symbol", sp)))
    return bad


def structure_problem(structure) -> Optional[tuple[str, str]]:
    """``(reason, detail)`` when a structure (or composition) cannot be featurized, else None.

    Checks, in order: a finite lattice and finite coordinates, a positive volume (at least
    :data:`MIN_VOLUME_PER_ATOM` per atom), known elements (pymatgen Elements, Z <= :data:`MAX_Z`
    for structures; a symbol such as ``Xx`` parses as a DummySpecies), and no two atoms (or an atom
    and its periodic image) closer than :data:`MIN_DISTANCE`.  ``reason`` is the skip counter's
    key; ``detail`` says what was found."""
    if not hasattr(structure, "lattice"):  # a composition
        unknown = _unknown_species(structure.elements) if hasattr(structure, "elements") else []
        if unknown:
            return "unknown element", f"unknown element symbol(s) {', '.join(sorted(set(unknown)))}"
        return None
    matrix = np.asarray(structure.lattice.matrix, dtype=np.float64)
    coords = np.asarray(structure.frac_coords, dtype=np.float64)
    if not np.isfinite(matrix).all() or not np.isfinite(coords).all():
        return "bad lattice", "the lattice or the coordinates hold NaN/inf"
    volume = abs(float(np.linalg.det(matrix)))
    if not volume / len(structure) >= MIN_VOLUME_PER_ATOM:
        return "zero volume", (
            f"cell volume {volume:.3g} A^3 for {len(structure)} atom(s): the lattice vectors are collinear or coplanar"
        )
    unknown = [str(s) for s in _unknown_species(structure.species)]
    if not unknown:
        unknown = [f"{sp} (Z={sp.Z})" for sp in structure.species if sp.Z > MAX_Z]
    if unknown:
        return "unknown element", (
            f"unknown element symbol(s) {', '.join(sorted(set(unknown)))} (known: H .. Lr, Z 1-{MAX_Z})"
        )
    try:
        centers, neighbors, _, dist = structure.get_neighbor_list(r=MIN_DISTANCE)
    except Exception as err:  # noqa: BLE001 - pymatgen's neighbour search on a pathological cell
        return "bad lattice", f"the neighbour list cannot be built ({type(err).__name__}: {err})"
    if len(dist):
        k = int(np.argmin(dist))
        i, j = int(centers[k]), int(neighbors[k])
        what = (
            f"atom {i} ({structure[i].species_string}) and its own periodic image"
            if i == j
            else (
                f"atoms {min(i, j)} ({structure[min(i, j)].species_string}) and {max(i, j)} "
                f"({structure[max(i, j)].species_string})"
            )
        )
        return "overlapping atoms", f"{what} are {float(dist[k]):.3f} A apart (minimum {MIN_DISTANCE} A)"
    return None


class RowCollector:
    """Accumulates good rows and counted, explained skips for a loader."""

    def __init__(self, name: str, disordered: str = "skip") -> None:
        self.name = name
        self.disordered = disordered
        self.ids: list[str] = []
        self.structures: list = []
        self.targets: list = []
        self.skipped: Counter = Counter()
        self.messages: list[str] = []

    def skip(self, reason: str, message: str) -> None:
        self.skipped[reason] += 1
        self.messages.append(message)
        log.warning(message)

    def add(self, row_id: str, structure, target, where: str) -> bool:
        """Validate and add a row; returns False (and records why) if it was skipped.

        One target: NaN/inf/non-numeric skips the row.  Several targets (multi-task): a
        missing (NaN/empty) label is kept as NaN and masked out of the loss; the row is skipped
        only when every label is missing or one is inf/non-numeric."""
        values = list(np.atleast_1d(np.asarray(target, dtype=object)))
        clean = []
        for v in values:
            x, problem = check_target(v, where)
            if problem is not None:
                missing = v is None or (isinstance(v, str) and not v.strip()) or _is_nan(v)
                if len(values) > 1 and missing:
                    clean.append(float("nan"))
                    continue
                self.skip("bad target", problem)
                return False
            clean.append(x)
        if len(values) > 1 and all(np.isnan(clean)):
            self.skip("bad target", f"{where}: every target is missing")
            return False
        if structure is not None and hasattr(structure, "is_ordered") and not structure.is_ordered:
            if self.disordered == "skip":
                self.skip(
                    "disordered",
                    f"{where}: structure has partially occupied sites (disordered); skipped "
                    "(set data.disordered: majority to keep the majority species)",
                )
                return False
            structure = order_by_majority(structure)
            self.messages.append(f"{where}: disordered structure ordered by majority species")
        if structure is not None and hasattr(structure, "__len__") and len(structure) == 0:
            self.skip("empty structure", f"{where}: structure has no sites")
            return False
        problem = structure_problem(structure) if structure is not None else None
        if problem is not None:
            self.skip(problem[0], f"{where}: {problem[1]}; skipped")
            return False
        self.ids.append(str(row_id))
        self.structures.append(structure)
        self.targets.append(clean[0] if len(clean) == 1 else clean)
        return True

    def build(self, target_name: str, content_hash: str, official_folds=None) -> Dataset:
        if not self.ids:
            detail = ""
            if self.skipped:
                detail = "; every row was skipped: " + ", ".join(f"{n} {r}" for r, n in sorted(self.skipped.items()))
                if self.messages:
                    detail += f" (first: {self.messages[0]})"
            raise DataError(f"{self.name}: the dataset is empty{detail}")
        ds = Dataset(
            name=self.name,
            ids=self.ids,
            structures=self.structures,
            targets=np.asarray(self.targets, dtype=np.float64),
            target_name=target_name,
            content_hash=content_hash,
            official_folds=official_folds,
            skipped=self.skipped,
            messages=self.messages,
        )
        if self.skipped:
            log.warning(ds.summary())
        return ds
