"""resolve(): max / explicit / calibrated input ranges, ADC tables, errors naming the field."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from cimstat.calibrate import CalibrationStore, Calibrations, resolve
from cimstat.calibrate.input_range import (calibrate_input_range, expected_input_error, input_distribution,
                                           quantize_input_codes)
from cimstat.errors import CalibrationError, ConfigError
from cimstat.hardware import HardwareConfig, LayerConfig


def fake_layer(name: str, samples: np.ndarray, fan_in: int, signed: bool, n_bins: int = 512) -> SimpleNamespace:
    """A LayerStats-like object: per-channel histograms of the non-zero values plus exact zeros."""
    samples = np.asarray(samples, dtype=np.float64)          # (C_in, n)
    lo, hi = float(samples.min()), float(samples.max())
    edges = np.linspace(min(lo, 0.0), hi, n_bins + 1)
    counts = np.stack([np.histogram(ch[ch != 0], bins=edges)[0] for ch in samples]).astype(np.float64)
    zeros = (samples == 0).sum(1).astype(np.float64)
    return SimpleNamespace(name=name, kind="conv", fan_in=fan_in, signed_input=signed, input_min=lo, input_max=hi,
                           hist_edges=edges, hist_counts=counts, zero_counts=zeros,
                           total_counts=np.full(samples.shape[0], samples.shape[1], dtype=np.float64))


def fake_stats(seed: int = 0) -> SimpleNamespace:
    rng = np.random.default_rng(seed)
    signed = rng.normal(0.0, 1.0, size=(3, 4000))
    relu = np.maximum(rng.normal(-0.3, 1.0, size=(4, 4000)), 0.0) ** 1.5   # heavy tail, ~60 % exact zeros
    layers = {"conv1": fake_layer("conv1", signed, fan_in=27, signed=True),
              "layer1.conv": fake_layer("layer1.conv", relu, fan_in=300, signed=False)}
    meta = {"model": "fake", "fingerprint": "abc", "dataset": "fake", "split": "probe", "n_images": 1,
            "seed": 0, "created": "now", "schema_version": 1}
    return SimpleNamespace(meta=meta, layers=layers)


def test_max_and_explicit_ranges():
    stats = fake_stats()
    cfg = HardwareConfig(LayerConfig(input_bits=8, weight_bits=8, input_slice_bits=2, weight_slice_bits=(3, 4),
                                     rows_per_array=128, adc_bits=6),
                         layers={"layer1.conv": {"input_range": 2.5, "adc_range": 100.0}})
    res = resolve(cfg, stats)
    assert list(res) == ["conv1", "layer1.conv"]
    c1, l1 = res["conv1"].ranges, res["layer1.conv"].ranges
    assert c1.signed_input and not l1.signed_input
    ls = stats.layers["conv1"]
    assert c1.input_range == pytest.approx(max(-ls.input_min, ls.input_max))
    # conv1: signed split -> 7 magnitude bits in 2-bit slices (2,2,2,1); weights 7 bits in (3,4); 27 rows
    expected = 27 * np.array([3, 3, 3, 1])[:, None] * np.array([7, 15])[None, :]
    np.testing.assert_array_equal(c1.adc_range, expected)
    assert l1.input_range == 2.5
    np.testing.assert_array_equal(l1.adc_range, np.full((4, 2), 100.0))
    assert res["layer1.conv"].config.rows_per_array == 128


def test_float_and_ideal_adc_give_none():
    stats = fake_stats()
    res = resolve(HardwareConfig(LayerConfig(input_bits=None, weight_bits=None)), stats)
    assert all(r.ranges.input_range is None and r.ranges.adc_range is None for r in res.values())
    res = resolve(HardwareConfig(LayerConfig(input_bits=8, weight_bits=8, adc_bits=None)), stats)
    assert all(r.ranges.adc_range is None and r.ranges.input_range > 0 for r in res.values())


def test_adc_table_shape_checked_and_names_checked():
    stats = fake_stats()
    cfg = HardwareConfig(LayerConfig(input_bits=8, weight_bits=8, input_slice_bits=4, adc_bits=6,
                                     adc_range=((10.0,), (20.0,))))
    # layer1.conv is unsigned: 8 bits in 4-bit slices -> 2x1 fits; conv1 (signed split, 7 bits -> (4,3)) fits too
    res = resolve(cfg, stats)
    np.testing.assert_array_equal(res["layer1.conv"].ranges.adc_range, [[10.0], [20.0]])
    bad = cfg.replace(adc_range=((1.0, 2.0),))
    with pytest.raises(ConfigError, match="adc_range"):
        resolve(bad, stats)
    with pytest.raises(ConfigError, match="unknown layer"):
        resolve(cfg.replace(layers={"nope": {"adc_bits": 4}}), stats)


def test_input_error_matches_direct_quantization():
    """The histogram integral equals the error of quantizing samples drawn from the histogram."""
    stats = fake_stats()
    for name, bits in (("conv1", 4), ("layer1.conv", 3)):
        ls = stats.layers[name]
        dist = input_distribution(ls)
        rng = np.random.default_rng(1)
        edges, counts = ls.hist_edges, ls.hist_counts.sum(0)
        n = 400_000
        bins = rng.choice(counts.size, size=n, p=counts / counts.sum())
        x = edges[bins] + rng.random(n) * np.diff(edges)[bins]
        nz = 1.0 - dist.zero_mass
        for r in (0.3 * dist.abs_max, dist.abs_max):
            q = quantize_input_codes(x, r, bits, dist.signed)
            step = r / ((2 ** (bits - 1) - 1) if dist.signed else (2 ** bits - 1))
            direct = nz * np.mean((x - q * step) ** 2)
            assert expected_input_error(dist, r, bits)[0] == pytest.approx(direct, rel=0.03)


def test_calibrated_input_beats_max_and_ignores_zero_mass():
    stats = fake_stats()
    ls = stats.layers["layer1.conv"]
    dist = input_distribution(ls)
    best, err, max_err = calibrate_input_range(dist, 3)
    assert best < dist.abs_max and err < max_err
    # zeros quantize exactly: adding more of them must not move the optimum
    more_zeros = SimpleNamespace(**{**vars(ls), "zero_counts": ls.zero_counts * 10})
    assert calibrate_input_range(input_distribution(more_zeros), 3)[0] == pytest.approx(best)
    # brute force over a fine grid agrees
    grid = np.linspace(0.01, 1.0, 2000) * dist.abs_max
    assert err <= expected_input_error(dist, grid, 3).min() * 1.001


def test_calibrated_input_range_stored_and_keyed(tmp_path):
    stats = fake_stats()
    cfg = HardwareConfig(LayerConfig(input_bits=4, weight_bits=8, input_range="calibrated"))
    store = CalibrationStore(tmp_path / "calibrations")
    first = resolve(cfg, stats, Calibrations(store))
    assert store.computed == 2 and len(list((tmp_path / "calibrations").glob("input-*.json"))) == 2
    again = CalibrationStore(tmp_path / "calibrations")
    second = resolve(cfg, stats, Calibrations(again))
    assert again.computed == 0 and again.loaded == 2
    assert second["conv1"].ranges.input_range == first["conv1"].ranges.input_range
    # other bits -> another calibration, never the stored one
    third = resolve(cfg.replace(input_bits=6), stats, Calibrations(again))
    assert again.computed == 2
    assert third["layer1.conv"].ranges.input_range != first["layer1.conv"].ranges.input_range
    # other probes (fingerprint) -> recomputed
    stats2 = fake_stats()
    stats2.meta["fingerprint"] = "other"
    resolve(cfg, stats2, Calibrations(again))
    assert again.computed == 4


def test_tampered_calibration_file_is_an_error(tmp_path):
    stats = fake_stats()
    cfg = HardwareConfig(LayerConfig(input_bits=4, weight_bits=8, input_range="calibrated"))
    resolve(cfg, stats, tmp_path)
    path = sorted(tmp_path.glob("input-*.json"))[0]
    import json

    record = json.loads(path.read_text())
    record["key"]["input_bits"] = 5
    path.write_text(json.dumps(record))
    with pytest.raises(CalibrationError, match="input_bits"):
        resolve(cfg, stats, tmp_path)
