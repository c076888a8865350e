"""A fixed sample of each small layer's input vectors, for expectations moments cannot give.

The engine's moment model of an ADC input (mean, variance, a point mass at 0 from per-channel
zero probabilities assumed independent) fails where whole patches are alike: on the default
model's conv1, 57 % of the 7x7x3 MNIST patches are all background, so the positive pass of a
split signed input is exactly 0 for them and the negative pass one fixed value per channel, while
independence predicts P(all 147 rows at rest) ≈ 0 (measured: the engine over-predicted the ADC
error by 0.6-8.2 dB per slice, 3.4-4.5 on most). A few thousand real input vectors hold that joint structure. Deeper layers need it too: with
1-bit input slices and calibrated (tight) ADC ranges, the clipping error depends on the tail of
each partial sum, which the moment model's Beta/Gamma shapes miss by up to ±1.7 dB per layer
(measured on the default model, adc4/adc6-cal-bitserial; the sample brings them within ±0.5 dB).

:func:`collect_input_samples` runs the float (batch-norm folded) model over probe images and keeps,
for every analog layer, :func:`sample_size` im2col vectors: ``ceil(size / n_images)`` output
positions per image drawn without replacement by a seeded generator (every position of a linear
layer's single one), then an even subsample if more were kept. Layers with fan-in
``K <= SMALL_FAN_IN`` keep ``SAMPLE_SIZE`` float32 vectors, wider ones about ``SAMPLE_ELEMENTS / K``
(at least ``LARGE_SAMPLE_MIN``) in float16: the engine's element budget uses no more of them per
config, and the whole sample of the default model stays near 100 MB. Deterministic for a given
seed, model and image order.
"""
from __future__ import annotations

import math
from typing import Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cimstat.network import AnalogLayerSpec, analog_layers

__all__ = ["SMALL_FAN_IN", "SAMPLE_SIZE", "SAMPLE_ELEMENTS", "LARGE_SAMPLE_MIN", "sample_size",
           "collect_input_samples", "collect_input_samples_with_gradients"]

SMALL_FAN_IN = 512
"""Layers with at most this many inputs per output keep ``SAMPLE_SIZE`` float32 vectors (default model:
conv1, the three downsample convs and fc; 17 MB in all)."""
SAMPLE_SIZE = 8192
"""Input vectors kept per small layer (fewer when the images hold fewer positions)."""
SAMPLE_ELEMENTS = 1 << 21
"""Wider layers keep about this many values (vectors x fan-in)..."""
LARGE_SAMPLE_MIN = 1024
"""... but at least this many vectors."""


def sample_size(fan_in: int, size: int = SAMPLE_SIZE) -> int:
    """Vectors kept for a layer with ``fan_in`` inputs per output (``size`` for small layers)."""
    if fan_in <= SMALL_FAN_IN:
        return size
    return min(size, max(LARGE_SAMPLE_MIN, SAMPLE_ELEMENTS // fan_in))


def patch_rows(spec: AnalogLayerSpec, x: torch.Tensor) -> torch.Tensor:
    """(B, P, K) im2col vectors of the layer input, rows in PyTorch's (C_in, kh, kw) order (``spec``: anything with
    ``kind``, ``kernel_size``, ``dilation``, ``padding``, ``stride``, e.g. a :class:`cimstat.probes.LayerStats`)."""
    if spec.kind == "linear":
        return x.reshape(x.shape[0], 1, -1)
    cols = F.unfold(x, spec.kernel_size, dilation=spec.dilation, padding=spec.padding, stride=spec.stride)
    return cols.transpose(1, 2)


def collect_input_samples(folded: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], n_images: int,
                          *, size: int = SAMPLE_SIZE, max_fan_in: int | None = None,
                          seed: int = 0) -> dict[str, np.ndarray]:
    """``{layer: (S, K)}`` (float32 for ``K <= SMALL_FAN_IN``, else float16; ``S = sample_size(K, size)``)
    for the analog layers of ``folded`` (only those with ``K <= max_fan_in`` when given) over
    ``batches`` (``n_images`` images in all; see the module docstring)."""
    return _collect(folded, batches, n_images, size, max_fan_in, seed, gradients=False)[0]


def collect_input_samples_with_gradients(folded: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                                         n_images: int, *, size: int = SAMPLE_SIZE, max_fan_in: int | None = None,
                                         seed: int = 0, class_probes: int | None = None
                                         ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The samples of :func:`collect_input_samples` (the same vectors for the same arguments) and, per layer,
    ``(S, C_out)`` float16 *gradient weights*: for sampled vector ``s`` (image ``n``, output position ``p``)
    and output channel ``c``, ``G_sc = Σ_j (∂z_j/∂y_{c,p})²`` on image ``n`` (one backward pass per logit),
    divided by its mean over the sample (1 where that mean is 0). An error of variance ``v_sc`` at those
    outputs reaches the logits as ``Σ_c ratio[c, :]·E_s[v_sc·G_sc]``, not ``E_s[v_sc]``: where errors sit on
    the outputs the logits are most sensitive to (on MNIST an ADC's rounding error is 0 on background patches
    and the gradients are largest on the strokes) the white-noise ``ratio`` alone under-counts them.
    ``class_probes``: instead of one backward pass per class, that many random ±1 projections ``u`` of the
    logits (``E[(u·g)²] = Σ_j g_j²``; for 1000 classes), drawn from their own generator: the sampled vectors
    are the same either way."""
    if class_probes is not None and class_probes < 1:
        raise ValueError(f"class_probes={class_probes} must be a positive integer or None")
    return _collect(folded, batches, n_images, size, max_fan_in, seed, gradients=True, class_probes=class_probes)


def _collect(folded: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], n_images: int, size: int,
             max_fan_in: int | None, seed: int, gradients: bool, class_probes: int | None = None
             ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    if size < 1 or n_images < 1:
        raise ValueError(f"size={size} and n_images={n_images} must be positive")
    gen = torch.Generator().manual_seed(int(seed))
    projections = torch.Generator().manual_seed(int(seed) + 1)
    kept: dict[str, list[torch.Tensor]] = {}
    picks: dict[str, torch.Tensor] = {}
    outputs: dict[str, torch.Tensor] = {}
    energy: dict[str, list[torch.Tensor]] = {}
    specs: dict[str, AnalogLayerSpec] = {}
    hooks = []

    def hook_for(name: str):
        def hook(_m, inputs, output):
            cols = patch_rows(specs[name], inputs[0].detach().float())          # (B, P, K)
            b, p, k = cols.shape
            take = min(max(1, math.ceil(sample_size(k, size) / n_images)), p)
            pick = torch.stack([torch.randperm(p, generator=gen)[:take] for _ in range(b)])
            kept[name].append(torch.gather(cols, 1, pick.unsqueeze(-1).expand(b, take, k)).reshape(-1, k).clone())
            if gradients:
                picks[name] = pick
                outputs[name] = output
                # the network continues with a copy: an in-place ReLU would otherwise rebase `output`
                return output.clone()
            return None
        return hook

    modules = dict(folded.named_modules())
    params = [p.requires_grad for p in folded.parameters()]
    try:
        for p in folded.parameters():
            p.requires_grad_(False)
        for images, _ in batches:
            if not hooks:
                for spec in analog_layers(folded, images[:1]):
                    if (max_fan_in is None or spec.fan_in <= max_fan_in) and spec.groups == 1:
                        specs[spec.name] = spec
                        kept[spec.name] = []
                        energy[spec.name] = []
                        hooks.append(modules[spec.name].register_forward_hook(hook_for(spec.name)))
            if not gradients:
                with torch.no_grad():
                    folded(images.float())
                continue
            with torch.enable_grad():
                x = images.float().clone().requires_grad_(True)
                z = folded(x)
                names = list(outputs)
                ys = [outputs[n] for n in names]
                acc = {n: 0.0 for n in names}
                n_dirs = z.shape[1] if class_probes is None else int(class_probes)
                for d in range(n_dirs):
                    if class_probes is None:
                        grad_out = torch.zeros_like(z)
                        grad_out[:, d] = 1.0
                    else:
                        grad_out = torch.randint(0, 2, z.shape, generator=projections).to(z.dtype).mul_(2).sub_(1)
                    grads = torch.autograd.grad(z, ys, grad_outputs=grad_out, retain_graph=d < n_dirs - 1)
                    for n, g in zip(names, grads):
                        g = g.detach().reshape(g.shape[0], g.shape[1], -1)           # (B, C_out, P)
                        at = torch.gather(g, 2, picks[n].unsqueeze(1).expand(-1, g.shape[1], -1))
                        acc[n] = acc[n] + at.double() ** 2                             # (B, C_out, take)
                for n in names:
                    energy[n].append(acc[n].transpose(1, 2).reshape(-1, acc[n].shape[1]))
            outputs.clear()
            picks.clear()
    finally:
        for h in hooks:
            h.remove()
        for p, req in zip(folded.parameters(), params):
            p.requires_grad_(req)
    out, weights = {}, {}
    for name, parts in kept.items():
        if not parts:
            continue
        allv = torch.cat(parts)
        n_keep = sample_size(allv.shape[1], size)
        rows = None
        if allv.shape[0] > n_keep:
            rows = torch.linspace(0, allv.shape[0] - 1, n_keep).round().long()
            allv = allv[rows]
        out[name] = allv.numpy().astype(np.float32 if allv.shape[1] <= SMALL_FAN_IN else np.float16)
        if gradients:
            g = torch.cat(energy[name])
            if rows is not None:
                g = g[rows]
            mean = g.mean(0, keepdim=True)
            rel = torch.where(mean > 0, g / torch.where(mean > 0, mean, torch.ones_like(mean)), torch.ones_like(g))
            weights[name] = rel.numpy().astype(np.float16)
    return out, weights
