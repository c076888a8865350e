"""Per-output-channel expected squared error of one analog layer, by source.

A :class:`LayerModel` holds what does not depend on the hardware config (folded weights,
probed statistics, the factored second moment, the row tiling helpers) plus caches keyed by
the parts of a config each quantity depends on, so a sweep that changes one knob recomputes
little. :func:`estimate_layer` combines the sources (assumed independent, errors add):

* weight quantization: ``dW M dWᵀ`` (:mod:`.weight_quantization`);
* input quantization: regression of the input error on x (:mod:`.input_quantization`);
* programming error / read noise: rectified-Gaussian device moments (:mod:`.device_noise`);
* ADC: per (input pass, input slice, weight slice, tile, polarity) conversion, ``E[err]`` and
  ``E[err²]`` from the partial sum's mean and variance (:mod:`.adc`); zero-mean parts add in
  variance with the shift-add weights squared, means add coherently.

Partial-sum variance: slice ``s_j(x_k) = a + β_j x_k + r`` (:class:`cimstat.stats.SliceStats`),
``Var P ≈ ρ·Σ_k β_j² c_k² Var x_k + Σ_k c_k² Var r_k`` where ``ρ = Var(Σ_t c·x)/Σ_t c² Var x`` is
the tile's correlation inflation, computed once per weight config from ``M``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cimstat.errors import EstimationError
from cimstat.hardware import LayerConfig, ResolvedLayer, WeightEncoding
from cimstat.stats import ChannelDistribution

from .adc import adc_code_limits, conversion_error
from .device_noise import DeviceNoise, device_noise
from .coherent import CoherentSplit, split_coherent
from .input_quantization import InputPlan, input_error_terms, input_plan
from .moments import SecondMoment
from .sources import ErrorSource
from .weight_quantization import WeightCodes, device_levels, weight_codes, weight_quantization_error

__all__ = ["LayerModel", "LayerEstimate", "estimate_layer"]

CACHE_WEIGHT_ARRAYS = 48  #: per-layer cache budget, in arrays of the layer's weight size (C_out x K float64): ~4 GB for the default network
_MISSING = object()


def _nbytes(obj: Any, depth: int = 0) -> int:
    """Approximate memory held by a cached value (arrays inside tuples, dicts, dataclasses)."""
    if isinstance(obj, np.ndarray):
        return obj.nbytes if obj.base is None else 0  # views share memory held elsewhere
    if depth > 3:
        return 0
    if isinstance(obj, (tuple, list)):
        return sum(_nbytes(o, depth + 1) for o in obj)
    if isinstance(obj, dict):
        return sum(_nbytes(o, depth + 1) for o in obj.values())
    if hasattr(obj, "__dict__"):
        return sum(_nbytes(o, depth + 1) for o in vars(obj).values())
    return 0


_H_CUT = 3.6  #: rounding correlation h(u) < 1e-30 beyond this u (see LayerModel.rounding_correlation)


@dataclass
class LayerEstimate:
    """Expected squared error per output channel of one layer (output units², per position)."""

    name: str
    error: dict[ErrorSource, np.ndarray]       #: (C_out,) per source
    signal: np.ndarray                         #: (C_out,) E[y_c²] of the float output
    white: dict[ErrorSource, np.ndarray]       #: (C_out,) per-read error variance (propagates by ratio)
    fixed: dict[ErrorSource, np.ndarray]       #: (C_out, K) per-weight error variance (weight units²)
    #: deterministic part per source (:mod:`.coherent`): relative gain a_c and offset m_c (output units)
    gain: dict[ErrorSource, np.ndarray] = field(default_factory=dict)
    offset: dict[ErrorSource, np.ndarray] = field(default_factory=dict)

    @property
    def total(self) -> np.ndarray:
        return sum(self.error.values(), np.zeros_like(self.signal))

    @property
    def snr_db(self) -> float:
        """Isolated SNR: ``10 log10(Σ_c E[y_c²] / Σ_c E[err_c²])``."""
        err = float(self.total.sum())
        return math.inf if err <= 0 else 10 * math.log10(float(self.signal.sum()) / err)


class LayerModel:
    """One analog layer's config-independent data and per-config caches."""

    def __init__(self, stats: Any, weight: np.ndarray):
        w = np.asarray(weight, dtype=np.float64).reshape(stats.out_channels, -1)
        if w.shape[1] != stats.fan_in:
            raise EstimationError(f"layer {stats.name}: weight has fan-in {w.shape[1]} but the probes say "
                                  f"K={stats.fan_in}; the probes were made for another model")
        if getattr(stats, "groups", 1) != 1:
            raise EstimationError(f"layer {stats.name}: grouped convolutions (groups={stats.groups}) cannot be "
                                  "estimated yet")
        self.name = stats.name
        self.stats = stats
        self.weight = w
        self.signal = np.asarray(stats.out_sq_mean, dtype=np.float64)
        kh, kw = stats.kernel_size if stats.kind == "conv" else (1, 1)
        self.channel_of_row = np.repeat(np.arange(stats.fan_in // (kh * kw)), kh * kw)
        self._moment: SecondMoment | None = None
        self._dist: ChannelDistribution | None = None
        self._cache: dict[tuple, Any] = {}
        self._sizes: dict[tuple, int] = {}

    # ---- lazily built, config independent ------------------------------------------
    @property
    def moment(self) -> SecondMoment:
        if self._moment is None:
            self._moment = SecondMoment.from_layer_stats(self.stats)
            self._moment.pin(self.weight)  # its projections are reused by every coherent split
        return self._moment

    @property
    def dist(self) -> ChannelDistribution:
        if self._dist is None:
            self._dist = ChannelDistribution.from_layer_stats(self.stats)
        return self._dist

    def rounding_correlation(self, step: float) -> np.ndarray | None:
        """(K, K) correlation of the rounding residuals of two rows, from the spread of their
        difference: for jointly Gaussian rows the sawtooth's Fourier series gives
        ``h(u) = (6/π²) Σ_n exp(-2π²n²u)/n²`` with ``u = Var(x_k - x_k')/Δx²`` (1 for identical
        rows, → 0 once the rows differ by more than about Δx/2). None when M is compressed."""
        if getattr(self.stats, "m_method", None) != "dense":
            return None

        def spread():  # config independent: Var(x_k - x_k') and the pairs that are identical
            m = np.asarray(self.stats.m_dense, dtype=np.float64)
            d = np.asarray(self.stats.row_sq_mean, dtype=np.float64)
            mu = np.asarray(self.stats.row_mean, dtype=np.float64)
            sp = np.maximum(d[:, None] + d[None, :] - 2 * m - (mu[:, None] - mu[None, :]) ** 2, 0.0)
            same = sp <= 2e-3 * (d[:, None] + d[None, :])  # float32 noise of M
            np.fill_diagonal(same, True)
            return sp, same

        def build():
            sp, same = self.cached(("hspread",), spread)
            u = sp / step ** 2
            # h = (6/π²) Σ_{n=1..8} exp(-2π²n²u)/n², evaluated only where it is not negligible:
            # for u > _H_CUT every term is below exp(-2π²·_H_CUT) < 1e-30 (relative to h = 1)
            live = (u < _H_CUT) & ~same
            h = np.zeros_like(u)
            if live.any():
                ul = u[live]
                n = np.arange(1, 9)[:, None]
                h[live] = (6 / np.pi ** 2) * (np.exp(-2 * np.pi ** 2 * n ** 2 * ul[None]) / n ** 2).sum(0)
            h[same] = 1.0
            return h
        return self.cached(("hcorr", float(step)), build)

    def cached(self, key: tuple, build):
        """The value of ``build()`` kept under ``key``; least recently used entries are dropped
        once the cache holds more than ``CACHE_WEIGHT_ARRAYS`` arrays of the weight's size plus
        four ``K x K`` tables, at least 64 MB (or 256 entries), so a long sweep's memory stays bounded."""
        hit = self._cache.pop(key, _MISSING)
        if hit is _MISSING:
            hit = build()
            self._sizes[key] = _nbytes(hit)
        self._cache[key] = hit  # (re)inserted last: most recently used
        k = self.weight.shape[1]
        budget = max(CACHE_WEIGHT_ARRAYS * self.weight.nbytes + 4 * 8 * k * k, 64 << 20)  # + K x K tables
        held = sum(self._sizes.get(k, 0) for k in self._cache)
        while len(self._cache) > 1 and (len(self._cache) > 256 or held > budget):
            old = next(iter(self._cache))
            del self._cache[old]
            held -= self._sizes.pop(old, 0)
        return hit

    # ---- pieces keyed by the knobs they depend on ------------------------------------
    def weights(self, cfg: LayerConfig) -> WeightCodes:
        return self.cached(("w", cfg.weight_bits, cfg.weight_scale),
                           lambda: weight_codes(self.weight, cfg.weight_bits, cfg.weight_scale))

    def weight_error(self, cfg: LayerConfig) -> np.ndarray:
        return self.cached(("wq_err", cfg.weight_bits, cfg.weight_scale),
                           lambda: weight_quantization_error(self.moment, self.weights(cfg)))

    def levels(self, cfg: LayerConfig) -> list[np.ndarray]:
        return self.cached(("lv", cfg.weight_bits, cfg.weight_scale, cfg.weight_encoding, cfg.weight_slices()),
                           lambda: device_levels(self.weights(cfg).codes, cfg))

    def plan(self, cfg: LayerConfig, signed: bool, x_range: float) -> InputPlan:
        key = ("plan", cfg.input_bits, float(x_range), signed, cfg.signed_input_encoding if signed else None,
               cfg.input_slices(signed))
        return self.cached(key, lambda: input_plan(self.dist, cfg, signed, x_range))

    def noise(self, cfg: LayerConfig) -> DeviceNoise:
        key = ("dn", cfg.weight_bits, cfg.weight_scale, cfg.weight_encoding, cfg.weight_slices(),
               cfg.programming_error, cfg.programming_error_model, cfg.read_noise, cfg.read_noise_model)
        if cfg.weight_bits is None:
            return self.cached(key, lambda: device_noise(self.levels(cfg), cfg))
        return self.cached(key, lambda: device_noise(None, cfg, codes=self.weights(cfg).codes))

    def tiling(self, n_rows: int) -> "_Tiling":
        return self.cached(("tiles", n_rows), lambda: _Tiling(self.channel_of_row, n_rows))


class _Tiling:
    """Rows grouped into (tile, input channel) segments, for fast per-tile sums."""

    def __init__(self, channel_of_row: np.ndarray, n_rows: int):
        k = len(channel_of_row)
        tile = np.arange(k) // n_rows
        new = np.r_[True, (tile[1:] != tile[:-1]) | (channel_of_row[1:] != channel_of_row[:-1])]
        self.seg_start = np.flatnonzero(new)
        self.seg_channel = channel_of_row[self.seg_start]
        seg_tile = tile[self.seg_start]
        self.tile_start = np.flatnonzero(np.r_[True, seg_tile[1:] != seg_tile[:-1]])
        self.n_rows = n_rows
        self.n_tiles = int(tile[-1]) + 1

    def segsum(self, x: np.ndarray) -> np.ndarray:
        """Sum over the rows of each segment: ``(..., K)`` -> ``(..., n_seg)``."""
        return np.add.reduceat(x, self.seg_start, axis=-1)

    def tilesum(self, seg_values: np.ndarray) -> np.ndarray:
        """Sum over the segments of each tile: ``(..., n_seg)`` -> ``(..., n_tiles)``."""
        return np.add.reduceat(seg_values, self.tile_start, axis=-1)


def _conversions(levels: list[np.ndarray], cfg: LayerConfig) -> list[list[tuple[float, np.ndarray, tuple[int, ...]]]]:
    """Per weight slice: the conversions ``(sign, coefficients (C_out, K), devices)``."""
    out = []
    for lv in levels:
        if cfg.weight_encoding is WeightEncoding.OFFSET:
            out.append([(1.0, lv[0], (0,))])
        elif cfg.adc_signed:
            out.append([(1.0, lv[0].astype(np.int16) - lv[1], (0, 1))])
        else:
            out.append([(1.0, lv[0], (0,)), (-1.0, lv[1], (1,))])
    return out


def _adc_error(model: LayerModel, cfg: LayerConfig, ranges, plan: InputPlan, levels: list[np.ndarray],
               noise: DeviceNoise | None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """ADC error per output channel in code units (× ΔxΔw later): the variances of its
    quantization and thermal parts (code units²) and their means (mean over positions and
    images, code units; the means are a constant offset of the channel)."""
    c_out, k = model.weight.shape
    n_rows = cfg.n_rows(k)
    tiling = model.tiling(n_rows)
    widths_w = cfg.weight_slices()
    offsets_w = np.cumsum((0,) + widths_w[:-1])
    signed_adc = cfg.adc_signed
    sigma_th = cfg.adc_thermal_noise_lsb
    convs = _conversions(levels, cfg)
    n_in = len(plan.passes[0].widths)
    if cfg.adc_bits is not None:
        table = np.asarray(ranges.adc_range, dtype=np.float64)
        if table.shape != (n_in, len(widths_w)):
            raise EstimationError(f"layer {model.name}: adc_range has shape {table.shape}, expected "
                                  f"(input slices, weight slices) = {(n_in, len(widths_w))}")
    var_q = np.zeros(c_out)
    var_t = np.zeros(c_out)
    mean_q = np.zeros(c_out)
    mean_t = np.zeros(c_out)
    x_var_rows = model.moment.var
    ch = model.channel_of_row
    for li, (off_w, conv_list) in enumerate(zip(offsets_w, convs)):
        for sign_pol, coef, devs in conv_list:
            coef = coef.astype(np.float64)
            key = ("adcw", cfg.weight_bits, cfg.weight_scale, cfg.weight_encoding, cfg.weight_slices(),
                   cfg.adc_signed, li, devs, n_rows)

            def build(coef=coef):
                a1 = tiling.segsum(coef)
                a2 = tiling.segsum(coef * coef * x_var_rows)
                a3 = tiling.segsum(coef * coef)
                diag = tiling.tilesum(a2)
                full = model.moment.tile_variance(coef, n_rows)
                rho = np.where(diag > 0, full / np.where(diag > 0, diag, 1.0), 1.0)
                return a1, a2, a3, rho
            a1, a2, a3, rho = model.cached(key, build)
            if noise is not None:
                sgn = np.array([1.0, -1.0])[list(devs)] if len(devs) == 2 else np.array([1.0])
                dkey = key + ("dev", cfg.programming_error, cfg.programming_error_model, cfg.read_noise,
                              cfg.read_noise_model)
                lv_dev = levels[li][list(devs)]

                def build_dev(lv_dev=lv_dev, sgn=sgn, li=li):
                    bias_dev = np.tensordot(sgn, noise.slice_bias(lv_dev, li), axes=1)
                    return tiling.segsum(bias_dev), tiling.segsum(noise.slice_var(lv_dev, li).sum(0))
                a4, a5 = model.cached(dkey, build_dev)
            a0 = model.cached(key + ("nz",), lambda: tiling.segsum((coef != 0).astype(np.float64)))
            for p in plan.passes:
                for ji, (off_in, st) in enumerate(zip(p.offsets, p.slices)):
                    es = st.mean[tiling.seg_channel]
                    es2 = st.sq_mean[tiling.seg_channel]
                    b2 = (st.beta ** 2)[tiling.seg_channel]
                    rv = st.resid_var[tiling.seg_channel]
                    mu = tiling.tilesum(a1 * es)
                    var = rho * tiling.tilesum(a2 * b2) + tiling.tilesum(a3 * rv)
                    vdev = np.zeros_like(mu)
                    if noise is not None:
                        mu = mu + tiling.tilesum(a4 * es)
                        vdev = tiling.tilesum(a5 * es2)
                    log_p0 = np.log(np.maximum(st.zero_prob, 1e-300))[tiling.seg_channel]
                    p_zero = np.exp(tiling.tilesum(a0 * log_p0))
                    weight = 2.0 ** (off_in + off_w)
                    sign = p.sign * sign_pol
                    if cfg.adc_bits is None:  # ideal ADC: thermal noise only, σ_th in partial-sum units
                        var_t += weight ** 2 * sigma_th ** 2 * mu.shape[1]
                        continue
                    lo, hi = adc_code_limits(cfg.adc_bits, signed_adc)
                    delta = float(table[ji, li]) / hi
                    upper = n_rows * (2 ** p.widths[ji] - 1) * (2 ** widths_w[li] - 1)  # largest P
                    m0, s0 = conversion_error(mu, var, vdev, delta, lo, hi, 0.0,
                                              nonnegative=not signed_adc, p_zero=p_zero, upper=upper)
                    m0, s0 = m0.reshape(mu.shape), s0.reshape(mu.shape)
                    var_q += weight ** 2 * (s0 - m0 ** 2).sum(1)
                    mean_q += sign * weight * m0.sum(1)
                    if sigma_th > 0:
                        m1, s1 = conversion_error(mu, var, vdev, delta, lo, hi, sigma_th * delta,
                                                  nonnegative=not signed_adc, p_zero=p_zero, upper=upper)
                        m1, s1 = m1.reshape(mu.shape), s1.reshape(mu.shape)
                        var_t += weight ** 2 * (s1 - m1 ** 2).sum(1)
                        mean_t += sign * weight * m1.sum(1)
    if cfg.adc_bits is None:
        return var_q, var_t, mean_q, np.zeros(c_out)
    if sigma_th <= 0:
        return var_q, np.zeros(c_out), mean_q, np.zeros(c_out)
    return var_q, np.maximum(var_t - var_q, 0.0), mean_q, mean_t - mean_q


def _device_terms(model: LayerModel, noise: DeviceNoise, plan: InputPlan, wq: WeightCodes) -> dict:
    """Programming error and read noise of one layer (see :mod:`.device_noise`)."""
    ch = model.channel_of_row
    dx, dw = plan.step, wq.step
    scale2 = (dx * dw) ** 2
    eu2 = plan.applied.sq_mean[ch]
    prog = scale2 * (noise.var_prog @ eu2)
    # Σ_passes Σ_j 4^{o_j} Var_r @ E[s_j²]: the per-row weights summed first, one product
    e_read = np.zeros(model.weight.shape[1])
    for p in plan.passes:
        for off_in, st in zip(p.offsets, p.slices):
            e_read += 4.0 ** off_in * st.sq_mean[ch]
    read = scale2 * (noise.var_read @ e_read)
    b = noise.bias
    bias_const = dw * plan.offset_code * dx * b.sum(1)
    vb = dw[:, None] * b
    sp = split_coherent(model.moment, model.weight, vb, bias_const)
    bias_err = sp.energy
    share = noise.bias_share_prog
    # per-weight variances for propagation; the applied code's energy relative to x's
    x_sq = np.maximum(model.moment.sq_mean, 1e-30)
    energy = np.where(model.moment.sq_mean > 0, dx * dx * eu2 / x_sq, 0.0)
    bias_w = sp.residual ** 2 * energy  # the bias beyond its per-channel gain and offset
    return {"err_prog": prog + share * bias_err, "err_read": read + (1 - share) * bias_err, "read": read,
            "fixed_prog": (dw[:, None] ** 2) * noise.var_prog * energy + share * bias_w,
            "fixed_read": (1 - share) * bias_w,
            "gain_prog": share * sp.gain, "off_prog": share * sp.offset,
            "gain_read": (1 - share) * sp.gain, "off_read": (1 - share) * sp.offset}


def estimate_layer(model: LayerModel, resolved: ResolvedLayer) -> LayerEstimate:
    """Expected squared error per output channel of one layer, by source."""
    cfg, ranges = resolved.config, resolved.ranges
    c_out, k = model.weight.shape
    zeros = np.zeros(c_out)
    error = {s: zeros.copy() for s in ErrorSource}
    white = {s: zeros.copy() for s in ErrorSource}
    fixed: dict[ErrorSource, np.ndarray] = {}
    gain: dict[ErrorSource, np.ndarray] = {}
    offset: dict[ErrorSource, np.ndarray] = {}
    has_noise = cfg.programming_error > 0 or cfg.read_noise > 0
    if cfg.input_bits is None and has_noise:
        raise EstimationError(f"layer {model.name}: programming_error/read_noise with input_bits=None (float inputs) "
                              "has no integer partial sum to perturb; quantize the inputs or set the noise to 0")
    ch = model.channel_of_row

    # weights
    if cfg.weight_bits is not None:
        wq = model.weights(cfg)
        w_eff = wq.dequantized
        error[ErrorSource.WEIGHT_QUANTIZATION] = model.weight_error(cfg)
        # rounding errors have no systematic gain: their per-channel projection on W is as
        # random as the rest (splitting it off measured 2 dB worse at the logits), so all of dW
        # goes by the per-weight sensitivities
        fixed[ErrorSource.WEIGHT_QUANTIZATION] = model.cached(("wq_err2", cfg.weight_bits, cfg.weight_scale),
                                                               lambda: wq.error ** 2)
    else:
        wq, w_eff = None, model.weight

    # inputs
    plan = None
    if cfg.input_bits is not None:
        if ranges.input_range is None or not ranges.input_range > 0:
            raise EstimationError(f"layer {model.name}: input_range must be resolved to a positive number "
                                  f"(got {ranges.input_range!r})")
        plan = model.plan(cfg, bool(ranges.signed_input), float(ranges.input_range))
        key = ("iq", cfg.input_bits, float(ranges.input_range), bool(ranges.signed_input),
               cfg.weight_bits, cfg.weight_scale)

        def build_iq():
            corr = model.rounding_correlation(plan.step)
            v, k_, resid = input_error_terms(plan, w_eff, ch, model.dist, corr)
            sp = split_coherent(model.moment, model.weight, v, k_)
            total = sp.energy + resid
            return total, resid, sp, sp.residual ** 2
        e, resid, sp, res2 = model.cached(key, build_iq)
        error[ErrorSource.INPUT_QUANTIZATION] = e
        white[ErrorSource.INPUT_QUANTIZATION] = resid
        gain[ErrorSource.INPUT_QUANTIZATION], offset[ErrorSource.INPUT_QUANTIZATION] = sp.gain, sp.offset
        fixed[ErrorSource.INPUT_QUANTIZATION] = res2

    # devices
    noise = None
    if has_noise:
        noise = model.noise(cfg)
        key = ("dev", cfg.weight_bits, cfg.weight_scale, cfg.weight_encoding, cfg.weight_slices(),
               cfg.programming_error, cfg.programming_error_model, cfg.read_noise, cfg.read_noise_model,
               cfg.input_bits, float(ranges.input_range), bool(ranges.signed_input),
               cfg.signed_input_encoding if ranges.signed_input else None, cfg.input_slices(bool(ranges.signed_input)))
        dev = model.cached(key, lambda: _device_terms(model, noise, plan, wq))
        error[ErrorSource.PROGRAMMING_ERROR] = dev["err_prog"]
        error[ErrorSource.READ_NOISE] = dev["err_read"]
        white[ErrorSource.READ_NOISE] = dev["read"]
        fixed[ErrorSource.PROGRAMMING_ERROR] = dev["fixed_prog"]
        fixed[ErrorSource.READ_NOISE] = dev["fixed_read"]
        gain[ErrorSource.PROGRAMMING_ERROR], offset[ErrorSource.PROGRAMMING_ERROR] = dev["gain_prog"], dev["off_prog"]
        gain[ErrorSource.READ_NOISE], offset[ErrorSource.READ_NOISE] = dev["gain_read"], dev["off_read"]

    # ADC
    if cfg.adc_bits is not None or cfg.adc_thermal_noise_lsb > 0:
        if plan is None or wq is None:
            raise EstimationError(f"layer {model.name}: adc_bits/adc_thermal_noise_lsb need quantized inputs "
                                  "and weights")
        var_q, var_t, mean_q, mean_t = _adc_error(model, cfg, ranges, plan, model.levels(cfg), noise)
        scale = plan.step * wq.step
        error[ErrorSource.ADC_QUANTIZATION] = scale ** 2 * (var_q + mean_q ** 2)
        error[ErrorSource.ADC_THERMAL_NOISE] = scale ** 2 * np.maximum(
            var_t + (mean_q + mean_t) ** 2 - mean_q ** 2, 0.0)
        white[ErrorSource.ADC_QUANTIZATION] = scale ** 2 * var_q
        white[ErrorSource.ADC_THERMAL_NOISE] = scale ** 2 * var_t
        offset[ErrorSource.ADC_QUANTIZATION] = scale * mean_q
        offset[ErrorSource.ADC_THERMAL_NOISE] = scale * mean_t
    return LayerEstimate(name=model.name, error=error, signal=model.signal, white=white, fixed=fixed,
                         gain=gain, offset=offset)
