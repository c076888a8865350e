"""Limit cases of the Monte Carlo referee against the loop reference (noiseless semantics)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cimstat.errors import ConfigError
from cimstat.hardware import LayerConfig, LayerRanges
from cimstat.montecarlo.layers import AnalogLayer
from test_montecarlo_reference import im2col, input_codes, integer_layer, weight_codes

torch.set_num_threads(1)

K, C_OUT, V = 13, 3, 5


def _linear(seed: int = 0, k: int = K, c: int = C_OUT) -> nn.Linear:
    torch.manual_seed(seed)
    lin = nn.Linear(k, c)
    with torch.no_grad():
        lin.weight.normal_()
        lin.bias.normal_()
    return lin


def _inputs(signed: bool, seed: int = 1, v: int = V, k: int = K) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(v, k, generator=g, dtype=torch.float64) * 1.2  # some values clip at x_max = 1
    if signed:
        x = x * torch.where(torch.rand(v, k, generator=g, dtype=torch.float64) < 0.5, -1.0, 1.0)
    x[0, :4] = 0.0  # exact zeros
    return x.to(torch.float32)


def _adc_table(cfg: LayerConfig, signed: bool, seed: int) -> np.ndarray:
    """Odd, clipping-prone ranges: a random fraction of the max range."""
    rng = np.random.default_rng(seed)
    top = cfg.adc_max_range(signed, K)
    return top * rng.uniform(0.15, 0.6, top.shape) + 0.137


# (config, signed input) pairs covering every encoding, slicing form and tiling
CASES = [
    (dict(input_bits=4, weight_bits=5, input_slice_bits=1, weight_slice_bits=2, rows_per_array=5), False),
    (dict(input_bits=5, weight_bits=4, input_slice_bits=(1, 3), weight_slice_bits=(2, 1), rows_per_array=4,
          adc_mode="separate"), True),
    (dict(input_bits=4, weight_bits=4, signed_input_encoding="offset", input_slice_bits=3, weight_encoding="offset",
          weight_slice_bits=(1, 3)), True),
    (dict(input_bits=6, weight_bits=5, weight_scale="per_channel", weight_encoding="offset", input_slice_bits=(2, 2, 2),
          weight_slice_bits=2, rows_per_array=6), False),
    (dict(input_bits=3, weight_bits=3, rows_per_array=K), False),
]


def _layer(cfg: LayerConfig, signed: bool, adc: np.ndarray | None, lin: nn.Module | None = None, **kw) -> AnalogLayer:
    return AnalogLayer("layer", lin or _linear(), cfg, LayerRanges(signed, 1.0, adc), chip_seed=3, **kw)


@pytest.mark.parametrize("fields,signed", CASES)
def test_slicing_with_ideal_adc_equals_the_unsliced_integer_product(fields, signed):
    cfg = LayerConfig(**fields)
    x = _inputs(signed)
    lin = _linear()
    got = _layer(cfg, signed, None, lin).integer_outputs(x)
    q, _ = input_codes(x.double().numpy(), 1.0, cfg.input_bits, signed)
    qw, _ = weight_codes(lin.weight.detach().double().numpy(), cfg.weight_bits, cfg.weight_scale.value == "per_channel")
    exact = q @ qw.T  # int64
    assert np.array_equal(got.numpy(), exact.astype(np.float64))


@pytest.mark.parametrize("fields,signed", CASES)
def test_quantized_adc_matches_the_loop_reference(fields, signed):
    cfg = LayerConfig(adc_bits=4, **fields)
    table = _adc_table(cfg, signed, seed=len(fields))
    x = _inputs(signed)
    lin = _linear()
    layer = _layer(cfg, signed, table, lin, precision="float64")
    got = layer.integer_outputs(x).numpy()
    ref = integer_layer(x.double().numpy(), lin.weight.detach().double().numpy(), cfg, signed, 1.0, table)
    assert np.allclose(got, ref, rtol=0, atol=1e-9 * max(1.0, np.abs(ref).max()))
    # the float32 default path makes the same ADC decisions here
    auto = _layer(cfg, signed, table, lin).integer_outputs(x).numpy()
    assert np.allclose(auto, ref, rtol=0, atol=1e-4 * max(1.0, np.abs(ref).max()))
    # and the layer output is the scaled result plus the bias
    qw, steps = weight_codes(lin.weight.detach().double().numpy(), cfg.weight_bits,
                             cfg.weight_scale.value == "per_channel")
    x_step = 1.0 / (2 ** (cfg.input_bits - 1) - 1 if signed else 2 ** cfg.input_bits - 1)
    y = layer(x).double().numpy()
    assert np.allclose(y, ref * x_step * steps[None, :] + lin.bias.detach().double().numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fields,signed", CASES[:3])
def test_adc_with_unit_step_and_full_range_is_lossless(fields, signed):
    """R = 2^(a-1)-1 (signed) or 2^a-1 (unsigned) puts the ADC step at one partial-sum unit."""
    base = LayerConfig(**fields)
    top = float(base.adc_max_range(signed, K).max())
    bits = int(np.ceil(np.log2(top + 1))) + 1
    cfg = LayerConfig(adc_bits=bits, **fields)
    unit = (2 ** (bits - 1) - 1) if cfg.adc_signed else (2 ** bits - 1)
    assert unit >= top
    table = np.full(base.adc_max_range(signed, K).shape, float(unit))
    x = _inputs(signed)
    ideal = _layer(base, signed, None).integer_outputs(x)
    assert torch.equal(_layer(cfg, signed, table).integer_outputs(x), ideal)


def test_adc_with_many_bits_and_max_range_is_lossless_to_rounding():
    fields, signed = CASES[1]
    cfg = LayerConfig(adc_bits=24, **fields)
    x = _inputs(signed)
    ideal = _layer(LayerConfig(**fields), signed, None).integer_outputs(x)
    got = _layer(cfg, signed, cfg.adc_max_range(signed, K), precision="float64").integer_outputs(x)
    assert torch.allclose(got, ideal, rtol=0, atol=1e-3)


@pytest.mark.parametrize("fields,signed", CASES)
def test_max_adc_range_never_clips(fields, signed):
    """Worst-case inputs (all at full scale) and weights: the largest partial sums reach R, never beyond."""
    cfg = LayerConfig(adc_bits=3, **fields)
    table = cfg.adc_max_range(signed, K)
    lin = _linear()
    with torch.no_grad():
        lin.weight.copy_(torch.sign(lin.weight))  # every code at ±max
        lin.weight[0] = 1.0  # one all-positive and one all-negative channel reach the full range
        lin.weight[1] = -1.0
    x = torch.ones(4, K)
    if signed:
        x[1] = -1.0
        x[2, ::2] = -1.0
    x[3] = 0.5
    seen = []
    layer = _layer(cfg, signed, table, lin, precision="float64")
    layer.partial_sum_observer = lambda name, i, j, t: seen.append((i, j, float(t.abs().max())))
    got = layer.integer_outputs(x).numpy()
    assert all(m <= table[i, j] + 1e-9 for i, j, m in seen)
    assert any(abs(m - table[i, j]) < 1e-9 for i, j, m in seen)  # the range is reached
    # no clipping: identical to the reference whose converter only rounds (range -> infinity, same step)
    ref_cfg = LayerConfig(adc_bits=3, **fields)
    ref = integer_layer(x.double().numpy(), lin.weight.detach().double().numpy(), ref_cfg, signed, 1.0, table)
    assert np.allclose(got, ref, atol=1e-9)
    unclipped = _reference_without_clipping(x, lin, cfg, signed, table)
    assert np.allclose(got, unclipped, atol=1e-9)


def _reference_without_clipping(x, lin, cfg, signed, table):
    """The reference with 30-bit converters of the same step: a step kept, clipping impossible."""
    hi = (2 ** (cfg.adc_bits - 1) - 1) if cfg.adc_signed else (2 ** cfg.adc_bits - 1)
    hi30 = (2 ** 29 - 1) if cfg.adc_signed else (2 ** 30 - 1)
    wide = LayerConfig(**{**cfg.to_dict(), "adc_bits": 30})
    return integer_layer(x.double().numpy(), lin.weight.detach().double().numpy(), wide, signed, 1.0,
                         table * hi30 / hi)


@pytest.mark.parametrize("signed", [False, True])
def test_offset_and_differential_encodings_agree_without_noise(signed):
    x = _inputs(signed)
    common = dict(input_bits=5, weight_bits=5, input_slice_bits=2, rows_per_array=4)
    outs = []
    for enc in ("differential", "offset"):
        for mode in ("difference", "separate"):
            for in_enc in ("split", "offset"):
                cfg = LayerConfig(weight_encoding=enc, adc_mode=mode, signed_input_encoding=in_enc,
                                  weight_slice_bits=(1, 3) if enc == "differential" else (2, 3), **common)
                outs.append(_layer(cfg, signed, None).integer_outputs(x))
    for o in outs[1:]:
        assert torch.equal(o, outs[0])


def test_conv_layer_matches_the_loop_reference():
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, 3, stride=2, padding=1)
    x = torch.rand(2, 2, 5, 6)
    cfg = LayerConfig(input_bits=4, weight_bits=4, input_slice_bits=2, weight_slice_bits=1, rows_per_array=7,
                      adc_bits=4, adc_mode="separate")
    k = 18
    table = cfg.adc_max_range(False, k) * 0.4 + 0.21
    layer = AnalogLayer("conv", conv, cfg, LayerRanges(False, 0.9, table), chip_seed=0, precision="float64")
    y = layer(x)
    assert y.shape == conv(x).shape
    cols = im2col(x.double().numpy(), 3, 3, stride=2, padding=1)
    ref = integer_layer(cols, conv.weight.detach().reshape(3, -1).double().numpy(), cfg, False, 0.9, table)
    _, steps = weight_codes(conv.weight.detach().reshape(3, -1).double().numpy(), 4, False)
    ref_y = ref * (0.9 / 15) * steps[None, :] + conv.bias.detach().double().numpy()
    ref_y = ref_y.reshape(2, 3, 3, 3).transpose(0, 3, 1, 2)  # (N, ho, wo, C) -> (N, C, ho, wo)
    assert np.allclose(y.double().numpy(), ref_y, rtol=1e-5, atol=1e-5)


def test_float_inputs_or_weights_skip_the_integer_path():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1)
    x = torch.randn(2, 3, 6, 6)
    ideal = AnalogLayer("c", conv, LayerConfig(input_bits=None, weight_bits=None),
                        LayerRanges(True, None, None), 0)
    assert torch.allclose(ideal(x), conv(x), rtol=1e-5, atol=1e-5)
    wq = AnalogLayer("c", conv, LayerConfig(input_bits=None, weight_bits=4), LayerRanges(True, None, None), 0)
    qw, steps = weight_codes(conv.weight.detach().reshape(4, -1).double().numpy(), 4, False)
    w_deq = torch.tensor(qw * steps[:, None], dtype=torch.float32).reshape(conv.weight.shape)
    assert torch.allclose(wq(x), F.conv2d(x, w_deq, conv.bias, padding=1), rtol=1e-5, atol=1e-5)


def test_bad_resolved_ranges_raise_config_errors():
    cfg = LayerConfig(input_bits=4, weight_bits=4, input_slice_bits=1, adc_bits=4)
    with pytest.raises(ConfigError, match="input_range"):
        _layer_with(cfg, LayerRanges(False, None, np.ones((4, 1))))
    with pytest.raises(ConfigError, match="adc_range"):
        _layer_with(cfg, LayerRanges(False, 1.0, np.ones((3, 1))))
    with pytest.raises(ConfigError, match="adc_range"):
        _layer_with(cfg, LayerRanges(False, 1.0, np.full((4, 1), np.nan)))
    with pytest.raises(ConfigError, match="signed"):
        _layer_with(LayerConfig(input_bits=1, weight_bits=4), LayerRanges(True, 1.0, None))
    with pytest.raises(ConfigError, match="input_slice_bits"):
        _layer_with(LayerConfig(input_bits=4, weight_bits=4, input_slice_bits=(2, 2)), LayerRanges(True, 1.0, None))


def _layer_with(cfg, ranges):
    return AnalogLayer("x", _linear(), cfg, ranges, 0)


@pytest.mark.parametrize("fields,signed", CASES[:4])
def test_per_device_noise_path_with_vanishing_noise_matches_the_reference(fields, signed):
    """The exact read-noise mode runs its own loop over conversions: pin its ADC and encoding logic too."""
    cfg = LayerConfig(adc_bits=4, read_noise=1e-9, **fields)
    table = _adc_table(cfg, signed, seed=7)
    x = _inputs(signed)
    lin = _linear()
    got = _layer(cfg, signed, table, lin, exact_read_noise=True, precision="float64").integer_outputs(x).numpy()
    ref = integer_layer(x.double().numpy(), lin.weight.detach().double().numpy(), cfg, signed, 1.0, table)
    assert np.allclose(got, ref, rtol=0, atol=1e-6 * max(1.0, np.abs(ref).max()))


@pytest.mark.parametrize("fields,signed", CASES)
def test_lossless_shortcut_equals_the_sliced_computation(fields, signed):
    """Ideal noiseless conversions: forward() uses one integer product; the full sliced path agrees."""
    cfg = LayerConfig(**fields)
    torch.manual_seed(2)
    conv = nn.Conv2d(2, 3, 3, padding=1)
    x = torch.rand(2, 2, 4, 5) * (2 if signed else 1) - (1 if signed else 0)
    layer = AnalogLayer("c", conv, cfg, LayerRanges(signed, 0.8, None), chip_seed=0)
    assert layer.lossless
    fast = layer(x)
    layer.partial_sum_observer = lambda *args: None  # forces the sliced path
    sliced = layer(x)
    assert torch.allclose(fast, sliced, rtol=1e-6, atol=1e-6)
