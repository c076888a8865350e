"""The validation sweep: every knob alone, then realistic combinations, from high SNR to
accuracy collapse. ``python -m sweeps.validate sweeps/validation.py --report docs/validation.md``
regenerates ``docs/validation.md`` from it.

Every point starts from ``HardwareConfig()`` (8-bit inputs and weights, per-layer scale,
differential weights, split signed inputs, one device per polarity, whole dot products, ideal
ADC, no noise) and changes what it lists, on every analog layer.
"""
name = "validation"

_BITSERIAL = {"input_slice_bits": 1}
_ADC = {"rows_per_array": 256, "adc_range": "calibrated"}

points = [
    # ---- quantization alone
    {"label": "int8"},
    {"label": "in4", "input_bits": 4, "weight_bits": None},
    {"label": "in6", "input_bits": 6, "weight_bits": None},
    {"label": "w4", "input_bits": None, "weight_bits": 4},
    {"label": "w6", "input_bits": None, "weight_bits": 6},
    {"label": "in5-w5", "input_bits": 5, "weight_bits": 5},
    {"label": "w4-per-channel", "weight_bits": 4, "weight_scale": "per_channel"},
    {"label": "in6-calibrated-range", "input_bits": 6, "input_range": "calibrated"},
    # ---- ADC: bits, ranges, array height, slicing, encodings
    {"label": "adc8-max-bitserial", **_BITSERIAL, "rows_per_array": 256, "adc_bits": 8, "adc_range": "max"},
    {"label": "adc6-max-bitserial", **_BITSERIAL, "rows_per_array": 256, "adc_bits": 6, "adc_range": "max"},
    {"label": "adc4-cal-bitserial", **_BITSERIAL, **_ADC, "adc_bits": 4},
    {"label": "adc5-cal-bitserial", **_BITSERIAL, **_ADC, "adc_bits": 5},
    {"label": "adc6-cal-bitserial", **_BITSERIAL, **_ADC, "adc_bits": 6},
    {"label": "adc7-cal-w2slices", **_BITSERIAL, **_ADC, "adc_bits": 7, "weight_slice_bits": 2},
    {"label": "adc6-cal-rows64", **_BITSERIAL, **_ADC, "adc_bits": 6, "rows_per_array": 64},
    {"label": "adc6-cal-rows128", **_BITSERIAL, **_ADC, "adc_bits": 6, "rows_per_array": 128},
    {"label": "adc6-cal-rows1152", **_BITSERIAL, **_ADC, "adc_bits": 6, "rows_per_array": 1152},
    {"label": "adc6-cal-w1slices", **_BITSERIAL, **_ADC, "adc_bits": 6, "weight_slice_bits": 1},
    {"label": "adc6-cal-w4slices-in2slices", **_ADC, "adc_bits": 6, "weight_slice_bits": 4, "input_slice_bits": 2},
    {"label": "adc6-cal-offset-weights", **_BITSERIAL, **_ADC, "adc_bits": 6, "weight_encoding": "offset"},
    {"label": "adc6-cal-offset-inputs", **_BITSERIAL, **_ADC, "adc_bits": 6, "signed_input_encoding": "offset"},
    {"label": "adc6-cal-separate", **_BITSERIAL, **_ADC, "adc_bits": 6, "adc_mode": "separate"},
    # ---- ADC thermal noise (the lattice case: 1-bit slices, ADC step = one partial-sum unit)
    {"label": "thermal0.5-lattice", **_BITSERIAL, "weight_slice_bits": 1, "rows_per_array": 63,
     "adc_bits": 6, "adc_mode": "separate", "adc_range": "max", "adc_thermal_noise_lsb": 0.5},
    {"label": "thermal1-adc6", **_BITSERIAL, **_ADC, "adc_bits": 6, "adc_thermal_noise_lsb": 1.0},
    {"label": "thermal2-adc6", **_BITSERIAL, **_ADC, "adc_bits": 6, "adc_thermal_noise_lsb": 2.0},
    {"label": "thermal4-adc6", **_BITSERIAL, **_ADC, "adc_bits": 6, "adc_thermal_noise_lsb": 4.0},
    # ---- device variation
    {"label": "prog1%-state-indep", "programming_error": 0.01},
    {"label": "prog5%-state-indep-w4slices", "programming_error": 0.05, "weight_slice_bits": 4},
    {"label": "prog2%-proportional", "programming_error": 0.02, "programming_error_model": "proportional"},
    {"label": "prog10%-proportional", "programming_error": 0.10, "programming_error_model": "proportional"},
    {"label": "read1%-state-indep", "read_noise": 0.01},
    {"label": "read5%-state-indep-w2slices", "read_noise": 0.05, "weight_slice_bits": 2},
    {"label": "read3%-proportional", "read_noise": 0.03, "read_noise_model": "proportional"},
    {"label": "read10%-proportional", "read_noise": 0.10, "read_noise_model": "proportional"},
    # ---- realistic designs, from comfortable to collapse
    {"label": "design-bitserial-2b", **_BITSERIAL, **_ADC, "weight_slice_bits": 2, "adc_bits": 6,
     "adc_thermal_noise_lsb": 0.5, "programming_error": 0.02, "read_noise": 0.01},
    {"label": "design-in4-w4-adc5", "input_bits": 4, "weight_bits": 4, "input_slice_bits": 2,
     "weight_slice_bits": 1, "rows_per_array": 128, "adc_bits": 5, "adc_range": "calibrated",
     "adc_thermal_noise_lsb": 1.0, "read_noise": 0.02},
    {"label": "design-offset-w6", "weight_bits": 6, "weight_encoding": "offset", "weight_slice_bits": 3,
     **_BITSERIAL, **_ADC, "adc_bits": 6, "programming_error": 0.03, "programming_error_model": "proportional",
     "read_noise": 0.02, "read_noise_model": "proportional"},
    {"label": "collapse-w4-prog5%", "weight_bits": 4, "programming_error": 0.05, "read_noise": 0.03},
    {"label": "collapse-adc4-rows1152-thermal2", **_BITSERIAL, "rows_per_array": 1152, "adc_bits": 4,
     "adc_range": "calibrated", "adc_thermal_noise_lsb": 2.0, "programming_error": 0.02},
]
