"""Bit slicing x encodings: weight slices (1, 2, 4 bits or one device), input slices
(bit-serial, 2 bits or all at once), differential vs offset weights, split vs offset signed
inputs; 8-bit inputs and weights, 6-bit calibrated ADC, 256 rows, 1 % read noise."""
name = "slicing_encoding"
fixed = {"input_bits": 8, "weight_bits": 8, "adc_bits": 6, "adc_range": "calibrated",
         "rows_per_array": 256, "read_noise": 0.01}
params_sweep_list = {
    "weight_slice_bits": [1, 2, 4, None],
    "input_slice_bits": [1, 2, None],
    "weight_encoding": ["differential", "offset"],
    "signed_input_encoding": ["split", "offset"],
}
