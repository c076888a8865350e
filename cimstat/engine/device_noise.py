"""Programming error and read noise of the conductances, including the clipping bias at 0.

A device with target level ``g`` conducts ``c = max(0, g + e_p + e_r)`` (``hardware.py``):
``e_p ~ N(0, σ_p²)`` fixed per chip, ``e_r ~ N(0, σ_r²)`` redrawn every read, ``σ = α·L`` or
``α·g``. With ``s² = σ_p² + σ_r²`` and ``a = g/s`` the deviation ``δ = c - g`` has the
rectified-Gaussian moments ``E[c] = gΦ(a) + sφ(a)``, ``E[c²] = (g²+s²)Φ(a) + g·s·φ(a)``;
``E[δ] = E[c] - g`` is a bias (non-zero for off devices under state-independent noise), the
same on every chip and every read: it acts as a fixed weight error. ``Var δ`` is split
between the two sources in proportion ``σ_p² : σ_r²`` (exact when only one is present).

Output error of one output (code units, ``u_k`` the applied input code, ``s_jk`` its slice in
pass ``j`` with shift weight ``2^{o_j}``, ``2^{o_l}`` the weight-slice weight):

* programming error (fixed over the passes): ``Σ_k E[u_k²] Σ_l 4^{o_l} Σ_dev Var_p(δ)``
* read noise (independent per pass): ``Σ_j 4^{o_j} Σ_k E[s_jk²] Σ_l 4^{o_l} Σ_dev Var_r(δ)``
* bias: ``E[(Σ_k b_k u_k)²]``, ``b_k = Σ_l 2^{o_l} (E[δ+] - E[δ-])``, via the second moment of x.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np
from scipy.special import ndtr

from cimstat.hardware import LayerConfig, NoiseModel, WeightEncoding

__all__ = ["LevelNoise", "level_noise", "CodeNoise", "DeviceNoise", "device_noise"]

_INV_SQRT_2PI = 1.0 / np.sqrt(2 * np.pi)


@dataclass(frozen=True)
class LevelNoise:
    """Per target level ``g = 0..L`` of one slice width: deviation moments (device levels)."""

    bias: np.ndarray      #: (L+1,) E[δ]
    var_prog: np.ndarray  #: (L+1,) share of Var δ fixed per chip
    var_read: np.ndarray  #: (L+1,) share of Var δ redrawn per read

    @property
    def var(self) -> np.ndarray:
        return self.var_prog + self.var_read


def _sigma(alpha: float, model: NoiseModel, levels: np.ndarray, full: int) -> np.ndarray:
    if model is NoiseModel.STATE_INDEPENDENT:
        return np.full(levels.shape, alpha * full, dtype=np.float64)
    return alpha * levels.astype(np.float64)


def level_noise(cfg: LayerConfig, width: int) -> LevelNoise:
    """Rectified-Gaussian deviation moments for every level of a ``width``-bit device."""
    full = 2 ** width - 1
    g = np.arange(full + 1, dtype=np.float64)
    sp = _sigma(cfg.programming_error, cfg.programming_error_model, g, full)
    sr = _sigma(cfg.read_noise, cfg.read_noise_model, g, full)
    s2 = sp ** 2 + sr ** 2
    s = np.sqrt(s2)
    safe = np.where(s > 0, s, 1.0)
    a = g / safe
    cdf, pdf = ndtr(a), np.exp(-0.5 * a * a) * _INV_SQRT_2PI
    ec = g * cdf + safe * pdf
    ec2 = (g * g + safe * safe) * cdf + g * safe * pdf
    var = np.where(s > 0, np.maximum(ec2 - ec * ec, 0.0), 0.0)
    bias = np.where(s > 0, ec - g, 0.0)
    frac_p = np.where(s2 > 0, sp ** 2 / np.where(s2 > 0, s2, 1.0), 0.0)
    return LevelNoise(bias=bias, var_prog=var * frac_p, var_read=var * (1 - frac_p))


@dataclass(frozen=True)
class CodeNoise:
    """The per-weight sums of :class:`DeviceNoise` as tables over the signed weight code
    ``q = -qmax..qmax`` (every device level is a function of the code; index ``q + qmax``)."""

    qmax: int
    var_prog: np.ndarray  #: (2·qmax+1,) Σ_l 4^{o_l} Σ_dev Var_p
    var_read: np.ndarray  #: (2·qmax+1,) Σ_l 4^{o_l} Σ_dev Var_r
    bias: np.ndarray      #: (2·qmax+1,) Σ_l 2^{o_l} (E[δ+] - E[δ-])


class DeviceNoise:
    """Device-noise statistics of one layer (weight-code units): per target level, per code, and
    (computed on first use) per weight."""

    def __init__(self, tables: list[LevelNoise], bias_share_prog: float, by_code: CodeNoise | None,
                 codes: np.ndarray | None, levels: list[np.ndarray] | None, cfg: LayerConfig):
        self.tables = tables                  #: per weight slice: moments per target level
        self.bias_share_prog = bias_share_prog  #: fraction of the bias attributed to programming error
        self.by_code = by_code                #: the per-weight sums per signed code (None without codes)
        self._codes, self._levels, self._cfg = codes, levels, cfg

    @cached_property
    def _per_weight(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if self.by_code is not None:
            idx = self._codes + self.by_code.qmax
            return self.by_code.var_prog[idx], self.by_code.var_read[idx], self.by_code.bias[idx]
        return _sums(self._levels, self.tables, self._cfg, self._levels[0].shape[1:])

    @property
    def var_prog(self) -> np.ndarray:
        """(C_out, K) Σ_l 4^{o_l} Σ_dev Var_p."""
        return self._per_weight[0]

    @property
    def var_read(self) -> np.ndarray:
        """(C_out, K) Σ_l 4^{o_l} Σ_dev Var_r."""
        return self._per_weight[1]

    @property
    def bias(self) -> np.ndarray:
        """(C_out, K) Σ_l 2^{o_l} (E[δ+] - E[δ-])."""
        return self._per_weight[2]

    def slice_bias(self, levels: np.ndarray, l: int) -> np.ndarray:
        """E[δ] of every device of slice ``l`` (``levels (n_dev, C_out, K)``)."""
        return self.tables[l].bias[levels]

    def slice_var(self, levels: np.ndarray, l: int) -> np.ndarray:
        """Var δ (both sources) of every device of slice ``l``."""
        return self.tables[l].var[levels]

    def slice_var_prog(self, levels: np.ndarray, l: int) -> np.ndarray:
        """The share of Var δ fixed per chip (programming error) of every device of slice ``l``."""
        return self.tables[l].var_prog[levels]


def device_noise(levels: list[np.ndarray] | None, cfg: LayerConfig, codes: np.ndarray | None = None) -> DeviceNoise:
    """Device-noise statistics from the target levels of every slice (``device_levels``).

    With ``codes`` (the signed weight codes ``(C_out, K)``) the per-weight sums are read from
    one table per code (:class:`CodeNoise`, bit-identical to the sums over slices and devices);
    ``levels`` may then be None.
    """
    tables = [level_noise(cfg, width) for width in cfg.weight_slices()]
    by_code = None
    if codes is not None:
        from .weight_quantization import device_levels

        qmax = 2 ** (cfg.weight_bits - 1) - 1
        grid = np.arange(-qmax, qmax + 1, dtype=np.int64)
        by_code = CodeNoise(qmax, *_sums(device_levels(grid, cfg), tables, cfg, grid.shape))
    wp = wr = 0.0
    for tab in tables:
        wp += float(tab.var_prog.sum())
        wr += float(tab.var_read.sum())
    share = wp / (wp + wr) if wp + wr > 0 else 1.0
    return DeviceNoise(tables, share, by_code, codes, levels, cfg)


def _sums(levels, tables, cfg: LayerConfig, shape):
    sign = np.array([1.0, -1.0]) if cfg.weight_encoding is WeightEncoding.DIFFERENTIAL else np.array([1.0])
    var_p = np.zeros(shape)
    var_r = np.zeros(shape)
    bias = np.zeros(shape)
    offset = 0
    for g, width, tab in zip(levels, cfg.weight_slices(), tables):
        for d in range(g.shape[0]):
            var_p += 4.0 ** offset * tab.var_prog[g[d]]
            var_r += 4.0 ** offset * tab.var_read[g[d]]
            bias += 2.0 ** offset * sign[d] * tab.bias[g[d]]
        offset += width
    return var_p, var_r, bias
