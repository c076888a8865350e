"""Activation probing: one float pass over N probe images -> :class:`cimstat.probes.ActivationStats`.

For every analog layer (Conv2d / Linear of the batch-norm-folded model) a forward hook sees
the layer input ``x`` and float output ``y`` and accumulates, over the rows of the im2col
patches (padding zeros included, every output position of every image):

* per input channel histograms on a layer-wide uniform grid of width ``w = max|x| / bins_per_max``
  (``max|x|`` of the first batch; the grid grows with integer bin offsets if later values fall
  outside, so edges stay ``w·i``), exact zeros counted separately. A padded input position
  contributes once per patch containing it: it is counted with its *multiplicity* (the number
  of kernel offsets that reach it), which is exactly the patch-row statistic without
  building the patches.
* ``row_mean``, ``row_sq_mean`` (K,) from strided slices of the padded input, one per kernel offset.
* ``M = E[x x^T]``: ``X^T X`` of a random fraction ``f`` of the patches (float32 sums; ``f = 1``
  uses every patch). Row/column ``k`` is then rescaled by ``sqrt(row_sq_mean_k / sampled E[x_k^2])``:
  the diagonal is exact, the matrix stays PSD and its trace (random-dW error) is unbiased.
  ``f = min(1, m_cost_ratio·C_out/K)`` bounds the cost of ``M`` to ``m_cost_ratio`` times the
  layer's own multiply-accumulates. Stored dense when ``K <= m_dense_max_k``, otherwise as the
  top-``m_rank`` eigenpairs (randomized subspace iteration) plus the exact residual diagonal.
* ``out_mean``, ``out_sq_mean`` per output channel.
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
    m_cost_ratio: float | None = 1.0
    """Cost of M as a multiple of the layer's MACs (sets the patch fraction); None = all patches."""
    m_dense_max_k: int = 1152
    """Store M dense up to this K; above, compress to ``m_rank`` eigenpairs + exact diagonal."""
    m_min_patches_per_batch: int = 64
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
    b = q64.T @ m64 @ q64
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


def _compact_counts(counts: np.ndarray) -> np.ndarray:
    """int32 when the counts fit (halves the file), else int64."""
    return counts.astype(np.int32) if counts.size == 0 or counts.max() < 2**31 else counts


class _LayerAccumulator:
    """Running sums of one analog layer's statistics (see the module docstring)."""

    def __init__(self, spec: AnalogLayerSpec, settings: ProbeSettings, gen: torch.Generator):
        if spec.groups != 1:
            raise NotImplementedError(f"layer {spec.name}: grouped convolutions (groups={spec.groups}) are not supported")
        self.spec, self.settings, self.gen = spec, settings, gen
        self.kh, self.kw = spec.kernel_size
        k, c_out = spec.fan_in, spec.out_channels
        self.c_in = k // (self.kh * self.kw)
        self.m_fraction = 1.0 if settings.m_cost_ratio is None else min(1.0, settings.m_cost_ratio * c_out / k)
        self.width: float | None = None
        self.lo = 0
        self.counts = torch.zeros(self.c_in, 0, dtype=torch.float64)
        self.zero = torch.zeros(self.c_in, dtype=torch.float64)
        self.total = torch.zeros(self.c_in, dtype=torch.float64)
        self.pos_sum: torch.Tensor | None = None   # (C, Hp, Wp) float64: Σ over images of the padded input
        self.pos_sq: torch.Tensor | None = None
        self.m_sum: torch.Tensor | None = None     # (K, K) float32 once more than K patches are kept
        self.m_rows: list[torch.Tensor] = []       # sampled patches while fewer than K (low rank: exact SVD)
        self.m_n = 0
        self.out_sum = torch.zeros(c_out, dtype=torch.float64)
        self.out_sq = torch.zeros(c_out, dtype=torch.float64)
        self.n_images = 0
        self.n_positions = 0
        self.out_hw = (1, 1)
        self.geometry: tuple = ((1, 1), (0, 0), (1, 1))
        self.xmin, self.xmax = math.inf, -math.inf
        self._mult: dict[tuple, torch.Tensor] = {}

    # ------------------------------------------------------------------ per batch
    def update(self, x: torch.Tensor, y: torch.Tensor) -> None:
        x = x.detach().float()
        y = y.detach().float()
        s = self.spec
        if s.kind == "linear":
            x4, y4 = x.reshape(x.shape[0], -1, 1, 1), y.reshape(y.shape[0], -1, 1, 1)
            stride, pad, dil = (1, 1), (0, 0), (1, 1)
        else:
            x4, y4, stride, pad, dil = x, y, s.stride, s.padding, s.dilation
        self.geometry = (stride, pad, dil)
        b = x4.shape[0]
        ho, wo = y4.shape[2:]
        self.n_images += b
        self.n_positions, self.out_hw = ho * wo, (ho, wo)
        self.xmin, self.xmax = min(self.xmin, float(x4.min())), max(self.xmax, float(x4.max()))
        xp = F.pad(x4, (pad[1], pad[1], pad[0], pad[0])) if any(pad) else x4
        key = (tuple(x4.shape[2:]), (ho, wo))
        if key not in self._mult:
            self._mult[key] = multiplicity_map(key[0], key[1], (self.kh, self.kw), stride, pad, dil)
        mult = self._mult[key]
        self._histogram(xp, mult)
        # Σ over images per padded position; the per-row sums are then offset sums of these small maps
        ps, pq = xp.sum(0, dtype=torch.float64), (xp * xp).sum(0, dtype=torch.float64)
        if self.pos_sum is None or self.pos_sum.shape != ps.shape:
            if self.pos_sum is not None:
                raise ValueError(f"layer {s.name}: input size changed from {tuple(self.pos_sum.shape)} to "
                                 f"{tuple(ps.shape)} (probe images must all have the same size)")
            self.pos_sum, self.pos_sq = ps, pq
        else:
            self.pos_sum += ps
            self.pos_sq += pq
        self._second_moment(xp, ho, wo, stride, dil)
        yc = y4.transpose(0, 1).reshape(y4.shape[1], -1)                  # (C_out, B*Ho*Wo)
        self.out_sum += yc.sum(1).double()
        self.out_sq += torch.linalg.vecdot(yc, yc).double()

    def _histogram(self, xp: torch.Tensor, mult: torch.Tensor) -> None:
        """One pass: flat index (channel, multiplicity level, bin) with a zero bin per channel."""
        b = xp.shape[0]
        self.total += float(mult.sum()) * b
        if self.width is None:
            amax = max(abs(self.xmin), abs(self.xmax))
            self.width = (amax if amax > 0 else 1.0) / self.settings.bins_per_max
        lo = math.floor(float(xp.min()) / self.width)
        hi = math.floor(float(xp.max()) / self.width)
        nb = self.counts.shape[1]
        if nb == 0:
            self.lo, self.counts = lo, torch.zeros(self.c_in, hi - lo + 1, dtype=torch.float64)
        elif lo < self.lo or hi >= self.lo + nb:
            new_lo, new_hi = min(lo, self.lo), max(hi, self.lo + nb - 1)
            grown = torch.zeros(self.c_in, new_hi - new_lo + 1, dtype=torch.float64)
            grown[:, self.lo - new_lo: self.lo - new_lo + nb] = self.counts
            self.lo, self.counts = new_lo, grown
        nb = self.counts.shape[1]
        idx = torch.floor(xp.double() / self.width).long() - self.lo       # (B, C, Hp, Wp) in [0, nb)
        idx.masked_fill_(xp == 0, nb)                                      # bin nb: exact zeros
        idx += torch.arange(self.c_in).view(1, -1, 1, 1) * (nb + 1)
        # each padded position counts once per patch containing it (float32 counts are exact per batch)
        weights = mult.to(torch.float32).expand(xp.shape).reshape(-1)
        hist = torch.bincount(idx.reshape(-1), weights=weights, minlength=self.c_in * (nb + 1))
        hist = hist.view(self.c_in, nb + 1).to(torch.float64)
        self.counts += hist[:, :nb]
        self.zero += hist[:, nb]

    def _second_moment(self, xp: torch.Tensor, ho: int, wo: int, stride, dil) -> None:
        """X^T X of a random fraction of the patches, gathered from the padded input."""
        b = xp.shape[0]
        n = b * ho * wo
        take = n
        if self.m_fraction < 1.0:
            take = min(n, max(self.settings.m_min_patches_per_batch, int(round(self.m_fraction * n))))
        sel = torch.randperm(n, generator=self.gen)[:take] if take < n else torch.arange(n)
        img, pos = sel // (ho * wo), sel % (ho * wo)
        oh, ow = (pos // wo) * stride[0], (pos % wo) * stride[1]
        di = torch.arange(self.kh) * dil[0]
        dj = torch.arange(self.kw) * dil[1]
        rows = (oh.view(-1, 1, 1) + di.view(1, -1, 1)).expand(-1, self.kh, self.kw)
        cols_ = (ow.view(-1, 1, 1) + dj.view(1, 1, -1)).expand(-1, self.kh, self.kw)
        patches = xp[img.view(-1, 1, 1), :, rows, cols_]                   # (take, kh, kw, C)
        patches = patches.permute(0, 3, 1, 2).reshape(take, -1)            # (take, K) in (C, kh, kw) order
        self.m_n += take
        if self.m_sum is None:
            self.m_rows.append(patches)
            if sum(r.shape[0] for r in self.m_rows) > min(self.spec.fan_in, _MAX_KEPT_PATCHES):
                allp = torch.cat(self.m_rows)
                self.m_sum, self.m_rows = allp.T @ allp, []
        else:
            self.m_sum.addmm_(patches.T, patches)

    def _row_moments(self) -> tuple[np.ndarray, np.ndarray]:
        (ho, wo), (stride, _pad, dil) = self.out_hw, self.geometry
        rs = torch.zeros(self.c_in, self.kh, self.kw, dtype=torch.float64)
        rq = torch.zeros_like(rs)
        for i in range(self.kh):
            for j in range(self.kw):
                sl = (slice(None), slice(i * dil[0], i * dil[0] + stride[0] * (ho - 1) + 1, stride[0]),
                      slice(j * dil[1], j * dil[1] + stride[1] * (wo - 1) + 1, stride[1]))
                rs[:, i, j] = self.pos_sum[sl].sum((1, 2))
                rq[:, i, j] = self.pos_sq[sl].sum((1, 2))
        n = self.n_images * self.n_positions
        return (rs / n).reshape(-1).numpy(), (rq / n).reshape(-1).numpy()

    # ------------------------------------------------------------------ result
    def finish(self) -> LayerStats:
        s, st = self.spec, self.settings
        n_patches = self.n_images * self.n_positions
        counts = self.counts.round().long()
        nb = counts.shape[1]
        if nb == 0:  # every input was exactly zero
            counts, self.lo = torch.zeros(self.c_in, 1, dtype=torch.int64), 0
            nb = 1
        width = self.width or 1.0
        edges = width * np.arange(self.lo, self.lo + nb + 1, dtype=np.float64)
        row_mean, row_sq = self._row_moments()
        stats = LayerStats(
            name=s.name, kind=s.kind, weight_shape=tuple(int(d) for d in s.weight.shape), stride=tuple(s.stride),
            padding=tuple(s.padding), dilation=tuple(s.dilation), groups=int(s.groups), fan_in=s.fan_in,
            out_channels=s.out_channels, in_channels=self.c_in, n_positions=self.n_positions, n_patches=n_patches,
            signed_input=bool(self.xmin < 0), input_min=float(self.xmin), input_max=float(self.xmax),
            hist_edges=edges, hist_counts=_compact_counts(counts.numpy()), zero_counts=self.zero.round().long().numpy(),
            total_counts=self.total.round().long().numpy(), row_mean=row_mean, row_sq_mean=row_sq,
            out_mean=(self.out_sum / n_patches).numpy(), out_sq_mean=(self.out_sq / n_patches).numpy(),
            m_method="dense", m_n_patches=int(self.m_n))
        m_n = max(self.m_n, 1)
        # the sampled patches estimate the off-diagonal of M; rescaling row k by
        # sqrt(row_sq_k / sampled E[x_k^2]) makes the diagonal exact while keeping M PSD
        if self.m_sum is None and s.fan_in > st.m_dense_max_k:
            # fewer sampled patches than K: M_sampled = X^T X / n has rank <= n; its eigenpairs from
            # the Gram matrix of X (exact); what the top m_rank leave out goes to the diagonal
            x = torch.cat(self.m_rows).double() / math.sqrt(m_n)        # (n, K), M_sampled = x^T x
            x *= _diag_rescale((x * x).sum(0), row_sq)
            with _single_thread():
                gvals, gvecs = torch.linalg.eigh(x @ x.T)                 # Gram (n, n) shares the eigenvalues
            order = torch.argsort(gvals, descending=True)[:st.m_rank]
            gvals, gvecs = gvals[order], gvecs[:, order]
            keep = gvals > gvals.max().clamp_min(1e-300) * 1e-12
            gvals, gvecs = gvals[keep], gvecs[:, keep]
            vecs_t = (x.T @ gvecs) / gvals.sqrt()                          # unit eigenvectors of x^T x
            vals, vecs = gvals.numpy(), vecs_t.numpy()
            stats.m_method = "eig+diag"
            stats.m_eigvecs, stats.m_eigvals = vecs.astype(np.float32), vals
            stats.m_resid_diag = np.clip(row_sq - (vecs * vecs) @ vals, 0.0, None)
            return stats
        if self.m_sum is None:
            allp = torch.cat(self.m_rows) if self.m_rows else torch.zeros(0, s.fan_in)
            self.m_sum = allp.T @ allp
        m_t = self.m_sum.double() / m_n
        scale = _diag_rescale(m_t.diagonal().clone(), row_sq)
        m_t = m_t * scale.view(-1, 1) * scale.view(1, -1)
        m = m_t.numpy()
        np.fill_diagonal(m, row_sq)
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
    hooks = []
    logits, labels = [], []

    def hook_for(name: str):
        def hook(_m, inputs, output):
            accs[name].update(inputs[0], output)
        return hook

    try:
        with torch.no_grad():
            for images, y in batches:
                if specs is None:
                    specs = analog_layers(folded, images[:1])
                if not hooks:
                    for spec in specs:
                        accs[spec.name] = _LayerAccumulator(spec, settings, gen)
                        hooks.append(modules[spec.name].register_forward_hook(hook_for(spec.name)))
                logits.append(folded(images).float())
                labels.append(torch.as_tensor(y))
    finally:
        for h in hooks:
            h.remove()
    if not logits:
        raise ValueError("probe_activations: no images")
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
