"""Stress sweep, second batch: six more designs outside ``sweeps/validation.py`` and ``sweeps/stress.py``,
written down before the engine was run on them (2026-12-07), to check the estimate against the Monte Carlo on
knob combinations nobody tuned on::

    python -m sweeps.validate sweeps/stress2.py --n-images 100 --instances 2 --programmed-instances 4

Its MC entries are cached in ``results/.mc-cache``; the README's "Stress sweep" paragraph lists what it found.
"""
name = "stress2"
points = [
    {"label": "v1-offw-ws2-bs-adc7cal-r512-read3p", "weight_encoding": "offset", "weight_slice_bits": 2,
     "input_slice_bits": 1, "rows_per_array": 512, "adc_bits": 7, "adc_range": "calibrated",
     "read_noise": 0.03, "read_noise_model": "proportional"},
    {"label": "v2-w4-pc-ws2-in2sl-adc5max-r64", "weight_bits": 4, "weight_scale": "per_channel",
     "weight_slice_bits": 2, "input_slice_bits": 2, "rows_per_array": 64, "adc_bits": 5, "adc_range": "max"},
    {"label": "v3-in6-offin-sep-in2sl-adc8cal-r128-th2", "input_bits": 6, "signed_input_encoding": "offset",
     "adc_mode": "separate", "input_slice_bits": 2, "rows_per_array": 128, "adc_bits": 8,
     "adc_range": "calibrated", "adc_thermal_noise_lsb": 2.0},
    {"label": "v4-w6-ws3-prog10p", "weight_bits": 6, "weight_slice_bits": 3, "programming_error": 0.10,
     "programming_error_model": "proportional"},
    {"label": "v5-in4sl-r1152-adc8cal-th0.5-prog1-read1", "input_slice_bits": 4, "rows_per_array": 1152,
     "adc_bits": 8, "adc_range": "calibrated", "adc_thermal_noise_lsb": 0.5, "programming_error": 0.01,
     "read_noise": 0.01},
    {"label": "v6-in4w4-ws1-in2sl-adc4cal-r256", "input_bits": 4, "weight_bits": 4, "weight_slice_bits": 1,
     "input_slice_bits": 2, "rows_per_array": 256, "adc_bits": 4, "adc_range": "calibrated"},
]
