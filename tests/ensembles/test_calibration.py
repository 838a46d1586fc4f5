"""Conformal intervals of the stacked ensembles (matfusion/ensembles/calibration.py and their use in
stacking, evaluation and export): coverage on heteroscedastic data, widths that follow the noise,
training rows only, multi-target, old pickles."""

import pickle

import numpy as np
import pytest

from matfusion.ensembles import StackedEnsemble, evaluate_ensemble
from matfusion.ensembles.calibration import (
    AVERAGING_FLOOR,
    ONE_SIGMA,
    ConformalCalibrator,
    check_coverage,
    conformal_quantile,
    coverage_metrics,
)
from matfusion.ensembles.export import output_columns
from matfusion.ensembles.stacking import InvalidParameterError

RF = {"family": "rf", "rf": {"n_estimators": 40, "min_samples_leaf": 5}, "seed": 0, "cpus": 1}
ET = {"family": "et", "et": {"n_estimators": 40, "min_samples_leaf": 5}, "seed": 0, "cpus": 1}


def _heteroscedastic(n=1400, seed=0):
    """y = smooth f(x) + noise whose scale grows 20-fold with x0; (X, y, noise scale)."""
    rng = np.random.default_rng(seed)
    X = rng.uniform(0.0, 1.0, (n, 4))
    scale = 0.05 + 1.0 * X[:, 0]
    y = 3.0 * X[:, 1] + np.sin(6.0 * X[:, 2]) + rng.normal(0.0, 1.0, n) * scale
    return X, y, scale


@pytest.fixture(scope="module")
def hetero():
    X, y, scale = _heteroscedastic()
    rows, test = np.arange(800), np.arange(800, len(y))
    ens = StackedEnsemble([RF, ET], meta="mae", n_folds=5, seed=0).fit(X, None, y, rows)
    return X, y, scale, rows, test, ens


def test_conformal_quantile_takes_the_finite_sample_rank():
    scores = np.arange(1.0, 101.0)  # 1..100
    assert conformal_quantile(scores, 0.9) == 91.0  # ceil(101 * 0.9) = 91st smallest
    assert conformal_quantile(scores, 0.5) == 51.0
    assert conformal_quantile(scores, 0.995) == 100.0  # rank 101 > n: the largest score
    assert conformal_quantile(np.arange(1.0, 10.0), 0.8) == 8.0  # ceil(10 * 0.8) = 8
    for bad in (0.0, 1.0, 1.5, -0.1, True, "0.9"):
        with pytest.raises(ValueError, match="coverage must be a number in"):
            check_coverage(bad)
    with pytest.raises(ValueError, match="difficulty must be one of"):
        ConformalCalibrator(difficulty="magic").fit(np.ones(10))


def test_heteroscedastic_coverage_and_wider_intervals_where_noise_is_larger(hetero):
    X, y, scale, rows, test, ens = hetero
    assert ens.calibrated and ens.calibrators_[0].difficulty_ == "model"
    out = ens.predict_all(X, None, test)
    err = np.abs(y[test] - out["mean"])
    cal = ens.calibrators_[0]
    m = coverage_metrics(y[test], out["mean"], out["sigma"], cal)
    # 600 test rows: the binomial sd of a 90 % coverage is 1.2 points; tolerance 5 points
    for level in (68, 90, 95):
        assert abs(m[f"coverage_{level}"] - level / 100) <= 0.05, (level, m)
    assert abs(np.mean(err <= out["std"]) - ONE_SIGMA) <= 0.05  # the calibrated std holds ~68 %
    assert np.mean(err <= out["spread"]) < 0.3  # the old fold-model spread is far too small here
    # lower/upper at the fitted coverage (0.9), std = the 68.27 % half-width
    np.testing.assert_allclose(out["upper"] - out["mean"], cal.quantile(0.9) * out["sigma"])
    np.testing.assert_allclose(out["mean"] - out["lower"], cal.quantile(0.9) * out["sigma"])
    np.testing.assert_allclose(out["std"], cal.quantile(ONE_SIGMA) * out["sigma"])
    # wider where the noise is larger: the noisiest third gets intervals > 2x the quietest third's
    width = out["upper"] - out["lower"]
    lo, hi = scale[test] < np.quantile(scale[test], 1 / 3), scale[test] > np.quantile(scale[test], 2 / 3)
    assert width[hi].mean() > 2.0 * width[lo].mean()
    assert np.corrcoef(width, scale[test])[0, 1] > 0.6
    # plain (constant-width) conformal: same coverage on average, one width everywhere
    plain = StackedEnsemble([RF, ET], meta="mae", n_folds=5, seed=0, difficulty="constant").fit(X, None, y, rows)
    pout = plain.predict_all(X, None, test)
    pwidth = pout["upper"] - pout["lower"]
    perr = np.abs(y[test] - pout["mean"])
    assert np.ptp(pwidth) < 1e-9 and abs(np.mean(perr <= pwidth / 2) - 0.9) <= 0.05
    # coverage within the quiet and the noisy third: the normalized intervals stay near 90 % in
    # both, the plain ones over-cover the quiet rows and under-cover the noisy ones
    normalized = [np.mean(err[part] <= (width / 2)[part]) for part in (lo, hi)]
    constant = [np.mean(perr[part] <= (pwidth / 2)[part]) for part in (lo, hi)]
    assert min(normalized) >= 0.78 and constant[0] > 0.97 and constant[1] < 0.8, (normalized, constant)
    assert max(abs(c - 0.9) for c in normalized) < max(abs(c - 0.9) for c in constant)
    # a higher coverage gives wider intervals of the same rows
    i95 = ens.predict_interval(X, None, test, coverage=0.95)
    assert (i95["upper"] - i95["lower"] > width).all()


def _single_vs_averaged(n, K, rng, c=0.7):
    """Errors of single fold models (e + d_k) and of their average (e + mean_k d_k): a common
    error of scale sigma(x) and fold-model deviations of scale c * sigma(x)."""
    sigma = 0.2 + rng.uniform(0.0, 1.0, n)
    e = rng.normal(0.0, 1.0, n) * sigma
    d = rng.normal(0.0, 1.0, (K, n)) * c * sigma
    return sigma, e, d


def test_averaging_correction_narrows_the_intervals_of_an_averaged_prediction():
    """Calibration residuals of single fold models, predictions by the average of K = 5: the plain
    intervals over-cover; with the fold-model spread the correction brings them near nominal."""
    rng = np.random.default_rng(0)
    sigma_cal, e_cal, d_cal = _single_vs_averaged(3000, 5, rng)
    cal = ConformalCalibrator(difficulty="spread").fit(e_cal + d_cal[0], spread=sigma_cal)
    sigma, e, d = _single_vs_averaged(20000, 5, rng)
    err, fold_spread = np.abs(e + d.mean(axis=0)), d.std(axis=0)  # the K predictions' spread is d's
    plain, corrected = cal.sigma(spread=sigma), cal.sigma(spread=sigma, fold_spread=fold_spread)
    assert (corrected < plain).all() and (corrected >= AVERAGING_FLOOR * plain).all()
    for level in (ONE_SIGMA, 0.9, 0.95):
        q = cal.quantile(level)
        over, fixed = np.mean(err <= q * plain) - level, np.mean(err <= q * corrected) - level
        assert over > 0.025 and abs(fixed) < over / 2, (level, over, fixed)
    # no spread, no correction; a spread far beyond the difficulty: the floor
    np.testing.assert_allclose(cal.averaging_factor(sigma[:5], np.zeros(5)), 1.0)
    np.testing.assert_allclose(cal.averaging_factor(sigma[:5], 1e6 * sigma[:5]), AVERAGING_FLOOR)
    # switched off, or a calibrator pickled before the correction: the plain scale
    cal.set_params(averaging=False)
    np.testing.assert_allclose(cal.sigma(spread=sigma, fold_spread=fold_spread), plain)
    old = pickle.loads(pickle.dumps(cal.set_params(averaging=True)))
    state = {k: v for k, v in cal.__dict__.items() if k not in ("averaging", "score_m2_")}
    old.__dict__.clear()
    old.__setstate__(state)
    np.testing.assert_allclose(old.sigma(spread=sigma, fold_spread=fold_spread), plain)
    # plain conformal (constant) keeps one width for every row
    const = ConformalCalibrator(difficulty="constant").fit(e_cal + d_cal[0])
    np.testing.assert_array_equal(const.sigma(n=len(err), fold_spread=fold_spread), np.ones(len(err)))


def test_calibration_uses_training_rows_only(hetero):
    X, y, scale, rows, test, ens = hetero
    np.testing.assert_array_equal(ens.calibration_rows_[0], rows)
    assert not set(ens.calibration_rows_[0].tolist()) & set(test.tolist())
    assert ens.calibrators_[0].n_calibration_ == len(rows)
    # the test rows' targets cannot reach the calibration: garbage there changes nothing
    y_bad = y.copy()
    y_bad[test] = 1e6
    twin = StackedEnsemble([RF, ET], meta="mae", n_folds=5, seed=0).fit(X, None, y_bad, rows)
    np.testing.assert_array_equal(twin.calibrators_[0].scores_, ens.calibrators_[0].scores_)
    # every calibration residual is out of fold: the stacked OOF prediction of a fold's rows comes
    # from a meta-learner fitted on the other folds' rows, so their own labels do not move it
    folds = np.array([ens.fold_of_row_[int(r)] for r in rows])
    y_moved = y[rows] + np.where(folds == 0, 5.0, 0.0)
    meta_only = ens._cross_fitted_stack(ens.oof_, y_moved, folds)
    np.testing.assert_allclose(meta_only[folds == 0], ens.calibration_oof_[0][folds == 0])
    assert not np.allclose(meta_only[folds == 1], ens.calibration_oof_[0][folds == 1])
    # an evaluation on rows that calibrated the ensemble is refused
    with pytest.raises(ValueError, match="used to fit the ensemble"):
        evaluate_ensemble(ens, X, None, y, rows[:5])


def test_multi_target_intervals_per_target_on_labelled_rows():
    X, y1, scale = _heteroscedastic(n=900, seed=1)
    rng = np.random.default_rng(2)
    y2 = 10.0 * X[:, 3] + rng.normal(0.0, 0.2, len(y1))  # homoscedastic, another scale
    targets = np.column_stack([y1, y2])
    rows, test = np.arange(600), np.arange(600, 900)
    hidden = rng.choice(rows, 60, replace=False)
    targets[hidden, 1] = np.nan
    ens = StackedEnsemble([RF, ET], meta="nnls", n_folds=4, seed=0).fit(X, None, targets, rows, target_names=["a", "b"])
    assert len(ens.calibrators_) == 2
    np.testing.assert_array_equal(ens.calibration_rows_[0], rows)
    np.testing.assert_array_equal(ens.calibration_rows_[1], np.setdiff1d(rows, hidden))
    out = ens.predict_interval(X, None, test)
    for key in ("mean", "std", "lower", "upper", "spread"):
        assert out[key].shape == (len(test), 2), key
    assert (out["lower"] < out["mean"]).all() and (out["mean"] < out["upper"]).all()
    ev = evaluate_ensemble(ens, X, None, targets, test)
    for t in ("a", "b"):
        assert abs(ev.metrics[f"coverage_90_{t}"] - 0.9) <= 0.06, ev.metrics
        assert ev.metrics[f"coverage_nominal_{t}"] == 0.9 and ev.metrics[f"width_90_{t}"] > 0
    # b's noise is constant: its widths vary less than a's (relative spread of the widths)
    w = out["upper"] - out["lower"]
    assert np.std(w[:, 0]) / np.mean(w[:, 0]) > 1.5 * np.std(w[:, 1]) / np.mean(w[:, 1])
    assert {"lower_a", "upper_b", "spread_a", "std_b"} <= set(ev.predictions.columns)
    assert set(ev.reliability) == {"a", "b"}
    assert output_columns(ens)[:5] == ["prediction_a", "std_a", "lower_a", "upper_a", "spread_a"]


def test_spread_difficulty_and_a_single_member(hetero):
    X, y, scale, rows, test, _ = hetero
    one = StackedEnsemble([RF], n_folds=3, seed=0, difficulty="spread").fit(X, None, y, rows)
    assert one.calibrators_[0].difficulty_ == "constant"  # one member has no spread
    # the averaging correction's path (the refit-gain correction, on by default, would replace it)
    two = StackedEnsemble([RF, ET], n_folds=3, seed=0, difficulty="spread", refit_gain=False).fit(X, None, y, rows)
    assert two.calibrators_[0].difficulty_ == "spread"
    out = two.predict_all(X, None, test)
    spread = out["members"].std(axis=1)
    cal = two.calibrators_[0]
    difficulty = np.maximum(spread, cal.sigma_floor_)
    np.testing.assert_allclose(cal.difficulty_sigma(spread=spread), difficulty)
    # the interval scale: the difficulty times the averaging correction of the fold-model spread
    rho = cal.averaging_factor(difficulty, out["spread"])
    assert (rho < 1).all() and (rho >= AVERAGING_FLOOR).all()
    np.testing.assert_allclose(out["sigma"], difficulty * rho)
    with pytest.raises(InvalidParameterError, match="coverage must be a number in"):
        StackedEnsemble([RF], coverage=1.0).fit(X, None, y, rows)
    with pytest.raises(InvalidParameterError, match="difficulty must be one of"):
        StackedEnsemble([RF], difficulty="gauss").fit(X, None, y, rows)


def test_an_ensemble_pickled_before_calibration_still_predicts_its_spread(hetero):
    X, y, scale, rows, test, ens = hetero
    state = dict(ens.__dict__)
    for key in ("calibrators_", "calibration_rows_", "calibration_oof_", "coverage_", "coverage", "difficulty"):
        state.pop(key)
    old = pickle.loads(pickle.dumps(ens))
    old.__dict__.clear()
    old.__setstate__(state)
    assert not old.calibrated and old.get_params()["coverage"] == 0.9  # params restored
    mean, std = old.predict(X, None, test)
    out = ens.predict_all(X, None, test)
    np.testing.assert_allclose(mean, out["mean"])
    np.testing.assert_allclose(std, out["spread"])  # its std was, and is, the fold-model spread
    assert output_columns(old) == ["prediction", "std"]
    ev = evaluate_ensemble(old, X, None, y, test)
    assert "coverage_90" not in ev.metrics and "lower" not in ev.predictions and not ev.reliability
    with pytest.raises(RuntimeError, match="before conformal calibration"):
        old.predict_interval(X, None, test)
