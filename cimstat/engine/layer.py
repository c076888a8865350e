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
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from cimstat.errors import EstimationError
from cimstat.hardware import LayerConfig, RangeMode, ResolvedLayer, WeightEncoding
from cimstat.stats import ChannelDistribution

from .adc import adc_code_limits, conversion_error, conversion_errors
from .device_noise import DeviceNoise, device_noise
from .coherent import coherent_energy, coherent_parts, split_coherent
from .input_quantization import InputPlan, input_error_terms, input_plan
from .meanfield import rectified_gaussian_for
from .moments import SecondMoment
from .sampled_adc import ChannelCubic, SampledError, adc_error_map, budget_rows, sampled_adc_error, sampled_input_error
from .sources import ErrorSource
from .weight_quantization import WeightCodes, device_levels, weight_codes, weight_quantization_error

__all__ = ["LayerModel", "LayerEstimate", "estimate_layer", "adc_clipping_shift", "clipping_shift_applies", "adc_curvature", "padding_taps", "CacheBudget", "ENGINE_CACHE_BYTES"]

CACHE_WEIGHT_ARRAYS = 48  #: per-layer cache budget, in arrays of the layer's weight size (C_out x K float64)
ENGINE_CACHE_BYTES = 2 << 30
"""Default byte budget of an engine's layer caches together (:class:`CacheBudget`). The per-layer budgets alone
add up to 7.7 GB for the default network: an estimate-only sweep of the 39 validation configurations reached
6.8 GB of cached arrays (9 GB resident), and one of two validation workers (engine and Monte Carlo, 13 GB each) was
killed for memory on a 24 GB machine. One configuration adds 0.3-0.6 GB to the caches, so 2 GB keeps a few
quantization structures warm."""
_MISSING = object()


class CacheBudget:
    """One least-recently-used byte budget shared by the caches of several :class:`LayerModel` s: the entry used
    longest ago, in whichever layer, is dropped first once they hold more than ``max_bytes`` together."""

    def __init__(self, max_bytes: int = ENGINE_CACHE_BYTES):
        if max_bytes < 0:
            raise ValueError(f"cache budget max_bytes={max_bytes} must be >= 0")
        self.max_bytes = int(max_bytes)
        self.held = 0  #: bytes held by the entries it tracks
        self._order: dict[tuple[int, tuple], tuple[Any, int]] = {}  # insertion order = least recently used first

    def touch(self, layer: "LayerModel", key: tuple, size: int) -> None:
        """``layer``'s entry ``key`` (of ``size`` bytes) was just used; evict others beyond the budget."""
        slot = (id(layer), key)
        old = self._order.pop(slot, None)
        if old is not None:
            self.held -= old[1]
        self._order[slot] = (layer, size)
        self.held += size
        while self.held > self.max_bytes and len(self._order) > 1:
            victim = next(iter(self._order))
            owner, victim_size = self._order.pop(victim)
            self.held -= victim_size
            owner._cache.pop(victim[1], None)
            owner._sizes.pop(victim[1], None)

    def forget(self, layer: "LayerModel", key: tuple) -> None:
        """``layer`` dropped its entry ``key`` itself."""
        old = self._order.pop((id(layer), key), None)
        if old is not None:
            self.held -= old[1]


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


COHERENT_GROUPS = ((ErrorSource.INPUT_QUANTIZATION,), (ErrorSource.WEIGHT_QUANTIZATION,),
                   (ErrorSource.PROGRAMMING_ERROR, ErrorSource.READ_NOISE),
                   (ErrorSource.ADC_QUANTIZATION, ErrorSource.ADC_THERMAL_NOISE))
"""The causes whose deterministic parts :attr:`LayerEstimate.interaction` combines: sources in one group share one
deterministic error (the devices' clipping bias is split between programming error and read noise by energy; the
ADC thermal noise's offset term already holds its product with the rounding's)."""


@dataclass
class LayerEstimate:
    """Expected squared error per output channel of one layer (output units², per position)."""

    name: str
    error: dict[ErrorSource, np.ndarray]       #: (C_out,) per source
    signal: np.ndarray                         #: (C_out,) E[y_c²] of the float output
    white: dict[ErrorSource, np.ndarray]       #: (C_out,) per-read error variance (propagates by ratio)
    fixed: dict[ErrorSource, np.ndarray]       #: (C_out, K) per-weight error variance (weight units²)
    #: (C_out,) fixed errors already contracted with the per-weight sensitivities, ``Σ_k var_ck·S_ck``
    #: (logit units²; device noise, from per-code histograms; needs ``LayerModel.weight_sens``)
    fixed_channel: dict[ErrorSource, np.ndarray] = field(default_factory=dict)
    #: deterministic part per source (:mod:`.coherent`): relative gain a_c and offset m_c (output units)
    gain: dict[ErrorSource, np.ndarray] = field(default_factory=dict)
    offset: dict[ErrorSource, np.ndarray] = field(default_factory=dict)
    #: fixed weight errors the engine propagates exactly per image (``LayerModel.exact_weight_shift``): per
    #: source, the (C_out, K) error map (weight units)
    weight_maps: dict[ErrorSource, np.ndarray] = field(default_factory=dict)
    #: the precise ADC route (``LayerModel.adc_image_vectors``): the deterministic ADC quantization error of every
    #: output of the noise-propagation images, (N·P, C_out) image-major, output units; None on the default route
    adc_map: np.ndarray | None = None
    #: (C_out,) ``E[(W_c·x)²]`` and ``E[W_c·x]`` (the float output without its bias): the moments the gains and
    #: offsets above are fitted on, which :attr:`interaction` needs; None leaves the sources' errors uncombined
    output_moments: tuple[np.ndarray, np.ndarray] | None = None

    @property
    def interaction(self) -> np.ndarray:
        """(C_out,) what the deterministic parts ``d_g = a_g·y + m_g`` of different causes add when they meet on one
        chip: ``E[(Σ_g d_g)²] - Σ_g E[d_g²] = Σ_{g≠h} (a_g a_h E[y²] + 2 a_g m_h E[y] + m_g m_h)``, each cause's
        :attr:`error` holding only its own square. The causes (:data:`COHERENT_GROUPS`): the input rounding, the
        devices' clipping bias (split between programming error and read noise by energy, so counted once), the
        ADC (its thermal part's offset already carries its cross term with the rounding's). It can be negative: on
        conv1 with offset-encoded inputs and 3 % programming error (u2 of ``sweeps/stress.py``) the devices' offset
        cancels part of the input rounding's and of the ADC's."""
        zeros = np.zeros_like(self.signal)
        if self.output_moments is None:
            return zeros
        ey2, ey = self.output_moments
        parts = []
        for group in COHERENT_GROUPS:
            a = sum((self.gain[s] for s in group if s in self.gain), zeros)
            m = sum((self.offset[s] for s in group if s in self.offset), zeros)
            if np.any(a) or np.any(m):
                parts.append((a, m))
        if len(parts) < 2:
            return zeros
        a_sum, m_sum = sum((a for a, _ in parts), zeros), sum((m for _, m in parts), zeros)
        apart = sum((coherent_energy(a, m, ey2, ey) for a, m in parts), zeros)
        return coherent_energy(a_sum, m_sum, ey2, ey) - apart

    @property
    def total(self) -> np.ndarray:
        """(C_out,) expected squared error with every source present: the sources' errors plus :attr:`interaction`."""
        return np.maximum(sum(self.error.values(), np.zeros_like(self.signal)) + self.interaction, 0.0)

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
        #: a budget shared with other layers (the engine's), or None: this layer's own budget only
        self.budget: CacheBudget | None = None
        #: (S, K) probed input vectors (``noise_prop.pkl`` ``input_sample``) or None: with it the ADC
        #: error is an expectation over the sample (:mod:`.sampled_adc`) instead of the moment model
        self.input_sample: np.ndarray | None = None
        #: (S, C_out) gradient weights of the sampled outputs (``noise_prop.pkl`` ``sample_grad_weight``) or None:
        #: the white errors are weighted by them (:func:`cimstat.input_sample.collect_input_samples_with_gradients`)
        self.input_grad_weight: np.ndarray | None = None
        #: (C_out, K) per-weight sensitivities ``S_ck`` of the logits (``noise_prop.pkl`` ``weight_sens``) or
        #: None: with them the device-noise fixed errors are returned contracted (``LayerEstimate.fixed_channel``)
        self.weight_sens: np.ndarray | None = None
        #: True where the engine can propagate a fixed weight error of this layer exactly per image (probed
        #: ``weight_grad`` or ``out_grad``): weight rounding then goes as ``weight_maps``
        self.exact_weight_shift = False
        #: (N·P, K) input vectors of every output of the noise-propagation images, set by the engine for its
        #: precise ADC route (:data:`cimstat.engine.network.ADC_PER_IMAGE_NOTE`), else None
        self.adc_image_vectors: np.ndarray | None = None

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
        four ``K x K`` tables, at least 64 MB (or 256 entries), and beyond the shared :attr:`budget`,
        so a long sweep's memory stays bounded."""
        hit = self._cache.pop(key, _MISSING)
        if hit is _MISSING:
            hit = build()
            self._sizes[key] = _nbytes(hit)
        self._cache[key] = hit  # (re)inserted last: most recently used
        if self.budget is not None:
            self.budget.touch(self, key, self._sizes.get(key, 0))
        k = self.weight.shape[1]
        budget = max(CACHE_WEIGHT_ARRAYS * self.weight.nbytes + 4 * 8 * k * k, 64 << 20)  # + K x K tables
        held = sum(self._sizes.get(k, 0) for k in self._cache)
        while len(self._cache) > 1 and (len(self._cache) > 256 or held > budget):
            old = next(iter(self._cache))
            del self._cache[old]
            held -= self._sizes.pop(old, 0)
            if self.budget is not None:
                self.budget.forget(self, old)
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
    images, code units; the means are a constant offset of the channel).

    One :func:`conversion_errors` call per (weight slice, conversion, input pass, input slice)
    over all output channels and tiles, for the noise-free and the thermal level together (they
    share the partial-sum bins). Calls are not merged further: a call's lattice decision, dither
    and bin grid are per call. Results are kept per thermal level under the knobs they depend on,
    so a sweep over ``adc_thermal_noise_lsb`` recomputes only the thermal part."""
    c_out, k = model.weight.shape
    n_rows = cfg.n_rows(k)
    widths_w = cfg.weight_slices()
    offsets_w = np.cumsum((0,) + widths_w[:-1])
    sigma_th = cfg.adc_thermal_noise_lsb
    convs = _conversions(levels, cfg)
    n_in = len(plan.passes[0].widths)
    zeros = np.zeros(c_out)
    if cfg.adc_bits is None:  # ideal ADC: thermal noise only, σ_th in partial-sum units, one draw per tile
        n_tiles = model.tiling(n_rows).n_tiles
        var_t = np.zeros(c_out)
        for off_w, conv_list in zip(offsets_w, convs):
            for _ in conv_list:
                for p in plan.passes:
                    for off_in in p.offsets:
                        var_t += (2.0 ** (off_in + off_w)) ** 2 * sigma_th ** 2 * n_tiles
        return zeros.copy(), var_t, zeros.copy(), zeros.copy()
    table = np.asarray(ranges.adc_range, dtype=np.float64)
    if table.shape != (n_in, len(widths_w)):
        raise EstimationError(f"layer {model.name}: adc_range has shape {table.shape}, expected "
                              f"(input slices, weight slices) = {(n_in, len(widths_w))}")
    signed_in = bool(ranges.signed_input)
    key = ("adc_res", cfg.weight_bits, cfg.weight_scale, cfg.weight_encoding, widths_w, cfg.adc_signed, n_rows,
           cfg.adc_bits, table.shape, table.tobytes(), cfg.input_bits, float(ranges.input_range), signed_in,
           cfg.signed_input_encoding if signed_in else None, cfg.input_slices(signed_in),
           None if noise is None else (cfg.programming_error, cfg.programming_error_model, cfg.read_noise,
                                       cfg.read_noise_model))
    sigmas = (0.0, float(sigma_th)) if sigma_th > 0 else (0.0,)
    need = [sg for sg in sigmas if key + (sg,) not in model._cache]
    if need:
        fresh = _adc_sums(model, cfg, plan, levels, noise, convs, table, n_rows, need)
        for sg in need:
            model.cached(key + (sg,), lambda sg=sg: fresh[sg])
    var_q, mean_q = model.cached(key + (0.0,), lambda: _adc_sums(model, cfg, plan, levels, noise, convs, table,
                                                                   n_rows, [0.0])[0.0])
    if sigma_th <= 0:
        return var_q.copy(), zeros.copy(), mean_q.copy(), zeros.copy()
    var_t, mean_t = model.cached(key + (float(sigma_th),), lambda: _adc_sums(
        model, cfg, plan, levels, noise, convs, table, n_rows, [float(sigma_th)])[float(sigma_th)])
    return var_q.copy(), np.maximum(var_t - var_q, 0.0), mean_q.copy(), mean_t - mean_q


def _adc_sums(model: LayerModel, cfg: LayerConfig, plan: InputPlan, levels: list[np.ndarray],
              noise: DeviceNoise | None, convs, table: np.ndarray, n_rows: int,
              sigmas: list[float]) -> dict[float, tuple[np.ndarray, np.ndarray]]:
    """Per thermal level σ (ADC LSBs): the summed error variance and mean of every conversion
    (code units², code units) with σ_n = σ·Δ, as :func:`_adc_error` defines them."""
    c_out, k = model.weight.shape
    tiling = model.tiling(n_rows)
    widths_w = cfg.weight_slices()
    offsets_w = np.cumsum((0,) + widths_w[:-1])
    signed_adc = cfg.adc_signed
    lo, hi = adc_code_limits(cfg.adc_bits, signed_adc)
    var = {sg: np.zeros(c_out) for sg in sigmas}
    mean = {sg: np.zeros(c_out) for sg in sigmas}
    x_var_rows = model.moment.var
    seg_ch = tiling.seg_channel
    # per (pass, input slice): its statistics gathered onto the (tile, channel) segments once
    slice_terms = []
    for p in plan.passes:
        for ji, (off_in, st) in enumerate(zip(p.offsets, p.slices)):
            slice_terms.append((p, ji, off_in, st.mean[seg_ch], st.sq_mean[seg_ch], (st.beta ** 2)[seg_ch],
                                st.resid_var[seg_ch], np.log(np.maximum(st.zero_prob, 1e-300))[seg_ch]))
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
            for p, ji, off_in, es, es2, b2, rv, log_p0 in slice_terms:
                mu = tiling.tilesum(a1 * es)
                v_sig = rho * tiling.tilesum(a2 * b2) + tiling.tilesum(a3 * rv)
                vdev = np.zeros_like(mu)
                if noise is not None:
                    mu = mu + tiling.tilesum(a4 * es)
                    vdev = tiling.tilesum(a5 * es2)
                p_zero = np.exp(tiling.tilesum(a0 * log_p0))
                weight = 2.0 ** (off_in + off_w)
                sign = p.sign * sign_pol
                delta = float(table[ji, li]) / hi
                upper = n_rows * (2 ** p.widths[ji] - 1) * (2 ** widths_w[li] - 1)  # largest P
                res = conversion_errors(mu, v_sig, vdev, delta, lo, hi, [sg * delta for sg in sigmas],
                                        nonnegative=not signed_adc, p_zero=p_zero, upper=upper)
                for sg, (m, sq) in zip(sigmas, res):
                    m, sq = m.reshape(mu.shape), sq.reshape(mu.shape)
                    var[sg] += weight ** 2 * (sq - m ** 2).sum(1)
                    mean[sg] += sign * weight * m.sum(1)
    return {sg: (var[sg], mean[sg]) for sg in sigmas}


@dataclass(frozen=True)
class _CodeSums:
    """Per output channel ``c`` and signed weight code ``q`` (column ``q + qmax``): row-weighted sums over
    the weights of channel ``c`` that hold code ``q`` (config-independent given the weight codes and the
    input plan). Every per-weight device term is a per-code table of the noise knobs, so its per-channel
    sums are these histograms times the table: a new noise level costs ``C_out x n_codes``, not
    ``C_out x K``."""

    count: np.ndarray     #: Σ 1
    eu2: np.ndarray       #: Σ E[u_k²] (applied input code)
    read: np.ndarray      #: Σ Σ_passes Σ_j 4^{o_j} E[s_jk²] (input slices)
    mean: np.ndarray      #: Σ μ_k
    moment_w: np.ndarray  #: Σ (M W_c)_k
    diag: np.ndarray | None  #: Σ D_k, the input moment's residual diagonal (None where it is 0)
    sens: np.ndarray | None    #: Σ S_ck·ε_k (S the per-weight sensitivity, ε_k = Δx² E[u_k²] / E[x_k²])
    sens_w: np.ndarray | None  #: Σ S_ck·ε_k·W_ck
    sens_w2: np.ndarray | None  #: (C_out,) Σ_k S_ck·ε_k·W_ck²


def _code_sums(model: LayerModel, plan: InputPlan, wq: WeightCodes, qmax: int) -> _CodeSums:
    c_out, k = model.weight.shape
    n = 2 * qmax + 1
    idx = (wq.codes + (qmax + n * np.arange(c_out))[:, None]).ravel()

    def hist(per_weight: np.ndarray) -> np.ndarray:
        flat = np.broadcast_to(per_weight, (c_out, k)).ravel()
        return np.bincount(idx, weights=flat, minlength=c_out * n).reshape(c_out, n)
    ch = model.channel_of_row
    eu2 = plan.applied.sq_mean[ch]
    e_read = np.zeros(k)
    for p in plan.passes:
        for off_in, st in zip(p.offsets, p.slices):
            e_read += 4.0 ** off_in * st.sq_mean[ch]
    mom, w = model.moment, model.weight
    moment_w = mom.project(w) @ mom.factor.T + w * mom.diag
    sens = sens_w = sens_w2 = None
    if model.weight_sens is not None:
        x_sq = np.maximum(mom.sq_mean, 1e-30)
        energy = np.where(mom.sq_mean > 0, plan.step ** 2 * eu2 / x_sq, 0.0)
        se = model.weight_sens * energy
        sens, sens_w, sens_w2 = hist(se), hist(se * w), (se * w * w).sum(1)
    return _CodeSums(count=hist(np.ones(k)), eu2=hist(eu2), read=hist(e_read), mean=hist(mom.mean),
                     moment_w=hist(moment_w), diag=hist(mom.diag) if np.any(mom.diag) else None,
                     sens=sens, sens_w=sens_w, sens_w2=sens_w2)


def _device_terms(model: LayerModel, noise: DeviceNoise, plan: InputPlan, wq: WeightCodes, sums: _CodeSums) -> dict:
    """Programming error and read noise of one layer (see :mod:`.device_noise`), from the per-code
    tables of the noise knobs and the per-code histograms ``sums``.

    * ``Σ_k Var(q_ck)·E[u_k²]`` (and the read-noise analogue) = ``sums.eu2 @ table``;
    * the clipping bias ``v_ck = Δw_c·b(q_ck)`` is split into gain, offset and rest (:mod:`.coherent`)
      from ``v·μ``, ``E[(v·x)(W·x)]`` (histograms) and ``E[(v·x)²]`` (the one per-weight product);
    * its per-weight remainder ``r = v - a·W`` reaches the logits through ``Σ_k S_ck·ε_k·r_ck²`` =
      ``Δw²·sens @ b² - 2aΔw·sens_w @ b + a²·sens_w2``: the per-channel contractions are returned
      (``fixed_*``, propagated by :class:`~cimstat.engine.network.Engine` with the class shares).
    """
    lut = noise.by_code
    c_out = model.weight.shape[0]
    dx, dw = plan.step, wq.step
    scale2 = (dx * dw) ** 2
    prog = scale2 * (sums.eu2 @ lut.var_prog)
    read = scale2 * (sums.read @ lut.var_read)
    share = noise.bias_share_prog
    zeros = np.zeros(c_out)
    bias_err = gain = offset = bias_fixed = zeros
    b = lut.bias
    # proportional noise leaves a bias of σ·h(1/α) (~1e-23 of a level at α = 10 %): below 1e-12 of the
    # deviation's spread it cannot move any result, and the per-weight quadratic form is skipped
    if np.abs(b).max() > 1e-12 * math.sqrt(float(np.max(lut.var_prog + lut.var_read))):
        mom, w = model.moment, model.weight
        # E[(v·x)²] of the per-weight bias v_ck = b(q_ck): its low-rank part from v itself (the table rolled so that
        # a signed code indexes it directly, no index array per call), its diagonal part from the code histogram
        v = np.roll(b.astype(np.float32), -lut.qmax)[wq.codes]
        quad = mom.low_rank_form_single(v) + (0.0 if sums.diag is None else sums.diag @ (b * b))
        sp = coherent_parts(mom.pinned_mean(w), mom.quad_form(w), dw * (sums.mean @ b),
                            dw * plan.offset_code * dx * (sums.count @ b), dw * (sums.moment_w @ b), dw ** 2 * quad)
        bias_err, gain, offset = sp.energy, sp.gain, sp.offset
        if sums.sens is not None:
            bias_fixed = (dw ** 2 * (sums.sens @ (b * b)) - 2 * gain * dw * (sums.sens_w @ b)
                          + gain ** 2 * sums.sens_w2)
    # (propagating the whole bias map exactly per image, as weight rounding, was tried: it moved the fc SNR of six
    # state-independent noise configurations by +0.02 … +0.12 dB, three closer to the MC and three farther, for
    # one convolution per layer and noise level)
    out = {"err_prog": prog + share * bias_err, "err_read": read + (1 - share) * bias_err, "read": read,
           "gain_prog": share * gain, "off_prog": share * offset,
           "gain_read": (1 - share) * gain, "off_read": (1 - share) * offset}
    if sums.sens is not None:
        out["fixed_prog"] = dw ** 2 * (sums.sens @ lut.var_prog) + share * bias_fixed
        out["fixed_read"] = (1 - share) * bias_fixed
    return out


def _conversion_noise_terms(levels: list[np.ndarray], noise: DeviceNoise | None):
    """``noise_terms(li, devs)`` of :func:`.sampled_adc.sampled_adc_error`: None without device noise, else the
    device deviation's mean (signs applied), variance and the variance's programming-error share per (C_out, K)
    for that conversion."""
    def noise_terms(li: int, devs: tuple[int, ...]):
        if noise is None:
            return None
        lv = levels[li][list(devs)]
        sgn = np.array([1.0, -1.0]) if len(devs) == 2 else np.array([1.0])
        return (np.tensordot(sgn, noise.slice_bias(lv, li), axes=1), noise.slice_var(lv, li).sum(0),
                noise.slice_var_prog(lv, li).sum(0))
    return noise_terms


def _sampled_adc(model: LayerModel, cfg: LayerConfig, ranges, noise: DeviceNoise | None, sigma: float,
                 curvature: bool = False) -> SampledError:
    """The layer's ADC error over its input sample with ``sigma`` LSB of thermal noise (cached per config);
    ``curvature``: with its cubic part (:class:`.sampled_adc.ChannelCubic`), cached apart. Under device noise the
    evaluation at the config's own thermal noise (the one :func:`adc_curvature` asks for) always fits it, and both
    routes share that entry: the per-element noise integrals cost far more than the fit (design-in4-w4-adc5 on the
    default model, profiled: three such evaluations per layer became two, its mean-field estimate 34 s -> 22 s)."""
    signed, x_range = bool(ranges.signed_input), float(ranges.input_range)
    table = np.asarray(ranges.adc_range, dtype=np.float64)
    levels = model.levels(cfg)
    shared = noise is not None and sigma == float(cfg.adc_thermal_noise_lsb)
    key = ("sadc", repr(cfg), signed, x_range, table.tobytes(), sigma) + (
        ("curvature",) if curvature and not shared else ())
    curvature = curvature or shared
    return model.cached(key, lambda: sampled_adc_error(
        model.input_sample, model.weight, cfg, signed, x_range, table, _conversions(levels, cfg),
        _conversion_noise_terms(levels, noise), sigma, model.cached, model.input_grad_weight, curvature))


def adc_curvature(model: LayerModel, resolved: ResolvedLayer) -> ChannelCubic | None:
    """The cubic part of the layer's ADC error in its float output (output units; the sampled ADC route, every
    noise present), or None where the layer has no input sample or no ADC. For the mean-field route: without device
    noise it evaluates the layer's sampled ADC error once more (the linear route does not fit the cubic there); with
    it, it reads the linear route's evaluation (:func:`_sampled_adc`)."""
    cfg, ranges = resolved.config, resolved.ranges
    if model.input_sample is None or cfg.adc_bits is None:
        return None
    signed, x_range = bool(ranges.signed_input), float(ranges.input_range)
    noise = model.noise(cfg) if cfg.programming_error > 0 or cfg.read_noise > 0 else None
    t = _sampled_adc(model, cfg, ranges, noise, float(cfg.adc_thermal_noise_lsb), curvature=True)
    scale = model.plan(cfg, signed, x_range).step * model.weights(cfg).step
    return t.curvature.scaled(scale)


def _sampled_adc_terms(model: LayerModel, cfg: LayerConfig, ranges, noise: DeviceNoise | None, scale: np.ndarray,
                       error: dict, white: dict, gain: dict, offset: dict, precise: bool = False) -> np.ndarray | None:
    """ADC quantization and thermal-noise terms from the layer's input sample (:mod:`.sampled_adc`); returns
    the error map of the precise route (``LayerEstimate.adc_map``) or None."""
    signed, x_range = bool(ranges.signed_input), float(ranges.input_range)
    table = np.asarray(ranges.adc_range, dtype=np.float64)
    n_in = len(cfg.input_slices(signed))
    if table.shape != (n_in, len(cfg.weight_slices())):
        raise EstimationError(f"layer {model.name}: adc_range has shape {table.shape}, expected "
                              f"(input slices, weight slices) = {(n_in, len(cfg.weight_slices()))}")
    convs = _conversions(model.levels(cfg), cfg)
    sigma = float(cfg.adc_thermal_noise_lsb)
    t = _sampled_adc(model, cfg, ranges, noise, sigma)  # the error with every noise present
    q_energy = t.energy
    if sigma > 0:
        # thermal noise is not additive: it also turns rounding errors that every conversion of a vector
        # repeats (and that add as amplitudes) into independent ones (measured on a 1-bit-slice lattice:
        # 0.05 LSB of noise lowers the ADC error 28 %). Its share is the extra variance it redraws per read
        # (all of it without device noise); the rest of the error with noise present is the quantization's.
        # (the white parts weighted by where on the outputs they sit: SampledError.white)
        t0 = _sampled_adc(model, cfg, ranges, noise, 0.0) if noise is not None else None
        redrawn = t.random - (t0.random if t0 is not None else 0.0)
        thermal = np.minimum(np.maximum(redrawn, 0.0), t.energy)
        thermal_white = np.minimum(np.maximum(t.random_white - (t0.random_white if t0 is not None else 0.0), 0.0),
                                   t.white)
        error[ErrorSource.ADC_THERMAL_NOISE] = scale ** 2 * thermal
        white[ErrorSource.ADC_THERMAL_NOISE] = scale ** 2 * thermal_white
        q_energy = t.energy - thermal
        q_white = t.white - thermal_white
    else:
        q_white = t.white
    # below 0 where the ADC absorbs device deviations (a partial sum whose deviation crosses no threshold converts
    # as if it had none: see sampled_adc), by at most the devices' own error (measured on conv1 of the default
    # model, 8-bit split inputs in 1-bit slices, 2-bit weight slices, 6-bit calibrated ADC, 3 % read noise: the
    # Monte Carlo's error with the ADC is 7 % below that of the devices alone; clipped at 0, the estimate was 14 % above)
    device = error[ErrorSource.PROGRAMMING_ERROR] + error[ErrorSource.READ_NOISE]
    error[ErrorSource.ADC_QUANTIZATION] = np.maximum(scale ** 2 * q_energy, -device)
    if precise and model.adc_image_vectors is not None and noise is None:
        # the precise route: the deterministic error of every output of the images goes per image (the map),
        # in place of its gain, offset and white residual
        key = ("sadc map", repr(cfg), signed, x_range, table.tobytes(), sigma)

        def build_map():
            def cache(k, build):  # its own keys (the image vectors are not the input sample); partial sums of
                # every output of the images (~200 MB for a layer1 conv of the default model) are not kept
                return build() if k[0] == "partial_sums" else model.cached(("image route",) + k, build)
            det = adc_error_map(model.adc_image_vectors, model.weight, cfg, signed, x_range, table, convs, sigma,
                                cache)
            if det is None:  # over PRECISE_ELEMENT_BUDGET: the sample route
                return None
            out = (det * scale).astype(np.float32)
            out.setflags(write=False)
            return out
        error_map = model.cached(key, build_map)
        if error_map is not None:
            return error_map
    # the absorbed device deviations leave the logits too: the white part may go below 0 by as much
    white[ErrorSource.ADC_QUANTIZATION] = np.maximum(scale ** 2 * q_white, -device)
    gain[ErrorSource.ADC_QUANTIZATION] = scale * t.gain
    offset[ErrorSource.ADC_QUANTIZATION] = scale * t.offset
    return None


def estimate_layer(model: LayerModel, resolved: ResolvedLayer, adc_per_image: bool = False) -> LayerEstimate:
    """Expected squared error per output channel of one layer, by source (``adc_per_image``: the precise ADC
    route where ``model.adc_image_vectors`` is set, see :data:`cimstat.engine.network.ADC_PER_IMAGE_NOTE`)."""
    cfg, ranges = resolved.config, resolved.ranges
    c_out, k = model.weight.shape
    zeros = np.zeros(c_out)
    error = {s: zeros.copy() for s in ErrorSource}
    white = {s: zeros.copy() for s in ErrorSource}
    fixed: dict[ErrorSource, np.ndarray] = {}
    fixed_channel: dict[ErrorSource, np.ndarray] = {}
    gain: dict[ErrorSource, np.ndarray] = {}
    offset: dict[ErrorSource, np.ndarray] = {}
    weight_maps: dict[ErrorSource, np.ndarray] = {}
    has_noise = cfg.programming_error > 0 or cfg.read_noise > 0
    if cfg.input_bits is None and has_noise:
        raise EstimationError(f"layer {model.name}: programming_error/read_noise with input_bits=None (float inputs) "
                              "has no integer partial sum to perturb; quantize the inputs or set the noise to 0")
    ch = model.channel_of_row
    moments = (model.moment.quad_form(model.weight), model.moment.pinned_mean(model.weight))

    # weights
    if cfg.weight_bits is not None:
        wq = model.weights(cfg)
        w_eff = wq.dequantized
        error[ErrorSource.WEIGHT_QUANTIZATION] = model.weight_error(cfg)
        # rounding errors have no systematic gain: their per-channel projection on W is as
        # random as the rest (splitting it off measured 2 dB worse at the logits), so all of dW
        # goes by the per-weight sensitivities
        if model.exact_weight_shift:  # one draw, propagated exactly per image by the engine
            weight_maps[ErrorSource.WEIGHT_QUANTIZATION] = wq.error
        else:
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
        a, m = sp.gain, sp.offset
        if model.input_sample is not None:
            # exact over the sampled vectors (a background pixel's rounding error is one value shared by
            # whole patches); the part beyond gain and offset keeps the model's white : fixed split
            def build_sampled():
                s_iq = sampled_input_error(model.input_sample, model.weight, w_eff, cfg, bool(ranges.signed_input),
                                           float(ranges.input_range), model.input_grad_weight)
                rest = np.maximum(s_iq.energy - s_iq.coherent_sq, 0.0)
                model_rest = resid + sp.residual_sq

                def share(part: np.ndarray) -> np.ndarray:
                    return np.where(model_rest > 0, part / np.where(model_rest > 0, model_rest, 1.0), 0.0)
                # the white part weighted by where on the outputs it sits (SampledError.white)
                return s_iq.energy, resid * share(s_iq.white), res2 * share(rest)[:, None], s_iq.gain, s_iq.offset
            e, resid, res2, a, m = model.cached(key + ("sampled",), build_sampled)
        error[ErrorSource.INPUT_QUANTIZATION] = e
        white[ErrorSource.INPUT_QUANTIZATION] = resid
        gain[ErrorSource.INPUT_QUANTIZATION], offset[ErrorSource.INPUT_QUANTIZATION] = a, m
        fixed[ErrorSource.INPUT_QUANTIZATION] = res2

    # devices
    noise = None
    if has_noise:
        noise = model.noise(cfg)
        signed = bool(ranges.signed_input)
        inputs = (cfg.input_bits, float(ranges.input_range), signed, cfg.signed_input_encoding if signed else None,
                  cfg.input_slices(signed))
        sums = model.cached(("devsums", cfg.weight_bits, cfg.weight_scale) + inputs,
                            lambda: _code_sums(model, plan, wq, noise.by_code.qmax))
        key = ("dev", cfg.weight_bits, cfg.weight_scale, cfg.weight_encoding, cfg.weight_slices(),
               cfg.programming_error, cfg.programming_error_model, cfg.read_noise, cfg.read_noise_model) + inputs
        dev = model.cached(key, lambda: _device_terms(model, noise, plan, wq, sums))
        error[ErrorSource.PROGRAMMING_ERROR] = dev["err_prog"]
        error[ErrorSource.READ_NOISE] = dev["err_read"]
        white[ErrorSource.READ_NOISE] = dev["read"]
        if "fixed_prog" in dev:
            fixed_channel[ErrorSource.PROGRAMMING_ERROR] = dev["fixed_prog"]
            fixed_channel[ErrorSource.READ_NOISE] = dev["fixed_read"]
        gain[ErrorSource.PROGRAMMING_ERROR], offset[ErrorSource.PROGRAMMING_ERROR] = dev["gain_prog"], dev["off_prog"]
        gain[ErrorSource.READ_NOISE], offset[ErrorSource.READ_NOISE] = dev["gain_read"], dev["off_read"]

    # ADC
    if cfg.adc_bits is not None or cfg.adc_thermal_noise_lsb > 0:
        if plan is None or wq is None:
            raise EstimationError(f"layer {model.name}: adc_bits/adc_thermal_noise_lsb need quantized inputs "
                                  "and weights")
        scale = plan.step * wq.step
        if model.input_sample is not None and cfg.adc_bits is not None:
            adc_map = _sampled_adc_terms(model, cfg, ranges, noise, scale, error, white, gain, offset, adc_per_image)
            return LayerEstimate(name=model.name, error=error, signal=model.signal, white=white, fixed=fixed,
                                 fixed_channel=fixed_channel, gain=gain, offset=offset, weight_maps=weight_maps,
                                 output_moments=moments, adc_map=adc_map)
        var_q, var_t, mean_q, mean_t = _adc_error(model, cfg, ranges, plan, model.levels(cfg), noise)
        error[ErrorSource.ADC_QUANTIZATION] = scale ** 2 * (var_q + mean_q ** 2)
        error[ErrorSource.ADC_THERMAL_NOISE] = scale ** 2 * np.maximum(
            var_t + (mean_q + mean_t) ** 2 - mean_q ** 2, 0.0)
        white[ErrorSource.ADC_QUANTIZATION] = scale ** 2 * var_q
        white[ErrorSource.ADC_THERMAL_NOISE] = scale ** 2 * var_t
        offset[ErrorSource.ADC_QUANTIZATION] = scale * mean_q
        offset[ErrorSource.ADC_THERMAL_NOISE] = scale * mean_t
    return LayerEstimate(name=model.name, error=error, signal=model.signal, white=white, fixed=fixed,
                         fixed_channel=fixed_channel, gain=gain, offset=offset, weight_maps=weight_maps,
                         output_moments=moments)


CLIPPING_EXTRA_BITS = 6
"""Bits added to the ADC (same full-scale range, so a 64x finer step) to isolate its clipping from its rounding
in :func:`adc_clipping_shift`."""

CLIPPING_SAMPLE_ROWS = 2048
"""Most input-sample vectors (evenly strided) :func:`adc_clipping_shift` evaluates: the shift is a smooth average."""

OPERATING_POINT_SEED = 0
"""Seed of the fixed standard-normal pattern ``ξ`` of :func:`adc_clipping_shift`: drawn the same way at every call,
so the estimate is a deterministic function of the probes and the config (a fixed set of nodes, not sampling)."""


def padding_taps(sample: np.ndarray, kernel_size: tuple[int, int], padding: tuple[int, int]) -> np.ndarray:
    """(S, K) bool: the entries of im2col vectors (rows in (C_in, kh, kw) order) that are a convolution's zero
    padding, told by geometry (the sample keeps no positions): a kernel row or column at the border that is 0 in
    every input channel, contiguous from the edge and at most ``padding`` deep. A border row of genuine zeros in
    every channel counts as padding too."""
    kh, kw = kernel_size
    ph, pw = padding
    n = len(sample)
    zero = (np.asarray(sample).reshape(n, -1, kh, kw) == 0).all(1)      # (S, kh, kw): 0 in every channel
    rows, cols = zero.all(2), zero.all(1)
    pad = np.zeros((n, kh, kw), dtype=bool)
    for d in range(min(ph, kh)):
        pad[:, d, :] |= rows[:, :d + 1].all(1)[:, None]                  # top
        pad[:, kh - 1 - d, :] |= rows[:, kh - 1 - d:].all(1)[:, None]    # bottom
    for d in range(min(pw, kw)):
        pad[:, :, d] |= cols[:, :d + 1].all(1)[:, None]                  # left
        pad[:, :, kw - 1 - d] |= cols[:, kw - 1 - d:].all(1)[:, None]    # right
    c_in = sample.shape[1] // (kh * kw)
    return np.broadcast_to(pad[:, None], (n, c_in, kh, kw)).reshape(n, -1)


def clipping_shift_applies(model: LayerModel, resolved: ResolvedLayer) -> bool:
    """Whether :func:`adc_clipping_shift` moves anything: a layer with an input sample and an ADC whose range is not
    ``max`` (every partial sum is within range: only noise tails can clip, at the same rate at any operating point).

    Offset weights included: each of their partial sums carries the offset level times the sum of the inputs, so
    a lift of the inputs that are 0 in the clean network clips every channel at once. That is what collapses u6 of
    ``sweeps/stress.py`` in the Monte Carlo (34 % of layer1.0.conv1's conversions above full scale in the noisy
    network, 0.7 % on clean inputs). While the moved sample lifted those inputs with the spread of the active
    ones, the shift was left out for offset weights: it collapsed adc6-cal-offset-weights (fc -0.03 dB, top-1
    10.2 %, against the MC's 11.27 dB and 98.30 %), whose silent inputs stay near 0 (0.13 % of conversions
    clip in the MC). The silent inputs now get their own mean and spread (:func:`adc_clipping_shift`)."""
    cfg = resolved.config
    return (model.input_sample is not None and cfg.adc_bits is not None and cfg.adc_range is not RangeMode.MAX)


def adc_clipping_shift(model: LayerModel, resolved: ResolvedLayer, alpha: np.ndarray, beta: np.ndarray,
                       sd: np.ndarray, silent_mean: np.ndarray,
                       silent_sd: np.ndarray) -> tuple[np.ndarray, np.ndarray, tuple[ChannelCubic, ...]]:
    """Change of the layer's ADC gain ``a_c``, offset ``m_c`` (output units) and curvature (the cubic part,
    :class:`.sampled_adc.ChannelCubic`: the moved sample's minus the clean one's, as two terms to add) when its inputs move from the
    probed clean ones ``x`` to ``α_i·x + β_i + sd_i·ξ`` (per input channel ``i``: the regression of the noisy
    network's input on the clean one and the spread around it, from :mod:`.meanfield`).

    The probed gain describes clipping at the clean network's operating point. Where upstream errors shrink the
    image-specific part of the activations (ADC thermal noise, collapse), fewer partial sums reach the clipping
    level and the clipping gain falls toward 0 (measured on the default model, thermal4-adc6: the Monte Carlo's
    own layer3.0.downsample.0 gain is -0.048 against a clean-input -0.121). Only the clipping part moves:
    ``Δa = a_clip(shifted sample) - a_clip(clean sample)``, both with an ADC of :data:`CLIPPING_EXTRA_BITS` more
    bits over the same range (the same thermal noise in partial-sum units, no device noise: that it widens the
    partial sums is a second-order change of the shift); the rounding part keeps its probed
    value (a max-range 8-bit ADC's dead zone, adc8-max-bitserial: the Monte Carlo's gains in the collapsed
    network are within 0.1 of the clean ones, where re-evaluating the rounding on the shifted sample said 0.3
    less). ``ξ``: a fixed standard-normal pattern (:data:`OPERATING_POINT_SEED`) the shape of the input sample;
    ``sd``: the root mean variance of the noisy input (the spread of the means around the fit is left out). The
    convolution's zero padding (:func:`padding_taps`) stays 0. Unsigned inputs are clipped at 0 by the input
    quantizer, so where ``sd`` is large against ``β`` the moved sample's mean is above ``α·x + β`` (up to ~0.4·sd).

    Inputs that are 0 in the sample (a ReLU's silent outputs) move apart, by ``silent_mean`` and ``silent_sd`` (per
    input channel, the noisy input's mean and standard deviation where the clean one is 0): to
    ``max(0, μ0 + σ0·ξ)``, the rectified Gaussian with that mean and spread (:func:`rectified_gaussian_for`). The
    noise a layer adds is not the same on its silent and its active outputs: with the active inputs' spread on the
    silent ones too, adc6-cal-offset-weights' silent inputs were lifted by up to 2x their own mean (layer2.0.conv1:
    0.28 against 0.12 in the route's own pass).
    Zero where :func:`clipping_shift_applies` says it does not apply."""
    cfg, ranges = resolved.config, resolved.ranges
    c_out = model.weight.shape[0]
    if not clipping_shift_applies(model, resolved):
        return np.zeros(c_out), np.zeros(c_out), ()
    signed, x_range = bool(ranges.signed_input), float(ranges.input_range)
    table = np.asarray(ranges.adc_range, dtype=np.float64)
    fine = replace(cfg, adc_bits=cfg.adc_bits + CLIPPING_EXTRA_BITS)
    sigma = float(cfg.adc_thermal_noise_lsb) * (adc_code_limits(fine.adc_bits, cfg.adc_signed)[1]
                                                / adc_code_limits(cfg.adc_bits, cfg.adc_signed)[1])
    convs = _conversions(model.levels(cfg), cfg)
    sample = np.asarray(model.input_sample[::-(-len(model.input_sample) // CLIPPING_SAMPLE_ROWS)], dtype=np.float64)
    # the same vectors (and weights) for the clean and every moved sample: a reduced part chosen anew on each moved
    # sample jumped with the fit and made the route's top-1 jitter by ±0.2-0.4 pp with float rounding (thermal4-adc6)
    rows, weights = model.cached(("sadc clip rows", repr(cfg), signed, x_range), lambda: budget_rows(
        sample, c_out, fine, signed, x_range, convs))
    if rows is not None:
        sample = sample[rows]

    def clip_terms(x: np.ndarray) -> SampledError:  # device noise left out: the clipping of the partial sums
        return sampled_adc_error(x, model.weight, fine, signed, x_range, table, convs, lambda li, devs: None, sigma,
                                 curvature=True, row_weights=None if rows is None else weights)
    clean = model.cached(("sadc clip", repr(cfg), signed, x_range, table.tobytes()), lambda: clip_terms(sample))
    ch = model.channel_of_row
    xi = np.random.default_rng(OPERATING_POINT_SEED).standard_normal(sample.shape)
    moved_sample = sample * alpha[ch] + beta[ch] + sd[ch] * xi
    mu0, sigma0 = rectified_gaussian_for(np.asarray(silent_mean, float), np.asarray(silent_sd, float))
    silent = sample == 0
    moved_sample[silent] = np.maximum(mu0[ch] + sigma0[ch] * xi, 0.0)[silent]
    if model.stats.kind == "conv" and any(model.stats.padding):
        moved_sample[padding_taps(sample, model.stats.kernel_size, model.stats.padding)] = 0.0
    moved = clip_terms(moved_sample)
    step = model.plan(cfg, signed, x_range).step
    scale = step * model.weights(cfg).step
    if float(np.sqrt(np.mean(moved_sample * moved_sample))) < 0.5 * step:
        # inputs the noisy network silenced (u6 of sweeps/stress.py: layer2.1.conv1's fitted inputs are ~1e-24):
        # every input rounds to one code and no output varies with y, so nothing clips in proportion to it. The
        # regression on a variance of ~1e-48 is float noise (it gave a gain of 2e10 and NaN logits).
        moved = replace(moved, gain=np.zeros_like(moved.gain))
    curves = (() if moved.curvature is None or clean.curvature is None
              else (moved.curvature.scaled(scale), clean.curvature.scaled(-scale)))
    return scale * (moved.gain - clean.gain), scale * (moved.offset - clean.offset), curves
