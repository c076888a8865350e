"""Device variation: programming error (drawn once per chip) vs read noise (redrawn at every
read), each state-independent (σ = α·L) or proportional (σ = α·g), α from 0.5 % to 10 %, on
8-bit inputs and weights stored in 4-bit slices (ideal ADC, 256 rows per array)."""
name = "device_variation"
fixed = {"input_bits": 8, "weight_bits": 8, "weight_slice_bits": 4, "rows_per_array": 256}
_alphas = [0.005, 0.01, 0.02, 0.05, 0.1]
_models = ["state_independent", "proportional"]
points = (
    [{"label": f"programming {m} {a:g}", "programming_error": a, "programming_error_model": m,
      "read_noise": 0.0, "read_noise_model": m} for m in _models for a in _alphas]
    + [{"label": f"read {m} {a:g}", "programming_error": 0.0, "programming_error_model": m,
        "read_noise": a, "read_noise_model": m} for m in _models for a in _alphas]
)
