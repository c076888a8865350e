"""ADC full scale per (input slice, weight slice), analytically from the probe statistics.

Model of one partial sum (one input pass ``p``, input slice ``j``, weight slice ``s``, tile ``t``,
output channel ``c``) — hardware semantics of :mod:`cimstat.hardware`, re-derived here:

* input codes ``q = clip(round(x/Δx))`` per row ``k``; the pass applies magnitude codes ``v``
  (unsigned ``v = q``; signed split ``v = max(±q, 0)``; signed offset ``v = q + 2^(b-1)``), the slice
  is ``σ_j(v) = (v >> o_j) & (2^{s_j}-1)``. Its pmf per input channel comes from the probe
  histogram (non-zero values uniform in a bin, exact zeros at code 0), scaled per patch row
  so that ``E[x_k²]`` matches the probed ``row_sq_mean`` (rows touching padding hold more zeros).
* weight device levels ``g`` from the folded float weights (symmetric per layer/channel scale,
  differential ``G±`` or offset ``qw + 2^(b-1)``, sliced the same way); the ADC converts
  ``Σ c_k σ_j(v_k)`` with ``c = g+ - g-`` (differential, difference mode) or ``c = g`` (each
  polarity separately, or offset weights).
* mean ``μ = Σ_k c_k E[σ_j(v_k)]``; variance ``d^T G d`` with ``d_k = c_k·sd(σ_j(v_k))`` and
  ``G_kl = Σ_n b_n ρ_kl^n`` (``G_kk = 1``): the rows are tied by a Gaussian copula whose latent
  correlation ``ρ`` reproduces the probed Pearson correlation of the inputs (``M - m m^T``, diagonal
  tile blocks), and ``b_n`` is the Hermite (Mehler) correlation transfer of the slice map
  ``σ_j(v(F^{-1}(Φ(g))))`` of the layer's pooled code distribution — the MSB slice of two correlated
  inputs is less correlated than the inputs; plus device noise ``Σ_k E[σ_j(v_k)²]·(σ_p² + σ_r²)``.
* shape (:func:`factor_partial_sums`, what :func:`analytic_adc_calibration` uses): the tile's latent
  correlation is fitted by one common factor ``u``; given ``u`` the rows are independent, so at each
  Gauss–Hermite node the partial sum has exact conditional moments, an exact point mass where every
  active row sits at its most likely slice value (``Π_k P(σ_j(v_k) = r_k | u)``: MNIST's constant
  background, ReLU zeros, empty MSB slices) and exact masses where exactly one row is off it; the rest
  (two or more rows off) is a skewed continuous part with the remaining moments, whose residual variance
  (what the single factor misses of the full copula's ``d^T G d``) gets :data:`PARTIAL_SUM_KURTOSIS`.
  The older moment model (:func:`analytic_partial_sums` + :func:`partial_sum_mixture`: one skewed,
  kurtotic shape per (pass, channel, tile)) missed the point masses: on the default model's conv1
  its ranges were 0.52-0.84 of the profiled ones. Everything is rounded to the integer lattice of
  partial-sum units; the mixture over nodes, passes, channels and tiles (and both polarities in
  ``separate`` mode) is what one ADC range serves.

``R`` minimises the expected ``E[(Q(P + n) - P)²]`` over the mixture (rounding + clipping, with
thermal noise ``n ~ N(0, (σ_th·Δ)²)`` summed exactly over output codes with Gaussian CDFs at the
thresholds — not ``σ² + Δ²/12``); integer LSBs are always candidates (they keep lattice points
exact). ``R_max`` is always a candidate, so the calibrated range never has a larger expected error
than ``max`` under this model.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from cimstat.errors import CalibrationError
from cimstat.hardware import LayerConfig, NoiseModel, SignedInputEncoding, WeightEncoding, WeightScale
from cimstat.calibrate.input_range import SUBSAMPLES, quantize_input_codes

__all__ = ["AdcCalibration", "PartialSumMixture", "FactorComponents", "weight_codes", "weight_conversions",
           "input_pass_pmfs", "analytic_partial_sums", "partial_sum_mixture", "factor_partial_sums",
           "factor_mixture", "analytic_mixtures", "skewed_quantiles", "latent_transfer", "adc_error",
           "choose_adc_range", "cached_mixtures", "analytic_adc_calibration", "calibration_from_mixtures", "empirical_mixture", "PARTIAL_SUM_KURTOSIS"]

MAX_LATTICE = 8192
"""Most support points of a pooled partial-sum pmf (coarser bins beyond that span)."""


@dataclass
class PartialSumMixture:
    """A pooled distribution of partial sums (partial-sum units): support points and probabilities."""

    values: np.ndarray
    probs: np.ndarray


@dataclass
class AdcCalibration:
    """Calibrated ADC ranges of one layer, with the expected errors that chose them."""

    adc_range: np.ndarray
    """R per (input slice, weight slice), partial-sum units."""
    max_range: np.ndarray
    expected_error: np.ndarray
    """Expected squared ADC error per conversion at ``adc_range`` (partial-sum units²)."""
    expected_error_max: np.ndarray
    """The same at the ``max`` range."""
    method: str = "analytic"
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"adc_range": self.adc_range.tolist(), "max_range": self.max_range.tolist(),
                "expected_error": self.expected_error.tolist(),
                "expected_error_max": self.expected_error_max.tolist(), "method": self.method, **self.extra}


# ---- weights -------------------------------------------------------------------------------
def weight_codes(weight_matrix: np.ndarray, cfg: LayerConfig) -> np.ndarray:
    """Integer weight codes ``round(W/Δw)`` in ``±(2^(b-1)-1)``, ``Δw = max|W|/(2^(b-1)-1)``."""
    w = np.asarray(weight_matrix, dtype=np.float64)
    top = 2 ** (cfg.weight_bits - 1) - 1
    if cfg.weight_scale is WeightScale.PER_CHANNEL:
        wmax = np.abs(w).max(axis=1, keepdims=True)
    else:
        wmax = np.full((w.shape[0], 1), np.abs(w).max())
    step = np.where(wmax > 0, wmax / top, 1.0)
    return np.clip(np.round(w / step), -top, top)


def _slices(codes: np.ndarray, widths: tuple[int, ...]) -> list[np.ndarray]:
    out, offset = [], 0
    ints = codes.astype(np.int64)
    for s in widths:
        out.append(((ints >> offset) & (2 ** s - 1)).astype(np.float64))
        offset += s
    return out


def _device_sigma2(levels: np.ndarray, cfg: LayerConfig, slice_width: int) -> np.ndarray:
    """Per-device variance (levels²) of programming error plus read noise."""
    full = 2 ** slice_width - 1
    total = np.zeros_like(levels)
    for alpha, model in ((cfg.programming_error, cfg.programming_error_model),
                         (cfg.read_noise, cfg.read_noise_model)):
        if alpha > 0:
            total = total + ((alpha * full) ** 2 if model is NoiseModel.STATE_INDEPENDENT else (alpha * levels) ** 2)
    return total


def weight_conversions(weight_matrix: np.ndarray, cfg: LayerConfig) -> list[list[tuple[np.ndarray, np.ndarray]]]:
    """Per weight slice, the conversions one ADC range serves: ``(coefficients (C, K), device noise var (C, K))``."""
    q = weight_codes(weight_matrix, cfg)
    widths = cfg.weight_slices()
    if cfg.weight_encoding is WeightEncoding.OFFSET:
        levels = _slices(q + 2 ** (cfg.weight_bits - 1), widths)
        return [[(g, _device_sigma2(g, cfg, w))] for g, w in zip(levels, widths)]
    pos, neg = _slices(np.maximum(q, 0), widths), _slices(np.maximum(-q, 0), widths)
    out = []
    for gp, gn, w in zip(pos, neg, widths):
        sp, sn = _device_sigma2(gp, cfg, w), _device_sigma2(gn, cfg, w)
        if cfg.adc_signed:
            out.append([(gp - gn, sp + sn)])
        else:
            out.append([(gp, sp), (gn, sn)])
    return out


# ---- inputs --------------------------------------------------------------------------------
def _channel_code_pmf(ls: Any, x_max: float, bits: int, signed: bool) -> tuple[np.ndarray, np.ndarray]:
    """``(codes (n,), pmf (C_in, n))``: per input channel, probability of each signed input code."""
    edges = np.asarray(ls.hist_edges, dtype=np.float64)
    counts = np.atleast_2d(np.asarray(ls.hist_counts, dtype=np.float64))
    zeros = np.atleast_1d(np.asarray(ls.zero_counts, dtype=np.float64))
    offsets = (np.arange(SUBSAMPLES) + 0.5) / SUBSAMPLES
    pts = (edges[:-1, None] + np.diff(edges)[:, None] * offsets[None, :]).ravel()
    top = (2 ** (bits - 1) - 1) if signed else (2 ** bits - 1)
    codes = np.arange(-top if signed else 0, top + 1)
    idx = (quantize_input_codes(pts, x_max, bits, signed) - codes[0]).astype(np.int64)
    sub = np.repeat(counts, SUBSAMPLES, axis=1) / SUBSAMPLES          # (C_in, n_pts)
    pmf = np.zeros((counts.shape[0], codes.size))
    for c in range(codes.size):                                        # <= 256 codes
        sel = idx == c
        if sel.any():
            pmf[:, c] = sub[:, sel].sum(1)
    pmf[:, -codes[0]] += zeros
    total = pmf.sum(1, keepdims=True)
    return codes, pmf / np.where(total > 0, total, 1.0)


def _pass_values(codes: np.ndarray, cfg: LayerConfig, signed: bool) -> list[np.ndarray]:
    """Magnitude codes applied in each pass, as a function of the signed input code."""
    if not signed:
        return [codes]
    if cfg.signed_input_encoding is SignedInputEncoding.SPLIT:
        return [np.maximum(codes, 0), np.maximum(-codes, 0)]
    return [codes + 2 ** (cfg.input_bits - 1)]


@dataclass
class _PassSliceStats:
    mean: np.ndarray     # (K,) E[σ_j(v_k)]
    sq: np.ndarray       # (K,) E[σ_j(v_k)²]
    m3: np.ndarray       # (K,) third central moment of σ_j(v_k)
    transfer: np.ndarray  # (order,) b_n: Corr(σ_j(v_k), σ_j(v_l)) = Σ_n b_n ρ_kl^n (latent Gaussian ρ)


def input_pass_pmfs(ls: Any, cfg: LayerConfig, signed: bool, x_max: float
                    ) -> tuple[list[list[_PassSliceStats]], np.ndarray]:
    """Per pass, per input slice: row-wise moments of the slice values and their copula correlation
    transfer; and the transfer of the input code itself."""
    codes, pmf = _channel_code_pmf(ls, x_max, cfg.input_bits, signed)
    k_total = int(ls.fan_in)
    c_in = pmf.shape[0]
    per_ch = k_total // c_in if k_total % c_in == 0 else None
    if per_ch is None:
        raise CalibrationError(f"layer {ls.name}: fan_in {k_total} is not a multiple of its {c_in} histogram "
                               "channels; grouped layers are not supported by ADC calibration")
    row_ch = np.arange(k_total) // per_ch
    step = x_max / ((2 ** (cfg.input_bits - 1) - 1) if signed else (2 ** cfg.input_bits - 1))
    q2_ch = pmf @ (codes.astype(np.float64) ** 2)                      # E[q²] per channel
    row_q2 = np.asarray(ls.row_sq_mean, dtype=np.float64) / step ** 2
    lam = np.where(q2_ch[row_ch] > 0, row_q2 / np.where(q2_ch[row_ch] > 0, q2_ch[row_ch], 1.0), 0.0)
    lam = np.clip(lam, 0.0, None)
    pooled = pmf.mean(0)
    q = codes.astype(np.float64)
    out = []
    for v in _pass_values(codes, cfg, signed):
        per_slice = []
        for sl in _slices(v, cfg.input_slices(signed)):
            # the row distribution is the channel's with its non-zero part scaled by lam (zero -> slice of code 0)
            zero_val = sl[codes == 0][0]
            m_ch, s_ch = pmf @ sl, pmf @ sl ** 2
            mean = zero_val + lam * (m_ch[row_ch] - zero_val)
            sq = zero_val ** 2 + lam * (s_ch[row_ch] - zero_val ** 2)
            cube = zero_val ** 3 + lam * ((pmf @ sl ** 3)[row_ch] - zero_val ** 3)
            m3 = cube - 3 * mean * sq + 2 * mean ** 3
            per_slice.append(_PassSliceStats(mean, sq, m3, latent_transfer(pooled, sl)))
        out.append(per_slice)
    return out, latent_transfer(pooled, q)


TRANSFER_ORDER = 12
PARTIAL_SUM_KURTOSIS = 3.0
"""Excess kurtosis given to every partial sum (3 = Laplace: a Gaussian scale mixture with exponential
variance). The probes hold second moments only; partial sums of co-active sparse inputs (high input
slices: whole strokes switch on together) have heavier tails than a Gaussian copula of the probed
correlations gives. Measured on the default model (8-bit inputs in 2-bit slices, 4-bit weights in
2-bit slices, 256 rows, 3-bit ADC): the excess empirical ADC error of the analytic range over the
profiled optimum on the MSB input slice falls from 1.2-2.8x (Gaussian) to 1.0-1.5x, the lower slices
rising by at most ~10 %."""
_LATENT = np.linspace(-8.0, 8.0, 8001)
_LATENT_W = np.exp(-0.5 * _LATENT ** 2) / np.exp(-0.5 * _LATENT ** 2).sum()


def latent_transfer(pmf: np.ndarray, values: np.ndarray, order: int = TRANSFER_ORDER) -> np.ndarray:
    """Correlation transfer of ``h(G) = values[F^{-1}(Φ(G))]`` (``F`` the CDF of ``pmf``) under a Gaussian
    copula: ``Corr(h(G1), h(G2)) = Σ_{n>=1} b_n ρ^n`` for ``Corr(G1, G2) = ρ``, with
    ``b_n = n!·c_n²/Var h`` from the Hermite coefficients ``c_n`` (Mehler's formula). Returns
    ``b_1..b_order``; what the truncation leaves (``1 - Σ b_n``) counts only on the diagonal."""
    from scipy.special import ndtr

    cdf = np.cumsum(pmf) / pmf.sum()
    idx = np.clip(np.searchsorted(cdf, ndtr(_LATENT)), 0, pmf.size - 1)
    h = np.asarray(values, dtype=np.float64)[idx]
    var = _LATENT_W @ h ** 2 - (_LATENT_W @ h) ** 2
    b = np.zeros(order)
    if var <= 1e-15:
        return b
    he_prev, he = np.ones_like(_LATENT), _LATENT.copy()
    fact = 1.0
    for n in range(1, order + 1):
        fact *= n
        b[n - 1] = (_LATENT_W @ (h * he)) ** 2 / fact / var
        he_prev, he = he, _LATENT * he - n * he_prev
    return np.minimum(b, 1.0)


def _poly(b: np.ndarray, rho: torch.Tensor) -> torch.Tensor:
    """``Σ_n b_n ρ^n`` elementwise (Horner)."""
    out = torch.zeros_like(rho)
    for coef in b[::-1]:
        out = (out + float(coef)) * rho
    return out


# ---- partial sums --------------------------------------------------------------------------
def _tile_bounds(fan_in: int, cfg: LayerConfig) -> list[tuple[int, int]]:
    n = cfg.n_rows(fan_in)
    return [(a, min(a + n, fan_in)) for a in range(0, fan_in, n)]


def _tile_latent_correlations(ls: Any, tiles: list[tuple[int, int]], x_transfer: np.ndarray):
    """Per tile: the latent Gaussian correlation block ``ρ`` whose transfer gives the probed Pearson
    correlation of the inputs (``Cov = M - m m^T`` from the stored second moment), inverted numerically."""
    mean = np.asarray(ls.row_mean, dtype=np.float64)
    factored = getattr(ls, "m_method", "dense") != "dense" and getattr(ls, "m_eigvecs", None) is not None
    full = None if factored else np.asarray(ls.matrix(), dtype=np.float64)
    grid = np.linspace(-1.0, 1.0, 2001)
    pear = np.polynomial.polynomial.polyval(grid, np.concatenate([[0.0], x_transfer]))
    pear = np.maximum.accumulate(pear)                       # monotone for the inversion
    for a, b in tiles:
        if factored:
            v = np.asarray(ls.m_eigvecs[a:b], dtype=np.float64)
            block = (v * np.asarray(ls.m_eigvals, dtype=np.float64)) @ v.T + np.diag(
                np.asarray(ls.m_resid_diag[a:b], dtype=np.float64))
        else:
            block = full[a:b, a:b]
        cov = block - np.outer(mean[a:b], mean[a:b])
        sd = np.sqrt(np.maximum(np.diag(cov), 0.0))
        safe = np.where(sd > 0, sd, 1.0)
        r = np.clip(cov / np.outer(safe, safe), -1.0, 1.0)
        rho = np.interp(r, pear, grid)
        np.fill_diagonal(rho, 1.0)
        yield torch.as_tensor(rho, dtype=torch.float32)


def analytic_partial_sums(ls: Any, weight_matrix: np.ndarray, cfg: LayerConfig, signed: bool, x_max: float
                          ) -> list[list[list[tuple[np.ndarray, np.ndarray]]]]:
    """Per (input slice j, weight slice s): list of ``(mean, variance, skewness)`` arrays (one per pass
    and conversion kind), each over (channel, tile), in partial-sum units."""
    passes, x_transfer = input_pass_pmfs(ls, cfg, signed, x_max)
    convs = weight_conversions(weight_matrix, cfg)
    tiles = _tile_bounds(int(ls.fan_in), cfg)
    n_slices = len(passes[0])
    # Var(Σ_k c_k σ_j(v_k)) per (pass, slice j, weight slice s, conversion): d^T G d, d = c ∘ sd_j,
    # G = Σ_n b_n ρ^n off the diagonal, 1 on it (copula model of the slice correlations)
    corr_var = {}
    for t, rho in enumerate(_tile_latent_correlations(ls, tiles, x_transfer)):
        a, b = tiles[t]
        for pi, p in enumerate(passes):
            for j in range(n_slices):
                st = p[j]
                g = _poly(st.transfer, rho)
                g.fill_diagonal_(1.0)
                sd = torch.as_tensor(np.sqrt(np.maximum(st.sq[a:b] - st.mean[a:b] ** 2, 0.0)), dtype=torch.float32)
                for s_idx, conv in enumerate(convs):
                    for ci, (c, _dev) in enumerate(conv):
                        d = torch.as_tensor(c[:, a:b], dtype=torch.float32) * sd[None, :]
                        v = ((d @ g) * d).sum(1).double().numpy()
                        corr_var.setdefault((pi, j, s_idx, ci), np.empty((c.shape[0], len(tiles))))[:, t] = v
    table = []
    for j in range(n_slices):
        row = []
        for s_idx, conv in enumerate(convs):
            parts = []
            for pi, p in enumerate(passes):
                st = p[j]
                for ci, (c, dev) in enumerate(conv):
                    mean = np.stack([c[:, a:b] @ st.mean[a:b] for a, b in tiles], 1)
                    noise = np.stack([dev[:, a:b] @ st.sq[a:b] for a, b in tiles], 1)
                    var = np.maximum(corr_var[(pi, j, s_idx, ci)], 0.0) + noise
                    row_var = np.maximum(st.sq - st.mean ** 2, 0.0)
                    var_ind = np.stack([(c[:, a:b] ** 2) @ row_var[a:b] for a, b in tiles], 1) + noise
                    k3 = np.stack([(c[:, a:b] ** 3) @ st.m3[a:b] for a, b in tiles], 1)
                    # third cumulant of the independent-rows sum over the (correlated) total variance
                    skew = np.where(var > 0, k3 / np.maximum(np.maximum(var, var_ind), 1e-12) ** 1.5, 0.0)
                    parts.append((mean, var, skew, np.full_like(var, PARTIAL_SUM_KURTOSIS)))
            row.append(parts)
        table.append(row)
    return table


def skewed_quantiles(z: np.ndarray, skew: np.ndarray) -> np.ndarray:
    """Standardised quantiles at normal scores ``z`` of a distribution with skewness ``skew``:
    the Wilson–Hilferty form of a (shifted, possibly mirrored) gamma, ``(2/γ)[(1 - γ²/36 + γz/6)³ - 1]``,
    bounded below by ``-2/γ``; Gaussian where ``|γ| < 1e-3``."""
    g = skew[:, None]
    safe = np.where(np.abs(g) < 1e-3, 1.0, g)
    base = np.maximum(1.0 - safe ** 2 / 36.0 + safe * z[None, :] / 6.0, 0.0)
    return np.where(np.abs(g) < 1e-3, z[None, :], (2.0 / safe) * (base ** 3 - 1.0))


def partial_sum_mixture(parts: list[tuple[np.ndarray, ...]], r_max: float, n_nodes: int = 81,
                        n_scale_nodes: int = 15) -> PartialSumMixture:
    """Pool per-component distributions ``(mean, variance[, skewness[, excess kurtosis]])`` into a pmf
    on the integer lattice of partial sums (coarser bins when wide).

    A component is ``μ + σ·√W·Y``: ``Y`` standardised with the given skewness
    (:func:`skewed_quantiles` at ``n_nodes`` normal scores on ``[-7, 7]``), ``W`` a unit-mean gamma
    scale with ``Var W = κ/3`` (a Gaussian scale mixture has excess kurtosis ``3·Var W``), at
    ``n_scale_nodes`` quantiles; the points are rounded to the lattice."""
    means = np.concatenate([p[0].ravel() for p in parts])
    sds = np.sqrt(np.maximum(np.concatenate([p[1].ravel() for p in parts]), 0.0))
    skews = np.concatenate([(p[2] if len(p) > 2 else np.zeros_like(p[0])).ravel() for p in parts])
    kurts = np.concatenate([(p[3] if len(p) > 3 else np.zeros_like(p[0])).ravel() for p in parts])
    skews = np.clip(skews, -20.0, 20.0)
    cv2 = np.clip(kurts / 3.0, 0.0, 50.0)                  # Var W
    z = np.linspace(-7.0, 7.0, n_nodes)
    w = np.exp(-0.5 * z ** 2)
    w /= w.sum()
    if np.any(cv2 > 0):
        zw = np.linspace(-4.5, 4.5, n_scale_nodes)
        ww = np.exp(-0.5 * zw ** 2)
        ww /= ww.sum()
        # unit-mean gamma W (shape 1/cv2, skewness 2·sqrt(cv2)) at normal scores zw
        scale = np.maximum(1.0 + np.sqrt(cv2)[:, None] * skewed_quantiles(zw, 2.0 * np.sqrt(cv2)), 0.0)
        scale /= np.maximum(scale @ ww, 1e-12)[:, None]    # E[W] = 1 exactly on the nodes
    else:
        ww, scale = np.ones(1), np.ones((means.size, 1))
    root_scale = np.sqrt(scale)
    widest = sds * root_scale.max(1)
    lo = max(float(np.min(means - 8 * widest * (1 + np.abs(skews)))) - 1, -r_max - 1)
    hi = min(float(np.max(means + 8 * widest * (1 + np.abs(skews)))) + 1, r_max + 1)
    spacing = max(1.0, float(np.ceil((hi - lo) / MAX_LATTICE)))
    start = np.floor(lo / spacing) * spacing
    n_bins = int(np.ceil((hi - start) / spacing)) + 1
    probs = np.zeros(n_bins)
    weights = (ww[:, None] * w[None, :]).ravel()
    chunk = max(1, 2_000_000 // weights.size)
    for a in range(0, means.size, chunk):
        y = skewed_quantiles(z, skews[a:a + chunk])                                   # (n, nodes)
        x = (means[a:a + chunk, None, None] + sds[a:a + chunk, None, None]
             * root_scale[a:a + chunk, :, None] * y[:, None, :])                       # (n, scale, nodes)
        idx = np.clip(np.round((x - start) / spacing).astype(np.int64), 0, n_bins - 1)
        probs += np.bincount(idx.ravel(), weights=np.broadcast_to(weights, (x.shape[0], weights.size)).ravel(),
                             minlength=n_bins)
    grid = start + spacing * np.arange(n_bins)
    probs /= probs.sum()
    keep = probs > 1e-15
    return PartialSumMixture(grid[keep], probs[keep])


def _noise_width(thermal_lsb: float) -> int:
    """Codes summed on each side of the noiseless one under thermal noise: ``⌈6σ_th⌉ + 1``."""
    return int(np.ceil(6 * thermal_lsb)) + 1


def _code_error_exact(t: np.ndarray, lo_code: int, top: int, thermal_lsb: float) -> np.ndarray:
    """``Σ_c P(c | t)·(c - t)²`` in LSB² at input ``t`` (LSB units): the hardware quantizer with thermal noise
    ``N(0, σ_th²)`` — Gaussian CDFs at the thresholds ``c ± 1/2`` (end codes take the tails), over the codes within
    ``6σ_th + 1`` of the noiseless code."""
    from scipy.special import ndtr

    t = np.asarray(t, dtype=np.float64)
    width = _noise_width(thermal_lsb)
    codes = np.clip(np.round(t), lo_code, top)[None, :] + np.arange(-width, width + 1)[:, None]
    valid = (codes >= lo_code) & (codes <= top)
    upper = np.where(codes >= top, np.inf, codes + 0.5)
    lower = np.where(codes <= lo_code, -np.inf, codes - 0.5)
    prob = np.where(valid, ndtr((upper - t) / thermal_lsb) - ndtr((lower - t) / thermal_lsb), 0.0)
    return (prob * (codes - t) ** 2).sum(0)


CODE_ERROR_NODES_PER_LSB = 128
"""Spline nodes per ``min(σ_th, 1)`` LSB of :func:`_code_error_curve`. Measured: within 2e-8 (relative) of the sum over
every code at any point, as the windowed sum is; 4e-11 of the windowed sum averaged over a pmf."""
CODE_ERROR_MAX_NODES = 2 ** 20
"""Most spline nodes of one curve (32 MB of coefficients); beyond (thermal noise below ~0.03 LSB at 8 bits)
:func:`adc_error` sums the codes exactly per value."""
CODE_ERROR_MAX_TERMS = 2 ** 26
"""Most (node, code) terms of one curve's table (thermal noise above ~50 LSB at 8 bits): beyond, the exact sum too."""
_CHUNK_TERMS = 2 ** 21


def _code_error_chunked(t: np.ndarray, lo_code: int, top: int, thermal_lsb: float) -> np.ndarray:
    """:func:`_code_error_exact` over ``t`` in pieces of at most :data:`_CHUNK_TERMS` (value, code) terms."""
    t = np.asarray(t, dtype=np.float64).ravel()
    step = max(1, _CHUNK_TERMS // (2 * _noise_width(thermal_lsb) + 1))
    if t.size <= step:
        return _code_error_exact(t, lo_code, top, thermal_lsb)
    return np.concatenate([_code_error_exact(t[a:a + step], lo_code, top, thermal_lsb)
                           for a in range(0, t.size, step)])


@functools.lru_cache(maxsize=8)
def _code_error_curve(lo_code: int, top: int, thermal_lsb: float):
    """:func:`_code_error_exact` as a function of ``t`` alone (it does not depend on the range: the noise scales
    with the LSB), tabulated once per (codes, σ_th) as a cubic spline over ``[lo - w, top + w]`` (``w = ⌈6σ_th⌉ + 3``);
    beyond, only the end code is reachable and the error is ``(t - end)²``. None where the table would exceed
    :data:`CODE_ERROR_MAX_NODES` or :data:`CODE_ERROR_MAX_TERMS`."""
    from scipy.interpolate import CubicSpline

    pad = _noise_width(thermal_lsb) + 2
    lo, hi = lo_code - pad, top + pad
    n = int(np.ceil((hi - lo) * CODE_ERROR_NODES_PER_LSB / min(thermal_lsb, 1.0))) + 1
    if n > CODE_ERROR_MAX_NODES or n * (2 * _noise_width(thermal_lsb) + 1) > CODE_ERROR_MAX_TERMS:
        return None
    grid = np.linspace(lo, hi, n)
    coef = CubicSpline(grid, _code_error_chunked(grid, lo_code, top, thermal_lsb)).c    # (4, n - 1), uniform knots
    node = (hi - lo) / (n - 1)

    def curve(t: np.ndarray) -> np.ndarray:
        inside = (t >= lo) & (t <= hi)
        out = np.square(t - np.clip(t, lo_code, top))
        ti = t[inside]
        i = np.minimum(((ti - lo) / node).astype(np.int64), n - 2)
        dx = ti - grid[i]
        out[inside] = ((coef[0, i] * dx + coef[1, i]) * dx + coef[2, i]) * dx + coef[3, i]
        return out
    return curve


def adc_error(mix: PartialSumMixture, r: np.ndarray | float, bits: int, signed: bool, thermal_lsb: float
              ) -> np.ndarray:
    """``E[(Q(P + n) - P)²]`` per candidate range ``r`` (partial-sum units²), hardware ADC quantizer.

    Without noise ``Q`` is applied to each support point (round half to even, clip). With thermal
    noise ``n ~ N(0, (σ_th·Δ)²)`` the exact sum over output codes ``Σ_c P(c | P)·(cΔ - P)²`` is used,
    ``P(c | P)`` from Gaussian CDFs at the thresholds ``(c ± 1/2)Δ`` (end codes take the tails),
    over the codes within ``6σ_th + 1`` LSBs of the noiseless code: ``Δ²·h(P/Δ)``, with ``h``
    (:func:`_code_error_curve`) the same for every range, tabulated once."""
    r = np.atleast_1d(np.asarray(r, dtype=np.float64))
    top = 2 ** (bits - 1) - 1 if signed else 2 ** bits - 1
    lo_code = -top if signed else 0
    v = mix.values
    if thermal_lsb <= 0:
        out = np.empty(r.size)
        for i, ri in enumerate(r):
            step = ri / top
            out[i] = ((step * np.clip(np.round(v / step), lo_code, top) - v) ** 2) @ mix.probs
        return out
    if r.size == 0:
        return np.empty(0)
    curve = _code_error_curve(lo_code, top, float(thermal_lsb))
    step = r / top
    if curve is None:  # a table too large for this noise: the exact sum per value and range
        return np.array([st * st * (_code_error_chunked(v / st, lo_code, top, thermal_lsb) @ mix.probs)
                         for st in step])
    chunk = max(1, 2 ** 21 // max(v.size, 1))
    return np.concatenate([st * st * (curve(v[None, :] / st[:, None]) @ mix.probs)
                           for st in (step[a:a + chunk] for a in range(0, step.size, chunk))])


def choose_adc_range(mix: PartialSumMixture, r_max: float, bits: int, signed: bool, thermal_lsb: float,
                     n_grid: int = 96) -> tuple[float, float, float]:
    """``(R, error at R, error at R_max)``: a geometric grid over ``[R_lo, R_max]`` then refinement.

    Partial sums are integers: without thermal noise an LSB ``Δ = R/top`` below one partial-sum
    unit removes no rounding error and only clips more, so ``R_lo = top`` (``Δ = 1``); with thermal
    noise (which scales with ``Δ``) ``R_lo = R_max/4096``."""
    top = 2 ** (bits - 1) - 1 if signed else 2 ** bits - 1
    lo = float(top) if thermal_lsb <= 0 else r_max / 4096
    # integer LSBs (Δ = m partial-sum units) keep lattice points exact: always candidates
    lattice = top * np.arange(1, 65, dtype=np.float64)
    grid = np.unique(np.concatenate([np.geomspace(min(lo, r_max), r_max, n_grid), [r_max],
                                     lattice[(lattice >= lo) & (lattice <= r_max)]]))
    err = adc_error(mix, grid, bits, signed, thermal_lsb)
    i = int(np.argmin(err))
    best, best_err, max_err = float(grid[i]), float(err[i]), float(err[-1])
    # the error is not convex in R on a lattice: refine (twice) around the three best grid points
    for i in np.argsort(err, kind="stable")[:3]:
        lo_b, hi_b = grid[max(i - 1, 0)], grid[min(i + 1, grid.size - 1)]
        for _ in range(2):
            fine = np.linspace(lo_b, hi_b, 33)
            fine_err = adc_error(mix, fine, bits, signed, thermal_lsb)
            j = int(np.argmin(fine_err))
            if fine_err[j] < best_err:
                best, best_err = float(fine[j]), float(fine_err[j])
            lo_b, hi_b = fine[max(j - 1, 0)], fine[min(j + 1, fine.size - 1)]
    if best_err >= max_err:
        best, best_err = float(r_max), max_err
    return best, best_err, max_err


def analytic_adc_calibration(ls: Any, spec: Any, cfg: LayerConfig, signed: bool, x_max: float) -> AdcCalibration:
    """Calibrated ADC ranges of one layer from its probe statistics and its folded weights (``AnalogLayerSpec``)."""
    if cfg.adc_bits is None or cfg.input_bits is None or cfg.weight_bits is None:
        raise CalibrationError(f"layer {ls.name}: ADC calibration needs input_bits, weight_bits and adc_bits")
    wm = spec.weight_matrix.detach().double().numpy() if hasattr(spec, "weight_matrix") else np.asarray(spec)
    if wm.shape[1] != int(ls.fan_in):
        raise CalibrationError(f"layer {ls.name}: weights have {wm.shape[1]} inputs per output but the probes "
                               f"record fan_in {ls.fan_in}; probes and model do not match")
    return calibration_from_mixtures(analytic_mixtures(ls, wm, cfg, signed, x_max),
                                     cfg.adc_max_range(signed, int(ls.fan_in)), cfg, "analytic")


def calibration_from_mixtures(mixtures: dict[tuple[int, int], PartialSumMixture], r_max: np.ndarray,
                              cfg: LayerConfig, method: str) -> AdcCalibration:
    """:func:`choose_adc_range` for every (input slice, weight slice) pmf of ``mixtures``."""
    best, err, err_max = (np.empty_like(r_max) for _ in range(3))
    for (j, s), mix in mixtures.items():
        best[j, s], err[j, s], err_max[j, s] = choose_adc_range(
            mix, float(r_max[j, s]), cfg.adc_bits, cfg.adc_signed, cfg.adc_thermal_noise_lsb)
    return AdcCalibration(best, r_max, err, err_max, method)


_MIXTURE_CACHE: dict[tuple, dict[tuple[int, int], PartialSumMixture]] = {}
_MIXTURE_CACHE_SIZE = 256
"""Layers' pmf sets kept by :func:`cached_mixtures` (each a few pmfs of at most :data:`MAX_LATTICE` points): a dozen
quantization structures of a 21-layer network."""


def cached_mixtures(kind: str, arrays: tuple[np.ndarray, ...], cfg: LayerConfig, signed: bool, x_max: float,
                    compute) -> dict[tuple[int, int], PartialSumMixture]:
    """``compute()`` — the partial-sum pmfs of one layer — kept in memory for the next ADC setting: they do
    not depend on the ADC resolution, range or thermal noise, so the key is ``kind``, the bytes of ``arrays``
    (statistics or input sample, weights) and every other knob (a sweep over ADC bits or thermal noise
    calibrates each point on the same pmfs)."""
    import dataclasses
    import hashlib

    from cimstat.hardware import RangeMode

    knobs = dataclasses.replace(cfg, adc_bits=None, adc_range=RangeMode.MAX, adc_thermal_noise_lsb=0.0,
                                input_range=RangeMode.MAX)
    digests = tuple((a.shape, a.dtype.str, hashlib.sha1(np.ascontiguousarray(a).tobytes()).hexdigest())
                    for a in map(np.asarray, arrays))
    key = (kind, digests, knobs, bool(signed), float(x_max))
    if key in _MIXTURE_CACHE:
        _MIXTURE_CACHE[key] = _MIXTURE_CACHE.pop(key)      # most recently used last
    else:
        if len(_MIXTURE_CACHE) >= _MIXTURE_CACHE_SIZE:
            _MIXTURE_CACHE.pop(next(iter(_MIXTURE_CACHE)))  # the least recently used
        _MIXTURE_CACHE[key] = compute()
    return _MIXTURE_CACHE[key]


def analytic_mixtures(ls: Any, weight_matrix: np.ndarray, cfg: LayerConfig, signed: bool, x_max: float
                      ) -> dict[tuple[int, int], PartialSumMixture]:
    """The modelled partial-sum pmf per (input slice, weight slice) (:func:`factor_partial_sums` pooled by
    :func:`factor_mixture`), kept in memory by :func:`cached_mixtures`."""
    wm = np.ascontiguousarray(weight_matrix, dtype=np.float64)

    def compute():
        r_max = cfg.adc_max_range(signed, int(ls.fan_in))
        table = factor_partial_sums(ls, wm, cfg, signed, x_max)
        return {(j, s): factor_mixture(comp, float(r_max[j, s])) for j, row in enumerate(table)
                for s, comp in enumerate(row)}
    stats = [getattr(ls, a, None) for a in _ANALYTIC_STATISTICS]
    arrays = (*(np.asarray(a) for a in stats if a is not None), wm)
    return cached_mixtures(f"analytic {getattr(ls, 'name', '')}", arrays, cfg, signed, x_max, compute)


_ANALYTIC_STATISTICS = ("row_sq_mean", "row_mean", "hist_edges", "hist_counts", "zero_counts", "total_counts",
                        "m_eigvecs", "m_eigvals", "m_resid_diag", "m_dense")
"""Probe statistics of a layer the analytic pmfs may read: all in :func:`analytic_mixtures`' key (those present)."""


def empirical_mixture(samples: np.ndarray, max_points: int = MAX_LATTICE) -> PartialSumMixture:
    """The empirical distribution of observed partial sums (binned to ``max_points`` if wide)."""
    v = np.asarray(samples, dtype=np.float64).ravel()
    if v.size == 0:
        raise CalibrationError("no partial sums were observed; cannot profile the ADC range")
    values, counts = np.unique(v, return_counts=True)
    if values.size > max_points:
        edges = np.linspace(values[0], values[-1], max_points + 1)
        idx = np.clip(np.searchsorted(edges, values, side="right") - 1, 0, max_points - 1)
        sums = np.bincount(idx, weights=values * counts, minlength=max_points)
        cnt = np.bincount(idx, weights=counts, minlength=max_points)
        keep = cnt > 0
        values, counts = sums[keep] / cnt[keep], cnt[keep]
    return PartialSumMixture(values, counts / counts.sum())


# ---- one-factor conditional model (point masses and co-activation) ---------------------------
FACTOR_NODES = 24
"""Gauss–Hermite nodes over the common factor of a tile."""


def _one_factor_loadings(rho: np.ndarray, iterations: int = 20, power: int = 8) -> np.ndarray:
    """Loadings ``λ`` of the best one-factor fit ``ρ_kl ≈ λ_k λ_l`` (k ≠ l): principal-axis iteration (the
    diagonal replaced by ``λ²``), the leading eigenvector by warm-started power iteration."""
    r = np.array(rho, dtype=np.float64)
    n = r.shape[0]
    v = np.full(n, 1.0 / np.sqrt(n))
    lam = np.zeros(n)
    np.fill_diagonal(r, 1.0)
    for _ in range(iterations):
        for _ in range(power):
            w = r @ v
            norm = np.linalg.norm(w)
            if norm <= 0:
                return np.zeros(n)
            v = w / norm
        lam = v * np.sqrt(max(float(v @ r @ v), 0.0))
        np.fill_diagonal(r, lam ** 2)
    lam = lam if lam.sum() >= 0 else -lam
    return np.clip(lam, -0.995, 0.995)


def _row_code_pmfs(ls: Any, cfg: LayerConfig, signed: bool, x_max: float) -> tuple[np.ndarray, np.ndarray]:
    """``(codes (n,), pmf (K, n))``: each patch row's input-code distribution (its channel's, with the
    non-zero part scaled so ``E[x_k²]`` matches the probed ``row_sq_mean``; the rest at code 0)."""
    codes, pmf = _channel_code_pmf(ls, x_max, cfg.input_bits, signed)
    k_total, c_in = int(ls.fan_in), pmf.shape[0]
    if k_total % c_in:
        raise CalibrationError(f"layer {ls.name}: fan_in {k_total} is not a multiple of its {c_in} histogram "
                               "channels; grouped layers are not supported by ADC calibration")
    row_ch = np.arange(k_total) // (k_total // c_in)
    step = x_max / ((2 ** (cfg.input_bits - 1) - 1) if signed else (2 ** cfg.input_bits - 1))
    q2_ch = pmf @ (codes.astype(np.float64) ** 2)
    row_q2 = np.asarray(ls.row_sq_mean, dtype=np.float64) / step ** 2
    lam = np.clip(np.where(q2_ch[row_ch] > 0, row_q2 / np.where(q2_ch[row_ch] > 0, q2_ch[row_ch], 1.0), 0.0),
                  0.0, 1.0)
    rows = lam[:, None] * pmf[row_ch]
    rows[:, int(np.flatnonzero(codes == 0)[0])] += 1.0 - lam
    return codes, rows


@dataclass
class FactorComponents:
    """Weighted partial-sum components of one (input slice, weight slice), ``n`` of them (per factor node,
    pass, conversion, channel, tile): exact point masses ``point_probs (n, m)`` at ``point_values (n, m)``
    (no active row off its resting value; exactly one) and a continuous rest of probability ``cont_prob``
    with ``mean``, ``var``, ``skew``. Probabilities already include the component's weight."""

    point_values: np.ndarray
    point_probs: np.ndarray
    cont_prob: np.ndarray
    mean: np.ndarray
    var: np.ndarray
    skew: np.ndarray
    kurt: np.ndarray
    """Excess kurtosis of the continuous part (a gamma scale mixture, as in :func:`partial_sum_mixture`)."""


def _jump_masses(ratio: np.ndarray, rest: np.ndarray, levels: np.ndarray, ct: np.ndarray
                 ) -> tuple[np.ndarray, np.ndarray]:
    """``(offsets (D,), mass (nodes, C, D))``: ``Σ_k Σ_l [c_k (l - r_k) = d] ratio[u, k, l]`` per jump ``d``."""
    cvals = [v for v in np.unique(ct) if v != 0]
    reach = int(max([abs(v) for v in cvals], default=0) * (levels.max() - levels.min()))
    offsets = np.arange(-reach, reach + 1)
    mass = np.zeros((ratio.shape[0], ct.shape[0], offsets.size))
    for r in np.unique(rest):
        rows = rest == r
        part = ratio if rows.all() else ratio[:, rows, :]
        cr = ct if rows.all() else ct[:, rows]
        for v in cvals:
            sel = (cr == v).astype(np.float64)                                  # (C, K_r)
            hits = np.tensordot(part, sel, axes=([1], [1]))                    # (nodes, L, C)
            for li, lev in enumerate(levels):
                if lev != r:
                    mass[:, :, int(round(v * (lev - r))) + reach] += hits[:, li, :]
    return offsets, mass


def factor_partial_sums(ls: Any, weight_matrix: np.ndarray, cfg: LayerConfig, signed: bool, x_max: float,
                        n_nodes: int = FACTOR_NODES) -> list[list[FactorComponents]]:
    """Per (input slice j, weight slice s): the partial sums of every (pass, conversion, channel, tile) under a
    one-factor Gaussian copula of the tile's rows, conditioned on the factor at Gauss–Hermite nodes.

    Given the factor ``u`` the rows are independent, each with its own code pmf shifted by its loading
    (``P(code <= i | u) = Φ((Φ^{-1}(F_k(i)) - λ_k u)/sqrt(1-λ_k²))``, ``λ`` the one-factor fit of the
    tile's latent correlation). So per node the partial sum has exact conditional moments, an exact
    point mass ``π0 = Π_k P(σ(v_k) = r_k | u)`` at the value it takes when every active row sits at its
    most likely slice value ``r_k`` (MNIST's constant background, ReLU zeros, empty MSB slices), and
    exact masses ``π0·P(σ(v_k) = l | u)/P(σ(v_k) = r_k | u)`` where exactly one row ``k`` is off it, at
    ``rest + c_k (l - r_k)``. What is left (two or more rows off rest) is a skewed continuous part with
    the remaining moments, rounded to the lattice. Mixing over the factor gives the co-activation tails;
    the residual correlation the single factor misses is added to the continuous part's variance so the
    total variance equals the full copula's (:func:`analytic_partial_sums`). With device noise there is
    no point mass (everything is continuous)."""
    from numpy.polynomial.hermite_e import hermegauss
    from scipy.special import ndtr, ndtri

    codes, rows = _row_code_pmfs(ls, cfg, signed, x_max)
    _, x_transfer = input_pass_pmfs(ls, cfg, signed, x_max)
    convs = weight_conversions(weight_matrix, cfg)
    tiles = _tile_bounds(int(ls.fan_in), cfg)
    nodes, wts = hermegauss(n_nodes)
    wts = wts / wts.sum()
    passes = _pass_values(codes, cfg, signed)
    widths = cfg.input_slices(signed)
    table_var = _copula_variances(ls, weight_matrix, cfg, signed, x_max)
    thr = ndtri(np.clip(np.cumsum(rows, 1), 1e-300, 1.0))            # (K, n), +inf at the top code
    acc: dict[tuple[int, int], list[tuple[np.ndarray, ...]]] = {}
    n_parts = {}
    for t, rho in enumerate(_tile_latent_correlations(ls, tiles, x_transfer)):
        a, b = tiles[t]
        lam = _one_factor_loadings(rho.double().numpy())
        sd_e = np.sqrt(1.0 - lam ** 2)
        ccdf = ndtr((thr[None, a:b, :] - lam[None, :, None] * nodes[:, None, None]) / sd_e[None, :, None])
        ccdf[..., -1] = 1.0
        cpmf = np.diff(ccdf, axis=2, prepend=0.0).clip(0.0, None)     # (nodes, rows, codes)
        for v in passes:
            for j, sl in enumerate(_slices(v, widths)):
                levels = np.unique(sl)
                onehot = (sl[:, None] == levels[None, :]).astype(np.float64)       # (n, L)
                lev_p = cpmf @ onehot                                               # (nodes, rows, L)
                m1, m2, m3 = lev_p @ levels, lev_p @ levels ** 2, lev_p @ levels ** 3
                var_k = np.clip(m2 - m1 ** 2, 0.0, None)
                k3_k = m3 - 3 * m1 * m2 + 2 * m1 ** 3
                rest_idx = np.argmax(rows[a:b] @ onehot, axis=1)
                rest = levels[rest_idx]
                p_rest = np.take_along_axis(lev_p, rest_idx[None, :, None], axis=2)[..., 0]
                log_rest = np.log(np.clip(p_rest, 1e-300, 1.0))
                ratio = lev_p / np.clip(p_rest, 1e-300, None)[..., None]
                for s_idx, conv in enumerate(convs):
                    for c, dev in conv:
                        key = (j, s_idx)
                        true_var = table_var[key][n_parts.get(key, 0)]
                        n_parts[key] = n_parts.get(key, 0) + 1
                        ct = c[:, a:b]
                        mean_u = m1 @ ct.T                                          # (nodes, C)
                        var_u = var_k @ (ct ** 2).T
                        k3_u = k3_k @ (ct ** 3).T
                        model_var = wts @ (mean_u - wts @ mean_u) ** 2 + wts @ var_u
                        resid = np.clip(true_var - model_var, 0.0, None)
                        extra = resid + dev[:, a:b] @ (rows[a:b] @ sl ** 2)
                        rest_val = np.broadcast_to(ct @ rest, mean_u.shape)
                        if dev[:, a:b].max(initial=0.0) > 0:
                            offsets, jumps = np.zeros(1), np.zeros(mean_u.shape + (1,))
                            pi0 = np.zeros_like(mean_u)
                        else:
                            pi0 = np.exp(log_rest @ (ct != 0).astype(np.float64).T)
                            offsets, jumps = _jump_masses(ratio, rest, levels, ct)
                            jumps = jumps * pi0[..., None]
                        pts = np.concatenate([rest_val[..., None], rest_val[..., None] + offsets], axis=-1)
                        pps = np.concatenate([pi0[..., None], jumps], axis=-1)
                        acc.setdefault(key, []).append((wts, pts, pps, mean_u, var_u + extra[None, :], k3_u,
                                                        np.broadcast_to(resid, mean_u.shape)))
    out = []
    for j in range(len(widths)):
        row = []
        for s_idx in range(len(convs)):
            parts = acc[(j, s_idx)]
            width = max(p[1].shape[-1] for p in parts)
            cols = []
            for w, pts, pps, mean, var, k3, resid in parts:
                pad = width - pts.shape[-1]
                pts = np.pad(pts, ((0, 0), (0, 0), (0, pad)), mode="edge")
                pps = np.pad(pps, ((0, 0), (0, 0), (0, pad)))
                cols.append((np.broadcast_to(w[:, None], mean.shape), pts, pps, mean, var, k3, resid))
            w, pts, pps, mean, var, k3, resid = (np.concatenate([c_[i].reshape(-1, *c_[i].shape[2:])
                                                                 for c_ in cols]) for i in range(7))
            e1, e2, e3 = mean, var + mean ** 2, k3 + 3 * mean * var + mean ** 3
            q = np.clip(1.0 - pps.sum(1), 0.0, 1.0)
            safe = np.where(q > 1e-9, q, 1.0)
            ma = (e1 - (pps * pts).sum(1)) / safe
            e2a = (e2 - (pps * pts ** 2).sum(1)) / safe
            e3a = (e3 - (pps * pts ** 3).sum(1)) / safe
            va = np.clip(e2a - ma ** 2, 0.0, None)
            k3a = e3a - 3 * ma * e2a + 2 * ma ** 3
            skew = np.where(va > 1e-9, k3a / np.maximum(va, 1e-9) ** 1.5, 0.0)
            q = np.where(q > 1e-9, q, 0.0)
            total = np.maximum(pps.sum(1) + q, 1e-300)
            pps, q = pps / total[:, None], q / total
            # the residual correlation is heavy-tailed like the moment model's partial sums
            # (PARTIAL_SUM_KURTOSIS); excess kurtosis of the sum by its share of the continuous variance
            share = np.clip(resid / np.maximum(q * va, 1e-12), 0.0, 1.0)
            row.append(FactorComponents(pts, pps * w[:, None], q * w, ma, va, skew,
                                        PARTIAL_SUM_KURTOSIS * share ** 2))
        out.append(row)
    return out


def _copula_variances(ls: Any, weight_matrix: np.ndarray, cfg: LayerConfig, signed: bool, x_max: float
                      ) -> dict[tuple[int, int], list[np.ndarray]]:
    """The full-copula variance (C,) of each (input slice, weight slice), one per (tile, pass, conversion) in
    the order :func:`factor_partial_sums` meets them."""
    table = analytic_partial_sums(ls, weight_matrix, cfg, signed, x_max)
    n_tiles = len(_tile_bounds(int(ls.fan_in), cfg))
    return {(j, s): [parts[p][1][:, t] for t in range(n_tiles) for p in range(len(parts))]
            for j, row in enumerate(table) for s, parts in enumerate(row)}


def factor_mixture(comp: FactorComponents, r_max: float, n_nodes: int = 41, n_scale_nodes: int = 9
                   ) -> PartialSumMixture:
    """Pool :class:`FactorComponents` into a pmf on the integer partial-sum lattice (coarser bins when wide):
    point masses exactly, continuous parts at skewed-Gaussian quantile nodes rounded to the lattice."""
    sd = np.sqrt(comp.var)
    skew = np.clip(comp.skew, -20.0, 20.0)
    live = comp.cont_prob > 1e-15
    used = comp.point_probs > 0
    wide = sd * (1 + np.abs(skew)) * np.sqrt(1.0 + 3.0 * np.sqrt(np.clip(comp.kurt, 0.0, 150.0)))
    lo = min(float(comp.point_values[used].min()) if used.any() else np.inf,
             float(np.min((comp.mean - 8 * wide)[live])) if live.any() else np.inf) - 1
    hi = max(float(comp.point_values[used].max()) if used.any() else -np.inf,
             float(np.max((comp.mean + 8 * wide)[live])) if live.any() else -np.inf) + 1
    lo, hi = max(lo, -r_max - 1), min(hi, r_max + 1)
    spacing = max(1.0, float(np.ceil((hi - lo) / MAX_LATTICE)))
    start = np.floor(lo / spacing) * spacing
    n_bins = int(np.ceil((hi - start) / spacing)) + 1
    probs = np.bincount(np.clip(np.round((comp.point_values[used] - start) / spacing).astype(np.int64), 0,
                                n_bins - 1), weights=comp.point_probs[used], minlength=n_bins).astype(np.float64)
    # (astype: bincount of an empty selection is int64 whatever the weights)
    z = np.linspace(-7.0, 7.0, n_nodes)
    wz = np.exp(-0.5 * z ** 2)
    wz /= wz.sum()
    cv2 = np.clip(comp.kurt / 3.0, 0.0, 50.0)
    zw = np.linspace(-4.5, 4.5, n_scale_nodes)
    ww = np.exp(-0.5 * zw ** 2)
    ww /= ww.sum()
    idx_live = np.flatnonzero(live)
    chunk = max(1, 4_000_000 // (n_nodes * n_scale_nodes))
    for a in range(0, idx_live.size, chunk):
        sel = idx_live[a:a + chunk]
        scale = np.maximum(1.0 + np.sqrt(cv2[sel])[:, None] * skewed_quantiles(zw, 2.0 * np.sqrt(cv2[sel])), 0.0)
        scale /= np.maximum(scale @ ww, 1e-12)[:, None]
        y = skewed_quantiles(z, skew[sel])
        x = comp.mean[sel, None, None] + sd[sel, None, None] * np.sqrt(scale)[:, :, None] * y[:, None, :]
        idx = np.clip(np.round((x - start) / spacing).astype(np.int64), 0, n_bins - 1)
        wt = comp.cont_prob[sel, None, None] * ww[None, :, None] * wz[None, None, :]
        probs += np.bincount(idx.ravel(), weights=np.broadcast_to(wt, x.shape).ravel(), minlength=n_bins)
    grid = start + spacing * np.arange(n_bins)
    probs /= probs.sum()
    keep = probs > 1e-15
    return PartialSumMixture(grid[keep], probs[keep])
