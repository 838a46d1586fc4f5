"""LightGBM on the descriptor matrix, trained in chunks of boosting rounds.

``n_estimators`` is the trial's total number of boosting rounds; they are spread over the
trial's ``max_epochs`` reported epochs (``ceil(n_estimators / max_epochs)`` rounds each, or
``rounds_per_epoch`` when given), so an lgbm trial lives on the same budget axis as a GNN and
ASHA may stop it at a rung.  Checkpoint: the pickled trial state (``state.pkl``: the trees as
LightGBM text, no torch needed).
"""

from __future__ import annotations

import math
import os
import pickle
from typing import Literal, Optional

import numpy as np
from pydantic import Field

from ..spaces.params import Categorical, Float, Int
from .base import TABULAR, Family, HyperParams

OBJECTIVES = ("l2", "l1", "huber")


class LGBMParams(HyperParams):
    n_estimators: int = Field(1500, ge=1, description="boosting rounds of the whole trial")
    learning_rate: float = Field(0.03, gt=0.0)
    num_leaves: int = Field(31, ge=2)
    min_child_samples: int = Field(10, ge=1)
    feature_fraction: float = Field(0.5, gt=0.0, le=1.0)
    bagging_fraction: float = Field(0.8, gt=0.0, le=1.0, description="bagging every round when < 1")
    lambda_l1: float = Field(1e-3, ge=0.0)
    lambda_l2: float = Field(1e-2, ge=0.0)
    objective: Literal[OBJECTIVES] = Field("l2", description="huber's delta is the training targets' std")
    max_bin: int = Field(63, ge=2)
    rounds_per_epoch: Optional[int] = Field(None, ge=1, description="default: ceil(n_estimators / max_epochs)")


PARAMS = {
    "n_estimators": Int(300, 3000, step=100),
    "learning_rate": Float(0.01, 0.2, log=True),
    "num_leaves": Int(7, 127, log=True),
    "min_child_samples": Int(3, 60, log=True),
    "feature_fraction": Float(0.2, 1.0),
    "bagging_fraction": Float(0.5, 1.0),
    "lambda_l1": Float(1e-4, 10.0, log=True),
    "lambda_l2": Float(1e-4, 30.0, log=True),
    "objective": Categorical(OBJECTIVES),
    "max_bin": Categorical((63, 255)),
}
PRESETS = {
    "quick": {"n_estimators": Int(100, 800, step=50), "num_leaves": Int(7, 63, log=True)},
    "thorough": {"n_estimators": Int(500, 6000, step=250), "learning_rate": Float(0.005, 0.2, log=True)},
}
# also seeded: the L1 objective (fits the median; see docs/notes-families.md for why both)
ALTERNATIVES = ({"objective": "l1"},)
STATE_KEYS = ("lgbm", "best_rounds", "best_val_mae", "best_epoch", "target_names")


class LightGBM(Family):
    name = "lgbm"
    kind = TABULAR
    one_shot = False  # reports every chunk of rounds: ASHA may stop it
    order = 20
    Params = LGBMParams
    PARAMS = PARAMS
    PRESETS = PRESETS
    ALTERNATIVES = ALTERNATIVES
    checkpoint_file = "state.pkl"

    def build(self, params: LGBMParams, seed: int = 0, n_jobs: int = 1):
        """One unfitted :class:`~matfusion.trainables.lgbm.ChunkedLGBM` (one per target is trained)."""
        from ..trainables.lgbm import ChunkedLGBM

        return ChunkedLGBM(
            learning_rate=params.learning_rate,
            num_leaves=params.num_leaves,
            min_child_samples=params.min_child_samples,
            feature_fraction=params.feature_fraction,
            bagging_fraction=params.bagging_fraction,
            lambda_l1=params.lambda_l1,
            lambda_l2=params.lambda_l2,
            objective=params.objective,
            max_bin=params.max_bin,
            seed=seed,
            n_jobs=n_jobs,
        )

    @staticmethod
    def rounds_per_epoch(params: LGBMParams, max_epochs: int) -> int:
        if params.rounds_per_epoch:
            return max(1, int(params.rounds_per_epoch))
        return max(1, math.ceil(params.n_estimators / max(1, int(max_epochs))))

    def fit(self, trial, data: dict, session) -> dict:
        from ..trainables.tabular import fit_lgbm

        return fit_lgbm(
            trial,
            data,
            session,
            build=lambda: self.build(trial.params, trial.seed, trial.threads),
            chunk=self.rounds_per_epoch(trial.params, trial.max_epochs),
        )

    def predict(self, trial, state: dict, part: dict, graph_params: dict) -> np.ndarray:
        from ..trainables.tabular import predict_lgbm

        return predict_lgbm(state, part["descriptors"])

    def fit_matrix(self, params: LGBMParams, X: np.ndarray, y: np.ndarray, seed: int = 0, n_jobs: int = 1):
        """``n_estimators`` rounds in one go (no early stopping) -> the booster's picklable state."""
        return self.build(params, seed=seed, n_jobs=n_jobs).fit(X, y, rounds=params.n_estimators).get_state()

    def predict_matrix(self, model, X: np.ndarray) -> np.ndarray:
        from ..trainables.lgbm import ChunkedLGBM

        return ChunkedLGBM.from_state(model).predict(X)

    def write_checkpoint(self, state: dict, directory: str) -> None:
        with open(os.path.join(directory, self.checkpoint_file), "wb") as fh:
            pickle.dump(state, fh)

    def read_checkpoint(self, directory: str) -> dict:
        with open(os.path.join(directory, self.checkpoint_file), "rb") as fh:
            return pickle.load(fh)

    def slim_state(self, state: dict) -> dict:
        return {k: state[k] for k in STATE_KEYS if k in state}


FAMILY = LightGBM()
DEFAULTS = FAMILY.DEFAULTS
