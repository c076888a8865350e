"""A fixed sample of each small layer's input vectors, for expectations moments cannot give.

The engine's moment model of an ADC input (mean, variance, a point mass at 0 from per-channel
zero probabilities assumed independent) fails where whole patches are alike: on the default
model's conv1, 57 % of the 7x7x3 MNIST patches are all background, so the positive pass of a
split signed input is exactly 0 for them and the negative pass one fixed value per channel, while
independence predicts P(all 147 rows at rest) ≈ 0 (measured: the engine over-predicted the ADC
error by 0.6-8.2 dB per slice, 3.4-4.5 on most). A few thousand real input vectors hold that joint structure.

:func:`collect_input_samples` runs the float (batch-norm folded) model over probe images and keeps,
for every analog layer with fan-in ``K <= SAMPLE_MAX_FAN_IN``, up to ``SAMPLE_SIZE`` im2col vectors:
``ceil(SAMPLE_SIZE / n_images)`` output positions per image drawn without replacement by a seeded
generator (every position of a linear layer's single one), then an even subsample if more were
kept. Deterministic for a given seed, model and image order.
"""
from __future__ import annotations

import math
from typing import Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cimstat.network import AnalogLayerSpec, analog_layers

__all__ = ["SAMPLE_MAX_FAN_IN", "SAMPLE_SIZE", "collect_input_samples"]

SAMPLE_MAX_FAN_IN = 512
"""Layers with at most this many inputs per output keep a sample (default model: conv1, the three
downsample convs and fc; 17 MB in all, float32)."""
SAMPLE_SIZE = 8192
"""Input vectors kept per layer (fewer when the images hold fewer positions)."""


def _patches(spec: AnalogLayerSpec, x: torch.Tensor) -> torch.Tensor:
    """(B, P, K) im2col vectors of the layer input, rows in PyTorch's (C_in, kh, kw) order."""
    if spec.kind == "linear":
        return x.reshape(x.shape[0], 1, -1)
    cols = F.unfold(x, spec.kernel_size, dilation=spec.dilation, padding=spec.padding, stride=spec.stride)
    return cols.transpose(1, 2)


def collect_input_samples(folded: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], n_images: int,
                          *, size: int = SAMPLE_SIZE, max_fan_in: int = SAMPLE_MAX_FAN_IN,
                          seed: int = 0) -> dict[str, np.ndarray]:
    """``{layer: (S, K) float32}`` for the analog layers of ``folded`` with ``K <= max_fan_in``
    over ``batches`` (``n_images`` images in all; see the module docstring)."""
    if size < 1 or n_images < 1:
        raise ValueError(f"size={size} and n_images={n_images} must be positive")
    gen = torch.Generator().manual_seed(int(seed))
    per_image = max(1, math.ceil(size / n_images))
    kept: dict[str, list[torch.Tensor]] = {}
    specs: dict[str, AnalogLayerSpec] = {}
    hooks = []

    def hook_for(name: str):
        def hook(_m, inputs, _output):
            cols = _patches(specs[name], inputs[0].detach().float())          # (B, P, K)
            b, p, k = cols.shape
            take = min(per_image, p)
            pick = torch.stack([torch.randperm(p, generator=gen)[:take] for _ in range(b)])
            kept[name].append(torch.gather(cols, 1, pick.unsqueeze(-1).expand(b, take, k)).reshape(-1, k).clone())
        return hook

    modules = dict(folded.named_modules())
    try:
        with torch.no_grad():
            for images, _ in batches:
                if not hooks:
                    for spec in analog_layers(folded, images[:1]):
                        if spec.fan_in <= max_fan_in and spec.groups == 1:
                            specs[spec.name] = spec
                            kept[spec.name] = []
                            hooks.append(modules[spec.name].register_forward_hook(hook_for(spec.name)))
                folded(images.float())
    finally:
        for h in hooks:
            h.remove()
    out = {}
    for name, parts in kept.items():
        if not parts:
            continue
        allv = torch.cat(parts)
        if allv.shape[0] > size:
            allv = allv[torch.linspace(0, allv.shape[0] - 1, size).round().long()]
        out[name] = allv.numpy().astype(np.float32)
    return out
