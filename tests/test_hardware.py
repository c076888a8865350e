"""The hardware config: every bad field raises a ConfigError naming the field; derived quantities."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from cimstat.errors import ConfigError
from cimstat.hardware import (
    PRESETS,
    HardwareConfig,
    LayerConfig,
    LayerRanges,
    RangeMode,
    ResolvedLayer,
    WeightEncoding,
    load_config,
    split_bits,
)

NAN = float("nan")

# (field, bad value, words the message must contain) - one row per kind of mistake
BAD_LAYER_FIELDS = [
    # negative / out-of-range bits
    ("input_bits", -1, "between"), ("input_bits", 0, "between"), ("input_bits", 33, "between"),
    ("weight_bits", 1, "between"), ("weight_bits", -8, "between"), ("adc_bits", 0, "between"),
    ("adc_bits", -3, "between"),
    # wrong types
    ("input_bits", 8.0, "integer"), ("input_bits", "8", "integer"), ("input_bits", True, "integer"),
    ("weight_bits", [8], "integer"), ("rows_per_array", 2.5, "positive integer"),
    ("rows_per_array", 0, "positive integer"), ("rows_per_array", True, "positive integer"),
    ("input_slice_bits", 1.5, "integer"), ("weight_slice_bits", "2", "integer"),
    ("input_slice_bits", (), "at least one"), ("weight_slice_bits", (2, 0), "between"),
    ("adc_thermal_noise_lsb", "0.1", "real number"), ("programming_error", None, "real number"),
    ("input_range", [1.0], "real number"), ("adc_range", {"a": 1}, "real number"),
    # NaN / infinite / negative reals
    ("input_range", NAN, "finite"), ("input_range", -1.0, "> 0"), ("input_range", 0.0, "> 0"),
    ("adc_range", NAN, "finite"), ("adc_range", -5.0, "> 0"), ("adc_range", ((1.0, NAN),), "finite"),
    ("adc_thermal_noise_lsb", -0.1, ">= 0"), ("adc_thermal_noise_lsb", math.inf, "finite"),
    ("programming_error", NAN, "finite"), ("read_noise", -0.01, ">= 0"), ("read_noise", 11.0, "<= 10"),
    # unknown enum values
    ("signed_input_encoding", "twos", "expected one of"), ("weight_encoding", "single", "expected one of"),
    ("weight_scale", "per_row", "expected one of"), ("adc_mode", 3, "expected one of"),
    ("programming_error_model", "gaussian", "expected one of"), ("read_noise_model", None, "expected one of"),
    ("input_range", "biggest", "expected one of"), ("adc_range", "auto", "expected one of"),
    # malformed tables
    ("adc_range", ((1.0,), (1.0, 2.0)), "rectangular"), ("adc_range", (), "rectangular"),
]


@pytest.mark.parametrize("field,value,words", BAD_LAYER_FIELDS)
def test_every_bad_layer_field_names_the_field_value_and_rule(field, value, words):
    extra = {"adc_bits": 6} if field in ("adc_range",) else {}
    with pytest.raises(ConfigError) as err:
        LayerConfig(**{field: value, **extra})
    msg = str(err.value)
    assert field in msg and words in msg
    assert repr(value) in msg or (isinstance(value, tuple) and "adc_range" in msg)


@pytest.mark.parametrize("fields,words", [
    (dict(weight_bits=8, weight_slice_bits=(3, 3)), "add up to 7"),           # differential: 7 magnitude bits
    (dict(weight_bits=8, weight_encoding="offset", weight_slice_bits=(4, 3)), "add up to 8"),
    (dict(input_bits=8, input_slice_bits=(4, 2)), "input_slice_bits"),
    (dict(input_bits=None, input_slice_bits=1), "input_slice_bits"),
    (dict(weight_bits=None, weight_slice_bits=2), "weight_slice_bits"),
    (dict(weight_bits=None, read_noise=0.1), "read_noise"),
    (dict(weight_bits=None, programming_error=0.1), "programming_error"),
    (dict(input_bits=None, adc_bits=6), "adc_bits"),
    (dict(weight_bits=None, adc_thermal_noise_lsb=0.5), "adc_thermal_noise_lsb"),
    (dict(adc_bits=1), "adc_bits=1"),                                        # signed ADC needs 2 bits
])
def test_inconsistent_combinations_raise(fields, words):
    with pytest.raises(ConfigError, match=words.replace("(", r"\(")):
        LayerConfig(**fields)


def test_network_config_errors():
    with pytest.raises(ConfigError, match="seed=-1"):
        HardwareConfig(seed=-1)
    with pytest.raises(ConfigError, match="seed=1.5"):
        HardwareConfig(seed=1.5)
    with pytest.raises(ConfigError, match="name=3"):
        HardwareConfig(name=3)
    with pytest.raises(ConfigError, match="default="):
        HardwareConfig(default={"input_bits": 4})
    with pytest.raises(ConfigError, match=r"layers\['conv1'\]: adc_bits=nan"):
        HardwareConfig(layers={"conv1": {"adc_bits": NAN}})
    with pytest.raises(ConfigError, match=r"layers\['fc'\]: unknown hardware field.*adc_bitz"):
        HardwareConfig(layers={"fc": {"adc_bitz": 4}})
    with pytest.raises(ConfigError, match="layers"):
        HardwareConfig(layers=[("fc", {})])
    with pytest.raises(ConfigError, match=r"layers\[1\]"):
        HardwareConfig(layers={1: {}})
    cfg = HardwareConfig(layers={"layer9.conv": {"adc_bits": 4}})
    with pytest.raises(ConfigError, match=r"unknown layer name.*layer9\.conv.*conv1"):
        cfg.check_layer_names(["conv1", "fc"])
    cfg.check_layer_names(["conv1", "layer9.conv"])  # known names pass


def test_from_dict_and_load_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="unknown hardware field.*adc_bitz"):
        HardwareConfig.from_dict({"adc_bitz": 4})
    with pytest.raises(ConfigError, match="both at the top level and in 'default'"):
        HardwareConfig.from_dict({"adc_bits": 4, "default": {"adc_bits": 5}})
    with pytest.raises(ConfigError, match="must be a dict"):
        HardwareConfig.from_dict([("adc_bits", 4)])
    with pytest.raises(ConfigError, match="default="):
        HardwareConfig.from_dict({"default": "int8"})
    with pytest.raises(ConfigError, match="neither a preset"):
        load_config(str(tmp_path / "missing.json"))
    bad_json = tmp_path / "bad.json"
    bad_json.write_text("{adc_bits: 4")
    with pytest.raises(ConfigError, match="invalid JSON"):
        load_config(bad_json)
    no_var = tmp_path / "novar.py"
    no_var.write_text("x = 1\n")
    with pytest.raises(ConfigError, match="variable named 'config'"):
        load_config(no_var)
    broken = tmp_path / "broken.py"
    broken.write_text("config = {'adc_bits': 1/0}\n")
    with pytest.raises(ConfigError, match="broken.py failed to run.*ZeroDivisionError"):
        load_config(broken)
    yaml = tmp_path / "cfg.yaml"
    yaml.write_text("adc_bits: 4\n")
    with pytest.raises(ConfigError, match=r"\.json or \.py"):
        load_config(yaml)


def test_round_trip_overrides_and_loading(tmp_path):
    cfg = HardwareConfig(LayerConfig(input_bits=6, weight_bits=5, input_slice_bits=(2, 4), weight_slice_bits=2,
                                     adc_bits=5, adc_range=((10.0, 20.0), (30.0, 40.0))),
                         layers={"conv1": {"input_bits": 8, "input_slice_bits": None, "adc_range": "calibrated"}},
                         seed=7, name="t")
    again = HardwareConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg
    assert cfg.layer("conv1").input_bits == 8 and cfg.layer("conv1").adc_range is RangeMode.CALIBRATED
    assert cfg.layer("fc").adc_range == ((10.0, 20.0), (30.0, 40.0))
    path = tmp_path / "c.json"
    path.write_text(json.dumps(cfg.to_dict()))
    assert load_config(path) == cfg
    py = tmp_path / "c.py"
    py.write_text("from cimstat.hardware import HardwareConfig, LayerConfig\n"
                  "config = HardwareConfig(LayerConfig(adc_bits=6), seed=3)\n")
    assert load_config(py).seed == 3
    assert load_config("int8") is PRESETS["int8"]
    flat = HardwareConfig.from_dict({"weight_bits": 6, "seed": 2})
    assert flat.default.weight_bits == 6 and flat.seed == 2
    assert cfg.replace(read_noise=0.1, seed=9).default.read_noise == 0.1


def test_digital_layer_override_in_a_config_and_its_dict_round_trip():
    cfg = HardwareConfig(LayerConfig(input_slice_bits=1, adc_bits=6, rows_per_array=64, read_noise=0.02),
                         layers={"conv1": "digital"})
    conv1 = cfg.layer("conv1")
    assert conv1.input_bits is None and conv1.weight_bits is None and conv1.adc_bits is None
    assert conv1.rows_per_array is None and conv1.read_noise == 0 and cfg.layer("fc").adc_bits == 6
    assert HardwareConfig.from_dict(cfg.to_dict()).layer("conv1") == conv1
    with pytest.raises(ConfigError, match=r"layers\['conv1'\] must be a dict of field overrides or 'digital'"):
        HardwareConfig(LayerConfig(), layers={"conv1": "float"})


def test_input_slice_tuple_that_fits_only_unsigned_inputs_names_the_signed_layer():
    """(4, 4) passes for 8-bit unsigned inputs but a signed layer split by sign has 7 magnitude bits: the error
    comes when the layer's signedness is known (resolving its ranges) and names the layer and the way out."""
    cfg = LayerConfig(input_bits=8, input_slice_bits=(4, 4))
    ResolvedLayer("layer1.0.conv1", cfg, LayerRanges(False, 1.0, None))
    ResolvedLayer("conv1", cfg.replace(signed_input_encoding="offset"), LayerRanges(True, 1.0, None))
    with pytest.raises(ConfigError, match=r"layer 'conv1'.*add up to 7.*'conv1.input_slice_bits'"):
        ResolvedLayer("conv1", cfg, LayerRanges(True, 1.0, None))


def test_split_bits_and_derived_quantities():
    assert split_bits(7, 2) == (2, 2, 2, 1)
    assert split_bits(7, None) == (7,)
    assert split_bits(4, 5) == (4,)
    assert split_bits(8, (1, 3, 4)) == (1, 3, 4)
    with pytest.raises(ConfigError, match=r"weight_slice_bits=\(3, 4\) adds up to 7.*must add up to 8"):
        split_bits(8, (3, 4), "weight_slice_bits")
    diff = LayerConfig(weight_bits=8, weight_slice_bits=2, input_bits=8, input_slice_bits=1, rows_per_array=100)
    assert diff.weight_magnitude_bits == 7 and diff.weight_slices() == (2, 2, 2, 1)
    assert diff.input_slices(signed=False) == (1,) * 8 and diff.input_slices(signed=True) == (1,) * 7
    off = diff.replace(weight_encoding=WeightEncoding.OFFSET, signed_input_encoding="offset")
    assert off.weight_slices() == (2, 2, 2, 2) and off.input_slices(signed=True) == (1,) * 8
    assert diff.n_rows(147) == 100 and diff.n_tiles(147) == 2 and diff.n_rows(50) == 50
    table = diff.adc_max_range(False, 147)
    assert table.shape == (8, 4) and table[0, 0] == 100 * 1 * 3 and table[0, 3] == 100 * 1 * 1
    assert diff.adc_signed and not off.adc_signed and not diff.replace(adc_mode="separate").adc_signed
    assert np.all(LayerConfig(input_bits=8, weight_bits=8).adc_max_range(True, 9) == 9 * 127 * 127)
