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
