"""What the scikit-learn forests (rf, et) share: one forest per target on its labelled rows,
trained in one shot (one report at epoch 1, outside ASHA's rungs), checkpointed as the pickled
list of forests (``model.pkl``)."""

from __future__ import annotations

import os
import pickle

import numpy as np

from .base import TABULAR, Family


class ForestFamily(Family):
    kind = TABULAR
    one_shot = True
    checkpoint_file = "model.pkl"

    def build(self, params, seed: int = 0, n_jobs: int = 1):
        """The unfitted scikit-learn forest of ``params`` (every typed parameter goes to it)."""
        from ..trainables.forest import forest

        return forest(self.name, **params.model_dump(), seed=seed, n_jobs=n_jobs)

    def fit(self, trial, data: dict, session) -> dict:
        from ..trainables.tabular import fit_forest_trial

        return fit_forest_trial(trial, data, session, self._builder(trial.params, trial))

    def _builder(self, params, trial):
        return lambda: self.build(params, seed=trial.seed, n_jobs=trial.threads)

    def predict(self, trial, state: dict, part: dict, graph_params: dict) -> np.ndarray:
        from ..trainables.tabular import predict_forests

        forests = state[self.name]
        return predict_forests(forests if isinstance(forests, list) else [forests], part["descriptors"])

    def fit_matrix(self, params, X: np.ndarray, y: np.ndarray, seed: int = 0, n_jobs: int = 1):
        return self.build(params, seed=seed, n_jobs=n_jobs).fit(X, y)

    def predict_matrix(self, model, X: np.ndarray) -> np.ndarray:
        return np.asarray(model.predict(X), dtype=np.float64)

    def write_checkpoint(self, state: dict, directory: str) -> None:
        with open(os.path.join(directory, self.checkpoint_file), "wb") as fh:
            pickle.dump(state[self.name], fh)

    def read_checkpoint(self, directory: str) -> dict:
        with open(os.path.join(directory, self.checkpoint_file), "rb") as fh:
            forests = pickle.load(fh)
        return {self.name: forests if isinstance(forests, list) else [forests]}

    def slim_state(self, state: dict) -> dict:
        return {self.name: state[self.name]}
