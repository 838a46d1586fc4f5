"""The model family registry: one module per family in this package (see docs/families.md).

A module here that defines ``FAMILY`` (a :class:`~matfusion.families.base.Family`) is a
family; :func:`names` lists them by their ``order``.  Importing the registry imports no model
class (each family imports its models inside ``build`` / ``fit``).

- :func:`get` (name -> Family), :func:`names`, :data:`TABULAR`, :data:`GRAPH`, :data:`ONE_SHOT`
- :data:`FUSIONS` and the fusion home :mod:`.fusion`
- :func:`fusion_of` / :func:`group_of`: THE labels of a trial config (``none`` / ``rf``,
  ``lgbm``, ``cgcnn-early``, ``alignn-none``, ...)
- :class:`TrialConfig`: the typed trial config
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any, Mapping, Sequence, Union

from .base import Family, HyperParams
from .fusion import FUSIONS
from .trial_config import DEFAULT_TASK_WEIGHT, TASK_WEIGHTINGS, Multitask, TrialConfig, TrialConfigError


class UnknownFamilyError(ValueError):
    """A family name the registry does not know; the message lists the known ones."""


def _discover() -> dict[str, Family]:
    found: dict[str, Family] = {}
    for info in pkgutil.iter_modules(__path__):
        module = importlib.import_module(f"{__name__}.{info.name}")
        family = getattr(module, "FAMILY", None)
        if not isinstance(family, Family):
            continue
        if family.name in found:
            raise RuntimeError(f"model family {family.name!r} is defined twice ({module.__name__})")
        found[family.name] = family
    return dict(sorted(found.items(), key=lambda kv: (kv[1].order, kv[0])))


_REGISTRY = _discover()
NAMES = tuple(_REGISTRY)
TABULAR = tuple(n for n, f in _REGISTRY.items() if not f.graph)
GRAPH = tuple(n for n, f in _REGISTRY.items() if f.graph)
# tabular families trained in one shot: one report, outside ASHA's rungs (lgbm reports every chunk)
ONE_SHOT = tuple(n for n, f in _REGISTRY.items() if f.one_shot)


def names() -> tuple[str, ...]:
    """Every family, in registry order (rf, lgbm, et, cgcnn, alignn)."""
    return NAMES


def get(name: str) -> Family:
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise UnknownFamilyError(f"unknown model family {name!r}; known: {', '.join(NAMES)}") from None


def needs_line_graph(family_names: Sequence[str]) -> bool:
    """Whether any of these families needs graphs with their line graph (features.line_graph)."""
    return any(get(n).needs_line_graph for n in family_names)


def fusion_of(config: Union[TrialConfig, Mapping[str, Any]]) -> str:
    """The fusion of a trial config (dict or TrialConfig): ``none`` for a tabular family, else its
    section's ``fusion`` (default ``none``).  A flat row with ``family`` and ``fusion`` (e.g. a
    leaderboard row) is read the same way."""
    if isinstance(config, TrialConfig):
        return str(config.params.fusion) if get(config.family).graph else "none"
    family = get(str(config.get("family")))
    if not family.graph:
        return "none"
    section = config.get(family.name)
    if isinstance(section, Mapping):
        return str(section.get("fusion", "none"))
    if isinstance(section, HyperParams):
        return str(section.fusion)
    fusion = config.get("fusion")
    return str(fusion) if fusion not in (None, "", "-") else "none"


def group_of(config: Union[TrialConfig, Mapping[str, Any]]) -> str:
    """The group of a trial: the family for a tabular one, ``<family>-<fusion>`` for a graph one."""
    family = config.family if isinstance(config, TrialConfig) else str(config.get("family"))
    return family if not get(family).graph else f"{family}-{fusion_of(config)}"


__all__ = [
    "DEFAULT_TASK_WEIGHT",
    "FUSIONS",
    "Family",
    "GRAPH",
    "HyperParams",
    "Multitask",
    "NAMES",
    "ONE_SHOT",
    "TABULAR",
    "TASK_WEIGHTINGS",
    "TrialConfig",
    "TrialConfigError",
    "UnknownFamilyError",
    "fusion_of",
    "get",
    "group_of",
    "names",
    "needs_line_graph",
]
