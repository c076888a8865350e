"""Whole-network estimate: every layer's error, propagation to the logits, SNRs and top-1.

Two kinds of error leave a layer and travel differently (linear regime, layers and sources
independent, contributions add):

* per-read errors (input rounding, read noise, ADC): independent between output positions;
  logit ``j`` gains ``Σ_c err_c · ratio[c, j]`` (``NoiseProp.ratio``);
* fixed weight errors (weight quantization, programming error, clipping bias): shared by all
  positions; logit noise energy ``Σ_{c,k} s²_ck S_ck`` (``NoiseProp.weight_sens``), spread over
  the classes in proportion to ``weight_sens_class[c]``; the weight rounding is instead one exact
  deterministic logit shift per coherent image, ``δz_nd = Σ_ck dW_ck ∂z_d/∂W_ck``, wherever the probes
  kept per-sample weight gradients (``weight_grad``, small layers) or output gradients and layer inputs
  (``out_grad``, ``layer_input``: :func:`weight_error_logit_shift`). The shifts of all layers add as
  amplitudes, and they are far from independent: 4-bit weights on every layer of the default model
  (512 validation images, each layer quantized alone) give single-layer logit errors that add up to 1.55x
  the sum of their energies (up to 0.58 correlated: conv1 with layer1.0.conv1; 0.035 on average over the
  210 pairs; the mean shift over the images is not what correlates). The per-weight route, independent
  layers, was 1.1 dB optimistic at the logits there; the per-image route is 0.3-0.4 dB pessimistic (the
  linear sum of the layers' errors exceeds that of the whole quantized network by about as much).

* deterministic errors (:mod:`.coherent`): a relative gain ``a_c`` and offset ``m_c`` per channel
  move the logits of probe image ``n`` by ``δz_n = Σ_layers Σ_c a_c·gain_jac[n,c] + m_c·offset_jac[n,c]``
  (amplitudes add over layers and sources); they add ``E_n[δz_nj²]`` to logit ``j``'s error
  energy, attributed to source ``s`` as ``E_n[δz^s_nj·δz_nj]``.

* per-read noise rectified by a max pooling (:mod:`.pooling`, ADC thermal noise of the layer feeding it): the
  maximum of noisy, nearly equal window elements sits above the clean one, a deterministic logit shift per
  image (the float network run on with the pooled map's expectation) that joins the shifts above.

``fc SNR = Σ_n Σ_j z_nj² / (N · Σ_j σ_j²)`` over the probe images' clean logits ``z``; top-1
by Gauss–Hermite quadrature (:mod:`cimstat.accuracy`) with the random variances, corrected by
the change the per-image shifts ``δz_n`` make on the images that carry them (the first
``gain_jac.shape[0]`` probe images): ``top1 = A(all) + A_shifted(coh) - A(coh)``.

That is the linear route. Beyond its limits (:data:`TOP1_MIN_FC_SNR_DB`, :data:`TOP1_MIN_LAYER_SNR_DB`,
:data:`TOP1_MAX_LAYER_NSR_SUM`) fc SNR and top-1 come from the mean-field route (:mod:`.meanfield`): every
layer's gain, offset, rounded weights and remaining error variance, carried as Gaussians through the network
over the probe images.
"""
from __future__ import annotations

import hashlib
import math
import time
import warnings
import weakref
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Mapping

import numpy as np

from cimstat.accuracy import correct_probability, mean_with_se
from cimstat.accuracy import top1 as predicted_top1
from cimstat.accuracy import top1_with_se
from cimstat.errors import EstimationError
from cimstat.hardware import HardwareConfig, ResolvedLayer, load_config

from .layer import (ENGINE_CACHE_BYTES, CacheBudget, LayerEstimate, LayerModel, adc_clipping_shift, adc_curvature,
                    clipping_shift_applies, estimate_layer)
from .coherent import coherent_energy
from .meanfield import MEANFIELD_IMAGES, MEANFIELD_INPUT_ELEMENTS, LayerPerturbation, MeanFieldNetwork, PatchVariance
from .pooling import clean_logits, max_pool_noise_shift, pooled_layers
from cimstat.metrics import snr_db

from .sources import ErrorSource

__all__ = ["Estimate", "Engine", "estimate", "engine_for", "TOP1_MIN_FC_SNR_DB", "TOP1_MIN_LAYER_SNR_DB",
           "TOP1_MAX_LAYER_NSR_SUM", "ADC_PER_IMAGE_NOTE"]

POOL_RECTIFIED_SOURCES = (ErrorSource.ADC_THERMAL_NOISE,)
"""The per-read noises whose rectification by max pooling (:mod:`.pooling`) the linear route adds as a shift.
Read noise is not among them: it is 0 wherever a patch's inputs are all 0, which is where a window's elements are
alike (the background). Counted with its mean variance everywhere, it moved the fc SNR of read1%-state-indep from
18.40 to 18.36 dB (MC 18.53) and read10%-proportional from 20.82 to 20.84 (MC 20.82): a little farther, both."""

POOL_MEMO_ENTRIES = 16
"""Max-pooling shifts kept per engine (one per thermal-noise variance map; n_coherent x n_classes floats each): a sweep
that comes back to a noise level reuses it."""

MEANFIELD_TOP1_NOTE = """Top-1 from the mean-field route on every design (``meanfield_top1=True``; ``--meanfield-top1``
of the sweep commands), the fc SNR still from the linear route (``Estimate.route`` stays ``"linear"``; ``route_note``
says so; ``top1_linear`` keeps the linear route's). The route carries the probe images' means and variances through
the nonlinear network (ReLU, pooling, ADC clipping), which the linear route's top-1 leaves out: on nine
linear-route designs of the validation and stress sweeps, against the Monte Carlo on the same 1,000 probe images,
its top-1 was off by 0.12 pp on average (max 0.28, signed −0.01) where the linear route's was 0.26 (max 0.61,
optimistic by 0.25). Its fc SNR is not used here: with input rounding alone it can be far too high
(in4: 21.38 against the MC's 18.15 dB). It costs the route's pass over the probe images: 11-22 s per design on
the default model with 2 threads (nine validation designs), against 0.1-3 s on the linear route; without the model (weight matrices only) top-1 stays linear
and ``top1_note`` says why."""

TOP1_MIN_FC_SNR_DB = 7.0
"""Below this linearised fc (logits) SNR the engine takes the mean-field route (:mod:`.meanfield`) for the fc SNR
and top-1 (``Estimate.route``; why in ``route_note``; the linearised numbers stay in ``fc_snr_db_linear`` and
``top1_linear``); where that route cannot run it declines top-1 (NaN, ``top1_note`` says why). The propagation is linear around the
float network; far from it the errors compound nonlinearly. Measured on the default model (1,000
validation images for the Monte Carlo unless said): the linearised top-1 is within 1.4 pp at estimated fc
SNRs of 7.2-9.1 dB (read noise 3 % / 3.5 %: -0.6 / -1.1 pp; programming error 3 % / 3.5 %: -1.4 / -1.1 pp;
thermal2-adc6 against its 256-image MC: +0.8 pp), and 7-26 pp optimistic at 5.7 dB and below, even where the
fc SNR itself is right (collapse-w4-prog5%: 2.82 vs 2.80 dB, top-1 88 vs 79 %). What the linear route
misses there, measured on that configuration's noisy logits (8 chips, 500 images): they shrink toward a
common vector — regressed on the clean logits the error has a slope of -0.55 in every class, and a mean
over images and chips that holds 25 % of its energy. Noise rectified by every ReLU turns silent units on,
so all images drift to the same features. The energy is right, but most of it is no longer noise around
the clean logits. The bit-serial max-range ADCs collapse to one class in the Monte Carlo (9.4 %)."""


TOP1_MIN_LAYER_SNR_DB = 3.0
"""The engine also takes the mean-field route where some layer's isolated SNR is below this (its error holds half its signal's
energy), or where the layers' error-to-signal ratios add up to more than :data:`TOP1_MAX_LAYER_NSR_SUM`: the
propagation is linear around the float network, and there the errors change the operating point of the layers
after them. Measured on the default model (MC on 512 validation images unless said):

* one layer at 2-bit weights, the rest 8-bit: layer1.1.conv2 (-1.0 dB isolated) fc 11.5 dB against the MC's 6.4,
  top-1 100.0 % against 94.1 %; layer4.1.conv1 (-0.5 dB) fc 7.0 against 4.9, top-1 98.9 % against 96.3 %;
* 1-bit input slices, 128 rows, 5-bit calibrated ADC, offset weights (256 images): every layer's isolated SNR within
  0.6 dB of the MC's but one at 1.0 dB (MC 4.1-12.8 dB, 128 images), the ratios adding up to 3.5, yet fc 7.6 dB
  against the MC's 4.0 and top-1 97.8 % against 89.5 %;
* but layer3.1.conv1 at 2-bit inputs alone (4.6 dB isolated, ratios adding up to 0.35): fc 18.5 dB against 18.2,
  top-1 98.8 % against 98.6 %."""

TOP1_MAX_LAYER_NSR_SUM = 1.0
"""See :data:`TOP1_MIN_LAYER_SNR_DB`: the largest ``Σ_layers 10^(-SNR_layer/10)`` (isolated) on the linear route: the
layers' errors together as large as a signal. It was 2.0; measured on the validation sweep (1,000-image MC), the three
configurations between 1.0 and 2.0 have their fc SNR closer to the MC on the mean-field route, and top-1 on two: adc6-cal-offset-weights (ratios 1.31) fc
12.56 -> 11.85 dB against the MC's 11.27, top-1 98.42 -> 98.53 % against 98.30 %; design-offset-w6 (1.69) fc 10.39
-> 9.27 dB against 9.07, top-1 98.29 -> 98.22 % against 97.61 %; w4 (1.01) fc 10.04 -> 10.21 dB against 10.37, top-1
98.90 -> 97.90 % against 98.00 %. Below 1.0 the mean-field route was also closer on fc for thermal1-adc6 (0.28:
13.22 -> 12.53 dB, MC 12.47), thermal2-adc6 (0.74: 7.15 -> 6.83, MC 6.56) and read5%-state-indep-w2slices (0.51:
11.95 -> 11.83, MC 11.58), but at 12-28 s per estimate instead of 0.1-2 s, where the linear route is within 0.8 dB
and 0.9 pp."""


ADC_PER_IMAGE_NOTE = """The precise ADC route (``adc_per_image=True``; ``--adc-per-image`` of the sweep commands).
By default a layer's deterministic ADC error is split into a per-channel gain and offset (propagated per image)
and a residual taken over the input sample and propagated as white noise, independent between layers. The
residuals of different layers are correlated at the logits: for adc6-cal-bitserial the 21 single-layer logit
errors add up to 1.3 dB more energy than their sum. With this route, every layer that kept output gradients
(``out_grad``, probing schema 7) evaluates its ADC error on every output of the noise-propagation images
(the conditional mean over the ADC's thermal noise), and that error map is propagated exactly per image, so
errors of all layers add as amplitudes; the thermal noise's redrawn part stays white. Layers with device noise
under the ADC, and layers whose map would exceed ``PRECISE_ELEMENT_BUDGET`` conversions, keep the default route.
Top-1 comes from the default route: on the 64 images the deterministic shifts transfer poorly to accuracy
(thermal2-adc6: 98.24 % against the MC's 96.09 %, the default route 96.88 %). Cost: 5-14 s per configuration
for the default model (64 images, every output: about 8x the sample route's conversions), where the default
route takes 0.1-0.5 s."""


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
    top1_linear: float = math.nan                    #: the linearised top-1, also where ``top1`` is declined
    top1_note: str = ""                              #: why ``top1`` is NaN (empty when it is estimated)
    layer_logit_noise: dict[str, float] = field(default_factory=dict)  #: Σ_j σ_j² added by each layer
    #: ``"linear"`` (the linearised propagation) or ``"meanfield"`` (the collapse regime, :mod:`.meanfield`):
    #: where ``top1`` and ``fc_snr_db`` come from
    route: str = "linear"
    #: why the mean-field route was taken (the linear route's limit that was crossed), empty on the linear route
    route_note: str = ""
    fc_snr_db_meanfield: float = math.nan            #: the mean-field route's fc SNR (dB), NaN on the linear route
    #: image-sampling standard error of :attr:`top1` (fraction): the spread of the per-image probabilities of a
    #: correct answer over the probe images, ``sd_n(P_n)/√N`` (of the route that gave it). An accuracy measured on
    #: other images differs from it by this much on top of its own error bar
    top1_se: float = math.nan

    @property
    def conv1_snr_db(self) -> float:
        """Isolated SNR of the first analog layer (dB)."""
        return next(iter(self.layers.values())).snr_db

    @property
    def fc_snr_db(self) -> float:
        """End-to-end SNR at the logits (dB): the mean-field route's where it was taken (:attr:`route`), else
        :attr:`fc_snr_db_linear`."""
        return self.fc_snr_db_meanfield if self.route == "meanfield" else self.fc_snr_db_linear

    @property
    def fc_snr_db_linear(self) -> float:
        """The linearised fc SNR (dB), the one :attr:`logit_noise` breaks down by source."""
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
                               "fc_snr_db": self.fc_snr_db, "top1": self.top1, "top1_clean": self.top1_clean,
                               "top1_linear": self.top1_linear, "top1_note": self.top1_note, "route": self.route,
                               "fc_snr_db_linear": self.fc_snr_db_linear, "route_note": self.route_note,
                               "top1_se": self.top1_se}
        total = float(sum(v.sum() for v in self.logit_noise.values()))
        for s in ErrorSource:
            v = float(self.logit_noise[s].sum())
            row[f"err_{s.value}"] = v
            row[f"share_{s.value}"] = v / total if total > 0 else 0.0
        for name, le in self.layers.items():
            row[f"snr_db[{name}]"] = le.snr_db
        row["estimate_seconds"] = self.seconds
        return row


def _model_weights(probes: Any, model: Any = None) -> tuple[dict[str, np.ndarray], Any]:
    """Folded weight matrices of the probed model's analog layers, and the folded model (None when only
    weights were given)."""
    from cimstat.models import load
    from cimstat.network import analog_layers, fold_batchnorm

    if model is None:
        name = probes.stats.meta.get("model")
        if name != "default":
            raise EstimationError(f"the probes are for model {name!r}; pass model=<the nn.Module> to estimate() "
                                  "(only the embedded 'default' model loads without a weights file)")
        model = load("default")
    if isinstance(model, Mapping):
        return {k: np.asarray(v, dtype=np.float64) for k, v in model.items()}, None
    probes.check_model(model)
    folded = fold_batchnorm(model)
    return {spec.name: spec.weight_matrix.detach().double().numpy() for spec in analog_layers(folded)}, folded


def _probe_images(meta: Mapping[str, Any], n: int, max_elements: int):
    """The first images of the split the probes were made on (:mod:`cimstat.data`), with their labels: ``n``,
    or fewer so that they hold at most ``max_elements`` input elements (at least one image)."""
    import torch

    from cimstat import data

    if meta.get("dataset") is None or meta.get("split") is None:
        raise EstimationError("the probe metadata names no dataset/split to reload the probe images from")
    ds = data.dataset(meta["dataset"], meta["split"], meta.get("data_root"), n)
    n = max(1, min(n, max_elements // ds[0][0].numel()))
    items = [ds[i] for i in range(n)]
    return torch.stack([x for x, _ in items]), torch.as_tensor([int(y) for _, y in items])


class Engine:
    """The analytic engine bound to one probe set (caches weights and per-layer statistics)."""

    def __init__(self, probes: Any, model: Any = None, *, adc_per_image: bool = False,
                 cache_bytes: int = ENGINE_CACHE_BYTES, meanfield_images: int = MEANFIELD_IMAGES):
        self.probes = probes
        #: the precise ADC route (:data:`ADC_PER_IMAGE_NOTE`): the ADC error of every output of the
        #: noise-propagation images, propagated per image, where the probes allow it
        self.adc_per_image = bool(adc_per_image)
        stats = probes.stats
        weights, self._folded = _model_weights(probes, model)
        #: the mean-field route (:mod:`.meanfield`), built on first use; or why it cannot be (a string)
        self._meanfield: MeanFieldNetwork | str | None = None
        #: the max poolings fed by an analog layer (:func:`.pooling.pooled_layers`), found on first use
        self._pools: dict[str, tuple[str, bool]] | None = None
        self._pool_images = None  #: (probe images, their float logits) for the max-pooling rectification
        self._pool_memo: dict[bytes, np.ndarray] = {}  #: its logit shifts by noise variance (POOL_MEMO_ENTRIES)
        self._reloaded = None  #: (images asked for, the probe images reloaded): :meth:`_checked_probe_images`
        if isinstance(meanfield_images, bool) or not isinstance(meanfield_images, int) or meanfield_images < 1:
            raise EstimationError(f"meanfield_images={meanfield_images!r} must be a positive integer")
        self.meanfield_images = meanfield_images  #: probe images the mean-field route runs over (at most)
        missing = [n for n in stats.layers if n not in weights]
        if missing:
            raise EstimationError(f"the model has no analog layer(s) {missing[:3]} that the probes describe")
        self.layers = {n: LayerModel(ls, weights[n]) for n, ls in stats.layers.items()}
        #: the layers' caches share one byte budget (``cache_bytes``; :data:`~cimstat.engine.layer.ENGINE_CACHE_BYTES`)
        self.cache_budget = CacheBudget(cache_bytes)
        for lm in self.layers.values():
            lm.budget = self.cache_budget
        self.logits = np.asarray(stats.logits, dtype=np.float64)
        self.labels = np.asarray(stats.labels, dtype=np.int64)
        self.logit_signal = float((self.logits ** 2).sum(1).mean())
        self.top1_clean = float((self.logits.argmax(1) == self.labels).mean())
        self._prop: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        self._coherent: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self._grad: dict[str, np.ndarray] = {}   # (N_coh, D, C_out·K) per-sample weight gradients, small layers
        self._maps: dict[str, tuple] = {}         # (layer input, (N_coh, D, C_out·P) output gradients), the others
        # per coherent image: how much more (or less) than average each layer's white / fixed
        # errors reach each logit direction (N, D), mean 1 over the images
        self._image_weight: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self.coherent_per_class = False
        noise_prop = probes.noise_prop
        if noise_prop is not None:
            for n in self.layers:
                if n not in noise_prop.layers:
                    raise EstimationError(f"noise_prop.pkl has no propagation data for layer {n!r}")
                lp = noise_prop.layers[n]
                if lp.input_sample is not None:
                    self.layers[n].input_sample = np.asarray(lp.input_sample, dtype=np.float32)
                    if lp.sample_grad_weight is not None:
                        self.layers[n].input_grad_weight = np.asarray(lp.sample_grad_weight, dtype=np.float32)
                cls = np.asarray(lp.weight_sens_class, dtype=np.float64)
                share = cls / np.maximum(cls.sum(1, keepdims=True), 1e-300)
                sens = np.asarray(lp.weight_sens, dtype=np.float64)
                self.layers[n].weight_sens = sens
                self._prop[n] = (np.asarray(lp.ratio, dtype=np.float64), sens, share)
                if lp.weight_grad is not None:
                    g = np.asarray(lp.weight_grad, dtype=np.float64)
                    self._grad[n] = g.reshape(g.shape[0], g.shape[1], -1)
                    self.layers[n].exact_weight_shift = lp.gain_jac is not None
                elif lp.out_grad is not None:
                    import torch
                    og = torch.from_numpy(np.asarray(lp.out_grad, dtype=np.float32) * np.float32(lp.out_grad_scale))
                    self._maps[n] = (torch.from_numpy(np.asarray(lp.layer_input, dtype=np.float32)),
                                     og.reshape(og.shape[0], og.shape[1], -1))
                    self.layers[n].exact_weight_shift = lp.gain_jac is not None
                    if self.adc_per_image and lp.gain_jac is not None:
                        self.layers[n].adc_image_vectors = _im2col(self._maps[n][0], stats.layers[n])
                if lp.gain_jac is not None:
                    self._coherent[n] = (np.asarray(lp.gain_jac, dtype=np.float64),
                                         np.asarray(lp.offset_jac, dtype=np.float64))
                    self._image_weight[n] = (_relative(lp.ratio_image), _relative(lp.sens_image))
            if self._coherent and len(self._coherent) != len(self.layers):
                raise EstimationError("noise_prop.pkl has coherent-error Jacobians for only some layers; re-run probing")
            if self._coherent:
                n_coh, _, n_dir = next(iter(self._coherent.values()))[0].shape
                if n_coh > len(self.logits):
                    raise EstimationError(f"noise_prop.pkl has coherent-error Jacobians of {n_coh} images but the "
                                          f"activation statistics only {len(self.logits)}")
                self.coherent_per_class = (noise_prop.meta.get("coherent_directions") == "classes"
                                           and n_dir == self.logits.shape[1])

    def resolve(self, config: HardwareConfig) -> dict[str, ResolvedLayer]:
        from cimstat.calibrate import resolve

        return resolve(config, self.probes)

    def estimate(self, config: HardwareConfig | str | Mapping[str, Any],
                 resolved: Mapping[str, ResolvedLayer] | None = None, *, meanfield_top1: bool = False) -> Estimate:
        """The estimate of ``config`` (see :func:`estimate`). ``meanfield_top1``: top-1 from the mean-field route on
        every design (:data:`MEANFIELD_TOP1_NOTE`), not only where the linear route ends."""
        start = time.perf_counter()
        config = load_config(config)
        config.check_layer_names(self.layers)
        if resolved is None:
            resolved = self.resolve(config)
        if self.probes.noise_prop is None:
            raise EstimationError("the probe folder has no noise_prop.pkl; fc SNR and top-1 need it (run probing)")
        if not self.adc_per_image:
            return self._estimate(config, resolved, start, False, meanfield_top1)
        # the precise route for the error energies; top-1 from the default route (ADC_PER_IMAGE_NOTE)
        default = self._estimate(config, resolved, start, False, meanfield_top1)
        out = self._estimate(config, resolved, start, True)
        out.top1_linear, out.top1, out.top1_note = default.top1_linear, default.top1, default.top1_note
        out.top1_se = default.top1_se
        out.route, out.route_note, out.fc_snr_db_meanfield = default.route, default.route_note, default.fc_snr_db_meanfield
        return out

    def _estimate(self, config: HardwareConfig, resolved: Mapping[str, ResolvedLayer], start: float,
                  precise: bool, meanfield_top1: bool = False) -> Estimate:
        n_classes = self.logits.shape[1]
        logit = {s: np.zeros(n_classes) for s in ErrorSource}
        layers: dict[str, LayerEstimate] = {}
        per_layer: dict[str, float] = {}
        shifts: dict[ErrorSource, np.ndarray] = {}        # (N_coh, D) logit shift per source
        layer_shift: dict[str, np.ndarray] = {}
        image_var = 0.0                                   # (N_coh, n_classes) random variance per image
        for name, lm in self.layers.items():
            if name not in resolved:
                raise EstimationError(f"resolved ranges have no entry for layer {name!r}")
            le = estimate_layer(lm, resolved[name], precise)
            layers[name] = le
            ratio, sens, share = self._prop[name]
            white_l = np.zeros(n_classes)
            fixed_l = np.zeros(n_classes)
            for s, v in le.white.items():
                if np.any(v):
                    add = v @ ratio
                    logit[s] += add
                    white_l += add
            for s, err in le.weight_maps.items():
                # fixed weight errors (one draw of rounding) propagated exactly per image
                d = self._memo_by_array((name, "map", s), err, lambda: self._weight_error_shift(name, err))
                shifts[s] = shifts.get(s, 0.0) + d
                layer_shift[name] = layer_shift.get(name, 0.0) + d
            for s, v in le.fixed.items():
                # the per-weight variances are cached arrays of the layer model: the contraction
                # with the sensitivities (C_out x K) is memoised per array (identity, weakly held)
                add = self._memo_by_array((name, "fixed", s), v, lambda: np.einsum("ck,ck->c", v, sens) @ share)
                logit[s] += add
                fixed_l += add
            for s, v in le.fixed_channel.items():
                add = v @ share
                logit[s] += add
                fixed_l += add
            per_layer[name] = float(white_l.sum() + fixed_l.sum())
            if name in self._image_weight:
                rw, rf = self._image_weight[name]
                if not self.coherent_per_class:  # projections: one scale per image for all classes
                    rw, rf = rw.mean(1, keepdims=True), rf.mean(1, keepdims=True)
                image_var = image_var + white_l * rw + fixed_l * rf
            self._add_shifts(name, le, logit, shifts, layer_shift)
            if le.adc_map is not None:  # the precise ADC route: its deterministic error on every output
                _, g = self._maps[name]
                d = self._memo_by_array((name, "adc map"), le.adc_map, lambda: _map_shift(g, le.adc_map))
                shifts[ErrorSource.ADC_QUANTIZATION] = shifts.get(ErrorSource.ADC_QUANTIZATION, 0.0) + d
                layer_shift[name] = layer_shift.get(name, 0.0) + d
        self._add_pool_noise_shift(layers, logit, shifts, layer_shift, per_layer)
        random_var = sum(logit.values())
        total_shift = sum(shifts.values()) if shifts else None
        if total_shift is not None:
            energy = self._shift_energy  # per class, attributed to each source / layer
            for s, v in shifts.items():
                logit[s] = logit[s] + energy(v, total_shift)
            for name, v in layer_shift.items():
                per_layer[name] += float(energy(v, total_shift).sum())
        acc, acc_se = self._top1(random_var, total_shift, image_var if self._image_weight else None)
        fc = snr_db(self.logit_signal, float(sum(v.sum() for v in logit.values())))
        note = ""
        worst = min(layers, key=lambda n: layers[n].snr_db)
        nsr_sum = sum(10 ** (-le.snr_db / 10) for le in layers.values())
        if fc < TOP1_MIN_FC_SNR_DB:
            note = (f"the estimated fc SNR {fc:.1f} dB is below {TOP1_MIN_FC_SNR_DB:g} dB, where errors compound "
                    "beyond the linearised propagation (accuracy may collapse)")
        elif layers[worst].snr_db < TOP1_MIN_LAYER_SNR_DB:
            note = (f"layer {worst}'s isolated SNR {layers[worst].snr_db:.1f} dB is below {TOP1_MIN_LAYER_SNR_DB:g} "
                    "dB, where its error changes what the next layers do (the fc SNR, linearised, is optimistic there)")
        elif nsr_sum > TOP1_MAX_LAYER_NSR_SUM:
            note = (f"the layers' isolated error-to-signal ratios add up to {nsr_sum:.2f}, more than "
                    f"{TOP1_MAX_LAYER_NSR_SUM:g}, where errors compound beyond the linearised propagation (the fc "
                    "SNR is optimistic there)")
        out = Estimate(config_name=config.name, layers=layers, logit_noise=logit, logit_signal=self.logit_signal,
                       top1=acc, top1_clean=self.top1_clean, seconds=0.0, layer_logit_noise=per_layer,
                       top1_linear=acc, top1_se=acc_se)
        # the collapse regime, or asked for (meanfield_top1): the mean-field route (the precise route takes the default's)
        if (note or meanfield_top1) and not precise:
            try:
                out.fc_snr_db_meanfield, out.top1, out.top1_se = self._meanfield_route(resolved, layers)
            except EstimationError as err:
                if note:
                    out.top1 = out.top1_se = math.nan
                    out.top1_note = (f"top-1 not estimated: {note}, and the mean-field route is not available "
                                     f"({err}); run the Monte Carlo referee for this design")
                else:
                    out.top1_note = f"top-1 from the linear route: the mean-field route is not available ({err})"
            else:
                if note:
                    out.route, out.route_note = "meanfield", "mean-field route: " + note
                else:
                    out.route_note = "top-1 from the mean-field route (meanfield_top1); fc SNR from the linear route"
        out.seconds = time.perf_counter() - start
        return out

    def _meanfield_network(self) -> MeanFieldNetwork:
        """The mean-field network over the probe images (built once; :class:`EstimationError` if it cannot be)."""
        if isinstance(self._meanfield, str):
            raise EstimationError(self._meanfield)
        if self._meanfield is None:
            try:
                if self._folded is None:
                    raise EstimationError("the engine was given weight matrices, not the model (pass the nn.Module)")
                self._meanfield = MeanFieldNetwork(self._folded, self._checked_probe_images(self.meanfield_images))
            except EstimationError as err:
                self._meanfield = str(err)
                raise
            except Exception as err:  # a dataset that cannot be read here: said once, every time
                self._meanfield = f"the probe images could not be reloaded: {err}"
                raise EstimationError(self._meanfield) from err
        return self._meanfield

    def _meanfield_route(self, resolved: Mapping[str, ResolvedLayer], layers: Mapping[str, LayerEstimate]
                         ) -> tuple[float, float, float]:
        """``(fc SNR dB, top-1, its image-sampling SE)`` of the mean-field route (:mod:`.meanfield`) over the probe
        images."""
        net = self._meanfield_network()
        perturb = {}
        for name, le in layers.items():
            lm, cfg = self.layers[name], resolved[name].config
            c_out = len(le.signal)
            a = sum((v for v in le.gain.values()), np.zeros(c_out))
            m = sum((v for v in le.offset.values()), np.zeros(c_out))
            bias = net.modules[name].bias
            b = np.zeros(c_out) if bias is None else bias.detach().double().numpy()
            ey = lm.stats.out_mean - b                          # E[W x], E[(W x)²] without the bias
            ey2 = lm.stats.out_sq_mean - 2 * b * lm.stats.out_mean + b * b
            rest = le.total - coherent_energy(a, m, ey2, ey)
            weight = None
            if cfg.weight_bits is not None:  # weight rounding is one fixed draw: applied exactly
                weight = lm.weights(cfg).dequantized
                rest = rest - le.error[ErrorSource.WEIGHT_QUANTIZATION]
            # the ADC clipping of the sampled route, moved to the noisy network's operating point (where it applies)
            moved = (partial(adc_clipping_shift, lm, resolved[name])
                     if ErrorSource.ADC_QUANTIZATION in le.gain and clipping_shift_applies(lm, resolved[name]) else None)
            # the ADC error's part that is a cubic in the output (clipping beyond the linear gain) goes on the means
            cubic = adc_curvature(lm, resolved[name]) if ErrorSource.ADC_QUANTIZATION in le.gain else None
            curves = () if cubic is None else (cubic,)
            rest = rest - sum((c.energy for c in curves), np.zeros(c_out))

            def incoherent(src: ErrorSource) -> np.ndarray:  # a source's error beyond its gain and offset
                zero = np.zeros(c_out)
                return le.error[src] - coherent_energy(le.gain.get(src, zero), le.offset.get(src, zero), ey2, ey)
            # programming error: one draw per chip, its errors correlated over a feature map's positions
            rest = np.maximum(rest, 0.0)
            fixed = (np.clip(incoherent(ErrorSource.PROGRAMMING_ERROR), 0.0, rest)
                     if np.any(le.error[ErrorSource.PROGRAMMING_ERROR] > 0) else None)
            patches = ()
            if cfg.read_noise > 0:
                # read noise follows each output's input patch (PatchVariance): its white part, within what is left.
                # Programming error is left even: shaped alike it moved collapse-w4-prog5% 80.9 -> 82.4 % (MC 79.9)
                # and prog5%-state-indep-w4slices 94.1 -> 94.4 (MC 90.7), its correlation over a feature map
                # (FIXED_ERROR_CORRELATION) having been set with the even spread
                read = np.clip(incoherent(ErrorSource.READ_NOISE), 0.0, rest - (0.0 if fixed is None else fixed))
                kernel = lm.noise(cfg).var_read.astype(np.float32)   # (C_out, K); float32: no copy per batch
                norm = kernel @ np.asarray(lm.stats.row_sq_mean, dtype=np.float64)   # Σ_k kernel_ck·E_clean[x_k²]
                read = np.where(norm > 0, read, 0.0)
                if np.any(read > 0):
                    patches = (PatchVariance(read / np.where(norm > 0, norm, 1.0), kernel),)
                    rest = rest - read
            perturb[name] = LayerPerturbation(a, m, rest, weight, moved, curves, fixed, patches)
        mean, var = net.moments(perturb)
        z, y = self.logits[:len(mean)], self.labels[:len(mean)]
        fc = snr_db(float((z ** 2).sum(1).mean()), float(((mean - z) ** 2 + var).sum(1).mean()))
        return (fc, *top1_with_se(mean, y, var))

    def _add_shifts(self, name: str, le: LayerEstimate, logit: dict, shifts: dict, layer_shift: dict) -> None:
        """Accumulate the per-image logit shifts of the layer's deterministic errors."""
        if not (le.gain or le.offset):
            return
        if name not in self._coherent:  # probes without coherent Jacobians: incoherent routes, energy only
            ratio, sens, share = self._prop[name]
            w2 = self.layers[name].weight ** 2
            for s, m in le.offset.items():
                logit[s] += (m * m) @ ratio
            for s, a in le.gain.items():
                logit[s] += ((a * a)[:, None] * w2 * sens).sum(1) @ share
            return
        g_jac, o_jac = self._coherent[name]
        here = None
        for s in set(le.gain) | set(le.offset):
            d = np.zeros(g_jac.shape[::2])
            if s in le.gain and np.any(le.gain[s]):
                d += le.gain[s] @ g_jac  # (C,) @ (N, C, D) -> (N, D)
            if s in le.offset and np.any(le.offset[s]):
                d += le.offset[s] @ o_jac
            shifts[s] = shifts.get(s, 0.0) + d
            here = d if here is None else here + d
        if here is not None:
            layer_shift[name] = layer_shift.get(name, 0.0) + here

    def _add_pool_noise_shift(self, layers: Mapping[str, LayerEstimate], logit: dict, shifts: dict,
                              layer_shift: dict, per_layer: dict) -> None:
        """The per-read noise rectified by max poolings (:mod:`.pooling`). Its per-image logit shift on the coherent
        images joins the deterministic shifts (amplitudes; without per-class coherent data its energy joins the
        noise), attributed to the sources of :data:`POOL_RECTIFIED_SOURCES` and to the layers by their shares of
        the variance."""
        if self._folded is None or not self._coherent:
            return
        if self._pools is None:
            self._pools = pooled_layers(self._folded, set(self.layers))
        var: dict[str, np.ndarray] = {}
        part: dict[tuple[str, ErrorSource], float] = {}
        for name, _ in self._pools.values():
            le = layers[name]
            per = {s: np.maximum(le.error.get(s, 0.0), 0.0) for s in POOL_RECTIFIED_SOURCES}
            v = sum(per.values())
            if np.any(v > 0):
                var[name] = v
                part.update({(name, s): float(p.sum()) for s, p in per.items()})
        if not var:
            return
        key = hashlib.sha256(b"".join(n.encode() + np.ascontiguousarray(v).tobytes() for n, v in var.items())).digest()
        memo = self._pool_memo
        n_coh = next(iter(self._coherent.values()))[0].shape[0]
        if key not in memo:
            if self._pool_images is None:
                try:
                    images = self._checked_probe_images(n_coh)
                    self._pool_images = (images, clean_logits(self._folded, images))
                except Exception as err:  # the probe images cannot be reloaded here: the term is left out, said once
                    warnings.warn(f"the max-pooling rectification of ADC thermal noise is left out: {err}",
                                  stacklevel=3)
                    self._pools = {}  # not tried again
                    return
            while len(memo) >= POOL_MEMO_ENTRIES:  # the oldest noise level goes first
                memo.pop(next(iter(memo)))
            memo[key] = max_pool_noise_shift(self._folded, self._pool_images[0], var, self._pools,
                                             self._pool_images[1])
        shift = memo[key]
        total = sum(part.values())
        # per-class amplitudes where every coherent image has its shift; else (projections, or fewer images
        # reloaded than the coherent ones) its energy per class joins the noise
        per_class = self.coherent_per_class and shift.shape[0] >= n_coh
        energy = None if per_class else (shift[:n_coh] ** 2).mean(0)
        for (name, s), p in part.items():
            if per_class:
                d = shift[:n_coh] * (p / total)
                shifts[s] = shifts.get(s, 0.0) + d
                layer_shift[name] = layer_shift.get(name, 0.0) + d
            else:
                logit[s] = logit[s] + energy * (p / total)
                per_layer[name] += float(energy.sum()) * (p / total)

    def _checked_probe_images(self, n: int):
        """The first ``n`` probe images, reloaded (:func:`_probe_images`: fewer where the input budget
        :data:`MEANFIELD_INPUT_ELEMENTS` allows fewer) and checked against the probed labels and the first 8
        probed logits: an image that is not the probed one would carry another image's logits. The largest set
        loaded is kept, and a smaller request takes its first images."""
        import torch

        n = min(n, len(self.labels))
        if self._reloaded is not None and n <= self._reloaded[0]:
            return self._reloaded[1][:n]
        images, labels = _probe_images(self.probes.stats.meta, n, MEANFIELD_INPUT_ELEMENTS)
        k = len(labels)
        if not np.array_equal(np.asarray(labels), self.labels[:k]):
            raise EstimationError("the reloaded probe images' labels differ from the probed ones")
        with torch.no_grad():
            clean = self._folded.eval()(images[:8].to(torch.float32)).double().numpy()
        if not np.allclose(clean, self.logits[:len(clean)], rtol=1e-3, atol=1e-3 * np.abs(clean).max()):
            raise EstimationError("the reloaded probe images do not reproduce the probed logits")
        self._reloaded = (n, images)
        return images

    def _weight_error_shift(self, name: str, err: np.ndarray) -> np.ndarray:
        """(N_coh, D) logit shift of the fixed weight error ``err`` (C_out, K) of layer ``name`` on the coherent
        images: ``Σ_{c,k} err_ck ∂z_d/∂W_ck`` from the per-sample weight gradients (small layers), else
        :func:`weight_error_logit_shift` from the output gradients and the layer inputs."""
        if name in self._grad:
            return self._grad[name] @ err.ravel()
        x, g = self._maps[name]
        return weight_error_logit_shift(x, g, err, self.probes.stats.layers[name])

    def _memo_by_array(self, key: tuple, arr: np.ndarray, compute):
        """``compute()`` memoised while ``arr`` is the very same (live) array object as last time under
        ``key`` (the engine's per-layer caches hand back the same object for the same config parts;
        a rebuilt array is a new object). Arrays are held weakly. The result must not be modified."""
        memo = self.__dict__.setdefault("_array_memo", {})
        hit = memo.get(key)
        if hit is not None and hit[0]() is arr:
            return hit[1]
        out = compute()
        try:
            memo[key] = (weakref.ref(arr), out)
        except TypeError:  # not weak-referenceable: no memo
            memo.pop(key, None)
        return out

    def _shift_energy(self, part: np.ndarray, total: np.ndarray) -> np.ndarray:
        """(n_classes,) ``E_n[part_nj · total_nj]``: the share of the coherent energy due to ``part``."""
        e = (part * total).mean(0)
        n_classes = self.logits.shape[1]
        if self.coherent_per_class:
            return e
        # random ±1 projections u_d: E_d[(u_d·δz)²] = Σ_j δz_j², spread uniformly over the classes
        return np.full(n_classes, float(e.mean()) / n_classes)

    def _top1(self, random_var: np.ndarray, shift: np.ndarray | None, image_var: np.ndarray | None
              ) -> tuple[float, float]:
        """Top-1 over all probe images and its image-sampling standard error (:attr:`Estimate.top1_se`).

        The mean over images of the correct-class probability with the class-average variances ``σ²_j``. Per-image
        variances (``image_var``, on the first ``n`` images) change it by the change they make on those images
        (a smooth, systematic effect: extrapolated). Per-class logit shifts known on the first ``n`` (coherent)
        images enter through a control variate: per class ``j`` the shift is fitted as ``δz_nj ≈ a_j·z_nj + b_j``
        over those images (least squares, residual energy ``e_j``); every image gets ``z·(1+a) + b`` with variance
        ``σ²_j + e_j`` (``A_model``) and the first ``n`` images their exact shift (``A_exact``):
        ``top1 = A_model(all) + (n/N)·(A_exact(first n) − A_model(first n))``, exact where known and the fitted
        model elsewhere; the per-image variances' change is then taken on the model logits of the first ``n``.
        (Extrapolating the first images' change under the shift to all, as before, let a single flip among 64
        images move the estimate by 1.4 pp.) Projections (no per-class shifts): the shift's energy counts as
        noise."""
        logits, labels = self.logits, self.labels
        if shift is not None and not self.coherent_per_class:
            random_var = random_var + self._shift_energy(shift, shift)
            shift = None
        if shift is None:
            p = correct_probability(logits, labels, random_var)
            acc, se = mean_with_se(p)
            if image_var is not None:
                n = image_var.shape[0]
                acc += predicted_top1(logits[:n], labels[:n], image_var) - float(p[:n].mean())
            return float(np.clip(acc, 0.0, 1.0)), se
        n = shift.shape[0]
        z, y = logits[:n], labels[:n]
        slope, offset, residual = _fit_shift_per_class(z, shift)
        model_logits = logits * (1.0 + slope) + offset
        model_var = random_var + residual
        p = correct_probability(model_logits, labels, model_var)
        acc, se = mean_with_se(p)
        model_n = float(p[:n].mean())   # A_model on the first n: the same per-image probabilities
        acc += n / len(logits) * (predicted_top1(z + shift, y, random_var) - model_n)
        if image_var is not None:
            acc += predicted_top1(model_logits[:n], y, image_var + residual) - model_n
        return float(np.clip(acc, 0.0, 1.0)), se


def _fit_shift_per_class(z: np.ndarray, shift: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per class ``j``, the least-squares line ``shift_nj ≈ a_j·z_nj + b_j`` over the ``n`` images of
    ``z`` (n, D): ``(a, b, e)``, ``e_j`` the mean squared residual. A class whose logits do not vary
    (or a single image) gets ``a_j = 0``, ``b_j`` the mean shift."""
    zc = z - z.mean(0)
    sc = shift - shift.mean(0)
    var = (zc ** 2).mean(0)
    ok = var > 1e-12 * max(float(var.max()), 1e-300)
    slope = np.where(ok, (zc * sc).mean(0) / np.where(ok, var, 1.0), 0.0)
    offset = shift.mean(0) - slope * z.mean(0)
    residual = ((sc - slope * zc) ** 2).mean(0)
    return slope, offset, residual


def weight_error_logit_shift(layer_input, out_grad, err: np.ndarray, geometry: Any) -> np.ndarray:
    """(N, D) exact logit shift of a fixed weight error on N images, linear regime:
    ``δz_nd = Σ_{c,p} g_{n,d,c,p}·e_{n,c,p}`` with ``e = err * x_n`` the output error map of image ``n`` (a
    convolution with ``err`` as its kernel and no bias; a product for a linear layer) and ``g = ∂z_d/∂y_{c,p}``.

    ``layer_input``: torch (N, C_in, H, W) or (N, K); ``out_grad``: torch (N, D, C_out·P) float32;
    ``err``: (C_out, K) in PyTorch's (C_in, kh, kw) order; ``geometry``: ``kind``, ``weight_shape``, ``stride``,
    ``padding``, ``dilation``, ``groups`` (a :class:`cimstat.probes.LayerStats`). Cost: one forward pass of
    the layer over the N images."""
    import torch
    import torch.nn.functional as F

    w = torch.from_numpy(np.ascontiguousarray(err, dtype=np.float32))
    with torch.no_grad():
        if geometry.kind == "linear":
            e = layer_input @ w.T
        else:
            e = F.conv2d(layer_input, w.reshape(tuple(geometry.weight_shape)), stride=tuple(geometry.stride),
                         padding=tuple(geometry.padding), dilation=tuple(geometry.dilation),
                         groups=int(geometry.groups))
        d = torch.bmm(out_grad, e.reshape(e.shape[0], -1, 1).to(out_grad.dtype))[:, :, 0]
    return d.double().numpy()


def _im2col(layer_input, geometry: Any) -> np.ndarray:
    """(N·P, K) float32 input vectors of every output of the N images, image-major (``n·P + p``)."""
    from cimstat.input_sample import patch_rows

    rows = patch_rows(geometry, layer_input)
    return np.ascontiguousarray(rows.reshape(-1, rows.shape[2]).numpy())


def _map_shift(out_grad, error_map: np.ndarray) -> np.ndarray:
    """(N, D) ``Σ_{c,p} g_{n,d,c,p}·e_{n,p,c}`` of an output error map ``(N·P, C_out)`` (image-major)."""
    import torch

    n = out_grad.shape[0]
    # np.array copies: the map is read-only
    e = torch.from_numpy(np.array(error_map, dtype=np.float32)).reshape(n, -1, error_map.shape[1])
    e = e.permute(0, 2, 1).reshape(n, -1, 1)
    return torch.bmm(out_grad, e)[:, :, 0].double().numpy()


def _relative(per_image: np.ndarray) -> np.ndarray:
    """(N, D) per-image values divided by their mean over the images (1 where the mean is 0)."""
    v = np.asarray(per_image, dtype=np.float64)
    mean = v.mean(0, keepdims=True)
    return np.where(mean > 0, v / np.where(mean > 0, mean, 1.0), 1.0)


_ENGINES: dict[tuple[int, bool, int], tuple[weakref.ref, Engine]] = {}


def engine_for(probes: Any, model: Any = None, *, adc_per_image: bool = False,
               meanfield_images: int | None = None) -> Engine:
    """The cached :class:`Engine` of a probe set (one per live ``ProbeSet`` object, ADC route and number of
    mean-field images; None: :data:`.meanfield.MEANFIELD_IMAGES`)."""
    meanfield_images = MEANFIELD_IMAGES if meanfield_images is None else meanfield_images
    key = (id(probes), bool(adc_per_image), meanfield_images)
    hit = _ENGINES.get(key)
    if hit is not None and hit[0]() is probes and model is None:
        return hit[1]
    eng = Engine(probes, model, adc_per_image=adc_per_image, meanfield_images=meanfield_images)
    for k in [k for k, (ref, _) in _ENGINES.items() if ref() is None]:
        del _ENGINES[k]
    _ENGINES[key] = (weakref.ref(probes), eng)
    return eng


def estimate(probes: Any, config: HardwareConfig | str | Mapping[str, Any],
             resolved: Mapping[str, ResolvedLayer] | None = None, *, model: Any = None,
             adc_per_image: bool = False, meanfield_images: int | None = None,
             meanfield_top1: bool = False) -> Estimate:
    """Predict, in closed form, what the Monte Carlo referee would measure for ``config``.

    ``probes``: a :class:`cimstat.probes.ProbeSet` (with ``noise_prop``); ``resolved``: every
    range a number (default :func:`cimstat.calibrate.resolve`); ``model``: the float model (or
    a dict of folded ``(C_out, K)`` weight matrices) when the probes are not of the default model;
    ``adc_per_image``: the precise ADC route (:data:`ADC_PER_IMAGE_NOTE`); ``meanfield_images``: probe images the
    mean-field route runs over (default :data:`.meanfield.MEANFIELD_IMAGES`; fewer: faster in proportion, with a
    larger ``Estimate.top1_se``); ``meanfield_top1``: top-1 from the mean-field route on every design
    (:data:`MEANFIELD_TOP1_NOTE`).
    """
    return engine_for(probes, model, adc_per_image=adc_per_image,
                      meanfield_images=meanfield_images).estimate(config, resolved, meanfield_top1=meanfield_top1)
