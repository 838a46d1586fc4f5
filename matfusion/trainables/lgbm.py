"""LightGBM gradient-boosted trees on the descriptor matrix, trained in chunks of boosting rounds.

:class:`ChunkedLGBM` is a scikit-learn style regressor (``fit`` / ``predict``) whose training
can also be advanced chunk by chunk (:meth:`ChunkedLGBM.boost`), so that a trial reports its
validation MAE every ``rounds_per_epoch`` rounds, on the same budget axis as a GNN's epochs
(ASHA may stop it), and checkpoints its trees (:meth:`get_state` / :meth:`from_state`).

Every chunk is one ``lightgbm.train`` call continuing from the trees so far (``init_model``) with
the seed ``seed + chunk``: an uninterrupted training and one restored from a checkpoint after any
chunk make the same calls and give the same trees.  NaN features are handled natively by
LightGBM (missing values go to the side of each split that fits best).
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from ..families.lgbm import OBJECTIVES


class ChunkedLGBM:
    """One LightGBM booster for one target.

    Parameters: ``learning_rate``, ``num_leaves``, ``min_child_samples``, ``feature_fraction``,
    ``bagging_fraction`` (bagging every round when < 1), ``lambda_l1``, ``lambda_l2``,
    ``objective`` (``l2`` | ``l1`` | ``huber``; huber's delta is the training targets' std),
    ``max_bin``, ``seed``, ``n_jobs`` (threads).  The defaults of the hyperparameters are those of
    the lgbm family (:class:`matfusion.families.lgbm.LGBMParams`), which builds this model.
    """

    def __init__(
        self,
        *,
        learning_rate: float,
        num_leaves: int,
        min_child_samples: int,
        feature_fraction: float,
        bagging_fraction: float,
        lambda_l1: float,
        lambda_l2: float,
        objective: str,
        max_bin: int,
        seed: int = 0,
        n_jobs: int = 1,
    ) -> None:
        if objective not in OBJECTIVES:
            raise ValueError(f"lgbm objective {objective!r} not allowed; allowed values: {list(OBJECTIVES)}")
        self.learning_rate = float(learning_rate)
        self.num_leaves = int(num_leaves)
        self.min_child_samples = int(min_child_samples)
        self.feature_fraction = float(feature_fraction)
        self.bagging_fraction = float(bagging_fraction)
        self.lambda_l1 = float(lambda_l1)
        self.lambda_l2 = float(lambda_l2)
        self.objective = objective
        self.max_bin = int(max_bin)
        self.seed = int(seed)
        self.n_jobs = int(n_jobs)
        self.booster_ = None
        self.chunks_ = 0

    def _params(self, y: np.ndarray, chunk: int) -> dict:
        params = {
            "objective": {"l2": "regression", "l1": "regression_l1", "huber": "huber"}[self.objective],
            "learning_rate": self.learning_rate,
            "num_leaves": self.num_leaves,
            "min_data_in_leaf": self.min_child_samples,
            "feature_fraction": self.feature_fraction,
            "bagging_fraction": self.bagging_fraction,
            "bagging_freq": 1 if self.bagging_fraction < 1 else 0,
            "lambda_l1": self.lambda_l1,
            "lambda_l2": self.lambda_l2,
            "max_bin": self.max_bin,
            "seed": self.seed + chunk,
            "num_threads": self.n_jobs,
            "deterministic": True,
            "force_col_wise": True,
            "verbose": -1,
        }
        if self.objective == "huber":
            params["alpha"] = float(np.std(y)) or 1.0
        return params

    @property
    def n_rounds_(self) -> int:
        return 0 if self.booster_ is None else int(self.booster_.current_iteration())

    def dataset(self, X: np.ndarray, y: np.ndarray):
        """The LightGBM Dataset of (X, y), binned once and reusable by every :meth:`boost` call."""
        import lightgbm as lgb

        X = np.asarray(X, dtype=np.float64)
        y = np.asarray(y, dtype=np.float64)
        if not np.all(np.isfinite(y)):
            raise ValueError("lgbm: targets must be finite (pass the labelled rows only)")
        return lgb.Dataset(X, y, free_raw_data=False, params={"max_bin": self.max_bin, "verbose": -1})

    def boost(self, X: np.ndarray, y: np.ndarray, rounds: int, data=None) -> "ChunkedLGBM":
        """Add ``rounds`` boosting rounds trained on (X, y) (labelled rows only) to the model;
        ``data`` may pass :meth:`dataset` of the same (X, y) to skip binning it again."""
        import lightgbm as lgb

        data = data if data is not None else self.dataset(X, y)
        self.booster_ = lgb.train(
            self._params(np.asarray(y, dtype=np.float64), self.chunks_),
            data,
            num_boost_round=int(rounds),
            init_model=self.booster_,
        )
        self.chunks_ += 1
        return self

    def fit(self, X: np.ndarray, y: np.ndarray, rounds: int = 500) -> "ChunkedLGBM":
        """Train from scratch for ``rounds`` rounds in one chunk."""
        self.booster_, self.chunks_ = None, 0
        return self.boost(X, y, rounds)

    def predict(self, X: np.ndarray, rounds: Optional[int] = None, start: int = 0) -> np.ndarray:
        """Predictions using the first ``rounds`` rounds (default all); with ``start``, only the
        contribution of rounds ``start .. rounds - 1`` (the sum over consecutive ranges is the
        prediction, so a chunked training can update its predictions incrementally)."""
        if self.booster_ is None:
            raise RuntimeError("this ChunkedLGBM is not fitted yet: call fit() or boost() first")
        X = np.asarray(X, dtype=np.float64)
        n = self.n_rounds_ if rounds is None else min(int(rounds), self.n_rounds_)
        if n - start <= 0:
            return np.zeros(len(X))
        return np.asarray(
            self.booster_.predict(X, start_iteration=int(start), num_iteration=n - int(start), num_threads=self.n_jobs),
            dtype=np.float64,
        )

    def get_state(self) -> dict:
        """Picklable state: hyperparameters, the trees (LightGBM's text format) and the chunk count."""
        params = {
            k: getattr(self, k)
            for k in (
                "learning_rate",
                "num_leaves",
                "min_child_samples",
                "feature_fraction",
                "bagging_fraction",
                "lambda_l1",
                "lambda_l2",
                "objective",
                "max_bin",
                "seed",
                "n_jobs",
            )
        }
        return {
            "params": params,
            "model": None if self.booster_ is None else self.booster_.model_to_string(),
            "chunks": self.chunks_,
        }

    @classmethod
    def from_state(cls, state: dict) -> "ChunkedLGBM":
        import lightgbm as lgb

        model = cls(**state["params"])
        if state.get("model"):
            model.booster_ = lgb.Booster(model_str=state["model"])
        model.chunks_ = int(state.get("chunks", 0))
        return model
