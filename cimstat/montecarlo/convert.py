"""Turn a float torch model into one analog chip instance, and resolve ranges from data.

:func:`convert` folds batch norm into the convs (:func:`cimstat.network.fold_batchnorm`) and
replaces every Conv2d and Linear by an :class:`~cimstat.montecarlo.layers.AnalogLayer`;
everything else stays digital and exact.

:func:`resolve_from_data` is the simulator's own minimal range resolver (``max`` and explicit
ranges only) for models without probe files, e.g. the benchmark's random ResNet-18 at 224x224;
``calibrated`` ranges need :func:`cimstat.calibrate.resolve`.
"""
from __future__ import annotations

from typing import Iterable, Mapping

import numpy as np
import torch
from torch import nn

from cimstat.errors import ConfigError
from cimstat.hardware import HardwareConfig, LayerConfig, LayerRanges, RangeMode, ResolvedLayer
from cimstat.montecarlo.layers import AnalogLayer, PartialSumObserver
from cimstat.network import analog_layer_names, fold_batchnorm, replace_module

__all__ = ["convert", "analog_modules", "set_partial_sum_observer", "resolve_from_data", "input_extrema"]

_RANGE_FIELDS = ("input_range", "adc_range")


def _layer_knobs(config: HardwareConfig, name: str, resolved: Mapping[str, ResolvedLayer]) -> tuple[LayerConfig, LayerRanges]:
    knobs = config.layer(name)
    entry = resolved.get(name)
    if entry is None:
        if knobs.input_bits is not None:
            raise ConfigError(
                f"layer {name}: input_bits={knobs.input_bits} needs a resolved input range and input sign; pass "
                "resolved=cimstat.calibrate.resolve(config, probes) (or cimstat.montecarlo.resolve_from_data)")
        return knobs, LayerRanges(signed_input=False, input_range=None, adc_range=None)
    if not isinstance(entry, ResolvedLayer):
        raise ConfigError(f"resolved[{name!r}] must be a ResolvedLayer, got {type(entry).__name__}")
    mine, theirs = knobs.to_dict(), entry.config.to_dict()
    differ = sorted(k for k in mine if k not in _RANGE_FIELDS and mine[k] != theirs[k])
    if differ:
        raise ConfigError(f"layer {name}: the resolved ranges were made for another config (fields {differ} "
                          "differ); resolve them again for this config")
    return entry.config, entry.ranges


def convert(model: nn.Module, config: HardwareConfig, resolved: Mapping[str, ResolvedLayer] | None = None,
            instance: int = 0, *, exact_read_noise: bool = False, precision: str = "auto",
            device: str | torch.device = "cpu") -> nn.Module:
    """An analog copy of ``model`` (eval mode, batch norm folded): chip instance ``instance``.

    Every Conv2d/Linear becomes an :class:`AnalogLayer` with chip seed ``config.seed + instance``
    (programming errors drawn now; read noise drawn at every forward). ``resolved`` maps layer
    names to :class:`ResolvedLayer` (from :func:`cimstat.calibrate.resolve`); a layer missing from
    it must need no data-dependent range (``input_bits=None``). ``model`` itself is not changed.
    ``exact_read_noise``: per-device read noise (tiny layers); ``precision``: ``"auto"`` computes partial
    sums in float32 where integer sums stay exact (< 2^24), else float64; ``"float64"`` always.
    ``device``: where the copy runs (``"cuda"`` for a GPU); the chip is the same on every device (weight codes and
    programming errors are drawn on the CPU), only the read-noise / thermal-noise stream is the device's own.
    """
    if not isinstance(config, HardwareConfig):
        raise ConfigError(f"config must be a HardwareConfig, got {type(config).__name__}")
    if isinstance(instance, bool) or not isinstance(instance, (int, np.integer)) or instance < 0:
        raise ConfigError(f"instance={instance!r} must be a non-negative integer")
    resolved = dict(resolved or {})
    folded = fold_batchnorm(model)
    names = analog_layer_names(folded)
    config.check_layer_names(names)
    unknown = [n for n in resolved if n not in names]
    if unknown:
        raise ConfigError(f"resolved: unknown layer name(s) {unknown}; the model's analog layers are {names}")
    for name in names:
        knobs, ranges = _layer_knobs(config, name, resolved)
        module = folded.get_submodule(name)
        replace_module(folded, name, AnalogLayer(name, module, knobs, ranges, config.seed + int(instance),
                                                 exact_read_noise=exact_read_noise, precision=precision,
                                                 device=device))
    return folded.to(device).eval()


def analog_modules(model: nn.Module) -> dict[str, AnalogLayer]:
    """The :class:`AnalogLayer` modules of a converted model by layer name."""
    return {m.name: m for m in model.modules() if isinstance(m, AnalogLayer)}


def set_partial_sum_observer(model: nn.Module, observer: PartialSumObserver | None) -> None:
    """Install (or with None remove) ``observer(layer_name, input_slice, weight_slice, tensor)`` on every
    analog layer of a converted model (see :mod:`cimstat.montecarlo.layers`)."""
    for layer in analog_modules(model).values():
        layer.partial_sum_observer = observer


@torch.no_grad()
def input_extrema(model: nn.Module, images: Iterable[torch.Tensor]) -> dict[str, tuple[float, float]]:
    """Smallest and largest input value of every Conv2d/Linear of the folded ``model`` over ``images``
    (a tensor batch or an iterable of batches / ``(images, labels)`` pairs)."""
    folded = fold_batchnorm(model)
    names = analog_layer_names(folded)
    lo = {n: np.inf for n in names}
    hi = {n: -np.inf for n in names}

    def hook(name: str):
        def record(_module, inputs, _output):
            x = inputs[0]
            lo[name] = min(lo[name], float(x.min()))
            hi[name] = max(hi[name], float(x.max()))
        return record

    handles = [folded.get_submodule(n).register_forward_hook(hook(n)) for n in names]
    try:
        batches = [images] if isinstance(images, torch.Tensor) else images
        for batch in batches:
            x = batch[0] if isinstance(batch, (tuple, list)) else batch
            folded(x)
    finally:
        for h in handles:
            h.remove()
    return {n: (lo[n], hi[n]) for n in names}


def resolve_from_data(model: nn.Module, config: HardwareConfig,
                      images: torch.Tensor | Iterable[torch.Tensor]) -> dict[str, ResolvedLayer]:
    """Ranges for ``max``/explicit configs from a float pass over ``images``.

    Input sign: negative values seen. ``max`` input range: largest ``|x|`` seen; ``max`` ADC range:
    ``n_rows·L_in·L_w`` per (input slice, weight slice); explicit numbers are used as given.
    ``calibrated`` raises :class:`ConfigError` (use :func:`cimstat.calibrate.resolve`).
    """
    extrema = input_extrema(model, images)
    config.check_layer_names(list(extrema))
    folded = fold_batchnorm(model)
    out: dict[str, ResolvedLayer] = {}
    for name, (lo, hi) in extrema.items():
        if not np.isfinite(lo):
            raise ConfigError(f"layer {name}: the model never ran this layer on the given images; cannot resolve "
                              "its ranges")
        knobs = config.layer(name)
        signed = lo < 0
        module = folded.get_submodule(name)
        fan_in = int(module.weight[0].numel())
        if knobs.input_bits is None:
            x_max = None
        elif knobs.input_range is RangeMode.CALIBRATED:
            raise ConfigError(f"layer {name}: input_range='calibrated' needs cimstat.calibrate.resolve")
        elif knobs.input_range is RangeMode.MAX:
            x_max = max(abs(lo), abs(hi)) or 1.0
        else:
            x_max = float(knobs.input_range)
        if knobs.adc_bits is None:
            adc = None
        elif isinstance(knobs.adc_range, RangeMode):
            if knobs.adc_range is RangeMode.CALIBRATED:
                raise ConfigError(f"layer {name}: adc_range='calibrated' needs cimstat.calibrate.resolve")
            adc = knobs.adc_max_range(signed, fan_in)
        else:
            shape = (len(knobs.input_slices(signed)), len(knobs.weight_slices()))
            table = np.asarray(knobs.adc_range, dtype=np.float64)
            adc = np.full(shape, float(table)) if table.ndim == 0 else table
            if adc.shape != shape:
                raise ConfigError(f"layer {name}: adc_range table has shape {adc.shape}; this layer has "
                                  f"(input slices, weight slices) = {shape}")
        out[name] = ResolvedLayer(name, knobs, LayerRanges(signed_input=bool(signed), input_range=x_max,
                                                           adc_range=adc))
    return out
