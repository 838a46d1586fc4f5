"""One fold-preparation step: dataset -> split -> features -> packed trial data.

The search, the ensemble and the benchmark all need the same thing before they fit anything:
the dataset (``load_dataset`` with the search's seed), the outer fold split into train + inner
validation + test (``split_fold``), the features of every row (``featurize``, cached by the
featurizer parameters) and the arrays a trial receives.  :func:`prepare_fold` does it once, so
the three give the same rows, the same features and the same cache keys.

Leakage: :attr:`PreparedFold.trial_data` packs the inner train and validation rows only
(``pack_trial_data``); the test rows are packed apart (:attr:`PreparedFold.test_part`) for the
evaluations after the fit.  Both are packed on first use (the ensemble and the benchmark read the
feature matrices directly and never need them).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Iterable, Optional, Sequence

from .. import families as _families
from ..trainables.trial_data import pack_rows, pack_trial_data
from . import featurize as featurize_module
from .dataset import Dataset
from .folds import FoldSplit, split_fold


def needs_line_graph(families: Iterable[str], members: Iterable[dict] = ()) -> bool:
    """Whether the graphs need their line graphs (bond angles): ALIGNN is searched, or one of
    the ensemble's ``members`` (trial configs) is an ALIGNN model."""
    return _families.needs_line_graph([*families, *(m.get("family") for m in members)])


def needs_graphs(families: Iterable[str]) -> bool:
    """Whether any of ``families`` trains on crystal graphs (a search of tabular families only
    needs none)."""
    return any(f in _families.GRAPH for f in families)


def features_config(features, families: Iterable[str], members: Iterable[dict] = ()):
    """The featurizer parameters of a fold: ``features`` (a FeaturesConfig), with ``line_graph``
    turned on when :func:`needs_line_graph` (the line graph is part of the graph cache key)."""
    if needs_line_graph(families, members):
        return features.model_copy(update={"line_graph": True})
    return features


def check_structures(dataset: Dataset, families: Sequence[str]) -> None:
    """Raise ValueError, naming the first graph family, when ``families`` need crystal structures
    that ``dataset`` (compositions only) does not have."""
    graph_families = [f for f in families if f in _families.GRAPH]
    if graph_families and not dataset.has_structures:
        raise ValueError(
            f"{dataset.name} has compositions only; family '{graph_families[0]}' needs crystal "
            f"structures (use tabular families only: search.families: {list(_families.TABULAR)})"
        )


def fold_split(cfg, dataset: Dataset) -> FoldSplit:
    """The outer fold ``cfg.data.fold`` of ``dataset`` split as every search splits it (seed
    ``cfg.search.seed``)."""
    return split_fold(dataset, cfg.data.fold, cfg.data.val_fraction, seed=cfg.search.seed, n_folds=cfg.data.n_folds)


@dataclass
class PreparedFold:
    """One fold, ready to fit on: the dataset, its split, the features of every row, and (packed
    on first use) the trial data (inner train + val rows only) and the test part."""

    dataset: Dataset
    split: FoldSplit
    features: "featurize_module.FeatureSet"
    features_config: object  # the FeaturesConfig given to featurize (line_graph resolved)
    families: list = field(default_factory=list)

    @property
    def descriptors(self):
        """The descriptor matrix of every row (see FeatureSet.descriptors)."""
        return self.features.descriptors

    @property
    def graphs(self):
        return self.features.graphs

    @property
    def columns(self) -> list[str]:
        return self.features.descriptor_columns

    @property
    def targets(self):
        return self.dataset.targets

    @property
    def target_names(self) -> list[str]:
        return self.dataset.target_names

    @property
    def graph_params(self) -> dict:
        """How the graph models expand distances: ``gaussian_bins``, ``gaussian_width``."""
        return {
            "gaussian_bins": int(self.features_config.gaussian_bins),
            "gaussian_width": self.features_config.gaussian_width,
        }

    @cached_property
    def trial_data(self) -> dict:
        """``pack_trial_data`` of the inner train and validation rows: what every trial gets."""
        p = self.graph_params
        return pack_trial_data(
            self.descriptors,
            self.graphs,
            self.targets,
            self.split.train,
            self.split.val,
            gaussian_bins=p["gaussian_bins"],
            gaussian_width=p["gaussian_width"],
            graph_store_dir=self.graph_store_dir,
        )

    @property
    def graph_store_dir(self):
        """Where the trials' graphs are written as shard files (``features.graph_store: disk``:
        ``<cache>/graph-shards``), else None (they travel in memory)."""
        if getattr(self.features_config, "graph_store", "memory") != "disk" or self.graphs is None:
            return None
        from .cache import FeatureCache

        return FeatureCache(self.features_config.cache_dir).directory / "graph-shards"

    @cached_property
    def test_part(self) -> dict:
        """``pack_rows`` of the test rows (in ``split.test`` order), for after-fit evaluation."""
        return pack_rows(self.descriptors, self.graphs, self.targets, self.split.test)


def prepare_fold(
    cfg,
    dataset: Optional[Dataset] = None,
    *,
    families: Optional[Sequence[str]] = None,
    members: Iterable[dict] = (),
    graphs: Optional[bool] = None,
    split: Optional[FoldSplit] = None,
    progress: bool = True,
) -> PreparedFold:
    """Prepare the fold that ``cfg`` (a Config) describes.

    ``dataset``: default ``load_dataset(cfg.data, seed=cfg.search.seed)``.  ``families``: default
    ``cfg.search.families``; they (and the ensemble's ``members``) decide the line graph.
    ``graphs``: build the crystal graphs (structure datasets only); default: when a family needs
    them.  ``split``: default :func:`fold_split` of the dataset (the benchmark passes its own
    stacking/test rows).  Raises ValueError when a family needs structures the dataset lacks.
    Structures the graph builder fails on are skipped (counted as ``graph failed``, named) and the
    fold is split and featurized without them; with a given ``split`` they are an error.
    """
    if dataset is None:
        from . import load_dataset

        dataset = load_dataset(cfg.data, seed=cfg.search.seed)
    families = list(cfg.search.families if families is None else families)
    members = list(members)
    check_structures(dataset, families)
    given_split = split
    split = fold_split(cfg, dataset) if split is None else split
    fcfg = features_config(cfg.features, families, members)
    want_graphs = needs_graphs(families) if graphs is None else bool(graphs)
    address = cfg.search.address  # features.backend: ray runs its shards on the search's cluster
    try:
        features = featurize_module.featurize(dataset, fcfg, progress=progress, graphs=want_graphs, ray_address=address)
    except featurize_module.GraphBuildError as err:
        if given_split is not None:  # the caller's row positions cannot be remapped here
            raise
        dataset = drop_rows(dataset, err.failed, "graph failed", err.reasons)
        split = fold_split(cfg, dataset)
        features = featurize_module.featurize(dataset, fcfg, progress=progress, graphs=want_graphs, ray_address=address)
        # the shards before the first failed row were reused (and removed) just now; the later
        # ones hold other rows without it: nothing will read them again
        featurize_module.remove_shard_files(err.shard_files)
    return PreparedFold(dataset=dataset, split=split, features=features, features_config=fcfg, families=families)


def drop_rows(dataset: Dataset, positions: Sequence[int], reason: str, messages: Sequence[str]) -> Dataset:
    """``dataset`` without the rows at ``positions``, each counted under ``reason`` and described
    by its line of ``messages`` (a new content hash, so nothing of the full dataset's cache is
    reused for it)."""
    import logging

    from .dataset import DataError

    drop = set(int(p) for p in positions)
    keep = [i for i in range(len(dataset)) if i not in drop]
    if not keep:
        raise DataError(f"{dataset.name}: the dataset is empty; every row failed: {messages[0]}")
    out = dataset.subset(keep)
    out.skipped[reason] += len(drop)
    for m in messages:
        out.messages.append(f"{m}; skipped")
        logging.getLogger("matfusion.data").warning("%s: %s; skipped", dataset.name, m)
    return out
