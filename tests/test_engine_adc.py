"""ADC conversion error (cimstat.engine.adc) against brute-force sampling of the same model."""
from __future__ import annotations

import numpy as np
import pytest

from cimstat.engine.adc import conversion_error

CASES = [
    # mu, sd, delta, lo, hi, sigma_n, lattice, nonnegative
    (10.0, 3.0, 1.0, -127, 127, 0.2, True, False),      # ADC step = lattice: rounding removes thermal noise
    (10.0, 3.0, 1.0, -127, 127, 0.5, True, False),
    (30.0, 20.0, 128 / 127, -127, 127, 0.0, True, False),  # near-lattice beat
    (5.0, 2.0, 64 / 63, 0, 63, 0.3, True, True),
    (100.0, 50.0, 2.0, -31, 31, 0.5, True, False),     # heavy clipping, ties to even
    (1000.0, 300.0, 50.0, -7, 7, 20.0, False, False),
    (3.0, 0.2, 50.0, -7, 7, 5.0, False, False),         # sub-LSB signal
    (20.0, 0.5, 2.0, 0, 15, 0.0, True, True),
    (400.0, 900.0, 40.0, -127, 127, 10.0, False, False),
    (60.0, 300.0, 3.0, -127, 127, 1.0, True, False),   # wide lattice distribution: periodic mean
]


def _brute(mu, sd, delta, lo, hi, sn, lattice, nonneg, n=400_000, seed=0):
    rng = np.random.default_rng(seed)
    if nonneg:
        k, theta = mu * mu / sd ** 2, sd ** 2 / mu
        p = rng.gamma(k, theta, n)
    else:
        p = rng.normal(mu, sd, n)
    if lattice:
        p = np.round(p)
    v = p + rng.normal(0, sn, n) if sn > 0 else p
    err = np.clip(np.round(v / delta), lo, hi) * delta - p
    return err.mean(), (err * err).mean()


@pytest.mark.parametrize("case", CASES, ids=[str(i) for i in range(len(CASES))])
def test_conversion_error_matches_sampling(case):
    mu, sd, delta, lo, hi, sn, lattice, nonneg = case
    m, s = conversion_error(np.array([mu]), np.array([sd * sd]), np.zeros(1) if lattice else np.zeros(1),
                            delta, lo, hi, sn, nonnegative=nonneg)
    bm, bs = _brute(*case)
    assert abs(10 * np.log10(s[0] / bs)) < 0.15, (s[0], bs)
    assert abs(m[0] - bm) < 0.03 * np.sqrt(bs) + 1e-3


def test_lattice_beats_additive_model_by_10db():
    """σ_th = 0.15 LSB on a lattice ADC: σ²+Δ²/12 over-predicts the error by more than 10 dB."""
    _, s = conversion_error(np.array([10.0]), np.array([9.0]), np.zeros(1), 1.0, -127, 127, 0.15)
    naive = 1 / 12 + 0.15 ** 2
    assert 10 * np.log10(naive / s[0]) > 10


def test_point_mass_at_zero_mixture():
    m, s = conversion_error(np.array([1.0]), np.array([1.0]), np.zeros(1), 1.0, -7, 7, 0.0,
                            p_zero=np.array([0.5]))
    # half the time P = 0 exactly (no error), else an integer with mean 2: rounding is exact too
    assert s[0] < 1e-6


def test_bounded_nonnegative_partial_sum_uses_its_support():
    """A skewed P in [0, upper]: the Beta model's clipping tail matches sampling; an unbounded
    Gamma of the same moments would put mass above the largest possible partial sum."""
    upper, mu, sd, delta, hi = 1000.0, 80.0, 150.0, 6.0, 127
    rng = np.random.default_rng(3)
    m, v = mu / upper, (sd / upper) ** 2
    common = m * (1 - m) / v - 1
    p = rng.beta(m * common, (1 - m) * common, 400_000) * upper
    err = np.clip(np.round(p / delta), 0, hi) * delta - p
    _, s = conversion_error(np.array([mu]), np.array([sd * sd]), np.zeros(1), delta, 0, hi, 0.0,
                            nonnegative=True, upper=upper)
    assert abs(10 * np.log10(s[0] / (err ** 2).mean())) < 0.2


def test_thermal_noise_table_equals_the_pointwise_integral():
    """With thermal noise alone the conditional ADC error is a function of the integer partial sum:
    tabulated once per distinct value, it equals the element-by-element integral."""
    from cimstat.engine.sampled_adc import _conditional_error, _pointwise_error

    rng = np.random.default_rng(1)
    p = rng.integers(-40, 300, size=(200, 7)).astype(np.float64)
    for sigma_n in (0.1, 0.7, 3.0):
        got = _conditional_error(p, None, 4.0, -31, 31, sigma_n)
        want = _pointwise_error(p, None, 4.0, -31, 31, sigma_n)
        np.testing.assert_allclose(got[0], want[0], rtol=0, atol=1e-12)
        np.testing.assert_allclose(got[1], want[1], rtol=0, atol=1e-12)


def test_distinct_rows_match_numpy_unique():
    from cimstat.engine.sampled_adc import _unique_rows

    rng = np.random.default_rng(2)
    base = rng.integers(0, 4, size=(30, 50)).astype(np.int16)
    codes = base[rng.integers(0, 30, size=400)]
    rows, inverse = _unique_rows(codes)
    np.testing.assert_array_equal(rows[inverse], codes)
    assert len(rows) == len(np.unique(codes, axis=0))


def test_narrow_partial_sum_closed_form_matches_sampling():
    """P ~ N(μ, sd²) narrower than Δ/8 plus thermal noise: the Gaussian cell moments equal a sampled
    E[(Q(P + n) - P)²] (the 5-point Gauss–Hermite rule they replace missed the jumps of the staircase)."""
    from cimstat.engine.adc import _narrow_gaussian

    rng = np.random.default_rng(3)
    delta, lo, hi = 8.0, -15, 15
    mu = np.array([3.9, 4.1, 11.7, 118.0, -125.0])
    sd = np.array([0.3, 0.9, 0.5, 0.2, 0.8])
    for sigma_n in (0.0, 0.4, 2.0):
        mean, sq = _narrow_gaussian(mu, sd, delta, lo, hi, sigma_n)
        p = mu[:, None] + sd[:, None] * rng.standard_normal((5, 400_000))
        v = p + sigma_n * rng.standard_normal(p.shape)
        err = np.clip(np.round(v / delta), lo, hi) * delta - p
        np.testing.assert_allclose(mean, err.mean(1), atol=0.03)
        np.testing.assert_allclose(sq, (err ** 2).mean(1), rtol=0.02, atol=0.05)


@pytest.mark.parametrize("sigma", [0.3, 0.5, 0.75, 1.0, 1.5, 3.0])
def test_thermal_error_on_the_lattice_near_the_clipping_ends(sigma):
    # integer partial sums, Δ = 1 partial-sum unit (a max-range ADC with one row per code), unsigned ADC:
    # the exact sum over output codes, E[(Q(P + n) - P)²] = Σ_c (c - P)² P(code c | P), the end codes taking
    # the tails. At P = lo the smooth closed form had 0.22 where this is 0.163 (σ = 0.5): 1.4 dB per layer on
    # a 1-bit-slice array whose partial sums are mostly 0.
    from scipy.special import ndtr

    from cimstat.engine.sampled_adc import _pointwise_error

    lo, hi = 0, 63
    p = np.array([0.0, 1.0, 2.0, 5.0, 31.0, 61.0, 63.0, 0.4, 62.7])
    mean, var = _pointwise_error(p, None, 1.0, lo, hi, sigma)
    codes = np.arange(lo, hi + 1, dtype=np.float64)[:, None]
    upper = np.where(codes >= hi, np.inf, (codes + 0.5 - p[None]) / sigma)
    lower = np.where(codes <= lo, -np.inf, (codes - 0.5 - p[None]) / sigma)
    prob = ndtr(upper) - ndtr(lower)
    exact_sq = ((codes - p[None]) ** 2 * prob).sum(0)
    exact_mean = ((codes - p[None]) * prob).sum(0)
    tol = 0.012 if sigma >= 2 else 2e-3       # the closed form above 2 LSB: ~1 % near the ends
    np.testing.assert_allclose(var + mean ** 2, exact_sq, rtol=tol)
    np.testing.assert_allclose(mean, exact_mean, atol=tol * sigma)


@pytest.mark.parametrize("lo,hi", [(-16, 15), (0, 31), (-8, 7), (0, 3)])
def test_fourier_moments_equal_the_sum_over_every_cell(lo, hi):
    """The closed-form rounding sawtooth plus the clipped cells gives the moments of the sum over every ADC
    cell, from 0.25 LSB of noise up, inside the range, at the ends and deep in clipping."""
    from cimstat.engine.adc import fourier_cell_moments, gaussian_cell_moments

    rng = np.random.default_rng(lo + 100 * hi)
    delta = 3.7
    p = np.concatenate([rng.uniform(lo - 6, hi + 6, 20_000), np.arange(lo - 3, hi + 4, 0.5)]) * delta
    s = np.concatenate([rng.uniform(0.25, 3.0, 20_000), np.full(2 * (hi - lo + 7), 0.6)]) * delta
    exact = gaussian_cell_moments(p, s, delta, lo, hi)
    fast = fourier_cell_moments(p, s, delta, lo, hi)
    for a, b, unit in zip(exact, fast, (delta, delta ** 2, delta ** 2)):
        assert np.abs(a - b).max() < 1e-10 * unit
    # far inside the range under wide noise: the textbook Δ²/12, no offset, no correlation with the noise
    mid = np.array([(lo + hi) / 2 * delta])
    if hi - lo > 20:
        m, q, c = fourier_cell_moments(mid, np.array([1.2 * delta]), delta, lo, hi)
        assert abs(m[0]) < 1e-12 and q[0] == pytest.approx(delta ** 2 / 12, rel=1e-9) and abs(c[0]) < 1e-9
