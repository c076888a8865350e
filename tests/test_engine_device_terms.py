"""The device-noise terms from per-code histograms equal the per-weight sums they replace."""
import numpy as np
import pytest

from cimstat.engine import engine_for
from cimstat.engine.coherent import split_coherent
from cimstat.engine.layer import _code_sums, _device_terms
from cimstat.hardware import LayerConfig


def _per_weight_reference(lm, noise, plan, wq):
    """The same quantities summed weight by weight (the formulas of ``device_noise``'s module doc)."""
    ch = lm.channel_of_row
    dx, dw = plan.step, wq.step
    eu2 = plan.applied.sq_mean[ch]
    e_read = sum(4.0 ** o * st.sq_mean[ch] for p in plan.passes for o, st in zip(p.offsets, p.slices))
    prog = (dx * dw) ** 2 * (noise.var_prog @ eu2)
    read = (dx * dw) ** 2 * (noise.var_read @ e_read)
    sp = split_coherent(lm.moment, lm.weight, dw[:, None] * noise.bias, dw * plan.offset_code * dx * noise.bias.sum(1))
    energy = np.where(lm.moment.sq_mean > 0, dx * dx * eu2 / np.maximum(lm.moment.sq_mean, 1e-30), 0.0)
    share = noise.bias_share_prog
    bias_w = sp.residual ** 2 * energy
    fixed_prog = ((dw[:, None] ** 2) * noise.var_prog * energy + share * bias_w) * lm.weight_sens
    fixed_read = (1 - share) * bias_w * lm.weight_sens
    return {"err_prog": prog + share * sp.energy, "err_read": read + (1 - share) * sp.energy, "read": read,
            "gain_prog": share * sp.gain, "off_read": (1 - share) * sp.offset,
            "fixed_prog": fixed_prog.sum(1), "fixed_read": fixed_read.sum(1)}


@pytest.mark.parametrize("knobs", [
    dict(programming_error=0.04, programming_error_model="state_independent", read_noise=0.02),
    dict(read_noise=0.05, read_noise_model="state_independent", weight_slice_bits=2, input_slice_bits=2),
    dict(programming_error=0.03, read_noise=0.03, read_noise_model="state_independent", weight_encoding="offset",
         signed_input_encoding="offset"),
], ids=["differential", "slices", "offset"])
def test_code_histograms_equal_per_weight_sums(default_probes, knobs):
    eng = engine_for(default_probes)
    cfg = LayerConfig(input_bits=8, weight_bits=6, **knobs)
    # layer2.1.conv1: a compressed input moment (low rank plus a residual diagonal, which the histograms carry)
    for name in ("conv1", "layer2.0.conv1", "layer2.1.conv1", "fc"):
        lm = eng.layers[name]
        assert (name != "layer2.1.conv1") or np.any(lm.moment.diag)
        ls = default_probes.stats.layers[name]
        signed = bool(ls.signed_input)
        plan = lm.plan(cfg, signed, float(max(abs(ls.input_min), abs(ls.input_max))))
        wq, noise = lm.weights(cfg), lm.noise(cfg)
        assert np.any(noise.by_code.bias)  # state-independent noise: the clipping bias is exercised
        got = _device_terms(lm, noise, plan, wq, _code_sums(lm, plan, wq, noise.by_code.qmax))
        for key, ref in _per_weight_reference(lm, noise, plan, wq).items():
            # the bias energy's projection runs in float32 (SecondMoment.low_rank_form_single): ~1e-7 relative
            np.testing.assert_allclose(got[key], ref, rtol=2e-6, atol=1e-12 * np.abs(ref).max(),
                                       err_msg=f"{name} {key}")
