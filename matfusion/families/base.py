"""The interface every model family implements (one module per family in this package).

A family owns: its ``name``, its ``kind`` (``tabular``: trained on the descriptor matrix;
``graph``: a crystal-graph encoder, fused or not with the descriptor branch), whether it trains
in one shot (one report, outside ASHA's rungs), its typed hyperparameters (:attr:`Family.Params`,
a pydantic model whose field defaults are THE defaults of the family), its search space
(``PARAMS`` ranges, ``PRESETS`` replacing some of them, ``ALTERNATIVES`` seeded beside the
defaults), ``build`` (the unfitted model; model classes are imported inside, so importing the
registry imports no model), ``fit`` / ``predict`` and its checkpoint format.
"""

from __future__ import annotations

from typing import Any, ClassVar, Mapping, Optional

import numpy as np
from pydantic import BaseModel, ConfigDict

TABULAR = "tabular"
GRAPH = "graph"


class HyperParams(BaseModel):
    """Typed hyperparameters of one family (the ``config[family]`` section of a trial); an
    unknown key is an error naming it."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def defaults_of(params: type[HyperParams], names) -> dict:
    """The pydantic defaults of ``params`` for the parameters ``names`` (in that order)."""
    fields = params.model_fields
    return {name: fields[name].get_default(call_default_factory=True) for name in names}


class Family:
    """One model family.  Subclasses set the class attributes and implement ``build``,
    ``fit``, ``predict`` and the checkpoint pair; a module of this package that defines
    ``FAMILY = <instance>`` is registered (ordered by ``order``)."""

    name: ClassVar[str]
    kind: ClassVar[str]
    one_shot: ClassVar[bool] = False
    order: ClassVar[int] = 100  # place in families.names()
    Params: ClassVar[type[HyperParams]]
    PARAMS: ClassVar[Mapping[str, Any]]  # name -> spec (matfusion.spaces.params)
    PRESETS: ClassVar[Mapping[str, Mapping[str, Any]]] = {}
    ALTERNATIVES: ClassVar[tuple] = ()  # variants of DEFAULTS also seeded into the search
    checkpoint_file: ClassVar[str]
    needs_line_graph: ClassVar[bool] = False  # graph data with bond angles (features.line_graph)

    @property
    def graph(self) -> bool:
        return self.kind == GRAPH

    @property
    def DEFAULTS(self) -> dict:  # noqa: N802  (the space's name for it)
        """The known-good point seeding the search: the pydantic defaults of the searched params."""
        return defaults_of(self.Params, self.PARAMS)

    def parse(self, section: Optional[Mapping]) -> HyperParams:
        """The typed hyperparameters of a ``config[family]`` section (pydantic errors on a bad key)."""
        if isinstance(section, self.Params):
            return section
        return self.Params.model_validate(dict(section or {}))

    # -- search space ------------------------------------------------------------------------------
    def search_specs(self, preset: str = "default", fusions=None) -> dict:
        """param -> spec under ``preset``."""
        specs = dict(self.PARAMS)
        specs.update(self.PRESETS.get(preset, {}))
        return specs

    def space(self, s) -> None:
        """Suggest this family's parameters through the Suggester ``s`` (define-by-run)."""
        s.all(self.PARAMS)

    # -- training, prediction, checkpoints ---------------------------------------------------------
    def fit(self, trial, data: dict, session) -> dict:
        """Train on packed trial data (``pack_trial_data``), reporting through ``session``;
        returns the trained state.  ``trial`` is a :class:`~matfusion.families.TrialConfig`."""
        raise NotImplementedError

    def predict(self, trial, state: dict, part: dict, graph_params: dict) -> np.ndarray:
        """(n, k) predictions of a trained state on a packed part."""
        raise NotImplementedError

    # -- one plain model on a descriptor matrix (residual fusion's t, inside a graph trial) -------
    def fit_matrix(self, params: HyperParams, X: np.ndarray, y: np.ndarray, seed: int = 0, n_jobs: int = 1):
        """One model fitted on (X, y) in one go (one target), as a picklable object for
        :meth:`predict_matrix`.  Tabular families only."""
        raise NotImplementedError(f"family {self.name} cannot fit a plain descriptor matrix")

    def predict_matrix(self, model, X: np.ndarray) -> np.ndarray:
        """(n,) predictions of a :meth:`fit_matrix` model."""
        raise NotImplementedError(f"family {self.name} cannot fit a plain descriptor matrix")

    def write_checkpoint(self, state: dict, directory: str) -> None:
        raise NotImplementedError

    def read_checkpoint(self, directory: str) -> dict:
        raise NotImplementedError

    def slim_state(self, state: dict) -> dict:
        """What prediction needs of a trained state (an ensemble keeps these)."""
        return state

    def __repr__(self) -> str:
        return f"<family {self.name} ({self.kind}{', one-shot' if self.one_shot else ''})>"
