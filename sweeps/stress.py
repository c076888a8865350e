"""Stress sweep: ten designs outside ``sweeps/validation.py`` (knob combinations the engine was not tuned on),
to check the estimate against the Monte Carlo where nobody looked before::

    python -m sweeps.validate sweeps/stress.py --n-images 200 --instances 2 --programmed-instances 4

(64 min on a 2-core CPU shared with other work; the bit-serial, 1-bit-weight-slice design u3 alone took 33 min of
Monte Carlo).
Its results are not committed; the README's "Stress sweep" paragraph lists what it found.
"""
name = "stress"
points = [
    {"label": "u1-in7w5-pc-adc7-r512-th1.5-read2p", "input_bits": 7, "weight_bits": 5, "weight_scale": "per_channel",
     "input_slice_bits": 1, "rows_per_array": 512, "adc_bits": 7, "adc_range": "calibrated",
     "adc_thermal_noise_lsb": 1.5, "read_noise": 0.02, "read_noise_model": "proportional"},
    {"label": "u2-in5-ws2-offin-adc5-r64-prog3", "input_bits": 5, "weight_bits": 6, "input_slice_bits": 1,
     "weight_slice_bits": 2, "signed_input_encoding": "offset", "rows_per_array": 64, "adc_bits": 5,
     "adc_range": "calibrated", "programming_error": 0.03},
    {"label": "u3-ws1-sep-adc8max-r128-th3", "input_slice_bits": 1, "weight_slice_bits": 1, "adc_mode": "separate",
     "rows_per_array": 128, "adc_bits": 8, "adc_range": "max", "adc_thermal_noise_lsb": 3.0},
    {"label": "u4-in4slices-adc8cal-r1152", "input_slice_bits": 4, "rows_per_array": 1152, "adc_bits": 8,
     "adc_range": "calibrated"},
    {"label": "u5-w5-prog7p-read5p", "weight_bits": 5, "programming_error": 0.07, "programming_error_model": "proportional",
     "read_noise": 0.05, "read_noise_model": "proportional"},
    {"label": "u6-offw-offin-adc6-th1", "input_slice_bits": 1, "weight_encoding": "offset",
     "signed_input_encoding": "offset", "rows_per_array": 256, "adc_bits": 6, "adc_range": "calibrated",
     "adc_thermal_noise_lsb": 1.0},
    {"label": "u7-adc4max-r64", "input_slice_bits": 1, "rows_per_array": 64, "adc_bits": 4, "adc_range": "max"},
    {"label": "u8-read8-si", "read_noise": 0.08},
    {"label": "u9-in6w7-ws2-adc6cal-r128-prog2-read1", "input_bits": 6, "weight_bits": 7, "input_slice_bits": 2,
     "weight_slice_bits": 2, "rows_per_array": 128, "adc_bits": 6, "adc_range": "calibrated",
     "programming_error": 0.02, "read_noise": 0.01},
    {"label": "u10-w6-pc-prog4-si", "weight_bits": 6, "weight_scale": "per_channel", "programming_error": 0.04},
]
