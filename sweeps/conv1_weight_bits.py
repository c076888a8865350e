name = "conv1_weight_bits"  # the seed's first experiment: only conv1 is analog (8-bit inputs), the rest float
fixed = {"input_bits": None, "weight_bits": None, "conv1": {"input_bits": 8}}
params_sweep_list = {"conv1": {"weight_bits": list(range(6, 15))}}
