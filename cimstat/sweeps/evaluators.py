"""What one sweep row is made of: the analytic estimate, and estimate + Monte Carlo.

Both evaluators are picklable (they hold paths and numbers); ``setup()`` loads probes,
model and data once per process; calling one with a :class:`Combination` returns the
metric columns of its row.

Columns of an estimate row (:class:`EstimateEvaluator`): everything
``cimstat.engine.Estimate.to_row()`` gives (``conv1_snr_db``, ``fc_snr_db``, ``top1`` and the
per-source breakdown), then ``est_seconds`` (the ``estimate`` call) and ``resolve_seconds``
(range resolution / calibration lookup).

A validation row (:class:`ValidationEvaluator`) adds the Monte Carlo referee's
``mc_conv1_snr_db``, ``mc_fc_snr_db``, ``mc_top1`` (mean over chip instances; over the whole validation
split when the float network serves as control variate, see :func:`top1_over_split`), their
standard errors ``mc_conv1_snr_se_db``, ``mc_fc_snr_se_db``, ``mc_top1_se_pp``, ``mc_top1_clean`` (the
float network's top-1 on the images ``mc_top1`` refers to), ``mc_top1_images`` (how many),
``mc_top1_sample``, ``mc_top1_clean_sample`` and ``mc_top1_sample_se_pp`` (the same on the MC's own images),
``mc_top1_se_kind`` (``paired``, ``unpaired`` or ``sample``, see :func:`top1_over_split`), the errors
``err_conv1_db``, ``err_fc_db`` (estimate − MC, dB) and ``err_top1_pp`` (estimate − MC,
percentage points), ``mc_seconds`` (of the Monte Carlo run that produced the row),
``mc_cached`` (True when that run was an earlier one, reused from the cache), ``mc_device`` (where it ran), and
per analog layer the isolated SNRs ``snr_db[<layer>]`` (estimate) and ``mc_snr_db[<layer>]`` (MC).
"""
from __future__ import annotations

import functools
import hashlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from cimstat.errors import SweepError
from cimstat.sweeps.spec import Combination

__all__ = ["EstimateEvaluator", "ValidationEvaluator", "mc_columns", "probe_defaults", "DEFAULT_MC_IMAGES",
           "DEFAULT_MC_INSTANCES", "range_summary", "ranges_match", "RANGE_MATCH_RTOL", "ADC_RANGE_MATCH_RTOL", "Top1Control",
           "top1_over_split", "SPLITS_IN_RANDOM_ORDER"]

DEFAULT_MC_IMAGES = 1000
"""Monte Carlo images per combination: the whole default validation split."""
DEFAULT_MC_INSTANCES = 2
"""Chip instances per combination (programming-error draws)."""

LAYER_SNR_PREFIX = "snr_db["
MC_LAYER_SNR_PREFIX = "mc_snr_db["
DROPPED_ENGINE_COLUMNS = ("config", "estimate_seconds")
"""``Estimate.to_row()`` keys not written (the config is in the parameter columns; ``est_seconds``
times the call)."""


def layer_column(prefix: str, layer: str) -> str:
    """``snr_db[layer1.0.conv1]`` / ``mc_snr_db[...]``: a per-layer isolated-SNR column."""
    return f"{prefix}{layer}]"


def column_layer(column: str, prefix: str) -> str | None:
    """The layer name of a per-layer column with ``prefix`` (None for other columns)."""
    return column[len(prefix):-1] if column.startswith(prefix) and column.endswith("]") else None


def _float(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


@dataclass
class EstimateEvaluator:
    """Analytic estimate of one combination: ``resolve`` ranges, then ``cimstat.engine.estimate``."""

    probe_dir: Path
    model_name: str | None = None
    weights: Path | None = None
    per_layer: bool = False
    """Also return every layer's isolated SNR as ``snr_db[<layer>]`` columns."""
    adc_per_image: bool = False
    """The engine's precise ADC route (:data:`cimstat.engine.network.ADC_PER_IMAGE_NOTE`)."""
    meanfield_images: int | None = None
    """Probe images the engine's mean-field route runs over (None: :data:`cimstat.engine.meanfield.MEANFIELD_IMAGES`)."""
    meanfield_top1: bool = False
    """Top-1 from the engine's mean-field route on every combination (:data:`cimstat.engine.network.MEANFIELD_TOP1_NOTE`)."""

    def setup(self) -> None:
        from cimstat.calibrate import Calibrations
        from cimstat.probes import load_probes

        self._probes = load_probes(self.probe_dir, require_noise_prop=True)
        model = None
        if self.model_name not in (None, "default") or self.weights is not None:
            from cimstat.models import load

            model = load(self.model_name or "default", self.weights)
            self._probes.check_model(model)
        self._model = model
        self._calibrations = Calibrations(Path(self.probe_dir) / "calibrations", model=model)

    def resolve(self, combo: Combination) -> tuple[dict[str, Any], float]:
        """Every range of the combination a number (calibrations stored under the probe folder),
        and the seconds it took."""
        from cimstat.calibrate import resolve

        t0 = time.perf_counter()
        resolved = resolve(combo.config, self._probes, self._calibrations)
        return resolved, time.perf_counter() - t0

    def estimate(self, combo: Combination, resolved: Mapping[str, Any]) -> dict[str, Any]:
        """The estimate columns of one combination with resolved ranges."""
        from cimstat.engine import estimate

        t0 = time.perf_counter()
        est = estimate(self._probes, combo.config, resolved, model=self._model, adc_per_image=self.adc_per_image,
                       meanfield_images=self.meanfield_images, meanfield_top1=self.meanfield_top1)
        seconds = time.perf_counter() - t0
        row = {k: v for k, v in est.to_row().items() if k not in DROPPED_ENGINE_COLUMNS}
        if self.per_layer:
            for name, layer in est.layers.items():
                row[layer_column(LAYER_SNR_PREFIX, name)] = _float(layer.snr_db)
        row["est_seconds"] = seconds
        return row

    def __call__(self, combo: Combination) -> dict[str, Any]:
        resolved, resolve_seconds = self.resolve(combo)
        return {**self.estimate(combo, resolved), "resolve_seconds": resolve_seconds}


def _se_of_mean(values: Any) -> float:
    arr = np.asarray(values, dtype=np.float64).ravel()
    arr = arr[np.isfinite(arr)]
    if arr.size < 2:
        return math.nan
    return float(arr.std(ddof=1) / math.sqrt(arr.size))


def mc_columns(result: Any, n_images: int) -> dict[str, Any]:
    """The ``mc_*`` columns of a ``cimstat.montecarlo.MCResult`` (means over chip instances), on the MC's own
    images (what the cache keeps; :func:`top1_over_split` turns the top-1 into the split's).

    Standard errors: SNR — over chip instances (``std/sqrt(K)``) of the per-instance SNR (the
    chip-to-chip and noise spread; not the image sampling); top-1 — the binomial
    image-sampling error (Agresti-Coull, ``sqrt(p'(1-p')/(N+4))``, ``p' = (Np+2)/(N+4)``)
    combined in quadrature with the instance spread ``std/sqrt(K)`` (also kept alone as
    ``mc_top1_spread_se``), in percentage points. Per image: ``mc_image_correct`` (on how many chips the
    analog top-1 was right) and ``mc_image_float_correct`` (0/1, the float network).
    """
    row: dict[str, Any] = {}
    iso = dict(getattr(result, "isolated_snr_db", {}) or {})
    names = list(iso)
    conv1 = "conv1" if "conv1" in iso else (names[0] if names else None)
    row["mc_conv1_snr_db"] = _float(iso.get(conv1)) if conv1 else math.nan
    row["mc_fc_snr_db"] = _float(getattr(result, "logits_snr_db", math.nan))
    top1 = np.asarray(getattr(result, "top1_per_instance", [getattr(result, "top1_mean", math.nan)]),
                      dtype=np.float64)
    p = float(np.nanmean(top1)) if top1.size else math.nan
    row["mc_top1"] = p
    row["mc_top1_clean"] = _float(getattr(result, "float_top1", math.nan))
    per_inst_iso = getattr(result, "isolated_snr_db_per_instance", None) or {}
    row["mc_conv1_snr_se_db"] = _se_of_mean(per_inst_iso.get(conv1, [])) if conv1 else math.nan
    row["mc_fc_snr_se_db"] = _se_of_mean(getattr(result, "logits_snr_db_per_instance", []) or [])
    n = max(n_images, 1)
    p_ac = (p * n + 2) / (n + 4)  # Agresti-Coull: never a zero error bar at 0 % or 100 %
    binomial = math.sqrt(p_ac * (1 - p_ac) / (n + 4)) if math.isfinite(p) else math.nan
    spread = _se_of_mean(top1)
    spread = spread if math.isfinite(spread) else 0.0
    row["mc_top1_se_pp"] = 100 * math.sqrt(binomial ** 2 + spread ** 2)
    row["mc_top1_spread_se"] = spread
    row["mc_image_correct"] = [int(c) for c in getattr(result, "correct_instances_per_image", []) or []]
    row["mc_image_float_correct"] = [int(bool(c)) for c in getattr(result, "float_correct_per_image", []) or []]
    for name, value in iso.items():
        row[layer_column(MC_LAYER_SNR_PREFIX, name)] = _float(value)
    return row


SPLITS_IN_RANDOM_ORDER = ("default",)
"""Datasets whose validation split is stored in a seeded random order, so that its first ``n`` images are a
random sample of its first ``M``: the condition for :func:`top1_over_split`. (ImageNet folders are read in
class order: a prefix holds the first classes only.)"""


@dataclass(frozen=True)
class Top1Control:
    """The float network's top-1 over the first ``n_images`` images of the validation split."""

    float_top1: float
    n_images: int


def top1_over_split(mc: Mapping[str, Any], control: Top1Control | None, instances: int) -> dict[str, Any]:
    """The top-1 columns of a row from the cached MC columns ``mc`` (on the MC's own ``n`` images).

    With ``control`` (the float top-1 ``F`` over the first ``N ≥ n`` split images, the MC's ``n`` among them),
    the MC top-1 is reported over those ``N`` images with the float network as control variate (a difference
    estimator): ``top1 = F + mean_i d_i``, ``d_i = c_i/K − f_i`` per MC image (``c_i`` of the ``K`` chips right,
    ``f_i`` the float network right). It is unbiased when the ``n`` images are a random sample of the ``N``
    (:data:`SPLITS_IN_RANDOM_ORDER`), and its image-sampling error is that of the *drop*, not of the accuracy:

        se² = (1 − n/N)·max(s_d², 1/n)/n + spread²

    with ``s_d²`` the sample variance of ``d`` (at least that of one disagreement in ``n`` images, so a sample
    without any does not claim zero), ``(1 − n/N)`` the finite-population correction (0 when the MC ran on all
    ``N``) and ``spread`` the chip-to-chip standard error of the per-chip top-1 (added in full: it overlaps
    ``s_d``, so the error bar is conservative). ``mc_top1_se_kind`` says ``paired``; entries cached without per-image
    results keep the sample's unpaired error bar (``unpaired``: binomial over ``n`` and spread), larger.
    Without ``control`` the columns are the sample's (``sample``).
    """
    sample, clean, sample_se = (_float(mc.get(k)) for k in ("mc_top1", "mc_top1_clean", "mc_top1_se_pp"))
    out = {"mc_top1_sample": sample, "mc_top1_clean_sample": clean, "mc_top1_sample_se_pp": sample_se}
    correct = np.asarray(mc.get("mc_image_correct") or [], dtype=np.float64)
    float_right = np.asarray(mc.get("mc_image_float_correct") or [], dtype=np.float64)
    n = correct.size
    paired = n > 1 and float_right.size == n
    if control is None:
        out.update(mc_top1=sample, mc_top1_clean=clean, mc_top1_se_pp=sample_se, mc_top1_images=n or math.nan,
                   mc_top1_se_kind="sample")
        return out
    if paired and control.n_images < n:
        raise SweepError(f"the top-1 control covers {control.n_images} images but the Monte Carlo ran on {n}")
    out["mc_top1"] = min(max(control.float_top1 + sample - clean, 0.0), 1.0)
    out["mc_top1_clean"] = control.float_top1
    out["mc_top1_images"] = control.n_images
    if paired:
        d = correct / instances - float_right
        s2 = max(float(d.var(ddof=1)), 1.0 / n)
        spread = _float(mc.get("mc_top1_spread_se"))
        spread = spread if math.isfinite(spread) else 0.0
        out["mc_top1_se_pp"] = 100 * math.sqrt((1 - n / control.n_images) * s2 / n + spread ** 2)
        out["mc_top1_se_kind"] = "paired"
    else:
        out["mc_top1_se_pp"] = sample_se
        out["mc_top1_se_kind"] = "unpaired"
    return out


@dataclass
class ValidationEvaluator:
    """Estimate and Monte Carlo of one combination, side by side.

    The MC runs ``model`` on the first ``n_images`` images of the ``validation`` split of
    ``dataset`` (disjoint from the ``probe`` split the probes were made from), over
    ``instances`` chip instances (instance ``i`` draws its programming errors from
    ``config.seed + i``).
    """

    probe_dir: Path
    model_name: str = "default"
    weights: Path | None = None
    dataset: str = "default"
    data_root: Path | None = None
    n_images: int = DEFAULT_MC_IMAGES
    instances: int = DEFAULT_MC_INSTANCES
    batch_size: int = 100

    cache_dir: Path | None = None
    """Where Monte Carlo rows are cached (None: no cache); see :meth:`monte_carlo`."""

    programmed_instances: int | None = None
    """Chip instances for combinations with programming error on some layer (None: ``instances``).
    One chip's programming error is a single draw: on the default model's conv1 its error energy
    swings ±0.5 dB from chip to chip, so a 2-chip mean can sit 0.7 dB from the expectation."""

    adc_per_image: bool = False
    """The engine's precise ADC route (:data:`cimstat.engine.network.ADC_PER_IMAGE_NOTE`)."""
    meanfield_images: int | None = None
    """Probe images the engine's mean-field route runs over (None: :data:`cimstat.engine.meanfield.MEANFIELD_IMAGES`)."""
    meanfield_top1: bool = False
    """Top-1 from the engine's mean-field route on every combination (:data:`cimstat.engine.network.MEANFIELD_TOP1_NOTE`)."""

    refresh_cache: bool = False
    """Rerun the Monte Carlo even where a cached result exists, and replace it in the cache."""

    device: str = "cpu"
    """Where the Monte Carlo runs (``"cuda"`` for a GPU). Not part of the cache key: the chips are the same on
    every device and only the per-read noise stream differs (:mod:`cimstat.montecarlo.measure`); the entry records
    it as ``mc_device``."""

    top1_images: int | None = None
    """The MC top-1 is reported over the first ``top1_images`` images of the validation split, the float
    network (run on all of them) as control variate for the ``n_images`` the MC runs on
    (:func:`top1_over_split`). None: the whole split where its order is random
    (:data:`SPLITS_IN_RANDOM_ORDER`), else ``n_images`` (the MC's own images)."""

    def instances_for(self, combo: Combination) -> int:
        """Chip instances of the Monte Carlo run of ``combo``."""
        cfg = combo.config
        programmed = cfg.default.programming_error > 0 or any(
            float(over.get("programming_error", 0.0)) > 0 for over in cfg.layers.values())
        return self.programmed_instances if programmed and self.programmed_instances else self.instances

    def setup(self) -> None:
        from cimstat.data import loader
        from cimstat.models import load, weights_fingerprint

        self._model = load(self.model_name, self.weights)
        self._fingerprint = weights_fingerprint(self._model)
        self._estimator = EstimateEvaluator(self.probe_dir, self.model_name, self.weights, per_layer=True,
                                            adc_per_image=self.adc_per_image, meanfield_images=self.meanfield_images,
                                            meanfield_top1=self.meanfield_top1)
        self._estimator.setup()
        self._estimator._probes.check_model(self._model)
        self._loader = loader(self.dataset, "validation", self.batch_size, self.data_root, n_images=self.n_images)
        n = len(self._loader.dataset)
        if n < self.n_images:
            raise SweepError(f"--n-images={self.n_images} but the {self.dataset!r} validation split has only {n}")
        self._control = self._top1_control()

    def _top1_control(self) -> Top1Control | None:
        """The float top-1 over the first :attr:`top1_images` split images (None where that is the MC's own)."""
        from cimstat.data import dataset as split_dataset
        from cimstat.data import loader

        random_order = self.dataset in SPLITS_IN_RANDOM_ORDER
        m = self.top1_images
        if m is None:
            m = len(split_dataset(self.dataset, "validation", self.data_root)) if random_order else self.n_images
        if m < self.n_images:
            raise SweepError(f"--top1-images={m} must be at least --n-images={self.n_images} (the MC's images are "
                             "the first of them)")
        if m == self.n_images:
            return None
        if not random_order:
            raise SweepError(f"--top1-images={m} > --n-images={self.n_images} needs a validation split in random "
                             f"order (one of {list(SPLITS_IN_RANDOM_ORDER)}); the {self.dataset!r} split is not: "
                             "its first images are not a random sample of the rest")
        from cimstat.network import fold_batchnorm
        from cimstat.training import evaluate

        images, labels = next(iter(loader(self.dataset, "validation", m, self.data_root, n_images=m)))
        return Top1Control(evaluate(fold_batchnorm(self._model), images.float(), labels), m)

    def __call__(self, combo: Combination) -> dict[str, Any]:
        """Estimate and MC columns; when only the engine declines (``EstimationError``) the MC
        still runs and the row carries the reason in ``error``."""
        from cimstat.errors import EstimationError

        resolved, _ = self._estimator.resolve(combo)
        try:
            row, estimation_error = self._estimator.estimate(combo, resolved), None
        except EstimationError as err:
            row, estimation_error = {}, f"EstimationError: {err}"
        mc = self.monte_carlo(combo, resolved)
        mc_seconds = mc.pop("mc_seconds")
        mc_cached = mc.pop("mc_cached")
        mc_device = mc.pop("mc_device", "cpu")
        out: dict[str, Any] = {}
        for key in ("conv1_snr_db", "fc_snr_db", "top1"):
            out[key] = _float(row.get(key))
        top1 = top1_over_split(mc, self._control, self.instances_for(combo))
        out.update({k: mc[k] for k in ("mc_conv1_snr_db", "mc_fc_snr_db")})
        out["mc_top1"] = top1.pop("mc_top1")
        out["err_conv1_db"] = out["conv1_snr_db"] - out["mc_conv1_snr_db"]
        out["err_fc_db"] = out["fc_snr_db"] - out["mc_fc_snr_db"]
        out["err_top1_pp"] = 100 * (out["top1"] - out["mc_top1"])
        out.update({k: mc.get(k, math.nan) for k in ("mc_conv1_snr_se_db", "mc_fc_snr_se_db")})
        out.update(top1)
        out["est_seconds"] = row.get("est_seconds", math.nan)
        out["mc_seconds"] = mc_seconds
        out["mc_cached"] = mc_cached
        out["mc_device"] = mc_device
        for key, value in row.items():  # per-source breakdown and per-layer estimates
            if key not in out:
                out[key] = value
        for key, value in mc.items():
            if key.startswith(MC_LAYER_SNR_PREFIX):
                out[key] = value
        if estimation_error is not None:
            out["error"] = estimation_error
        return out

    def mc_cache_key(self, combo: Combination, simulator: str | None = None) -> str:
        """sha256 of everything a Monte Carlo row depends on but the resolved ranges: the model
        weights, the config and seed, dataset, images, instances, and the simulator's source code
        (``simulator``: its hash; default the current sources').
        The ranges are matched within a tolerance instead (:func:`ranges_match`)."""
        facts = {"cache_format": MC_CACHE_FORMAT, "fingerprint": self._fingerprint,
                 "config": combo.config.to_dict() | {"name": ""}, "dataset": self.dataset,
                 "data_root": str(self.data_root or ""), "n_images": self.n_images,
                 "instances": self.instances_for(combo), "batch_size": self.batch_size,
                 "simulator": simulator or _simulator_source_hash()}
        return hashlib.sha256(json.dumps(facts, sort_keys=True, default=str).encode()).hexdigest()

    def _cache_path(self, combo: Combination, simulator: str | None = None) -> Path | None:
        """Where ``combo``'s cache entry lives (None without a cache)."""
        if self.cache_dir is None:
            return None
        return Path(self.cache_dir) / f"{self.mc_cache_key(combo, simulator)}.json"

    def cached_monte_carlo(self, combo: Combination, resolved: Mapping[str, Any]) -> dict[str, Any] | None:
        """The cached ``mc_*`` columns of ``combo`` if an entry exists whose ranges match
        ``resolved`` (:func:`ranges_match`), else None (no cache, no entry, other ranges, damaged file).
        An entry of the current simulator is preferred; one of a :data:`COMPATIBLE_SIMULATORS` is taken
        next (it lacks the per-image top-1 results: its top-1 error bar stays unpaired)."""
        if self.cache_dir is None:
            return None
        for simulator in (None, *COMPATIBLE_SIMULATORS):
            try:
                entry = json.loads(self._cache_path(combo, simulator).read_text())
                if ranges_match(entry["ranges"], range_summary(resolved)):
                    return dict(entry["mc"])
            except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError):
                pass  # missing or damaged: recomputed
        return None

    def monte_carlo(self, combo: Combination, resolved: Mapping[str, Any]) -> dict[str, Any]:
        """The ``mc_*`` columns (and ``mc_seconds``) of one combination.

        With ``cache_dir``, a result is stored under :meth:`mc_cache_key` with a summary of the
        resolved ranges, and reused by later runs whose ranges match it — re-validating after an
        engine change reruns only the estimate; any change to the config, images, instances,
        weights or simulator code, or a range change beyond :data:`RANGE_MATCH_RTOL`, reruns it."""
        from cimstat.montecarlo import measure
        from cimstat.montecarlo.measure import device_name

        cached = None if self.refresh_cache else self.cached_monte_carlo(combo, resolved)
        if cached is not None:
            return {**cached, "mc_cached": True}
        t0 = time.perf_counter()
        result = measure(self._model, combo.config, resolved, self._loader, instances=self.instances_for(combo),
                         progress=False, device=self.device)
        mc = mc_columns(result, self.n_images)
        mc["mc_seconds"] = time.perf_counter() - t0
        mc["mc_device"] = device_name(self.device)
        path = self._cache_path(combo)
        if path is not None:
            from cimstat.sweeps.rundir import atomic_write_bytes

            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(path, json.dumps({"ranges": range_summary(resolved), "mc": mc}).encode())
        return {**mc, "mc_cached": False}


MC_CACHE_FORMAT = 2
"""Version of the cache entry layout ({"ranges": summary, "mc": columns}, ranges out of the key)."""

RANGE_MATCH_RTOL = 1e-4
"""Resolved input ranges that agree within this relative tolerance count as the same for the MC cache.
Probes made with another thread count differ in the last float bits (on the default model:
input ranges by ~1e-7, calibrated ADC ranges by ~1e-5 relative); int8 measured with such probes (and
the MC on another thread count too) moved every layer's SNR by < 1e-4 dB and the fc SNR by 0.03 dB,
far inside the MC's own spread. An exact key reran every Monte Carlo of a fresh checkout for that."""

ADC_RANGE_MATCH_RTOL = 1e-2
"""The same for the summary of a layer's calibrated ADC ranges (count exact; sum, sum of squares, min, max within
this). The calibration picks each column's range from a grid of candidates whose errors can be nearly equal, so
float-level differences of the probes flip a few columns to the neighbouring candidate: probes rebuilt on a fresh
checkout (2026-12-06) moved the fc layer's range sum by up to 0.6 % on the seven calibrated validation
configurations whose Monte Carlo was rerun with them. That moved their MC by at most 0.08 dB at the logits, 0.03 dB
on any layer and 0.003 pp in top-1; with 1e-4 every calibrated configuration reran its Monte Carlo (5 min each on
the CPU). A recalibration by another method or data moves the ranges by far more."""


def range_summary(resolved: Mapping[str, Any]) -> dict[str, list[Any]]:
    """Per layer: [signed input, input range, ADC range summary], the summary being None (no ADC)
    or [count, sum, sum of squares, min, max] of the ADC range array (in ADC input units)."""
    out: dict[str, list[Any]] = {}
    for name, r in resolved.items():
        adc = None
        if r.ranges.adc_range is not None:
            a = np.asarray(r.ranges.adc_range, dtype=np.float64).ravel()
            adc = [int(a.size), float(a.sum()), float((a * a).sum()), float(a.min()), float(a.max())]
        input_range = None if r.ranges.input_range is None else float(r.ranges.input_range)
        out[name] = [bool(r.ranges.signed_input), input_range, adc]
    return out


def ranges_match(a: Mapping[str, Any], b: Mapping[str, Any], rtol: float = RANGE_MATCH_RTOL,
                 adc_rtol: float = ADC_RANGE_MATCH_RTOL) -> bool:
    """Whether two :func:`range_summary` results describe the same ranges: same layers, same
    signedness, same presence and count of ADC ranges, the input ranges equal within ``rtol`` and the ADC range
    summaries within ``adc_rtol``."""
    if set(a) != set(b):
        return False

    def close(x: Any, y: Any, tol: float) -> bool:
        if x is None or y is None:
            return x is None and y is None
        if isinstance(x, (bool, int)) and isinstance(y, (bool, int)):
            return x == y  # signedness, ADC range count
        return math.isclose(float(x), float(y), rel_tol=tol, abs_tol=0.0)

    def same_adc(x: Any, y: Any) -> bool:
        if x is None or y is None:
            return x is None and y is None
        return (isinstance(x, list) and isinstance(y, list) and len(x) == len(y) and close(x[0], y[0], 0.0)
                and all(close(u, v, adc_rtol) for u, v in zip(x[1:], y[1:])))

    def same_layer(x: Any, y: Any) -> bool:
        return (isinstance(x, list) and isinstance(y, list) and len(x) == len(y) == 3
                and close(x[0], y[0], 0.0) and close(x[1], y[1], rtol) and same_adc(x[2], y[2]))

    return all(same_layer(a[k], b[k]) for k in a)


COMPATIBLE_SIMULATORS = ("b985d27a1b1ca32bf2aafa108e6995c523dd5b9fa2896aaa028b7c0e3b46aeae",
                         "3aaeece957a24c3334b246e6e768993efc06756e3510c7dfede5b63966220525",
                         "953fed0ff6497940bfb4363670b0b84cc69049dbc1e4892e5c03cbb7d4973128")
"""Source hashes (:func:`_simulator_source_hash`) of earlier simulators whose cached measurements the current one
reproduces, so their entries stay valid: only add one after rerunning cached configurations and comparing.
``b985d27a…``: the simulator that measured the committed validation entries on a GPU through ``measure``; the
current one adds the layers' docstring section on devices, ``device_name``, and switches TF32 off inside
``AnalogLayer.forward`` on CUDA too (``measure`` had it off for the whole run already). ``3aaeece9…``: the simulator
before it ran on CUDA devices; on the CPU it and the current one gave identical results to the last bit
(4 configurations — bit-serial with programming error, read noise and thermal noise; read noise; offset encodings
with proportional programming error; 4-bit weights — 32 validation images, 2 chips, every per-instance and
per-image number compared). ``953fed0f…``: the simulator before ``measure`` also returned per-image correctness (outputs added, nothing
else). Run side by side on the same probes and thread count (32 images, 2 chips of a bit-serial ADC, a read-noise
and a programming-error configuration), the two gave identical results to the last bit."""

SIMULATOR_FILES_SKIPPED = ("__init__.py", "__main__.py")
"""Simulator files whose changes cannot change a measurement (exports, command line)."""


@functools.lru_cache(maxsize=1)
def _simulator_source_hash() -> str:
    """sha256 of the Monte Carlo package's source (what the cached measurements depend on)."""
    import cimstat.montecarlo

    digest = hashlib.sha256()
    root = Path(cimstat.montecarlo.__file__).parent
    for path in sorted(root.glob("*.py")):
        if path.name not in SIMULATOR_FILES_SKIPPED:
            digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def probe_defaults(meta: Mapping[str, Any]) -> tuple[str, str]:
    """``(model, dataset)`` names recorded in probe metadata (``default``, ``default`` if absent)."""
    model = str(meta.get("model", "default"))
    dataset = meta.get("dataset", "default")
    if isinstance(dataset, Mapping):
        dataset = dataset.get("name", "default")
    dataset = str(dataset).split()[0] if dataset else "default"
    return model, dataset
