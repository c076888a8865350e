"""ADC error of a layer as an exact expectation over its probed input sample.

Where the probes carry a fixed sample of a layer's input vectors (``input_sample``,
:mod:`cimstat.input_sample`; every layer since ``noise_prop.pkl`` schema 5), the
partial sums are not modelled from moments: for each sampled vector ``x_s`` the input codes,
passes and slices are formed as in ``hardware.py`` and every conversion's ideal partial sum
``P = Σ_k s_jk c_k`` over a row tile is computed exactly (integers). Given ``P`` the ADC error
``err = Q(P + d + n) - (P + d)`` is integrated in closed form over the device deviation
``d ~ N(μ_d, σ_d²)`` (``μ_d = Σ_k s_jk E[δ_k]``, ``σ_d² = Σ_k s_jk² Var δ_k``) and the thermal
noise ``n ~ N(0, σ_n²)`` (Gaussian cell probabilities, :func:`cimstat.engine.adc.gaussian_cell_moments`, below
half an LSB of noise; from there the rounding sawtooth in closed form plus the clipped cells,
:func:`cimstat.engine.adc.fourier_cell_moments`), or exactly (``Q(P) - P``, round half to even) when neither is present. Per vector and output
channel the conversions add with their shift-and-add weights ``±2^{o_j + o_l}``: the conditional
means as amplitudes (a background patch's rounding errors of every slice add coherently), the
conditional variances as variances. Over the sample this gives per channel the offset ``E[e]``,
the gain ``a_c = Cov(e, y)/Var(y)`` against the float output ``y = W x`` (ADC clipping shrinks
large outputs the same way on every image: a coherent gain) and the rest.

What moments missed (measured on the default model's conv1, 64 probe images): 57 % of the
7x7x3 MNIST patches are all background, so the positive pass of a split signed input is exactly 0
and the negative pass one fixed value per channel; independent rows give P(every row at rest)
≈ 0, and the moment model over-predicted the ADC error by 0.6-8.2 dB per slice (3.4-4.5 on most).
The only approximations left are the finite sample (8192 vectors for fan-in <= 512, 1024-3640 above; of
the same images the other statistics describe; a weighted part of it where the element budgets
below would be exceeded — the vectors of largest input, whose partial sums clip, whole, and an evenly
strided part of the others (``HEAVY_SHARE``); e.g. about 80 vectors x 512 channels of a 4608-input layer
with 1-bit input slices), float16 storage of the wide layers' vectors, and the Gaussian shape of the device deviation of
one partial sum (a sum over the tile's devices). On the validation sweep's 38 reported configurations
(``docs/validation.md``) the layers' isolated SNRs are within 1.27 dB of the Monte Carlo (median 0.04). The
worst pairs are offset weights under a calibrated ADC, where the clipped tail sets the error; against a
1000-image MC every layer of that configuration is within 0.49 dB (median 0.08):
- layer4.0.downsample.0: +1.27 dB against the report's 256-image MC; +0.31 against the 1000-image MC.
- layer3.0.conv2: -1.07 dB with an evenly strided part of the sample; -0.26 at a 4x budget, and -0.22 at this
  budget with the largest inputs kept whole (``HEAVY_SHARE``).
Distinct code vectors are found by
a 64-bit hash of each vector (checked, exact fallback). The integer partial sums are kept per quantization
structure as distinct values and an index (:func:`_partial_sums`); without device noise the conditional error
is evaluated once per distinct value and gathered.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cimstat.hardware import LayerConfig, SignedInputEncoding
from cimstat.stats import applied_codes

from .adc import _smooth_moments, adc_code_limits, fourier_cell_moments, gaussian_cell_moments

__all__ = ["SampledError", "ChannelCubic", "sampled_adc_error", "budget_rows", "adc_error_map", "sampled_input_error", "sample_codes"]

_CHUNK = 1 << 21  #: elements per vectorised chunk of the noisy conversion integral
EXACT_ELEMENT_BUDGET = 6_000_000
"""Most (distinct code vector x channel x conversion) elements of one noiseless (or thermal ≥ 0.5 LSB,
closed-form) pass; beyond it a part of the sample is used (``HEAVY_SHARE``)."""
NOISY_ELEMENT_BUDGET = 500_000
"""The same where narrow noise needs Gaussian cell integrals (device noise, thermal < 0.5 LSB). Measured on
the default model, design-in4-w4-adc5 (read noise 2 %, 5-bit ADC, thermal 1 LSB): conv1 and the three
downsample convs give the same SNR to 0.01 dB with budgets of 0.5M and 4M."""


@dataclass(frozen=True)
class ChannelCubic:
    """The part of a layer's deterministic ADC error that is nonlinear in its float output ``y``, per channel:
    ``h_c(y) = Σ_k coef[c, k]·u^k``, ``u = (y - center_c)/spread_c`` held within ``[u_lo_c, u_hi_c]`` (the sample's
    range: outside it ``h`` stays at its edge value). Least squares over the input sample on the remainder
    ``r = E[e|x] - a_c y - m_c``, so ``h`` has zero mean and no covariance with ``y`` there: the gain and offset keep
    their meaning. Clipping is its main content: the largest outputs lose more than the linear gain says (default
    model, thermal4-adc6, conv1 in the Monte Carlo: the remainder's energy is 13x its median at the 1.4 % of
    outputs 3 standard deviations up, and a cubic takes 37 % of it). Max pooling picks exactly those outputs."""

    center: np.ndarray   #: (C,) mean of y over the sample (y's units)
    spread: np.ndarray   #: (C,) standard deviation of y over the sample (1 where y is constant)
    coef: np.ndarray     #: (C, 4) coefficients of 1, u, u², u³ (the error's units)
    u_lo: np.ndarray     #: (C,) lowest u of the sample
    u_hi: np.ndarray     #: (C,) highest u of the sample
    energy: np.ndarray   #: (C,) E[h(y)²] over the sample: the part of the remainder's energy h explains

    def scaled(self, factor: np.ndarray | float) -> "ChannelCubic":
        """``factor·h``: the same curve in other units of the error (per channel or one factor)."""
        f = np.broadcast_to(np.asarray(factor, dtype=np.float64), self.center.shape)
        return ChannelCubic(self.center, self.spread, self.coef * f[:, None], self.u_lo, self.u_hi,
                            self.energy * f * f)

    @staticmethod
    def fit(r: np.ndarray, y: np.ndarray, mean) -> "ChannelCubic":
        """Per channel least squares of ``r`` (S, C) on 1, u, u², u³ of ``y`` (S, C), ``mean`` the (weighted) mean
        over the S rows."""
        ey = mean(y)
        sd = np.sqrt(np.maximum(mean(y * y) - ey * ey, 0.0))
        spread = np.where(sd > 0, sd, 1.0)
        u = (y - ey) / spread
        powers = [np.ones_like(u), u]
        for _ in range(5):
            powers.append(powers[-1] * u)
        moments = np.stack([mean(p) for p in powers], axis=1)                          # (C, 7): E[u^k]
        gram = moments[:, np.arange(4)[:, None] + np.arange(4)[None, :]]              # (C, 4, 4): E[u^(i+j)]
        rhs = np.stack([mean(powers[k] * r) for k in range(4)], axis=1)               # (C, 4)
        ridge = 1e-9 * np.trace(gram, axis1=1, axis2=2)[:, None, None] * np.eye(4)
        coef = np.linalg.solve(gram + ridge, rhs[..., None])[..., 0]
        coef[sd <= 0] = 0.0
        energy = np.einsum("ci,cij,cj->c", coef, gram, coef)   # E[h²]
        return ChannelCubic(ey, spread, coef, u.min(0), u.max(0), np.maximum(energy, 0.0))

    def __call__(self, y):
        """``h(y)`` elementwise for ``y`` (N, C, ...), numpy or torch."""
        torch_in = not isinstance(y, np.ndarray)
        shape = (1, -1) + (1,) * (y.ndim - 2)

        def chan(a):
            if torch_in:
                import torch
                return torch.as_tensor(a, dtype=y.dtype).reshape(shape)
            return a.reshape(shape)
        c = [chan(self.coef[:, k]) for k in range(4)]
        if torch_in:  # in place: the mean-field route calls this on whole feature maps
            u = (y - chan(self.center)).div_(chan(self.spread)).clamp_(chan(self.u_lo), chan(self.u_hi))
            return (u * c[3]).add_(c[2]).mul_(u).add_(c[1]).mul_(u).add_(c[0])
        u = np.clip((y - chan(self.center)) / chan(self.spread), chan(self.u_lo), chan(self.u_hi))
        return c[0] + u * (c[1] + u * (c[2] + u * c[3]))


@dataclass(frozen=True)
class SampledError:
    """An error of one layer over the input sample, split per output channel (ADC: code units, × Δx·Δw_c
    for output units; input quantization: output units)."""

    energy: np.ndarray   #: (C_out,) E[e²], e the summed ADC error of an output
    random: np.ndarray   #: (C_out,) E[Var(e | x)]: the part redrawn at every read (thermal and device noise)
    gain: np.ndarray     #: (C_out,) a_c = Cov(E[e|x], y)/Var(y), y = W x (code units per output unit)
    offset: np.ndarray   #: (C_out,) m_c = E[e] - a_c E[y]
    coherent_sq: np.ndarray  #: (C_out,) E[(a y + m)²] of the gain + offset part (code units²)
    #: (C_out,) ``E[(r² + Var(e|x))·G]``: the remainder ``r = E[e|x] - a y - m`` (plus its cross term with the
    #: device bias's remainder, see :func:`_split`) and the per-read part, weighted by the probed gradient
    #: weights ``G`` of the sampled outputs (mean 1; 1 without them): what the white-noise ratio propagates
    #: (:func:`cimstat.input_sample.collect_input_samples_with_gradients`)
    white: np.ndarray
    random_white: np.ndarray  #: (C_out,) ``E[Var(e|x)·G]``: the per-read part of ``white``
    #: the remainder's part that is a cubic in ``y`` (code units; only when asked for: ``curvature=True``): what
    #: the mean-field route applies to the mean
    curvature: ChannelCubic | None = None


def _code_max(cfg: LayerConfig, signed: bool) -> int:
    return 2 ** (cfg.input_bits - 1) - 1 if signed else 2 ** cfg.input_bits - 1


def sample_codes(sample: np.ndarray, cfg: LayerConfig, signed: bool, x_range: float) -> np.ndarray:
    """Integer input codes ``clip(round(x/Δx))`` (round half to even) of the sampled vectors."""
    qmax = _code_max(cfg, signed)
    step = float(x_range) / qmax
    return np.clip(np.round(np.asarray(sample, dtype=np.float64) / step), -qmax if signed else 0, qmax)


def _pass_encodings(cfg: LayerConfig, signed: bool) -> list[tuple[float, str, int]]:
    """``(sign, encoding, polarity)`` of every input pass, as :func:`cimstat.stats.applied_codes` takes them."""
    if signed and cfg.signed_input_encoding is SignedInputEncoding.SPLIT:
        return [(float(pol), "split", pol) for pol in (1, -1)]
    return [(1.0, "offset" if signed else "unsigned", 1)]


def _with_noise(q: np.ndarray, cross: np.ndarray, sw: np.ndarray, vd: np.ndarray, sigma_n: float) -> np.ndarray:
    """``E[err² + 2·d̃·err]`` from ``E[(Q(v) - v)²]`` and ``E[(Q(v) - v)·w]``: ``err = (Q(v) - v) + n`` and
    ``E[n + d̃ | w] = w`` give ``q + σ_n² + 2·((σ_n² + σ_d²)/σ_w²)·cross``."""
    return q + sigma_n ** 2 + 2 * ((sigma_n ** 2 + vd) / (sw * sw)) * cross


def _conditional_error(p: np.ndarray, sigma_d2: np.ndarray | None, delta: float, lo: int, hi: int,
                       sigma_n: float) -> tuple[np.ndarray, np.ndarray]:
    """``(E[err | P], E[err² + 2·d̃·err | P] - E[err | P]²)`` elementwise for ``v = p + d + n`` (``p``
    includes E[d], ``d̃ = d - E[d]``). The ``2·d̃·err`` term is the ADC error's correlation with the device
    deviation it converts, which the device-noise sources count on their own: a coarse ADC absorbs
    small device noise (no threshold crossed: ``err = Q(P) - P - d̃``, so ``d̃ + err`` has no ``d̃`` left and
    the ADC's share is ``-σ_d²``); ``E[d̃·err] = (σ_d²/σ_w²)·E[(Q(v) - v)·w]``, ``w = d̃ + n``. The second
    value may be negative (it is the ADC's part of a sum that is not)."""
    if sigma_d2 is None and sigma_n <= 0:
        code = np.clip(np.round(p / delta), lo, hi)
        return code * delta - p, np.zeros_like(p)
    return _pointwise_error(p, sigma_d2, delta, lo, hi, sigma_n)


def _pointwise_error(p: np.ndarray, sigma_d2: np.ndarray | None, delta: float, lo: int, hi: int,
                     sigma_n: float, absorption: bool = False):
    """:func:`_conditional_error` element by element; with ``absorption`` also ``κ = E[d̃·err] / σ_d²`` (-1 where
    the ADC absorbs the deviation whole, 0 where it passes it on: ``(σ_d²/σ_w²)·E[(Q(v) - v)·w] / σ_d²``)."""
    flat = np.asarray(p, dtype=np.float64).ravel()
    vd = np.zeros_like(flat) if sigma_d2 is None else np.broadcast_to(sigma_d2, p.shape).ravel()
    sw = np.sqrt(vd + sigma_n ** 2)
    mean = np.empty_like(flat)
    sq = np.empty_like(flat)
    kappa = np.full_like(flat, -1.0)
    exact = sw <= 1e-9 * delta
    if exact.any():
        code = np.clip(np.round(flat[exact] / delta), lo, hi)
        mean[exact] = code * delta - flat[exact]
        sq[exact] = mean[exact] ** 2
    # Near a clipping end under noise of 2Δ or more: rounding Δ²/12 plus exact Gaussian clipping tails (within
    # ~1 %; at 0.5Δ it put 0.22 Δ² for P = lo where the cells give 0.163: a 1-bit-slice array with many P = 0 came
    # out 1.4 dB pessimistic). Elsewhere from 0.5Δ up the exact moments: the rounding sawtooth in closed form
    # (Fourier) plus the clipped cells within 7.5σ (fourier_cell_moments; it replaced a sum over every cell
    # within ±9σ: 21 s -> 11 s of one design-in4-w4-adc5 estimate, profiled).
    interior = (flat - 8 * sw > (lo + 0.5) * delta) & (flat + 8 * sw < (hi - 0.5) * delta)
    smooth = ~exact & ~interior & (sw >= 2.0 * delta)
    if smooth.any():
        ss = sw[smooth]
        m, q, cross = _smooth_moments(flat[smooth], ss, delta, lo, hi)
        mean[smooth] = m
        kappa[smooth] = cross / (ss * ss)
        sq[smooth] = _with_noise(q, cross, ss, vd[smooth], sigma_n)
    i = np.flatnonzero(~exact & ~smooth & (sw >= 0.499 * delta))
    if i.size:
        m, q, cross = fourier_cell_moments(flat[i], sw[i], delta, lo, hi)
        mean[i] = m
        kappa[i] = cross / (sw[i] * sw[i])
        sq[i] = _with_noise(q, cross, sw[i], vd[i], sigma_n)
    narrow = ~exact & (sw < 0.499 * delta)
    # no ADC threshold within 6σ: the code is that of P (err = Q(P) - P - d̃: E[err²] = (Q(P)-P)² + σ_d²,
    # E[2·d̃·err] = -2σ_d²)
    c0 = np.clip(np.round(flat / delta), lo, hi)
    dist = np.abs(np.abs(flat / delta - c0) - 0.5) * delta              # to the nearest threshold of the cell
    inner_cell = (c0 > lo) & (c0 < hi)
    edge_dist = np.where(c0 >= hi, flat - (hi - 0.5) * delta, (lo + 0.5) * delta - flat)  # end cells: one threshold
    dist = np.where(inner_cell, dist, np.abs(edge_dist))
    far = narrow & (dist > 6 * sw)
    if far.any():
        mean[far] = c0[far] * delta - flat[far]
        sq[far] = mean[far] ** 2 - vd[far]
    # Gaussian cell probabilities over the cells within 6σ (3 cells cover ±18σ below Δ/12, 7 cells ±7σ below Δ/2)
    for cells, sel in ((3, narrow & ~far & (sw < delta / 12)), (7, narrow & ~far & (sw >= delta / 12))):
        i = np.flatnonzero(sel)
        if i.size:
            m, q, cross = gaussian_cell_moments(flat[i], sw[i], delta, lo, hi, cells, _CHUNK)
            mean[i] = m
            kappa[i] = cross / (sw[i] * sw[i])
            sq[i] = _with_noise(q, cross, sw[i], vd[i], sigma_n)
    out = mean.reshape(p.shape), (sq - mean * mean).reshape(p.shape)
    return out + (kappa.reshape(p.shape),) if absorption else out


def _unique_rows(codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(distinct rows, index of each row's)`` of an integer matrix: rows hashed to one int64 (a random
    linear form, wrapping), distinct hashes found in 1-D, the result checked row by row (an exact
    ``np.unique(axis=0)`` if two different rows ever shared a hash)."""
    form = np.random.default_rng(0x5eed).integers(1, 2 ** 62, size=codes.shape[1], dtype=np.int64) | 1
    with np.errstate(over="ignore"):
        h = codes.astype(np.int64) @ form
    _, first, inverse = np.unique(h, return_index=True, return_inverse=True)
    rows = codes[first]
    if not np.array_equal(rows[inverse], codes):
        rows, inverse = np.unique(codes, axis=0, return_inverse=True)
    return rows, inverse.ravel()


HEAVY_SHARE = 0.25
"""Share of a reduced sample (over the element budget) given to the vectors of largest input code sum
``Σ_k |c_k|``, kept whole (weight 1); the rest of it is an evenly strided part of the other vectors, each
standing for its share of them (weight ``n_other / n_picked``). Large inputs make the large partial sums
that clip: a clipping-dominated error sits in few vectors, which an evenly strided part alone mostly misses
(default model, adc6-cal-offset-weights, layer3.0.conv2 keeps 325 of 3640 vectors). The estimate stays
unbiased; for errors spread evenly over the vectors it costs about 1.3x the variance of an even part.
Measured against an evenly strided part at 4x the budget, every layer's SNR and the fc SNR of six calibrated
bit-serial configurations of the validation sweep (6 bits, 4 bits, 64 and 1152 rows, offset inputs, 1 LSB
thermal): rms difference 0.02-0.13 dB (an even part: 0.03-0.20), max 0.26 dB (0.71); layer3.0.conv2 of
adc6-cal-offset-weights 11.74 dB (even part 10.89, 4x 11.70, Monte Carlo 11.96)."""


def _kept_rows(score: np.ndarray, keep: int) -> tuple[np.ndarray, np.ndarray]:
    """``(rows (sorted), weights)`` of a reduced sample of ``keep < len(score)`` vectors: the
    ``HEAVY_SHARE·keep`` of largest ``score`` whole, an evenly strided part of the others (see ``HEAVY_SHARE``)."""
    n = len(score)
    n_heavy = min(int(keep * HEAVY_SHARE), keep - 1)
    order = np.argsort(score, kind="stable")
    heavy, rest = order[n - n_heavy:], np.sort(order[:n - n_heavy])
    n_pick = keep - n_heavy
    pick = rest[np.linspace(0, len(rest) - 1, n_pick).round().astype(np.int64)]
    rows = np.concatenate([heavy, pick])
    weights = np.concatenate([np.ones(n_heavy), np.full(n_pick, len(rest) / n_pick)])
    in_sample_order = np.argsort(rows)
    return rows[in_sample_order], weights[in_sample_order]


def budget_rows(sample: np.ndarray, c_out: int, cfg: LayerConfig, signed: bool, x_range: float,
                conversions: list) -> tuple[np.ndarray | None, np.ndarray | None]:
    """``(rows, weights)`` of the part of ``sample`` (S, K) that one noiseless pass over every vector, all taken
    distinct, can evaluate within :data:`EXACT_ELEMENT_BUDGET` (:func:`_kept_rows`, scored by the input code
    sum), or ``(None, None)`` where all of it fits. For evaluations of moved copies of one sample: chosen once on
    the sample, the same vectors serve every copy, so differences between copies do not jump with the
    choice."""
    n_conv = _n_conversions(cfg, signed, conversions, sample.shape[1])
    keep = max(1, EXACT_ELEMENT_BUDGET // (c_out * n_conv))
    if keep >= len(sample):
        return None, None
    score = np.abs(sample_codes(sample, cfg, signed, x_range).astype(np.int64)).sum(1)
    return _kept_rows(score, keep)


def _distinct_codes(sample: np.ndarray, cfg: LayerConfig, signed: bool, x_range: float, keep: int | None,
                    cache) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]:
    """``(distinct code vectors (int16), index of each kept vector's, rows of the sample kept, their
    weights)``: the whole sample (rows and weights None), or ``keep`` vectors of it chosen by
    :func:`_kept_rows`. Kept in ``cache`` (they depend on the input knobs only)."""
    key = ("sample_codes", cfg.input_bits, bool(signed), float(x_range))

    def build_all():
        codes, inverse = _unique_rows(sample_codes(sample, cfg, signed, x_range).astype(np.int16))
        return codes, inverse, None, None
    if keep is None:
        return cache(key + (None,), build_all)

    def build_part():
        codes, inverse, _, _ = cache(key + (None,), build_all)
        score = np.abs(codes.astype(np.int64)).sum(1)[inverse]
        rows, weights = _kept_rows(score, keep)
        used, part_inverse = np.unique(inverse[rows], return_inverse=True)
        return codes[used], part_inverse.ravel(), rows, weights
    return cache(key + (keep,), build_part)


def _no_cache(key: tuple, build):
    return build()


def _slices(codes: np.ndarray, cfg: LayerConfig, signed: bool, tiles: list[tuple[int, int]], as_float: bool):
    """Every (pass, input slice, tile) in conversion order: ``(pass sign, slice index, slice offset, tile,
    the slice's codes on the tile as float64 (None when all zero, or when not ``as_float``))``."""
    widths_in = cfg.input_slices(signed)
    offsets_in = np.cumsum((0,) + widths_in[:-1])
    for sign_in, encoding, pol in _pass_encodings(cfg, signed):
        applied = applied_codes(codes, cfg.input_bits, signed, encoding, pol).astype(np.int32) if as_float else None
        for ji, (o_in, w_in) in enumerate(zip(offsets_in, widths_in)):
            s = (applied >> int(o_in)) & (2 ** int(w_in) - 1) if as_float else None  # the slice, integer
            for a, b in tiles:
                st = s[:, a:b] if as_float else None
                yield sign_in, ji, o_in, (a, b), (st.astype(np.float64) if st is not None and st.any() else None)


def _distinct(p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(distinct values (sorted), index (int32, p's shape))`` of an integer array: ``values[index] == p``."""
    first = int(p.min())
    span = int(p.max()) - first + 1
    if span <= 4 * p.size + 4096:  # a table over the span
        if first:
            p = p - first
        present = np.zeros(span, dtype=bool)
        present[p.ravel()] = True
        values = np.flatnonzero(present)
        slot = np.zeros(span, dtype=np.int32)
        slot[values] = np.arange(values.size, dtype=np.int32)
        return values + first, slot[p]
    values, index = np.unique(p, return_inverse=True)
    return values, index.reshape(p.shape).astype(np.int32)


def _partial_sums(codes: np.ndarray, cfg: LayerConfig, signed: bool, conversions: list,
                  tiles: list[tuple[int, int]]) -> list[list[list[tuple[np.ndarray, np.ndarray] | None]]]:
    """The ideal integer partial sums ``P = Σ_k s_jk c_k`` of every conversion as ``(distinct values, index
    (int32, (vectors, C_out)))`` (:func:`_distinct`; None where the slice is all zero on the tile), per (pass,
    input slice, tile) in :func:`_slices` order, then per weight slice and conversion. Config independent beyond
    the quantization structure: kept in the cache, so a sweep over ADC bits, ranges or noise redoes no
    products, and an error that is a function of ``P`` is evaluated once per distinct value."""
    coef_t = [[np.ascontiguousarray(np.asarray(coef, dtype=np.float64).T) for _, coef, _ in conv_list]
              for conv_list in conversions]
    largest = max(float(np.abs(c).max(initial=0)) for per_slice in coef_t for c in per_slice)
    largest *= max(b - a for a, b in tiles) * (2 ** max(cfg.input_slices(signed)) - 1)
    dtype = np.int32 if largest < 2 ** 31 else np.int64
    out = []  # the float products of integers are exact (below 2^53): the cast loses nothing
    for *_, (a, b), st in _slices(codes, cfg, signed, tiles, True):
        out.append([[None if st is None else _distinct((st @ c[a:b]).astype(dtype)) for c in per_slice]
                    for per_slice in coef_t])
    return out


def sampled_adc_error(sample: np.ndarray, weight: np.ndarray, cfg: LayerConfig, signed: bool, x_range: float,
                      adc_table: np.ndarray, conversions: list, noise_terms, sigma_n_lsb: float,
                      cache=None, grad_weight: np.ndarray | None = None, curvature: bool = False,
                      row_weights: np.ndarray | None = None) -> SampledError:
    """ADC error of one layer over its input sample (see the module docstring).

    ``conversions``: per weight slice, ``(sign, coefficient levels (C_out, K), devices)`` as in
    :func:`cimstat.engine.layer._conversions`; ``noise_terms(li, devs)``: ``None`` without device noise,
    else ``(E[δ], Var δ, its programming-error share)`` (each (C_out, K)) of that conversion (signs applied,
    :func:`cimstat.engine.layer._conversion_noise_terms`); ``sigma_n_lsb``:
    ADC thermal noise in LSBs (0 for the quantization-only error); ``cache(key, build)``: where the
    config-independent pieces (distinct code vectors, float outputs of the sample) are kept between calls;
    ``grad_weight``: (S, C_out) the sample's gradient weights (``SampledError.white``), or None; ``curvature``:
    also fit ``SampledError.curvature`` (the mean-field route's; 2-33 % of a linear-route estimate's time, measured
    on four ADC configurations of the default model, so not by default); ``row_weights``: (S,) the weights of
    a sample already reduced by the caller (:func:`budget_rows`), evaluated whole.
    """
    cache = cache or _no_cache
    det, rand, bias, rows, weights = _conditional_errors(sample, weight, cfg, signed, x_range, adc_table,
                                                         conversions, noise_terms, sigma_n_lsb, cache,
                                                         budget=row_weights is None)
    if row_weights is not None:
        weights = row_weights
    y = cache(("sample_outputs",), lambda: np.asarray(sample, dtype=np.float64)
                             @ np.asarray(weight, dtype=np.float64).T)
    gw = None if grad_weight is None else (grad_weight if rows is None else grad_weight[rows])
    return _split(det, rand, y if rows is None else y[rows], weights, gw, bias, curvature)


PRECISE_ELEMENT_BUDGET = 12 * EXACT_ELEMENT_BUDGET
"""Most (distinct code vector x channel x conversion) elements of one layer's :func:`adc_error_map`; beyond it
the layer keeps the sample route (the default model's thermal0.5-lattice, 1-bit weight slices in arrays of 63
rows, took 241 s uncapped)."""


def _n_conversions(cfg: LayerConfig, signed: bool, conversions: list, k: int) -> int:
    """ADC conversions per input vector and output channel (passes x input slices x weight-slice conversions
    x tiles)."""
    return (len(cfg.input_slices(signed)) * (2 if signed and cfg.signed_input_encoding is SignedInputEncoding.SPLIT
                                             else 1) * sum(len(c) for c in conversions) * -(-k // cfg.n_rows(k)))


def adc_error_map(vectors: np.ndarray, weight: np.ndarray, cfg: LayerConfig, signed: bool, x_range: float,
                  adc_table: np.ndarray, conversions: list, sigma_n_lsb: float, cache=None) -> np.ndarray | None:
    """``E[e | x]`` (V, C_out), in partial-sum units, for every one of ``vectors`` (V, K) (no part of them is
    dropped: every output of whole images, for the per-image propagation of
    :class:`cimstat.engine.network.Engine`); no device noise. None where that is more than
    ``PRECISE_ELEMENT_BUDGET`` elements."""
    cache = cache or _no_cache
    codes = _distinct_codes(np.asarray(vectors), cfg, signed, x_range, None, cache)[0]
    n_conv = _n_conversions(cfg, signed, conversions, weight.shape[1])
    if len(codes) * weight.shape[0] * n_conv > PRECISE_ELEMENT_BUDGET:
        return None
    det, _, _, _, _ = _conditional_errors(vectors, weight, cfg, signed, x_range, adc_table, conversions,
                                          lambda li, devs: None, sigma_n_lsb, cache, budget=False)
    return det


def _conditional_errors(sample: np.ndarray, weight: np.ndarray, cfg: LayerConfig, signed: bool, x_range: float,
                        adc_table: np.ndarray, conversions: list, noise_terms, sigma_n_lsb: float, cache,
                        budget: bool):
    """``(E[e | x], Var[e | x], device bias or None, rows kept or None, their weights or None)`` per vector
    (of the part of the sample within the element budget when ``budget``) and channel."""
    cache = cache or _no_cache
    c_out, k = weight.shape
    n_rows = cfg.n_rows(k)
    dev_terms = {(li, devs): noise_terms(li, devs) for li, conv_list in enumerate(conversions)
                 for _, _, devs in conv_list}
    device = any(t is not None for t in dev_terms.values())
    n_conv = _n_conversions(cfg, signed, conversions, k)
    # device noise under less than half an LSB of thermal noise needs Gaussian cell integrals per element:
    # the small budget (without device noise the error is evaluated per distinct partial sum, see _partial_sums)
    limit = NOISY_ELEMENT_BUDGET if device and sigma_n_lsb < 0.499 else EXACT_ELEMENT_BUDGET
    sample = np.asarray(sample)
    # vectors with equal codes convert alike (all-background patches): each distinct code vector once
    codes, inverse, rows, weights = _distinct_codes(sample, cfg, signed, x_range, None, cache)
    if budget and len(codes) * c_out * n_conv > limit:  # a part of the sample (HEAVY_SHARE)
        keep = max(1, int(len(sample) * limit / (len(codes) * c_out * n_conv)))
        if keep < len(sample):
            codes, inverse, rows, weights = _distinct_codes(sample, cfg, signed, x_range, keep, cache)
    n_s = codes.shape[0]
    tiles = [(a, min(a + n_rows, k)) for a in range(0, k, n_rows)]
    widths_in = cfg.input_slices(signed)
    widths_w = cfg.weight_slices()
    offsets_w = np.cumsum((0,) + widths_w[:-1])
    lo, hi = adc_code_limits(cfg.adc_bits, cfg.adc_signed)
    det = np.zeros((n_s, c_out))    # E[e | x] per vector and channel
    rand = np.zeros((n_s, c_out))   # Var[e | x]
    dev_t = {key: None if t is None else tuple(np.ascontiguousarray(part.T) for part in t)
             for key, t in dev_terms.items()}
    sums = cache(("partial_sums", cfg.input_bits, bool(signed), float(x_range),
                  cfg.signed_input_encoding if signed else None, widths_in, cfg.weight_bits, cfg.weight_scale,
                  cfg.weight_encoding, widths_w, cfg.adc_signed, n_rows, len(codes), rows is None or len(rows)),
                 lambda: _partial_sums(codes, cfg, signed, conversions, tiles))
    if not device:
        _add_noiseless(det, rand, sums, codes, cfg, signed, tiles, conversions, adc_table, offsets_w, lo, hi,
                       sigma_n_lsb)
    else:  # device noise: per element (P plus the deviation's mean, its variance)
        bias = np.zeros((n_s, c_out))  # the device deviations' mean, shifted and added like the conversions
        passes = list(zip(_slices(codes, cfg, signed, tiles, device), sums))
        # the programming error is one draw per device for every input pass: with more than one pass, a conversion's
        # ADC error also meets the deviations of the other passes through the same devices (below)
        repeated = len(cfg.input_slices(signed)) * len(_pass_encodings(cfg, signed)) > 1
        shared_devs = {key for key, t in dev_t.items() if repeated and t is not None and np.any(t[2])}
        full = sum(sign * applied_codes(codes, cfg.input_bits, signed, enc, pol).astype(np.float64)
                   for sign, enc, pol in _pass_encodings(cfg, signed)) if shared_devs else None
        for li, conv_list in enumerate(conversions):
            for ci, (sign_pol, _, devs) in enumerate(conv_list):
                dev = dev_t[(li, devs)]
                shared = (li, devs) in shared_devs
                gathered: dict[tuple[int, int], list] = {}  # per tile: (w_i κ_i, s_i) of its passes
                for (sign_in, ji, o_in, (a, b), st), per_conv in passes:
                    delta = float(adc_table[ji, li]) / hi
                    w = sign_in * sign_pol * 2.0 ** (o_in + offsets_w[li])
                    ps = per_conv[li][ci]
                    p = np.zeros((n_s, c_out)) if ps is None else ps[0][ps[1]].astype(np.float64)
                    if st is None:
                        m, v = _conditional_error(p, np.zeros((n_s, c_out)), delta, lo, hi, sigma_n_lsb * delta)
                        det += w * m
                        rand += w * w * v
                        continue
                    mu = st @ dev[0][a:b]
                    p += mu
                    bias += w * mu
                    vd = (st * st) @ dev[1][a:b]
                    m, v, kappa = _pointwise_error(p, vd, delta, lo, hi, sigma_n_lsb * delta, absorption=True)
                    det += w * m
                    rand += w * w * v
                    if shared:
                        # jointly Gaussian deviations, to first order in their covariance C_ii' = Σ_k s_ik s_i'k Var_p,k
                        # (the same devices in passes i and i'): E[err_i·d_i'] = κ_i C_ii', E[err_i·err_i'] = κ_i κ_i' C_ii'.
                        # The pass's own terms are in v; here 2·w_i κ_i Σ_{i'≠i} w_i' C_ii', where Σ_i' w_i' C_ii' =
                        # sign·2^{o_l}·Σ_k s_ik Var_p,k u_k (u the code all passes apply); the products of the ADC
                        # errors of two passes below
                        vp = (st * st) @ dev[2][a:b]
                        cov = sign_pol * 2.0 ** offsets_w[li] * ((st * full[:, a:b]) @ dev[2][a:b])
                        wk = w * kappa
                        rand += 2 * wk * (cov - w * vp)
                        gathered.setdefault((a, b), []).append((wk, st))
                for (a, b), members in gathered.items():  # 2·Σ_{i<i'} w_i κ_i w_i' κ_i' C_ii'
                    for n, (wk, st) in enumerate(members):
                        for wk2, st2 in members[n + 1:]:
                            rand += 2 * wk * wk2 * ((st * st2) @ dev[2][a:b])
    return det[inverse], rand[inverse], (bias[inverse] if device else None), rows, weights


def _add_noiseless(det: np.ndarray, rand: np.ndarray, sums: list, codes: np.ndarray, cfg: LayerConfig,
                   signed: bool, tiles: list, conversions: list, adc_table: np.ndarray, offsets_w: np.ndarray,
                   lo: int, hi: int, sigma_n_lsb: float) -> None:
    """Without device noise the conditional error of a conversion is a function of its integer partial sum
    ``P``: the distinct values of the conversions of each ADC step, in LSBs (``P/Δ``), go through one call of
    :func:`_conditional_error` (the error scales as ``Δ``, its variance as ``Δ²``), then each conversion's part
    is scaled by ``±2^{o_j + o_l}·Δ`` and gathered into ``det`` (and ``rand`` under thermal noise)."""
    parts = []      # per conversion: (its distinct partial sums or None, their index, w·Δ)
    groups: dict[tuple[int, int], list[int]] = {}
    for (sign_in, ji, o_in, _, _), per_conv in zip(_slices(codes, cfg, signed, tiles, False), sums):
        for li, conv_list in enumerate(conversions):
            delta = float(adc_table[ji, li]) / hi
            for ci, (sign_pol, _, _) in enumerate(conv_list):
                ps = per_conv[li][ci]
                groups.setdefault((ji, li), []).append(len(parts))
                parts.append((None if ps is None else ps[0], None if ps is None else ps[1],
                              sign_in * sign_pol * 2.0 ** (o_in + offsets_w[li]) * delta))
    # conversions of one ADC step share most partial sums: each distinct one of a step once (a table over the span)
    position = [None] * len(parts)  # each conversion's values -> rows of the one evaluation below
    lsb, n_rows = [], 0
    for (ji, li), members in groups.items():
        ints = [np.zeros(1, dtype=np.int64) if parts[i][0] is None else parts[i][0] for i in members]
        values, index = _distinct(np.concatenate([np.asarray(v, dtype=np.int64) for v in ints]))
        start = 0
        for i, v in zip(members, ints):
            position[i] = n_rows + index[start:start + v.size]
            start += v.size
        lsb.append(values / (float(adc_table[ji, li]) / hi))
        n_rows += values.size
    m_all, v_all = _conditional_error(np.concatenate(lsb), None, 1.0, lo, hi, sigma_n_lsb)
    # under thermal noise the mean and the variance as one complex number: one gather and add for both
    acc = np.zeros(det.shape, dtype=np.complex128 if sigma_n_lsb > 0 else np.float64)
    gathered = np.empty_like(acc)  # one buffer for every gather (a fresh array each time costs page faults)
    for (_, index, scale), pos in zip(parts, position):
        table = scale * m_all[pos]
        if sigma_n_lsb > 0:
            table = table + 1j * (scale * scale) * v_all[pos]
        if index is None:
            acc += table[0]
        else:
            np.take(table, index, out=gathered)
            acc += gathered
    det += acc.real
    if sigma_n_lsb > 0:
        rand += acc.imag


def sampled_input_error(sample: np.ndarray, weight: np.ndarray, w_eff: np.ndarray, cfg: LayerConfig, signed: bool,
                        x_range: float, grad_weight: np.ndarray | None = None) -> SampledError:
    """Input rounding + clipping error ``(Δx·q - x)·W_eff`` over the sample (output units), split like
    the ADC error (its ``random`` part is 0: the error is a function of the input)."""
    x = np.asarray(sample, dtype=np.float64)
    e = (sample_codes(x, cfg, signed, x_range) * (float(x_range) / _code_max(cfg, signed)) - x) @ np.asarray(w_eff, dtype=np.float64).T
    return _split(e, np.zeros_like(e), x @ np.asarray(weight, dtype=np.float64).T, None, grad_weight)


def _split(det: np.ndarray, rand: np.ndarray, y: np.ndarray, weights: np.ndarray | None = None,
           grad_weight: np.ndarray | None = None, device_bias: np.ndarray | None = None,
           curvature: bool = False) -> SampledError:
    """Per channel: energy, per-read part, and the least-squares gain/offset of ``det`` on ``y`` (means over
    the vectors, weighted by ``weights`` where a reduced sample gives them); the white part weighted by
    ``grad_weight`` (S, C_out) too where given, renormalised to mean 1 over these vectors.

    ``device_bias`` (S, C_out): the mean device deviation ``b`` the conversions saw (the device sources count
    ``E[b²]``). The output error is ``det + b``, so the ADC's share is ``E[det² + 2·det·b]``: the cross term is
    the ADC's nonlinearity acting on the bias (measured on conv1 of the default model, 4-bit calibrated ADC,
    2 LSB thermal noise, 2 % read noise: +18 % of the ADC error; without it the estimate was 0.7 dB optimistic
    on the layer's own input sample). Only its part beyond gain and offset, ``2·E[r·r_b]``, is counted here: the
    product of the two coherent parts is the layer's ``LayerEstimate.interaction`` (with every other cause's).
    The residual part joins the white energy the same way."""
    if weights is None:
        def mean(a: np.ndarray) -> np.ndarray:
            return a.mean(0)
    else:
        p = np.asarray(weights, dtype=np.float64) / float(np.sum(weights))

        def mean(a: np.ndarray) -> np.ndarray:
            return p @ a
    ey = mean(y)
    em = mean(det)
    var_y = mean(y * y) - ey * ey
    cov = mean(det * y) - em * ey
    gain = np.where(var_y > 0, cov / np.where(var_y > 0, var_y, 1.0), 0.0)
    offset = em - gain * ey
    coherent = gain * gain * (var_y + ey * ey) + 2 * gain * offset * ey + offset * offset
    random = mean(rand)
    energy = mean(det * det) + random
    coherent_sq = np.maximum(coherent, 0.0)
    r = det - gain * y - offset
    residual_sq = r * r
    if device_bias is not None:
        b = np.asarray(device_bias, dtype=np.float64)
        eb = mean(b)
        gain_b = np.where(var_y > 0, (mean(b * y) - eb * ey) / np.where(var_y > 0, var_y, 1.0), 0.0)
        r_b = b - gain_b * y - (eb - gain_b * ey)
        energy = energy + 2 * mean(r * r_b)
        residual_sq = residual_sq + 2 * r * r_b
    if grad_weight is None:
        random_white, white = random, mean(residual_sq) + random
    else:
        g = np.asarray(grad_weight, dtype=np.float64)
        norm = mean(g)
        g = g / np.where(norm > 0, norm, 1.0)
        random_white = mean(rand * g)
        white = mean(residual_sq * g) + random_white
    return SampledError(energy=energy, random=random, gain=gain, offset=offset, coherent_sq=coherent_sq,
                        white=white, random_white=random_white,
                        curvature=ChannelCubic.fit(r, y, mean) if curvature else None)
