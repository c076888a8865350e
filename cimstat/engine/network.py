"""Whole-network estimate: every layer's error, propagation to the logits, SNRs and top-1.

Two kinds of error leave a layer and travel differently (linear regime, layers and sources
independent, contributions add):

* per-read errors (input rounding, read noise, ADC): independent between output positions;
  logit ``j`` gains ``Σ_c err_c · ratio[c, j]`` (``NoiseProp.ratio``);
* fixed weight errors (weight quantization, programming error, clipping bias): shared by all
  positions; logit noise energy ``Σ_{c,k} s²_ck S_ck`` (``NoiseProp.weight_sens``), spread over
  the classes in proportion to ``weight_sens_class[c]``.

``fc SNR = Σ_n Σ_j z_nj² / (N · Σ_j σ_j²)`` over the probe images' clean logits ``z``; top-1
by Gauss–Hermite quadrature (:mod:`cimstat.accuracy`).
"""
from __future__ import annotations

import math
import time
import weakref
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

from cimstat.accuracy import top1 as predicted_top1
from cimstat.errors import EstimationError
from cimstat.hardware import HardwareConfig, ResolvedLayer, load_config

from .layer import LayerEstimate, LayerModel, estimate_layer
from cimstat.metrics import snr_db

from .sources import ErrorSource

__all__ = ["Estimate", "Engine", "estimate", "engine_for"]


@dataclass
class Estimate:
    """What the engine predicts for one hardware config."""

    config_name: str
    layers: dict[str, LayerEstimate]                 #: in execution order
    logit_noise: dict[ErrorSource, np.ndarray]       #: (n_classes,) predicted logit noise variance per source
    logit_signal: float                              #: mean over images of Σ_j z_j² (clean logits)
    top1: float                                      #: predicted top-1 (fraction)
    top1_clean: float                                #: top-1 of the clean probe logits
    seconds: float = 0.0                             #: wall time of the estimate
    layer_logit_noise: dict[str, float] = field(default_factory=dict)  #: Σ_j σ_j² added by each layer

    @property
    def conv1_snr_db(self) -> float:
        """Isolated SNR of the first analog layer (dB)."""
        return next(iter(self.layers.values())).snr_db

    @property
    def fc_snr_db(self) -> float:
        """End-to-end SNR at the logits (dB)."""
        return snr_db(self.logit_signal, float(sum(v.sum() for v in self.logit_noise.values())))

    @property
    def snr_db(self) -> dict[str, float]:
        return {n: l.snr_db for n, l in self.layers.items()}

    def breakdown(self):
        """One row per layer: isolated SNR, signal and expected squared error per source (summed over channels)."""
        import pandas as pd

        rows = []
        for name, le in self.layers.items():
            row = {"layer": name, "snr_db": le.snr_db, "signal": float(le.signal.sum())}
            for s in ErrorSource:
                row[f"err_{s.value}"] = float(le.error[s].sum())
            row["logit_noise"] = self.layer_logit_noise.get(name, math.nan)
            rows.append(row)
        return pd.DataFrame(rows)

    def to_row(self) -> dict[str, Any]:
        """Flat dict: conv1/fc SNR, top-1, logit noise per source (``err_<source>``), per-layer SNR."""
        row: dict[str, Any] = {"config": self.config_name, "conv1_snr_db": self.conv1_snr_db,
                               "fc_snr_db": self.fc_snr_db, "top1": self.top1, "top1_clean": self.top1_clean}
        total = float(sum(v.sum() for v in self.logit_noise.values()))
        for s in ErrorSource:
            v = float(self.logit_noise[s].sum())
            row[f"err_{s.value}"] = v
            row[f"share_{s.value}"] = v / total if total > 0 else 0.0
        for name, le in self.layers.items():
            row[f"snr_db[{name}]"] = le.snr_db
        row["estimate_seconds"] = self.seconds
        return row


def _model_weights(probes: Any, model: Any = None) -> dict[str, np.ndarray]:
    """Folded weight matrices of the probed model's analog layers."""
    from cimstat.models import load
    from cimstat.network import analog_layers, fold_batchnorm

    if model is None:
        name = probes.stats.meta.get("model")
        if name != "default":
            raise EstimationError(f"the probes are for model {name!r}; pass model=<the nn.Module> to estimate() "
                                  "(only the embedded 'default' model loads without a weights file)")
        model = load("default")
    if isinstance(model, Mapping):
        return {k: np.asarray(v, dtype=np.float64) for k, v in model.items()}
    probes.check_model(model)
    folded = fold_batchnorm(model)
    return {spec.name: spec.weight_matrix.detach().double().numpy() for spec in analog_layers(folded)}


class Engine:
    """The analytic engine bound to one probe set (caches weights and per-layer statistics)."""

    def __init__(self, probes: Any, model: Any = None):
        self.probes = probes
        stats = probes.stats
        weights = _model_weights(probes, model)
        missing = [n for n in stats.layers if n not in weights]
        if missing:
            raise EstimationError(f"the model has no analog layer(s) {missing[:3]} that the probes describe")
        self.layers = {n: LayerModel(ls, weights[n]) for n, ls in stats.layers.items()}
        self.logits = np.asarray(stats.logits, dtype=np.float64)
        self.labels = np.asarray(stats.labels, dtype=np.int64)
        self.logit_signal = float((self.logits ** 2).sum(1).mean())
        self.top1_clean = float((self.logits.argmax(1) == self.labels).mean())
        self._prop: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        noise_prop = probes.noise_prop
        if noise_prop is not None:
            for n in self.layers:
                if n not in noise_prop.layers:
                    raise EstimationError(f"noise_prop.pkl has no propagation data for layer {n!r}")
                lp = noise_prop.layers[n]
                cls = np.asarray(lp.weight_sens_class, dtype=np.float64)
                share = cls / np.maximum(cls.sum(1, keepdims=True), 1e-300)
                self._prop[n] = (np.asarray(lp.ratio, dtype=np.float64), np.asarray(lp.weight_sens, dtype=np.float64),
                                 share)

    def resolve(self, config: HardwareConfig) -> dict[str, ResolvedLayer]:
        from cimstat.calibrate import resolve

        return resolve(config, self.probes)

    def estimate(self, config: HardwareConfig | str | Mapping[str, Any],
                 resolved: Mapping[str, ResolvedLayer] | None = None) -> Estimate:
        start = time.perf_counter()
        config = load_config(config)
        config.check_layer_names(self.layers)
        if resolved is None:
            resolved = self.resolve(config)
        if self.probes.noise_prop is None:
            raise EstimationError("the probe folder has no noise_prop.pkl; fc SNR and top-1 need it (run probing)")
        n_classes = self.logits.shape[1]
        logit = {s: np.zeros(n_classes) for s in ErrorSource}
        layers: dict[str, LayerEstimate] = {}
        per_layer: dict[str, float] = {}
        for name, lm in self.layers.items():
            if name not in resolved:
                raise EstimationError(f"resolved ranges have no entry for layer {name!r}")
            le = estimate_layer(lm, resolved[name])
            layers[name] = le
            ratio, sens, share = self._prop[name]
            before = float(sum(v.sum() for v in logit.values()))
            for s, v in le.white.items():
                if np.any(v):
                    logit[s] += v @ ratio
            for s, v in le.fixed.items():
                logit[s] += (v * sens).sum(1) @ share
            per_layer[name] = float(sum(v.sum() for v in logit.values())) - before
        total = sum(logit.values())
        acc = predicted_top1(self.logits, self.labels, total)
        return Estimate(config_name=config.name, layers=layers, logit_noise=logit, logit_signal=self.logit_signal,
                        top1=acc, top1_clean=self.top1_clean, seconds=time.perf_counter() - start,
                        layer_logit_noise=per_layer)


_ENGINES: dict[int, tuple[weakref.ref, Engine]] = {}


def engine_for(probes: Any, model: Any = None) -> Engine:
    """The cached :class:`Engine` of a probe set (one per live ``ProbeSet`` object)."""
    key = id(probes)
    hit = _ENGINES.get(key)
    if hit is not None and hit[0]() is probes and model is None:
        return hit[1]
    eng = Engine(probes, model)
    for k in [k for k, (ref, _) in _ENGINES.items() if ref() is None]:
        del _ENGINES[k]
    _ENGINES[key] = (weakref.ref(probes), eng)
    return eng


def estimate(probes: Any, config: HardwareConfig | str | Mapping[str, Any],
             resolved: Mapping[str, ResolvedLayer] | None = None, *, model: Any = None) -> Estimate:
    """Predict, in closed form, what the Monte Carlo referee would measure for ``config``.

    ``probes``: a :class:`cimstat.probes.ProbeSet` (with ``noise_prop``); ``resolved``: every
    range a number (default :func:`cimstat.calibrate.resolve`); ``model``: the float model (or
    a dict of folded ``(C_out, K)`` weight matrices) when the probes are not of the default model.
    """
    return engine_for(probes, model).estimate(config, resolved)
