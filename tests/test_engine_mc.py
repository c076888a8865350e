"""Engine vs Monte Carlo referee on tiny layers: one error source at a time, then combinations.

The layer's input statistics are probed on one draw of inputs and the referee runs on an
independent draw of the same distribution, so the comparison is what the product promises
(predict from probes, check on unseen data).
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from cimstat.activation_stats import ProbeSettings, probe_activations
from cimstat.engine import ErrorSource, LayerModel, estimate_layer
from cimstat.hardware import LayerConfig, LayerRanges, ResolvedLayer
from cimstat.montecarlo import AnalogLayer

torch.set_num_threads(1)


def _inputs(n: int, seed: int, signed: bool) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, 4, 10, 10, generator=g)
    smooth = nn.functional.avg_pool2d(base, 3, stride=1, padding=1) * 2.0  # correlated neighbours
    if signed:
        return smooth
    return torch.relu(smooth + 0.3 * torch.randn(n, 1, 10, 10, generator=g))  # correlated channels, zeros


class TinyLayer:
    """A 4->12 channel 3x3 conv with probed statistics (probe draw) and a disjoint MC draw."""

    def __init__(self, signed: bool, seed: int = 0):
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(4, 12, 3, padding=1, bias=True).eval()
        model = nn.Sequential(self.conv).eval()
        x_probe = _inputs(96, seed + 1, signed)
        layers, _, _ = probe_activations(model, [(x_probe, torch.zeros(96))],
                                         settings=ProbeSettings(m_cost_ratio=None))
        self.stats = layers["0"]
        self.model = LayerModel(self.stats, self.conv.weight.detach().numpy())
        self.x_mc = _inputs(128, seed + 2, signed)
        with torch.no_grad():
            self.y_mc = self.conv(self.x_mc).double()
        self.signed = signed
        self.x_max = float(max(abs(self.stats.input_min), abs(self.stats.input_max)))

    def resolved(self, cfg: LayerConfig, input_range: float | None = None, adc_scale: float = 1.0) -> ResolvedLayer:
        adc = None
        if cfg.adc_bits is not None:
            adc = cfg.adc_max_range(self.signed, self.stats.fan_in) * adc_scale
        rng = None if cfg.input_bits is None else (input_range or self.x_max)
        return ResolvedLayer("0", cfg, LayerRanges(self.signed, rng, adc))

    def mc_error(self, resolved: ResolvedLayer, instances: int = 3) -> float:
        """Mean over chips, positions and images of Σ_c (y_hw - y)² (per position)."""
        errs = []
        for i in range(instances):
            layer = AnalogLayer("0", self.conv, resolved.config, resolved.ranges, chip_seed=100 + i)
            with torch.no_grad():
                y = layer(self.x_mc).double()
            errs.append(float(((y - self.y_mc) ** 2).mean(dim=(0, 2, 3)).sum()))
        return float(np.mean(errs))

    def engine_error(self, resolved: ResolvedLayer) -> tuple[float, dict]:
        le = estimate_layer(self.model, resolved)
        return float(le.total.sum()), {s: float(v.sum()) for s, v in le.error.items()}


@pytest.fixture(scope="module")
def unsigned_layer() -> TinyLayer:
    return TinyLayer(signed=False)


@pytest.fixture(scope="module")
def signed_layer() -> TinyLayer:
    return TinyLayer(signed=True, seed=3)


def _db(a: float, b: float) -> float:
    return 10 * math.log10(a / b)


UNSIGNED_CASES = {
    "weights4": dict(input_bits=None, weight_bits=4),
    "inputs4": dict(input_bits=4, weight_bits=None),
    "inputs6_clipped": dict(input_bits=6, weight_bits=None, _input_range=0.5),
    "int8": dict(input_bits=8, weight_bits=8),
    "prog_si": dict(input_bits=8, weight_bits=8, programming_error=0.05),
    "prog_prop_sliced": dict(input_bits=8, weight_bits=8, weight_slice_bits=2, programming_error=0.05,
                             programming_error_model="proportional"),
    "read_si_bitserial": dict(input_bits=6, weight_bits=6, input_slice_bits=1, read_noise=0.05),
    "adc6_max": dict(input_bits=8, weight_bits=8, adc_bits=6, rows_per_array=16),
    "adc5_clip": dict(input_bits=6, weight_bits=6, adc_bits=5, rows_per_array=18, _adc_scale=0.15),
    "adc_lattice_thermal": dict(input_bits=4, weight_bits=4, input_slice_bits=1, weight_slice_bits=1,
                                rows_per_array=31, adc_bits=6, _adc_scale=63 / 31, adc_thermal_noise_lsb=0.2),
    "adc_separate_offset": dict(input_bits=6, weight_bits=6, weight_encoding="offset", adc_bits=7,
                                rows_per_array=24, _adc_scale=0.3, adc_thermal_noise_lsb=1.0),
    "combo": dict(input_bits=6, weight_bits=6, input_slice_bits=2, weight_slice_bits=2, rows_per_array=18,
                  adc_bits=6, _adc_scale=0.4, adc_thermal_noise_lsb=0.5, programming_error=0.03,
                  read_noise=0.02),
}

SIGNED_CASES = {
    "split_int6": dict(input_bits=6, weight_bits=6),
    "offset_int6_adc": dict(input_bits=6, weight_bits=6, signed_input_encoding="offset", adc_bits=7,
                            rows_per_array=18, _adc_scale=0.3),
    "split_bitserial_adc": dict(input_bits=5, weight_bits=5, input_slice_bits=1, adc_bits=5, rows_per_array=12,
                                _adc_scale=0.5, read_noise=0.03),
}


# Known limits of the partial-sum model on these 12-16-row tiles (report them, don't hide them):
# the partial sum's shape is modelled Gaussian (signed) / Gamma (unsigned) from its mean and
# variance; a skewed sum of few ReLU inputs far below one ADC LSB (adc6_max) and a sparse
# bit-serial slice whose read-noise dither vanishes with the input (split_bitserial_adc) sit
# 0.6-0.8 dB off. Realistic arrays (64+ rows) are closer to the model.
TOLERANCE_DB = {"adc6_max": 1.0, "split_bitserial_adc": 1.0}


def _run(layer: TinyLayer, case: dict) -> tuple[float, float, dict]:
    case = dict(case)
    rng, scale = case.pop("_input_range", None), case.pop("_adc_scale", 1.0)
    cfg = LayerConfig(**case)
    res = layer.resolved(cfg, rng, scale)
    est, parts = layer.engine_error(res)
    return est, layer.mc_error(res), parts


@pytest.mark.parametrize("name", sorted(UNSIGNED_CASES))
def test_unsigned_layer_matches_mc(unsigned_layer, name):
    est, mc, parts = _run(unsigned_layer, UNSIGNED_CASES[name])
    assert abs(_db(est, mc)) < TOLERANCE_DB.get(name, 0.5), (name, est, mc, parts)


@pytest.mark.parametrize("name", sorted(SIGNED_CASES))
def test_signed_layer_matches_mc(signed_layer, name):
    est, mc, parts = _run(signed_layer, SIGNED_CASES[name])
    assert abs(_db(est, mc)) < TOLERANCE_DB.get(name, 0.5), (name, est, mc, parts)


def test_sources_are_attributed(unsigned_layer):
    cfg = LayerConfig(input_bits=8, weight_bits=8, programming_error=0.05)
    _, parts = unsigned_layer.engine_error(unsigned_layer.resolved(cfg))
    assert parts[ErrorSource.PROGRAMMING_ERROR] > 10 * parts[ErrorSource.WEIGHT_QUANTIZATION] > 0
    assert parts[ErrorSource.READ_NOISE] == 0 and parts[ErrorSource.ADC_QUANTIZATION] == 0


# ---- the ADC error as an expectation over a probed input sample (cimstat.engine.sampled_adc)
def _im2col(x: torch.Tensor, conv: nn.Conv2d) -> np.ndarray:
    cols = nn.functional.unfold(x, conv.kernel_size, padding=conv.padding, stride=conv.stride)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1]).double().numpy()


def _adc_only_mc(layer: TinyLayer, res: ResolvedLayer) -> np.ndarray:
    """Per channel, mean over positions of (y with ADC - y with an ideal ADC)², one noiseless chip."""
    ideal = ResolvedLayer("0", res.config.replace(adc_bits=None), LayerRanges(res.ranges.signed_input,
                                                                              res.ranges.input_range, None))
    with torch.no_grad():
        y_adc = AnalogLayer("0", layer.conv, res.config, res.ranges, chip_seed=1)(layer.x_mc).double()
        y_ref = AnalogLayer("0", layer.conv, ideal.config, ideal.ranges, chip_seed=1)(layer.x_mc).double()
    return ((y_adc - y_ref) ** 2).mean(dim=(0, 2, 3)).numpy()


@pytest.mark.parametrize("name", ["adc6_max", "adc5_clip", "split_bitserial_noiseless"])
def test_sampled_adc_error_is_exact_on_its_own_sample(unsigned_layer, signed_layer, name):
    """Noiseless conversions are deterministic: over the very vectors the MC converts, the sampled
    ADC error per channel equals the simulator's to rounding precision."""
    layer = signed_layer if name.startswith("split") else unsigned_layer
    case = {"adc6_max": dict(UNSIGNED_CASES["adc6_max"]), "adc5_clip": dict(UNSIGNED_CASES["adc5_clip"]),
            "split_bitserial_noiseless": dict(input_bits=5, weight_bits=5, input_slice_bits=1, adc_bits=5,
                                              rows_per_array=12, _adc_scale=0.5)}[name]
    scale = case.pop("_adc_scale", 1.0)
    res = layer.resolved(LayerConfig(**case), None, scale)
    model = LayerModel(layer.stats, layer.conv.weight.detach().numpy())
    model.input_sample = _im2col(layer.x_mc, layer.conv)
    le = estimate_layer(model, res)
    np.testing.assert_allclose(le.error[ErrorSource.ADC_QUANTIZATION], _adc_only_mc(layer, res), rtol=1e-6,
                               atol=1e-12)


SAMPLED_TOLERANCE_DB = 0.35


@pytest.mark.parametrize("name", ["adc6_max", "adc5_clip", "adc_lattice_thermal", "adc_separate_offset", "combo"])
def test_sampled_adc_unsigned_matches_mc(unsigned_layer, name):
    """With a sample of the probe draw (not the MC draw) the moment model's 1 dB limits go."""
    model = LayerModel(unsigned_layer.stats, unsigned_layer.conv.weight.detach().numpy())
    model.input_sample = _im2col(_inputs(96, 1, False), unsigned_layer.conv)
    case = dict(UNSIGNED_CASES[name])
    rng, scale = case.pop("_input_range", None), case.pop("_adc_scale", 1.0)
    res = unsigned_layer.resolved(LayerConfig(**case), rng, scale)
    est = float(estimate_layer(model, res).total.sum())
    mc = unsigned_layer.mc_error(res)
    assert abs(_db(est, mc)) < SAMPLED_TOLERANCE_DB, (name, est, mc)


def test_sampled_adc_signed_bitserial_matches_mc(signed_layer):
    model = LayerModel(signed_layer.stats, signed_layer.conv.weight.detach().numpy())
    model.input_sample = _im2col(_inputs(96, 4, True), signed_layer.conv)
    case = dict(SIGNED_CASES["split_bitserial_adc"])
    scale = case.pop("_adc_scale")
    res = signed_layer.resolved(LayerConfig(**case), None, scale)
    est = float(estimate_layer(model, res).total.sum())
    assert abs(_db(est, signed_layer.mc_error(res))) < SAMPLED_TOLERANCE_DB


def test_sampled_input_quantization_is_exact_on_its_own_sample(signed_layer):
    """Input rounding and clipping with float weights: over the vectors the MC sees, the sampled
    error per channel equals the simulator's (which is deterministic here)."""
    layer = signed_layer
    res = layer.resolved(LayerConfig(input_bits=4, weight_bits=None), 0.5 * layer.x_max)
    model = LayerModel(layer.stats, layer.conv.weight.detach().numpy())
    model.input_sample = _im2col(layer.x_mc, layer.conv)
    le = estimate_layer(model, res)
    with torch.no_grad():
        y = AnalogLayer("0", layer.conv, res.config, res.ranges, chip_seed=1)(layer.x_mc).double()
    mc = ((y - layer.y_mc) ** 2).mean(dim=(0, 2, 3)).numpy()
    np.testing.assert_allclose(le.error[ErrorSource.INPUT_QUANTIZATION], mc, rtol=1e-6)


def test_precise_route_error_map_is_the_simulators_per_output(unsigned_layer):
    """The precise ADC route (``adc_image_vectors``): the error map it hands the engine is the simulator's
    ADC error at every output of those very inputs (noiseless: deterministic), image-major; its gain, offset
    and white parts are left out (the map carries them)."""
    layer = unsigned_layer
    case = dict(UNSIGNED_CASES["adc5_clip"])
    scale = case.pop("_adc_scale", 1.0)
    res = layer.resolved(LayerConfig(**case), None, scale)
    model = LayerModel(layer.stats, layer.conv.weight.detach().numpy())
    model.input_sample = _im2col(layer.x_mc, layer.conv)
    model.adc_image_vectors = model.input_sample.astype(np.float32)
    assert estimate_layer(model, res).adc_map is None  # the default route unless asked
    le = estimate_layer(model, res, adc_per_image=True)
    ideal = ResolvedLayer("0", res.config.replace(adc_bits=None), LayerRanges(res.ranges.signed_input,
                                                                              res.ranges.input_range, None))
    with torch.no_grad():
        y_adc = AnalogLayer("0", layer.conv, res.config, res.ranges, chip_seed=1)(layer.x_mc).double()
        y_ref = AnalogLayer("0", layer.conv, ideal.config, ideal.ranges, chip_seed=1)(layer.x_mc).double()
    diff = (y_adc - y_ref).flatten(2).transpose(1, 2).reshape(-1, y_adc.shape[1]).numpy()   # (N·P, C) image-major
    assert le.adc_map.shape == diff.shape and np.abs(diff).max() > 0
    np.testing.assert_allclose(le.adc_map, diff, rtol=1e-5, atol=1e-5 * np.abs(diff).max())  # float32 map
    assert not le.white[ErrorSource.ADC_QUANTIZATION].any() and ErrorSource.ADC_QUANTIZATION not in le.gain


# ---- causes meeting on one chip: the ADC absorbing device deviations, the deterministic parts of different sources
DEVICE_ADC_CASES = {
    # an ADC step of one weight level: no rounding error of its own, and it converts a partial sum whose read-noise
    # deviation crosses no threshold as if it had none (the ADC's share below 0; clipped at 0 it was 1.23 dB
    # pessimistic here)
    "split_bitserial_read_adc": dict(input_bits=6, weight_bits=6, input_slice_bits=1, weight_slice_bits=2,
                                     rows_per_array=18, adc_bits=6, _adc_scale=31 / 54, read_noise=0.03),
    # bit-serial passes through the same programmed devices: correlated deviations, each absorbed in part
    # (sampled_adc, first order in their covariance)
    "offset_bitserial_prog_adc": dict(input_bits=5, weight_bits=6, signed_input_encoding="offset", input_slice_bits=1,
                                      weight_slice_bits=2, rows_per_array=18, adc_bits=5, _adc_scale=0.25,
                                      programming_error=0.03),
}


@pytest.mark.parametrize("name", sorted(DEVICE_ADC_CASES))
def test_device_error_under_an_adc_matches_mc(signed_layer, name):
    """Device noise converted by an ADC, on the sampled route (24 chips: a 432-weight layer's programming error
    spread 0.24-0.46 dB over the mean of 6, measured)."""
    model = LayerModel(signed_layer.stats, signed_layer.conv.weight.detach().numpy())
    model.input_sample = _im2col(_inputs(96, 4, True), signed_layer.conv)
    case = dict(DEVICE_ADC_CASES[name])
    scale = case.pop("_adc_scale", 1.0)
    res = signed_layer.resolved(LayerConfig(**case), None, scale)
    est = float(estimate_layer(model, res).total.sum())
    mc = signed_layer.mc_error(res, instances=24 if case.get("programming_error") else 3)
    assert abs(_db(est, mc)) < SAMPLED_TOLERANCE_DB, (name, est, mc)


def test_conv1_offset_inputs_programming_error_matches_mc(default_probes):
    """Offset-encoded inputs, 2-bit weight slices, 3 % programming error on the default model's conv1: the devices'
    clipping bias and the input rounding carry per-channel offsets that partly cancel, so the isolated SNR is above
    what the sources' errors add up to (1.0 dB here; ``LayerEstimate.interaction``)."""
    from cimstat.engine.network import Engine, _probe_images
    from cimstat.hardware import HardwareConfig

    eng = Engine(default_probes)
    cfg = HardwareConfig(LayerConfig(input_bits=5, weight_bits=6, input_slice_bits=1, weight_slice_bits=2,
                                     signed_input_encoding="offset", rows_per_array=64, programming_error=0.03))
    res = eng.resolve(cfg)["conv1"]
    le = estimate_layer(eng.layers["conv1"], res)
    conv = eng._folded.get_submodule("conv1")
    images, _ = _probe_images(default_probes.stats.meta, 32, 10 ** 9)
    with torch.no_grad():
        y = conv(images).double()
        errs = []
        for chip in range(8):
            y_hw = AnalogLayer("conv1", conv, res.config, res.ranges, chip_seed=chip)(images).double()
            errs.append(float(((y_hw - y) ** 2).mean(dim=(0, 2, 3)).sum()))
    signal = float(y.pow(2).mean(dim=(0, 2, 3)).sum())  # E[y²] of the float output, as the referee measures it
    mc_db = 10 * math.log10(signal / np.mean(errs))
    apart_db = 10 * math.log10(float(le.signal.sum()) / float(sum(v.sum() for v in le.error.values())))
    assert abs(le.snr_db - mc_db) < 0.35, (le.snr_db, mc_db, apart_db)
    assert mc_db - apart_db > 0.5  # the cancellation is real: without the interaction the estimate is off


def test_interaction_counts_each_cause_once():
    """Two causes meet as amplitudes; the devices' bias split between programming error and read noise is one cause."""
    from cimstat.engine.layer import LayerEstimate

    ey2, ey = np.array([4.0]), np.array([1.0])
    one = np.array([1.0])

    def estimate(gain: dict, offset: dict) -> LayerEstimate:
        return LayerEstimate(name="x", error={}, signal=one, white={}, fixed={}, gain=gain, offset=offset,
                             output_moments=(ey2, ey))
    a1, m1, a2, m2 = 0.1, -0.2, -0.05, 0.3
    le = estimate({ErrorSource.INPUT_QUANTIZATION: a1 * one, ErrorSource.ADC_QUANTIZATION: a2 * one},
                  {ErrorSource.INPUT_QUANTIZATION: m1 * one, ErrorSource.ADC_QUANTIZATION: m2 * one})
    want = 2 * (a1 * a2 * 4.0 + (a1 * m2 + a2 * m1) * 1.0 + m1 * m2)
    np.testing.assert_allclose(le.interaction, [want])
    split = estimate({ErrorSource.PROGRAMMING_ERROR: 0.7 * a1 * one, ErrorSource.READ_NOISE: 0.3 * a1 * one},
                     {ErrorSource.PROGRAMMING_ERROR: 0.7 * m1 * one, ErrorSource.READ_NOISE: 0.3 * m1 * one})
    np.testing.assert_allclose(split.interaction, [0.0])
