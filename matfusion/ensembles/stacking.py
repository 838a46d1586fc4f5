"""Out-of-fold stacking of searched trial configs.

:class:`StackedEnsemble` takes a few trial configs (as the search ran them, see
:func:`matfusion.ensembles.select.select_members`) and the *training* rows of an outer fold.
It splits those rows into K seeded folds; for every fold and every member it trains the member
(with :func:`~matfusion.trainables.trial.fit_family`) on the other K-1 folds, with a small
seeded early-stopping split carved out of those training rows, and predicts the held-out fold.
The resulting out-of-fold (OOF) matrix, one column per member, is what the meta-learner is
fitted on: every OOF prediction comes from a model that never saw that row, so the
meta-learner learns how members behave on unseen data, not how well they memorised it.

Meta-learners (:func:`make_meta`):

* ``mae`` (default): a convex blend, weights >= 0 summing to 1 and no intercept, that minimizes
  the mean absolute error of the OOF predictions (an exact linear program).  It optimizes the
  metric matbench scores, and a heavy-tailed target cannot pull it into rescaling the members
  as a least-squares fit does;
* ``nnls``: non-negative weights (``scipy.optimize.nnls``) on the centred OOF columns, the
  intercept is ``mean(y) - mean(X) @ w``; interpretable, cannot overfit much;
* ``ridge``: ``sklearn.linear_model.Ridge`` (weights may be negative);
* ``gbm``: ``sklearn.ensemble.HistGradientBoostingRegressor`` (non-linear, can use context).

``context_features=c`` appends the first ``c`` Magpie columns to the meta-learner's input
(``ridge`` / ``gbm`` only), so the blend may depend on the composition.

Multi-target (``targets`` of shape (N, k), NaN = missing label): every member is trained once
per fold on all k targets (``fit_family`` masks missing labels), the OOF predictions are
(n, members, k), and one meta-learner per target is fitted on the rows that have that target's
label only (``meta_fit_rows_[t]``).  ``predict`` then returns (n, k) arrays; with a single
target everything stays 1-D as before.

Uncertainty: conformal intervals calibrated on the OOF residuals of the training rows, per
target (:mod:`matfusion.ensembles.calibration`, docs/uncertainty.md).
"""

from __future__ import annotations

import copy
import logging
import typing
from numbers import Integral, Real
from typing import Optional, Sequence

import numpy as np
from sklearn.base import BaseEstimator, RegressorMixin, clone

from .. import families
from ..config import EnsembleConfig
from .calibration import DIFFICULTIES, ONE_SIGMA, ConformalCalibrator, check_coverage, check_refit_gain

log = logging.getLogger("matfusion.ensembles")

_DEFAULTS = EnsembleConfig()  # the one home of the ensemble defaults (meta, n_folds, refit, max_epochs)
META_LEARNERS = typing.get_args(EnsembleConfig.model_fields["meta"].annotation)  # ("mae", "nnls", "ridge", "gbm")
DEFAULT_GRAPH_PARAMS = {"gaussian_bins": 40, "gaussian_width": None}
DEFAULT_COVERAGE = _DEFAULTS.coverage  # the conformal interval's coverage
DEFAULT_DIFFICULTY = _DEFAULTS.difficulty  # what scales it per row


def member_name(config: dict) -> str:
    """A short readable name of a member: its group (``rf``, ``cgcnn-early``, ``alignn-none`` ...)."""
    return families.group_of(config)


def unique_names(configs: Sequence[dict]) -> list[str]:
    """Member names made unique by a suffix (``rf``, ``rf_2``, ...): they become MLflow metric and
    param names (``member.rf_2_mae``), which allow only alphanumerics, ``_ - . : /`` and spaces."""
    names, seen = [], {}
    for c in configs:
        base = member_name(c)
        seen[base] = seen.get(base, 0) + 1
        names.append(base if seen[base] == 1 else f"{base}_{seen[base]}")
    return names


# -- meta-learners ------------------------------------------------------------------------------


class ConvexMAEMeta(RegressorMixin, BaseEstimator):
    """min_w sum_i |y_i - X_i w|  subject to  w >= 0, sum(w) = 1 (no intercept).

    Solved exactly as the linear program  min sum(u + v)  s.t.  X w + u - v = y,  w, u, v >= 0,
    sum(w) = 1  (``scipy.optimize.linprog``, HiGHS; the constraint matrix is sparse)."""

    name = "mae"

    def fit(self, X: np.ndarray, y: np.ndarray) -> "ConvexMAEMeta":
        from scipy import sparse
        from scipy.optimize import linprog

        X = np.asarray(X, dtype=np.float64)
        y = np.asarray(y, dtype=np.float64)
        n, m = X.shape
        eye = sparse.identity(n, format="csr")
        A_eq = sparse.vstack(
            [
                sparse.hstack([sparse.csr_matrix(X), eye, -eye]),
                sparse.hstack([sparse.csr_matrix(np.ones((1, m))), sparse.csr_matrix((1, 2 * n))]),
            ]
        )
        b_eq = np.concatenate([y, [1.0]])
        cost = np.concatenate([np.zeros(m), np.ones(2 * n)])
        res = linprog(cost, A_eq=A_eq.tocsr(), b_eq=b_eq, bounds=(0, None), method="highs")
        if not res.success:  # cannot happen for a feasible LP; fall back to the best single column
            log.warning("MAE blend: linprog failed (%s); using the best single member", res.message)
            w = np.zeros(m)
            w[int(np.argmin(np.abs(X - y[:, None]).mean(axis=0)))] = 1.0
        else:
            w = np.clip(res.x[:m], 0.0, None)
            w = w / w.sum()
        self.coef_ = w
        self.intercept_ = 0.0
        return self

    def predict(self, X: np.ndarray) -> np.ndarray:
        return np.asarray(X, dtype=np.float64) @ self.coef_


class NNLSMeta(RegressorMixin, BaseEstimator):
    """y ~ b + X @ w with w >= 0 (least squares); b absorbed by centring X and y."""

    name = "nnls"

    def fit(self, X: np.ndarray, y: np.ndarray) -> "NNLSMeta":
        from scipy.optimize import nnls

        X = np.asarray(X, dtype=np.float64)
        y = np.asarray(y, dtype=np.float64)
        self.x_mean_ = X.mean(axis=0)
        self.y_mean_ = float(y.mean())
        self.coef_, _ = nnls(X - self.x_mean_, y - self.y_mean_)
        self.intercept_ = self.y_mean_ - float(self.x_mean_ @ self.coef_)
        return self

    def predict(self, X: np.ndarray) -> np.ndarray:
        return np.asarray(X, dtype=np.float64) @ self.coef_ + self.intercept_


class RidgeMeta(RegressorMixin, BaseEstimator):
    """``sklearn.linear_model.Ridge`` on the OOF columns (and standardized context columns)."""

    name = "ridge"

    def __init__(self, alpha: float = 1.0) -> None:
        self.alpha = alpha

    def fit(self, X: np.ndarray, y: np.ndarray) -> "RidgeMeta":
        from sklearn.linear_model import Ridge

        self.model_ = Ridge(alpha=self.alpha).fit(np.asarray(X, dtype=np.float64), y)
        self.coef_ = np.asarray(self.model_.coef_, dtype=np.float64)
        self.intercept_ = float(self.model_.intercept_)
        return self

    def predict(self, X: np.ndarray) -> np.ndarray:
        return self.model_.predict(np.asarray(X, dtype=np.float64))


class GBMMeta(RegressorMixin, BaseEstimator):
    """``sklearn.ensemble.HistGradientBoostingRegressor`` (shallow, seeded)."""

    name = "gbm"

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed

    def fit(self, X: np.ndarray, y: np.ndarray) -> "GBMMeta":
        from sklearn.ensemble import HistGradientBoostingRegressor
        from threadpoolctl import threadpool_limits

        # one thread: the OOF matrix is small (see docs/notes-ensembles.md)
        with threadpool_limits(1):
            self.model_ = HistGradientBoostingRegressor(
                max_iter=200,
                learning_rate=0.05,
                max_depth=3,
                min_samples_leaf=max(5, len(y) // 50),
                early_stopping=False,
                random_state=self.seed,
            ).fit(np.asarray(X, dtype=np.float64), y)
        self.coef_ = None
        self.intercept_ = None
        return self

    def predict(self, X: np.ndarray) -> np.ndarray:
        from threadpoolctl import threadpool_limits

        with threadpool_limits(1):
            return self.model_.predict(np.asarray(X, dtype=np.float64))


def make_meta(meta: str, seed: int = 0):
    if meta == "mae":
        return ConvexMAEMeta()
    if meta == "nnls":
        return NNLSMeta()
    if meta == "ridge":
        return RidgeMeta()
    if meta == "gbm":
        return GBMMeta(seed)
    raise ValueError(f"unknown meta-learner {meta!r}; choose one of {', '.join(META_LEARNERS)}")


# -- helpers --------------------------------------------------------------------------------------


class InvalidParameterError(ValueError, TypeError):
    """A bad hyperparameter of :class:`StackedEnsemble` (raised by ``fit``; the message names the
    parameter).  Both a ValueError and a TypeError, as scikit-learn's parameter errors are."""


def _is_int(value) -> bool:
    return isinstance(value, Integral) and not isinstance(value, (bool, np.bool_))


def _as_targets(targets: np.ndarray) -> np.ndarray:
    """(N,) for one target, (N, k) for k > 1 targets."""
    y = np.asarray(targets, dtype=np.float64)
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim not in (1, 2):
        raise ValueError(f"targets must be (N,) or (N, k); got shape {y.shape}")
    return y


def _single_target(targets: np.ndarray) -> np.ndarray:
    y = _as_targets(targets)
    if y.ndim != 1:
        raise ValueError(f"expected a single target; got {y.shape[1]} targets")
    return y


def _slim_state(config: dict, state: dict) -> dict:
    """What prediction needs of a member's trained state (its family says), copied."""
    return copy.deepcopy(families.get(config["family"]).slim_state(state))


def kfold_assignment(n: int, n_folds: int, seed: int) -> np.ndarray:
    """Fold number (0..K-1) of each of ``n`` positions: a seeded permutation cut in K parts."""
    if n < 2 * n_folds:
        raise ValueError(f"{n} training rows are too few for {n_folds}-fold stacking (need at least {2 * n_folds})")
    order = np.random.default_rng([seed, 7919]).permutation(n)
    fold = np.empty(n, dtype=np.int64)
    for k, part in enumerate(np.array_split(order, n_folds)):
        fold[part] = k
    return fold


def _fresh_config(config: dict) -> dict:
    """An independent copy of a member config (``sklearn.base.clone`` of a plain dict: every
    value copied, nothing shared with the original)."""
    return clone(config, safe=False)


class StackedEnsemble(BaseEstimator):
    """Out-of-fold stacked ensemble of trial configs (scikit-learn style ``fit`` / ``predict``).

    As in scikit-learn, ``__init__`` only stores the hyperparameters below, unchanged, under
    their own names (``get_params`` / ``set_params`` / ``sklearn.base.clone`` work on them);
    every check and every derived value happens in :meth:`fit`, and a bad value is reported
    there as an :class:`InvalidParameterError` (a ValueError) naming the parameter.  The
    defaults of ``meta``, ``n_folds``, ``refit`` and ``graph_max_epochs`` are the field defaults
    of :class:`matfusion.config.EnsembleConfig` (``meta``, ``n_folds``, ``refit``, ``max_epochs``).
    ``RegressorMixin`` is not mixed in: its ``score(X, y)`` assumes ``predict(X)``, and this
    ensemble predicts rows of whole-dataset arrays (``predict(descriptors, graphs, rows)``).

    Parameters
    ----------
    members: trial configs (dicts as the search's trials received them).
    meta: ``mae`` | ``nnls`` | ``ridge`` | ``gbm``.
    n_folds: K of the out-of-fold split of the training rows (>= 2).
    context_features: append the first ``context_features`` descriptor columns to the meta
        input (ridge and gbm only).
    seed: seeds the K-fold split, the early-stopping splits and the meta-learner.
    es_fraction: share of each fold model's training rows held out for its early stopping
        (and, for late fusion, its alpha); never rows of the held-out fold.  In (0, 0.5).
    member_overrides: top-level config keys to override in every member (e.g.
        ``{"max_epochs": 5}`` for a quick run).
    refit: train every weighted member once more on all the rows for the point prediction.
    graph_max_epochs: epochs of the graph (torch) members; None: as searched (an lgbm
        member's rounds do not depend on it).
    coverage: the coverage of the ``lower`` / ``upper`` conformal interval (in (0, 1)).
    difficulty: the per-row difficulty that scales the intervals: ``model`` (a small model of
        the out-of-fold |residual|), ``spread`` (the members' spread) or ``constant`` (plain
        conformal, one width); see :mod:`matfusion.ensembles.calibration`.

    The member configs that are trained (``members_``) are derived in :meth:`fit`: ``lr_restarts``
    emptied (members train one learning-rate cycle to the end; the search's restarts at ASHA's
    rungs serve its pruning), then ``member_overrides`` applied, then ``graph_max_epochs`` set on
    the graph members; with k targets each also names the targets (``targets``).  Each fold
    model and each refit gets its own fresh copy of its config, with seed ``seed + fold``
    (``+ n_folds`` for the refit).

    Inference.  With ``refit`` every member the meta-learner gives a weight is trained once
    more, on all the rows (less the same ``es_fraction`` for its early stopping), and the point
    prediction is the meta-learner applied to these refitted members: the weights come from
    the out-of-fold predictions, the models from all the data (AutoGluon's ``refit_full``
    idea); each fold model saw only (K-1)/K * (1 - es_fraction) of the rows.  The K fold models
    are still used for the uncertainty: ``predict`` returns the standard deviation of the K
    stacked predictions ``meta(fold-k members)``, which disagree where the data is thin.
    Members with zero weight are not refitted (their column is their fold-model average, which
    the meta-learner ignores).  ``refit=False``: the point prediction is the mean of those K
    stacked predictions.  Prediction reads fitted attributes only, so a pickled fitted ensemble
    predicts alike in a fresh process.

    Uncertainty.  After the meta-learner, one conformal calibrator per target is fitted on the
    OOF residuals of the training rows (``calibration_rows_``: the labelled rows the
    meta-learner saw, never another): the stacked OOF prediction of a fold's rows comes from a
    meta-learner fitted on the other folds' OOF rows (``calibration_oof_``), so every residual
    is out of sample for members and meta-learner alike.  ``predict`` then returns the
    calibrated std (about 68 % of OOF errors within it); :meth:`predict_interval` and
    :meth:`part_outputs` also give ``lower`` / ``upper`` and the old ``spread``.

    Fitted attributes: ``members_`` (the trained member configs, see above), ``names_`` (member
    names), ``fold_of_row_`` (dict row -> fold), ``meta_rows_`` (every row index the
    meta-learner saw), ``fold_train_rows_`` / ``fold_es_rows_`` / ``fold_heldout_rows_`` (per
    fold: rows its models trained on, rows used for their early stopping, rows they predicted),
    ``oof_`` (n_rows x n_members OOF matrix), ``oof_y_``, ``meta_model_`` (single target),
    ``meta_models_`` (one per target), ``meta_fit_rows_`` (per target: the rows its
    meta-learner was fitted on, i.e. the labelled ones), ``target_names_``, ``n_targets_``,
    ``n_features_``, ``graph_params_``, ``weights_`` (dict member -> weight, plus ``intercept``;
    k targets: ``{target: {...}}``; None for gbm), ``fold_states_`` (``[fold][member]`` slim
    trained states), ``refit_states_`` (per member: the slim state of its refit on all rows, or
    None), ``refit_train_rows_`` / ``refit_es_rows_``, ``calibrators_`` / ``calibration_rows_`` /
    ``calibration_oof_`` / ``refit_gain_rows_`` (per target; the last: the calibration rows the
    refit held out, for the refit-gain correction), ``coverage_``.  With k targets ``oof_`` is
    (n, members, k) and ``oof_y_`` (n, k) with NaN for missing labels.
    """

    def __init__(
        self,
        members: Sequence[dict],
        meta: str = _DEFAULTS.meta,
        n_folds: int = _DEFAULTS.n_folds,
        context_features: int = 0,
        seed: int = 0,
        es_fraction: float = 0.15,
        member_overrides: Optional[dict] = None,
        refit: bool = _DEFAULTS.refit,
        graph_max_epochs: Optional[int] = _DEFAULTS.max_epochs,
        coverage: float = DEFAULT_COVERAGE,
        difficulty: str = DEFAULT_DIFFICULTY,
        refit_gain: "bool | str" = _DEFAULTS.refit_gain,
    ) -> None:
        self.members = members
        self.meta = meta
        self.n_folds = n_folds
        self.context_features = context_features
        self.seed = seed
        self.es_fraction = es_fraction
        self.member_overrides = member_overrides
        self.refit = refit
        self.graph_max_epochs = graph_max_epochs
        self.coverage = coverage
        self.difficulty = difficulty
        self.refit_gain = refit_gain

    def __setstate__(self, state: dict) -> None:
        # ensembles pickled before the configs moved to ``members_`` kept the derived configs in
        # ``members``: they are what was trained
        if "meta_models_" in state and "members_" not in state:
            state = dict(state, members_=state["members"])
        # ensembles pickled before the conformal intervals: no calibrators_, std is the spread
        state = {"coverage": DEFAULT_COVERAGE, "difficulty": DEFAULT_DIFFICULTY, "refit_gain": False, **state}
        super().__setstate__(state)

    def __sklearn_is_fitted__(self) -> bool:
        return hasattr(self, "meta_models_")

    # -- checks and derived configs (fit time) -----------------------------------------------------
    def _check_params(self) -> None:
        """Every hyperparameter's check; the error names the parameter."""
        if isinstance(self.members, (str, bytes, dict)) or not isinstance(self.members, Sequence) or not self.members:
            raise InvalidParameterError(
                f"members: StackedEnsemble needs a non-empty list of member configs (got {self.members!r:.80})"
            )
        for i, m in enumerate(self.members):
            if not isinstance(m, dict) or "family" not in m:
                raise InvalidParameterError(
                    f"members[{i}]: a member is a trial config dict with a 'family' key (got {m!r:.80})"
                )
        if self.meta not in META_LEARNERS:
            raise InvalidParameterError(
                f"meta: unknown meta-learner {self.meta!r}; choose one of {', '.join(META_LEARNERS)}"
            )
        if not _is_int(self.n_folds) or self.n_folds < 2:
            raise InvalidParameterError(f"n_folds must be an integer >= 2 (got {self.n_folds!r})")
        if not _is_int(self.context_features) or self.context_features < 0:
            raise InvalidParameterError(f"context_features must be an integer >= 0 (got {self.context_features!r})")
        if self.context_features and self.meta in ("mae", "nnls"):
            raise InvalidParameterError(
                "context_features needs meta 'ridge' or 'gbm' (mae and nnls weights are non-negative "
                "blend weights of members only)"
            )
        if not _is_int(self.seed):
            raise InvalidParameterError(f"seed must be an integer (got {self.seed!r})")
        if (
            isinstance(self.es_fraction, bool)
            or not isinstance(self.es_fraction, Real)
            or not 0.0 < self.es_fraction < 0.5
        ):
            raise InvalidParameterError(f"es_fraction must be in (0, 0.5) (got {self.es_fraction!r})")
        if self.member_overrides is not None and not isinstance(self.member_overrides, dict):
            raise InvalidParameterError(
                f"member_overrides must be a dict of config keys or None (got {self.member_overrides!r})"
            )
        if not isinstance(self.refit, (bool, np.bool_)):
            raise InvalidParameterError(f"refit must be True or False (got {self.refit!r})")
        if self.graph_max_epochs is not None and (not _is_int(self.graph_max_epochs) or self.graph_max_epochs < 1):
            raise InvalidParameterError(
                f"graph_max_epochs must be an integer >= 1 or None (got {self.graph_max_epochs!r})"
            )
        try:
            check_coverage(self.coverage)
            check_refit_gain(self.refit_gain)
        except ValueError as err:
            raise InvalidParameterError(str(err)) from None
        if self.difficulty not in DIFFICULTIES:
            raise InvalidParameterError(
                f"difficulty must be one of {', '.join(DIFFICULTIES)} (got {self.difficulty!r})"
            )

    def _derived_members(self) -> list[dict]:
        """The member configs as trained: ``lr_restarts`` emptied, ``member_overrides`` applied,
        ``graph_max_epochs`` on the graph members."""
        configs = [
            {**_fresh_config(m), "lr_restarts": [], **_fresh_config(self.member_overrides or {})} for m in self.members
        ]
        if self.graph_max_epochs is not None:
            configs = [
                c if c["family"] in families.TABULAR else dict(c, max_epochs=int(self.graph_max_epochs))
                for c in configs
            ]
        return configs

    # -- fitting -----------------------------------------------------------------------------------
    def _member_config(self, j: int, fold: int) -> dict:
        """A fresh copy of trained member ``j``'s config for fold model ``fold`` (its seed + fold)."""
        config = _fresh_config(self.members_[j])
        config["seed"] = int(config.get("seed", 0)) + fold  # a little diversity between fold models
        return config

    @property
    def _n_context(self) -> int:
        """Context columns of the fitted meta input (0 without context)."""
        mean = getattr(self, "context_mean_", None)
        return 0 if mean is None else len(mean)

    def _context(self, descriptors: np.ndarray, rows: np.ndarray) -> np.ndarray:
        c = np.asarray(descriptors[rows, : self._n_context], dtype=np.float64)
        c = np.where(np.isfinite(c), c, self.context_fill_)
        return (c - self.context_mean_) / self.context_std_

    def _meta_input(self, member_pred: np.ndarray, descriptors: np.ndarray, rows: np.ndarray) -> np.ndarray:
        if not self._n_context:
            return member_pred
        return np.hstack([member_pred, self._context(descriptors, rows)])

    def fit(
        self,
        descriptors: np.ndarray,
        graphs,
        targets: np.ndarray,
        rows: Sequence[int],
        graph_params: Optional[dict] = None,
        progress: bool = False,
        target_names: Optional[Sequence[str]] = None,
    ) -> "StackedEnsemble":
        """Fit on ``rows`` only (the outer fold's training part: never pass test rows).

        ``descriptors`` (N, d) the descriptor matrix, ``graphs`` (a GraphSet of all N rows, or None for tabular-only
        ensembles), ``targets`` (N,) or (N, k) with NaN for a missing label, are the whole
        dataset's arrays; only ``rows`` are read.  ``target_names`` (k > 1): default the
        members' ``config["targets"]``, else ``t0``, ``t1`` ...
        """
        from ..trainables.loop import LocalSession
        from ..trainables.trial import fit_family, predict_from_state
        from ..trainables.trial_data import pack_rows, pack_trial_data

        self._check_params()
        self.members_ = self._derived_members()
        y_all = _as_targets(targets)
        rows = np.asarray(rows, dtype=np.int64)
        if len(np.unique(rows)) != len(rows):
            raise ValueError("rows contain duplicates")
        multi = y_all.ndim == 2
        n_targets = y_all.shape[1] if multi else 1
        y_rows = y_all[rows].reshape(len(rows), n_targets)
        if multi:
            if not np.all(np.isfinite(y_rows).any(axis=1)):
                raise ValueError("some training rows have no finite label for any target")
        elif not np.all(np.isfinite(y_rows)):
            raise ValueError("some training rows have no finite target")
        names = target_names or next(
            (list(m["targets"]) for m in self.members_ if len(m.get("targets") or []) == n_targets), None
        )
        self.target_names_ = (
            [str(t) for t in names] if names else ([f"t{k}" for k in range(n_targets)] if multi else ["target"])
        )
        if len(self.target_names_) != n_targets:
            raise ValueError(f"{len(self.target_names_)} target names for {n_targets} targets")
        for k in range(n_targets):
            if np.isfinite(y_rows[:, k]).sum() < 2:
                raise ValueError(f"target {self.target_names_[k]!r} has fewer than 2 labelled training rows")
        self.n_targets_ = n_targets
        if multi:  # members name their targets (fit_family: task weights; trial states: target_names)
            self.members_ = [dict(m, targets=list(self.target_names_)) for m in self.members_]
        if graphs is None and self.needs_graphs:
            raise ValueError("graph members need crystal graphs (graphs is None)")
        self.graph_params_ = dict(graph_params or DEFAULT_GRAPH_PARAMS)
        self.names_ = unique_names(self.members_)
        fold = kfold_assignment(len(rows), self.n_folds, self.seed)
        self.fold_of_row_ = {int(r): int(f) for r, f in zip(rows, fold)}
        n_members = len(self.members_)
        oof = np.full((len(rows), n_members, n_targets), np.nan)
        self.fold_states_, self.fold_train_rows_, self.fold_es_rows_, self.fold_heldout_rows_ = [], [], [], []
        for k in range(self.n_folds):
            held = rows[fold == k]
            train_all = rows[fold != k]
            rng = np.random.default_rng([self.seed, k, 104729])
            shuffled = rng.permutation(train_all)
            n_es = min(max(1, int(round(self.es_fraction * len(train_all)))), len(train_all) - 1)
            es_rows, fit_rows = np.sort(shuffled[:n_es]), np.sort(shuffled[n_es:])
            data = pack_trial_data(descriptors, graphs, y_all, fit_rows, es_rows, **self.graph_params_)
            held_part = pack_rows(descriptors, graphs, y_all, held)
            states = []
            for j in range(n_members):
                config = self._member_config(j, k)
                state = fit_family(config, data, LocalSession())
                states.append(_slim_state(config, state))
                oof[fold == k, j, :] = np.asarray(
                    predict_from_state(config, states[-1], held_part, self.graph_params_)
                ).reshape(len(held), n_targets)
                if progress:
                    print(
                        f"  fold {k + 1}/{self.n_folds} member {self.names_[j]}: trained on {len(fit_rows)} "
                        f"rows (+{len(es_rows)} early stopping), predicted {len(held)}",
                        flush=True,
                    )
            self.fold_states_.append(states)
            self.fold_train_rows_.append(fit_rows)
            self.fold_es_rows_.append(es_rows)
            self.fold_heldout_rows_.append(held)
        if not np.all(np.isfinite(oof)):
            raise RuntimeError("a member produced non-finite out-of-fold predictions")
        # single target: (n, members) and (n,), as before; k targets: (n, members, k) and (n, k)
        self.oof_ = oof if multi else oof[:, :, 0]
        self.oof_y_ = y_all[rows]
        self.meta_rows_ = rows.copy()
        self.n_features_ = int(np.asarray(descriptors).shape[1])  # width of the descriptor matrix
        for stale in ("context_fill_", "context_mean_", "context_std_"):  # of an earlier fit
            self.__dict__.pop(stale, None)
        if self.context_features:
            c = np.asarray(descriptors[rows, : self.context_features], dtype=np.float64)
            fill = np.nanmedian(np.where(np.isfinite(c), c, np.nan), axis=0)
            self.context_fill_ = np.where(np.isfinite(fill), fill, 0.0)
            c = np.where(np.isfinite(c), c, self.context_fill_)
            self.context_mean_ = c.mean(axis=0)
            std = c.std(axis=0)
            self.context_std_ = np.where(std > 0, std, 1.0)
        # one meta-learner per target, fitted on the rows that have its label (never a NaN label)
        self.meta_models_, self.meta_fit_rows_ = [], []
        for t in range(n_targets):
            labelled = np.isfinite(y_rows[:, t])
            fit_rows = rows[labelled]
            X = self._meta_input(oof[labelled, :, t], descriptors, fit_rows)
            self.meta_models_.append(make_meta(self.meta, self.seed).fit(X, y_rows[labelled, t]))
            self.meta_fit_rows_.append(fit_rows)
        self.meta_model_ = self.meta_models_[0] if not multi else None
        self.weights_ = self._weights()
        self.refit_states_ = [None] * n_members
        self.refit_train_rows_ = self.refit_es_rows_ = np.array([], dtype=np.int64)
        if self.refit:
            self._refit(descriptors, graphs, y_all, rows, progress)
        self._calibrate(descriptors, rows, fold, y_rows, oof, graphs)  # after the refit: its held-out rows
        return self

    # -- calibration (fit time) ----------------------------------------------------------------------
    def _cross_fitted_stack(self, X: np.ndarray, y: np.ndarray, folds: np.ndarray) -> np.ndarray:
        """The stack's OOF prediction of each row by a meta-learner fitted on the other folds' rows
        only: the fitted meta-learner saw every row, so its own residuals would be too small."""
        pred = np.empty(len(y))
        for k in np.unique(folds):
            held = folds == k
            pred[held] = make_meta(self.meta, self.seed).fit(X[~held], y[~held]).predict(X[held])
        return pred

    @staticmethod
    def _difficulty_features(member_cols: np.ndarray, stacked: np.ndarray, descriptors, rows: np.ndarray):
        """(inputs of the difficulty model, members' spread): the stacked prediction, the spread of
        the members' predictions and the descriptor row (where the noise depends on the material
        rather than on the predicted value, only the descriptors can tell; docs/uncertainty.md)."""
        member_cols = np.asarray(member_cols, dtype=np.float64)
        spread = member_cols.std(axis=1) if member_cols.shape[1] > 1 else np.zeros(len(member_cols))
        X = np.asarray(descriptors[rows], dtype=np.float64).reshape(len(rows), -1)
        return np.column_stack([np.asarray(stacked, dtype=np.float64), spread, X]), spread

    def _calibrate(
        self, descriptors, rows: np.ndarray, fold: np.ndarray, y_rows: np.ndarray, oof: np.ndarray, graphs=None
    ) -> None:
        """One :class:`~matfusion.ensembles.calibration.ConformalCalibrator` per target, on the
        residuals of the cross-fitted OOF stack of the labelled training rows (``calibration_rows_``):
        no other row is ever used.  With a refit, the refit stack's residuals on the training rows
        its members never trained on (``refit_es_rows_``, a subset of the calibration rows:
        ``refit_gain_rows_``) go with them, for the refit-gain correction."""
        self.coverage_ = float(self.coverage)
        self.calibrators_, self.calibration_rows_, self.calibration_oof_, self.refit_gain_rows_ = [], [], [], []
        held_out = self.refit_es_rows_ if self.refitted else np.zeros(0, dtype=np.int64)
        refit_mean = None
        if len(held_out):  # the product's own prediction of those rows (no calibrators yet: no intervals)
            refit_mean = np.asarray(self.predict_all(descriptors, graphs, held_out)["mean"]).reshape(len(held_out), -1)
        for t in range(self.n_targets_):
            labelled = np.isfinite(y_rows[:, t])
            cal_rows, cols, y, folds = rows[labelled], oof[labelled, :, t], y_rows[labelled, t], fold[labelled]
            stacked = self._cross_fitted_stack(self._meta_input(cols, descriptors, cal_rows), y, folds)
            X, spread = self._difficulty_features(cols, stacked, descriptors, cal_rows)
            refit = {}
            if refit_mean is not None:
                pos = np.flatnonzero(np.isin(cal_rows, held_out))
                at = np.searchsorted(held_out, cal_rows[pos])  # held_out is sorted
                refit = {"refit_positions": pos, "refit_residuals": y[pos] - refit_mean[at, t]}
            cal = ConformalCalibrator(
                difficulty=self.difficulty, coverage=self.coverage_, seed=self.seed, refit_gain=self.refit_gain
            )
            self.calibrators_.append(cal.fit(y - stacked, X, folds, spread, **refit))
            self.calibration_rows_.append(cal_rows)
            self.calibration_oof_.append(stacked)
            self.refit_gain_rows_.append(cal_rows[cal.refit_positions_])
            if cal.difficulty_ != self.difficulty:
                log.info(
                    "target %s: difficulty %s impossible (one member), intervals are constant-width",
                    self.target_names_[t],
                    self.difficulty,
                )

    @property
    def calibrated(self) -> bool:
        """Whether the ensemble has conformal calibrators (ensembles fitted before them do not)."""
        return bool(getattr(self, "calibrators_", None))

    def half_width(self, sigma: np.ndarray, coverage: Optional[float] = None) -> np.ndarray:
        """Half-width of the intervals at ``coverage`` (default the fitted ``coverage``) of rows of
        difficulty ``sigma`` ((n,) or (n, k), as :meth:`part_outputs` gives it)."""
        level = getattr(self, "coverage_", DEFAULT_COVERAGE) if coverage is None else check_coverage(coverage)
        if not self.multi_target:
            return self.calibrators_[0].quantile(level) * np.asarray(sigma)
        return np.stack([c.quantile(level) * sigma[:, t] for t, c in enumerate(self.calibrators_)], axis=1)

    def _intervals(self, out: dict, descriptors, rows: np.ndarray) -> dict:
        """``sigma`` (difficulty), the calibrated ``std`` (68.27 % half-width) and ``lower`` /
        ``upper`` at the fitted coverage, from the point prediction and member columns of ``out``."""
        n_t = self.n_targets_
        mean = np.asarray(out["mean"]).reshape(len(rows), n_t)
        members = np.asarray(out["members"]).reshape(len(rows), len(self.members_), n_t)
        fold_spread = np.asarray(out["spread"]).reshape(len(rows), n_t)  # the averaging correction's input
        sigma = np.empty((len(rows), n_t))
        for t, cal in enumerate(self.calibrators_):
            X, spread = self._difficulty_features(members[:, :, t], mean[:, t], descriptors, rows)
            sigma[:, t] = cal.sigma(X, spread, n=len(rows), fold_spread=fold_spread[:, t])
        sigma = sigma if self.multi_target else sigma[:, 0]
        half = self.half_width(sigma)
        return {
            "sigma": sigma,
            "std": self.half_width(sigma, ONE_SIGMA),
            "lower": out["mean"] - half,
            "upper": out["mean"] + half,
        }

    def weighted_members(self) -> list[int]:
        """Indices of the members the meta-learner uses (a non-zero weight for some target; every
        member for meta-learners without weights, e.g. gbm)."""
        per_target = [self._meta_weights(m) for m in self.meta_models_]
        if any(w is None for w in per_target):
            return list(range(len(self.members_)))
        return [j for j, name in enumerate(self.names_) if any(abs(w[name]) > 0 for w in per_target)]

    def _refit_config(self, j: int) -> dict:
        return self._member_config(j, len(self.fold_states_))  # a seed none of the fold models had

    def _refit(self, descriptors, graphs, y_all, rows: np.ndarray, progress: bool) -> None:
        from ..trainables.loop import LocalSession
        from ..trainables.trial import fit_family
        from ..trainables.trial_data import pack_trial_data

        rng = np.random.default_rng([self.seed, 15485863])
        shuffled = rng.permutation(rows)
        n_es = min(max(1, int(round(self.es_fraction * len(rows)))), len(rows) - 1)
        self.refit_es_rows_, self.refit_train_rows_ = np.sort(shuffled[:n_es]), np.sort(shuffled[n_es:])
        data = pack_trial_data(
            descriptors, graphs, y_all, self.refit_train_rows_, self.refit_es_rows_, **self.graph_params_
        )
        for j in self.weighted_members():
            config = self._refit_config(j)
            self.refit_states_[j] = _slim_state(config, fit_family(config, data, LocalSession()))
            if progress:
                print(
                    f"  refit member {self.names_[j]}: trained on {len(self.refit_train_rows_)} rows "
                    f"(+{len(self.refit_es_rows_)} early stopping)",
                    flush=True,
                )

    @property
    def multi_target(self) -> bool:
        return getattr(self, "n_targets_", 1) > 1

    def _meta_weights(self, model) -> Optional[dict]:
        coef = getattr(model, "coef_", None)
        if coef is None:
            return None
        names = list(self.names_) + [f"context_{i}" for i in range(self._n_context)]
        out = {n: float(w) for n, w in zip(names, coef)}
        out["intercept"] = float(model.intercept_)
        return out

    def _weights(self) -> Optional[dict]:
        """Single target: ``{member: w, ..., "intercept": b}``; k targets: ``{target: {...}}``;
        None for gbm."""
        if not self.multi_target:
            return self._meta_weights(self.meta_models_[0])
        per = {t: self._meta_weights(m) for t, m in zip(self.target_names_, self.meta_models_)}
        return None if all(v is None for v in per.values()) else per

    # -- inference ---------------------------------------------------------------------------------
    def _check_fitted(self) -> None:
        if not hasattr(self, "meta_model_"):
            raise RuntimeError("this StackedEnsemble is not fitted yet: call fit() first")

    def fold_member_predictions(self, descriptors: np.ndarray, graphs, rows: Sequence[int]) -> np.ndarray:
        """(K, n, n_members) (k targets: (K, n, n_members, k)): each fold model's prediction of ``rows``."""
        from ..trainables.trial_data import pack_rows

        self._check_fitted()
        rows = np.asarray(rows, dtype=np.int64)
        return self.fold_part_predictions(pack_rows(descriptors, graphs, np.zeros(len(descriptors)), rows))

    def fold_part_predictions(
        self, part: dict, members: Optional[Sequence[int]] = None, base: Optional[np.ndarray] = None
    ) -> np.ndarray:
        """Each fold model's prediction of a packed ``part`` (rows in the part's order), shaped as
        :meth:`fold_member_predictions`.  With ``members`` (indices) only those members are
        predicted and the others are copied from ``base`` (an earlier result of this method)."""
        from ..trainables.trial import predict_from_state

        n_targets = getattr(self, "n_targets_", 1)
        n = len(part["y"])
        per_row = (n_targets,) if n_targets > 1 else ()
        out = (
            np.empty((len(self.fold_states_), n, len(self.members_)) + per_row)
            if base is None
            else np.array(base, dtype=np.float64)
        )
        for k, states in enumerate(self.fold_states_):
            for j, state in enumerate(states):
                if members is not None and j not in members:
                    continue
                pred = predict_from_state(self._member_config(j, k), state, part, self.graph_params_)
                out[k, :, j] = np.asarray(pred, dtype=np.float64).reshape((n,) + per_row)
        return out

    def member_predictions(self, descriptors: np.ndarray, graphs, rows: Sequence[int]) -> np.ndarray:
        """(n, n_members) (k targets: (n, n_members, k)): each member's prediction as the point
        prediction uses it (its refit; without one, its fold-model average)."""
        return self.predict_all(descriptors, graphs, rows)["members"]

    def stack_folds(self, per_fold: np.ndarray, descriptors: np.ndarray, rows: Sequence[int]) -> np.ndarray:
        """``meta(members of set f)`` for each leading index f (the K fold-model sets): (K, n), or
        (K, n, k_targets) for k targets."""
        rows = np.asarray(rows, dtype=np.int64)
        models = getattr(self, "meta_models_", None) or [self.meta_model_]
        if not self.multi_target:
            return np.stack(
                [models[0].predict(self._meta_input(per_fold[f], descriptors, rows)) for f in range(len(per_fold))]
            )
        return np.stack(
            [
                np.stack(
                    [
                        m.predict(self._meta_input(per_fold[f, :, :, t], descriptors, rows))
                        for t, m in enumerate(models)
                    ],
                    axis=1,
                )
                for f in range(len(per_fold))
            ]
        )

    @property
    def refitted(self) -> bool:
        return any(s is not None for s in (getattr(self, "refit_states_", None) or []))

    def part_outputs(
        self,
        part: dict,
        descriptors: np.ndarray,
        rows: Sequence[int],
        members: Optional[Sequence[int]] = None,
        base: Optional[dict] = None,
    ) -> dict:
        """Everything the ensemble predicts for a packed ``part`` (rows ``rows`` of ``descriptors``):
        ``per_fold`` (see :meth:`fold_part_predictions`), ``members`` (each member's column of the
        point prediction: its refit, else its fold-model average), ``mean`` (the point prediction),
        ``spread`` (the standard deviation of the K stacked fold-model predictions, uncalibrated)
        and ``std``: the calibrated std (conformal half-width at 68.27 %) of a calibrated ensemble,
        else the spread; a calibrated ensemble also gives ``sigma`` (the rows' difficulty) and
        ``lower`` / ``upper`` (the conformal interval at the fitted ``coverage``).  With ``members`` only those
        members are predicted again and the others are taken from ``base`` (an earlier result)."""
        from ..trainables.trial import predict_from_state

        rows = np.asarray(rows, dtype=np.int64)
        per_fold = self.fold_part_predictions(part, members, None if base is None else base["per_fold"])
        stacked = self.stack_folds(per_fold, descriptors, rows)
        columns = per_fold.mean(axis=0)
        if not self.refitted:
            return self._with_intervals(
                {"per_fold": per_fold, "members": columns, "mean": stacked.mean(axis=0)}, stacked, descriptors, rows
            )
        for j, state in enumerate(self.refit_states_):
            if state is None:
                continue
            if members is not None and j not in members:
                columns[:, j] = base["members"][:, j]
                continue
            pred = predict_from_state(self._refit_config(j), state, part, self.graph_params_)
            columns[:, j] = np.asarray(pred, dtype=np.float64).reshape(columns[:, j].shape)
        mean = self.stack_folds(columns[None], descriptors, rows)[0]
        return self._with_intervals(
            {"per_fold": per_fold, "members": columns, "mean": mean}, stacked, descriptors, rows
        )

    def _with_intervals(self, out: dict, stacked: np.ndarray, descriptors, rows: np.ndarray) -> dict:
        out["spread"] = stacked.std(axis=0)  # the spread of the K fold-model stacks (uncalibrated)
        out["std"] = out["spread"]
        if self.calibrated:
            out.update(self._intervals(out, descriptors, rows))
        return out

    def predict_all(self, descriptors: np.ndarray, graphs, rows: Sequence[int]) -> dict:
        """:meth:`part_outputs` of ``rows`` of the whole dataset's arrays."""
        from ..trainables.trial_data import pack_rows

        self._check_fitted()
        rows = np.asarray(rows, dtype=np.int64)
        return self.part_outputs(pack_rows(descriptors, graphs, np.zeros(len(descriptors)), rows), descriptors, rows)

    def predict(self, descriptors: np.ndarray, graphs, rows: Sequence[int], return_std: bool = True):
        """Stacked prediction of ``rows`` (the meta-learner on the refitted members; without refit,
        the mean over the K fold-model sets of ``meta(members of fold k)``); with ``return_std``
        also the calibrated std (see :meth:`part_outputs`; the fold-model spread for an ensemble
        fitted before calibration existed).  Shapes (n,) for one target, (n, k) for k targets."""
        out = self.predict_all(descriptors, graphs, rows)
        if not return_std:
            return out["mean"]
        return out["mean"], out["std"]

    def predict_interval(
        self, descriptors: np.ndarray, graphs, rows: Sequence[int], coverage: Optional[float] = None
    ) -> dict:
        """``{mean, std, lower, upper, spread}`` of ``rows``: the conformal interval at ``coverage``
        (default the fitted ``coverage``)."""
        if not self.calibrated:
            raise RuntimeError("this ensemble was fitted before conformal calibration existed: refit it for intervals")
        out = self.predict_all(descriptors, graphs, rows)
        half = self.half_width(out["sigma"], coverage)
        return {
            "mean": out["mean"],
            "std": out["std"],
            "lower": out["mean"] - half,
            "upper": out["mean"] + half,
            "spread": out["spread"],
        }

    # -- description -------------------------------------------------------------------------------
    @property
    def _configs(self) -> list:
        """The trained member configs once fitted, else the given ones."""
        return getattr(self, "members_", None) or list(self.members)

    @property
    def needs_graphs(self) -> bool:
        return any(m["family"] in families.GRAPH for m in self._configs)

    @property
    def needs_line_graph(self) -> bool:
        return families.needs_line_graph([m["family"] for m in self._configs])

    def summary(self) -> dict:
        self._check_fitted()
        return {
            "meta": self.meta,
            "n_folds": self.n_folds,
            "context_features": self.context_features,
            "refit": [
                self.names_[j] for j, st in enumerate(getattr(self, "refit_states_", None) or []) if st is not None
            ],
            "seed": self.seed,
            "members": self.names_,
            "member_configs": self.members_,
            "weights": self.weights_,
            "n_meta_rows": int(len(self.meta_rows_)),
            "targets": list(getattr(self, "target_names_", ["target"])),
            "n_meta_rows_per_target": [int(len(r)) for r in getattr(self, "meta_fit_rows_", [self.meta_rows_])],
            "graph_params": self.graph_params_,
            "calibration": self.calibration_summary(),
        }

    def calibration_summary(self) -> Optional[dict]:
        """How the intervals were calibrated (per target for k targets); None before calibration."""
        if not self.calibrated:
            return None
        per = {t: c.summary() for t, c in zip(self.target_names_, self.calibrators_)}
        return per if self.multi_target else per[self.target_names_[0]]
