"""The Monte Carlo referee on a CUDA device: the same chips as on the CPU, the same measurements.

Skipped without a GPU (CI has none); run where one is: ``python -m pytest tests/test_montecarlo_cuda.py``.
"""
from __future__ import annotations

import math

import pytest
import torch

from cimstat.hardware import HardwareConfig, LayerConfig, LayerRanges
from cimstat.montecarlo import measure, resolve_from_data
from cimstat.montecarlo.layers import AnalogLayer
from test_montecarlo import _adc_table, _inputs, _linear
from test_montecarlo_measure import _data, _tiny

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _pair(cfg: LayerConfig, signed: bool = True) -> tuple[AnalogLayer, AnalogLayer]:
    adc = _adc_table(cfg, signed, seed=5) if cfg.adc_bits is not None else None
    ranges = LayerRanges(signed, 1.0, adc)
    lin = _linear(k=40, c=6)
    return (AnalogLayer("layer", lin, cfg, ranges, chip_seed=3),
            AnalogLayer("layer", lin, cfg, ranges, chip_seed=3, device="cuda"))


@pytest.mark.parametrize("cfg, exact", [
    (LayerConfig(input_bits=5, weight_bits=4, input_slice_bits=1, weight_slice_bits=2, rows_per_array=16,
                 adc_bits=5), True),
    (LayerConfig(input_bits=6, weight_bits=6, weight_encoding="offset", signed_input_encoding="offset", adc_bits=6,
                 adc_mode="separate", programming_error=0.05, programming_error_model="proportional"), False),
    (LayerConfig(input_bits=4, weight_bits=4, programming_error=0.03), False),
    (LayerConfig(input_bits=None, weight_bits=4), False),
    (LayerConfig(input_bits=6, weight_bits=None), False),
])
def test_a_chip_without_per_read_noise_computes_the_same_outputs_on_cuda(cfg, exact):
    """Programming errors are drawn on the CPU: the CUDA chip is the CPU chip, output for output. Integer partial
    sums are exact on both; sums of programmed (non-integer) conductances differ in the last float bits, which
    may move a rare ADC code."""
    cpu, gpu = _pair(cfg)
    x = _inputs(True, v=200, k=40)
    a, b = cpu(x), gpu(x.cuda()).cpu()
    if exact:
        assert torch.equal(a, b)
    else:
        differ = (a - b).abs() > 1e-5 * float(a.abs().max())
        assert float(differ.float().mean()) < 0.01


def test_per_read_noise_on_cuda_has_the_cpu_error_energy():
    cfg = LayerConfig(input_bits=6, weight_bits=6, input_slice_bits=2, weight_slice_bits=3, adc_bits=7,
                      adc_thermal_noise_lsb=1.0, read_noise=0.03)
    cpu, gpu = _pair(cfg)
    ideal = _pair(LayerConfig(input_bits=6, weight_bits=6))[0]
    x = _inputs(True, v=20000, k=40)
    ref = ideal(x)
    e_cpu = float(((cpu(x) - ref) ** 2).mean())
    e_gpu = float(((gpu(x.cuda()).cpu() - ref) ** 2).mean())
    assert e_gpu == pytest.approx(e_cpu, rel=0.05)  # 20000 x 6 outputs: the energy's sampling error is ~1 %


def test_measure_on_cuda_matches_the_cpu():
    model, data = _tiny(), _data()
    torch.backends.cudnn.allow_tf32 = True  # the caller's setting: off during the run, restored after
    quiet = HardwareConfig(LayerConfig(input_bits=6, weight_bits=5, adc_bits=6, programming_error=0.02))
    noisy = HardwareConfig(LayerConfig(input_bits=6, weight_bits=5, adc_bits=6, read_noise=0.05))
    for cfg, tol in ((quiet, 0.05), (noisy, 1.0)):
        resolved = resolve_from_data(model, cfg, data)
        a = measure(model, cfg, resolved, data, instances=2, progress=False)
        b = measure(model, cfg, resolved, data, instances=2, progress=False, device="cuda")
        assert b.logits_snr_db == pytest.approx(a.logits_snr_db, abs=tol)
        for name in a.layers:
            assert b.isolated_snr_db[name] == pytest.approx(a.isolated_snr_db[name], abs=tol)
        assert math.isfinite(b.top1_mean) and len(b.correct_instances_per_image) == 24
    assert torch.backends.cudnn.allow_tf32 is True
