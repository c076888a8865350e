"""Activation distributions as objects: moments, quantization error, slice statistics.

A layer's probed input is described, per input channel, by a histogram of its non-zero
values (shared uniform edges) plus the exact point mass at zero that ReLU and padding
create. :class:`ChannelDistribution` treats each histogram bin as *uniform* between its
edges (piecewise-uniform density) and the zero mass as a Dirac; every expectation below is
an exact integral against that mixture — no sampling, no Δ²/12 assumption.

:meth:`ChannelDistribution.quantize` integrates the distribution over the cells of the
hardware's input quantizer (``hardware.py`` semantics: round to the nearest of
``q·Δx``, clip to the code range) and returns a :class:`QuantizedInput`: per channel the
code pmf and the partial moments ``∫_cell x dF``, ``∫_cell x² dF``. Every statistic of any
function of the code (error moments, the value applied to the array in each pass, each
bit slice, their covariance with ``x``) is an exact finite sum over codes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

__all__ = ["ChannelDistribution", "QuantizedInput", "SliceStats", "applied_codes"]


class ChannelDistribution:
    """Per-channel distribution: piecewise-uniform histogram of non-zero values + zero mass.

    ``edges (n_bins+1,)`` ascending, shared; ``counts (C, n_bins)`` non-zero values;
    ``zero_counts (C,)`` exact zeros. Values are in the layer's input units.
    """

    def __init__(self, edges: np.ndarray, counts: np.ndarray, zero_counts: np.ndarray):
        edges = np.asarray(edges, dtype=np.float64)
        counts = np.atleast_2d(np.asarray(counts, dtype=np.float64))
        zero_counts = np.atleast_1d(np.asarray(zero_counts, dtype=np.float64))
        if edges.ndim != 1 or edges.shape[0] != counts.shape[1] + 1 or np.any(np.diff(edges) <= 0):
            raise ValueError("edges must be ascending with one more entry than counts has columns")
        if zero_counts.shape != (counts.shape[0],):
            raise ValueError("zero_counts must hold one entry per channel")
        total = counts.sum(1) + zero_counts
        total = np.where(total > 0, total, 1.0)
        self.edges = edges
        self.p_bin = counts / total[:, None]          #: (C, n_bins) probability of each bin
        self.p_zero = zero_counts / total             #: (C,) probability of exactly 0
        width = np.diff(edges)
        self._density = self.p_bin / width            #: (C, n_bins) density inside each bin
        lo, hi = edges[:-1], edges[1:]
        zeros = np.zeros((counts.shape[0], 1))
        self._cum0 = np.concatenate([zeros, np.cumsum(self.p_bin, 1)], 1)
        self._cum1 = np.concatenate([zeros, np.cumsum(self._density * (hi ** 2 - lo ** 2) / 2, 1)], 1)
        self._cum2 = np.concatenate([zeros, np.cumsum(self._density * (hi ** 3 - lo ** 3) / 3, 1)], 1)

    @classmethod
    def from_layer_stats(cls, stats) -> "ChannelDistribution":
        """From a :class:`cimstat.probes.LayerStats` (``hist_edges``, ``hist_counts``, ``zero_counts``)."""
        return cls(stats.hist_edges, stats.hist_counts, stats.zero_counts)

    @property
    def n_channels(self) -> int:
        return int(self.p_bin.shape[0])

    # ---- moments ------------------------------------------------------------------
    @property
    def mean(self) -> np.ndarray:
        """(C,) E[x]."""
        return self._cum1[:, -1].copy()

    @property
    def second_moment(self) -> np.ndarray:
        """(C,) E[x²]."""
        return self._cum2[:, -1].copy()

    @property
    def var(self) -> np.ndarray:
        """(C,) Var[x]."""
        return np.maximum(self.second_moment - self.mean ** 2, 0.0)

    def partial_moments(self, t: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(F(t), ∫_{x<t} x dF, ∫_{x<t} x² dF)`` per channel at thresholds ``t (T,)`` -> each (C, T).

        The zero mass counts in ``F(t)`` for ``t > 0``.
        """
        t = np.asarray(t, dtype=np.float64)
        e = self.edges
        tc = np.clip(t, e[0], e[-1])
        i = np.clip(np.searchsorted(e, tc, side="right") - 1, 0, len(e) - 2)
        lo = e[i]
        d = self._density[:, i]
        g0 = self._cum0[:, i] + d * (tc - lo)
        g1 = self._cum1[:, i] + d * (tc ** 2 - lo ** 2) / 2
        g2 = self._cum2[:, i] + d * (tc ** 3 - lo ** 3) / 3
        g0 = g0 + self.p_zero[:, None] * (t > 0)
        return g0, g1, g2

    # ---- quantization -------------------------------------------------------------
    def quantize(self, bits: int, x_range: float, signed: bool) -> "QuantizedInput":
        """Integrate over the cells of the input quantizer of ``hardware.py``.

        unsigned: codes ``0..2^b-1``, ``Δx = x_range/(2^b-1)``; signed: codes
        ``±(2^(b-1)-1)``, ``Δx = x_range/(2^(b-1)-1)``. Cell of code q: ``[(q-½)Δx, (q+½)Δx)``,
        the end cells extended to ±∞ (clipping).
        """
        if signed:
            qmax = 2 ** (bits - 1) - 1
            if qmax < 1:
                raise ValueError("a signed input needs at least 2 bits")
            codes = np.arange(-qmax, qmax + 1)
        else:
            qmax = 2 ** bits - 1
            codes = np.arange(0, qmax + 1)
        step = float(x_range) / qmax
        thresholds = (codes[:-1] + 0.5) * step
        g0, g1, g2 = self.partial_moments(thresholds)
        c = self.n_channels
        full0 = np.concatenate([np.zeros((c, 1)), g0, np.ones((c, 1))], 1)
        full1 = np.concatenate([np.zeros((c, 1)), g1, self._cum1[:, -1:]], 1)
        full2 = np.concatenate([np.zeros((c, 1)), g2, self._cum2[:, -1:]], 1)
        return QuantizedInput(codes=codes, step=step, signed=signed, bits=bits,
                              pmf=np.diff(full0, axis=1), m1=np.diff(full1, axis=1), m2=np.diff(full2, axis=1),
                              x_mean=self.mean, x_var=self.var, x_sq=self.second_moment)


def applied_codes(codes: np.ndarray, bits: int, signed: bool, encoding: str, polarity: int = 1) -> np.ndarray:
    """The non-negative integer applied to the array for each input code (``hardware.py``).

    unsigned: ``q``; signed ``split``: ``max(±q, 0)`` for ``polarity=±1``; signed ``offset``:
    ``q + 2^(b-1)``.
    """
    if not signed:
        return codes.copy()
    if encoding == "split":
        return np.maximum(polarity * codes, 0)
    return codes + 2 ** (bits - 1)


@dataclass
class SliceStats:
    """Per-channel statistics of one input slice value ``s`` (integer level of one pass).

    Linear regression on x: ``s = a + β·x + r`` with ``Cov(r, x) = 0``.
    """

    mean: np.ndarray       #: (C,) E[s]
    sq_mean: np.ndarray    #: (C,) E[s²]
    beta: np.ndarray       #: (C,) Cov(s, x)/Var(x)
    resid_var: np.ndarray  #: (C,) Var(s) - β²Var(x) >= 0
    zero_prob: np.ndarray | None = None  #: (C,) P(s = 0)

    @property
    def var(self) -> np.ndarray:
        return np.maximum(self.sq_mean - self.mean ** 2, 0.0)


@dataclass
class QuantizedInput:
    """The input distribution integrated over the quantizer cells (exact finite sums)."""

    codes: np.ndarray   #: (Q,) integer codes
    step: float         #: Δx, input units per code
    signed: bool
    bits: int
    pmf: np.ndarray     #: (C, Q) P(code)
    m1: np.ndarray      #: (C, Q) ∫_cell x dF
    m2: np.ndarray      #: (C, Q) ∫_cell x² dF
    x_mean: np.ndarray  #: (C,) E[x]
    x_var: np.ndarray   #: (C,) Var[x]
    x_sq: np.ndarray    #: (C,) E[x²]

    # ---- rounding + clipping error e = Δx·q - x ----------------------------------
    @property
    def error_mean(self) -> np.ndarray:
        """(C,) E[e]."""
        return (self.step * self.codes * self.pmf - self.m1).sum(1)

    @property
    def error_sq_mean(self) -> np.ndarray:
        """(C,) E[e²] (rounding and clipping, zero mass exact)."""
        v = self.step * self.codes
        return np.maximum((v ** 2 * self.pmf - 2 * v * self.m1 + self.m2).sum(1), 0.0)

    @property
    def error_x_mean(self) -> np.ndarray:
        """(C,) E[e·x]."""
        return (self.step * self.codes * self.m1 - self.m2).sum(1)

    def error_regression(self) -> SliceStats:
        """``e = a + β x + r``: regression of the quantization error on x (clipping makes β ≠ 0)."""
        return self._regress(self.step * self.codes.astype(np.float64), error=True)

    def anchored_error_regression(self, anchor: np.ndarray, anchor_error: np.ndarray) -> SliceStats:
        """``e = e0 + β(x - v0) + r``: least squares through the atom ``(v0, e0)`` per channel.

        The residual vanishes on the atom (the most probable value: ReLU's zero, an image's
        background), so the atom's error stays coherent across the rows of a patch instead of
        being treated as independent noise. Returned as ``e = a + β x + r`` with ``E[r] = 0``.
        """
        v0, e0 = np.asarray(anchor, dtype=np.float64), np.asarray(anchor_error, dtype=np.float64)
        e_mean, e_sq, ex = self.error_mean, self.error_sq_mean, self.error_x_mean
        sxx = self.x_sq - 2 * v0 * self.x_mean + v0 * v0
        sex = ex - v0 * e_mean - e0 * self.x_mean + e0 * v0
        see = e_sq - 2 * e0 * e_mean + e0 * e0
        beta = np.where(sxx > 0, sex / np.where(sxx > 0, sxx, 1.0), 0.0)
        r_mean = e_mean - e0 - beta * (self.x_mean - v0)
        r_var = np.maximum(see - beta * beta * sxx - r_mean * r_mean, 0.0)
        return SliceStats(mean=e_mean, sq_mean=e_sq, beta=beta, resid_var=r_var)

    def atom(self, dist: "ChannelDistribution") -> tuple[np.ndarray, np.ndarray]:
        """The most probable value per channel (zero, or a histogram bin holding a point mass
        narrower than Δx/4) and its quantization error ``(v0, e0)``."""
        i = dist.p_bin.argmax(1)
        mass = dist.p_bin[np.arange(dist.n_channels), i]
        width = dist.edges[i + 1] - dist.edges[i]
        centre = (dist.edges[i] + dist.edges[i + 1]) / 2
        use_bin = (mass > dist.p_zero) & (width < self.step / 4)
        v0 = np.where(use_bin, centre, 0.0)
        lo, hi = self.codes[0], self.codes[-1]
        e0 = np.clip(np.round(v0 / self.step), lo, hi) * self.step - v0
        return v0, e0

    # ---- functions of the code ----------------------------------------------------
    def expect(self, f: np.ndarray) -> np.ndarray:
        """(C,) E[f(q)] for values ``f (Q,)`` per code."""
        return self.pmf @ f

    def _regress(self, f: np.ndarray, error: bool = False) -> SliceStats:
        f = np.asarray(f, dtype=np.float64)
        if error:  # e = f(q) - x
            mean = self.pmf @ f - self.x_mean
            sq = np.maximum(self.pmf @ f ** 2 - 2 * (self.m1 @ f) + self.x_sq, 0.0)
            cov = (self.m1 @ f - self.x_sq) - mean * self.x_mean
        else:
            mean = self.pmf @ f
            sq = self.pmf @ f ** 2
            cov = self.m1 @ f - mean * self.x_mean
        var_x = np.where(self.x_var > 0, self.x_var, 1.0)
        beta = np.where(self.x_var > 0, cov / var_x, 0.0)
        resid = np.maximum(sq - mean ** 2 - beta ** 2 * self.x_var, 0.0)
        return SliceStats(mean=mean, sq_mean=sq, beta=beta, resid_var=resid)

    def value_stats(self, f: Callable[[np.ndarray], np.ndarray] | np.ndarray) -> SliceStats:
        """Statistics of ``s = f(q)`` (a callable on the code array, or values per code)."""
        values = f(self.codes) if callable(f) else f
        return self._regress(values)

    def slice_stats(self, applied: np.ndarray, offset_bits: int, width: int) -> SliceStats:
        """Statistics of slice ``(applied >> offset_bits) & (2^width - 1)`` of the applied code."""
        values = (applied.astype(np.int64) >> offset_bits) & (2 ** width - 1)
        out = self._regress(values)
        out.zero_prob = self.pmf @ (values == 0).astype(np.float64)
        return out
