"""The reduced input sample of the sampled ADC error (over the element budget): large inputs kept whole."""
import numpy as np
import pytest

from cimstat.hardware import LayerConfig


def test_kept_rows_keep_the_largest_and_weigh_the_rest():
    from cimstat.engine.sampled_adc import HEAVY_SHARE, _kept_rows

    rng = np.random.default_rng(3)
    score = rng.integers(0, 50, size=1000)
    rows, weights = _kept_rows(score, 80)
    assert len(rows) == 80 and np.all(np.diff(rows) > 0)          # distinct, in sample order
    n_heavy = int(80 * HEAVY_SHARE)
    heavy = np.argsort(score, kind="stable")[-n_heavy:]
    assert set(heavy) <= set(rows) and np.all(weights[np.isin(rows, heavy)] == 1.0)
    assert weights.sum() == pytest.approx(1000.0)                   # every vector is stood for once
    assert np.allclose(weights[~np.isin(rows, heavy)], (1000 - n_heavy) / (80 - n_heavy))


@pytest.mark.parametrize("encoding", ["offset", "differential"])
def test_reduced_sample_stays_near_the_whole_sample(default_probes, monkeypatch, encoding):
    """At a 20x smaller element budget the layer's ADC error energy is within 0.3 dB of the whole sample's."""
    from cimstat.engine import engine_for, sampled_adc
    from cimstat.engine.layer import _conversions
    from cimstat.hardware import HardwareConfig

    eng = engine_for(default_probes)
    cfg = LayerConfig(input_bits=8, weight_bits=8, input_slice_bits=1, weight_encoding=encoding, rows_per_array=256,
                      adc_bits=6, adc_range="calibrated")
    r = eng.resolve(HardwareConfig(cfg))["layer1.0.conv1"]
    lm = eng.layers["layer1.0.conv1"]
    args = (lm.input_sample, lm.weight, r.config, bool(r.ranges.signed_input), float(r.ranges.input_range),
            np.asarray(r.ranges.adc_range, dtype=np.float64), _conversions(lm.levels(r.config), r.config),
            lambda li, devs: None, 0.0)
    whole = sampled_adc.sampled_adc_error(*args).energy.sum()
    monkeypatch.setattr(sampled_adc, "EXACT_ELEMENT_BUDGET", 300_000)  # ~1/20 of the vectors
    part = sampled_adc.sampled_adc_error(*args).energy.sum()
    assert part != whole
    assert abs(10 * np.log10(part / whole)) < 0.3


def test_budget_rows_give_one_fixed_part_evaluated_whole(default_probes, monkeypatch):
    """``budget_rows``: the part one pass can afford (all vectors taken distinct), chosen on the sample alone; with
    ``row_weights`` that part is evaluated whole (no second reduction) and stands for the whole sample (within
    0.3 dB). The mean-field route's clipping shift evaluates the clean and every moved copy on these rows, so its
    differences do not jump with a new choice of part."""
    from cimstat.engine import engine_for, sampled_adc
    from cimstat.engine.layer import _conversions
    from cimstat.hardware import HardwareConfig

    eng = engine_for(default_probes)
    cfg = LayerConfig(input_bits=8, weight_bits=8, input_slice_bits=1, rows_per_array=256, adc_bits=6,
                      adc_range="calibrated")
    r = eng.resolve(HardwareConfig(cfg))["layer1.0.conv1"]
    lm = eng.layers["layer1.0.conv1"]
    signed, x_range = bool(r.ranges.signed_input), float(r.ranges.input_range)
    convs = _conversions(lm.levels(r.config), r.config)
    sample = np.asarray(lm.input_sample, dtype=np.float64)
    assert sampled_adc.budget_rows(sample, lm.weight.shape[0], r.config, signed, x_range, convs) == (None, None)
    monkeypatch.setattr(sampled_adc, "EXACT_ELEMENT_BUDGET", 300_000)
    rows, weights = sampled_adc.budget_rows(sample, lm.weight.shape[0], r.config, signed, x_range, convs)
    n_conv = sampled_adc._n_conversions(r.config, signed, convs, sample.shape[1])
    assert len(rows) == 300_000 // (lm.weight.shape[0] * n_conv) < len(sample)
    assert weights.sum() == pytest.approx(len(sample))
    args = (lm.weight, r.config, signed, x_range, np.asarray(r.ranges.adc_range, dtype=np.float64), convs,
            lambda li, devs: None, 0.0)
    monkeypatch.setattr(sampled_adc, "EXACT_ELEMENT_BUDGET", 1_000)   # would reduce again without row_weights
    part = sampled_adc.sampled_adc_error(sample[rows], *args, row_weights=weights).energy.sum()
    again = sampled_adc.sampled_adc_error(sample[rows], *args).energy.sum()
    monkeypatch.setattr(sampled_adc, "EXACT_ELEMENT_BUDGET", 10**12)
    whole = sampled_adc.sampled_adc_error(sample, *args).energy.sum()
    evenly = sampled_adc.sampled_adc_error(sample[rows], *args).energy.sum()   # the part, unweighted
    assert part != again and part != evenly
    assert abs(10 * np.log10(part / whole)) < 0.3
