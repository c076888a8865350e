"""The hardware model: every knob of an analog CIM design, validated, with units.

One :class:`HardwareConfig` describes a design for a whole network: a default
:class:`LayerConfig` plus per-layer overrides by layer name. The Monte Carlo
simulator (:mod:`cimstat.montecarlo`) and the analytic engine
(:mod:`cimstat.engine`) both read it; they share nothing else.

Semantics (the contract both implementations follow)
----------------------------------------------------
Inputs, ``input_bits = b`` and range ``x_max`` (input units):

* unsigned input (every layer fed by a ReLU): code ``q = clip(round(x/Δx), 0, 2^b-1)``,
  ``Δx = x_max/(2^b-1)``; magnitude bits ``m = b``; one pass per input slice.
* signed input (conv1, fed the normalised image): ``q = clip(round(x/Δx), -(2^(b-1)-1), 2^(b-1)-1)``,
  ``Δx = x_max/(2^(b-1)-1)``.
  ``split``: two passes, ``q+ = max(q, 0)`` and ``q- = max(-q, 0)``, ``m = b-1`` each,
  result ``pass+ - pass-``. ``offset``: ``u = q + 2^(b-1)`` in ``[1, 2^b-1]``, ``m = b``; the
  digital side subtracts ``2^(b-1) * Σ_k qw_k`` (exact integer weight codes).
* ``input_bits=None``: float inputs, no quantization, no slicing, ideal ADC and no
  device noise (there is no integer partial sum to digitise).

Weights, ``weight_bits = b``: scale ``Δw = max|W| / (2^(b-1)-1)`` per layer (or per output
channel; ``Δw = 1`` when that maximum is 0), code ``qw = round(W/Δw)`` in ``[-(2^(b-1)-1), 2^(b-1)-1]``.
Every ``round`` in this contract (inputs, weights, ADC) rounds half to even.

* ``differential``: device pair, ``G+ = max(qw, 0)``, ``G- = max(-qw, 0)``, ``m_w = b-1``.
* ``offset``: one device holds ``u = qw + 2^(b-1)`` in ``[1, 2^b-1]``, ``m_w = b``; the digital
  side subtracts ``2^(b-1) * Σ_k x_k`` (exact integer input codes of the pass).

Bit slicing: magnitude bits split LSB->MSB into slices of the given widths; slice ``j``
of code ``v`` is ``(v >> o_j) & (2^{s_j}-1)`` with ``o_j`` the sum of earlier widths; the
digital side recombines ``Σ_j 2^{o_j} · slice_j``. An int width is repeated, the MSB slice
taking what is left (so 7 bits at width 2 gives ``(2, 2, 2, 1)``; a width >= the bits gives one
slice); a tuple must add up.
Each weight slice lives on its own devices (levels ``0..L``, ``L = 2^s - 1``); each input
slice is one analog pass (levels ``0..2^s-1``).

Arrays: the ``K = C_in·kh·kw`` rows of a dot product (PyTorch's ``weight.reshape(C_out, -1)``
order; a conv's zero padding gives rows with input value 0, i.e. code 0, or ``2^(b-1)`` under
``offset`` input encoding) are cut into tiles of ``rows_per_array`` consecutive rows; each (input pass, weight
slice, tile) gives one partial sum ``P = Σ_{k in tile} x_k · c_k`` per output, in
*partial-sum units* (input-slice level × device level), converted by its own ADC.

Devices: the conductance used at a read is ``c = max(0, g + e_p + e_r)`` in device levels,
``g`` the target level, ``e_p ~ N(0, σ_p²)`` drawn once per chip instance and device,
``e_r ~ N(0, σ_r²)`` redrawn at every read (every input pass of every input vector).
``σ = α·L`` (``state_independent``) or ``σ = α·g`` (``proportional``).

ADC, ``adc_bits = a``, full-scale range ``R`` (partial-sum units). For differential weights
in ``difference`` mode it converts ``P+ - P-`` (signed, codes ``-(2^(a-1)-1)..2^(a-1)-1``,
``Δ = R/(2^(a-1)-1)``, so ``a >= 2``); in ``separate`` mode, and for offset weights, it converts each
``P >= 0`` (codes ``0..2^a-1``, ``Δ = R/(2^a-1)``). Thermal noise ``n ~ N(0, (σ_th·Δ)²)`` is
added before ``Q(v) = Δ·clip(round(v/Δ))`` (round half to even). ``adc_bits=None``: ideal,
output ``P + n`` with ``σ_th`` in partial-sum units. ``max`` range: ``R = n_rows·L_in·L_w``
(the largest possible partial sum, ``n_rows = min(rows_per_array, K)``).

Digital parts (scales, offsets, shift-and-add, bias, BN folded into the conv, ReLU,
pooling, residual adds) are exact.
"""
from __future__ import annotations

import dataclasses
import enum
import json
import math
import runpy
from dataclasses import dataclass, field, fields
from pathlib import Path
from types import MappingProxyType
from typing import Any, Iterable, Mapping

import numpy as np

from cimstat.errors import ConfigError

__all__ = [
    "SignedInputEncoding",
    "WeightEncoding",
    "WeightScale",
    "AdcMode",
    "NoiseModel",
    "RangeMode",
    "LayerConfig",
    "HardwareConfig",
    "LayerRanges",
    "ResolvedLayer",
    "split_bits",
    "adc_code_limits",
    "adc_step",
    "PRESETS",
    "DIGITAL",
    "DIGITAL_LAYER",
    "layer_override",
    "load_config",
]


class _StrEnum(str, enum.Enum):
    def __str__(self) -> str:  # printed as its value in tables and errors
        return self.value


class SignedInputEncoding(_StrEnum):
    """How a signed input (conv1) is applied to the array."""

    SPLIT = "split"    #: two passes: positive part, then negative part (magnitude bits b-1)
    OFFSET = "offset"  #: zero point 2^(b-1) added; offset term removed digitally (b bits)


class WeightEncoding(_StrEnum):
    """How a signed weight is stored on non-negative conductances."""

    DIFFERENTIAL = "differential"  #: two devices, G+ and G-, magnitude bits b-1 each
    OFFSET = "offset"              #: one device holding q + 2^(b-1); offset removed digitally


class WeightScale(_StrEnum):
    """Granularity of the symmetric weight quantization scale."""

    PER_LAYER = "per_layer"
    PER_CHANNEL = "per_channel"  #: one scale per output channel


class AdcMode(_StrEnum):
    """What the ADC digitises for differential weight pairs (ignored for offset weights)."""

    DIFFERENCE = "difference"  #: the analog difference current P+ - P- (one signed ADC)
    SEPARATE = "separate"      #: P+ and P- each (two unsigned conversions)


class NoiseModel(_StrEnum):
    """Standard deviation of a device-level Gaussian error."""

    STATE_INDEPENDENT = "state_independent"  #: σ = α·L for every level
    PROPORTIONAL = "proportional"            #: σ = α·g, g the target level


class RangeMode(_StrEnum):
    """How a quantizer range is chosen when no explicit number is given."""

    MAX = "max"                #: no clipping: the largest value seen in probing (inputs) or possible (ADC)
    CALIBRATED = "calibrated"  #: minimum expected rounding + clipping error (cimstat.calibrate)


def _enum_value(enum_cls: type[enum.Enum], name: str, value: Any) -> enum.Enum:
    if isinstance(value, enum_cls):
        return value
    try:
        return enum_cls(value)
    except ValueError:
        allowed = ", ".join(repr(m.value) for m in enum_cls)
        raise ConfigError(f"{name}={value!r} is not allowed; expected one of {allowed}") from None


def _check_bits(name: str, value: Any, *, minimum: int, maximum: int = 32, optional: bool = True) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ConfigError(f"{name}={value!r} must be an integer number of bits"
                          + (" or None (float)" if optional else ""))
    if not minimum <= value <= maximum:
        raise ConfigError(f"{name}={value!r} must be between {minimum} and {maximum} bits")


def _check_real(name: str, value: Any, *, minimum: float = 0.0, allow_equal: bool = True,
                maximum: float = math.inf) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ConfigError(f"{name}={value!r} must be a real number")
    if not math.isfinite(float(value)):
        raise ConfigError(f"{name}={value!r} must be finite (not NaN or infinite)")
    lo_ok = value >= minimum if allow_equal else value > minimum
    if not lo_ok or value > maximum:
        rel = ">=" if allow_equal else ">"
        hi = "" if maximum == math.inf else f" and <= {maximum}"
        raise ConfigError(f"{name}={value!r} must be {rel} {minimum}{hi}")


def split_bits(total: int, slices: int | tuple[int, ...] | None, name: str = "slice_bits") -> tuple[int, ...]:
    """Slice widths LSB->MSB for ``total`` magnitude bits.

    ``None`` -> one slice of ``total`` bits; an int width ``s`` -> ``s`` repeated, the MSB
    slice taking the remainder; a tuple must add up to ``total``.
    """
    if total <= 0:
        return ()
    if slices is None:
        return (total,)
    if isinstance(slices, (int, np.integer)):
        widths = [int(slices)] * (total // int(slices))
        if total % int(slices):
            widths.append(total % int(slices))
        return tuple(widths)
    widths = tuple(int(s) for s in slices)
    if sum(widths) != total:
        raise ConfigError(f"{name}={tuple(slices)!r} adds up to {sum(widths)} bits but the layer has "
                          f"{total} magnitude bits; the widths (LSB first) must add up to {total}")
    return widths


def adc_code_limits(bits: int, signed: bool) -> tuple[int, int]:
    """Smallest and largest ADC code: ``±(2^(a-1)-1)`` signed, ``0..2^a-1`` unsigned."""
    if signed:
        hi = 2 ** (bits - 1) - 1
        return -hi, hi
    return 0, 2 ** bits - 1


def adc_step(full_scale: float, bits: int, signed: bool) -> float:
    """ADC LSB Δ (partial-sum units): ``R/(2^(a-1)-1)`` signed, ``R/(2^a-1)`` unsigned."""
    return float(full_scale) / adc_code_limits(bits, signed)[1]


@dataclass(frozen=True)
class LayerConfig:
    """The hardware knobs of one analog layer. All fields are validated on construction."""

    input_bits: int | None = 8
    """Input (activation) DAC precision in bits, sign included for signed inputs; None = float inputs."""

    input_range: float | RangeMode = RangeMode.MAX
    """Input full scale ``x_max`` in the layer's input units (unsigned: ``[0, x_max]``; signed:
    ``[-x_max, x_max]``), or ``max`` (largest |x| seen in probing) or ``calibrated``."""

    signed_input_encoding: SignedInputEncoding = SignedInputEncoding.SPLIT
    """How a signed input is applied: ``split`` (two passes) or ``offset`` (zero point)."""

    weight_bits: int | None = 8
    """Weight precision in bits, sign included (symmetric codes ±(2^(b-1)-1)); None = float weights."""

    weight_scale: WeightScale = WeightScale.PER_LAYER
    """Symmetric quantization scale per layer or per output channel."""

    weight_encoding: WeightEncoding = WeightEncoding.DIFFERENTIAL
    """``differential`` (G+/G- pair) or ``offset`` (one device, digital offset subtraction)."""

    input_slice_bits: int | tuple[int, ...] | None = None
    """Input bits per analog pass, LSB first: None = all bits at once, 1 = bit-serial, or a tuple."""

    weight_slice_bits: int | tuple[int, ...] | None = None
    """Weight magnitude bits per device, LSB first: None = one device per polarity, or width/tuple."""

    rows_per_array: int | None = None
    """Rows summed in one analog partial sum (array height); None = the whole dot product."""

    adc_bits: int | None = None
    """ADC precision in bits per partial sum; None = ideal (no quantization)."""

    adc_range: float | RangeMode | tuple[tuple[float, ...], ...] = RangeMode.MAX
    """ADC full scale ``R`` in partial-sum units: ``max``, ``calibrated``, one number for all
    slices, or a table ``[input slice][weight slice]``."""

    adc_mode: AdcMode = AdcMode.DIFFERENCE
    """For differential weights: digitise the difference current or each polarity."""

    adc_thermal_noise_lsb: float = 0.0
    """ADC input-referred thermal noise σ in ADC LSBs (partial-sum units when the ADC is ideal)."""

    programming_error: float = 0.0
    """Programming error α (fraction): σ_p = α·L or α·g device levels, drawn once per chip."""

    programming_error_model: NoiseModel = NoiseModel.STATE_INDEPENDENT
    """``state_independent`` (σ = α·L) or ``proportional`` (σ = α·g)."""

    read_noise: float = 0.0
    """Read noise α (fraction): σ_r = α·L or α·g device levels, redrawn at every read."""

    read_noise_model: NoiseModel = NoiseModel.STATE_INDEPENDENT
    """``state_independent`` (σ = α·L) or ``proportional`` (σ = α·g)."""

    def __post_init__(self) -> None:
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 (frozen dataclass)
        _check_bits("input_bits", self.input_bits, minimum=1)
        _check_bits("weight_bits", self.weight_bits, minimum=2)
        _check_bits("adc_bits", self.adc_bits, minimum=1)
        for name, enum_cls in (("signed_input_encoding", SignedInputEncoding),
                               ("weight_scale", WeightScale), ("weight_encoding", WeightEncoding),
                               ("adc_mode", AdcMode), ("programming_error_model", NoiseModel),
                               ("read_noise_model", NoiseModel)):
            set_(name, _enum_value(enum_cls, name, getattr(self, name)))
        if self.adc_bits is not None and self.adc_bits < 2 and self.adc_signed:
            raise ConfigError(f"adc_bits={self.adc_bits!r}: a signed ADC (differential weights, adc_mode='difference') "
                              "has codes ±(2^(a-1)-1) and needs adc_bits >= 2; use adc_mode='separate' or more bits")
        # ranges
        if isinstance(self.input_range, str):
            set_("input_range", _enum_value(RangeMode, "input_range", self.input_range))
        else:
            _check_real("input_range", self.input_range, minimum=0.0, allow_equal=False)
            set_("input_range", float(self.input_range))
        set_("adc_range", self._checked_adc_range(self.adc_range))
        # slices
        for name in ("input_slice_bits", "weight_slice_bits"):
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, (list, tuple)):
                if not value:
                    raise ConfigError(f"{name}=() must list at least one slice width")
                for w in value:
                    _check_bits(f"{name}={tuple(value)!r}: entry", w, minimum=1, optional=False)
                set_(name, tuple(int(w) for w in value))
            else:
                _check_bits(name, value, minimum=1, optional=False)
                set_(name, int(value))
        if self.rows_per_array is not None:
            if isinstance(self.rows_per_array, bool) or not isinstance(self.rows_per_array, (int, np.integer)) \
                    or self.rows_per_array < 1:
                raise ConfigError(f"rows_per_array={self.rows_per_array!r} must be a positive integer or None")
        _check_real("adc_thermal_noise_lsb", self.adc_thermal_noise_lsb)
        _check_real("programming_error", self.programming_error, maximum=10.0)
        _check_real("read_noise", self.read_noise, maximum=10.0)
        # combinations
        if self.input_bits is None:
            if self.input_slice_bits is not None:
                raise ConfigError(f"input_slice_bits={self.input_slice_bits!r} needs quantized inputs (input_bits=None); "
                                  "set input_bits or input_slice_bits=None")
        if self.input_bits is None or self.weight_bits is None:
            what = "input_bits" if self.input_bits is None else "weight_bits"
            if self.adc_bits is not None or self.adc_thermal_noise_lsb > 0:
                raise ConfigError(f"adc_bits={self.adc_bits!r}/adc_thermal_noise_lsb={self.adc_thermal_noise_lsb!r} "
                                  f"need integer partial sums; {what}=None (float) allows only an ideal, noiseless "
                                  "ADC (adc_bits=None, adc_thermal_noise_lsb=0)")
        if self.weight_bits is None:
            if self.programming_error > 0 or self.read_noise > 0:
                raise ConfigError(f"programming_error={self.programming_error!r}/read_noise={self.read_noise!r} are "
                                  "in device levels and need weight_bits; weight_bits=None (float weights) has no "
                                  "devices, so both must be 0")
            if self.weight_slice_bits is not None:
                raise ConfigError(f"weight_slice_bits={self.weight_slice_bits!r} needs quantized weights "
                                  "(weight_bits=None); set weight_bits or weight_slice_bits=None")
        if self.weight_bits is not None:
            split_bits(self.weight_magnitude_bits, self.weight_slice_bits, "weight_slice_bits")
        if self.input_bits is not None and isinstance(self.input_slice_bits, tuple):
            total = sum(self.input_slice_bits)
            if total not in (self.input_bits, self.input_bits - 1):
                raise ConfigError(
                    f"input_slice_bits={self.input_slice_bits!r} adds up to {total} bits; it must add up to "
                    f"input_bits={self.input_bits} (unsigned inputs, offset encoding) or {self.input_bits - 1} "
                    "(signed inputs, split encoding)")

    @staticmethod
    def _checked_adc_range(value: Any) -> float | RangeMode | tuple[tuple[float, ...], ...]:
        if isinstance(value, str):
            return _enum_value(RangeMode, "adc_range", value)
        if isinstance(value, (list, tuple, np.ndarray)):
            rows = [list(r) if isinstance(r, (list, tuple, np.ndarray)) else [r] for r in value]
            if not rows or any(len(r) == 0 for r in rows) or len({len(r) for r in rows}) != 1:
                raise ConfigError(f"adc_range={value!r} must be a number or a rectangular table "
                                  "[input slice][weight slice] of numbers")
            for r in rows:
                for v in r:
                    _check_real("adc_range entry", v, minimum=0.0, allow_equal=False)
            return tuple(tuple(float(v) for v in r) for r in rows)
        _check_real("adc_range", value, minimum=0.0, allow_equal=False)
        return float(value)

    # ---- derived quantities (semantics, not estimation) -------------------------------
    @property
    def weight_magnitude_bits(self) -> int:
        """Bits stored per polarity: b-1 (differential) or b (offset)."""
        if self.weight_bits is None:
            return 0
        return self.weight_bits - 1 if self.weight_encoding is WeightEncoding.DIFFERENTIAL else self.weight_bits

    def input_magnitude_bits(self, signed: bool) -> int:
        """Bits applied per pass: b (unsigned, or signed offset) or b-1 (signed split)."""
        if self.input_bits is None:
            return 0
        if signed and self.signed_input_encoding is SignedInputEncoding.SPLIT:
            return self.input_bits - 1
        return self.input_bits

    def input_slices(self, signed: bool) -> tuple[int, ...]:
        """Input slice widths LSB->MSB for a signed or unsigned layer input."""
        return split_bits(self.input_magnitude_bits(signed), self.input_slice_bits, "input_slice_bits")

    def weight_slices(self) -> tuple[int, ...]:
        """Weight slice widths LSB->MSB (per polarity for differential weights)."""
        return split_bits(self.weight_magnitude_bits, self.weight_slice_bits, "weight_slice_bits")

    def n_rows(self, fan_in: int) -> int:
        """Rows per partial sum for a dot product of length ``fan_in``."""
        return fan_in if self.rows_per_array is None else min(self.rows_per_array, fan_in)

    def n_tiles(self, fan_in: int) -> int:
        """Number of partial sums (ADC conversions) one output needs per (pass, weight slice)."""
        return math.ceil(fan_in / self.n_rows(fan_in))

    @property
    def adc_signed(self) -> bool:
        """True when the ADC converts a signed difference current."""
        return self.weight_encoding is WeightEncoding.DIFFERENTIAL and self.adc_mode is AdcMode.DIFFERENCE

    def adc_max_range(self, signed_input: bool, fan_in: int) -> np.ndarray:
        """``max`` ADC full scale per (input slice, weight slice): ``n_rows·L_in·L_w``."""
        lin = np.array([2 ** s - 1 for s in self.input_slices(signed_input)], dtype=np.float64)
        lw = np.array([2 ** s - 1 for s in self.weight_slices()], dtype=np.float64)
        return self.n_rows(fan_in) * lin[:, None] * lw[None, :]

    def replace(self, **changes: Any) -> "LayerConfig":
        """A copy with some fields changed (validated)."""
        unknown = set(changes) - LAYER_FIELDS
        if unknown:
            raise ConfigError(f"unknown hardware field(s) {sorted(unknown)}; known fields: {sorted(LAYER_FIELDS)}")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict of every field."""
        out: dict[str, Any] = {}
        for f in fields(self):
            v = getattr(self, f.name)
            out[f.name] = v.value if isinstance(v, enum.Enum) else (
                [list(r) for r in v] if isinstance(v, tuple) and v and isinstance(v[0], tuple)
                else list(v) if isinstance(v, tuple) else v)
        return out


LAYER_FIELDS: frozenset[str] = frozenset(f.name for f in fields(LayerConfig))


@dataclass(frozen=True)
class HardwareConfig:
    """A whole-network design: default layer knobs, per-layer overrides, chip seed."""

    default: LayerConfig = field(default_factory=LayerConfig)
    """Knobs of every analog layer unless overridden."""

    layers: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    """Per-layer overrides: layer name -> {field: value}, or the string ``"digital"`` (:data:`DIGITAL`) for a
    layer computed exactly, off the analog arrays (the fields of :data:`DIGITAL_LAYER`). Names are checked
    against a model with :meth:`check_layer_names`."""

    seed: int = 0
    """Chip-instance seed: instance ``i`` of a Monte Carlo run draws its programming errors
    from ``seed + i``. Does not affect the analytic engine."""

    name: str = ""
    """Free-form label used in reports."""

    def __post_init__(self) -> None:
        if not isinstance(self.default, LayerConfig):
            raise ConfigError(f"default={self.default!r} must be a LayerConfig")
        if isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer)) or self.seed < 0:
            raise ConfigError(f"seed={self.seed!r} must be a non-negative integer")
        if not isinstance(self.name, str):
            raise ConfigError(f"name={self.name!r} must be a string")
        if not isinstance(self.layers, Mapping):
            raise ConfigError(f"layers={self.layers!r} must map layer names to dicts of field overrides")
        checked: dict[str, dict[str, Any]] = {}
        for lname, over in self.layers.items():
            over = layer_override(over)
            if not isinstance(lname, str) or not isinstance(over, Mapping):
                raise ConfigError(f"layers[{lname!r}] must be a dict of field overrides or {DIGITAL!r}, "
                                  f"got {over!r}")
            try:
                self.default.replace(**dict(over))
            except ConfigError as err:
                raise ConfigError(f"layers[{lname!r}]: {err}") from None
            checked[lname] = dict(over)
        object.__setattr__(self, "layers", checked)
        self._cache: dict[str, LayerConfig]
        object.__setattr__(self, "_cache", {})

    def layer(self, name: str) -> LayerConfig:
        """The knobs of layer ``name`` (default + its overrides)."""
        if name not in self._cache:
            over = self.layers.get(name)
            self._cache[name] = self.default.replace(**over) if over else self.default
        return self._cache[name]

    def check_layer_names(self, known: Iterable[str]) -> None:
        """Raise :class:`ConfigError` if an override names a layer not in ``known``."""
        known = list(known)
        bad = [n for n in self.layers if n not in known]
        if bad:
            raise ConfigError(f"layers: unknown layer name(s) {bad}; the model's analog layers are {known}")

    def replace(self, **changes: Any) -> "HardwareConfig":
        """A copy where ``changes`` apply to the default layer (fields) or to the config (seed, name, layers)."""
        top = {k: changes.pop(k) for k in ("seed", "name", "layers") if k in changes}
        default = self.default.replace(**changes) if changes else self.default
        return HardwareConfig(default=default, layers=top.get("layers", self.layers),
                              seed=top.get("seed", self.seed), name=top.get("name", self.name))

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "seed": self.seed, "default": self.default.to_dict(),
                "layers": {k: {f: (v.value if isinstance(v, enum.Enum) else v) for f, v in over.items()}
                           for k, over in self.layers.items()}}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "HardwareConfig":
        """Build from ``{"default": {...}, "layers": {...}, "seed": ..., "name": ...}``; layer
        fields may also stand at the top level (a flat dict)."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"a hardware config must be a dict, got {type(data).__name__}")
        data = dict(data)
        top = {k: data.pop(k) for k in ("name", "seed", "layers") if k in data}
        default = data.pop("default", {}) or {}
        if not isinstance(default, Mapping):
            raise ConfigError(f"default={default!r} must be a dict of layer fields")
        default = dict(default)
        overlap = set(default) & set(data)
        if overlap:
            raise ConfigError(f"field(s) {sorted(overlap)} given both at the top level and in 'default'")
        default.update(data)
        unknown = set(default) - LAYER_FIELDS
        if unknown:
            raise ConfigError(f"unknown hardware field(s) {sorted(unknown)}; known fields: {sorted(LAYER_FIELDS)}")
        return cls(default=LayerConfig(**default), **top)


@dataclass(frozen=True)
class LayerRanges:
    """Data-dependent facts a layer needs before it can run: resolved by :mod:`cimstat.calibrate`."""

    signed_input: bool
    """True when the layer's input takes negative values (conv1 on a normalised image)."""

    input_range: float | None
    """Input full scale ``x_max`` (input units); None when ``input_bits`` is None."""

    adc_range: np.ndarray | None
    """ADC full scale ``R`` per (input slice, weight slice), partial-sum units; None when the ADC is ideal."""


@dataclass(frozen=True)
class ResolvedLayer:
    """One layer's knobs with every range a number: what the simulator and the engine consume."""

    name: str
    config: LayerConfig
    ranges: LayerRanges

    def __post_init__(self) -> None:
        # Slice tuples are checked on construction against unsigned inputs; a signed input split into two
        # passes has one magnitude bit less, which is known only here.
        try:
            self.config.input_slices(self.ranges.signed_input)
        except ConfigError as err:
            hint = ""
            if self.ranges.signed_input and self.config.signed_input_encoding is SignedInputEncoding.SPLIT:
                hint = (f" (its inputs are signed and applied in two passes by sign, so input_bits="
                        f"{self.config.input_bits} leaves {self.config.input_magnitude_bits(True)} magnitude bits; "
                        f"give it its own '{self.name}.input_slice_bits' or signed_input_encoding='offset')")
            raise ConfigError(f"layer {self.name!r}: {err}{hint}") from None


DIGITAL = "digital"
"""A per-layer override that takes the layer off the analog arrays: ``layers={"conv1": "digital"}`` (in a sweep
file ``"conv1": "digital"`` in ``points``/``fixed`` or ``layer_overrides``)."""

DIGITAL_LAYER: Mapping[str, Any] = MappingProxyType({
    "input_bits": None, "weight_bits": None, "input_slice_bits": None, "weight_slice_bits": None,
    "rows_per_array": None, "adc_bits": None, "adc_thermal_noise_lsb": 0.0, "programming_error": 0.0,
    "read_noise": 0.0})
"""The field overrides of :data:`DIGITAL`: float inputs and weights, no ADC, no device noise, so the layer computes
its float output exactly (a digital unit at full precision; for a quantised digital layer set ``input_bits`` and
``weight_bits`` instead and leave the ADC ideal and the noise off)."""


def layer_override(over: Any) -> Any:
    """A layer's override as field values: :data:`DIGITAL_LAYER` for ``"digital"``, anything else unchanged."""
    return DIGITAL_LAYER if isinstance(over, str) and over == DIGITAL else over


PRESETS: dict[str, HardwareConfig] = {
    "ideal": HardwareConfig(LayerConfig(input_bits=None, weight_bits=None), name="ideal"),
    "int8": HardwareConfig(LayerConfig(input_bits=8, weight_bits=8), name="int8"),
    "bitserial-2b-slices": HardwareConfig(
        LayerConfig(input_bits=8, weight_bits=8, input_slice_bits=1, weight_slice_bits=2, rows_per_array=256,
                    adc_bits=6, adc_range=RangeMode.CALIBRATED, adc_thermal_noise_lsb=0.5,
                    programming_error=0.02, read_noise=0.01),
        name="bitserial-2b-slices"),
}
"""Common designs: float reference, plain 8-bit, bit-serial inputs with 2-bit weight slices and noise."""


def load_config(source: str | Path | Mapping[str, Any] | HardwareConfig) -> HardwareConfig:
    """A config from a preset name, a JSON file, a Python file defining ``config``, or a dict."""
    if isinstance(source, HardwareConfig):
        return source
    if isinstance(source, Mapping):
        return HardwareConfig.from_dict(source)
    text = str(source)
    if text in PRESETS:
        return PRESETS[text]
    path = Path(text)
    if not path.is_file():
        raise ConfigError(f"config {text!r} is neither a preset ({', '.join(PRESETS)}) nor an existing file")
    if path.suffix == ".json":
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ConfigError(f"config file {path}: invalid JSON ({err})") from None
        return HardwareConfig.from_dict(data)
    if path.suffix == ".py":
        try:
            namespace = runpy.run_path(str(path))
        except Exception as err:  # the user's file failed to run: name it and the reason
            raise ConfigError(f"config file {path} failed to run ({type(err).__name__}: {err})") from None
        if "config" not in namespace:
            raise ConfigError(f"config file {path} must define a variable named 'config'")
        return load_config(namespace["config"])
    raise ConfigError(f"config file {path} must end in .json or .py")
