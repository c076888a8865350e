"""Input quantization: the passes and slices an input is applied in, and its rounding+clipping error.

The error ``e = Δx·q - x`` of every input is integrated exactly against the probed
per-channel distribution (point mass at zero included, see :mod:`cimstat.stats`). Rounding
errors are nearly independent of ``x``; clipping errors are not (they grow with ``x``) and are
correlated between the rows of a patch. Both are captured by the regression
``e = a + β·x + r`` (``Cov(r, x) = 0``, ``r`` independent across rows):

``E[(Σ_k w_k e_k)²] = E[(Σ_k w_k β_k x_k + Σ_k w_k a_k)²] + Σ_k w_k² Var(r_k)``,

the first term through the second moment ``M`` of the input patches. The regression is
anchored at each channel's atom (zero, or an image background), so the atom's error stays
coherent. Residuals of rows that (nearly) coincide are correlated (``resid_corr``: identical
rows, e.g. a grey image repeated over colour channels, have identical rounding errors).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cimstat.hardware import LayerConfig, SignedInputEncoding
from cimstat.stats import ChannelDistribution, QuantizedInput, SliceStats, applied_codes

__all__ = ["InputPass", "InputPlan", "input_plan", "input_error_terms"]


@dataclass(frozen=True)
class InputPass:
    """One group of analog passes sharing a sign: the slices of one applied code."""

    sign: float                      #: +1, or -1 for the negative pass of split encoding
    offsets: tuple[int, ...]         #: o_j of each slice (LSB first)
    widths: tuple[int, ...]          #: width of each slice
    slices: tuple[SliceStats, ...]   #: per-channel statistics of each slice level


@dataclass(frozen=True)
class InputPlan:
    """How a layer's input reaches the array."""

    quantized: QuantizedInput
    passes: tuple[InputPass, ...]
    applied: SliceStats    #: statistics of the applied code u (q, or q + 2^(b-1) for offset)
    offset_code: int       #: the constant 2^(b-1) of signed offset encoding, else 0

    @property
    def step(self) -> float:
        return self.quantized.step


def input_plan(dist: ChannelDistribution, cfg: LayerConfig, signed: bool, x_range: float) -> InputPlan:
    """Quantize the distribution and describe every pass and slice (``hardware.py`` semantics)."""
    q = dist.quantize(cfg.input_bits, x_range, signed)
    widths = cfg.input_slices(signed)
    offsets = tuple(int(o) for o in np.cumsum((0,) + widths[:-1]))
    if signed and cfg.signed_input_encoding is SignedInputEncoding.SPLIT:
        polarities, encoding = (1, -1), "split"
    else:
        polarities, encoding = (1,), "offset" if signed else "unsigned"
    passes = []
    for pol in polarities:
        a = applied_codes(q.codes, cfg.input_bits, signed, encoding, pol)
        passes.append(InputPass(float(pol), offsets, widths,
                                tuple(q.slice_stats(a, o, w) for o, w in zip(offsets, widths))))
    offset_code = 2 ** (cfg.input_bits - 1) if encoding == "offset" else 0
    applied = q.value_stats(q.codes + offset_code)
    return InputPlan(quantized=q, passes=tuple(passes), applied=applied, offset_code=offset_code)


def input_error_terms(plan: InputPlan, w: np.ndarray, channel_of_row: np.ndarray,
                      dist: ChannelDistribution | None = None,
                      resid_corr: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The output error ``Σ_k w_ck e_k`` as ``v_c·x + k_c`` (the regression part, deterministic
    given x) plus an independent residual: returns ``(v (C_out, K), k (C_out,), E[resid²] (C_out,))``."""
    q = plan.quantized
    reg = q.anchored_error_regression(*q.atom(dist)) if dist is not None else q.error_regression()
    beta = reg.beta[channel_of_row]
    const = (reg.mean - reg.beta * q.x_mean)[channel_of_row]
    resid = reg.resid_var[channel_of_row]
    if resid_corr is not None:  # residual correlation between rows (identical / close rows)
        r = w * np.sqrt(resid)
        white = np.einsum("ck,ck->c", r @ resid_corr, r)
    else:
        white = (w * w) @ resid
    return w * beta, w @ const, np.maximum(white, 0.0)
