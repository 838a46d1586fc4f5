"""Parameter specs for the define-by-run spaces, and the rules to fix or narrow them.

A family declares ``PARAMS`` (name -> spec), optional ``PRESETS`` (preset -> name -> spec
replacing the default range) and ``DEFAULTS`` (a known-good point).  A config may then, per
parameter, *fix* it (a scalar), *narrow* a numeric range (``{low: .., high: ..}``) or narrow
the choices of a categorical (a list).  Narrowing outside the declared range is an error.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Mapping, Sequence, Union


@dataclass(frozen=True)
class Int:
    low: int
    high: int
    step: int = 1
    log: bool = False


@dataclass(frozen=True)
class Float:
    low: float
    high: float
    log: bool = False


@dataclass(frozen=True)
class Categorical:
    choices: tuple


Spec = Union[Int, Float, Categorical]


class SpaceError(ValueError):
    """A fixed or narrowed parameter that the space cannot take; names the parameter."""


def describe(spec: Union[Spec, tuple]) -> str:
    if isinstance(spec, tuple):  # ("fixed", value): an override fixed it
        return f"fixed {spec[1]!r}"
    if isinstance(spec, Categorical):
        return f"one of {list(spec.choices)}"
    return f"{'int' if isinstance(spec, Int) else 'float'} in [{spec.low}, {spec.high}]{' (log)' if spec.log else ''}"


def apply_override(name: str, spec: Spec, override: Any) -> Union[Spec, tuple]:
    """Return the narrowed spec, or ``("fixed", value)`` for a fixed parameter."""
    if isinstance(override, Mapping):
        if isinstance(spec, Categorical):
            raise SpaceError(f"search.space.{name}: categorical ({describe(spec)}); narrow it with a list of choices")
        unknown = set(override) - {"low", "high"}
        if unknown:
            raise SpaceError(f"search.space.{name}: unknown keys {sorted(unknown)}; use low and/or high")
        low, high = override.get("low", spec.low), override.get("high", spec.high)
        if not (spec.low <= low <= high <= spec.high):
            raise SpaceError(f"search.space.{name}: [{low}, {high}] is not inside the space's {describe(spec)}")
        if isinstance(spec, Int):
            if int(low) != low or int(high) != high:
                raise SpaceError(f"search.space.{name}: integer parameter; got low={low}, high={high}")
            return replace(spec, low=int(low), high=int(high))
        return replace(spec, low=float(low), high=float(high))
    if isinstance(override, (list, tuple)):
        if not override:
            raise SpaceError(f"search.space.{name}: an empty list of choices")
        if isinstance(spec, Categorical):
            bad = [c for c in override if c not in spec.choices]
            if bad:
                raise SpaceError(f"search.space.{name}: {bad} not allowed; allowed values: {list(spec.choices)}")
        else:
            bad = [c for c in override if not spec.low <= c <= spec.high]
            if bad:
                raise SpaceError(f"search.space.{name}: {bad} outside {describe(spec)}")
        return Categorical(tuple(override))
    # a scalar: fixed
    if isinstance(spec, Categorical):
        if override not in spec.choices:
            raise SpaceError(f"search.space.{name}: {override!r} not allowed; allowed values: {list(spec.choices)}")
    elif not isinstance(override, (int, float)) or isinstance(override, bool):
        raise SpaceError(f"search.space.{name}: expected a number ({describe(spec)}), got {override!r}")
    elif isinstance(spec, Int) and int(override) != override:
        raise SpaceError(f"search.space.{name}: expected an integer, got {override!r}")
    return ("fixed", override)


def suggest(trial, name: str, spec: Spec):
    if isinstance(spec, Categorical):
        return trial.suggest_categorical(name, list(spec.choices))
    if isinstance(spec, Int):
        return trial.suggest_int(name, spec.low, spec.high, step=spec.step, log=spec.log)
    return trial.suggest_float(name, spec.low, spec.high, log=spec.log)


class Suggester:
    """Suggests ``<prefix><param>`` from a family's resolved specs; fixed params go to ``fixed``."""

    def __init__(self, trial, prefix: str, specs: Mapping[str, Union[Spec, tuple]], fixed: dict) -> None:
        self.trial, self.prefix, self.specs, self.fixed = trial, prefix, specs, fixed

    def __call__(self, param: str):
        spec = self.specs[param]
        key = self.prefix + param
        if isinstance(spec, tuple) and spec[0] == "fixed":
            self.fixed[key] = spec[1]
            return spec[1]
        return suggest(self.trial, key, spec)

    def all(self, params: Sequence[str]) -> dict:
        return {p: self(p) for p in params}
