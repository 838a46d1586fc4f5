"""Define-by-run Optuna search spaces, one function per model family, composed here.

The first choice of every trial is the model family; each family then suggests only its own
parameters, named ``<family>/<param>`` (Ray's OptunaSearch un-flattens them into
``config[family][param]``).  Constants (epochs, seed, ...) are returned by the space
function and merged into the trial config.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

from .alignn import alignn_space
from .cgcnn import cgcnn_space
from .fusion import fusion_space
from .multitask import multitask_space
from .rf import rf_space

FAMILY_SPACES: dict[str, Callable] = {"rf": rf_space, "cgcnn": cgcnn_space, "alignn": alignn_space}


class SearchSpace:
    """A define-by-run function ``space(trial) -> constants`` over the given families
    (a class rather than a closure so that Tune can pickle it into experiment snapshots)."""

    def __init__(self, families: Sequence[str], constants: dict, fusions: Sequence[str] = ("none",),
                 targets: Sequence[str] = (), task_weighting: Sequence[str] = ("fixed",),
                 task_weights: Optional[dict] = None) -> None:
        unknown = [f for f in families if f not in FAMILY_SPACES]
        if unknown:
            raise ValueError(f"unknown model families {unknown}; known: {', '.join(FAMILY_SPACES)}")
        self.families = list(families)
        self.constants = dict(constants)
        self.fusions = list(fusions)
        self.targets = list(targets)
        self.task_weighting = list(task_weighting)
        self.task_weights = dict(task_weights or {})
        unknown_targets = [k for k in self.task_weights if k not in self.targets]
        if unknown_targets:
            raise ValueError(f"search.task_weights names {unknown_targets}, not targets; targets: {self.targets}")

    def __call__(self, trial) -> dict:
        family = trial.suggest_categorical("family", self.families)
        FAMILY_SPACES[family](trial, prefix=f"{family}/")
        if family != "rf":
            fusion_space(trial, f"{family}/", self.fusions)
        constants = dict(self.constants)
        if len(self.targets) > 1 and family != "rf":
            weighting = multitask_space(trial, self.targets, self.task_weighting)
            if weighting == "fixed":
                for t in self.targets:
                    constants[f"multitask/w_{t}"] = float(self.task_weights.get(t, 1.0))
        return constants


def define_search_space(families: Sequence[str], constants: dict, **choices) -> SearchSpace:
    return SearchSpace(families, constants, **choices)
