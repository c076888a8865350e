"""Stress sweep, third batch: six designs that set knobs per layer or slice bits as tuples, which neither
``sweeps/validation.py`` nor the first two stress batches do, written down before the engine was run on them
(2026-12-07)::

    python -m sweeps.validate sweeps/stress3.py --n-images 100 --instances 2 --programmed-instances 4

Its MC entries are cached in ``results/.mc-cache``; the README's "Stress sweep" paragraphs list what it found.
"""
name = "stress3"
points = [
    # digital first and last layers (float), the rest 6-bit with 2-bit slices under a calibrated 6-bit ADC
    {"label": "t1-digital-ends-in6w6-sl2-adc6cal-r256-th0.5", "input_bits": 6, "weight_bits": 6,
     "input_slice_bits": 2, "weight_slice_bits": 2, "rows_per_array": 256, "adc_bits": 6,
     "adc_range": "calibrated", "adc_thermal_noise_lsb": 0.5,
     "conv1.input_bits": None, "conv1.weight_bits": None, "conv1.input_slice_bits": None,
     "conv1.weight_slice_bits": None, "conv1.adc_bits": None, "conv1.adc_thermal_noise_lsb": 0.0,
     "fc.input_bits": None, "fc.weight_bits": None, "fc.input_slice_bits": None, "fc.weight_slice_bits": None,
     "fc.adc_bits": None, "fc.adc_thermal_noise_lsb": 0.0},
    # uneven slices given as tuples (conv1 takes signed inputs in two passes: 7 magnitude bits), with read noise
    {"label": "t2-tuple-slices-w34-in44-adc7cal-r128-read2", "weight_slice_bits": (3, 4),
     "input_slice_bits": (4, 4), "conv1.input_slice_bits": (3, 4), "rows_per_array": 128, "adc_bits": 7,
     "adc_range": "calibrated",
     "read_noise": 0.02},
    # short arrays and a 7-bit ADC in the first stages, tall arrays and an 8-bit ADC in the last
    {"label": "t3-rows64-adc7-deep-rows576-adc8", "input_slice_bits": 4, "rows_per_array": 64, "adc_bits": 7,
     "adc_range": "calibrated",
     "layer3.0.conv2.rows_per_array": 576, "layer3.1.conv1.rows_per_array": 576,
     "layer3.1.conv2.rows_per_array": 576, "layer4.0.conv1.rows_per_array": 576,
     "layer4.0.conv2.rows_per_array": 576, "layer4.1.conv1.rows_per_array": 576,
     "layer4.1.conv2.rows_per_array": 576,
     "layer4.0.conv2.adc_bits": 8, "layer4.1.conv1.adc_bits": 8, "layer4.1.conv2.adc_bits": 8},
    # per-channel offset weights, proportional programming error and read noise, no ADC
    {"label": "t4-pc-offw-prog3p-read1p", "weight_scale": "per_channel", "weight_encoding": "offset",
     "programming_error": 0.03, "programming_error_model": "proportional",
     "read_noise": 0.01, "read_noise_model": "proportional"},
    # a precise conv1 and fc around a 5-bit bit-serial core
    {"label": "t5-conv1fc8-core-in5w5-bs-adc5cal-r128", "input_bits": 5, "weight_bits": 5,
     "input_slice_bits": 1, "rows_per_array": 128, "adc_bits": 5, "adc_range": "calibrated",
     "conv1.input_bits": 8, "conv1.weight_bits": 8, "conv1.input_slice_bits": None, "conv1.adc_bits": None,
     "fc.weight_bits": 8, "fc.adc_bits": 8},
    # one weak layer in an otherwise clean 8-bit network: 3-bit weights and 2 % programming error in layer2.1.conv1
    {"label": "t6-one-weak-layer-w3-prog2", "layer2.1.conv1.weight_bits": 3,
     "layer2.1.conv1.programming_error": 0.02, "layer3.0.conv1.adc_bits": 6,
     "layer3.0.conv1.rows_per_array": 128, "layer3.0.conv1.adc_range": "max"},
    # added the same day after the first six ran, also before the engine was run on them: knobs no sweep had set
    # thermal noise on an ideal ADC (sigma in partial-sum units), bit-serial inputs in 128-row arrays
    {"label": "t7-ideal-adc-thermal8-r128-bs", "input_slice_bits": 1, "rows_per_array": 128,
     "adc_thermal_noise_lsb": 8.0},
    # 3-bit inputs and weights, per-channel scales, no ADC
    {"label": "t8-in3w3-pc", "input_bits": 3, "weight_bits": 3, "weight_scale": "per_channel"},
    # a fixed ADC full scale in partial-sum units (2-bit weight slices, 1-bit inputs, 128 rows: max 384)
    {"label": "t9-adc6-fixed-range200-ws2-bs-r128", "input_slice_bits": 1, "weight_slice_bits": 2,
     "rows_per_array": 128, "adc_bits": 6, "adc_range": 200.0},
    # ternary weights (2 bits) per channel, digital conv1 and fc
    {"label": "t10-w2-pc-digital-ends", "weight_bits": 2, "weight_scale": "per_channel",
     "conv1": "digital", "fc": "digital"},
]
