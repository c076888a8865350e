"""Weight quantization: codes, device levels per slice, and the fixed error they leave.

``hardware.py`` semantics: ``Δw = max|W| / (2^(b-1)-1)`` per layer or per output channel,
``qw = round(W/Δw)``. The error ``dW = Δw·qw - W`` is fixed (the same for every input), so its
expected squared output error is exact given the second moment of the input patches:
``E[(dW_c · x)²] = dW_c M dW_cᵀ``.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from cimstat.hardware import LayerConfig, WeightEncoding, WeightScale

__all__ = ["WeightCodes", "weight_codes", "device_levels", "weight_quantization_error"]


@dataclass(frozen=True)
class WeightCodes:
    """Quantized weights of one layer."""

    step: np.ndarray     #: (C_out,) Δw per output channel (weight units per code)
    codes: np.ndarray    #: (C_out, K) int64 signed codes qw
    error: np.ndarray    #: (C_out, K) dW = Δw·qw - W (weight units)

    @functools.cached_property
    def dequantized(self) -> np.ndarray:
        """``Δw·qw`` (C_out, K), computed once per codes object (read-only)."""
        out = self.step[:, None] * self.codes
        out.setflags(write=False)
        return out


def weight_codes(w: np.ndarray, bits: int, scale: WeightScale) -> WeightCodes:
    """Symmetric round-to-nearest codes ``±(2^(b-1)-1)`` (round half to even, as torch/numpy)."""
    qmax = 2 ** (bits - 1) - 1
    if scale is WeightScale.PER_CHANNEL:
        wmax = np.abs(w).max(1)
    else:
        wmax = np.full(w.shape[0], np.abs(w).max())
    step = np.where(wmax > 0, wmax / qmax, 1.0)
    codes = np.clip(np.round(w / step[:, None]), -qmax, qmax).astype(np.int64)
    return WeightCodes(step=step, codes=codes, error=step[:, None] * codes - w)


def device_levels(codes: np.ndarray, cfg: LayerConfig) -> list[np.ndarray]:
    """Target level of every device, per weight slice (LSB first): each ``(n_dev, C_out, K)`` uint8.

    ``differential``: ``n_dev = 2`` (G+ then G-), ``offset``: ``n_dev = 1`` (``qw + 2^(b-1)``).
    """
    widths = cfg.weight_slices()
    if cfg.weight_encoding is WeightEncoding.DIFFERENTIAL:
        stored = np.stack([np.maximum(codes, 0), np.maximum(-codes, 0)])
    else:
        stored = (codes + 2 ** (cfg.weight_bits - 1))[None]
    out, offset = [], 0
    for s in widths:
        out.append(((stored >> offset) & (2 ** s - 1)).astype(np.uint8))
        offset += s
    return out


def weight_quantization_error(moment, wq: WeightCodes) -> np.ndarray:
    """(C_out,) ``E[(dW_c · x)²]`` (output units²)."""
    return np.maximum(moment.quad_form(wq.error), 0.0)
