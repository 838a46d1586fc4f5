"""The one configuration schema of matfusion (pydantic), shared by every command.

A config is a YAML file; ``--set dotted.key=value`` overrides any key.  Unknown keys and
bad values raise :class:`ConfigError` with a message that names the key and, where the
values are a closed set, the allowed values.  Validation happens before Ray starts.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from . import families as _families

# the model families and fusions come from the family registry (matfusion/families/)
FAMILIES = _families.names()
DESCRIPTOR_SETS = ("magpie", "stoichiometry", "density", "symmetry", "bonds", "chgnet")
FUSIONS = _families.FUSIONS
TASK_WEIGHTINGS = _families.TASK_WEIGHTINGS


class ConfigError(ValueError):
    """A config that cannot be used; the message names the offending key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(_Strict):
    """Where the data comes from and which part of it is used."""

    source: str = Field(
        description="A matbench task name (e.g. matbench_phonons) found in the data dir, "
        "a CSV/JSON table path, or a folder of CIF/POSCAR files with id_prop.csv"
    )
    target: Optional[Union[str, list[str]]] = Field(
        None, description="target column of a table, or a list of columns for multi-task; default: the task's target"
    )
    structure_column: str = "structure"
    id_column: Optional[str] = None
    data_dir: Optional[str] = Field(None, description="default: $MATFUSION_DATA or ../shared/data")
    fold: int = Field(0, ge=0, description="which test fold (matbench official folds, or seeded K-fold)")
    n_folds: int = Field(5, ge=2, description="folds for user data (matbench always has 5)")
    limit: Optional[int] = Field(None, gt=0, description="use a seeded random subset of this many rows")
    val_fraction: float = Field(0.1, gt=0.0, lt=0.9, description="inner validation share of the fold's training part")
    disordered: Literal["skip", "majority"] = Field(
        "skip", description="partially occupied sites: skip the structure (counted), or keep the majority species"
    )


class FeaturesConfig(_Strict):
    """Crystal-graph and composition featurizer parameters (part of the cache key)."""

    cutoff: float = Field(6.0, gt=0.0, description="neighbour radius in Angstrom")
    max_neighbors: int = Field(12, gt=0)
    gaussian_bins: int = Field(40, gt=1, description="number of Gaussians expanding each distance")
    gaussian_width: Optional[float] = Field(None, gt=0.0, description="default: cutoff / gaussian_bins")
    line_graph: bool = Field(
        False,
        description="also build each graph's line graph (bond angles; ALIGNN needs it). "
        "The search turns it on when it searches alignn",
    )
    descriptors: Optional[list[Literal[DESCRIPTOR_SETS]]] = Field(
        None,
        description="descriptor sets of the tabular matrix (rf, lgbm, et and the descriptor branch of fused "
        "GNNs); default: magpie, density, symmetry, bonds with structures, magpie for compositions only; "
        'chgnet (64-dim pretrained CHGNet crystal embedding) is opt-in and needs pip install "matfusion[chgnet]"',
    )
    n_jobs: int = Field(0, ge=0, description="worker processes; 0 = all cores")
    backend: Literal["local", "ray"] = Field(
        "local",
        description="where the shards of featurization run: local (n_jobs forked workers on this machine) or ray "
        "(one Ray task per shard on the cluster the driver is connected to, else a local Ray)",
    )
    cache_dir: Optional[str] = Field(None, description="default: $MATFUSION_CACHE or ~/.cache/matfusion")
    graph_store: Literal["memory", "disk"] = Field(
        "memory",
        description="how a GNN trial gets the graphs of its rows: memory (the packed arrays through Ray's object "
        "store) or disk (written once as checksummed shard files under <cache_dir>/graph-shards/, content-addressed "
        "and reused; a trial gets their index and reads the graphs of each batch from the files, so its memory does "
        "not grow with the dataset; the cache dir must be on storage shared by the nodes)",
    )


class SearchConfig(_Strict):
    """Ray Tune + Optuna TPE + ASHA settings."""

    families: list[Literal[FAMILIES]] = Field(
        default_factory=lambda: list(FAMILIES),
        description="model families the search picks from; rf, lgbm (LightGBM) and et (extra trees) train on "
        "features.descriptors like rf",
    )
    fusions: list[Literal[FUSIONS]] = Field(
        default_factory=lambda: list(FUSIONS), description="fusions of each GNN with Magpie that the search may pick"
    )
    task_weighting: list[Literal[TASK_WEIGHTINGS]] = Field(
        default_factory=lambda: ["fixed", "uncertainty"],
        description="multi-task loss weighting choices: fixed (task_weights), tuned (searched), uncertainty (learned)",
    )
    task_weights: Optional[dict[str, float]] = Field(None, description="fixed lambda per target (default 1)")
    preset: Literal["quick", "default", "thorough"] = Field(
        "default", description="ranges of every family's space: quick (small models), default, thorough (wider)"
    )
    space: dict[str, Any] = Field(
        default_factory=dict,
        description="fix or narrow parameters: {'cgcnn.hidden': 64, 'cgcnn.lr': {low: 1e-3, high: 5e-3}, "
        "'rf.max_depth': [0, 20], 'cgcnn.fusion': [none, early]}",
    )
    sampler: Literal["tpe", "random"] = Field("tpe", description="Optuna sampler proposing trials")
    scheduler: Literal["asha", "fifo"] = Field(
        "asha", description="asha stops bad trials early; fifo runs every trial to the end"
    )
    asha_mode: Literal["stop", "promote"] = Field(
        "stop",
        description="ASHA's rule at a rung: stop (Ray's: a trial goes on unless it is below the best "
        "1/reduction_factor of the results its rung holds so far, so the first trials go on unopposed) or promote "
        "(as published: a trial goes on only when its rung holds at least reduction_factor results and it is among "
        "the best 1/reduction_factor of them; the others are paused with their checkpoint and resumed if they "
        "become so)",
    )
    asha_scope: Literal["group", "all"] = Field(
        "group",
        description="which trials an ASHA rung compares: group (family-fair: each group of trials, family x "
        "fusion such as lgbm or cgcnn-early, has its own rungs, so a GNN's epoch k is never judged against "
        "LightGBM's k-th chunk of boosting rounds) or all (family-blind: every epoch-trained trial in one set of "
        "rungs, the behaviour before; kept for comparison)",
    )
    min_trials_per_group: int = Field(
        2,
        ge=0,
        description="the search's budget rule across groups: the first groups x this many trials are "
        "proposed group by group in round robin (each group of the space, family x fusion, gets this many trials; "
        "the known-good points_to_evaluate count toward their group), then TPE chooses the group too; 0: TPE "
        "chooses every group from the start. When num_samples is smaller, the round robin is cut short (warned)",
    )
    budget_rule: Literal["tpe", "share"] = Field(
        "tpe",
        description="who chooses the group of each trial after the round robin of min_trials_per_group: tpe "
        "(Optuna's TPE, with the other parameters) or share (the group that has used the least training time so "
        "far, among the groups whose best finished trial is within share_margin of the best group's; a running "
        "trial counts at least its group's median trial time; TPE then picks the group's parameters)",
    )
    share_margin: float = Field(
        0.25,
        ge=0,
        description="budget_rule share: a group stays in the share while its best finished trial's val_mae is at "
        "most (1 + share_margin) x the best group's (a group without a finished trial stays in)",
    )
    max_total_epochs: Optional[int] = Field(
        None, gt=0, description="stop the search once all trials together reported this many epochs"
    )
    stop_at_val_mae: Optional[float] = Field(
        None,
        description="stop the search as soon as any trial reports a val_mae at or below this (good enough: "
        "e.g. a known baseline's score)",
    )
    checkpoint_every: int = Field(
        1,
        gt=0,
        description="epochs between trial checkpoints (the last epoch always has one); "
        "a resumed trial restarts from its last checkpoint",
    )
    lr_schedule: Literal["cosine", "rungs"] = Field(
        "cosine",
        description="GNN learning rate: cosine (one cycle over max_epochs, as a trial trained alone; an "
        "ASHA rung then compares models mid-schedule) or rungs (cosine cycles that end at each ASHA rung milestone, "
        "so every rung compares annealed models, with a warm restart when a trial goes on; the restarts cost "
        "accuracy at max_epochs, see benchmarks/README.md)",
    )
    points_to_evaluate: bool = Field(True, description="seed the search with one known-good config per family")
    num_samples: int = Field(8, gt=0)
    max_epochs: int = Field(30, gt=0)
    grace_period: int = Field(3, gt=0, description="ASHA: epochs every trial gets before it may be stopped")
    reduction_factor: int = Field(3, ge=2)
    seed: int = 0
    max_concurrent: int = Field(2, gt=0)
    cpus_per_trial: float = Field(1.0, gt=0.0)
    gpus_per_trial: Optional[float] = Field(
        None, ge=0.0, description="default: 0, or 1/max_concurrent when CUDA is present"
    )
    early_stopping_patience: int = Field(
        20, gt=0, description="epochs without inner-val improvement before a trial stops"
    )
    time_budget_s: Optional[float] = Field(None, gt=0.0)
    max_failures: int = Field(
        0,
        ge=-1,
        description="times a failed trial (e.g. its node died) is retried from its last checkpoint; "
        "-1 = without limit. 2 is a good value on a cluster",
    )
    storage_path: Optional[str] = Field(None, description="default: ./ray_results")
    address: Optional[str] = Field(None, description="Ray cluster address; default: start a local one on 127.0.0.1")

    @field_validator("families")
    @classmethod
    def _non_empty(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError(f"needs at least one family; allowed: {', '.join(FAMILIES)}")
        return v

    @field_validator("fusions", "task_weighting")
    @classmethod
    def _non_empty_choice(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("needs at least one choice")
        return v

    @field_validator("task_weights")
    @classmethod
    def _positive_weights(cls, v):
        for k, w in (v or {}).items():
            if not w > 0:
                raise ValueError(f"task weight of {k!r} must be > 0 (got {w})")
        return v

    @model_validator(mode="after")
    def _grace(self) -> "SearchConfig":
        if self.grace_period > self.max_epochs:
            raise ValueError(f"grace_period ({self.grace_period}) must be <= max_epochs ({self.max_epochs})")
        from .spaces import SpaceError, resolve_specs

        try:
            resolve_specs(self.families, self.preset, self.fusions, self.space)
        except SpaceError as err:
            raise ValueError(str(err)) from None
        return self


class MlflowConfig(_Strict):
    tracking_uri: Optional[str] = Field(None, description="default: $MLFLOW_TRACKING_URI or sqlite:///mlruns.db")
    experiment: Optional[str] = Field(None, description="default: the config's name")
    artifact_location: Optional[str] = Field(None, description="for new experiments; default ./mlartifacts")


def _ensemble_config() -> type:
    import warnings

    with warnings.catch_warnings():  # the field `register` shadows ABCMeta.register (harmless: fields win)
        warnings.filterwarnings("ignore", message='Field name "register"')

        class EnsembleConfig(_Strict):
            """Stack the best trials into an ensemble when a search completes (``matfusion ensemble``).

            The one home of the ensemble defaults: ``matfusion ensemble``'s flags default to these
            fields (``ensembles.commands.settings_from_args``), ``build_ensemble_from_search`` takes
            an instance (``settings``), and ``StackedEnsemble``'s ``meta`` / ``n_folds`` / ``refit`` /
            ``graph_max_epochs`` defaults are ``meta`` / ``n_folds`` / ``refit`` / ``max_epochs`` here;
            ``meta``'s literal is the list of meta-learners (``stacking.META_LEARNERS``)."""

            enabled: bool = Field(False, description="build, evaluate and log an ensemble after a completed search")
            k: int = Field(2, ge=1, description="members per group (rf; each graph family x fusion)")
            meta: Literal["mae", "nnls", "ridge", "gbm"] = Field(
                "mae",
                description="mae: convex blend minimizing the out-of-fold MAE; nnls: non-negative least squares; "
                "ridge; gbm",
            )
            n_folds: int = Field(5, ge=2, description="out-of-fold splits of the training rows")
            max_epochs: Optional[int] = Field(
                None,
                ge=1,
                description="epochs of the graph (GNN) members; default as searched "
                "(trials the search stopped early are then trained this long)",
            )
            refit: bool = Field(
                True,
                description="train every weighted member once more on all the training rows "
                "for the point prediction (weights still from the out-of-fold predictions); false: "
                "predict with the K fold models",
            )
            register: bool = Field(True, description="register the model as matfusion-<task> (champion if better)")
            coverage: float = Field(
                0.9,
                gt=0.0,
                lt=1.0,
                description="coverage of the lower/upper conformal interval of the predictions "
                "(calibrated on the out-of-fold residuals of the training rows; docs/uncertainty.md)",
            )
            difficulty: Literal["model", "spread", "constant"] = Field(
                "model",
                description="per-row difficulty that scales the conformal intervals: model (a small model "
                "of the out-of-fold |residual|), spread (the members' spread), constant (plain conformal, one width)",
            )
            refit_gain: Union[Literal["auto"], bool] = Field(
                True,
                description="scale the conformal quantiles by the refit's measured gain over a single fold-model "
                "stack, estimated per level on the training rows the refit held out for early stopping (replaces "
                "the averaging correction); true: whenever it is estimated (30+ held-out rows), auto: only from "
                "350 held-out rows (the averaging correction, which errs wide, below), false: never "
                "(docs/uncertainty.md)",
            )

    EnsembleConfig.__qualname__ = "EnsembleConfig"  # picklable by reference as matfusion.config.EnsembleConfig
    return EnsembleConfig


EnsembleConfig = _ensemble_config()


class BenchmarkConfig(_Strict):
    """``matfusion benchmark``: nested cross-validation over matbench's official folds (per-fold
    search budget: ``search.time_budget_s``; stacking: the ``ensemble`` section)."""

    train_limit: Optional[int] = Field(
        None,
        gt=1,
        description="about this many training rows per fold (miniature runs): the search and the "
        "stacking use a seeded subset of the fold's training part; every test row is still predicted",
    )
    max_groups: Optional[int] = Field(
        None,
        gt=0,
        description="stack the best N groups (rf; graph family x fusion) by inner-validation MAE; "
        "default: every group the search tried",
    )
    graph_member: bool = Field(
        True,
        description="with max_groups: also stack the best graph-model group (family x fusion) when none of the "
        "best max_groups is one; the meta-learner then weighs it on out-of-fold predictions like any member",
    )
    permutation_repeats: int = Field(
        3,
        ge=0,
        description="shuffles per feature/modality of the permutation "
        "importances in the report (0: impurity importance only)",
    )


class Config(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.\-]+$")
    data: DataConfig
    features: FeaturesConfig = Field(default_factory=FeaturesConfig)
    search: SearchConfig = Field(default_factory=SearchConfig)
    mlflow: MlflowConfig = Field(default_factory=MlflowConfig)
    ensemble: EnsembleConfig = Field(default_factory=EnsembleConfig)
    benchmark: BenchmarkConfig = Field(default_factory=BenchmarkConfig)


def _format_errors(err: ValidationError, origin: str) -> str:
    lines = [f"invalid config {origin}:"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "<root>"
        if e["type"] == "extra_forbidden":
            lines.append(f"  {key}: unknown key")
        elif e["type"] == "literal_error":
            allowed = e.get("ctx", {}).get("expected", "")
            lines.append(f"  {key}: {e['input']!r} is not allowed; allowed values: {allowed}")
        elif e["type"] == "missing":
            lines.append(f"  {key}: required key is missing")
        else:
            msg = e["msg"].removeprefix("Value error, ")
            given = e.get("input")
            lines.append(f"  {key}: {msg}" + ("" if isinstance(given, dict) else f" (got {given!r})"))
    return "\n".join(lines)


def _parse_scalar(text: str) -> Any:
    value = yaml.safe_load(text)
    return value


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply ``dotted.key=value`` overrides (values parsed as YAML scalars/lists)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected dotted.key=value")
        key, text = item.split("=", 1)
        parts = [p for p in key.strip().split(".") if p]
        if not parts:
            raise ConfigError(f"--set {item!r}: empty key")
        node = raw
        for p in parts[:-1]:
            child = node.get(p)
            if child is None:
                child = node[p] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"--set {item!r}: {p} is not a section")
            node = child
        node[parts[-1]] = _parse_scalar(text)
    return raw


def config_from_dict(raw: dict, origin: str = "<dict>") -> Config:
    if not isinstance(raw, dict):
        raise ConfigError(f"invalid config {origin}: the top level must be a mapping of keys")
    try:
        return Config.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, origin)) from None


def _yaml_problem(err) -> str:
    """PyYAML's error in one line: the problem and where it is."""
    mark, problem = getattr(err, "problem_mark", None), getattr(err, "problem", None)
    if problem and mark is not None:
        return f"{problem} at line {mark.line + 1}, column {mark.column + 1}"
    return " ".join(str(err).split())


def load_config(path: str | os.PathLike, overrides: Optional[list[str]] = None) -> Config:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config {path} is not valid YAML: {_yaml_problem(err)}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"invalid config {path}: the top level must be a mapping of keys")
    raw = apply_overrides(raw, overrides or [])
    return config_from_dict(raw, origin=str(path))
