"""``resolve``: every range of every analog layer a number, from the config and the probes.

For each analog layer of the probes: ``signed_input`` from the probes; the input range an
explicit number, ``max`` (largest |x| seen in probing) or ``calibrated``
(:mod:`cimstat.calibrate.input_range`); the ADC range per (input slice, weight slice) an
explicit number (broadcast), an explicit table (shape checked), ``max``
(``LayerConfig.adc_max_range``) or ``calibrated``: from the exact partial sums of the probed input
sample (:mod:`cimstat.calibrate.sampled_adc_range`, the default), modelled from the probe statistics
(:mod:`cimstat.calibrate.adc_range`, ``analytic``; also where the probes hold no sample), or profiled
from Monte Carlo partial sums. Calibrations come from a :class:`Calibrations` context: looked up in its
store, computed when missing.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

from cimstat.errors import CalibrationError, ConfigError
from cimstat.hardware import HardwareConfig, LayerConfig, LayerRanges, RangeMode, ResolvedLayer, load_config
from cimstat.calibrate.input_range import calibrate_input_range, input_distribution
from cimstat.calibrate.store import CalibrationStore

__all__ = ["resolve", "Calibrations", "InputSample", "input_samples", "probe_identity", "input_key", "adc_key", "METHODS"]

METHODS = ("sampled", "analytic", "profiled")
ALGORITHM_VERSION = 7
"""Part of every key: bump when a calibration algorithm changes, so stored results are recomputed."""


@dataclass(frozen=True)
class InputSample:
    """A layer's probed input vectors (``noise_prop.pkl``) and what identifies them in a calibration key."""

    vectors: np.ndarray
    """(S, K) im2col input vectors, layer input units."""
    identity: str
    """The noise-propagation file's creation stamp and the sample's shape."""


def input_samples(probes: Any) -> dict[str, InputSample]:
    """The input sample of every layer that has one (``ProbeSet`` with noise propagation; else empty)."""
    noise = getattr(probes, "noise_prop", None)
    if noise is None:
        return {}
    created = _meta_get(getattr(noise, "meta", {}) or {}, "created")
    return {name: InputSample(lp.input_sample, f"{created}:{tuple(lp.input_sample.shape)}")
            for name, lp in noise.layers.items() if getattr(lp, "input_sample", None) is not None}


def _meta_get(meta: Any, field: str, default: Any = None) -> Any:
    if isinstance(meta, Mapping):
        return meta.get(field, default)
    return getattr(meta, field, default)


def probe_identity(stats: Any) -> dict[str, Any]:
    """What identifies the probes a calibration was computed from (part of every key)."""
    meta = getattr(stats, "meta", {}) or {}
    return {f: _meta_get(meta, f) for f in ("model", "fingerprint", "dataset", "split", "n_images", "seed",
                                            "created", "schema_version")}


def input_key(stats: Any, layer: str, cfg: LayerConfig, signed: bool) -> dict[str, Any]:
    return {"algorithm": ALGORITHM_VERSION, "probes": probe_identity(stats), "layer": layer,
            "input_bits": cfg.input_bits, "signed_input": signed}


def adc_key(stats: Any, layer: str, cfg: LayerConfig, signed: bool, input_range: float, method: str,
            extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Every knob an ADC range depends on (the device noise broadens the partial sums, so it is in)."""
    return {"algorithm": ALGORITHM_VERSION, "probes": probe_identity(stats), "layer": layer, "method": method,
            "signed_input": signed,
            "input_bits": cfg.input_bits, "input_range": float(np.float32(input_range)),
            "signed_input_encoding": str(cfg.signed_input_encoding) if signed else None,
            "input_slices": list(cfg.input_slices(signed)), "weight_bits": cfg.weight_bits,
            "weight_scale": str(cfg.weight_scale), "weight_encoding": str(cfg.weight_encoding),
            "weight_slices": list(cfg.weight_slices()), "rows_per_array": cfg.rows_per_array,
            "adc_bits": cfg.adc_bits, "adc_mode": str(cfg.adc_mode) if cfg.adc_signed or
            str(cfg.weight_encoding) == "differential" else None,
            "adc_thermal_noise_lsb": cfg.adc_thermal_noise_lsb,
            "programming_error": cfg.programming_error, "programming_error_model": str(cfg.programming_error_model),
            "read_noise": cfg.read_noise, "read_noise_model": str(cfg.read_noise_model), **dict(extra or {})}


class Calibrations:
    """Where calibrations are stored and how missing ones are computed.

    ``directory``: the store (``<probe dir>/calibrations``); None keeps them in memory.
    ``model``: the float model the probes were made from (needed for ADC calibration: its
    batch-norm-folded weights); None loads ``probes.meta['model']`` (the default model only)
    and checks its fingerprint against the probes. ``method``: ``sampled`` (exact partial sums of the
    probed input sample; layers whose probes hold no sample fall back to ``analytic``), ``analytic``
    (modelled from the probe statistics) or ``profiled`` (Monte Carlo partial sums on
    ``profile_images`` images of the probe split, or the batches of ``profile_loader``);
    ``profiled_layers``: layers profiled whatever ``method`` is.
    """

    def __init__(self, directory: str | Path | None = None, *, model: Any = None, method: str = "sampled",
                 profile_images: int = 256, profile_batch_size: int = 64, profile_loader: Any = None,
                 profiled_layers: Iterable[str] = (), progress: bool = False) -> None:
        if method not in METHODS:
            raise CalibrationError(f"method={method!r} is not allowed; expected one of {METHODS}")
        self.profiled_layers = frozenset(profiled_layers)
        """Layers whose ADC ranges are profiled whatever ``method`` is."""
        self.store = directory if isinstance(directory, CalibrationStore) else CalibrationStore(directory)
        self.method = method
        self.profile_images = int(profile_images)
        self.profile_batch_size = int(profile_batch_size)
        self.profile_loader = profile_loader
        self.progress = progress
        self._model = model
        self._specs: dict[str, Any] | None = None
        self.records: dict[tuple[str, str], dict[str, Any]] = {}
        """The calibration records used, by (``"input"`` or ``"adc"``, layer name): ranges and expected errors."""

    # ---- model weights (for ADC calibration) ------------------------------------------
    def layer_specs(self, stats: Any) -> dict[str, Any]:
        """``AnalogLayerSpec`` by name of the folded model the probes belong to (fingerprint checked)."""
        if self._specs is None:
            from cimstat import models, network

            meta = getattr(stats, "meta", {}) or {}
            model = self._model
            if model is None:
                name = _meta_get(meta, "model")
                if name != "default":
                    raise CalibrationError(f"ADC calibration needs the weights of model {name!r}; pass "
                                           "Calibrations(model=...) (cimstat.models.load(name, weights))")
                model = models.load(name)
            want = _meta_get(meta, "fingerprint")
            got = models.weights_fingerprint(model)
            if want is not None and want != got:
                raise CalibrationError(f"the probes were made for model fingerprint {want} but the model given for "
                                       f"calibration has fingerprint {got}; re-probe or pass the right weights")
            self._model = model
            folded = network.fold_batchnorm(model)
            self._specs = {s.name: s for s in network.analog_layers(folded)}
        return self._specs

    @property
    def model(self) -> Any:
        return self._model

    # ---- get-or-compute ---------------------------------------------------------------
    def method_of(self, layer: str, has_sample: bool = True) -> str:
        """``sampled``, ``analytic`` or ``profiled``: how the ADC ranges of ``layer`` are calibrated
        (``sampled`` needs the layer's input sample: ``analytic`` without one)."""
        if layer in self.profiled_layers:
            return "profiled"
        return "analytic" if self.method == "sampled" and not has_sample else self.method

    def _input_range_for(self, stats: Any, layer: str, cfg: LayerConfig, signed: bool) -> float:
        if isinstance(cfg.input_range, float):
            return cfg.input_range
        if cfg.input_range is RangeMode.MAX:
            ls = stats.layers[layer]
            return float(max(abs(float(ls.input_min)), abs(float(ls.input_max))))
        return self.input_range(stats, layer, cfg, signed)

    def input_range(self, stats: Any, layer: str, cfg: LayerConfig, signed: bool) -> float:
        ls = stats.layers[layer]

        def compute() -> dict[str, Any]:
            best, err, max_err = calibrate_input_range(input_distribution(ls), cfg.input_bits)
            return {"input_range": best, "expected_error": err, "expected_error_max": max_err}

        value = self.store.get("input", input_key(stats, layer, cfg, signed), compute)
        self.records[("input", layer)] = value
        return float(value["input_range"])

    def adc_range(self, stats: Any, layer: str, cfg: LayerConfig, signed: bool, input_range: float,
                  config: HardwareConfig | None = None, sample: InputSample | None = None) -> np.ndarray:
        """The ADC range table of ``layer`` (stored, or computed and stored); ``config`` (the whole
        design) is needed by the profiled method, which calibrates every layer in one pass; ``sample``
        (the layer's probed input vectors) by the sampled method."""
        from cimstat.calibrate import adc_range as adc

        shape = cfg.adc_max_range(signed, stats.layers[layer].fan_in).shape
        method = self.method_of(layer, sample is not None)
        extra: dict[str, Any] | None = None
        if method == "profiled":
            extra = {"profile_images": self.profile_images, "chip_seed": None if config is None else config.seed,
                     "profile_loader": self.profile_loader is not None}
        elif method == "sampled":
            extra = {"sample": sample.identity}
        key = adc_key(stats, layer, cfg, signed, input_range, method, extra)
        if method == "sampled":
            def compute() -> dict[str, Any]:
                from cimstat.calibrate.sampled_adc_range import sampled_adc_calibration

                spec = self.layer_specs(stats)[layer]
                return sampled_adc_calibration(sample.vectors, spec, cfg, signed, input_range, layer).to_json()
        elif method == "analytic":
            def compute() -> dict[str, Any]:
                spec = self.layer_specs(stats)[layer]
                return adc.analytic_adc_calibration(stats.layers[layer], spec, cfg, signed, input_range).to_json()
        else:
            def compute() -> dict[str, Any]:
                # one profiling pass serves every calibrated layer of the config: store them all
                from cimstat.calibrate.profile import profiled_adc_calibrations

                found = profiled_adc_calibrations(self, stats, config, layer)
                for other, cal in found.items():
                    if other != layer:
                        ocfg = config.layer(other)
                        osigned = bool(stats.layers[other].signed_input)
                        orange = self._input_range_for(stats, other, ocfg, osigned)
                        self.store.save("adc", adc_key(stats, other, ocfg, osigned, orange, method, extra),
                                        cal.to_json())
                return found[layer].to_json()
        value = self.store.get("adc", key, compute)
        self.records[("adc", layer)] = value
        table = np.asarray(value["adc_range"], dtype=np.float64)
        if table.shape != shape:
            raise CalibrationError(f"layer {layer}: stored ADC calibration has shape {table.shape}, expected {shape}")
        return table


def _explicit_adc_table(name: str, cfg: LayerConfig, value: Any, shape: tuple[int, int]) -> np.ndarray:
    if isinstance(value, float):
        return np.full(shape, value, dtype=np.float64)
    table = np.asarray(value, dtype=np.float64)
    if table.shape != shape:
        raise ConfigError(f"adc_range of layer {name!r} is a {'x'.join(map(str, table.shape))} table but the layer "
                          f"has {shape[0]} input slice(s) x {shape[1]} weight slice(s); expected a "
                          f"{shape[0]}x{shape[1]} table [input slice][weight slice] or one number")
    return table


def resolve(config: HardwareConfig | str | Path | Mapping[str, Any], probes: Any,
            calibrations: Calibrations | CalibrationStore | str | Path | None = None) -> dict[str, ResolvedLayer]:
    """``{layer name: ResolvedLayer}`` for every analog layer of ``probes`` (``ProbeSet``, whose input
    samples serve the ``sampled`` ADC calibration, or ``ActivationStats`` alone, which leaves it the
    ``analytic`` one), in execution order, every range a number.

    ``calibrations``: a :class:`Calibrations`, a store directory, or None: then
    ``<probes.directory>/calibrations`` for a ``ProbeSet`` loaded from disk, else in memory.
    Calibrations missing from the store are computed and stored.
    """
    config = load_config(config)
    stats = getattr(probes, "stats", probes)
    layers = getattr(stats, "layers", None)
    if not isinstance(layers, Mapping) or not layers:
        raise CalibrationError("resolve needs probe statistics with per-layer entries (ActivationStats.layers)")
    config.check_layer_names(list(layers))
    samples = input_samples(probes)
    if calibrations is None and getattr(probes, "directory", None) is not None:
        calibrations = Path(probes.directory) / "calibrations"
    if not isinstance(calibrations, Calibrations):
        calibrations = Calibrations(calibrations)
    unknown = sorted(calibrations.profiled_layers - set(layers))
    if unknown:
        raise CalibrationError(f"profiled_layers: unknown layer name(s) {unknown}; the probes' analog layers are "
                               f"{list(layers)}")
    out: dict[str, ResolvedLayer] = {}
    for name, ls in layers.items():
        cfg = config.layer(name)
        signed = bool(ls.signed_input)
        x_range: float | None
        if cfg.input_bits is None:
            x_range = None
        elif isinstance(cfg.input_range, float):
            x_range = cfg.input_range
        else:
            abs_max = float(max(abs(float(ls.input_min)), abs(float(ls.input_max))))
            if abs_max <= 0:
                raise CalibrationError(f"layer {name}: its input is identically zero in the probes; give "
                                       "layers[...].input_range explicitly")
            if cfg.input_range is RangeMode.MAX:
                x_range = abs_max
            else:
                x_range = calibrations.input_range(stats, name, cfg, signed)
        adc: np.ndarray | None
        if cfg.adc_bits is None:
            adc = None
        else:
            max_table = cfg.adc_max_range(signed, int(ls.fan_in))
            if cfg.adc_range is RangeMode.MAX:
                adc = max_table
            elif cfg.adc_range is RangeMode.CALIBRATED:
                adc = calibrations.adc_range(stats, name, cfg, signed, x_range, config, samples.get(name))
            else:
                adc = _explicit_adc_table(name, cfg, cfg.adc_range, max_table.shape)
        out[name] = ResolvedLayer(name, cfg, LayerRanges(signed, x_range, adc))
    return out
