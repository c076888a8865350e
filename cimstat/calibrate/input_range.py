"""Input (DAC) full scale minimising the expected rounding + clipping error.

The quantizer is the exact one of :mod:`cimstat.hardware`: unsigned inputs
``q = clip(round(x/Δ), 0, 2^b-1)``, ``Δ = r/(2^b-1)``; signed inputs symmetric,
``q = clip(round(x/Δ), -(2^(b-1)-1), 2^(b-1)-1)``, ``Δ = r/(2^(b-1)-1)``. The error of a
value is ``(x - Δ·q)²``, i.e. rounding error inside the range and ``(|x| - r)²`` beyond it.

The distribution is the layer's pooled per-channel histogram of the *non-zero* values
(assumed uniform inside each bin, integrated with ``SUBSAMPLES`` midpoints per bin) plus
the exact point mass at zero, which quantizes without error and is therefore left out of
the objective (a histogram observer that spreads it over its bin, as
``torch.ao.quantization.HistogramObserver`` does, charges it a spurious ``Δ²/12`` and
drives the range too low on ReLU outputs, where most values are exactly zero). Signed
inputs are folded onto ``|x|`` (symmetric grid). The search is a dense grid over
``(0, max|x|]`` followed by a local refinement; ``max|x|`` itself is always a candidate, so
the calibrated range never has a larger expected error than the ``max`` range.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cimstat.errors import CalibrationError

__all__ = ["InputDistribution", "input_distribution", "expected_input_error", "calibrate_input_range",
           "quantize_input_codes"]

SUBSAMPLES = 8
"""Integration points per histogram bin (midpoint rule on a uniform density)."""


@dataclass(frozen=True)
class InputDistribution:
    """A layer input's value distribution: weighted support points plus the mass at zero."""

    values: np.ndarray
    """Support points (input units), non-zero values only."""
    weights: np.ndarray
    """Probability of each support point (sums to ``1 - zero_mass``)."""
    zero_mass: float
    """Probability of an exact zero."""
    signed: bool
    abs_max: float
    """Largest |x| seen in probing (input units)."""


def input_distribution(stats, channels: np.ndarray | slice | None = None) -> InputDistribution:
    """The pooled input distribution of a layer (``LayerStats``), optionally of some channels only."""
    edges = np.asarray(stats.hist_edges, dtype=np.float64)
    counts = np.asarray(stats.hist_counts, dtype=np.float64)
    zeros = np.asarray(stats.zero_counts, dtype=np.float64)
    if counts.ndim == 1:
        counts = counts[None, :]
        zeros = np.atleast_1d(zeros)
    if channels is not None:
        counts, zeros = counts[channels], zeros[channels]
    if counts.ndim == 2:
        counts, zeros = counts.sum(0), float(zeros.sum())
    total = counts.sum() + zeros
    if edges.ndim != 1 or edges.size != counts.size + 1:
        raise CalibrationError(f"layer {stats.name}: hist_edges has {edges.size} entries but hist_counts has "
                               f"{counts.size} bins; expected n_bins+1 edges")
    if total <= 0:
        raise CalibrationError(f"layer {stats.name}: empty input histogram; cannot calibrate its input range")
    offsets = (np.arange(SUBSAMPLES) + 0.5) / SUBSAMPLES
    lo, width = edges[:-1], np.diff(edges)
    values = (lo[:, None] + width[:, None] * offsets[None, :]).ravel()
    weights = np.repeat(counts / (total * SUBSAMPLES), SUBSAMPLES)
    keep = (weights > 0) & (values != 0)
    abs_max = float(max(abs(float(stats.input_min)), abs(float(stats.input_max))))
    return InputDistribution(values[keep], weights[keep], float(zeros / total), bool(stats.signed_input), abs_max)


def _levels(bits: int, signed: bool) -> int:
    """Largest code magnitude: 2^b-1 (unsigned) or 2^(b-1)-1 (signed, symmetric)."""
    return (2 ** (bits - 1) - 1) if signed else (2 ** bits - 1)


def quantize_input_codes(x: np.ndarray, x_max: float, bits: int, signed: bool) -> np.ndarray:
    """Integer input codes per the hardware contract (round half to even, clip)."""
    top = _levels(bits, signed)
    q = np.round(np.asarray(x, dtype=np.float64) * (top / x_max))
    return np.clip(q, -top if signed else 0, top)


def expected_input_error(dist: InputDistribution, x_max: np.ndarray | float, bits: int) -> np.ndarray:
    """``E[(x - Δ·q(x))²]`` (input units²) for each candidate full scale in ``x_max``."""
    r = np.atleast_1d(np.asarray(x_max, dtype=np.float64))
    top = _levels(bits, dist.signed)
    if top < 1:
        raise CalibrationError(f"input_bits={bits} leaves no non-zero code for a "
                               f"{'signed' if dist.signed else 'unsigned'} input")
    v = np.abs(dist.values) if dist.signed else dist.values
    out = np.empty(r.size)
    chunk = max(1, 2_000_000 // max(v.size, 1))
    for start in range(0, r.size, chunk):
        rr = r[start:start + chunk, None]
        step = rr / top
        q = np.clip(np.round(v[None, :] / step), 0, top)     # negative unsigned values clip to 0
        err = (v[None, :] - q * step) ** 2
        out[start:start + chunk] = err @ dist.weights
    return out


def calibrate_input_range(dist: InputDistribution, bits: int, n_grid: int = 256) -> tuple[float, float, float]:
    """``(x_max, expected error at x_max, expected error at max|x|)``: the MSE-optimal full scale."""
    if dist.abs_max <= 0 or dist.values.size == 0:
        raise CalibrationError("the layer's input is identically zero in the probes; there is no range to calibrate")
    hi = dist.abs_max
    grid = hi * np.linspace(1.0 / n_grid, 1.0, n_grid)
    err = expected_input_error(dist, grid, bits)
    i = int(np.argmin(err))
    lo_r, hi_r = grid[max(i - 1, 0)], grid[min(i + 1, n_grid - 1)]
    fine = np.linspace(lo_r, hi_r, 65)
    fine_err = expected_input_error(dist, fine, bits)
    j = int(np.argmin(fine_err))
    best, best_err, max_err = float(fine[j]), float(fine_err[j]), float(err[-1])
    if best_err > max_err:
        best, best_err = hi, max_err
    return best, best_err, max_err
