"""ADC full scale per (input slice, weight slice) from the exact partial sums of the probed input sample.

The probes keep a fixed sample of im2col input vectors of every layer (``noise_prop.pkl``,
``LayerNoiseProp.input_sample``). Quantizing them with the layer's input range, splitting them into
passes and slices, and multiplying by the sliced integer weight codes gives the very integer partial
sums the ADC converts (one per sample vector, pass, output channel, tile and conversion; hardware
semantics of :mod:`cimstat.hardware`, re-derived here from :mod:`cimstat.calibrate.adc_range`'s weight
and input helpers). Their pooled histogram per (input slice, weight slice) is what one ADC range serves;
:func:`cimstat.calibrate.adc_range.choose_adc_range` picks ``R`` on it.

Device noise (programming error + read noise) makes the converted current ``P + e`` with
``Var e = Σ_k σ_j(v_k)²·σ²_dev,k`` per conversion; the histogram is broadened by a Gaussian with the
mean of that variance over the conversions (Gauss–Hermite nodes), so the ADC is chosen for the
currents it actually sees. The error it minimises is ``E[(Q(P') - P')²]``, ``P' = P + e``: the ADC's
own rounding and clipping of the noisy current, not the device noise.

Compared with the analytic model (:func:`cimstat.calibrate.adc_range.factor_partial_sums`): no copula or
shape assumption, and memory bounded by one tile's partial sums (the factor model needs 4.7 GB for one
1152-input layer at 64 rows per array). The sample is capped at :data:`PARTIAL_SUMS_PER_SLICE_PAIR`
partial sums per (input slice, weight slice), never fewer than :data:`MIN_SAMPLE_VECTORS` vectors.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from cimstat.errors import CalibrationError
from cimstat.hardware import LayerConfig
from cimstat.calibrate.adc_range import (MAX_LATTICE, AdcCalibration, PartialSumMixture, _pass_values, _slices,
                                         _tile_bounds, cached_mixtures, calibration_from_mixtures,
                                         weight_conversions)
from cimstat.calibrate.input_range import quantize_input_codes

__all__ = ["sampled_mixtures", "sampled_adc_calibration", "lattice_mixture", "PARTIAL_SUMS_PER_SLICE_PAIR",
           "MIN_SAMPLE_VECTORS"]

PARTIAL_SUMS_PER_SLICE_PAIR = 2 ** 22
"""Target number of partial sums pooled per (input slice, weight slice): the sample vectors used are
``max(MIN_SAMPLE_VECTORS, this / (passes · conversions · channels · tiles))`` (all if fewer)."""
MIN_SAMPLE_VECTORS = 128
"""Fewest sample vectors used (evenly spaced over the sample, which is spread over the probe images)."""
DENSE_SPAN = 2 ** 21
"""Partial-sum spans up to this many integers are counted with a dense bincount, wider ones by ``unique``."""
CHUNK_ELEMENTS = 2 ** 24
"""Partial sums computed per matmul (memory bound: 8 bytes each, plus the float product)."""
NOISE_NODES = 9
"""Gauss–Hermite nodes of the device-noise broadening."""


def lattice_mixture(values: np.ndarray, weights: np.ndarray, max_points: int = MAX_LATTICE) -> PartialSumMixture:
    """Weighted points rounded to the integer lattice (a coarser lattice of spacing ``ceil(span/max_points)``
    when the span is wider): the pmf :func:`~cimstat.calibrate.adc_range.choose_adc_range` takes."""
    v = np.asarray(values, dtype=np.float64).ravel()
    w = np.asarray(weights, dtype=np.float64).ravel()
    lo, hi = float(v.min()), float(v.max())
    spacing = max(1.0, float(np.ceil((hi - lo) / max_points)))
    start = np.floor(lo / spacing) * spacing
    idx = np.round((v - start) / spacing).astype(np.int64)
    probs = np.bincount(idx, weights=w).astype(np.float64)
    keep = probs > 0
    grid = start + spacing * np.arange(probs.size)
    return PartialSumMixture(grid[keep], probs[keep] / probs.sum())


class _IntegerCounts:
    """Counts of integer values in ``[-bound, bound]``: dense when the span is small, else unique-merged."""

    def __init__(self, bound: int) -> None:
        self.bound = int(bound)
        self.dense = 2 * self.bound + 1 <= DENSE_SPAN
        self.counts = torch.zeros(2 * self.bound + 1, dtype=torch.int64) if self.dense else None
        self.parts: list[tuple[torch.Tensor, torch.Tensor]] = []

    def add(self, values: torch.Tensor) -> None:
        v = values.reshape(-1)
        if self.dense:
            self.counts += torch.bincount(v + self.bound, minlength=self.counts.numel())
            return
        self.parts.append(torch.unique(v, return_counts=True))
        if len(self.parts) > 64:
            self.parts = [self._merged()]

    def _merged(self) -> tuple[torch.Tensor, torch.Tensor]:
        vals = torch.cat([p[0] for p in self.parts])
        cnts = torch.cat([p[1] for p in self.parts])
        uniq, inverse = torch.unique(vals, return_inverse=True)
        return uniq, torch.zeros(uniq.numel(), dtype=torch.int64).index_add_(0, inverse, cnts)

    def values_counts(self) -> tuple[np.ndarray, np.ndarray]:
        if self.dense:
            nz = torch.nonzero(self.counts).reshape(-1)
            return (nz - self.bound).numpy().astype(np.float64), self.counts[nz].numpy().astype(np.float64)
        vals, cnts = self._merged()
        return vals.numpy().astype(np.float64), cnts.numpy().astype(np.float64)


def _sample_vectors(sample: np.ndarray, n_pairs_parts: int) -> np.ndarray:
    """Evenly spaced rows of the sample: enough for ``PARTIAL_SUMS_PER_SLICE_PAIR`` partial sums per pair."""
    n = sample.shape[0]
    want = max(MIN_SAMPLE_VECTORS, -(-PARTIAL_SUMS_PER_SLICE_PAIR // max(n_pairs_parts, 1)))
    if want >= n:
        return np.asarray(sample, dtype=np.float64)
    return np.asarray(sample[np.linspace(0, n - 1, want).round().astype(np.int64)], dtype=np.float64)


def sampled_mixtures(sample: np.ndarray, weight_matrix: np.ndarray, cfg: LayerConfig, signed: bool, x_max: float
                     ) -> dict[tuple[int, int], PartialSumMixture]:
    """The pooled pmf of the partial sums the ADC converts, per (input slice ``j``, weight slice ``s``), from
    the sample vectors (``(S, K)``, layer input units), broadened by the mean device-noise variance.

    Partial sum of vector ``n``, pass ``p``, conversion coefficients ``c`` (``g+ - g-`` in difference mode,
    else each polarity or the offset levels), tile ``t``: ``Σ_{k∈t} σ_j(v_pk(n))·c_s,k`` — exact integers."""
    x_all = np.asarray(sample)
    wm = np.asarray(weight_matrix, dtype=np.float64)
    if x_all.ndim != 2 or x_all.shape[1] != wm.shape[1]:
        raise CalibrationError(f"the input sample has shape {x_all.shape}, expected (vectors, {wm.shape[1]}) "
                               "(one im2col vector per row, the layer's fan-in)")
    fan_in = wm.shape[1]
    convs = weight_conversions(wm, cfg)                    # per weight slice: [(coef (C, K), var (C, K)), ...]
    tiles = _tile_bounds(fan_in, cfg)
    in_widths = cfg.input_slices(signed)
    n_passes = len(_pass_values(np.zeros(1), cfg, signed))
    n_conv = len(convs[0])
    x = _sample_vectors(x_all, n_passes * n_conv * wm.shape[0] * len(tiles))
    codes = quantize_input_codes(x, x_max, cfg.input_bits, signed)
    # (pass, input slice) blocks of slice codes, stacked: one matmul per tile serves every pair
    blocks = [sl for v in _pass_values(codes, cfg, signed) for sl in _slices(v, in_widths)]
    n_in = len(in_widths)
    w_widths = cfg.weight_slices()
    coef = np.concatenate([c for per_slice in convs for c, _ in per_slice], axis=0)     # (n_s·n_conv·C, K)
    n_vec, n_out = x.shape[0], wm.shape[0]
    rows = cfg.n_rows(fan_in)
    counts = {(j, s): _IntegerCounts(rows * (2 ** in_widths[j] - 1) * (2 ** w_widths[s] - 1))
              for j in range(n_in) for s in range(len(w_widths))}
    exact_in_float32 = max(c.bound for c in counts.values()) < 2 ** 24
    dtype = torch.float32 if exact_in_float32 else torch.float64
    xt = torch.from_numpy(np.stack(blocks)).to(dtype)                    # (P·J, S, K)
    wt = torch.from_numpy(coef).to(dtype)                                # (S_w·n_conv·C, K)
    chunk = max(1, CHUNK_ELEMENTS // (xt.shape[0] * wt.shape[0]))
    for a, b in tiles:
        for v0 in range(0, n_vec, chunk):
            # (P·J, vectors, S_w·n_conv·C)
            ps = torch.matmul(xt[:, v0:v0 + chunk, a:b], wt[:, a:b].T).round_().to(torch.int64)
            for p in range(n_passes):
                for j in range(n_in):
                    block = ps[p * n_in + j]
                    for s in range(len(w_widths)):
                        counts[j, s].add(block[:, s * n_conv * n_out:(s + 1) * n_conv * n_out])
    # mean device-noise variance per conversion: Σ_p Σ_conv Σ_k E[σ_j(v_pk)²]·Σ_c var_ck / (P·n_conv·C·T)
    sq = np.stack([sl ** 2 for sl in blocks]).mean(axis=1).reshape(n_passes, n_in, fan_in)     # (P, J, K)
    out: dict[tuple[int, int], PartialSumMixture] = {}
    for s, per_slice in enumerate(convs):
        var_k = sum(v.sum(axis=0) for _, v in per_slice)                                     # (K,)
        for j in range(n_in):
            noise_var = float((sq[:, j, :] @ var_k).sum() / (n_passes * n_conv * n_out * len(tiles)))
            values, cnt = counts[j, s].values_counts()
            out[j, s] = _broadened(values, cnt, noise_var)
    return out


def _broadened(values: np.ndarray, counts: np.ndarray, noise_var: float) -> PartialSumMixture:
    """The histogram convolved with ``N(0, noise_var)`` (Gauss–Hermite nodes), on the lattice."""
    if noise_var <= 0:
        return lattice_mixture(values, counts)
    from numpy.polynomial.hermite_e import hermegauss

    z, w = hermegauss(NOISE_NODES)
    pts = values[:, None] + np.sqrt(noise_var) * z[None, :]
    return lattice_mixture(pts, counts[:, None] * (w / w.sum())[None, :])


def sampled_adc_calibration(sample: np.ndarray, spec: Any, cfg: LayerConfig, signed: bool, x_max: float,
                            name: str = "") -> AdcCalibration:
    """Calibrated ADC ranges of one layer from its probed input sample and its folded weights
    (``AnalogLayerSpec`` or a ``(C_out, K)`` matrix): :func:`sampled_mixtures` (kept in memory for the next ADC
    setting: :func:`~cimstat.calibrate.adc_range.cached_mixtures`) then ``choose_adc_range``."""
    if cfg.adc_bits is None or cfg.input_bits is None or cfg.weight_bits is None:
        raise CalibrationError(f"layer {name}: ADC calibration needs input_bits, weight_bits and adc_bits")
    wm = spec.weight_matrix.detach().double().numpy() if hasattr(spec, "weight_matrix") else np.asarray(spec)
    mixtures = cached_mixtures("sampled", (np.asarray(sample), wm), cfg, signed, x_max,
                               lambda: sampled_mixtures(sample, wm, cfg, signed, x_max))
    return calibration_from_mixtures(mixtures, cfg.adc_max_range(signed, wm.shape[1]), cfg, "sampled")
