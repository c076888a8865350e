"""The whole-network engine on the (small, cached) default probe set."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cimstat.engine import ErrorSource, engine_for, estimate
from cimstat.errors import EstimationError
from cimstat.hardware import HardwareConfig, LayerConfig

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def engine(default_probes):
    return engine_for(default_probes)


@pytest.fixture(scope="module")
def small_engine(default_probes):
    """An engine over four of the layers, its mean-field route over 64 images (keeps the many-config tests fast)."""
    from cimstat.engine import Engine

    eng = Engine(default_probes, meanfield_images=64)
    eng.layers = {n: eng.layers[n] for n in ("conv1", "layer1.0.conv1", "layer2.0.downsample.0", "fc")}
    return eng


def _est(engine, **knobs):
    cfg = HardwareConfig(LayerConfig(**knobs), name="t")
    return engine.estimate(cfg)


def test_digital_layers_add_nothing_and_the_rest_is_unchanged(engine):
    """A layer taken off the arrays ("digital") has no error and adds no logit noise; every other layer is
    estimated as it is in the all-analog design. (The fc SNR need not rise: at 6-bit inputs and weights with 1 %
    read noise, the 1,000-image referee gives 18.14 dB all analog and 17.91 dB with conv1 and fc digital, the
    engine 18.36 and 17.99: the weight-rounding shifts of the layers partly cancel at the logits.)"""
    knobs = dict(input_bits=6, weight_bits=6, read_noise=0.01)
    analog = engine.estimate(HardwareConfig(LayerConfig(**knobs), name="a"))
    ends = engine.estimate(HardwareConfig(LayerConfig(**knobs), layers={"conv1": "digital", "fc": "digital"}, name="d"))
    assert math.isinf(ends.conv1_snr_db) and math.isinf(ends.layers["fc"].snr_db)
    assert ends.layer_logit_noise["conv1"] == 0 and ends.layer_logit_noise["fc"] == 0
    assert ends.layers["layer2.0.conv1"].snr_db == pytest.approx(analog.layers["layer2.0.conv1"].snr_db, abs=1e-9)
    assert ends.fc_snr_db == pytest.approx(analog.fc_snr_db, abs=1.0) and ends.fc_snr_db != analog.fc_snr_db


def test_ideal_config_has_no_error(engine):
    est = _est(engine, input_bits=None, weight_bits=None)
    assert math.isinf(est.conv1_snr_db) and math.isinf(est.fc_snr_db)
    assert est.top1 == pytest.approx(est.top1_clean)
    # no noise: every probe image is right or wrong for sure, and the image-sampling error is the binomial one
    n = len(engine.labels)
    assert est.top1_se == pytest.approx(math.sqrt(est.top1 * (1 - est.top1) / (n - 1)))


def test_row_has_the_contract_columns(engine):
    row = _est(engine, input_bits=6, weight_bits=6, programming_error=0.02).to_row()
    for key in ("conv1_snr_db", "fc_snr_db", "top1"):
        assert math.isfinite(row[key])
    for s in ErrorSource:
        assert f"err_{s.value}" in row
    assert row["err_programming_error"] > 0 and row["err_adc_quantization"] == 0
    df = _est(engine, input_bits=6, weight_bits=6).breakdown()
    assert list(df["layer"])[0] == "conv1" and len(df) == len(engine.layers)


def test_more_bits_more_snr_and_accuracy(small_engine):
    lo, hi = _est(small_engine, input_bits=4, weight_bits=4), _est(small_engine, input_bits=8, weight_bits=8)
    assert hi.fc_snr_db > lo.fc_snr_db + 10
    assert hi.conv1_snr_db > lo.conv1_snr_db + 10
    # a deterministic logit shift can fix a handful of probe images by chance: not strictly monotone
    assert hi.top1 >= lo.top1 - 0.005


BASE = dict(input_bits=6, weight_bits=6, rows_per_array=128, adc_bits=7, input_slice_bits=3, weight_slice_bits=3,
            programming_error=0.02, read_noise=0.02, adc_thermal_noise_lsb=0.5)
KNOB_CHANGES = {
    "input_bits": 5, "input_range": 1.5, "signed_input_encoding": "offset", "weight_bits": 5,
    "weight_scale": "per_channel", "weight_encoding": "offset", "input_slice_bits": 2, "weight_slice_bits": 2,
    "rows_per_array": 64, "adc_bits": 6, "adc_range": 200.0, "adc_mode": "separate",
    "adc_thermal_noise_lsb": 1.0, "programming_error": 0.05, "programming_error_model": "proportional",
    "read_noise": 0.05, "read_noise_model": "proportional",
}


def test_every_knob_is_honoured(small_engine):
    """Changing any one knob changes the estimate (none is silently ignored)."""
    base = _est(small_engine, **BASE).to_row()
    for knob, value in KNOB_CHANGES.items():
        row = _est(small_engine, **{**BASE, knob: value}).to_row()
        changed = [k for k in row if k.startswith(("snr_db[", "err_")) and not np.isclose(row[k], base[k], rtol=1e-9)]
        assert changed, f"knob {knob} did not change the estimate"


@pytest.fixture(scope="module")
def mf_engine(default_probes):
    """An engine whose mean-field route runs over 250 probe images (keeps these tests fast)."""
    from cimstat.engine import Engine

    return Engine(default_probes, meanfield_images=250)


def test_collapse_takes_the_mean_field_route(mf_engine):
    """Far below TOP1_MIN_FC_SNR_DB the fc SNR and top-1 come from the mean-field route, which sees the collapse
    (20 % read noise, MC on 500 validation images: fc -3.3 dB, top-1 9.7 %; the linearised route says -5.4 dB and
    28 %; the mean-field route -4.9 dB and 10.3 % on these 250 probe images, -0.7 dB and 11.4 % before its read
    noise followed the input patch); above it the linear route stays."""
    from cimstat.engine.network import TOP1_MIN_FC_SNR_DB

    low = _est(mf_engine, read_noise=0.2)
    assert low.route == "meanfield" and f"{TOP1_MIN_FC_SNR_DB:g} dB" in low.route_note and not low.top1_note
    assert low.fc_snr_db_linear < TOP1_MIN_FC_SNR_DB and low.fc_snr_db == low.fc_snr_db_meanfield
    assert -3.3 - 2.0 < low.fc_snr_db < -3.3 + 2.0 and low.top1 < 0.15 < low.top1_linear
    assert low.to_row()["route"] == "meanfield" and low.to_row()["fc_snr_db_linear"] == low.fc_snr_db_linear
    high = _est(mf_engine, read_noise=0.005)
    assert high.fc_snr_db > TOP1_MIN_FC_SNR_DB and high.route == "linear"
    assert high.top1 == high.top1_linear and not high.top1_note and math.isnan(high.fc_snr_db_meanfield)


def test_distorted_layers_take_the_mean_field_route(mf_engine):
    """A layer whose error is as large as its signal, or many layers each heavily distorted, take the network out
    of the linear regime even where the linearised fc SNR stays above TOP1_MIN_FC_SNR_DB. 2-bit weights on
    layer1.1.conv2 (MC, 500 validation images: top-1 93.6 %, fc 6.3 dB) are applied exactly by the mean-field route;
    the linearised route said 100 % and 11.5 dB. One layer at 4.6 dB alone stays linear (MC agrees)."""
    from cimstat.engine.network import TOP1_MAX_LAYER_NSR_SUM, TOP1_MIN_FC_SNR_DB, TOP1_MIN_LAYER_SNR_DB

    one = mf_engine.estimate(HardwareConfig(LayerConfig(), layers={"layer1.1.conv2": {"weight_bits": 2}}, name="w2"))
    assert one.fc_snr_db_linear > TOP1_MIN_FC_SNR_DB and one.layers["layer1.1.conv2"].snr_db < TOP1_MIN_LAYER_SNR_DB
    assert one.route == "meanfield" and "layer1.1.conv2" in one.route_note
    assert 0.90 < one.top1 < 0.96 and 5.0 < one.fc_snr_db < 7.5
    many = _est(mf_engine, input_slice_bits=1, rows_per_array=128, adc_bits=5, adc_range="calibrated",
                weight_encoding="offset")
    nsr = sum(10 ** (-le.snr_db / 10) for le in many.layers.values())
    assert min(le.snr_db for le in many.layers.values()) > TOP1_MIN_LAYER_SNR_DB and nsr > TOP1_MAX_LAYER_NSR_SUM
    assert many.route == "meanfield" and "add up to" in many.route_note
    fine = mf_engine.estimate(HardwareConfig(LayerConfig(), layers={"layer3.1.conv1": {"input_bits": 2}}, name="in2"))
    assert fine.layers["layer3.1.conv1"].snr_db < 6 and fine.top1 == fine.top1_linear and fine.route == "linear"


def test_offset_weights_collapse_on_the_mean_field_route_only_where_the_silent_inputs_lift(mf_engine):
    """adc6-cal-offset-weights of the validation sweep: the layers' error-to-signal ratios add up to 1.3, where the
    linear route was 1.3 dB optimistic on fc (12.56 dB against the 1,000-image MC's 11.27 dB, top-1 98.30 %). The
    mean-field route takes it and, its silent inputs staying near 0, does not collapse: 11.39 dB and 98.45 % on
    1,000 probe images. (When the moved input sample lifted the silent inputs with the active ones' spread, it
    collapsed to -0.03 dB and 10 %.)

    u6 of the stress sweep adds offset-encoded inputs and 1 LSB of ADC thermal noise: its noisy inputs lift the
    silent ones by 0.4-2.2 (the route's pass without the shift), past the calibrated range on every channel
    (offset weights), and the 1,000-image MC (2 chips) collapses to 9.2 ± 1.1 %, fc -0.22 dB. Without the ADC
    clipping at that operating point the route said 18.2 % and -2.23 dB."""
    from cimstat.engine.network import TOP1_MAX_LAYER_NSR_SUM

    est = _est(mf_engine, input_slice_bits=1, rows_per_array=256, adc_bits=6, adc_range="calibrated",
               weight_encoding="offset")
    nsr = sum(10 ** (-le.snr_db / 10) for le in est.layers.values())
    assert TOP1_MAX_LAYER_NSR_SUM < nsr < 2.0 and est.route == "meanfield" and "add up to" in est.route_note
    assert 10.5 < est.fc_snr_db < est.fc_snr_db_linear - 0.1
    assert abs(est.top1 - 0.9830) < 0.015
    u6 = _est(mf_engine, input_slice_bits=1, rows_per_array=256, adc_bits=6, adc_range="calibrated",
              weight_encoding="offset", signed_input_encoding="offset", adc_thermal_noise_lsb=1.0)
    assert u6.route == "meanfield" and abs(u6.top1 - 0.092) < 0.03 and abs(u6.fc_snr_db + 0.22) < 1.0


def test_top1_is_declined_where_the_mean_field_route_cannot_run(default_probes):
    """Given weight matrices only (no network to carry the Gaussians through), the collapse regime has no top-1,
    and the note says why and what to do."""
    from cimstat.engine import Engine
    from cimstat.engine.network import _model_weights

    weights, _ = _model_weights(default_probes)
    eng = Engine(default_probes, weights)
    low = _est(eng, read_noise=0.2)
    assert math.isnan(low.top1) and 0.0 <= low.top1_linear <= 1.0 and low.route == "linear"
    assert "mean-field route is not available" in low.top1_note and "Monte Carlo" in low.top1_note
    assert "weight matrices" in low.top1_note


def test_float_inputs_with_device_noise_is_an_error(engine):
    with pytest.raises(EstimationError, match="programming_error"):
        _est(engine, input_bits=None, weight_bits=8, programming_error=0.02)


def test_estimate_function_reuses_the_engine(default_probes):
    a = estimate(default_probes, "int8")
    b = estimate(default_probes, "int8")
    assert engine_for(default_probes) is engine_for(default_probes)
    assert a.fc_snr_db == b.fc_snr_db
    # the number of mean-field images is an engine of its own (the default one is kept)
    from cimstat.engine.meanfield import MEANFIELD_IMAGES

    few = engine_for(default_probes, meanfield_images=100)
    assert few.meanfield_images == 100 and few is engine_for(default_probes, meanfield_images=100)
    assert engine_for(default_probes) is not few
    assert engine_for(default_probes).meanfield_images == MEANFIELD_IMAGES


def test_sweep_commands_refuse_a_meanfield_image_count_below_one(capsys):
    from cimstat.sweeps.commands import run_main, validate_main

    for main in (run_main, validate_main):
        with pytest.raises(SystemExit):
            main(["sweeps/validation.py", "--meanfield-images", "0"])
        assert "--meanfield-images: expected a positive integer, got 0" in capsys.readouterr().err


def test_conv1_matches_mc_on_unseen_images(engine, default_probes):
    """conv1 isolated SNR vs the referee's analog conv1 on validation images (not probed)."""
    from cimstat import data, models
    from cimstat.montecarlo import AnalogLayer
    from cimstat.network import fold_batchnorm

    folded = fold_batchnorm(models.load("default"))
    images, _ = data.default_tensors("validation")
    x = images[torch.linspace(0, len(images) - 1, 48).round().long()]
    with torch.no_grad():
        y = folded.conv1(x).double()
    for knobs in (dict(input_bits=None, weight_bits=4), dict(input_bits=6, weight_bits=6),
                  dict(input_bits=8, weight_bits=8, programming_error=0.05, weight_slice_bits=2)):
        cfg = HardwareConfig(LayerConfig(**knobs))
        resolved = engine.resolve(cfg)
        est = engine.estimate(cfg, resolved).conv1_snr_db
        errs = []
        for chip in range(2):
            layer = AnalogLayer("conv1", folded.conv1, cfg.layer("conv1"), resolved["conv1"].ranges, chip)
            with torch.no_grad():
                errs.append(float(((layer(x).double() - y) ** 2).sum()))
        mc = 10 * math.log10(float((y ** 2).sum()) / np.mean(errs))
        assert abs(est - mc) < 0.7, (knobs, est, mc)


@pytest.mark.parametrize("knobs", [dict(input_slice_bits=1, rows_per_array=256, adc_bits=6, adc_range="max"),
                                   dict(input_bits=6, input_range="calibrated")],
                         ids=["bitserial-adc6-max", "in6-calibrated"])
def test_conv1_background_patches_match_mc(engine, default_probes, knobs):
    """MNIST patches that are all background are one point mass (exactly 0 in the positive pass of a split
    input, one value per channel in the negative pass; one shared rounding error of the background pixel):
    moments missed this by 3-4 dB (ADC) and 1.5 dB (input clipping); the probed input sample gets it."""
    from cimstat import data, models
    from cimstat.engine import estimate_layer
    from cimstat.montecarlo import AnalogLayer
    from cimstat.network import fold_batchnorm

    assert default_probes.noise_prop.layers["conv1"].input_sample is not None
    folded = fold_batchnorm(models.load("default"))
    images, _ = data.default_tensors("validation")
    x = images[torch.linspace(0, len(images) - 1, 64).round().long()]
    cfg = HardwareConfig(LayerConfig(**knobs))
    resolved = engine.resolve(cfg)
    est = estimate_layer(engine.layers["conv1"], resolved["conv1"]).snr_db
    layer = AnalogLayer("conv1", folded.conv1, cfg.layer("conv1"), resolved["conv1"].ranges, 0)
    with torch.no_grad():
        y = folded.conv1(x).double()
        err = float(((layer(x).double() - y) ** 2).sum())
    mc = 10 * math.log10(float((y ** 2).sum()) / err)
    assert abs(est - mc) < 0.35, (est, mc)


def test_conv1_programming_error_is_the_mean_over_chips(engine, default_probes):
    """Proportional programming error on conv1: one chip's error energy swings ±0.5 dB (the 147 rows of a
    patch are so correlated that a channel's error has few degrees of freedom), so a 2-chip Monte Carlo can
    sit 0.7 dB from the expectation; the engine's number is the mean over chips (16 chips, realized
    device errors read back from the simulator, error energy over the probed input sample)."""
    from cimstat import models
    from cimstat.engine import estimate_layer
    from cimstat.engine.sampled_adc import sample_codes
    from cimstat.montecarlo import AnalogLayer
    from cimstat.network import fold_batchnorm

    conv = fold_batchnorm(models.load("default")).conv1
    cfg = HardwareConfig(LayerConfig(programming_error=0.1, programming_error_model="proportional"))
    res = engine.resolve(cfg)["conv1"]
    lm = engine.layers["conv1"]
    est = float(estimate_layer(lm, res).error[ErrorSource.PROGRAMMING_ERROR].sum())
    q = sample_codes(lm.input_sample, res.config, True, float(res.ranges.input_range))
    wq = lm.weights(res.config)
    scale = float(res.ranges.input_range) / 127 * wq.step
    energies = []
    for chip in range(16):
        layer = AnalogLayer("conv1", conv, res.config, res.ranges, chip)
        layer._program_devices()
        g = layer._mean_all.double().permute(1, 0, 2).reshape(-1, layer._mean_all.shape[2])[:q.shape[1]].numpy()
        e = (q @ (g - wq.codes.T)) * scale[None, :]
        energies.append(float((e ** 2).mean(0).sum()))
    spread_db = 10 * np.log10(max(energies) / min(energies))
    assert spread_db > 0.5  # the per-chip swing that 2-chip Monte Carlo runs inherit
    assert abs(10 * math.log10(est / np.mean(energies))) < 0.15, (est, np.mean(energies))


@pytest.mark.parametrize("adc_bits", [8, 6])
def test_deep_layer_adc_from_its_input_sample_matches_mc(engine, default_probes, adc_bits):
    """layer1.0.conv1 with 1-bit input slices and a max-range ADC: the moment model's Beta shape of each
    partial sum missed the MC by 1.8 dB (8-bit) here; the probed input sample of every layer gets it."""
    from cimstat import data, models
    from cimstat.engine import estimate_layer
    from cimstat.montecarlo import AnalogLayer
    from cimstat.network import fold_batchnorm

    name = "layer1.0.conv1"
    assert default_probes.noise_prop.layers[name].input_sample is not None
    folded = fold_batchnorm(models.load("default"))
    module = dict(folded.named_modules())[name]
    images, _ = data.default_tensors("validation")
    x = images[torch.linspace(0, len(images) - 1, 48).round().long()]
    seen = []
    hook = module.register_forward_hook(lambda _m, inputs, _out: seen.append(inputs[0].detach()))
    with torch.no_grad():
        folded(x)
    hook.remove()
    cfg = HardwareConfig(LayerConfig(input_slice_bits=1, rows_per_array=256, adc_bits=adc_bits, adc_range="max"))
    resolved = engine.resolve(cfg)
    est = estimate_layer(engine.layers[name], resolved[name]).snr_db
    layer = AnalogLayer(name, module, cfg.layer(name), resolved[name].ranges, 0)
    with torch.no_grad():
        y = module(seen[0]).double()
        err = float(((layer(seen[0]).double() - y) ** 2).sum())
    mc = 10 * math.log10(float((y ** 2).sum()) / err)
    assert abs(est - mc) < 0.35, (est, mc)


def test_white_adc_error_reaches_the_logits_where_it_sits(engine, default_probes):
    """An ADC's rounding error is not stationary over the output positions: 0 on MNIST's background patches
    (partial sums exactly 0), large on the strokes, where the logits are also most sensitive. Weighted by the
    probed gradient weights of the sampled outputs, the engine's white (per-read) error reaches the logits as
    the MC's own error map does with its signs randomised. Measured on these 160 images: weighted -0.9 dB on
    conv1 and layer1.0.conv1; the stationary ``ratio`` alone -7.9 and -3.0 dB (128 images). The randomised map
    also holds the small coherent part the engine routes elsewhere, hence the one-sided margin."""
    from cimstat import data, models
    from cimstat.engine import estimate_layer
    from cimstat.montecarlo import AnalogLayer
    from cimstat.network import fold_batchnorm

    cfg = HardwareConfig(LayerConfig(input_slice_bits=1, rows_per_array=256, adc_bits=6, adc_range="calibrated"))
    resolved = engine.resolve(cfg)
    folded = fold_batchnorm(models.load("default")).eval()
    images, _ = data.default_tensors("validation")
    x = images[:160]
    with torch.no_grad():
        clean = folded(x).double()
    gen = torch.Generator().manual_seed(0)
    for name in ("conv1", "layer1.0.conv1"):
        lm = engine.layers[name]
        assert lm.input_grad_weight is not None
        ratio = engine._prop[name][0]
        le = estimate_layer(lm, resolved[name])
        weighted = float(sum((v @ ratio).sum() for v in le.white.values()))
        module = dict(folded.named_modules())[name]
        layer = AnalogLayer(name, module, cfg.layer(name), resolved[name].ranges, 0)
        seen = {}
        hook = module.register_forward_hook(lambda _m, i, o: seen.__setitem__("e", layer(i[0]) - o))
        with torch.no_grad():
            folded(x)
        hook.remove()
        k = 0.05  # small: the linear response, as the engine's propagation
        signs = torch.randint(0, 2, seen["e"].shape, generator=gen).float() * 2 - 1
        hook = module.register_forward_hook(lambda _m, _i, o: o + k * signs * seen["e"])
        with torch.no_grad():
            mc = float(((folded(x).double() - clean) ** 2).sum(1).mean()) / k ** 2
        hook.remove()
        assert -1.5 < 10 * math.log10(weighted / mc) < 0.5, (name, weighted, mc)


def test_thermal_noise_rectified_by_max_pooling_reaches_the_logits(engine):
    """conv1's ADC thermal noise (the only analog layer) passes the max pooling after it as a deterministic shift:
    the maximum of noisy, nearly equal background elements sits above the clean one. Measured with this design
    (stress u1's conv1): the linear route without the term said 25.8 dB at the logits, with it 17.9; the referee,
    conv1 redrawn 4 times on 64 validation images, 17.6 (128 images: 17.4)."""
    from cimstat import data, models
    from cimstat.montecarlo import AnalogLayer
    from cimstat.network import fold_batchnorm

    knobs = dict(input_bits=7, weight_bits=5, weight_scale="per_channel", input_slice_bits=1, rows_per_array=512,
                 adc_bits=7, adc_range="calibrated", adc_thermal_noise_lsb=1.5)
    cfg = HardwareConfig(LayerConfig(input_bits=None, weight_bits=None), layers={"conv1": knobs}, name="t")
    resolved = engine.resolve(cfg)
    est = engine.estimate(cfg, resolved)
    assert est.route == "linear"
    folded = fold_batchnorm(models.load("default")).eval()
    images, _ = data.default_tensors("validation")
    x = images[:64]
    layer = AnalogLayer("conv1", folded.conv1, cfg.layer("conv1"), resolved["conv1"].ranges, 0)
    with torch.no_grad():
        clean = folded(x).double()
        hook = folded.conv1.register_forward_hook(lambda _m, i, _o: layer(i[0]))
        try:
            err = np.mean([float(((folded(x).double() - clean) ** 2).sum(1).mean()) for _ in range(4)])
        finally:
            hook.remove()
    mc = 10 * math.log10(float((clean ** 2).sum(1).mean()) / err)
    assert abs(est.fc_snr_db - mc) < 1.0, (est.fc_snr_db, mc)
    # the rectified noise is reported as what it comes from: ADC thermal noise (76 % of the logit error here)
    noise = {s: float(v.sum()) for s, v in est.logit_noise.items()}
    assert noise[ErrorSource.ADC_THERMAL_NOISE] > 0.6 * sum(noise.values()), noise


@pytest.mark.parametrize("noise", [dict(read_noise=0.02), dict(programming_error=0.02)])
def test_adc_error_under_device_bias_matches_mc_on_the_sample(engine, noise):
    """The ADC acts on the device deviation's mean too: the output error is ``det + b`` (ADC error plus device
    bias), and ``2·E[det·b]`` is the ADC's. Without it conv1 with a tight 4-bit ADC under 2 LSB of thermal noise
    came out 0.73 dB optimistic against the simulator run on the engine's own input sample (as a linear layer,
    so nothing but the conversions differs); with it within 0.03 dB."""
    from torch import nn

    from cimstat import models
    from cimstat.engine import estimate_layer
    from cimstat.montecarlo import AnalogLayer
    from cimstat.network import fold_batchnorm

    conv = fold_batchnorm(models.load("default")).conv1
    lin = nn.Linear(conv.weight[0].numel(), conv.out_channels, bias=conv.bias is not None)
    with torch.no_grad():
        lin.weight.copy_(conv.weight.reshape(conv.out_channels, -1))
        if conv.bias is not None:
            lin.bias.copy_(conv.bias)
    lm = engine.layers["conv1"]
    x = torch.as_tensor(lm.input_sample, dtype=torch.float32)
    # a tight full scale (about the calibrated one, without calibrating): partial sums clip
    cfg = HardwareConfig(LayerConfig(input_slice_bits=1, rows_per_array=1152, adc_bits=4, adc_range=300.0,
                                     adc_thermal_noise_lsb=2.0, **noise))
    resolved = engine.resolve(cfg)
    est = float(estimate_layer(lm, resolved["conv1"]).total.sum())
    with torch.no_grad():
        y = lin(x).double()
        mc = np.mean([float(((AnalogLayer("conv1", lin, cfg.layer("conv1"), resolved["conv1"].ranges, i)(x).double()
                               - y) ** 2).mean(0).sum()) for i in range(3)])
    assert abs(10 * math.log10(est / mc)) < 0.15, (est, mc)


def test_precise_adc_route_changes_only_the_adc_propagation(default_probes, engine):
    """``adc_per_image``: the ADC's logit energy comes from per-image error maps of the layers that kept output
    gradients; the layers' own errors, the other sources' parts and top-1 (the default route's) are unchanged; a
    layer with device noise under the ADC keeps the default route."""
    from cimstat.engine import Engine

    precise = Engine(default_probes, adc_per_image=True)
    keep = ("layer3.0.conv1", "layer3.0.conv2", "layer3.1.conv1", "layer4.0.conv1", "fc")  # small maps: fast
    precise.layers = {n: precise.layers[n] for n in keep}
    fast = Engine(default_probes)
    fast.layers = {n: fast.layers[n] for n in keep}
    cfg = HardwareConfig(LayerConfig(input_slice_bits=1, rows_per_array=256, adc_bits=5, adc_range="calibrated"),
                         name="adc5")
    res = fast.resolve(cfg)
    a, b = fast.estimate(cfg, res), precise.estimate(cfg, res)
    adc = ErrorSource.ADC_QUANTIZATION
    for n in keep:
        np.testing.assert_allclose(b.layers[n].error[adc], a.layers[n].error[adc])
    assert b.top1 == a.top1
    for n in keep:  # the other sources' per-layer parts (their logit shares move by the cross terms with the ADC)
        for s in ErrorSource:
            if s is not adc:
                np.testing.assert_allclose(b.layers[n].white[s], a.layers[n].white[s])
                assert (s in b.layers[n].gain) == (s in a.layers[n].gain)
    assert any(b.layers[n].adc_map is not None for n in keep)
    ratio = b.logit_noise[adc].sum() / a.logit_noise[adc].sum()
    assert ratio != pytest.approx(1.0, abs=1e-3) and 0.3 < ratio < 3.0
    noisy = HardwareConfig(cfg.default.replace(read_noise=0.02), name="adc5-read")
    res = fast.resolve(noisy)
    assert all(le.adc_map is None for le in precise.estimate(noisy, res).layers.values())


def test_layer_caches_share_one_byte_budget_without_changing_results(default_probes):
    """A sweep's caches stay within the engine's budget across layers (least recently used dropped first), and
    what is recomputed after an eviction is the same as what was cached."""
    from cimstat.engine import Engine

    budget = 64 << 20
    tight = Engine(default_probes, cache_bytes=budget)
    roomy = Engine(default_probes)
    configs = [dict(input_bits=b, weight_bits=6, read_noise=0.02) for b in (4, 6, 8)]
    for knobs in configs + configs[:1]:
        a, b = _est(tight, **knobs), _est(roomy, **knobs)
        assert a.fc_snr_db == pytest.approx(b.fc_snr_db, rel=1e-12) and a.top1 == pytest.approx(b.top1, rel=1e-12)
        for name, layer in a.layers.items():
            assert layer.snr_db == pytest.approx(b.layers[name].snr_db, rel=1e-12)
        held = sum(sum(lm._sizes.values()) for lm in tight.layers.values())
        largest = max(s for lm in tight.layers.values() for s in lm._sizes.values())
        assert held == tight.cache_budget.held and held <= budget + largest
    assert roomy.cache_budget.held > 2 * budget  # the same sweep, unconstrained, holds far more


def test_one_coherent_image_that_flips_moves_top1_by_one_image_of_all_not_of_the_coherent_ones(engine):
    """The per-image logit shifts are known on the first n (64) probe images only. A shift that turns one of
    their wrong images right is about one image among all N probe images, not one in 64 (1.6 pp):
    before the control variate it was extrapolated, and a design whose float network scores 98.9 % got 100.0 %."""
    logits, labels = engine.logits, engine.labels
    n = engine._coherent[next(iter(engine._coherent))][0].shape[0]
    wrong = np.flatnonzero(logits[:n].argmax(1) != labels[:n])
    assert wrong.size, "the coherent probe images have no misclassified image to flip"
    i = int(wrong[0])
    var = np.full(logits.shape[1], 1e-6)
    shift = np.zeros((n, logits.shape[1]))
    shift[i, labels[i]] = logits[i].max() - logits[i, labels[i]] + 5.0  # image i becomes confidently right
    base, _ = engine._top1(var, np.zeros_like(shift), None)
    flipped, _ = engine._top1(var, shift, None)
    # the fitted per-class line spreads a little of the outlier over the other images (1.5 images here)
    assert 0.5 / len(logits) < flipped - base < 2 / len(logits) < 1 / n, (base, flipped, len(logits), n)


def test_a_shift_linear_in_the_logits_applies_to_every_probe_image(engine):
    """A systematic shift ``a·z + b`` per class, seen on the coherent images, is what every image gets: the top-1
    is that of the shifted logits of all probe images."""
    from cimstat.accuracy import top1

    logits, labels = engine.logits, engine.labels
    n = engine._coherent[next(iter(engine._coherent))][0].shape[0]
    rng = np.random.default_rng(0)
    a, b = rng.normal(0, 0.3, logits.shape[1]), rng.normal(0, 1.0, logits.shape[1])
    var = np.full(logits.shape[1], 0.5 * float(logits.var()))
    acc, _ = engine._top1(var, logits[:n] * a + b, None)
    assert acc == pytest.approx(top1(logits * (1 + a) + b, labels, var), abs=1e-9)



def test_a_zero_shift_changes_nothing_with_or_without_per_image_variances(engine):
    """The shift's control variate and the per-image variances' change must agree with the plain estimate when
    the shift is zero: per-image variances alone change the top-1 by the change they make on their images."""
    logits = engine.logits
    n = engine._coherent[next(iter(engine._coherent))][0].shape[0]
    var = np.full(logits.shape[1], 0.3 * float(logits.var()))
    image_var = var * np.random.default_rng(1).uniform(0.2, 3.0, (n, logits.shape[1]))
    zero = np.zeros((n, logits.shape[1]))
    for iv in (None, image_var):
        assert engine._top1(var, zero, iv)[0] == pytest.approx(engine._top1(var, None, iv)[0], abs=1e-12)
    assert engine._top1(var, None, image_var)[0] != pytest.approx(engine._top1(var, None, None)[0], abs=1e-6)


def test_meanfield_top1_on_request_takes_top1_from_the_route_and_keeps_the_linear_fc(small_engine, default_probes):
    """``meanfield_top1=True`` on a design the linear route holds: top-1 (and its SE) from the mean-field route,
    the fc SNR, the route and ``top1_linear`` from the linear route; without the network to run the route on, the
    linear top-1 stays, with a note that says why."""
    from cimstat.engine import Engine
    from cimstat.engine.network import _model_weights

    cfg = HardwareConfig(LayerConfig(input_bits=6, weight_bits=6, read_noise=0.03), name="t")
    linear = small_engine.estimate(cfg)
    both = small_engine.estimate(cfg, meanfield_top1=True)
    assert linear.route == both.route == "linear"
    assert both.fc_snr_db == linear.fc_snr_db and both.top1_linear == linear.top1
    assert both.top1 != linear.top1 and 0.0 <= both.top1 <= 1.0 and both.top1_se > 0
    assert "mean-field route" in both.route_note and math.isfinite(both.fc_snr_db_meanfield)
    assert not linear.route_note
    weights, _ = _model_weights(default_probes)
    bare = Engine(default_probes, weights).estimate(cfg, meanfield_top1=True)
    assert bare.top1 == bare.top1_linear and "mean-field route is not available" in bare.top1_note
