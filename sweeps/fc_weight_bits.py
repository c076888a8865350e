"""The last layer's weight precision: fc weight bits 2-10, every other layer at 8-bit inputs
and weights (ideal ADC, no device noise)."""
name = "fc_weight_bits"
fixed = {"input_bits": 8, "weight_bits": 8}
params_sweep_list = {"fc": {"weight_bits": [2, 3, 4, 5, 6, 8, 10]}}
