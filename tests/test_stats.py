"""cimstat.stats against brute force on samples drawn from a known distribution."""
from __future__ import annotations

import numpy as np
import pytest

from cimstat.stats import ChannelDistribution, applied_codes


def _samples(signed: bool, n: int = 400_000, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    a = rng.gamma(1.5, 0.7, size=(2, n)) * np.array([[1.0], [0.4]])
    if signed:
        a = a - 1.0
    a[:, rng.random(n) < 0.35] = 0.0  # exact zeros (ReLU / padding)
    return a


def _dist(x: np.ndarray, n_bins: int = 4000) -> ChannelDistribution:
    edges = np.linspace(x.min(), x.max() + 1e-9, n_bins + 1)
    counts = np.stack([np.histogram(c[c != 0], edges)[0] for c in x])
    return ChannelDistribution(edges, counts, (x == 0).sum(1))


def _quantize(x: np.ndarray, bits: int, x_range: float, signed: bool) -> tuple[np.ndarray, float]:
    qmax = 2 ** (bits - 1) - 1 if signed else 2 ** bits - 1
    step = x_range / qmax
    return np.clip(np.round(x / step), -qmax if signed else 0, qmax).astype(np.int64), step


@pytest.mark.parametrize("signed", [False, True])
def test_moments_match_samples(signed):
    x = _samples(signed)
    d = _dist(x)
    np.testing.assert_allclose(d.mean, x.mean(1), rtol=2e-3, atol=1e-4)
    np.testing.assert_allclose(d.second_moment, (x ** 2).mean(1), rtol=2e-3)
    np.testing.assert_allclose(d.p_zero, (x == 0).mean(1), rtol=1e-12)


@pytest.mark.parametrize("signed,bits,frac", [(False, 4, 1.0), (False, 6, 0.4), (True, 5, 1.0), (True, 8, 0.3)])
def test_quantization_error_matches_brute_force(signed, bits, frac):
    x = _samples(signed, seed=1)
    d = _dist(x)
    x_range = frac * np.abs(x).max()
    qi = d.quantize(bits, x_range, signed)
    q, step = _quantize(x, bits, x_range, signed)
    e = q * step - x
    np.testing.assert_allclose(qi.pmf.sum(1), 1.0, atol=1e-12)
    np.testing.assert_allclose(qi.error_sq_mean, (e ** 2).mean(1), rtol=0.02)
    scale = np.sqrt((e ** 2).mean(1) * (x ** 2).mean(1))
    assert np.all(np.abs(qi.error_x_mean - (e * x).mean(1)) <= 0.03 * np.abs((e * x).mean(1)) + 0.01 * scale)
    # zeros quantize without error: Δ²/12 over all values would be far off at low bits
    naive = step ** 2 / 12
    assert np.all(qi.error_sq_mean < naive) or frac < 1


@pytest.mark.parametrize("signed,encoding", [(False, "unsigned"), (True, "split"), (True, "offset")])
def test_slice_statistics_match_brute_force(signed, encoding):
    x = _samples(signed, seed=2)
    d = _dist(x)
    bits = 6
    x_range = 0.7 * np.abs(x).max()
    qi = d.quantize(bits, x_range, signed)
    q, _ = _quantize(x, bits, x_range, signed)
    for pol in ((1, -1) if encoding == "split" else (1,)):
        a_codes = applied_codes(qi.codes, bits, signed, encoding, pol)
        a = applied_codes(q, bits, signed, encoding, pol)
        for offset, width in ((0, 2), (2, 2), (4, 2 if encoding != "split" else 1)):
            st = qi.slice_stats(a_codes, offset, width)
            s = (a >> offset) & (2 ** width - 1)
            np.testing.assert_allclose(st.mean, s.mean(1), rtol=0.02, atol=2e-3)
            np.testing.assert_allclose(st.sq_mean, (s ** 2).mean(1), rtol=0.02, atol=2e-3)
            np.testing.assert_allclose(st.zero_prob, (s == 0).mean(1), rtol=0.01, atol=2e-3)
            cov = ((s - s.mean(1, keepdims=True)) * (x - x.mean(1, keepdims=True))).mean(1)
            np.testing.assert_allclose(st.beta, cov / x.var(1), rtol=0.03, atol=2e-3)


def test_partial_moments_are_exact_for_uniform_bins():
    edges = np.array([0.0, 1.0, 2.0])
    d = ChannelDistribution(edges, np.array([[1, 3]]), np.array([4]))  # half the mass at zero
    g0, g1, g2 = d.partial_moments(np.array([-0.5, 0.5, 1.5, 3.0]))
    np.testing.assert_allclose(g0[0], [0.0, 0.5 + 0.125 * 0.5, 0.5 + 0.125 + 0.375 * 0.5, 1.0])
    np.testing.assert_allclose(g1[0, -1], 0.125 * 0.5 + 0.375 * 1.5)
    np.testing.assert_allclose(g2[0, -1], 0.125 / 3 + 0.375 * (8 - 1) / 3)
