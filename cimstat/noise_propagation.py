"""How errors of each analog layer reach the logits (linear regime around the float network).

Let ``y_{c,p}`` be output channel ``c`` at position ``p`` of an analog layer, ``z_j`` logit ``j``
and ``g_{j,c,p} = ∂z_j/∂y_{c,p}`` (per image). Two kinds of error leave a layer (DESIGN.md §4):

* per-read errors, independent from one position to the next: white noise of variance σ² at
  every position of channel ``c`` adds ``σ² · ratio[c, j]`` to the variance of logit ``j`` with
  ``ratio[c, j] = E_x Σ_p g_{j,c,p}²``;
* fixed weight errors ``dW`` (shared by every position): ``∂z_j/∂W_{c,k} = Σ_p g_{j,c,p} x_{k,p}``
  (``x`` the im2col patch), so independent perturbations of variance ``s_k²`` add
  ``Σ_k s_k² S_k`` to ``Σ_j Var z_j`` with ``S_k = E_x Σ_j (∂z_j/∂W_k)²`` (``weight_sens``),
  and ``Σ_{k in c} s² E_x (∂z_j/∂W_{c,k})²`` to logit ``j`` (``weight_sens_class``, uniform s per channel).

``jacobian``: one backward pass per class (exact; the default), or ``class_probes`` random
Rademacher projections ``u`` of the logits (Hutchinson, for 1000 classes): with ``s = u·g``,
``E[s²] = Σ_j g_j²``, so sums over classes (``weight_sens``, row totals of ``ratio`` and
``weight_sens_class``) are unbiased, and the per-class columns are those totals spread
uniformly over the classes. (An unbiased per-class estimator, ``E[(u_j²-1)s²]/2 = g_j²`` with
Gaussian ``u``, needs far more projections than there are classes to beat the uniform spread:
measured no better with 800 projections for 40 classes, so it is not offered.)
Per-sample weight gradients are the batched product of ``g`` with the layer's im2col patches.
Coherent (deterministic) errors — a relative gain error ``a_c`` of channel ``c`` (its output
without bias scaled by ``1 + a_c``) or a constant offset ``m_c`` — move the logits of image ``n``
by ``Σ_c a_c·gain_jac[n,c,d] + m_c·offset_jac[n,c,d]`` with ``gain_jac = Σ_p (y_cp - b_c)·g_{d,c,p}``,
``offset_jac = Σ_p g_{d,c,p}``; they are kept per image so that errors of every layer add as
amplitudes (a gain error common to all layers shrinks the logits coherently: 20 layers each
shrinking by ε cost (20ε)², not 20ε²) and so that top-1 sees the per-image shift.
A fixed perturbation ``dW`` is one draw, not an average: it moves logit direction ``d`` of image
``n`` by exactly ``Σ_{c,k} dW_ck ∂z_d/∂W_ck``. Layers small enough (``N·D·C_out·K ≤``
``GRAD_MAX_ELEMENTS`` with ``keep_grads=N`` images: the default model's conv1, fc and a
downsample) keep these per-sample weight gradients (``weight_grad``), so one draw of rounding
errors is propagated exactly, cross-channel cancellations included: for conv1 of the default
model at 6 weight bits the per-weight route ``Σ dW² S`` over-predicts the logit energy 1.9x and
a per-channel Gram 2.5-2.7x (errors of different channels cancel downstream). The other layers
(``N·D·C_out·P ≤ OUT_GRAD_MAX_ELEMENTS``) keep the factors instead: their output gradients
``g_{d,c,p}`` (``out_grad``, float16 over a per-layer scale) and input activations (``layer_input``),
from which ``Σ_{c,k} dW_ck ∂z_d/∂W_ck = Σ_{c,p} g_{d,c,p}·(dW * x)_{c,p}`` costs one forward pass of the
layer (default model: 83 M gradients, +185 MB on disk; 0.34 s to propagate a weight error of all layers).
``injection`` (the slow reference for ``ratio``): Gaussian noise added to one channel at a
time at every position, logit variance divided by σ².
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cimstat.input_sample import collect_input_samples_with_gradients
from cimstat.network import AnalogLayerSpec, analog_layers, fold_batchnorm
from cimstat.probes import NOISE_SCHEMA_VERSION, ActivationStats, LayerNoiseProp, NoiseProp, utc_now

__all__ = ["jacobian_propagation", "injection_ratio", "noise_propagation"]

_CHUNK_ELEMENTS = 8_000_000  # per-sample weight-gradient chunk (floats)
GRAD_MAX_ELEMENTS = 8_000_000  #: layers with N·D·C_out·K up to this keep their per-sample weight gradients
#: other layers with N·D·C_out·P up to this keep their output gradients and inputs (``out_grad``, ``layer_input``)
OUT_GRAD_MAX_ELEMENTS = 16_000_000


@dataclass
class _Sums:
    ratio: torch.Tensor        # (C_out, n_classes)
    sens: torch.Tensor         # (C_out, K)
    sens_class: torch.Tensor   # (C_out, n_classes)
    ratio_img: list[torch.Tensor]  # per batch (B, D): Σ_c Σ_p g², per image
    sens_img: list[torch.Tensor]   # per batch (B, D): Σ_c Σ_k (∂z_d/∂W_ck)², per image
    gain: list[torch.Tensor]   # per batch (B, C_out, D)
    offset: list[torch.Tensor]  # per batch (B, C_out, D)
    grads: list[torch.Tensor] | None = None  # per batch (B, D, C_out, K) per-sample weight gradients, small layers
    out_grads: list[torch.Tensor] | None = None  # per batch (B, D, C_out, P) output gradients, the other layers
    inputs: list[torch.Tensor] | None = None     # per batch: the layer's input activations (with out_grads)


def _patches(spec: AnalogLayerSpec, x: torch.Tensor) -> torch.Tensor:
    """(B, K, P) im2col patches of the layer input."""
    if spec.kind == "linear":
        return x.reshape(x.shape[0], -1, 1)
    return F.unfold(x, spec.kernel_size, dilation=spec.dilation, padding=spec.padding, stride=spec.stride)


def _class_route_update(acc: _Sums, g: torch.Tensor, cols: torch.Tensor, weight: float,
                        class_w: torch.Tensor | None, d: int, keep: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample weight gradients ``gw[b] = g[b] cols[b]^T`` (B, C, K), chunked over images;
    adds ``weight·Σ_b gw²`` to ``sens`` and the per-image channel sums to ``sens_class``
    (column ``d`` when exact, else weighted by ``class_w (B, n_classes)``); returns the per-image
    channel sums ``Σ_k gw²`` (B, C)."""
    b, c, _ = g.shape
    k = cols.shape[1]
    step = max(1, _CHUNK_ELEMENTS // max(1, c * k))
    per_image = []
    for i in range(0, b, step):
        gw = torch.bmm(g[i:i + step], cols[i:i + step].transpose(1, 2))  # (b', C, K)
        if keep is not None:
            keep[i:i + step, d] = gw
        gw.mul_(gw)
        acc.sens += gw.sum(0).double().mul_(weight)
        t = gw.sum(2).double()                                             # (b', C)
        per_image.append(t)
        if class_w is None:
            acc.sens_class[:, d] += t.sum(0)
        else:
            acc.sens_class += t.T @ class_w[i:i + step]
    return torch.cat(per_image)


def _pair_route_update(pair: torch.Tensor, gram: torch.Tensor, acc: _Sums, g: torch.Tensor, weight: float,
                       class_w: torch.Tensor | None, d: int, cols: torch.Tensor | None = None,
                       keep: torch.Tensor | None = None) -> torch.Tensor:
    """Few positions P: accumulate ``A[b,c,p,q] += weight·g[b,c,p] g[b,c,q]``; ``Σ_k gw² = g Gram g``."""
    pair += weight * torch.einsum("bcp,bcq->bcpq", g, g)
    if keep is not None:
        keep[:, d] = torch.bmm(g, cols.transpose(1, 2))                      # (B, C, K)
    t = ((g @ gram) * g).sum(2).double()                                  # (B, C)
    if class_w is None:
        acc.sens_class[:, d] += t.sum(0)
    else:
        acc.sens_class += t.T @ class_w
    return t


def _pair_route_finish(pair: torch.Tensor, cols: torch.Tensor, acc: _Sums) -> None:
    """``sens[c,k] += Σ_{b,p,q} A[b,c,p,q] x[b,k,p] x[b,k,q]`` as one matrix product."""
    b, c, p, _ = pair.shape
    step = max(1, _CHUNK_ELEMENTS // max(1, p * p * cols.shape[1]))
    for i in range(0, b, step):
        xx = torch.einsum("bkp,bkq->bpqk", cols[i:i + step], cols[i:i + step]).reshape(-1, cols.shape[1])
        acc.sens += (pair[i:i + step].permute(1, 0, 2, 3).reshape(c, -1) @ xx).double()


_PAIR_MAX_POSITIONS = 16


def jacobian_propagation(folded: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], *,
                         specs: list[AnalogLayerSpec] | None = None, class_probes: int | None = None,
                         weight_sens: bool = True, seed: int = 0, keep_grads: int | None = None,
                         ) -> tuple[dict[str, LayerNoiseProp], int, str]:
    """``ratio``, ``weight_sens``, ``weight_sens_class`` of every analog layer from gradients.

    ``class_probes=None``: one backward per class (exact); otherwise ``class_probes`` Rademacher
    projections (sums over classes unbiased, per-class columns uniform). Returns
    (layers, n_images, class estimator description).
    """
    gen = torch.Generator().manual_seed(seed)
    modules = dict(folded.named_modules())
    params = [p.requires_grad for p in folded.parameters()]
    for p in folded.parameters():
        p.requires_grad_(False)
    captured: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def hook_for(name: str):
        def hook(_m, inputs, output):
            # the network continues with a copy: torchvision's in-place ReLU / residual add would
            # otherwise rebase `output` and its gradient would be that of the ReLU output
            captured[name] = (inputs[0].detach(), output)
            return output.clone()
        return hook

    sums: dict[str, _Sums] = {}
    hooks = []
    n_images = 0
    estimator = ""
    try:
        for images, _labels in batches:
            if specs is None:
                with torch.no_grad():
                    specs = analog_layers(folded, images[:1])
            if not hooks:
                hooks = [modules[s.name].register_forward_hook(hook_for(s.name)) for s in specs]
            x = images.detach().to(next(folded.parameters()).dtype).clone().requires_grad_(True)
            with torch.enable_grad():
                z = folded(x)
                b, n_cls = z.shape
                exact = class_probes is None
                n_dirs = n_cls if exact else int(class_probes)
                estimator = "exact_per_class" if exact else f"rademacher_projections({n_dirs}), classes uniform"
                if not sums:
                    for s in specs:
                        small = (weight_sens and keep_grads is not None
                                 and keep_grads * n_dirs * s.out_channels * s.fan_in <= GRAD_MAX_ELEMENTS)
                        n_pos = captured[s.name][1][0].numel() // s.out_channels
                        maps = (weight_sens and keep_grads is not None and not small
                                and keep_grads * n_dirs * s.out_channels * n_pos <= OUT_GRAD_MAX_ELEMENTS)
                        sums[s.name] = _Sums(torch.zeros(s.out_channels, n_cls, dtype=torch.float64),
                                             torch.zeros(s.out_channels, s.fan_in, dtype=torch.float64),
                                             torch.zeros(s.out_channels, n_cls, dtype=torch.float64), [], [], [], [],
                                             [] if small else None, [] if maps else None, [] if maps else None)
                ys = [captured[s.name][1] for s in specs]
                # outputs without their bias, (B, C_out, P): the direction of a relative gain error
                y_nb = {}
                for s in specs:
                    bias = modules[s.name].bias
                    y = captured[s.name][1].detach().reshape(b, s.out_channels, -1)
                    y_nb[s.name] = y - bias.detach().reshape(1, -1, 1) if bias is not None else y
                gain_b = {s.name: torch.zeros(b, s.out_channels, n_dirs) for s in specs}
                ratio_b = {s.name: torch.zeros(b, n_dirs, dtype=torch.float64) for s in specs}
                grads_b = {s.name: torch.zeros(b, n_dirs, s.out_channels, s.fan_in, dtype=z.dtype)
                           for s in specs if sums[s.name].grads is not None}
                sens_b = {s.name: torch.zeros(b, n_dirs, dtype=torch.float64) for s in specs}
                out_b = {s.name: torch.zeros(b, n_dirs, s.out_channels, y_nb[s.name].shape[2], dtype=z.dtype)
                         for s in specs if sums[s.name].out_grads is not None}
                offset_b = {s.name: torch.zeros(b, s.out_channels, n_dirs) for s in specs}
                cols = {s.name: _patches(s, captured[s.name][0]) for s in specs} if weight_sens else {}
                pair = {s.name: torch.zeros(b, s.out_channels, cols[s.name].shape[2], cols[s.name].shape[2], dtype=z.dtype)
                        for s in specs if weight_sens and cols[s.name].shape[2] <= _PAIR_MAX_POSITIONS}
                gram = {n: cols[n].transpose(1, 2) @ cols[n] for n in pair}
                for d in range(n_dirs):
                    if exact:
                        class_w, weight = None, 1.0
                        grad_out = torch.zeros_like(z)
                        grad_out[:, d] = 1.0
                    else:
                        u = torch.randint(0, 2, (b, n_cls), generator=gen).to(z.dtype).mul_(2).sub_(1)
                        class_w, weight = torch.full((b, n_cls), 1.0 / (n_dirs * n_cls), dtype=torch.float64), 1.0 / n_dirs
                        grad_out = u
                    grads = torch.autograd.grad(z, ys, grad_outputs=grad_out, retain_graph=d < n_dirs - 1)
                    for s, g in zip(specs, grads):
                        g = g.detach().reshape(b, s.out_channels, -1)
                        gain_b[s.name][:, :, d] = (g * y_nb[s.name]).sum(2)
                        offset_b[s.name][:, :, d] = g.sum(2)
                        if s.name in out_b:
                            out_b[s.name][:, d] = g
                        per_img = (g * g).sum(2, dtype=torch.float64)            # (B, C_out)
                        ratio_b[s.name][:, d] = per_img.sum(1)
                        acc = sums[s.name]
                        if exact:
                            acc.ratio[:, d] += per_img.sum(0)
                        else:
                            acc.ratio += per_img.T @ class_w
                        if not weight_sens:
                            continue
                        if s.name in pair:
                            t = _pair_route_update(pair[s.name], gram[s.name], acc, g, weight, class_w, d,
                                                   cols[s.name], grads_b.get(s.name))
                        else:
                            t = _class_route_update(acc, g, cols[s.name], weight, class_w, d, grads_b.get(s.name))
                        sens_b[s.name][:, d] = t.sum(1)
                for name in pair:
                    _pair_route_finish(pair[name], cols[name], sums[name])
                for s in specs:
                    sums[s.name].gain.append(gain_b[s.name])
                    sums[s.name].offset.append(offset_b[s.name])
                    sums[s.name].ratio_img.append(ratio_b[s.name])
                    sums[s.name].sens_img.append(sens_b[s.name])
                    if s.name in grads_b:
                        sums[s.name].grads.append(grads_b[s.name])
                    if s.name in out_b:
                        sums[s.name].out_grads.append(out_b[s.name])
                        sums[s.name].inputs.append(captured[s.name][0].reshape(b, -1) if s.kind == "linear"
                                                   else captured[s.name][0])
            n_images += b
            captured.clear()
    finally:
        for h in hooks:
            h.remove()
        for p, req in zip(folded.parameters(), params):
            p.requires_grad_(req)
    if n_images == 0:
        raise ValueError("jacobian_propagation: no images")
    out = {}
    for name, acc in sums.items():
        # float32 on disk: 4-byte precision is far below the statistical error of the estimates
        out[name] = LayerNoiseProp(name, (acc.ratio / n_images).float().numpy(),
                                   (acc.sens / n_images).float().numpy(), (acc.sens_class / n_images).float().numpy(),
                                   torch.cat(acc.gain).float().numpy(), torch.cat(acc.offset).float().numpy(),
                                   torch.cat(acc.ratio_img).float().numpy(), torch.cat(acc.sens_img).float().numpy(),
                                   # float16 on disk: 1e-3 relative precision, the size of the file halved
                                   None if not acc.grads else torch.cat(acc.grads).half().numpy())
        if acc.out_grads:
            g = torch.cat(acc.out_grads)
            scale = float(g.abs().max()) or 1.0  # float16 on disk, the largest gradient at 1
            out[name].out_grad = (g / scale).half().numpy()
            out[name].out_grad_scale = scale
            out[name].layer_input = torch.cat(acc.inputs).half().numpy()
    return out, n_images, estimator


def injection_ratio(folded: nn.Module, layer: str, images: torch.Tensor, sigma: float | torch.Tensor, *,
                    channels: Sequence[int] | None = None, draws: int = 4, seed: int = 0,
                    group: int = 8) -> np.ndarray:
    """``ratio[c, :]`` of ``layer`` by injection: N(0, σ_c²) added independently at every position of
    output channel ``c`` (``group`` channels per forward, each in its own copy of the batch),
    ``draws`` noise draws per image; returns ``(len(channels), n_classes)`` = mean (Δz)² / σ_c²."""
    gen = torch.Generator().manual_seed(seed)
    module = dict(folded.named_modules())[layer]
    dtype = next(folded.parameters()).dtype
    images = images.to(dtype)
    with torch.no_grad():
        z0 = folded(images)
    n, n_cls = z0.shape
    probe_out: list[torch.Tensor] = []
    h = module.register_forward_hook(lambda _m, _i, o: probe_out.append(o))
    with torch.no_grad():
        folded(images[:1])
    h.remove()
    c_out = probe_out[0].shape[1]
    channels = list(range(c_out)) if channels is None else list(channels)
    sig = torch.as_tensor(sigma, dtype=dtype).expand(c_out) if torch.as_tensor(sigma).ndim == 0 \
        else torch.as_tensor(sigma, dtype=dtype)
    out = np.zeros((len(channels), n_cls))
    state: dict[str, torch.Tensor] = {}

    def add_noise(_m, _i, o):
        return o + state["noise"]

    h = module.register_forward_hook(add_noise)
    try:
        with torch.no_grad():
            for start in range(0, len(channels), group):
                chans = channels[start:start + group]
                g = len(chans)
                batch = images.repeat(g, *([1] * (images.ndim - 1)))
                acc = torch.zeros(g, n_cls, dtype=torch.float64)
                for _ in range(draws):
                    noise = torch.zeros((g * n, *probe_out[0].shape[1:]), dtype=dtype)
                    for i, c in enumerate(chans):
                        sl = noise[i * n:(i + 1) * n, c]
                        sl.copy_(torch.randn(sl.shape, generator=gen, dtype=dtype) * sig[c])
                    state["noise"] = noise
                    dz = (folded(batch) - z0.repeat(g, 1)).double().reshape(g, n, n_cls)
                    acc += (dz * dz).sum(1)
                s2 = (sig[chans].double() ** 2).reshape(g, 1)
                out[start:start + g] = (acc / (n * draws) / s2).numpy()
    finally:
        h.remove()
    return out


def noise_propagation(model: nn.Module, model_name: str, dataset: str, stats: ActivationStats, *,
                      root: str | None = None, n_images: int, method: str = "jacobian", batch_size: int = 32,
                      seed: int = 0, class_probes: int | None = None, injection_sigma_rel: float = 1e-3,
                      injection_draws: int = 2, progress: bool = True) -> NoiseProp:
    """Noise propagation data of every analog layer over the first ``n_images`` probe images.

    ``method="jacobian"``: everything from gradients. ``"injection"``: ``ratio`` by noise injection
    (σ_c = ``injection_sigma_rel`` · rms of channel c's float output), ``weight_sens*`` still from
    per-sample gradients (there is no injection equivalent short of perturbing every weight).
    """
    from tqdm.auto import tqdm

    from cimstat import data
    from cimstat.errors import ProbeFileError
    from cimstat.models import weights_fingerprint
    from cimstat.probes import check_fingerprint

    if method not in ("jacobian", "injection"):
        raise ValueError(f"method={method!r}; expected 'jacobian' or 'injection'")
    check_fingerprint(stats.meta, weights_fingerprint(model))
    if stats.meta["dataset"] != dataset:
        raise ProbeFileError(f"activation statistics are for dataset {stats.meta['dataset']!r}, not {dataset!r}")
    if n_images > stats.meta["n_images"]:
        raise ProbeFileError(f"n_images={n_images} exceeds the {stats.meta['n_images']} images the activation "
                             "statistics were probed on (noise propagation uses a prefix of the same images)")
    folded = fold_batchnorm(model)
    dl = data.loader(dataset, "probe", batch_size, root, n_images=n_images)
    batches = tqdm(dl, desc=f"noise propagation ({method}, {n_images} images)", unit="batch", disable=not progress)
    layers, n, estimator = jacobian_propagation(folded, batches, class_probes=class_probes, seed=seed,
                                                keep_grads=n_images)
    if method == "injection":
        images = torch.cat([im for im, _ in data.loader(dataset, "probe", batch_size, root, n_images=n_images)])
        for name in tqdm(list(layers), desc="injection", unit="layer", disable=not progress):
            rms = torch.as_tensor(np.sqrt(stats.layers[name].out_sq_mean), dtype=torch.float32).clamp_min(1e-12)
            layers[name].ratio = injection_ratio(folded, name, images, injection_sigma_rel * rms,
                                                 draws=injection_draws, seed=seed)
    # input samples of every layer over the images stat.pkl describes (not only the first n_images)
    n_stat = int(stats.meta["n_images"])
    sample_batches = tqdm(data.loader(dataset, "probe", 100, root, n_images=n_stat), unit="batch",
                          desc=f"input samples and gradient weights ({n_stat} images)", disable=not progress)
    samples, grad_weights = collect_input_samples_with_gradients(folded, sample_batches, n_stat, seed=seed,
                                                                 class_probes=class_probes)
    for name, sample in samples.items():
        if name in layers:
            layers[name].input_sample = sample
            layers[name].sample_grad_weight = grad_weights[name]
    meta = {"schema_version": NOISE_SCHEMA_VERSION, "model": model_name, "fingerprint": stats.meta["fingerprint"],
            "dataset": dataset, "split": "probe",
            "split_note": "the first n_images of the images stat.pkl was probed on",
            "n_images": int(n), "seed": int(seed), "created": utc_now(), "method": method,
            "input_sample_images": n_stat,
            "class_estimator": estimator,
            "coherent_directions": "classes" if class_probes is None else f"rademacher({int(class_probes)})",
            "injection": {"sigma_rel": injection_sigma_rel, "draws": injection_draws} if method == "injection" else None}
    return NoiseProp(meta=meta, layers=layers)
