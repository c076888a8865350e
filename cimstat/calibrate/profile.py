"""Profiled ADC ranges: partial sums observed in the Monte Carlo simulator, R from their histogram.

Each analog layer is run *isolated* (it gets the float network's input, as the probe statistics
do) on images of the probe split: one chip instance of the config with every ADC made ideal and
noiseless, so the observer (:func:`cimstat.montecarlo.set_partial_sum_observer`) sees exactly the
analog values an ADC would convert (input quantization, weight slicing, tiling and device noise
included). Observed values are histogrammed on the partial-sum lattice (bins of one unit; wider
bins, ``MAX_BINS`` at most, when the largest possible partial sum is larger), and ``R`` per
(input slice, weight slice) minimises the empirical ``E[(Q(P + n) - P)²]`` — the same criterion
and quantizer as the analytic calibration, so the two are directly comparable.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from cimstat.errors import CalibrationError
from cimstat.hardware import HardwareConfig, RangeMode
from cimstat.calibrate.adc_range import AdcCalibration, PartialSumMixture, adc_error, choose_adc_range

__all__ = ["profile_config", "PartialSumHistograms", "profiled_adc_calibrations", "MAX_BINS"]

MAX_BINS = 2 ** 15
_ADC_FIELDS = ("adc_bits", "adc_range", "adc_thermal_noise_lsb")


def profile_config(config: HardwareConfig) -> HardwareConfig:
    """The config with every ADC ideal and noiseless (what the profiling pass simulates)."""
    layers = {n: {k: v for k, v in over.items() if k not in _ADC_FIELDS} for n, over in config.layers.items()}
    return HardwareConfig(default=config.default.replace(adc_bits=None, adc_range=RangeMode.MAX,
                                                         adc_thermal_noise_lsb=0.0),
                          layers=layers, seed=config.seed, name=config.name)


class PartialSumHistograms:
    """Per (layer, input slice, weight slice): counts of observed partial sums on a lattice."""

    def __init__(self, r_max: dict[str, np.ndarray]) -> None:
        self.r_max = r_max
        self.spacing = {n: max(1.0, float(np.ceil(2 * r.max() / (MAX_BINS - 1)))) for n, r in r_max.items()}
        self.counts: dict[tuple[str, int, int], torch.Tensor] = {}

    def observe(self, name: str, i: int, j: int, values: torch.Tensor) -> None:
        if name not in self.r_max:
            return
        h = self.spacing[name]
        n_bins = int(np.ceil(2 * float(self.r_max[name].max()) / h)) + 3
        centre = n_bins // 2
        idx = torch.clamp(torch.round(values.detach().reshape(-1).to(torch.float64) / h).to(torch.int64) + centre,
                          0, n_bins - 1)
        counts = torch.bincount(idx, minlength=n_bins).to(torch.float64)
        key = (name, int(i), int(j))
        self.counts[key] = counts if key not in self.counts else self.counts[key] + counts

    def mixture(self, name: str, i: int, j: int) -> PartialSumMixture:
        key = (name, i, j)
        if key not in self.counts:
            raise CalibrationError(f"layer {name}: no partial sums observed for input slice {i}, weight slice {j}")
        counts = self.counts[key].numpy()
        centre = counts.size // 2
        values = (np.arange(counts.size) - centre) * self.spacing[name]
        keep = counts > 0
        return PartialSumMixture(values[keep], counts[keep] / counts[keep].sum())


def _probe_loader(calibrations: Any, stats: Any):
    from cimstat import data

    meta = getattr(stats, "meta", {}) or {}
    dataset = meta.get("dataset") if isinstance(meta, dict) else getattr(meta, "dataset", None)
    loader = getattr(calibrations, "profile_loader", None)
    if loader is not None:
        return loader
    if dataset != "default":
        raise CalibrationError(f"profiling ADC ranges needs images of dataset {dataset!r}; pass "
                               "Calibrations(profile_loader=...) (cimstat.data.loader(name, 'probe', ...))")
    # evenly spaced images over the whole split: a split stored class by class must not be cut at its head
    from torch.utils.data import DataLoader, Subset

    ds = data.dataset("default", "probe")
    n = min(calibrations.profile_images, len(ds))
    picks = np.unique(np.linspace(0, len(ds) - 1, n).round().astype(int)).tolist()
    return DataLoader(Subset(ds, picks), batch_size=calibrations.profile_batch_size)


@torch.no_grad()
def profiled_adc_calibrations(calibrations: Any, stats: Any, config: HardwareConfig, only: str | None = None,
                              histograms: dict[str, PartialSumHistograms] | None = None) -> dict[str, AdcCalibration]:
    """Profiled ADC ranges of every layer whose config asks for ``calibrated`` ADC ranges (and of ``only``),
    from one profiling pass."""
    from cimstat.calibrate.ranges import resolve
    from cimstat.montecarlo import analog_modules, convert, set_partial_sum_observer
    from cimstat.network import fold_batchnorm

    # ``histograms``: when a dict is given, the observed histograms are left in it under "histograms"

    if config is None:
        raise CalibrationError("profiled ADC calibration needs the whole hardware config")
    wanted = [n for n in stats.layers if config.layer(n).adc_bits is not None
              and config.layer(n).adc_range is RangeMode.CALIBRATED
              and calibrations.method_of(n) == "profiled"]
    if only is not None and only not in wanted:
        wanted.append(only)
    plain = profile_config(config)
    resolved = resolve(plain, stats, calibrations)
    signed = {n: resolved[n].ranges.signed_input for n in wanted}
    r_max = {n: config.layer(n).adc_max_range(signed[n], int(stats.layers[n].fan_in)) for n in wanted}
    hist = PartialSumHistograms(r_max)
    if histograms is not None:
        histograms["histograms"] = hist
    model = calibrations.model
    if model is None:
        calibrations.layer_specs(stats)
        model = calibrations.model
    analog = analog_modules(convert(model, plain, resolved, 0))
    folded = fold_batchnorm(model)
    for n in wanted:
        analog[n].partial_sum_observer = hist.observe

    def isolated(name: str):
        def run(_module, inputs, _output):
            analog[name](inputs[0])
        return run

    handles = [folded.get_submodule(n).register_forward_hook(isolated(n)) for n in wanted]
    try:
        loader = _probe_loader(calibrations, stats)
        for batch in tqdm(loader, desc="profiling partial sums", disable=not calibrations.progress, leave=False):
            images = batch[0] if isinstance(batch, (list, tuple)) else batch
            folded(images)
    finally:
        for h in handles:
            h.remove()
        for n in wanted:
            analog[n].partial_sum_observer = None
    out: dict[str, AdcCalibration] = {}
    for n in wanted:
        cfg = config.layer(n)
        table = r_max[n]
        best, err, err_max = (np.empty_like(table) for _ in range(3))
        for i in range(table.shape[0]):
            for j in range(table.shape[1]):
                mix = hist.mixture(n, i, j)
                best[i, j], err[i, j], err_max[i, j] = choose_adc_range(
                    mix, float(table[i, j]), cfg.adc_bits, cfg.adc_signed, cfg.adc_thermal_noise_lsb)
        out[n] = AdcCalibration(best, table, err, err_max, "profiled",
                                {"n_partial_sums": float(sum(float(c.sum()) for k, c in hist.counts.items()
                                                             if k[0] == n))})
    return out


def empirical_adc_error(hist: PartialSumHistograms, name: str, table: np.ndarray, bits: int, signed: bool,
                        thermal_lsb: float) -> np.ndarray:
    """Empirical ADC error per (input slice, weight slice) of ranges ``table`` on observed partial sums."""
    return np.array([[adc_error(hist.mixture(name, i, j), table[i, j], bits, signed, thermal_lsb)[0]
                      for j in range(table.shape[1])] for i in range(table.shape[0])])
