"""Define-by-run Optuna search spaces, one function per model family, composed here.

The first choice of every trial is the model family; each family then suggests only its own
parameters, named ``<family>/<param>`` (Ray's OptunaSearch un-flattens them into
``config[family][param]``).  Constants (epochs, seed, ...) are returned by the space
function and merged into the trial config.
"""
from __future__ import annotations

from typing import Callable, Sequence

from .cgcnn import cgcnn_space
from .rf import rf_space

FAMILY_SPACES: dict[str, Callable] = {"rf": rf_space, "cgcnn": cgcnn_space}


class SearchSpace:
    """A define-by-run function ``space(trial) -> constants`` over the given families
    (a class rather than a closure so that Tune can pickle it into experiment snapshots)."""

    def __init__(self, families: Sequence[str], constants: dict) -> None:
        unknown = [f for f in families if f not in FAMILY_SPACES]
        if unknown:
            raise ValueError(f"unknown model families {unknown}; known: {', '.join(FAMILY_SPACES)}")
        self.families = list(families)
        self.constants = dict(constants)

    def __call__(self, trial) -> dict:
        family = trial.suggest_categorical("family", self.families)
        FAMILY_SPACES[family](trial, prefix=f"{family}/")
        return dict(self.constants)


def define_search_space(families: Sequence[str], constants: dict) -> SearchSpace:
    return SearchSpace(families, constants)
