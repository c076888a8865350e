"""ADC rounding + clipping and thermal noise of the partial sums.

One conversion sees ``v = P + d + n``: ``P`` the ideal partial sum (an integer in
partial-sum units), ``d`` the device-noise part (continuous), ``n ~ N(0, σ_n²)`` thermal noise
(``σ_n = σ_th·Δ``). The ADC error of the conversion is ``err = Q(v) - (P + d)`` with
``Q(v) = Δ·clip(round(v/Δ), lo, hi)``. Given the mean ``μ`` and variance of ``P`` (from the
slice statistics and the weight-slice levels) this module returns ``E[err]`` and ``E[err²]``:

* **continuous** (ADC step well above the lattice spacing, or device noise that smooths the
  lattice): ``v ~ N(μ, s²)``; per ADC cell, Gaussian partial moments give
  ``E[(Q(v)-v)²]`` and ``E[(Q(v)-v)(v-μ)]`` exactly; ``E[err²] = E[(Q(v)-v)²] + σ_n² +
  2(σ_n²/s²)·E[(Q(v)-v)(v-μ)]`` (``E[n | v]`` is linear in ``v``). When ``s ≥ 2Δ`` the
  interior rounding is ``Δ²/12`` to within ``e^{-2π²(s/Δ)²}`` and only the clipping tails
  are integrated.
* **lattice** (ADC step ≤ 8 lattice units and no significant device noise): ``P`` is an
  integer; ``g(i) = E_n[err² | P = i]`` is tabulated on the integers with Gaussian CDFs at the
  ADC thresholds (round half to even at exact ties when noise-free) and averaged against the
  discretised Gaussian pmf of ``P``. This is where ``σ² + Δ²/12`` fails by > 10 dB: sub-LSB
  thermal noise is removed by rounding when the ADC step equals the lattice spacing.
"""
from __future__ import annotations

import functools
import math

import numpy as np
from scipy.special import betainc, gammainc, gammaincc, ndtr

from cimstat.hardware import adc_code_limits, adc_step  # the ADC grid is config semantics

__all__ = ["adc_code_limits", "adc_step", "conversion_error", "conversion_errors", "LATTICE_MAX_STEP",
           "fourier_cell_moments", "gaussian_cell_moments", "FOURIER_MIN_SIGMA"]

LATTICE_MAX_STEP = 8.0     #: lattice treatment when Δ ≤ this many partial-sum units
_LATTICE_MAX_DITHER = 0.3  #: ... and device noise std below this (partial-sum units)
_SMOOTH_RATIO = 2.0        #: s ≥ this·Δ: interior rounding error Δ²/12
_WINDOW = 33               #: ADC cells summed per element below that
_INV_SQRT_2PI = 1.0 / math.sqrt(2 * math.pi)


def _pdf(z: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore", invalid="ignore"):
        out = np.exp(-0.5 * z * z) * _INV_SQRT_2PI
    return np.where(np.isfinite(z), out, 0.0)


def _zpdf(z: np.ndarray) -> np.ndarray:
    """z·φ(z), 0 at ±∞."""
    with np.errstate(invalid="ignore"):
        out = z * _pdf(z)
    return np.where(np.isfinite(z), out, 0.0)


def _cell_moments(p: np.ndarray, sigma_w: np.ndarray, first: np.ndarray, n_cells: int, delta: float, lo: int,
                  hi: int):
    """Sums over ADC cells of ``w ~ N(0, σ_w²)`` partial moments for ``v = p + w``.

    ``p, sigma_w (E,)`` (σ_w > 0); the cells summed are the ``n_cells`` consecutive codes from ``first (E,)``,
    all inside ``[lo, hi]`` (code ``lo`` extends to -∞, ``hi`` to +∞). The Gaussian is evaluated once per
    cell edge (``n_cells + 1`` per element). Returns ``E[Q(v)-v]``, ``E[(Q(v)-v)²]``, ``E[(Q(v)-v)·w]``.
    """
    s = sigma_w[:, None]
    edge = (first[:, None] + np.arange(n_cells + 1)[None] - 0.5) * delta
    z = (edge - p[:, None]) / s
    z[:, 0] = np.where(first <= lo, -np.inf, z[:, 0])
    z[:, -1] = np.where(first + n_cells - 1 >= hi, np.inf, z[:, -1])
    cdf, pdf, zpdf = ndtr(z), _pdf(z), _zpdf(z)
    prob = cdf[:, 1:] - cdf[:, :-1]
    ew = s * (pdf[:, :-1] - pdf[:, 1:])
    ew2 = s * s * (prob + zpdf[:, :-1] - zpdf[:, 1:])
    off = (first[:, None] + np.arange(n_cells)[None]) * delta - p[:, None]
    mean = (off * prob - ew).sum(1)
    sq = (off * off * prob - 2 * off * ew + ew2).sum(1)
    cross = (off * ew - ew2).sum(1)
    return mean, sq, cross


def gaussian_cell_moments(p: np.ndarray, s: np.ndarray, delta: float, lo: int, hi: int, n_cells: int | None = None,
                          chunk: int = 2_000_000) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`_cell_moments` of ``v = p + w``, ``w ~ N(0, s²)`` element-wise (``p, s (E,)``, ``s > 0``), summed
    over the ``n_cells`` cells centred on each ``p``'s own code (clipped into ``[lo, hi]``), ``chunk`` cell
    evaluations at a time. Without ``n_cells``: the cells within ±9σ (Gaussian tails below 1e-19), σ grouped
    in octaves so that one wide element does not set the cell count of all."""
    mean, sq, cross = (np.empty(p.shape) for _ in range(3))
    if n_cells is None:
        band = np.ceil(np.log2(s / delta)).astype(np.int64)
        for octave in np.unique(band):
            i = np.flatnonzero(band == octave)
            mean[i], sq[i], cross[i] = gaussian_cell_moments(p[i], s[i], delta, lo, hi,
                                                             2 * math.ceil(9 * float(s[i].max()) / delta) + 3, chunk)
        return mean, sq, cross
    n_cells = int(min(hi - lo + 1, n_cells))
    step = max(1, chunk // n_cells)
    for a in range(0, p.size, step):
        pp, ss = p[a:a + step], s[a:a + step]
        first = np.clip(np.round(pp / delta) - n_cells // 2, lo, max(lo, hi - n_cells + 1))
        mean[a:a + step], sq[a:a + step], cross[a:a + step] = _cell_moments(pp, ss, first, n_cells, delta, lo, hi)
    return mean, sq, cross


FOURIER_MIN_SIGMA = 0.25
"""Smallest noise (in ADC steps) for :func:`fourier_cell_moments`: its series then converges to double precision
within ``_FOURIER_TERMS`` terms (the first term left out, k = 7, weighs ``exp(-2π²k²σ²)`` < 1e-26)."""
_FOURIER_TERMS = 6
_END_WINDOW = 7.5  #: clipped cells summed within ±this many σ of the mean (Gaussian tails below 4e-14)
_CELL_GROUP = 4    #: elements grouped by clipped-cell count rounded up to a multiple of this


def _rounding_moments(mu: np.ndarray, tau: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``E[ρ], E[ρ²], E[ρ·(x-μ)]`` of the unclipped rounding error ``ρ = round(x) - x`` for ``x ~ N(μ, τ²)``
    (ADC steps), from the Fourier series of the sawtooth ``ρ = Σ_k (-1)^k sin(2πkx)/(πk)`` and of
    ``ρ² = 1/12 + Σ_k (-1)^k cos(2πkx)/(π²k²)``: the Gaussian multiplies term ``k`` by ``exp(-2π²k²τ²)``;
    the cross moment is ``τ²·E[ρ'(x)]`` (Stein) with ``ρ' = -1 + Σ_n δ(x - n - ½)``. Term ``k`` from the first
    by ``cos/sin(kθ)`` recurrences and ``damp_k = damp_1^(k²)``: one sin, cos and exp per element."""
    # term k weighs exp(-2π²k²τ²) < 1e-19 once kτ > 1.5: fewer terms for wider noise
    terms = int(min(_FOURIER_TERMS, max(1, math.ceil(1.5 / max(float(tau.min(initial=1.0)), 1e-3)))))
    theta = 2.0 * math.pi * (mu - np.round(mu))  # the series are 1-periodic in μ: keep the angle small
    c1, s1 = np.cos(theta), np.sin(theta)
    d1 = np.exp(-2.0 * math.pi ** 2 * tau * tau)
    ck, sk, damp, step = c1, s1, -d1, d1 * d1   # damp = (-1)^k·d1^(k²); d1^((k+1)²) = d1^(k²)·d1^(2k+1)
    mean, sq, cos_sum = sk * damp / math.pi, 1.0 / 12.0 + ck * damp / math.pi ** 2, ck * damp
    for k in range(2, terms + 1):
        ck, sk = ck * c1 - sk * s1, sk * c1 + ck * s1
        damp = -damp * d1 * step
        step = step * d1 * d1
        mean += sk * damp / (math.pi * k)
        sq += ck * damp / (math.pi * k) ** 2
        cos_sum += ck * damp
    return mean, sq, 2.0 * tau * tau * cos_sum


def _upper_staircase(mu: np.ndarray, tau: np.ndarray, hi: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """What clipping at code ``hi`` adds to :func:`_rounding_moments`: on cell ``j > hi`` (``x`` in
    ``[j-½, j+½)``) the error is ``ρ + c_j`` with ``c_j = hi - j``, so the mean gains ``Σ c_j·P_j``, the square
    ``Σ (2c_j·E[ρ·1_j] + c_j²·P_j)`` and the cross moment ``Σ c_j·E[(x-μ)·1_j]``, over the clipped cells within
    ``±_END_WINDOW·τ`` of ``μ``."""
    mean, sq, cross = (np.zeros(mu.shape) for _ in range(3))
    first = np.maximum(hi + 1, np.floor(mu - _END_WINDOW * tau))
    last = np.ceil(mu + _END_WINDOW * tau)
    n = (last - first + 1).astype(np.int64)
    todo = n > 0
    if not todo.any():
        return mean, sq, cross
    bucket = np.zeros(mu.shape, dtype=np.int64)
    bucket[todo] = -(-n[todo] // _CELL_GROUP)  # groups of equal cell count, up to _CELL_GROUP - 1 padding cells
    for b in np.unique(bucket[todo]):
        i = np.flatnonzero(todo & (bucket == b))
        n_cells = int(b) * _CELL_GROUP
        m, t, j0 = mu[i, None], tau[i, None], first[i, None]
        z = (j0 + np.arange(n_cells + 1)[None] - 0.5 - m) / t
        cdf, pdf = ndtr(z), _pdf(z)
        prob = cdf[:, 1:] - cdf[:, :-1]
        ew = t * (pdf[:, :-1] - pdf[:, 1:])               # E[(x-μ)·1_j]
        j = j0 + np.arange(n_cells)[None]
        c = hi - j
        erho = (j - m) * prob - ew                          # E[ρ·1_j] = E[(j - x)·1_j]
        mean[i] = (c * prob).sum(1)
        sq[i] = (c * (2.0 * erho + c * prob)).sum(1)
        cross[i] = (c * ew).sum(1)
    return mean, sq, cross


def fourier_cell_moments(p: np.ndarray, s: np.ndarray, delta: float, lo: int, hi: int
                         ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The moments of :func:`gaussian_cell_moments` (``E[Q(v)-v]``, ``E[(Q(v)-v)²]``, ``E[(Q(v)-v)·w]`` for
    ``v = p + w``, ``w ~ N(0, s²)``), exactly and without a sum over every cell: with ``x = v/Δ``, the error
    is the rounding sawtooth ``ρ(x)`` (:func:`_rounding_moments`, closed form) plus, beyond either end, the
    staircase ``hi - j`` (``lo - j``) of the clipped cells within 7.5σ (:func:`_upper_staircase`; the lower end by the
    mirror ``x -> -x``, which flips the mean only). Needs ``s >= FOURIER_MIN_SIGMA·Δ``; only elements whose
    Gaussian reaches past an end pay for cells."""
    mu, tau = np.asarray(p, dtype=np.float64) / delta, np.asarray(s, dtype=np.float64) / delta
    mean, sq, cross = _rounding_moments(mu, tau)
    for sign, m, top in ((1.0, mu, hi), (-1.0, -mu, -lo)):
        dm, dq, dc = _upper_staircase(m, tau, top)
        mean += sign * dm
        sq += dq
        cross += dc
    return mean * delta, sq * delta * delta, cross * delta * delta


def _smooth_moments(mu: np.ndarray, s: np.ndarray, delta: float, lo: int, hi: int):
    """``s ≥ 2Δ``: interior rounding Δ²/12 plus exact Gaussian clipping tails."""
    t1, t2 = (lo - 0.5) * delta, (hi + 0.5) * delta
    a, b = (t1 - mu) / s, (t2 - mu) / s
    fa, fb = ndtr(a), ndtr(-b)
    pa, pb = _pdf(a), _pdf(b)
    dl, dh = lo * delta - mu, hi * delta - mu
    inner = np.maximum(1.0 - fa - fb, 0.0)
    sq = delta ** 2 / 12 * inner
    sq = sq + dl * dl * fa + 2 * dl * s * pa + s * s * (fa - a * pa)
    sq = sq + dh * dh * fb - 2 * dh * s * pb + s * s * (b * pb + fb)
    cross = (-dl * s * pa - s * s * (fa - a * pa)) + (dh * s * pb - s * s * (b * pb + fb))
    mean = (dl * fa + s * pa) + (dh * fb - s * pb)
    return mean, sq, cross


def _gamma_shape(mu: np.ndarray, var: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Shape k and scale θ of the Gamma distribution with mean μ > 0 and variance var > 0."""
    mu = np.maximum(mu, 1e-12)
    var = np.maximum(var, 1e-24)
    return mu * mu / var, var / mu


def _beta_shape(mu: np.ndarray, var: np.ndarray, upper: float) -> tuple[np.ndarray, np.ndarray]:
    """Beta(a, b) on ``[0, upper]`` with mean μ and variance var (variance capped to what fits)."""
    m = np.clip(mu / upper, 1e-9, 1 - 1e-9)
    v = np.minimum(np.maximum(var, 1e-24) / upper ** 2, 0.99 * m * (1 - m))
    common = m * (1 - m) / v - 1
    return m * common, (1 - m) * common


def _cdf(x: np.ndarray, mu: np.ndarray, sd: np.ndarray, gamma: bool | float) -> np.ndarray:
    """CDF at ``x (E, B)`` of a Gaussian, a Gamma (``gamma=True``) or a Beta on ``[0, gamma]``
    (``gamma`` a number: the largest possible value) with mean μ and std sd per element."""
    if gamma is not True and gamma:
        a, b = _beta_shape(mu, sd * sd, float(gamma))
        t = np.clip(x / float(gamma), 0.0, 1.0)
        # betainc is exactly 0 at t = 0 and 1 at t = 1: evaluate it only strictly inside
        out = (t >= 1.0).astype(np.float64)
        inside = (t > 0.0) & (t < 1.0)
        rows = np.nonzero(inside)[0]
        out[inside] = betainc(a[rows], b[rows], t[inside])
        return out
    out = ndtr((x - mu[:, None]) / np.maximum(sd, 1e-12)[:, None])
    if gamma:
        k, theta = _gamma_shape(mu, sd * sd)
        skewed = k < 400
        if skewed.any():
            out[skewed] = gammainc(k[skewed, None], np.maximum(x[skewed], 0.0) / theta[skewed, None])
    return out


def _smooth_gamma(mu: np.ndarray, s: np.ndarray, delta: float, lo: int, hi: int):
    """Like :func:`_smooth_moments` for a non-negative (Gamma) ADC input; only the top clips."""
    k, theta = _gamma_shape(mu, s * s)
    t2 = (hi + 0.5) * delta
    z = t2 / theta
    tail0 = gammaincc(k, z)
    tail1 = mu * gammaincc(k + 1, z)                       # E[v; v > t2]
    tail2 = mu * (k + 1) * theta * gammaincc(k + 2, z)     # E[v²; v > t2]
    big = hi * delta
    sq = delta ** 2 / 12 * (1 - tail0) + big * big * tail0 - 2 * big * tail1 + tail2
    mean = big * tail0 - tail1
    cross = big * (tail1 - mu * tail0) - (tail2 - mu * tail1)  # E[(H - v)(v - μ); v > t2]
    return mean, sq, cross


def _smooth_beta(mu: np.ndarray, s: np.ndarray, delta: float, lo: int, hi: int, upper: float):
    """Like :func:`_smooth_gamma` for a Beta on ``[0, upper]`` (bounded non-negative partial sum)."""
    a, b = _beta_shape(mu, s * s, upper)
    t2 = min((hi + 0.5) * delta / upper, 1.0)
    tail0 = 1 - betainc(a, b, t2)
    tail1 = upper * a / (a + b) * (1 - betainc(a + 1, b, t2))
    tail2 = upper ** 2 * a * (a + 1) / ((a + b) * (a + b + 1)) * (1 - betainc(a + 2, b, t2))
    big = hi * delta
    sq = delta ** 2 / 12 * (1 - tail0) + big * big * tail0 - 2 * big * tail1 + tail2
    mean = big * tail0 - tail1
    cross = big * (tail1 - mu * tail0) - (tail2 - mu * tail1)
    return mean, sq, cross


def _table(grid: np.ndarray, delta: float, lo: int, hi: int, sigma_w: float, sigma_n: float, dither: float):
    """``g = E[err²]``, ``gm = E[err]`` at the points of ``grid`` (dither σ_w ⊇ σ_n, see module doc)."""
    g = np.empty_like(grid)
    gm = np.empty_like(grid)
    margin = 9 * sigma_w + delta
    inner = (grid >= lo * delta - margin) & (grid <= hi * delta + margin)
    p = grid[inner]
    if sigma_w <= 0:
        code = np.clip(np.round(p / delta), lo, hi)  # numpy rounds half to even, like the ADC
        err = code * delta - p
        g[inner], gm[inner] = err * err, err
    else:
        mean, sq, cross = gaussian_cell_moments(p, np.full(p.size, sigma_w), delta, lo, hi)
        g[inner], gm[inner] = sq + sigma_n ** 2 + 2 * (sigma_n ** 2 / sigma_w ** 2) * cross, mean
    below, above = grid < lo * delta - margin, grid > hi * delta + margin
    g[below], gm[below] = (lo * delta - grid[below]) ** 2 + dither, lo * delta - grid[below]
    g[above], gm[above] = (hi * delta - grid[above]) ** 2 + dither, hi * delta - grid[above]
    return g, gm


_TABLES: dict[tuple, tuple[int, np.ndarray, np.ndarray]] = {}


def _grid_table(start: int, n: int, h: float, delta: float, lo: int, hi: int, sigma_w: float, sigma_n: float,
                dither: float) -> tuple[np.ndarray, np.ndarray]:
    """:func:`_table` at the points ``h·(i + phase)``, ``i = start .. start+n-1`` (:func:`_phase`), memoised
    per parameter set (the table is pointwise, so a slice of a wider table holds the very same values)."""
    key = (float(h), float(delta), int(lo), int(hi), float(sigma_w), float(sigma_n), float(dither))
    hit = _TABLES.get(key)
    if hit is not None and hit[0] <= start and start + n <= hit[0] + len(hit[1]):
        i = start - hit[0]
        return hit[1][i:i + n], hit[2][i:i + n]
    a, b = start, start + n
    if hit is not None:
        a, b = min(a, hit[0]), max(b, hit[0] + len(hit[1]))
    grid = h * (float(a) + _phase(h) + np.arange(b - a, dtype=np.float64))
    g, gm = _table(grid, delta, lo, hi, sigma_w, sigma_n, dither)
    if len(_TABLES) > 512:
        _TABLES.clear()
    _TABLES[key] = (a, g, gm)
    i = start - a
    return g[i:i + n], gm[i:i + n]


def _grid(mu: np.ndarray, sd: np.ndarray, gamma: bool | float, h: float, delta: float, lo: int, hi: int,
          sigma_w: float) -> tuple[float, int]:
    """Start and size of the grid of :func:`_tabulated`: every element's ``μ ± span·σ`` and the ADC range."""
    span = 12.0 if gamma else 7.5
    margin = 9 * sigma_w + 2 * delta + 2 * h
    g_lo = min(lo * delta - margin, float((mu - span * sd).min()) - 2 * h)
    g_hi = max(hi * delta + margin, float((mu + span * sd).max()) + 2 * h)
    # at h·(i + phase): every call with the same h and ADC shares one memoised table (:func:`_grid_table`)
    phase = _phase(h)
    i_lo, i_hi = math.floor(g_lo / h - phase), math.ceil(g_hi / h - phase)
    return (i_lo + phase) * h, i_hi - i_lo + 1


def _phase(h: float) -> float:
    """Grid points at ``h·(i + phase)``: the integers on the lattice (``h = 1``); else midway between
    multiples of ``h = Δ/16``, so no point falls on an ADC threshold ``(c + ½)Δ`` where g jumps (each
    grid cell then holds a smooth piece of g: midpoint-rule error O(h²))."""
    return 0.0 if h == 1.0 else 0.5


def _bins(mu: np.ndarray, sd: np.ndarray, gamma: bool | float, h: float, g_lo: float, n: int):
    """The CDF mass of every element's bins on the grid ``g_lo + h·i`` (``i < n``): independent of the
    table g, so one set serves every thermal-noise level with the same grid."""
    span = 12.0 if gamma else 7.5
    width = np.maximum(1, np.ceil(sd / (3 * h))).astype(np.int64)
    nb = int(min(np.ceil(span * sd / (width * h)).max() + 1, 40))
    m = np.arange(-nb, nb + 2)
    centre = np.round((mu - g_lo) / h).astype(np.int64)
    edges = np.clip((centre - width // 2)[:, None] + m[None] * width[:, None], 0, n)
    start, end = edges[:, :-1], edges[:, 1:]
    cdf = _cdf(g_lo + (edges - 0.5) * h, mu, sd, gamma)
    mass = np.diff(cdf, axis=1)
    np.maximum(mass, 0.0, out=mass)
    count = np.maximum(end - start, 1)
    total = np.maximum(mass.sum(1), 1e-300)
    return start, end, mass / count, total


def _table_sums(g_lo: float, n: int, h: float, delta: float, lo: int, hi: int, sigma_w: float,
                sigma_n: float, dither: float) -> tuple[np.ndarray, np.ndarray]:
    """Cumulative sums (with a leading 0) of g and gm on the grid of :func:`_grid`."""
    g, gm = _grid_table(int(round(g_lo / h - _phase(h))), n, h, delta, lo, hi, sigma_w, sigma_n, dither)
    cg = np.empty(n + 1)
    cgm = np.empty(n + 1)
    cg[0] = cgm[0] = 0.0
    np.cumsum(g, out=cg[1:])
    np.cumsum(gm, out=cgm[1:])
    return cg, cgm


def _apply_bins(bins, cg: np.ndarray, cgm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    start, end, weight, total = bins
    mean = np.einsum("ij,ij->i", weight, cgm[end] - cgm[start]) / total
    sq = np.einsum("ij,ij->i", weight, cg[end] - cg[start]) / total
    return mean, np.maximum(sq, 0.0)


def _tabulated(mu: np.ndarray, sd: np.ndarray, gamma: bool, h: float, delta: float, lo: int, hi: int,
               sigma_w: float, sigma_n: float, dither: float):
    """``(E[err], E[err²])`` averaging the tabulated g against the distribution's CDF.

    Grid spacing ``h`` (1 on the integer lattice); every element's ``μ ± 12σ`` is
    covered; bins of ``max(1, ⌊σ/(3h)⌋)`` grid points carry CDF mass × the bin mean of g.
    """
    g_lo, n = _grid(mu, sd, gamma, h, delta, lo, hi, sigma_w)
    return _apply_bins(_bins(mu, sd, gamma, h, g_lo, n),
                       *_table_sums(g_lo, n, h, delta, lo, hi, sigma_w, sigma_n, dither))


def _tabulated_many(mu, sd, gamma, h, delta, lo, hi, params, memo: dict):
    """:func:`_tabulated` for several ``(sigma_w, sigma_n, dither)``; the bins (the costly CDFs) are
    computed once per distinct grid (``memo``)."""
    out = []
    for sigma_w, sigma_n, dither in params:
        g_lo, n = _grid(mu, sd, gamma, h, delta, lo, hi, sigma_w)
        bins = memo.get((g_lo, n))
        if bins is None:
            bins = memo[(g_lo, n)] = _bins(mu, sd, gamma, h, g_lo, n)
        out.append(_apply_bins(bins, *_table_sums(g_lo, n, h, delta, lo, hi, sigma_w, sigma_n, dither)))
    return out


def conversion_error(mu: np.ndarray, var_signal: np.ndarray, var_device: np.ndarray, delta: float, lo: int,
                     hi: int, sigma_n: float, *, nonnegative: bool = False,
                     p_zero: np.ndarray | None = None, upper: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(E[err], E[err²])`` of one ADC conversion per element (see the module docstring).

    ``mu``: E[P + d]; ``var_signal``: Var P from the inputs; ``var_device``: Var d;
    ``nonnegative``: P ≥ 0 (unsigned conversions) — modelled as a Gamma instead of a Gaussian;
    ``upper``: the largest possible P of a non-negative conversion (then a Beta on ``[0, upper]``);
    ``p_zero``: probability that every input of the tile is 0 (then ``P = d = 0`` exactly):
    P is that point mass mixed with the conditional distribution of matching moments.
    """
    return conversion_errors(mu, var_signal, var_device, delta, lo, hi, (sigma_n,), nonnegative=nonnegative,
                             p_zero=p_zero, upper=upper)[0]


def conversion_errors(mu: np.ndarray, var_signal: np.ndarray, var_device: np.ndarray, delta: float, lo: int,
                      hi: int, sigma_ns, *, nonnegative: bool = False, p_zero: np.ndarray | None = None,
                      upper: float | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
    """:func:`conversion_error` for several thermal-noise levels ``sigma_ns`` at once (one result
    per level, each the same as its own call): the partial-sum distribution, its bins and CDFs
    (the costly part) are shared between the levels."""
    shape = np.shape(mu)
    mu = np.asarray(mu, dtype=np.float64).ravel()
    if mu.size == 0:
        return [(mu.reshape(shape), mu.reshape(shape)) for _ in sigma_ns]
    vs = np.broadcast_to(np.asarray(var_signal, dtype=np.float64), shape).ravel()
    vd = np.broadcast_to(np.asarray(var_device, dtype=np.float64), shape).ravel()
    pz = np.zeros_like(mu) if p_zero is None else np.clip(np.broadcast_to(p_zero, shape).ravel(), 0.0, 0.999)
    keep = 1.0 - pz
    mu_c = mu / keep
    var_c = np.maximum((vs + mu * mu) / keep - mu_c * mu_c, 0.0)
    vd_c = vd / keep
    gamma: bool | float = nonnegative
    if nonnegative and upper is not None and upper > 0:
        gamma = float(upper)  # bounded: Beta on [0, upper]
    if nonnegative:
        mu_c = np.maximum(mu_c, 0.0)
    means = [np.empty_like(mu) for _ in sigma_ns]
    sqs = [np.empty_like(mu) for _ in sigma_ns]
    memo: dict = {}
    lattice = delta <= LATTICE_MAX_STEP and float(np.sqrt(vd_c.max())) < _LATTICE_MAX_DITHER
    if lattice:
        dither = float(vd_c.mean())
        sigma_ws = [math.sqrt(dither + sigma_n ** 2) for sigma_n in sigma_ns]
        sd = np.sqrt(var_c)
        period = _lattice_period(delta)
        # wide enough to average g over its period (or an incommensurate step): smooth formulas
        table = (sd < max(2.0 * period, 4.0 * delta)) & (sd * 24 <= 400_000)
        if table.any():
            res = _tabulated_many(mu_c[table], sd[table], gamma, 1.0, delta, lo, hi,
                                  [(sw, sn, dither) for sw, sn in zip(sigma_ws, sigma_ns)], memo)
            for i, (m, q) in enumerate(res):
                means[i][table], sqs[i][table] = m, q
        wide = ~table
    else:
        sd = np.sqrt(var_c + vd_c)
        wide = sd >= 4 * delta
        narrow = ~wide
        h = delta / 16
        point = narrow & (sd < 2 * h)   # narrower than the grid: Gaussian cell moments in closed form
        narrow = narrow & ~point
        if point.any():
            for i, sigma_n in enumerate(sigma_ns):
                means[i][point], sqs[i][point] = _narrow_gaussian(mu_c[point], sd[point], delta, lo, hi, sigma_n)
        if narrow.any():
            res = _tabulated_many(mu_c[narrow], sd[narrow], gamma, h, delta, lo, hi,
                                  [(sn, sn, 0.0) for sn in sigma_ns], memo)
            for i, (m, q) in enumerate(res):
                means[i][narrow], sqs[i][narrow] = m, q
    if wide.any():
        mu_w, sd_w = mu_c[wide], sd[wide]
        for i, sigma_n in enumerate(sigma_ns):
            s_tot = np.sqrt(sd_w ** 2 + sigma_n ** 2)
            if gamma is not True and gamma:
                m, q, cross = _smooth_beta(mu_w, s_tot, delta, lo, hi, float(gamma))
            elif gamma:
                m, q, cross = _smooth_gamma(mu_w, s_tot, delta, lo, hi)
            else:
                m, q, cross = _smooth_moments(mu_w, s_tot, delta, lo, hi)
            gain = sigma_n ** 2 / np.maximum(s_tot ** 2, 1e-300)
            q = q + sigma_n ** 2 + 2 * gain * cross
            if lattice:  # interior error: the mean of g over its period instead of Δ²/12 + σ_n²
                g_bar = _interior_mean(delta, lo, hi, sigma_ws[i], sigma_n, dither)
                inner = _inner_probability(mu_w, s_tot, delta, lo, hi, gamma)
                q = q + inner * (g_bar - delta ** 2 / 12 - sigma_n ** 2)
            means[i][wide], sqs[i][wide] = m, np.maximum(q, 0.0)
    out = []
    for mean, sq, sigma_n in zip(means, sqs, sigma_ns):
        if p_zero is not None and np.any(pz > 0):
            m0, s0 = _zero_input_error(delta, lo, hi, sigma_n)
            mean = pz * m0 + keep * mean
            sq = pz * s0 + keep * sq
        out.append((mean.reshape(shape), sq.reshape(shape)))
    return out


@functools.lru_cache(maxsize=256)
def _zero_input_error(delta: float, lo: int, hi: int, sigma_n: float) -> tuple[float, float]:
    """``(E[Q(n)], E[Q(n)²])`` when the ADC input is exactly 0 (only thermal noise)."""
    if sigma_n <= 0:
        return 0.0, 0.0
    mean, sq, cross = gaussian_cell_moments(np.zeros(1), np.full(1, sigma_n), delta, lo, hi)
    return float(mean[0]), float(sq[0] + sigma_n ** 2 + 2 * cross[0])


@functools.lru_cache(maxsize=256)
def _lattice_period(delta: float) -> float:
    """Period (partial-sum units) of the rounding error on the integer lattice: the numerator of
    Δ as a fraction with denominator ≤ 64, or ∞ when Δ is not such a fraction."""
    from fractions import Fraction

    frac = Fraction(delta).limit_denominator(64)
    if abs(float(frac) - delta) <= 1e-9 * delta:
        return float(frac.numerator)
    return math.inf


@functools.lru_cache(maxsize=256)
def _interior_mean(delta: float, lo: int, hi: int, sigma_w: float, sigma_n: float, dither: float) -> float:
    """Mean of g over whole periods of the lattice in the middle of the ADC range."""
    period = _lattice_period(delta)
    length = int(min(period if math.isfinite(period) else 64 * math.ceil(delta), 4096))
    centre = math.floor((lo + hi) / 2 * delta)
    grid = centre - length // 2 + np.arange(length, dtype=np.float64)
    g, _ = _table(grid, delta, lo, hi, sigma_w, sigma_n, dither)
    return float(g.mean())


def _inner_probability(mu: np.ndarray, s: np.ndarray, delta: float, lo: int, hi: int, gamma: bool) -> np.ndarray:
    t = np.stack([np.full_like(mu, (lo - 0.5) * delta), np.full_like(mu, (hi + 0.5) * delta)], 1)
    c = _cdf(t, mu, s, gamma)
    return np.maximum(c[:, 1] - c[:, 0], 0.0)


def _narrow_gaussian(mu: np.ndarray, sd: np.ndarray, delta: float, lo: int, hi: int, sigma_n: float):
    """``(E[err], E[err²])`` for a narrow P ~ N(μ, sd²) (sd < Δ/8) under thermal noise σ_n, in closed form:
    ``v = μ + w`` with ``w ~ N(0, sd² + σ_n²)``, ``err = (Q(v) - v) + n`` and ``E[n | w] = (σ_n²/s_w²)·w``
    give ``E[err²] = E[(Q(v)-v)²] + σ_n² + 2(σ_n²/s_w²)·E[(Q(v)-v)·w]`` (Gaussian cell moments; exact
    for a Gaussian P, where 5-point Gauss–Hermite on the jumps of g was not)."""
    s_w = np.sqrt(sd * sd + sigma_n ** 2)
    mean = np.empty_like(mu)
    sq = np.empty_like(mu)
    zero = s_w <= 1e-12 * delta
    if zero.any():
        err = np.clip(np.round(mu[zero] / delta), lo, hi) * delta - mu[zero]
        mean[zero], sq[zero] = err, err * err
    i = np.flatnonzero(~zero)
    if i.size:
        m, q, cross = gaussian_cell_moments(mu[i], s_w[i], delta, lo, hi)
        mean[i] = m
        sq[i] = q + sigma_n ** 2 + 2 * (sigma_n ** 2 / (s_w[i] * s_w[i])) * cross
    return mean, np.maximum(sq, 0.0)
