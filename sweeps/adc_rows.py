"""ADC precision x array height: bit-serial 8-bit inputs, 8-bit weights in 2-bit slices,
calibrated ADC ranges, 0.5 LSB ADC thermal noise, every analog layer."""
name = "adc_rows"
fixed = {"input_bits": 8, "weight_bits": 8, "input_slice_bits": 1, "weight_slice_bits": 2,
         "adc_range": "calibrated", "adc_thermal_noise_lsb": 0.5}
params_sweep_list = {
    "adc_bits": [3, 4, 5, 6, 7, 8],
    "rows_per_array": [64, 128, 256, 512],
}
