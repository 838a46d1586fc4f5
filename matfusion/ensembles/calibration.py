"""Conformal prediction intervals from the stack's out-of-fold residuals.

:class:`ConformalCalibrator` turns the out-of-fold (OOF) residuals of a stacked ensemble into
prediction intervals (split-conformal / CV+ style, normalized): for each calibration row i,
the nonconformity score is ``s_i = |y_i - yhat_i| / sigma_i``, where ``sigma_i`` is a per-row
difficulty estimate; the interval of a new row x at coverage ``c`` is
``yhat(x) +- q_c * sigma(x)``, with ``q_c`` the ``ceil((n + 1) c)``-th smallest of the n
scores (the finite-sample correction of split conformal prediction).  Because sigma varies
from row to row, intervals are wider where the ensemble is less sure.

Difficulty estimates (``difficulty``):

* ``model`` (default): a small gradient-boosted model of ``log(|residual| + eps)`` (eps: a
  tenth of the median |residual|) on the stacked prediction, the spread of the members'
  predictions and the descriptor row; sigma is its exponential (a geometric-mean scale of the error, which a few
  huge residuals cannot dominate).  It is fitted *cross-fitted* on the calibration rows (the
  model that gives row i its sigma never saw row i's residual), with the same K folds as the
  stack; the model used for new rows is fitted on all the calibration rows.  (Measured against
  ``|residual|`` as the target and without the descriptors: docs/uncertainty.md.)
* ``spread``: the standard deviation of the members' predictions of the row (needs 2+
  members; with one member it falls back to ``constant``, said in ``difficulty_``).
* ``constant``: sigma = 1, plain (unnormalized) conformal intervals of one width everywhere.

Every sigma is floored at 5 % of the calibration rows' median sigma, so that a row whose
difficulty estimate is near zero cannot get a zero-width interval.

The averaging correction (``averaging``, on by default; ``model`` and ``spread`` only:
``constant`` stays textbook plain conformal, one width for every row).  Each calibration residual is the
error of *one* fold model's stack (the one that did not see the row), while a new row is
predicted by an average of K such stacks (``refit=False``) or by members refitted on all the
rows: a better predictor, whose errors are smaller, so uncorrected intervals over-cover
(measured: docs/uncertainty.md).  For a row x with the K stacked fold-model predictions
``mu_k(x)`` and their mean ``m(x)``, the identity ``mean_k (y - mu_k)^2 = (y - m)^2 + s(x)^2``
(``s``: the standard deviation of the ``mu_k``, ddof 0, the ensemble's ``spread``) says that
averaging removes the variance ``s(x)^2`` from the single-model squared error, whose expectation
is ``sigma(x)^2 * m2`` under the normalized model (``m2``: the mean squared normalized score of
the calibration rows, ``score_m2_``).  With the error's shape kept (a scale family), every
half-width is scaled by ``rho(x) = sqrt(V / (V + s(x)^2))`` with ``V = sigma(x)^2 * m2``: the
exact removal ``sqrt(1 - s^2 / V)`` to first order where the spread is small against the error,
and smoothly less where the spread is as large as the difficulty says the whole error is (there
the difficulty is the suspect estimate; the exact form with a hard floor was measured narrower
on average but 12 % wider at equal coverage at 95 % on phonons); floored at ``AVERAGING_FLOOR``
(0.5).  ``s`` is measured on the new row itself, where all K fold models are out of sample; no
label is needed.  The refit's own gain (more rows per model) it does not model: that is the
refit-gain correction below.

The refit-gain correction (``refit_gain``, on by default: measured, docs/uncertainty.md).  With
``refit`` the product predicts a new row with members refitted on *all* the training rows, not
with an average of fold models, so the averaging correction is a proxy only; the refit's own
gain (a fold model trains on (K-1)/K of the rows) it does not model.  The refit holds out
``es_fraction`` of the training rows for its members' early stopping (``refit_es_rows_``): those
calibration rows were never trained on by the refit (a forest ignores them, lgbm and the graph
members only stop on them), so on them both predictors are out of sample: the single fold-model
stack (the calibration residual) and the refit stack, the product's own predictor.  With both
normalized by the same cross-fitted difficulty (``oof_sigma_`` of those rows), the factor at
level c is ``g(c) = Q_c(refit scores) / Q_c(single-stack scores)`` on those rows (quantiles
averaged over the levels c +- ``REFIT_WINDOW``, paired on the same rows so that which rows were
drawn cancels), clipped to ``REFIT_CLIP``, and levels beyond the last with ``REFIT_MIN_TAIL``
held-out rows above them take that level's factor.  When on and estimated it *replaces* the
averaging correction (the prediction is then not an average; the two would count the same gain
twice): the interval at c is ``yhat +- q_c * g(c) * sigma(x)``.  It falls back to 1 (and the
averaging correction, if on) with the reason in ``refit_gain_reason_``: no refit, or fewer than
``REFIT_MIN_ROWS`` such rows.  Only calibration rows reach it: the stack passes their positions
among the calibration rows (``refit_positions``) and records the row indices
(``refit_gain_rows_``).

The calibrated ``std`` is the half-width at 68.27 % (``ONE_SIGMA``): about 68 % of the
calibration errors lie within one std, as for a Gaussian std.  The sorted scores are kept
(``scores_``), so an interval at any coverage can be formed at prediction time.

Only the rows passed to :meth:`ConformalCalibrator.fit` are used (the stack passes the OOF
rows of the outer fold's training part); ``n_calibration_`` records how many.
"""

from __future__ import annotations

import math
import typing
from numbers import Real
from typing import Optional

import numpy as np
from sklearn.base import BaseEstimator

from ..config import EnsembleConfig

DIFFICULTIES = typing.get_args(EnsembleConfig.model_fields["difficulty"].annotation)  # model, spread, constant
ONE_SIGMA = math.erf(1.0 / math.sqrt(2.0))  # 0.6827: share of a Gaussian within one std
REPORT_LEVELS = (0.68, 0.90, 0.95)  # coverages the evaluation, the card and the report show
SIGMA_FLOOR = 0.05  # of the calibration rows' median sigma
AVERAGING_FLOOR = 0.5  # the averaging correction shrinks a half-width to no less than half
REFIT_CLIP = (0.7, 1.0)  # the refit-gain factor's range
REFIT_MIN_ROWS = 30  # fewer refit held-out calibration rows: no refit-gain estimate (factor 1)
REFIT_AUTO_ROWS = 350  # refit_gain="auto": on from this many held-out rows (68 % coverage error < 2.5 points)
DEFAULT_REFIT_GAIN = EnsembleConfig.model_fields["refit_gain"].default  # True: measured, docs/uncertainty.md
REFIT_MIN_TAIL = 5  # a level's factor needs this many held-out rows above its quantile
REFIT_WINDOW = 0.05  # the factor at c pools the quantiles at levels c +- this
REFIT_SE_DRAWS = 200  # bootstrap resamples of the held-out rows for the factor's standard error


def level_name(level: float) -> str:
    """``0.9`` -> ``"90"``, ``0.975`` -> ``"97.5"`` (metric suffixes: ``coverage_90``)."""
    pct = round(100.0 * float(level), 4)
    return f"{pct:g}"


def conformal_quantile(sorted_scores: np.ndarray, level: float) -> float:
    """The ``ceil((n + 1) * level)``-th smallest of n sorted scores (split conformal's
    finite-sample correction); the largest score when that rank exceeds n (too few calibration
    rows for the level: the interval may then cover a little less than ``level``)."""
    s = np.asarray(sorted_scores, dtype=np.float64)
    n = len(s)
    if n == 0:
        raise ValueError("no calibration scores")
    if not 0.0 < level < 1.0:
        raise ValueError(f"coverage must be in (0, 1) (got {level!r})")
    rank = int(math.ceil((n + 1) * float(level) - 1e-9))
    return float(s[min(max(rank, 1), n) - 1])


def refit_quantile_ratio(single: np.ndarray, refit: np.ndarray, level: float) -> float:
    """``Q(refit) / Q(single)`` on the same held-out rows, the quantiles averaged over the levels
    ``level +- REFIT_WINDOW`` (capped at the last level with ``REFIT_MIN_TAIL`` rows above it);
    unclipped, NaN when the single stacks' quantile is not positive."""
    top = max(0.5, 1.0 - REFIT_MIN_TAIL / len(refit))
    lv = np.clip(np.linspace(level - REFIT_WINDOW, level + REFIT_WINDOW, 11), 0.01, top)
    den = float(np.mean(np.quantile(single, lv)))
    return float(np.mean(np.quantile(refit, lv))) / den if den > 0 else math.nan


def check_coverage(value, name: str = "coverage") -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or not 0.0 < float(value) < 1.0:
        raise ValueError(f"{name} must be a number in (0, 1), e.g. 0.9 (got {value!r})")
    return float(value)


def check_refit_gain(value):
    """``True`` / ``False`` / ``"auto"`` (the ``refit_gain`` setting), else a clear error."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if value == "auto":
        return "auto"
    raise ValueError(f"refit_gain must be true, false or auto (got {value!r})")


def refit_gain_applies(mode, held_out_rows: int) -> bool:
    """Whether the ``refit_gain`` setting ``mode`` applies a factor estimated from
    ``held_out_rows`` rows: ``True`` always, ``"auto"`` from ``REFIT_AUTO_ROWS``, ``False`` never."""
    mode = check_refit_gain(mode)
    return mode is True or (mode == "auto" and held_out_rows >= REFIT_AUTO_ROWS)


class ConformalCalibrator(BaseEstimator):
    """Normalized conformal intervals from out-of-fold residuals (see the module docstring).

    Parameters
    ----------
    difficulty: ``model`` | ``spread`` | ``constant``.
    coverage: the default coverage of :meth:`interval` (in (0, 1)).
    seed: seeds the difficulty model.
    averaging: scale the half-widths of new rows by the averaging correction ``rho`` when
        :meth:`sigma` is given their fold-model spread (see the module docstring; not for
        ``constant``).
    refit_gain: ``True``: scale the quantile at each level by the refit-gain factor
        :meth:`refit_factor` (estimated when ``fit`` is given the refit's residuals; replaces the
        averaging correction then; not for ``constant``); ``"auto"``: the same when the factor
        comes from at least ``REFIT_AUTO_ROWS`` held-out rows (else the averaging correction);
        ``False``: never.

    ``fit(residuals, features, folds, spread)``: ``residuals`` (n,) OOF ``y - yhat`` of the
    calibration rows, ``features`` (n, d) the difficulty model's inputs (NaN allowed), ``folds``
    (n,) the fold each row was held out in (for the cross-fitting), ``spread`` (n,) the members'
    spread, ``refit_positions`` (m,) positions among those rows that the refit never trained on and
    ``refit_residuals`` (m,) the refit stack's ``y - yhat`` there (both or neither).  Fitted
    attributes: ``difficulty_`` (the estimate used), ``scores_`` (sorted normalized scores),
    ``sigma_floor_``, ``model_`` (``model`` only), ``oof_sigma_`` (the calibration rows' sigma),
    ``score_m2_`` (mean squared normalized score), ``n_calibration_``, ``refit_positions_`` (sorted),
    ``refit_scores_`` / ``refit_single_scores_`` (sorted normalized scores of the refit and of the
    single fold-model stacks on those rows; None when not estimated), ``refit_factor_se_`` (the
    factor's bootstrap standard error at each of ``REPORT_LEVELS``, keyed ``"68"``, ``"90"``,
    ``"95"``; when estimated), ``refit_gain_reason_`` (None when estimated, else why the factor is 1).
    """

    def __init__(
        self,
        difficulty: str = "model",
        coverage: float = 0.9,
        seed: int = 0,
        averaging: bool = True,
        refit_gain: "bool | str" = DEFAULT_REFIT_GAIN,
    ) -> None:
        self.difficulty = difficulty
        self.coverage = coverage
        self.seed = seed
        self.averaging = averaging
        self.refit_gain = refit_gain

    def __setstate__(self, state: dict) -> None:
        # calibrators pickled before the averaging correction: no score_m2_, no correction; before
        # the refit-gain correction: no refit scores, factor 1
        super().__setstate__({"averaging": False, "refit_gain": False, **state})

    # -- the difficulty model ---------------------------------------------------------------------
    def _new_model(self, n: int):
        from sklearn.ensemble import HistGradientBoostingRegressor

        return HistGradientBoostingRegressor(
            max_iter=100,
            learning_rate=0.05,
            max_depth=3,
            min_samples_leaf=max(10, n // 20),
            l2_regularization=1.0,
            early_stopping=False,
            random_state=self.seed,
        )

    def _fit_model(self, X: np.ndarray, target: np.ndarray):
        from threadpoolctl import threadpool_limits

        with threadpool_limits(1):
            return self._new_model(len(target)).fit(X, target)

    @staticmethod
    def _predict_model(model, X: np.ndarray) -> np.ndarray:
        from threadpoolctl import threadpool_limits

        with threadpool_limits(1):
            return np.asarray(model.predict(X), dtype=np.float64)

    def fit(
        self,
        residuals: np.ndarray,
        features: Optional[np.ndarray] = None,
        folds: Optional[np.ndarray] = None,
        spread: Optional[np.ndarray] = None,
        refit_positions: Optional[np.ndarray] = None,
        refit_residuals: Optional[np.ndarray] = None,
    ) -> "ConformalCalibrator":
        if self.difficulty not in DIFFICULTIES:
            raise ValueError(f"difficulty must be one of {', '.join(DIFFICULTIES)} (got {self.difficulty!r})")
        check_coverage(self.coverage)
        check_refit_gain(self.refit_gain)
        r = np.abs(np.asarray(residuals, dtype=np.float64).reshape(-1))
        n = len(r)
        if n < 2 or not np.all(np.isfinite(r)):
            raise ValueError(
                f"calibration needs at least 2 finite residuals (got {n}, {int(np.isfinite(r).sum())} finite)"
            )
        kind = self.difficulty
        if kind == "spread" and (spread is None or not np.any(np.asarray(spread) > 0)):
            kind = "constant"  # one member (or identical members): no spread to scale by
        self.model_ = None
        if kind == "constant":
            sigma = np.ones(n)
        elif kind == "spread":
            sigma = np.asarray(spread, dtype=np.float64).reshape(-1)
        else:
            X = np.asarray(features, dtype=np.float64)
            folds = np.asarray(folds, dtype=np.int64).reshape(-1)
            med = float(np.median(r))
            self.log_eps_ = 0.1 * med if med > 0 else (float(r.mean()) or 1.0)
            target = np.log(r + self.log_eps_)
            sigma = np.empty(n)
            for k in np.unique(folds):
                held = folds == k
                if held.all() or (~held).sum() < 2:  # a single fold: no out-of-fold model possible
                    raise ValueError("the difficulty model needs at least 2 folds of calibration rows")
                sigma[held] = np.exp(self._predict_model(self._fit_model(X[~held], target[~held]), X[held]))
            self.model_ = self._fit_model(X, target)
        self.difficulty_ = kind
        med = float(np.median(sigma[np.isfinite(sigma)])) if np.isfinite(sigma).any() else 1.0
        self.sigma_floor_ = SIGMA_FLOOR * med if med > 0 else 1.0
        self.oof_sigma_ = self._floored(sigma)
        scores = r / self.oof_sigma_
        self.scores_ = np.sort(scores)
        self.score_m2_ = float(np.mean(self.scores_**2))
        self.n_calibration_ = int(n)
        self._fit_refit_gain(scores, refit_positions, refit_residuals)
        return self

    def _fit_refit_gain(self, scores: np.ndarray, positions, residuals) -> None:
        """The refit's and the single stacks' normalized scores on the calibration rows the refit
        never trained on (same sigma for both; see the module docstring)."""
        self.refit_scores_ = self.refit_single_scores_ = None
        self.refit_positions_ = np.zeros(0, dtype=np.int64)
        self.refit_factor_se_ = {}
        if positions is None or residuals is None:
            self.refit_gain_reason_ = "no refit: the prediction is the average of the fold-model stacks"
            return
        pos = np.asarray(positions, dtype=np.int64).reshape(-1)
        res = np.abs(np.asarray(residuals, dtype=np.float64).reshape(-1))
        if len(pos) != len(res):
            raise ValueError(f"refit_positions has {len(pos)} rows, refit_residuals {len(res)}")
        if len(pos) and (pos.min() < 0 or pos.max() >= len(scores) or len(np.unique(pos)) != len(pos)):
            raise ValueError("refit_positions must be distinct positions among the calibration rows")
        keep = np.isfinite(res)
        pos, res = pos[keep], res[keep]
        order = np.argsort(pos)
        self.refit_positions_ = pos[order]
        if len(pos) < REFIT_MIN_ROWS:
            self.refit_gain_reason_ = (
                f"{len(pos)} calibration rows held out from the refit (fewer than {REFIT_MIN_ROWS}): factor 1"
            )
            return
        refit, single = res / self.oof_sigma_[pos], scores[pos]
        self.refit_scores_, self.refit_single_scores_ = np.sort(refit), np.sort(single)
        self.refit_gain_reason_ = None
        self.refit_factor_se_ = self._refit_factor_se(single, refit)

    def _refit_factor_se(self, single: np.ndarray, refit: np.ndarray) -> dict:
        """The sampling error of the factor at each of ``REPORT_LEVELS``: the standard deviation
        of :func:`refit_quantile_ratio` (unclipped) over ``REFIT_SE_DRAWS`` seeded bootstrap
        resamples of the held-out rows, each row's two scores drawn together."""
        rng = np.random.default_rng(self.seed)
        draws = [rng.integers(0, len(refit), len(refit)) for _ in range(REFIT_SE_DRAWS)]
        return {
            level_name(lv): float(np.nanstd([refit_quantile_ratio(single[d], refit[d], lv) for d in draws]))
            for lv in REPORT_LEVELS
        }

    def _floored(self, sigma: np.ndarray) -> np.ndarray:
        sigma = np.asarray(sigma, dtype=np.float64)
        return np.maximum(np.where(np.isfinite(sigma), sigma, self.sigma_floor_), self.sigma_floor_)

    # -- new rows -----------------------------------------------------------------------------------
    def sigma(
        self,
        features: Optional[np.ndarray] = None,
        spread: Optional[np.ndarray] = None,
        n: int = 0,
        fold_spread: Optional[np.ndarray] = None,
    ):
        """The scale of new rows' intervals, (n,): their difficulty and, given ``fold_spread`` (the
        standard deviation of the K stacked fold-model predictions of each row) with
        ``averaging``, times the averaging correction :meth:`averaging_factor`."""
        difficulty = self.difficulty_sigma(features, spread, n)
        if fold_spread is None or self.difficulty_ == "constant" or self.refit_gain_active:
            return difficulty  # the refit-gain correction, when active, replaces the averaging one
        return difficulty * self.averaging_factor(difficulty, fold_spread)

    def difficulty_sigma(self, features: Optional[np.ndarray] = None, spread: Optional[np.ndarray] = None, n: int = 0):
        """The difficulty of new rows: (n,)."""
        if self.difficulty_ == "constant":
            m = n or (len(features) if features is not None else len(spread))
            return np.ones(m)
        if self.difficulty_ == "spread":
            return self._floored(np.asarray(spread, dtype=np.float64).reshape(-1))
        X = np.asarray(features, dtype=np.float64)
        if len(X) == 0:
            return np.zeros(0)
        return self._floored(np.exp(self._predict_model(self.model_, X)))

    def averaging_factor(self, difficulty: np.ndarray, fold_spread: np.ndarray) -> np.ndarray:
        """``rho = sqrt(V / (V + fold_spread^2))``, ``V = difficulty^2 * m2``, per row, in
        [AVERAGING_FLOOR, 1] (ones without ``averaging``, for ``constant`` and for a calibrator
        fitted before the correction)."""
        difficulty = np.asarray(difficulty, dtype=np.float64).reshape(-1)
        if not self.averaging or self.difficulty_ == "constant" or not getattr(self, "score_m2_", 0.0) > 0:
            return np.ones(len(difficulty))
        s = np.asarray(fold_spread, dtype=np.float64).reshape(-1)
        if s.shape != difficulty.shape:
            raise ValueError(f"fold_spread has {len(s)} rows for {len(difficulty)} difficulties")
        s = np.where(np.isfinite(s), s, 0.0)
        rho2 = 1.0 / (1.0 + s**2 / (difficulty**2 * self.score_m2_))
        return np.sqrt(np.clip(rho2, AVERAGING_FLOOR**2, 1.0))

    @property
    def refit_gain_active(self) -> bool:
        """Whether the refit-gain factor scales the quantiles (on, estimated, not ``constant``;
        ``"auto"``: and estimated from ``REFIT_AUTO_ROWS`` held-out rows or more)."""
        scores = getattr(self, "refit_scores_", None)
        if scores is None or self.difficulty_ == "constant":
            return False
        return refit_gain_applies(getattr(self, "refit_gain", False), len(scores))

    def refit_gain_status(self) -> Optional[str]:
        """Why the refit-gain factor is not applied (None when it is)."""
        if self.refit_gain_active:
            return None
        mode = check_refit_gain(getattr(self, "refit_gain", False))
        if mode is False:
            return "off (refit_gain: false)"
        reason = getattr(self, "refit_gain_reason_", "calibrated before the refit-gain correction")
        if reason is not None:
            return reason
        if self.difficulty_ == "constant":
            return "constant difficulty: plain conformal, one width"
        return (
            f"auto: {len(self.refit_scores_)} held-out rows (fewer than {REFIT_AUTO_ROWS}): "
            "the averaging correction applies"
        )

    def refit_factor(self, level: float, force: bool = False) -> float:
        """g(level) in ``REFIT_CLIP``: how much smaller the refit's score quantile is than a single
        fold-model stack's, on the calibration rows the refit never trained on (1 when inactive;
        ``force``: the estimate even when ``refit_gain`` is off)."""
        level = check_coverage(level)
        if not (self.refit_gain_active or (force and getattr(self, "refit_scores_", None) is not None)):
            return 1.0
        ratio = refit_quantile_ratio(self.refit_single_scores_, self.refit_scores_, level)
        return float(np.clip(ratio, *REFIT_CLIP)) if math.isfinite(ratio) else 1.0

    def quantile(self, level: Optional[float] = None) -> float:
        """q: the interval at coverage ``level`` (default ``coverage``) is yhat +- q * sigma (the
        conformal quantile of the scores, times the refit-gain factor when active)."""
        level = check_coverage(self.coverage if level is None else level)
        return conformal_quantile(self.scores_, level) * self.refit_factor(level)

    def std_scale(self) -> float:
        """q at 68.27 %: the calibrated std is ``std_scale() * sigma``."""
        return self.quantile(ONE_SIGMA)

    def summary(self) -> dict:
        return {
            "method": "normalized split conformal on out-of-fold residuals (CV+ style)",
            "difficulty": self.difficulty_,
            "averaging": bool(getattr(self, "averaging", False))
            and self.difficulty_ != "constant"
            and not self.refit_gain_active,
            "score_m2": getattr(self, "score_m2_", None),
            "refit_gain": self.refit_gain_active,
            "refit_gain_mode": str(check_refit_gain(getattr(self, "refit_gain", False))).lower(),
            "refit_gain_rows": int(len(getattr(self, "refit_positions_", ()))),
            "refit_gain_reason": self.refit_gain_status(),
            **(
                {f"refit_factor_{level_name(lv)}": self.refit_factor(lv, force=True) for lv in REPORT_LEVELS}
                | {f"refit_factor_se_{k}": v for k, v in getattr(self, "refit_factor_se_", {}).items()}
                if getattr(self, "refit_scores_", None) is not None
                else {}
            ),
            "coverage": float(self.coverage),
            "n_calibration": self.n_calibration_,
            "q_std": self.std_scale(),
            **{f"q_{level_name(lv)}": self.quantile(lv) for lv in REPORT_LEVELS},
        }


def coverage_metrics(y, pred, sigma: np.ndarray, calibrator: ConformalCalibrator, levels=REPORT_LEVELS) -> dict:
    """Share of rows whose truth lies in the interval, and the mean interval width, at each level:
    ``coverage_<pct>``, ``width_<pct>``."""
    err = np.abs(np.asarray(y, dtype=np.float64) - np.asarray(pred, dtype=np.float64))
    sigma = np.asarray(sigma, dtype=np.float64)
    out = {}
    for lv in levels:
        half = calibrator.quantile(lv) * sigma
        out[f"coverage_{level_name(lv)}"] = float(np.mean(err <= half))
        out[f"width_{level_name(lv)}"] = float(np.mean(2.0 * half))
    return out


def reliability_curve(y, pred, sigma, calibrator: ConformalCalibrator, levels=None) -> tuple[np.ndarray, np.ndarray]:
    """(nominal levels, observed coverage) for a reliability diagram."""
    levels = np.linspace(0.05, 0.95, 19) if levels is None else np.asarray(levels, dtype=np.float64)
    err = np.abs(np.asarray(y, dtype=np.float64) - np.asarray(pred, dtype=np.float64))
    sigma = np.asarray(sigma, dtype=np.float64)
    observed = np.array([np.mean(err <= calibrator.quantile(float(lv)) * sigma) for lv in levels])
    return levels, observed
