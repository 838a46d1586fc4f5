"""Define-by-run Optuna search spaces over the families of the registry (:mod:`matfusion.families`).

The first choice of every trial is the model family; each family then suggests only its own
parameters, named ``<family>/<param>`` (Ray's OptunaSearch un-flattens them into
``config[family][param]``); a graph family also chooses its ``fusion`` and only that fusion's
parameters (:mod:`matfusion.families.fusion`).  Constants (epochs, seed, fixed parameters, ...)
are returned by the space function and merged into the trial config.

Each family declares ``PARAMS`` (default ranges), ``PRESETS`` (``quick`` / ``thorough`` ranges
replacing the defaults), ``ALTERNATIVES`` and its typed hyperparameters, whose defaults are
the family's ``DEFAULTS`` (a known-good point, used to seed the search through
``points_to_evaluate``).  A config may fix or narrow any parameter with ``search.space``
(keys ``<family>.<param>``; see :mod:`.params`).
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

from .. import families as _families
from ..families import fusion as _fusion
from .multitask import multitask_space
from .params import Categorical, SpaceError, Suggester, apply_override, describe

PRESETS = ("quick", "default", "thorough")


def family_params(family: str, preset: str = "default", fusions: Optional[Sequence[str]] = None) -> dict:
    """The specs of one family under a preset (graph families include fusion and its params;
    ``fusions`` default: all of them)."""
    return _families.get(family).search_specs(preset, fusions or _families.FUSIONS)


def normalize_overrides(space: Optional[Mapping[str, Any]]) -> dict:
    """``{"cgcnn.hidden": 64}`` or nested ``{"cgcnn": {"hidden": 64}}`` -> ``{"cgcnn.hidden": 64}``."""
    out = {}
    for key, value in (space or {}).items():
        if "." not in key and key in _families.names() and isinstance(value, Mapping):
            for param, v in value.items():
                out[f"{key}.{param}"] = v
        else:
            out[key] = value
    return out


def resolve_specs(
    families: Sequence[str],
    preset: str = "default",
    fusions: Optional[Sequence[str]] = None,
    overrides: Optional[Mapping[str, Any]] = None,
) -> dict:
    """family -> param -> spec (or ("fixed", value)); raises SpaceError naming a bad key."""
    if preset not in PRESETS:
        raise SpaceError(f"search.preset {preset!r} not allowed; allowed values: {list(PRESETS)}")
    known = _families.names()
    unknown = [f for f in families if f not in known]
    if unknown:
        raise SpaceError(f"unknown model families {unknown}; known: {', '.join(known)}")
    specs = {f: family_params(f, preset, fusions) for f in families}
    for key, value in normalize_overrides(overrides).items():
        family, _, param = key.partition(".")
        if family not in known:
            raise SpaceError(f"search.space.{key}: unknown family {family!r}; known: {', '.join(known)}")
        if family not in specs:
            raise SpaceError(f"search.space.{key}: family {family!r} is not in search.families {list(families)}")
        if param not in specs[family]:
            known = ", ".join(f"{p} ({describe(s)})" for p, s in specs[family].items())
            raise SpaceError(f"search.space.{key}: unknown parameter {param!r} of {family}; known: {known}")
        specs[family][param] = apply_override(key, specs[family][param], value)
    return specs


class SearchSpace:
    """A define-by-run function ``space(trial) -> constants`` over the given families
    (a class rather than a closure so that Tune can pickle it into experiment snapshots)."""

    def __init__(
        self,
        families: Sequence[str],
        constants: dict,
        fusions: Sequence[str] = ("none",),
        targets: Sequence[str] = (),
        task_weighting: Sequence[str] = ("fixed",),
        task_weights: Optional[dict] = None,
        preset: str = "default",
        overrides: Optional[Mapping[str, Any]] = None,
    ) -> None:
        unknown = [f for f in families if f not in _families.names()]
        if unknown:
            raise ValueError(f"unknown model families {unknown}; known: {', '.join(_families.names())}")
        self.families = list(families)
        self.constants = dict(constants)
        self.fusions = list(fusions)
        self.targets = list(targets)
        self.task_weighting = list(task_weighting)
        self.task_weights = dict(task_weights or {})
        self.preset = preset
        self.specs = resolve_specs(self.families, preset, self.fusions, overrides)
        unknown_targets = [k for k in self.task_weights if k not in self.targets]
        if unknown_targets:
            raise ValueError(f"search.task_weights names {unknown_targets}, not targets; targets: {self.targets}")

    def __call__(self, trial) -> dict:
        family = trial.suggest_categorical("family", self.families)
        fixed: dict = {}
        _families.get(family).space(Suggester(trial, f"{family}/", self.specs[family], fixed))
        constants = {**self.constants, **fixed}
        if len(self.targets) > 1 and _families.get(family).graph:  # tabular: one model per target
            weighting = multitask_space(trial, self.targets, self.task_weighting)
            if weighting == "fixed":
                for t in self.targets:
                    constants[f"multitask/w_{t}"] = float(self.task_weights.get(t, _families.DEFAULT_TASK_WEIGHT))
        return constants

    def describe(self) -> dict:
        """The resolved space, readable: family -> param -> range, choices or fixed value."""
        out = {}
        for family, specs in self.specs.items():
            out[family] = {p: describe(spec) for p, spec in specs.items()}
        return {
            "families": out,
            "preset": self.preset,
            "targets": self.targets,
            "task_weighting": self.task_weighting if len(self.targets) > 1 else None,
        }

    def default_points(self) -> list[dict]:
        """Known-good points (Optuna param names) to seed the search: each family's DEFAULTS,
        with fusion ``early`` where allowed (else attention, none, late), kept inside any
        narrowed range and without fixed parameters; then each family's ``ALTERNATIVES``
        (variants of its DEFAULTS, e.g. lgbm with the L1 objective) that the space allows."""
        points = [self._default_point(family, {}) for family in self.families]
        for family in self.families:
            for variant in _families.get(family).ALTERNATIVES:
                point = self._default_point(family, variant)
                if point is not None and point not in points:
                    points.append(point)
        return points

    def groups(self) -> list[tuple[str, dict]]:
        """``[(group, point)]``: every group the space allows (a tabular family; a graph family x
        each fusion it may take), in family order, with the partial point (Optuna param names)
        that puts a trial in it: ``{"family": f}`` or ``{"family": f, "<f>/fusion": fusion}``."""
        out = []
        for family in self.families:
            if not _families.get(family).graph:
                out.append((family, {"family": family}))
                continue
            spec = self.specs[family]["fusion"]
            if isinstance(spec, Categorical):
                for fusion in spec.choices:
                    out.append((f"{family}-{fusion}", {"family": family, f"{family}/fusion": fusion}))
            else:  # fixed: not an Optuna parameter
                out.append((f"{family}-{spec[1]}", {"family": family}))
        return out

    def group_of_point(self, point: Mapping[str, Any]) -> str:
        """The group of a (partial) point in Optuna param names."""
        family = str(point["family"])
        if not _families.get(family).graph:
            return family
        spec = self.specs[family]["fusion"]
        fusion = point.get(f"{family}/fusion", spec[1] if isinstance(spec, tuple) else None)
        return f"{family}-{fusion}"

    def round_robin_points(self, per_group: int, known: Sequence[Mapping[str, Any]] = ()) -> list[dict]:
        """The points that start a search fair to every group: ``per_group`` rounds, each visiting
        every group of :meth:`groups` in order; a group's slot takes its next point of ``known``
        (e.g. :meth:`default_points`) if it has one left, else the group's partial point (the
        sampler then picks the other parameters).  The ``known`` points left over follow.  With
        one group (or ``per_group`` 0) this is ``known`` unchanged."""
        groups = self.groups()
        known = [dict(p) for p in known]
        if per_group <= 0 or len(groups) < 2:
            return known
        queue: dict[str, list[dict]] = {}
        for point in known:
            queue.setdefault(self.group_of_point(point), []).append(point)
        out = []
        for _ in range(per_group):
            for group, partial in groups:
                mine = queue.get(group)
                out.append(mine.pop(0) if mine else dict(partial))
        left = {id(p) for rest in queue.values() for p in rest}
        out += [p for p in known if id(p) in left]
        return out

    def _default_point(self, family: str, variant: dict) -> Optional[dict]:
        """DEFAULTS updated by ``variant``; None when the space excludes a value of ``variant``."""
        point: dict = {"family": family}
        fam = _families.get(family)
        defaults = fam.DEFAULTS
        if fam.graph:
            fusion_spec = self.specs[family]["fusion"]
            choices = fusion_spec.choices if isinstance(fusion_spec, Categorical) else (fusion_spec[1],)
            defaults["fusion"] = _fusion.default_fusion(choices)
            defaults.update({k: _fusion.DEFAULTS[k] for k in _fusion.USES[defaults["fusion"]]})
        defaults.update(variant)
        for param, value in defaults.items():
            spec = self.specs[family].get(param)
            if spec is None or isinstance(spec, tuple):
                if param in variant and isinstance(spec, tuple) and spec[1] != value:
                    return None  # the variant's value is not the fixed one
                continue  # fixed: not an Optuna parameter
            if isinstance(spec, Categorical):
                if value not in spec.choices:
                    if param in variant:
                        return None
                    value = spec.choices[0]
            else:
                value = min(max(value, spec.low), spec.high)
            point[f"{family}/{param}"] = value
        return point


def define_search_space(families: Sequence[str], constants: dict, **choices) -> SearchSpace:
    return SearchSpace(families, constants, **choices)


__all__ = ["PRESETS", "SearchSpace", "SpaceError", "define_search_space", "resolve_specs"]
