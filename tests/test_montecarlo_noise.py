"""Device and ADC noise of the Monte Carlo referee: what is fixed, what is redrawn, and its statistics."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from cimstat.hardware import LayerConfig, LayerRanges
from cimstat.montecarlo.layers import AnalogLayer
from cimstat.montecarlo.measure import snr_db
from test_montecarlo_reference import input_codes, weight_codes

torch.set_num_threads(1)


def _linear(k: int, c: int, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    lin = nn.Linear(k, c, bias=False)
    with torch.no_grad():
        lin.weight.normal_()
    return lin


def _layer(lin, cfg, seed=0, signed=False, adc=None, **kw):
    return AnalogLayer("noisy", lin, cfg, LayerRanges(signed, 1.0, adc), chip_seed=seed, **kw)


def _bits(codes: np.ndarray, width: int, offset: int) -> np.ndarray:
    return (codes >> offset) & (2 ** width - 1)


@pytest.mark.parametrize("exact", [True, False])
def test_read_noise_is_redrawn_at_every_input_pass(exact):
    """Bit-serial passes with independent read noise: Var = Σ_i 4^i Σ_k x_ik² σ_k². A draw shared by the
    passes of a vector would give Σ_k q_k² σ_k² instead (225 vs 85 for q = 15)."""
    k, reps = 6, 4000
    lin = _linear(k, 2)
    cfg = LayerConfig(input_bits=4, weight_bits=4, input_slice_bits=1, read_noise=0.04, read_noise_model="proportional")
    layer = _layer(lin, cfg, exact_read_noise=exact)
    x = torch.ones(reps, k)  # code 15 = 0b1111: every pass reads every row
    out = layer.integer_outputs(x).numpy()
    qw, _ = weight_codes(lin.weight.detach().double().numpy(), 4, False)
    sigma2 = (0.04 * np.abs(qw)) ** 2  # proportional: σ = α·g on the one device holding |qw|
    expected = 85.0 * sigma2.sum(axis=1)
    shared = 225.0 * sigma2.sum(axis=1)
    var = out.var(axis=0, ddof=1)
    assert np.allclose(out.mean(axis=0), 15 * qw.sum(axis=1), atol=4 * np.sqrt(expected / reps))
    assert np.all(np.abs(var / expected - 1) < 0.12), (var, expected, shared)
    # a second call draws new noise; rewinding the stream repeats it
    again = layer.integer_outputs(x).numpy()
    layer.reset_noise()
    first = layer.integer_outputs(x).numpy()
    assert not np.array_equal(again, out) and np.array_equal(first, out)


def test_programming_error_is_fixed_per_instance_and_redrawn_across_instances():
    k, c, instances = 5, 2, 400
    lin = _linear(k, c)
    cfg = LayerConfig(input_bits=3, weight_bits=4, input_slice_bits=1, weight_slice_bits=(1, 2),
                      programming_error=0.05, programming_error_model="proportional")
    x = torch.rand(1, k)
    q, _ = input_codes(x.double().numpy(), 1.0, 3, False)
    qw, _ = weight_codes(lin.weight.detach().double().numpy(), 4, False)
    first = _layer(lin, cfg, seed=11)
    a = first.integer_outputs(x.repeat(3, 1))
    assert torch.equal(a[0], a[1]) and torch.equal(a[0], first.integer_outputs(x)[0])  # fixed within a chip
    outs = np.stack([_layer(lin, cfg, seed=s).integer_outputs(x).numpy()[0] for s in range(instances)])
    # shared by every pass: error = Σ_j 2^{o_j} Σ_k q_k e_jk, Var = Σ_j 4^{o_j} Σ_k q_k² (α g_jk)²
    var_theory = np.zeros(c)
    for width, offset in ((1, 0), (2, 1)):
        for pol in (np.clip(qw, 0, None), np.clip(-qw, 0, None)):
            g = _bits(pol, width, offset)
            var_theory += 4 ** offset * ((q[0][None, :] ** 2) * (0.05 * g) ** 2).sum(axis=1)
    var = outs.var(axis=0, ddof=1)
    assert np.all(np.abs(var / var_theory - 1) < 0.25), (var, var_theory)
    assert np.allclose(outs.mean(axis=0), (q @ qw.T)[0], atol=5 * np.sqrt(var_theory / instances))


def test_noisy_conductances_never_go_below_zero():
    lin = _linear(64, 8)
    cfg = LayerConfig(input_bits=2, weight_bits=4, weight_slice_bits=1, programming_error=0.3, read_noise=0.5)
    layer = _layer(lin, cfg, exact_read_noise=True)
    reads = layer.sample_conductances(weight_slice=2, n_reads=200)  # (reads, polarity, C, K)
    assert reads.min() >= 0.0 and (reads == 0).float().mean() > 0.2  # clipping happens and is at 0
    qw, _ = weight_codes(lin.weight.detach().double().numpy(), 4, False)
    # an off device (target 0) reads a rectified Gaussian: positive mean
    g = torch.tensor(_bits(np.clip(qw, 0, None), 1, 2))
    off = reads[:, 0][:, g == 0]
    assert off.mean() > 0.05
    # the programmed value is fixed per chip: the per-device mean over reads varies between devices with
    # the same target, and its average over devices of target 0 matches E[max(0, e_p + e_r)] = σ/√(2π)
    sigma_tot = math.hypot(0.3, 0.5)
    assert abs(float(off.mean()) - sigma_tot / math.sqrt(2 * math.pi)) < 0.03


@pytest.mark.parametrize("model", ["state_independent", "proportional"])
def test_fast_read_noise_matches_the_exact_per_device_mode(model):
    """Same mean and variance of the digital result; exact in distribution where no device clips."""
    k, c, reps = 24, 2, 3000
    lin = _linear(k, c, seed=3)
    cfg = LayerConfig(input_bits=4, weight_bits=5, input_slice_bits=2, weight_slice_bits=2, rows_per_array=8,
                      read_noise=0.1, read_noise_model=model, programming_error=0.05)
    x = torch.rand(1, k).repeat(reps, 1)
    exact = _layer(lin, cfg, seed=5, exact_read_noise=True).integer_outputs(x).numpy()
    fast = _layer(lin, cfg, seed=5).integer_outputs(x).numpy()
    se = np.sqrt((exact.var(axis=0) + fast.var(axis=0)) / reps)
    assert np.all(np.abs(exact.mean(axis=0) - fast.mean(axis=0)) < 4.5 * se)
    assert np.all(np.abs(fast.var(axis=0) / exact.var(axis=0) - 1) < 0.15)


def test_fast_read_noise_snr_error_is_negligible_with_adc_and_clipping():
    """State-independent noise on off devices (clipped at 0) + a coarse ADC: SNR of the two modes agrees."""
    k, c, v = 32, 4, 1500
    lin = _linear(k, c, seed=4)
    cfg = LayerConfig(input_bits=4, weight_bits=5, input_slice_bits=1, weight_slice_bits=2, rows_per_array=16,
                      adc_bits=4, read_noise=0.15)
    table = cfg.adc_max_range(False, k) * 0.3
    x = torch.rand(v, k)
    ideal = _layer(lin, LayerConfig(input_bits=4, weight_bits=5), seed=0)(x).double()
    snrs = {}
    for exact in (True, False):
        y = _layer(lin, cfg, seed=2, adc=table, exact_read_noise=exact)(x).double()
        snrs[exact] = snr_db(float((ideal ** 2).sum()), float(((y - ideal) ** 2).sum()))
    assert abs(snrs[True] - snrs[False]) < 0.3, snrs


def test_adc_thermal_noise_is_dithered_by_rounding_and_redrawn():
    """σ_th well below one LSB at a unit step: rounding removes it; at σ_th = 1 LSB it shows up."""
    lin = _linear(6, 2)
    base = dict(input_bits=3, weight_bits=3, adc_bits=8)
    x = torch.rand(200, 6)
    unit = np.full((1, 1), 127.0)  # Δ = 1 partial-sum unit
    clean = _layer(lin, LayerConfig(**base), adc=unit).integer_outputs(x)
    quiet = _layer(lin, LayerConfig(adc_thermal_noise_lsb=0.05, **base), adc=unit).integer_outputs(x)
    assert torch.equal(clean, quiet)  # 10 σ below the rounding threshold
    loud = _layer(lin, LayerConfig(adc_thermal_noise_lsb=1.0, **base), adc=unit)
    err = (loud.integer_outputs(x) - clean).numpy()
    # E[(round(n))²] for n ~ N(0,1): Σ_i i² P(|n - i| < 1/2)
    from scipy.stats import norm
    i = np.arange(-8, 9)
    expected = float(np.sum(i ** 2 * (norm.cdf(i + 0.5) - norm.cdf(i - 0.5))))
    assert abs(float(np.mean(err ** 2)) / expected - 1) < 0.15


def test_same_seed_same_result_and_other_seed_differs():
    lin = _linear(10, 3)
    cfg = LayerConfig(input_bits=4, weight_bits=4, weight_slice_bits=1, adc_bits=5, adc_thermal_noise_lsb=0.3,
                      programming_error=0.05, read_noise=0.05)
    table = cfg.adc_max_range(False, 10)
    x = torch.rand(20, 10)
    a = _layer(lin, cfg, seed=7, adc=table)(x)
    b = _layer(lin, cfg, seed=7, adc=table)(x)
    c = _layer(lin, cfg, seed=8, adc=table)(x)
    assert torch.equal(a, b) and not torch.equal(a, c)
