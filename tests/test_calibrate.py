"""Tests for patchflannel.calibrate: fitting temperature/vector scaling, the identity, the
saved form, and ECE / Brier / reliability on hand-computed cases."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from patchflannel.calibrate import (
    Calibrator,
    brier_score,
    ece_noise_floor,
    expected_calibration_error,
    fit_calibrator,
    reliability,
)


def overconfident(n: int = 2000, m: int = 4, scale: float = 3.0, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Logits whose true class probabilities are softmax(base), reported as base·scale (too sharp)."""
    rng = np.random.default_rng(seed)
    base = rng.normal(0, 1.0, (n, m))
    p = np.exp(base) / np.exp(base).sum(1, keepdims=True)
    y = (rng.random((n, 1)) > p.cumsum(1)).sum(1)  # one draw from each row's distribution
    return base * scale, y


def nll(probs: np.ndarray, y: np.ndarray) -> float:
    return float(-np.log(probs[np.arange(len(y)), y]).mean())


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def test_temperature_fit_recovers_the_scale_and_improves_nll_and_ece() -> None:
    z, y = overconfident()
    cal = fit_calibrator(z, y, "temperature")
    assert cal.kind == "temperature"
    # The logits are 3× too sharp: the fitted temperature is close to 3.
    assert cal.temperature == pytest.approx(3.0, rel=0.15)
    raw, fixed = softmax(z), cal.probabilities(z)
    assert nll(fixed, y) < nll(raw, y) - 0.1
    assert expected_calibration_error(fixed, y) < 0.5 * expected_calibration_error(raw, y)
    assert expected_calibration_error(fixed, y) < 0.05
    assert brier_score(fixed, y) < brier_score(raw, y)
    # A temperature never changes the predicted class.
    np.testing.assert_array_equal(fixed.argmax(1), raw.argmax(1))
    # ... and on held-out data from the same source it still helps.
    z2, y2 = overconfident(seed=1)
    assert nll(cal.probabilities(z2), y2) < nll(softmax(z2), y2)


def test_underconfident_logits_get_temperature_below_one() -> None:
    z, y = overconfident(scale=0.4, seed=2)  # too flat
    assert fit_calibrator(z, y, "temperature").temperature < 0.6


def test_vector_scaling_fixes_a_class_bias() -> None:
    z, y = overconfident(seed=3, scale=1.0)
    z_biased = z.copy()
    z_biased[:, 0] += 2.0  # class 0 systematically over-scored
    cal = fit_calibrator(z_biased, y, "vector")
    assert cal.kind == "vector" and len(cal.scale) == len(cal.bias) == 4
    assert nll(cal.probabilities(z_biased), y) < nll(softmax(z_biased), y) - 0.1
    # The learned bias undoes the shift (relative to the other classes).
    assert cal.bias[0] - np.mean(cal.bias[1:]) == pytest.approx(-2.0, abs=0.3)


def test_none_is_the_identity() -> None:
    z, y = overconfident(n=50)
    cal = fit_calibrator(z, y, "none")
    assert cal == Calibrator("none")
    zt = torch.as_tensor(z)
    assert torch.equal(cal(zt), zt)
    np.testing.assert_allclose(cal.probabilities(z), softmax(z), atol=1e-12)
    assert Calibrator.from_dict(None) == Calibrator("none") == Calibrator.from_dict({})


def test_calling_applies_temperature_and_vector() -> None:
    z = torch.tensor([[2.0, -1.0, 0.5]], dtype=torch.float64)
    torch.testing.assert_close(Calibrator("temperature", temperature=2.0)(z), z / 2)
    vec = Calibrator("vector", scale=[1.0, 2.0, 0.5], bias=[0.0, 1.0, -1.0])
    torch.testing.assert_close(vec(z), torch.tensor([[2.0, -1.0, -0.75]], dtype=torch.float64))
    # float32 scores stay float32 on their device
    assert vec(z.float()).dtype == torch.float32


@pytest.mark.parametrize("cal", [Calibrator("none"), Calibrator("temperature", temperature=1.7),
                                 Calibrator("vector", scale=[1.0, 0.5], bias=[0.25, -0.25])])
def test_to_dict_from_dict_round_trip(cal: Calibrator) -> None:
    d = json.loads(json.dumps(cal.to_dict()))  # as stored in a config.json
    assert set(d) == {"kind", "temperature", "scale", "bias"}
    back = Calibrator.from_dict(d)
    assert back == cal
    # Extra keys (e.g. the ensemble run's calibration.json report) are ignored.
    assert Calibrator.from_dict({**d, "test_ece_raw": 0.1, "fitted_on": "oof"}) == cal


def test_invalid_calibrators_and_inputs() -> None:
    with pytest.raises(ValueError, match="kind"):
        Calibrator("platt")
    for bad in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="temperature"):
            Calibrator("temperature", temperature=bad)
    with pytest.raises(ValueError, match="kind"):
        fit_calibrator(np.zeros((3, 2)), np.zeros(3, dtype=int), "isotonic")
    with pytest.raises(ValueError, match=r"\(n,M\)"):
        fit_calibrator(np.zeros((3, 2)), np.zeros(2, dtype=int))
    with pytest.raises(ValueError, match="NaN"):
        fit_calibrator(np.array([[0.0, math.nan]]), np.array([0]))


# --------------------------------------------------------------------------- metrics by hand


def test_ece_hand_computed() -> None:
    # Four images, two classes, 10 bins.
    probs = np.array([[0.95, 0.05], [0.95, 0.05], [0.35, 0.65], [0.3, 0.7]])
    y = np.array([0, 1, 1, 0])
    # bin (0.9,1]: conf 0.95, accuracy 1/2 → |0.5-0.95| = 0.45, weight 2/4
    # bin (0.6,0.7]: confidences 0.65, 0.7 (mean 0.675), accuracy 1/2 → 0.175, weight 2/4
    assert expected_calibration_error(probs, y, bins=10) == pytest.approx(0.5 * 0.45 + 0.5 * 0.175)
    # One bin: |accuracy − mean confidence| over everything.
    assert expected_calibration_error(probs, y, bins=1) == pytest.approx(abs(0.5 - (0.95 + 0.95 + 0.65 + 0.7) / 4))
    # Perfect calibration: confidence 1 and always right.
    assert expected_calibration_error(np.eye(3), np.arange(3)) == 0.0
    # Confidence exactly on a bin edge belongs to the lower bin (right-closed): 0.5 in (0.4,0.5] of 10 bins.
    rel = reliability(np.array([[0.5, 0.5]]), np.array([0]), bins=10)
    assert rel["count"][4] == 1 and sum(rel["count"]) == 1


def test_ece_noise_floor_of_a_perfectly_calibrated_model() -> None:
    # Labels drawn from the probabilities themselves: calibrated by construction, yet ECE > 0 on a small set.
    logits, y = overconfident(n=200, scale=1.0, seed=3)
    p = softmax(logits)
    floor = ece_noise_floor(p, n_sim=400, seed=1)
    assert 0 < floor["low"] < floor["median"] < floor["high"] and floor["n_images"] == 200
    assert floor["low"] <= expected_calibration_error(p, y) <= floor["high"]
    # The floor shrinks like 1/sqrt(n): 25× the images, about a fifth of the floor.
    big = ece_noise_floor(np.tile(p, (25, 1)), n_sim=50, seed=1)
    assert big["median"] < floor["median"] / 3
    # A model that is wrong about its confidence sits far above its own floor.
    sharp = softmax(logits * 4)
    assert expected_calibration_error(sharp, y) > ece_noise_floor(sharp, n_sim=200)["high"]
    # The p-value of an observed ECE: small far above the floor, large at its median.
    assert ece_noise_floor(sharp, n_sim=200, observed=expected_calibration_error(sharp, y))["p_observed_or_more"] == 0
    assert ece_noise_floor(p, n_sim=400, seed=1, observed=floor["median"])["p_observed_or_more"] > 0.3
    # Same seed, same answer.
    assert ece_noise_floor(p, n_sim=50, seed=7) == ece_noise_floor(p, n_sim=50, seed=7)


def test_brier_hand_computed() -> None:
    probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]])
    y = np.array([0, 1])
    # (0.3² + 0.2² + 0.1²) = 0.14 ; (0.1² + 0.9² + 0.8²) = 1.46
    assert brier_score(probs, y) == pytest.approx((0.14 + 1.46) / 2)
    assert brier_score(np.eye(4), np.arange(4)) == 0.0
    assert brier_score(np.eye(2), np.array([1, 0])) == pytest.approx(2.0)  # the worst


def test_reliability_bins() -> None:
    probs = np.array([[0.95, 0.05], [0.95, 0.05], [0.35, 0.65], [0.3, 0.7]])
    y = np.array([0, 1, 1, 0])
    rel = reliability(probs, y, bins=10)
    assert rel["edges"] == pytest.approx(np.linspace(0, 1, 11).tolist())
    assert rel["count"] == [0, 0, 0, 0, 0, 0, 2, 0, 0, 2]
    assert rel["confidence"][9] == pytest.approx(0.95) and rel["accuracy"][9] == 0.5
    assert rel["confidence"][6] == pytest.approx(0.675) and rel["accuracy"][6] == 0.5
    assert math.isnan(rel["confidence"][0]) and math.isnan(rel["accuracy"][0])
    # ECE is the count-weighted gap of the reliability curve.
    n = sum(rel["count"])
    gap = sum(c / n * abs(a - f) for c, a, f in zip(rel["count"], rel["accuracy"], rel["confidence"]) if c)
    assert expected_calibration_error(probs, y, bins=10) == pytest.approx(gap)
