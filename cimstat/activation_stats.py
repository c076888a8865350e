"""Activation probing: one float pass over N probe images -> :class:`cimstat.probes.ActivationStats`.

For every analog layer (Conv2d / Linear of the batch-norm-folded model) a forward hook sees
the layer input ``x`` and float output ``y`` and accumulates, over the rows of the im2col
patches (padding zeros included, every output position of every image):

* per input channel histograms on a layer-wide uniform grid of width ``w = max|x| / bins_per_max``
  (``max|x|`` of the first batch; the grid grows with integer bin offsets if later values fall
  outside, so edges stay ``w·i``), exact zeros counted separately. A padded input position
  contributes once per patch containing it: it is counted with its *multiplicity* (the number
  of kernel offsets that reach it), which is exactly the patch-row statistic without
  building the patches. Exact: bin = ``floor(x / w)`` in float64 (correctly rounded division,
  so a value on an edge ``w·i`` opens bin ``i`` as in ``np.histogram``), counted by one
  integer ``bincount`` per batch over the flat index (multiplicity level, channel, bin) and
  folded as ``Σ_level mult·count`` at the end; padding zeros are added analytically.
* ``row_mean``, ``row_sq_mean`` (K,): float64 per-position sums ``Σ_n x``, ``Σ_n x²`` of the
  unpadded input, gathered per patch row by ``unfold`` at the end (exact up to float64 rounding).
* ``M = E[x x^T]``: ``X^T X`` of a random fraction ``f`` of the patches (one float32 GEMM per
  batch, summed in float64 every 16 batches; ``f = 1`` uses every patch). Row/column ``k`` is then
  rescaled by ``sqrt(row_sq_mean_k / sampled E[x_k^2])``: the diagonal is exact, the matrix stays
  PSD and its trace (random-dW error) is unbiased. ``f = min(1, m_cost_ratio·C_out/K)`` bounds the
  cost of ``M`` to ``m_cost_ratio`` times the layer's own multiply-accumulates (at least
  ``m_min_patches_per_batch`` patches per batch). Stored dense when ``K <= m_dense_max_k``,
  otherwise as the top-``m_rank`` eigenpairs (exact eigenpairs of the Gram matrix of the sampled
  patches while they are fewer than ``min(K, 1024)``, randomized subspace iteration beyond) plus
  the exact residual diagonal. Measured on the default model (1,000 probe images, exact ``M`` from
  every patch, ``benchmarks/probe_speed.py --m-error``): ``Σ_c dW_c M dW_c^T`` per layer within
  0.035 dB for random dW and 4-/8-bit weight rounding, and within 0.08 dB for a gain error
  ``dW ∝ W`` (worst: fc, 320 sampled rows), at ``m_cost_ratio=0.2`` (0.02 dB at 1.0, the previous
  default, which cost as much as the forward pass).
* ``out_mean``, ``out_sq_mean`` per output channel (float32 sums per batch, float64 across batches).

Cost: the statistics run on one thread inside the hooks (the forward keeps torch's thread
count); element-wise work is chunked so the float64 temporaries stay in cache.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass
from typing import Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cimstat.network import AnalogLayerSpec, analog_layers, fold_batchnorm
from cimstat.probes import SCHEMA_VERSION, ActivationStats, LayerStats, utc_now

__all__ = ["ProbeSettings", "probe_activations", "probe_model", "low_rank_plus_diag", "multiplicity_map"]


@dataclass(frozen=True)
class ProbeSettings:
    """Resolution and cost knobs of activation probing."""

    bins_per_max: int = 1024
    """Histogram bins between 0 and max|x| of the first batch (4 per 8-bit LSB of an unsigned input
    at that range, 8 per LSB of a signed one)."""
    m_cost_ratio: float | None = 0.2
    """Cost of M as a multiple of the layer's MACs (sets the patch fraction); None = all patches.
    0.2 keeps every layer's ``dW M dW^T`` within 0.08 dB of the exact M on the default model."""
    m_dense_max_k: int = 1152
    """Store M dense up to this K; above, compress to ``m_rank`` eigenpairs + exact diagonal."""
    m_min_patches_per_batch: int = 32
    """Floor on the patches per batch used for M (matters for small-C_out layers such as fc)."""
    m_rank: int = 256
    m_power_iterations: int = 1


def multiplicity_map(in_hw: tuple[int, int], out_hw: tuple[int, int], kernel: tuple[int, int],
                     stride: tuple[int, int], padding: tuple[int, int], dilation: tuple[int, int]) -> torch.Tensor:
    """(Hp, Wp) int64: how many patches contain each position of the zero-padded input."""
    hp, wp = in_hw[0] + 2 * padding[0], in_hw[1] + 2 * padding[1]
    mult = torch.zeros(hp, wp, dtype=torch.int64)
    for i in range(kernel[0]):
        for j in range(kernel[1]):
            mult[i * dilation[0]: i * dilation[0] + stride[0] * (out_hw[0] - 1) + 1: stride[0],
                 j * dilation[1]: j * dilation[1] + stride[1] * (out_hw[1] - 1) + 1: stride[1]] += 1
    return mult


def low_rank_plus_diag(m: np.ndarray, rank: int, power_iterations: int = 2,
                       seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Top-``rank`` eigenpairs of a symmetric PSD ``m`` (randomized subspace iteration, float32
    products) and the residual diagonal ``diag(m) - diag(V Λ V^T)`` (clipped at 0)."""
    k = m.shape[0]
    rank = min(rank, k)
    m64 = torch.as_tensor(np.asarray(m, dtype=np.float64))
    m32 = m64.float()
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(k, min(k, rank + 16), generator=gen)
    for _ in range(power_iterations + 1):
        y = m32 @ q
        with _single_thread():
            q, _ = torch.linalg.qr(y)
    q64 = q.double()
    b = (q.T @ (m32 @ q)).double()            # float32 products: m32 carries float32 rounding anyway
    with _single_thread():
        vals, vecs = torch.linalg.eigh((b + b.T) / 2)
    order = torch.argsort(vals, descending=True)[:rank]
    vals = vals[order].clamp_min(0)
    v = q64 @ vecs[:, order]
    resid = (m64.diagonal() - (v * v) @ vals).clamp_min(0)
    return v.float().numpy(), vals.numpy(), resid.numpy()


def _diag_rescale(sampled_sq: torch.Tensor, exact_sq: np.ndarray) -> torch.Tensor:
    """(K,) factors sqrt(exact / sampled) (0 where the sample saw only zeros)."""
    exact = torch.as_tensor(exact_sq, dtype=torch.float64)
    return torch.where(sampled_sq > 0, (exact / sampled_sq.clamp_min(1e-300)).sqrt(), torch.zeros_like(exact))


@contextlib.contextmanager
def _single_thread():
    """Small dense LAPACK calls (eigh, qr) run far faster on one thread on a busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


_MAX_KEPT_PATCHES = 1024  # sampled patches kept as rows (exact low-rank M) before switching to X^T X
_HIST_CHUNK = 1 << 16     # elements per float64 chunk of the bin-index computation (stays in L2 cache)
_ZERO_SHIFT = 2.0 ** -1000  # floor(x / w - _ZERO_SHIFT) = -1 exactly for x == 0, floor(x / w) otherwise
_M_FLUSH_BATCHES = 16     # float32 batch sums of X^T X are added into the float64 total every this many batches


def _compact_counts(counts: np.ndarray) -> np.ndarray:
    """int32 when the counts fit (halves the file), else int64."""
    return counts.astype(np.int32) if counts.size == 0 or counts.max() < 2**31 else counts


@dataclass
class _Geometry:
    """Patch geometry of one (input size, output size) of a layer."""

    mult: torch.Tensor        # (H, W) int64: patches containing each *unpadded* input position
    pad_zeros: int            # Σ multiplicity over the padding ring: padding zeros per image and channel
    per_image: int            # Σ multiplicity over the padded input = Ho·Wo·kh·kw entries per image and channel
    levels: torch.Tensor      # (n_lev,) int64 distinct values of ``mult``
    level_of: torch.Tensor    # (H, W) int64 index of each position's multiplicity in ``levels``
    koff: torch.Tensor        # (kh·kw,) int64 offset of each kernel tap in a padded channels-last (Hp·Wp, C) image
    padded_hw: tuple[int, int]


class _Scratch:
    """Work buffers shared by every layer (one layer is processed at a time)."""

    def __init__(self) -> None:
        self._bufs: dict[torch.dtype, torch.Tensor] = {}

    def get(self, n: int, dtype: torch.dtype) -> torch.Tensor:
        buf = self._bufs.get(dtype)
        if buf is None or buf.numel() < n:
            buf = self._bufs[dtype] = torch.empty(n, dtype=dtype)
        return buf[:n]


class _LayerAccumulator:
    """Running sums of one analog layer's statistics (see the module docstring)."""

    def __init__(self, spec: AnalogLayerSpec, settings: ProbeSettings, gen: torch.Generator,
                 scratch: _Scratch | None = None):
        if spec.groups != 1:
            raise NotImplementedError(f"layer {spec.name}: grouped convolutions (groups={spec.groups}) are not supported")
        self.spec, self.settings, self.gen = spec, settings, gen
        self.scratch = scratch or _Scratch()
        self.kh, self.kw = spec.kernel_size
        k, c_out = spec.fan_in, spec.out_channels
        self.c_in = k // (self.kh * self.kw)
        self.m_fraction = 1.0 if settings.m_cost_ratio is None else min(1.0, settings.m_cost_ratio * c_out / k)
        self.width: float | None = None
        self.lo: int | None = None                   # bins [lo, hi] seen (as floor(x / width))
        self.hi: int | None = None
        self.t_lo = 0                                 # raw table bins [t_lo, t_lo + n_table_bins)
        self.raw: torch.Tensor | None = None          # (n_lev, C, n_table_bins) int64 counts per multiplicity level
        self.zero_slot = True                         # exact zeros are binned at -1 (no negative input seen yet)
        self.zero_lev: torch.Tensor | None = None     # (n_lev, C) zeros taken out of the table
        self.zero_in_bin0: torch.Tensor | None = None  # (n_lev, C) zeros counted separately, still in bin 0
        self.total = 0                                # entries per channel (the same for every channel)
        self.geo: _Geometry | None = None
        self._pending: list[torch.Tensor] = []        # bin indices not yet counted (table larger than a batch)
        self._pending_n = 0
        self.pos_sum: torch.Tensor | None = None   # (C, H, W) float64: Σ over images of the (unpadded) input
        self.pos_sq: torch.Tensor | None = None
        # sampled patches are in (kh, kw, C) order (C contiguous); finish() permutes to PyTorch's (C, kh, kw)
        self.m_acc: torch.Tensor | None = None     # (K, K) float64 Σ x x^T once more than K patches are kept
        self.m_part: torch.Tensor | None = None    # (K, K) float32 Σ x x^T of the batches since the last flush
        self.m_part_batches = 0
        self.m_rows: list[torch.Tensor] = []       # sampled patches while fewer than K (low rank: exact SVD)
        self.m_n = 0
        self.out_sum = torch.zeros(c_out, dtype=torch.float64)
        self.out_sq = torch.zeros(c_out, dtype=torch.float64)
        self.n_images = 0
        self.n_positions = 0
        self.out_hw = (1, 1)
        self.in_hw: tuple[int, int] | None = None
        self.geometry: tuple = ((1, 1), (0, 0), (1, 1))
        self.xmin, self.xmax = math.inf, -math.inf
        self._offsets: tuple | None = None   # (t_lo, n_table_bins, (C, H, W) int32 offsets of (level, channel, bin 0))

    # ------------------------------------------------------------------ per batch
    def update(self, x: torch.Tensor, y: torch.Tensor) -> None:
        x = x.detach()
        y = y.detach()
        s = self.spec
        if s.kind == "linear":
            x4, y4 = x.reshape(x.shape[0], -1, 1, 1), y.reshape(y.shape[0], -1, 1, 1)
            stride, pad, dil = (1, 1), (0, 0), (1, 1)
        else:
            x4, y4, stride, pad, dil = x, y, s.stride, s.padding, s.dilation
        x4 = x4.float().contiguous()
        self.geometry = (stride, pad, dil)
        b = x4.shape[0]
        ho, wo = y4.shape[2:]
        in_hw = (int(x4.shape[2]), int(x4.shape[3]))
        if self.in_hw is not None and self.in_hw != in_hw:
            raise ValueError(f"layer {s.name}: input size changed from {self.in_hw} to {in_hw} "
                             f"(probe images must all have the same size)")
        self.in_hw = in_hw
        self.n_images += b
        self.n_positions, self.out_hw = ho * wo, (ho, wo)
        bmin, bmax = (float(v) for v in torch.aminmax(x4))
        self.xmin, self.xmax = min(self.xmin, bmin), max(self.xmax, bmax)
        if (self.kh, self.kw) == (1, 1) and not any(pad) and stride != (1, 1):
            # a strided 1x1 conv reads only the stride grid: it is a 1x1 stride-1 conv of that sub-grid
            # (min/max above, which set the histogram grid and range, still cover every position)
            x4 = x4[:, :, ::stride[0], ::stride[1]][:, :, :ho, :wo].contiguous()
            stride = (1, 1)
            self.geometry = (stride, pad, dil)
            in_hw = (int(ho), int(wo))
        if self.geo is None:
            self.geo = self._geometry(in_hw, (int(ho), int(wo)), stride, pad, dil)
        geo = self.geo
        padded = any(pad)
        self._histogram(x4, bmin, min(bmin, 0.0) if padded else bmin, max(bmax, 0.0) if padded else bmax, geo)
        self._second_moment(x4, geo, ho, wo, stride, pad)
        y3 = y4.float().reshape(b, y4.shape[1], -1)
        self.out_sum += y3.sum((0, 2))
        self.out_sq += y3.square().sum((0, 2))

    def _geometry(self, in_hw, out_hw, stride, pad, dil) -> _Geometry:
        full = multiplicity_map(in_hw, out_hw, (self.kh, self.kw), stride, pad, dil)
        mult = full[pad[0]: pad[0] + in_hw[0], pad[1]: pad[1] + in_hw[1]].contiguous()
        levels, level_of = torch.unique(mult, return_inverse=True)
        hp, wp = full.shape
        koff = (torch.arange(self.kh).view(-1, 1) * (dil[0] * wp)
                + torch.arange(self.kw).view(1, -1) * dil[1]).reshape(-1)
        return _Geometry(mult=mult, pad_zeros=int(full.sum() - mult.sum()), per_image=int(full.sum()),
                         levels=levels, level_of=level_of.view(in_hw), koff=koff, padded_hw=(hp, wp))

    def _table(self, lo: int, hi: int, n_lev: int) -> None:
        """Make the raw table cover bins [lo, hi], bin 0 (zeros when counted separately) and bin -1 (zeros)."""
        lo, hi = min(lo, -1), max(hi, 0)
        if self.raw is not None and (lo < self.t_lo or hi >= self.t_lo + self.raw.shape[2]):
            self._flush_hist()                        # pending indices use the current layout
        if self.raw is None:
            self.t_lo, self.raw = lo, torch.zeros(n_lev, self.c_in, hi - lo + 1, dtype=torch.int64)
            return
        nbt = self.raw.shape[2]
        if lo < self.t_lo or hi >= self.t_lo + nbt:
            new_lo, new_hi = min(lo, self.t_lo), max(hi, self.t_lo + nbt - 1)
            grown = torch.zeros(n_lev, self.c_in, new_hi - new_lo + 1, dtype=torch.int64)
            grown[:, :, self.t_lo - new_lo: self.t_lo - new_lo + nbt] = self.raw
            self.t_lo, self.raw = new_lo, grown

    def _take_zero_slot(self) -> None:
        """Move the zeros binned at -1 out of the table (before bin -1 may hold negative values)."""
        self._flush_hist()
        if self.raw is not None and self.zero_slot:
            self.zero_lev += self.raw[:, :, -1 - self.t_lo]
            self.raw[:, :, -1 - self.t_lo] = 0
        self.zero_slot = False

    def _histogram(self, x4: torch.Tensor, bmin: float, lo_val: float, hi_val: float, geo: _Geometry) -> None:
        """Bin ``floor(x / w)`` (float64 division, exact against the edges ``w·i``) of every input entry,
        counted with its multiplicity: one unweighted ``bincount`` over the flat index (level, channel, bin)
        where positions are grouped by multiplicity level; ``Σ_level mult·count`` is formed at the end.

        Exact zeros: while no input was negative, ``floor(x / w - 2^-1000)`` sends exactly the zeros to
        bin -1 (``x / w`` of a non-zero float32 is far above 2^-1000·2^53, so the shift never changes its
        floor); once the layer has seen negative inputs, zeros are counted by ``x != 0`` and subtracted
        from bin 0."""
        b, c, h, w_ = x4.shape
        if self.width is None:
            amax = max(abs(self.xmin), abs(self.xmax))
            self.width = (amax if amax > 0 else 1.0) / self.settings.bins_per_max
            n_lev = geo.levels.numel()
            self.zero_lev = torch.zeros(n_lev, c, dtype=torch.int64)
            self.zero_in_bin0 = torch.zeros(n_lev, c, dtype=torch.int64)
        width = self.width
        lo, hi = math.floor(lo_val / width), math.floor(hi_val / width)
        self.lo = lo if self.lo is None else min(self.lo, lo)
        self.hi = hi if self.hi is None else max(self.hi, hi)
        n_lev = geo.levels.numel()
        self._table(lo, hi, n_lev)
        if bmin < 0 and self.zero_slot:
            self._take_zero_slot()
        nbt = self.raw.shape[2]
        if self._offsets is None or self._offsets[:2] != (self.t_lo, nbt):
            if self.raw.numel() >= 2**31:
                raise ValueError(f"layer {self.spec.name}: histogram of {nbt} bins is too wide "
                                 f"(inputs up to {max(abs(self.xmin), abs(self.xmax)):.3g} on a grid of {width:.3g})")
            offs = (geo.level_of.view(1, h, w_) * c + torch.arange(c).view(-1, 1, 1)) * nbt - self.t_lo
            self._offsets = (self.t_lo, nbt, offs.to(torch.int32))
        offs = self._offsets[2]
        per_img = c * h * w_
        idx = self.scratch.get(b * per_img, torch.int32).view(b, c, h, w_)
        step = max(1, _HIST_CHUNK // per_img)
        q_all = self.scratch.get(2 * min(b, step) * per_img, torch.float64)
        if self.pos_sum is None:
            self.pos_sum = torch.zeros(c, h, w_, dtype=torch.float64)
            self.pos_sq = torch.zeros(c, h, w_, dtype=torch.float64)
        for i in range(0, b, step):                                          # chunks stay in cache
            j = min(b, i + step)
            q = q_all[: (j - i) * per_img].view(j - i, c, h, w_)
            sq = q_all[(j - i) * per_img: 2 * (j - i) * per_img].view(j - i, c, h, w_)
            q.copy_(x4[i:j])
            ones = self._ones(j - i)                                         # float64 Σ x, Σ x² per position
            self.pos_sum.view(1, -1).addmm_(ones, q.view(j - i, -1))
            self.pos_sq.view(1, -1).addmm_(ones, torch.mul(q, q, out=sq).view(j - i, -1))
            q.div_(width)
            if self.zero_slot:
                q.sub_(_ZERO_SHIFT)
            q.floor_()
            ic = idx[i:j]
            ic.copy_(q)
            ic += offs
        if 4 * idx.numel() < self.raw.numel():          # small batch, big table: count several batches at once
            self._pending.append(idx.view(-1).clone())
            self._pending_n += idx.numel()
            if self._pending_n >= self.raw.numel():
                self._flush_hist()
        else:
            self.raw.view(-1).add_(torch.bincount(idx.view(-1), minlength=self.raw.numel()))
        if not self.zero_slot:
            zeros = b - (x4 != 0).sum(0, dtype=torch.int32)                 # (C, H, W) per position
            self.zero_in_bin0 += torch.zeros(c, n_lev, dtype=torch.int64).index_add_(
                1, geo.level_of.view(-1), zeros.view(c, -1).to(torch.int64)).T
        self.total += b * geo.per_image

    @staticmethod
    def _ones(n: int) -> torch.Tensor:
        return torch.ones(1, n, dtype=torch.float64)

    def _flush_hist(self) -> None:
        if self._pending:
            idx = torch.cat(self._pending) if len(self._pending) > 1 else self._pending[0]
            self.raw.view(-1).add_(torch.bincount(idx, minlength=self.raw.numel()))
            self._pending, self._pending_n = [], 0

    def _finish_histogram(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(edges, counts (C, n_bins), zero counts (C,)) from the raw table."""
        width = self.width or 1.0
        if self.raw is None:
            empty = np.zeros(self.c_in, np.int64)
            return width * np.arange(2, dtype=np.float64), np.zeros((self.c_in, 1), np.int64), empty
        self._take_zero_slot()
        levels = self.geo.levels
        raw = self.raw.clone()
        raw[:, :, -self.t_lo] -= self.zero_in_bin0
        folded = (raw * levels.view(-1, 1, 1)).sum(0)                           # (C, n_table_bins)
        counts = folded[:, self.lo - self.t_lo: self.hi - self.t_lo + 1]
        zeros = ((self.zero_lev + self.zero_in_bin0) * levels.view(-1, 1)).sum(0) + self.n_images * self.geo.pad_zeros
        edges = width * np.arange(self.lo, self.hi + 2, dtype=np.float64)
        return edges, counts.numpy(), zeros.numpy()

    def _second_moment(self, x4: torch.Tensor, geo: _Geometry, ho: int, wo: int, stride, pad) -> None:
        """X^T X of a random fraction of the patches, gathered from the padded input."""
        b = x4.shape[0]
        n = b * ho * wo
        take = n
        if self.m_fraction < 1.0:
            take = min(n, max(self.settings.m_min_patches_per_batch, int(round(self.m_fraction * n))))
        sel = torch.randperm(n, generator=self.gen)[:take] if take < n else torch.arange(n)
        img, pos = sel // (ho * wo), sel % (ho * wo)
        k = self.spec.fan_in
        if take * k < x4.numel():
            # few taps: gather them straight from the (B, C, H, W) input, padding taps masked to 0
            _, _, h, w = x4.shape
            dil = self.geometry[2]
            hh = ((pos // wo) * stride[0] - pad[0]).view(-1, 1, 1) + (torch.arange(self.kh) * dil[0]).view(1, -1, 1)
            ww = ((pos % wo) * stride[1] - pad[1]).view(-1, 1, 1) + (torch.arange(self.kw) * dil[1]).view(1, 1, -1)
            hh, ww = hh.expand(-1, self.kh, self.kw), ww.expand(-1, self.kh, self.kw)
            patches = x4[img.view(-1, 1, 1), :, hh.clamp(0, h - 1), ww.clamp(0, w - 1)]   # (take, kh, kw, C)
            if any(pad):
                patches *= ((hh >= 0) & (hh < h) & (ww >= 0) & (ww < w)).unsqueeze(-1)
            patches = patches.view(take, k)                                   # (take, K) in (kh, kw, C) order
        else:
            # channels-last padded copy: a patch is kh·kw rows of C contiguous values -> one index_select
            xcl = x4.permute(0, 2, 3, 1)
            xcl = F.pad(xcl, (0, 0, pad[1], pad[1], pad[0], pad[0])) if any(pad) else xcl.contiguous()
            hp, wp = geo.padded_hw
            base = img * (hp * wp) + (pos // wo) * (stride[0] * wp) + (pos % wo) * stride[1]
            rows = (base.view(-1, 1) + geo.koff.view(1, -1)).view(-1)
            patches = xcl.view(-1, self.c_in).index_select(0, rows).view(take, k)   # (take, K) in (kh, kw, C) order
        self.m_n += take
        if self.m_part is None:
            self.m_rows.append(patches)
            if sum(r.shape[0] for r in self.m_rows) > min(self.spec.fan_in, _MAX_KEPT_PATCHES):
                allp = torch.cat(self.m_rows)
                self.m_part, self.m_rows = allp.T @ allp, []
                self.m_part_batches = 1
        else:
            self.m_part.addmm_(patches.T, patches)
            self.m_part_batches += 1
        if self.m_part is not None and self.m_part_batches >= _M_FLUSH_BATCHES:
            self._flush_m()

    def _flush_m(self) -> None:
        if self.m_part is None or self.m_part_batches == 0:
            return
        if self.m_acc is None:
            self.m_acc = self.m_part.double()
        else:
            self.m_acc += self.m_part
        self.m_part.zero_()
        self.m_part_batches = 0

    def _perm(self) -> torch.Tensor:
        """(K,) position in the sampled (kh, kw, C) patch order of each row of PyTorch's (C, kh, kw) order."""
        kk = self.kh * self.kw
        return (torch.arange(kk).view(1, -1) * self.c_in + torch.arange(self.c_in).view(-1, 1)).reshape(-1)

    def _row_moments(self) -> tuple[np.ndarray, np.ndarray]:
        """E[x_k], E[x_k^2] per patch row: the per-position sums gathered by ``unfold`` (padding counts 0)."""
        (stride, pad, dil) = self.geometry
        maps = torch.stack([self.pos_sum, self.pos_sq])                      # (2, C, H, W) float64
        cols = F.unfold(maps, (self.kh, self.kw), dilation=dil, padding=pad, stride=stride)   # (2, K, L)
        sums = cols.sum(2) / (self.n_images * self.n_positions)
        return sums[0].numpy(), sums[1].numpy()

    # ------------------------------------------------------------------ result
    def finish(self) -> LayerStats:
        s, st = self.spec, self.settings
        n_patches = self.n_images * self.n_positions
        edges, counts, zeros = self._finish_histogram()
        row_mean, row_sq = self._row_moments()
        stats = LayerStats(
            name=s.name, kind=s.kind, weight_shape=tuple(int(d) for d in s.weight.shape), stride=tuple(s.stride),
            padding=tuple(s.padding), dilation=tuple(s.dilation), groups=int(s.groups), fan_in=s.fan_in,
            out_channels=s.out_channels, in_channels=self.c_in, n_positions=self.n_positions, n_patches=n_patches,
            signed_input=bool(self.xmin < 0), input_min=float(self.xmin), input_max=float(self.xmax),
            hist_edges=edges, hist_counts=_compact_counts(counts), zero_counts=zeros,
            total_counts=np.full(self.c_in, self.total, dtype=np.int64), row_mean=row_mean, row_sq_mean=row_sq,
            out_mean=(self.out_sum / n_patches).numpy(), out_sq_mean=(self.out_sq / n_patches).numpy(),
            m_method="dense", m_n_patches=int(self.m_n))
        m_n = max(self.m_n, 1)
        self._flush_m()
        # the sampled patches estimate the off-diagonal of M; rescaling row k by
        # sqrt(row_sq_k / sampled E[x_k^2]) makes the diagonal exact while keeping M PSD
        if self.m_acc is None and s.fan_in > st.m_dense_max_k:
            # fewer sampled patches than K: M_sampled = X^T X / n has rank <= n; its eigenpairs from
            # the Gram matrix of X (exact); what the top m_rank leave out goes to the diagonal
            x = torch.cat(self.m_rows)[:, self._perm()] / math.sqrt(m_n)   # (n, K) float32, M_sampled = x^T x
            x *= _diag_rescale((x * x).sum(0, dtype=torch.float64), row_sq).float()
            gvals, gvecs = torch.linalg.eigh(x @ x.T)                     # Gram (n, n) shares the eigenvalues
            order = torch.argsort(gvals, descending=True)[:st.m_rank]
            gvals, gvecs = gvals[order], gvecs[:, order]
            keep = gvals > gvals.max().clamp_min(1e-30) * 1e-6            # float32 Gram: smaller ones are noise
            gvals, gvecs = gvals[keep], gvecs[:, keep]
            vecs_t = (x.T @ gvecs) / gvals.sqrt()                          # unit eigenvectors of x^T x
            gvals = gvals.double()
            vals, vecs = gvals.numpy(), vecs_t.numpy()
            stats.m_method = "eig+diag"
            stats.m_eigvecs, stats.m_eigvals = vecs, vals
            stats.m_resid_diag = np.clip(row_sq - (vecs.astype(np.float64) ** 2) @ vals, 0.0, None)
            return stats
        if self.m_acc is None:
            allp = torch.cat(self.m_rows).double() if self.m_rows else torch.zeros(0, s.fan_in, dtype=torch.float64)
            self.m_acc = allp.T @ allp
        kk, k = self.kh * self.kw, s.fan_in
        m_t = self.m_acc.view(kk, self.c_in, kk, self.c_in).permute(1, 0, 3, 2).reshape(k, k)  # (C, kh, kw) order
        u = _diag_rescale(m_t.diagonal() / m_n, row_sq) / math.sqrt(m_n)
        m_t.mul_(u.view(-1, 1)).mul_(u.view(1, -1))                     # M = (X^T X / n)·s_k·s_l
        m_t.diagonal().copy_(torch.as_tensor(row_sq))
        m = m_t.numpy()
        if s.fan_in <= st.m_dense_max_k:
            stats.m_dense = m.astype(np.float32)
        else:
            stats.m_method = "eig+diag"
            stats.m_eigvecs, stats.m_eigvals, stats.m_resid_diag = low_rank_plus_diag(
                m, st.m_rank, st.m_power_iterations, seed=int(torch.randint(0, 2**31 - 1, (1,), generator=self.gen)))
        return stats


def probe_activations(folded: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], *,
                      settings: ProbeSettings = ProbeSettings(), seed: int = 0,
                      specs: list[AnalogLayerSpec] | None = None,
                      ) -> tuple[dict[str, LayerStats], np.ndarray, np.ndarray]:
    """Statistics of every analog layer of a batch-norm-folded ``folded`` model over ``batches``
    of (images, labels). Returns (layers in execution order, logits (N, n_classes), labels (N,))."""
    gen = torch.Generator().manual_seed(seed)
    modules = dict(folded.named_modules())
    accs: dict[str, _LayerAccumulator] = {}
    scratch = _Scratch()
    hooks = []
    logits, labels = [], []

    def hook_for(name: str):
        def hook(_m, inputs, output):
            with _single_thread():
                accs[name].update(inputs[0], output)
        return hook

    try:
        with torch.no_grad():
            for images, y in batches:
                if specs is None:
                    specs = analog_layers(folded, images[:1])
                if not hooks:
                    for spec in specs:
                        accs[spec.name] = _LayerAccumulator(spec, settings, gen, scratch)
                        hooks.append(modules[spec.name].register_forward_hook(hook_for(spec.name)))
                logits.append(folded(images).float())
                labels.append(torch.as_tensor(y))
    finally:
        for h in hooks:
            h.remove()
    if not logits:
        raise ValueError("probe_activations: no images")
    with _single_thread():
        layers = {name: acc.finish() for name, acc in accs.items()}
    return layers, torch.cat(logits).numpy(), torch.cat(labels).long().numpy()


def probe_model(model: nn.Module, model_name: str, dataset: str, *, root: str | None = None, n_images: int,
                seed: int = 0, batch_size: int = 100, progress: bool = True, weights: str | None = None,
                settings: ProbeSettings = ProbeSettings()) -> ActivationStats:
    """Probe the first ``n_images`` of the ``probe`` split of ``dataset`` (never the validation split)."""
    from tqdm.auto import tqdm

    from cimstat import data
    from cimstat.models import weights_fingerprint

    fp = weights_fingerprint(model)
    folded = fold_batchnorm(model)
    dl = data.loader(dataset, "probe", batch_size, root, n_images=n_images)
    batches = tqdm(dl, desc=f"probing {model_name} ({n_images} images)", unit="batch", disable=not progress)
    layers, logits, labels = probe_activations(folded, batches, settings=settings, seed=seed)
    info = data.info(dataset)
    meta = {
        "schema_version": SCHEMA_VERSION, "model": model_name, "fingerprint": fp,
        "weights": None if weights is None else str(weights),
        "dataset": dataset, "dataset_description": info.description,
        "data_root": None if root is None else str(root),
        "split": "probe",
        "split_note": ("first n_images of the 'probe' split, disjoint from the 'validation' split that Monte Carlo "
                       "validation uses (cimstat.data)"),
        "n_images": int(len(labels)), "seed": int(seed), "created": utc_now(),
        "n_classes": int(logits.shape[1]),
        "layer_names": list(layers), "layer_shapes": {n: list(l.weight_shape) for n, l in layers.items()},
        "settings": asdict(settings),
    }
    return ActivationStats(meta=meta, layers=layers, logits=logits, labels=labels)
