"""Gauss–Hermite top-1 against limit cases and a sampled reference."""
from __future__ import annotations

import numpy as np

from cimstat.accuracy import correct_probability, top1


def test_zero_noise_is_the_clean_accuracy():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(200, 10))
    y = rng.integers(0, 10, 200)
    assert top1(z, y, np.zeros(10)) == (z.argmax(1) == y).mean()


def test_huge_noise_is_chance():
    rng = np.random.default_rng(1)
    z = rng.normal(size=(50, 10))
    y = z.argmax(1)
    assert abs(top1(z, y, np.full(10, 1e8)) - 0.1) < 1e-3


def test_matches_sampling():
    rng = np.random.default_rng(2)
    z = rng.normal(scale=3.0, size=(40, 10))
    y = rng.integers(0, 10, 40)
    var = rng.uniform(0.5, 4.0, size=10)
    p = correct_probability(z, y, var)
    noisy = z[None] + rng.normal(size=(20000, 40, 10)) * np.sqrt(var)
    ref = (noisy.argmax(2) == y[None]).mean(0)
    np.testing.assert_allclose(p, ref, atol=0.015)


def test_two_classes_closed_form():
    from scipy.stats import norm

    z = np.array([[1.0, 0.0]])
    var = np.array([0.5, 2.0])
    p = correct_probability(z, np.array([0]), var)[0]
    assert abs(p - norm.cdf(1.0 / np.sqrt(2.5))) < 1e-9


def test_left_out_nodes_and_saturated_factors_change_nothing():
    """The shortcuts (negligible nodes left out, factors above SATURATED_ARG taken as 1) against the whole
    48-node rule evaluated factor by factor, with factors on both sides of the cut and far below it."""
    from scipy.stats import norm

    from cimstat.accuracy import SATURATED_ARG

    rng = np.random.default_rng(3)
    n, c = 40, 10
    y = rng.integers(0, c, n)
    sd = rng.uniform(0.2, 2.0, size=(n, c))
    offsets = rng.choice([-1.0, -0.2, 0.2, 1.0], size=(n, c))
    # odd images: every factor's argument within 1 of the cut at the mean node; even ones: anywhere within 3
    scale = np.where(np.arange(n)[:, None] % 2 == 1, SATURATED_ARG + offsets, rng.uniform(-3, 3, size=(n, c)))
    z = -sd * scale
    z[np.arange(n), y] = 0.0
    p = correct_probability(z, y, sd ** 2)
    t, w = np.polynomial.hermite.hermgauss(48)
    t, w = t * np.sqrt(2.0), w / np.sqrt(np.pi)
    ref = np.empty(n)
    for i in range(n):
        others = [j for j in range(c) if j != y[i]]
        margin = z[i, y[i]] + sd[i, y[i]] * t[:, None] - z[i, others][None, :]
        ref[i] = np.prod(norm.cdf(margin / sd[i, others][None, :]), axis=1) @ w
    assert np.abs(p - ref).max() < 1e-13
    assert np.any((p > 0.05) & (p < 0.95))   # not only saturated images


def test_nan_logits_give_nan_not_a_confident_answer():
    z = np.array([[2.0, 0.0, np.nan], [3.0, 0.0, 1.0]])
    p = correct_probability(z, np.array([0, 0]), np.full(3, 0.5))
    assert np.isnan(p[0]) and 0.9 < p[1] < 1.0
