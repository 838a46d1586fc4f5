"""The refit-gain correction of the conformal intervals (matfusion/ensembles/calibration.py,
``ConformalCalibrator(refit_gain=...)``): estimated on the calibration rows the refit held out only,
shrinks the intervals when the refit is better than a single fold-model stack, stays ~1 when it is
not, falls back to 1 with a reason, and survives a pickle and the summary's JSON."""

import json
import pickle

import numpy as np
import pytest

from matfusion.ensembles import StackedEnsemble
from matfusion.ensembles.calibration import (
    ONE_SIGMA,
    REFIT_AUTO_ROWS,
    REFIT_CLIP,
    REFIT_MIN_ROWS,
    ConformalCalibrator,
    conformal_quantile,
)

RF = {"family": "rf", "rf": {"n_estimators": 40, "min_samples_leaf": 1, "max_features": 1.0}, "seed": 0, "cpus": 1}
LEVELS = (ONE_SIGMA, 0.9, 0.95)


def _calibrated(refit_scale: float, n=3000, m=600, seed=0, mode=True):
    """A calibrator whose residuals are single-model errors of scale sigma(x); the refit's errors
    on the first ``m`` calibration rows are ``refit_scale`` times an independent draw of them."""
    rng = np.random.default_rng(seed)
    sigma = 0.2 + rng.uniform(0.0, 1.0, n)
    single = rng.normal(0.0, 1.0, n) * sigma
    refit = refit_scale * rng.normal(0.0, 1.0, m) * sigma[:m]
    pos = rng.permutation(n)[:m]  # any positions among the calibration rows
    order = np.argsort(pos)
    residuals = single.copy()
    residuals[pos] = single[:m]
    sig = np.empty(n)
    sig[pos] = sigma[:m]
    sig[np.setdiff1d(np.arange(n), pos)] = sigma[m:]
    cal = ConformalCalibrator(difficulty="spread", refit_gain=mode)
    return cal.fit(residuals, spread=sig, refit_positions=pos[order], refit_residuals=refit[order]), sig


def test_refit_gain_factor_follows_the_refits_smaller_errors_and_stays_one_without_gain():
    better, _ = _calibrated(0.8)
    same, _ = _calibrated(1.0)
    for lv in LEVELS:
        assert 0.72 <= better.refit_factor(lv) <= 0.88, (lv, better.refit_factor(lv))
        assert same.refit_factor(lv) >= 0.93, (lv, same.refit_factor(lv))
        # the quantile the intervals use is the conformal one times the factor
        q = conformal_quantile(better.scores_, lv)
        assert better.quantile(lv) == pytest.approx(q * better.refit_factor(lv))
    assert better.refit_gain_reason_ is None and better.refit_gain_active
    # a refit far better than the clip allows, or worse: clipped to REFIT_CLIP
    assert _calibrated(0.3)[0].refit_factor(0.9) == REFIT_CLIP[0]
    assert _calibrated(1.5)[0].refit_factor(0.9) == REFIT_CLIP[1]
    # switched off: factor 1 (the estimate is kept, summary reports it), and the averaging
    # correction is back; on, it replaces the averaging correction
    sigma, fold_spread = np.full(4, 0.5), np.full(4, 0.3)
    assert (better.sigma(spread=sigma, fold_spread=fold_spread) == sigma).all()
    better.set_params(refit_gain=False)
    assert better.refit_factor(0.9) == 1.0 and better.quantile(0.9) == conformal_quantile(better.scores_, 0.9)
    assert (better.sigma(spread=sigma, fold_spread=fold_spread) < sigma).all()
    summary = better.summary()
    assert summary["refit_gain"] is False and summary["averaging"] is True
    assert summary["refit_gain_rows"] == 600 and summary["refit_factor_90"] < 0.9
    json.dumps(summary)  # what MLflow (calibration.json) and the model card record


def test_auto_applies_the_factor_only_from_enough_held_out_rows():
    """``refit_gain="auto"``: the factor from REFIT_AUTO_ROWS held-out rows or more,
    the averaging correction below, with the reason in the summary; ``True`` applies it from any
    estimate; a bad value is refused with its name."""
    many, _ = _calibrated(0.8, m=REFIT_AUTO_ROWS, mode="auto")
    assert many.refit_gain_active and many.refit_factor(0.9) < 0.9
    assert many.summary()["refit_gain"] is True and many.summary()["refit_gain_reason"] is None
    assert many.summary()["refit_gain_mode"] == "auto"
    few, _ = _calibrated(0.8, m=REFIT_AUTO_ROWS - 1, mode="auto")
    assert not few.refit_gain_active and few.refit_factor(0.9) == 1.0
    assert few.quantile(0.9) == conformal_quantile(few.scores_, 0.9)
    summary = few.summary()
    assert summary["refit_gain"] is False and summary["averaging"] is True
    assert f"{REFIT_AUTO_ROWS - 1} held-out rows (fewer than {REFIT_AUTO_ROWS})" in summary["refit_gain_reason"]
    assert summary["refit_factor_90"] < 0.9  # estimated and recorded all the same
    forced, _ = _calibrated(0.8, m=REFIT_AUTO_ROWS - 1, mode=True)
    assert forced.refit_gain_active and forced.refit_factor(0.9) < 0.9
    off, _ = _calibrated(0.8, mode=False)
    assert not off.refit_gain_active and off.summary()["refit_gain_reason"] == "off (refit_gain: false)"
    with pytest.raises(ValueError, match="refit_gain must be true, false or auto"):
        _calibrated(0.8, mode="sometimes")
    from matfusion.ensembles.stacking import InvalidParameterError

    X, y = _learnable(60, 2, 0.005)
    with pytest.raises(InvalidParameterError, match="refit_gain must be true, false or auto"):
        StackedEnsemble([RF], n_folds=2, refit_gain="yes").fit(X, None, y, np.arange(60))


def test_refit_gain_falls_back_to_one_with_a_reason_and_checks_its_rows():
    rng = np.random.default_rng(1)
    r = rng.normal(0.0, 1.0, 200)
    plain = ConformalCalibrator(difficulty="constant", refit_gain=True).fit(r)
    assert plain.refit_factor(0.9) == 1.0 and "no refit" in plain.refit_gain_reason_
    few = ConformalCalibrator(refit_gain=True, difficulty="spread").fit(
        r, spread=np.ones(200), refit_positions=np.arange(REFIT_MIN_ROWS - 1), refit_residuals=0.1 * r[:29]
    )
    assert few.refit_factor(0.68) == 1.0 and f"fewer than {REFIT_MIN_ROWS}" in few.refit_gain_reason_
    assert few.summary()["refit_gain"] is False
    with pytest.raises(ValueError, match="refit_positions has 3 rows, refit_residuals 2"):
        ConformalCalibrator(difficulty="spread").fit(
            r, spread=np.ones(200), refit_positions=[0, 1, 2], refit_residuals=[0.1, 0.2]
        )
    with pytest.raises(ValueError, match="distinct positions among the calibration rows"):
        ConformalCalibrator(difficulty="spread").fit(
            r, spread=np.ones(200), refit_positions=[0, 200], refit_residuals=[0.1, 0.2]
        )
    # a constant (plain conformal) calibrator never applies it, even when estimated
    const = ConformalCalibrator(difficulty="constant", refit_gain=True).fit(
        r, refit_positions=np.arange(100), refit_residuals=0.5 * r[:100]
    )
    assert const.refit_scores_ is not None and not const.refit_gain_active and const.refit_factor(0.9) == 1.0


def test_pickles_and_old_calibrators_without_the_correction():
    cal, sig = _calibrated(0.8)
    twin = pickle.loads(pickle.dumps(cal))
    for lv in LEVELS:
        assert twin.quantile(lv) == cal.quantile(lv) < conformal_quantile(cal.scores_, lv)
    # a calibrator pickled before the correction: no refit_gain parameter, no refit scores
    state = {
        k: v
        for k, v in cal.__dict__.items()
        if k not in ("refit_gain", "refit_scores_", "refit_single_scores_", "refit_positions_", "refit_gain_reason_")
    }
    old = pickle.loads(pickle.dumps(cal))
    old.__dict__.clear()
    old.__setstate__(state)
    assert old.refit_gain is False and old.quantile(0.9) == conformal_quantile(cal.scores_, 0.9)
    assert old.summary()["refit_gain"] is False


def _learnable(n, seed, noise):
    """y = sin(12 x) + noise of scale ``noise``, one feature: with little noise a forest's error is
    its interpolation error, about the spacing of the training rows, which falls with their number
    (a fold model has 4/5 of the refit's); with pure noise more rows cannot help."""
    rng = np.random.default_rng(seed)
    X = rng.uniform(0.0, 1.0, (n, 1))
    f = np.sin(12.0 * X[:, 0])
    return X, (f if noise < 1 else 0.0 * f) + noise * rng.normal(0.0, 1.0, n)


@pytest.mark.parametrize("noise", [0.005, 1.0])
def test_stack_estimates_the_refit_gain_on_the_calibration_rows_the_refit_held_out(noise):
    X, y = _learnable(700, 0, noise)
    rows, test = np.arange(500), np.arange(500, 700)
    y_poisoned = y.copy()
    y_poisoned[test] = 1e6  # a test label that reached the correction would blow it up
    ens = StackedEnsemble([RF], meta="mae", n_folds=5, seed=0).fit(X, None, y_poisoned, rows)
    cal, used = ens.calibrators_[0], ens.refit_gain_rows_[0]
    # only calibration rows, and only those the refit never trained on: its held-out rows
    assert set(used) <= set(ens.calibration_rows_[0]) and not set(used) & set(test)
    np.testing.assert_array_equal(used, ens.refit_es_rows_)
    assert not set(used) & set(ens.refit_train_rows_) and len(used) == 75
    assert cal.refit_gain_reason_ is None and np.isfinite(cal.refit_scores_).all()
    factors = [cal.refit_factor(lv, force=True) for lv in LEVELS]
    if noise < 1:  # the refit (all rows) is clearly better than a fold model (4/5 of them)
        assert max(factors) < 0.97 and np.mean(factors) < 0.9, factors
    else:  # nothing to learn: more rows do not help
        assert min(factors) > 0.9, factors
    # without a refit: no estimate, the averaging correction stays
    avg = StackedEnsemble([RF], meta="mae", n_folds=5, seed=0, refit=False).fit(X, None, y_poisoned, rows)
    assert len(avg.refit_gain_rows_[0]) == 0 and "no refit" in avg.calibrators_[0].refit_gain_reason_


def test_ensemble_config_refit_gain_reaches_every_calibrator():
    """``ensemble.refit_gain`` (EnsembleConfig) -> StackedEnsemble -> each target's calibrator."""
    from matfusion.config import EnsembleConfig
    from matfusion.ensembles.pipeline import interval_settings

    assert EnsembleConfig().refit_gain is True and interval_settings(EnsembleConfig())["refit_gain"] is True
    assert StackedEnsemble([RF]).refit_gain is True and ConformalCalibrator().refit_gain is True
    X, y = _learnable(300, 1, 0.005)
    on = StackedEnsemble([RF], meta="mae", n_folds=3, seed=0, **interval_settings(EnsembleConfig(refit_gain=True)))
    on.fit(X, None, y, np.arange(300))
    assert on.calibrators_[0].refit_gain is True and on.calibrators_[0].summary()["refit_gain"] is True
    assert on.get_params()["refit_gain"] is True


def test_the_factors_standard_error_matches_its_spread_over_new_draws_and_is_recorded():
    """``refit_factor_se_``: the bootstrap standard error of the factor at each reported level is
    about the spread of the factor over independent draws of the held-out rows, halves with four
    times the rows, is seeded, and lands in the summary (absent without a refit)."""
    from matfusion.ensembles.calibration import refit_quantile_ratio

    for lv, name in ((0.68, "68"), (0.9, "90")):
        draws = [_calibrated(0.8, n=1200, m=150, seed=s)[0] for s in range(30)]
        spread = np.std([refit_quantile_ratio(c.refit_single_scores_, c.refit_scores_, lv) for c in draws])
        se = np.mean([c.refit_factor_se_[name] for c in draws])
        assert 0.6 * spread <= se <= 1.6 * spread, (lv, se, spread)
        many = np.mean([_calibrated(0.8, n=2400, m=600, seed=s)[0].refit_factor_se_[name] for s in range(5)])
        assert 0.35 <= many / se <= 0.7, (lv, many, se)
    cal = _calibrated(0.8, m=150, seed=3)[0]
    assert cal.refit_factor_se_ == _calibrated(0.8, m=150, seed=3)[0].refit_factor_se_
    summary = cal.summary()
    assert set(summary) >= {"refit_factor_se_68", "refit_factor_se_90", "refit_factor_se_95"}
    assert summary["refit_factor_se_90"] == cal.refit_factor_se_["90"] > 0
    rng = np.random.default_rng(1)
    plain = ConformalCalibrator(difficulty="constant").fit(rng.normal(0.0, 1.0, 200))
    assert plain.refit_factor_se_ == {} and not any(k.startswith("refit_factor") for k in plain.summary())


def test_the_model_card_names_the_correction_its_factor_and_the_factors_error():
    from matfusion.ensembles.export import _uncertainty_lines

    cal = _calibrated(0.8, m=150, seed=3)[0]
    c = cal.summary()
    card = "\n".join(_uncertainty_lines({"ensemble": {"calibration": c}}))
    assert (
        f"refit-gain factor {c['refit_factor_68']:.3f} / {c['refit_factor_90']:.3f} / {c['refit_factor_95']:.3f} "
        f"(bootstrap se {c['refit_factor_se_68']:.3f} / {c['refit_factor_se_90']:.3f} / {c['refit_factor_se_95']:.3f})"
        " at 68 / 90 / 95 %, measured on 150 training rows the refit held out"
    ) in card
    cal.set_params(refit_gain=False)
    card = "\n".join(_uncertainty_lines({"ensemble": {"calibration": cal.summary()}}))
    assert "corrected by the fold models' spread (averaging) (refit gain not applied: off (refit_gain: false))" in card
    assert "refit-gain factor" not in card
