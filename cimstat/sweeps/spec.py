"""Sweep files: loading, checking and expanding them into hardware combinations.

A sweep file is a Python module. Every name it may define (all optional but one of
``params_sweep_list`` / ``points``):

``name``
    Sweep name, used for the output folder ``results/<name>/``; default: the file's stem.
``params_sweep_list``
    ``{parameter: [values...]}``; the sweep is the cartesian product of the lists (first
    key varies slowest). A parameter is a :class:`~cimstat.hardware.LayerConfig` field name
    (applies to every analog layer), ``seed`` (chip-instance seed), ``"<layer>.<field>"``
    (one layer only), or a layer name mapping to ``{field: [values...]}`` (same as the
    dotted form).
``points``
    An explicit list of combinations, each a dict ``{parameter: value}`` (same parameter
    names) with an optional ``"label"``. The sweep is ``points x product(params_sweep_list)``;
    a file with only one of the two uses it alone.
``fixed``
    ``{parameter: value}`` applied to every combination (not a column of the output).
``layer_overrides``
    ``{layer: {field: value}}`` fixed per-layer overrides (same as dotted keys in ``fixed``); the value
    ``"digital"`` takes a layer off the analog arrays (float, exact; :data:`cimstat.hardware.DIGITAL_LAYER`),
    as ``{layer: "digital"}`` does in ``fixed`` or in a point.
``base``
    The starting design: a preset name of :data:`cimstat.hardware.PRESETS`, a config dict, a
    JSON/Python config file or a :class:`~cimstat.hardware.HardwareConfig`; default:
    ``HardwareConfig()`` (8-bit inputs and weights, ideal ADC, no noise).
``probes``
    Probe directory (``stat.pkl`` + ``noise_prop.pkl``); default: the default model's probes,
    created on first use. A relative path is taken relative to the current directory.
``model``, ``weights``, ``dataset``, ``data_root``
    What the Monte Carlo validation runs: model name, weights file, dataset name and
    folder; defaults: taken from the probes' metadata (``default`` model and dataset).

The seed's first experiment (conv1 weight bits 6-14, everything else fixed) is::

    name = "conv1_weight_bits"
    fixed = {"input_bits": 8, "weight_bits": 8}
    params_sweep_list = {"conv1": {"weight_bits": list(range(6, 15))}}

Every combination's :class:`~cimstat.hardware.HardwareConfig` is built and validated when
the file is loaded, so a bad name or value fails before anything runs.
"""
from __future__ import annotations

import enum
import hashlib
import itertools
import json
import runpy
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from cimstat.errors import CimstatError, ConfigError, SweepError
from cimstat.hardware import DIGITAL, LAYER_FIELDS, HardwareConfig, layer_override, load_config

__all__ = ["SweepSpec", "Combination", "load_sweep", "build_sweep", "SWEEP_FILE_NAMES",
           "parameter_key", "format_value"]

SWEEP_FILE_NAMES: frozenset[str] = frozenset({
    "name", "params_sweep_list", "points", "fixed", "layer_overrides", "base", "probes",
    "model", "weights", "dataset", "data_root", "description"})
"""The module-level names a sweep file may define (anything else that is public is an error)."""

SEED = "seed"


@dataclass(frozen=True)
class Combination:
    """One point of a sweep: its swept parameter values and the validated config."""

    index: int
    """Position in the sweep (0-based); the ``combo`` column of every output."""
    params: dict[str, Any]
    """Swept parameter -> value (column name -> value), in column order."""
    config: HardwareConfig
    """The whole-network design of this point (base + fixed + overrides + params)."""
    label: str = ""
    """Optional name of an explicit point."""

    @property
    def key(self) -> str:
        """Canonical identity of the combination (stable across runs of the same file)."""
        return json.dumps({"params": {k: _jsonable(v) for k, v in self.params.items()},
                           "label": self.label}, sort_keys=True)


@dataclass(frozen=True)
class SweepSpec:
    """A loaded and checked sweep file."""

    name: str
    path: Path | None
    combinations: tuple[Combination, ...]
    parameters: tuple[str, ...]
    """Column names of the swept parameters, in order."""
    probes: Path | None = None
    model: str | None = None
    weights: Path | None = None
    dataset: str | None = None
    data_root: Path | None = None
    description: str = ""
    source_sha256: str = ""
    """sha256 of the sweep file text (recorded with every run)."""

    @property
    def layer_names(self) -> set[str]:
        """Every layer named by a per-layer parameter or override of any combination."""
        names: set[str] = set()
        for combo in self.combinations:
            names.update(combo.config.layers)
        return names

    def check_layer_names(self, known: Sequence[str]) -> None:
        """Raise :class:`SweepError` if a per-layer parameter names a layer the model lacks."""
        known = list(known)
        bad = sorted(n for n in self.layer_names if n not in known)
        if bad:
            raise SweepError(f"sweep {self.name!r}: unknown layer name(s) {bad}; the model's analog "
                             f"layers are {known}")


def _jsonable(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):  # numpy scalar
        return value.item()
    return value


def format_value(value: Any) -> Any:
    """A parameter value as it appears in a CSV cell: None -> ``"None"``, tuples -> ``"(2, 2)"``."""
    value = _jsonable(value)
    if value is None:
        return "None"
    if isinstance(value, list):
        return "(" + ", ".join(str(v) for v in value) + ")"
    return value


def _normalise_value(value: Any) -> Any:
    """Lists inside a value (slice widths, ADC range tables) become tuples."""
    if isinstance(value, list):
        return tuple(_normalise_value(v) for v in value)
    if isinstance(value, tuple):
        return tuple(_normalise_value(v) for v in value)
    return value


def parameter_key(key: Any, where: str) -> tuple[str | None, str]:
    """``(layer or None, field)`` of a parameter name; raises :class:`SweepError` if unknown."""
    if not isinstance(key, str):
        raise SweepError(f"{where}: parameter name {key!r} must be a string")
    if key == SEED or key in LAYER_FIELDS:
        return None, key
    if "." in key:
        layer, fname = key.rsplit(".", 1)
        if fname in LAYER_FIELDS and layer:
            return layer, fname
        raise SweepError(f"{where}: {key!r} names layer {layer!r} but {fname!r} is not a hardware field; "
                         f"known fields: {sorted(LAYER_FIELDS)}")
    raise SweepError(f"{where}: unknown parameter {key!r}; expected a hardware field "
                     f"({', '.join(sorted(LAYER_FIELDS))}), 'seed', '<layer>.<field>' or "
                     "a layer name mapping to {field: values}")


def _flatten(mapping: Any, where: str, *, lists: bool) -> dict[str, Any]:
    """Flatten ``{layer: {field: v}}`` into ``{"layer.field": v}`` and check every name."""
    if not isinstance(mapping, Mapping):
        raise SweepError(f"{where} must be a dict of parameter -> {'list of values' if lists else 'value'}, "
                         f"got {type(mapping).__name__}")
    flat: dict[str, Any] = {}
    for key, value in mapping.items():
        layer_key = (isinstance(key, str) and key != SEED and key not in LAYER_FIELDS
                     and key.rsplit(".", 1)[-1] not in LAYER_FIELDS)
        if layer_key and not lists:
            value = layer_override(value)
        if layer_key and isinstance(value, Mapping):
            for fname, v in value.items():
                if fname not in LAYER_FIELDS:
                    raise SweepError(f"{where}[{key!r}]: {fname!r} is not a hardware field; known fields: "
                                     f"{sorted(LAYER_FIELDS)}")
                flat[f"{key}.{fname}"] = v
            continue
        parameter_key(key, where)
        if key in flat:
            raise SweepError(f"{where}: parameter {key!r} is given twice")
        flat[key] = value
    if lists:
        for key, values in flat.items():
            if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) and not hasattr(values, "__iter__"):
                raise SweepError(f"{where}[{key!r}] must be a list of values, got {values!r}")
            values = list(values)
            if not values:
                raise SweepError(f"{where}[{key!r}] is an empty list; give at least one value")
            flat[key] = [_normalise_value(v) for v in values]
    else:
        flat = {k: _normalise_value(v) for k, v in flat.items()}
    return flat


def _apply(config: HardwareConfig, params: Mapping[str, Any]) -> HardwareConfig:
    """``config`` with flat parameters applied (default fields, seed, per-layer fields)."""
    default_changes: dict[str, Any] = {}
    layers = {k: dict(v) for k, v in config.layers.items()}
    seed = config.seed
    for key, value in params.items():
        layer, fname = parameter_key(key, "parameters")
        if fname == SEED:
            if layer is not None:
                raise SweepError(f"{key!r}: the seed is per chip, not per layer; use 'seed'")
            seed = value
        elif layer is None:
            default_changes[fname] = value
        else:
            layers.setdefault(layer, {})[fname] = value
    default = config.default.replace(**default_changes) if default_changes else config.default
    return HardwareConfig(default=default, layers=layers, seed=seed, name=config.name)


def _describe(params: Mapping[str, Any], label: str) -> str:
    text = ", ".join(f"{k}={format_value(v)}" for k, v in params.items())
    return f"{label!r} ({text})" if label else f"({text})"


def _resolve_path(value: Any, what: str) -> Path | None:
    if value is None:
        return None
    if not isinstance(value, (str, Path)):
        raise SweepError(f"{what}={value!r} must be a path string")
    return Path(value).expanduser()


def build_sweep(namespace: Mapping[str, Any], *, name: str, path: Path | None = None,
                source_sha256: str = "") -> SweepSpec:
    """Check a sweep's names and expand it into validated :class:`Combination` objects."""
    where = f"sweep {str(path) if path else name!r}"
    public = {k: v for k, v in namespace.items() if not k.startswith("_") and not _is_module_or_import(v)}
    unknown = sorted(set(public) - SWEEP_FILE_NAMES)
    if unknown:
        raise SweepError(f"{where}: unknown name(s) {unknown}; a sweep file may define "
                         f"{sorted(SWEEP_FILE_NAMES)} (prefix helpers with '_')")
    grid = namespace.get("params_sweep_list")
    points = namespace.get("points")
    if grid is None and points is None:
        raise SweepError(f"{where}: defines neither 'params_sweep_list' nor 'points'; nothing to sweep")
    sweep_name = namespace.get("name", name)
    if not isinstance(sweep_name, str) or not sweep_name or any(c in sweep_name for c in "/\\") \
            or sweep_name.startswith("."):
        raise SweepError(f"{where}: name={sweep_name!r} must be a non-empty string usable as a folder name")

    try:
        base = load_config(namespace["base"]) if namespace.get("base") is not None else HardwareConfig()
    except CimstatError as err:
        raise SweepError(f"{where}: base: {err}") from None
    fixed = _flatten(namespace.get("fixed", {}) or {}, f"{where}: fixed", lists=False)
    overrides = namespace.get("layer_overrides", {}) or {}
    if isinstance(overrides, Mapping):
        overrides = {layer: layer_override(over) for layer, over in overrides.items()}
    if not isinstance(overrides, Mapping) or not all(isinstance(v, Mapping) for v in overrides.values()):
        raise SweepError(f"{where}: layer_overrides must map layer names to {{field: value}} dicts or {DIGITAL!r}")
    fixed.update(_flatten({f"{layer}.{f}": v for layer, over in overrides.items() for f, v in over.items()},
                          f"{where}: layer_overrides", lists=False))
    try:
        base = _apply(base, fixed)
    except ConfigError as err:
        raise SweepError(f"{where}: fixed parameters: {err}") from None

    grid_flat = _flatten(grid, f"{where}: params_sweep_list", lists=True) if grid is not None else {}
    point_list: list[tuple[str, dict[str, Any]]] = [("", {})]
    if points is not None:
        if isinstance(points, (str, bytes, Mapping)) or not isinstance(points, Sequence) or not points:
            raise SweepError(f"{where}: points must be a non-empty list of {{parameter: value}} dicts")
        point_list = []
        for i, point in enumerate(points):
            if not isinstance(point, Mapping):
                raise SweepError(f"{where}: points[{i}] must be a dict of parameter -> value, got {point!r}")
            point = dict(point)
            label = point.pop("label", "")
            if not isinstance(label, str):
                raise SweepError(f"{where}: points[{i}]['label'] must be a string")
            flat = _flatten(point, f"{where}: points[{i}]", lists=False)
            clash = sorted(set(flat) & set(grid_flat))
            if clash:
                raise SweepError(f"{where}: points[{i}] sets {clash}, which params_sweep_list also sweeps")
            point_list.append((label, flat))
        labels = [lab for lab, _ in point_list if lab]
        if len(labels) != len(set(labels)):
            dup = sorted({lab for lab in labels if labels.count(lab) > 1})
            raise SweepError(f"{where}: point label(s) {dup} used more than once")

    columns: list[str] = []
    for _, flat in point_list:
        for key in flat:
            if key not in columns:
                columns.append(key)
    columns += [k for k in grid_flat if k not in columns]

    combos: list[Combination] = []
    seen: dict[str, int] = {}
    grid_keys = list(grid_flat)
    for label, point in point_list:
        for values in itertools.product(*(grid_flat[k] for k in grid_keys)):
            params = {**point, **dict(zip(grid_keys, values))}
            ordered = {k: params[k] for k in columns if k in params}
            try:
                config = _apply(base, ordered)
            except ConfigError as err:
                raise SweepError(f"{where}: combination {_describe(ordered, label)}: {err}") from None
            combo = Combination(index=len(combos), params=ordered, config=config, label=label)
            if combo.key in seen:
                raise SweepError(f"{where}: combination {_describe(ordered, label)} appears twice "
                                 f"(#{seen[combo.key]} and #{combo.index})")
            seen[combo.key] = combo.index
            combos.append(combo)

    def text(key: str) -> str | None:
        value = namespace.get(key)
        if value is not None and not isinstance(value, str):
            raise SweepError(f"{where}: {key}={value!r} must be a string")
        return value

    return SweepSpec(
        name=sweep_name, path=path, combinations=tuple(combos), parameters=tuple(columns),
        probes=_resolve_path(namespace.get("probes"), "probes"),
        model=text("model"), weights=_resolve_path(namespace.get("weights"), "weights"),
        dataset=text("dataset"), data_root=_resolve_path(namespace.get("data_root"), "data_root"),
        description=text("description") or (namespace.get("__doc__") or "").strip(),
        source_sha256=source_sha256)


def _is_module_or_import(value: Any) -> bool:
    import types

    return isinstance(value, (types.ModuleType, types.FunctionType, type))


def load_sweep(path: str | Path) -> SweepSpec:
    """Load and check a sweep file; raises :class:`SweepError` with one clear line on any problem."""
    path = Path(path)
    if not path.is_file():
        raise SweepError(f"sweep file {str(path)!r} does not exist")
    if path.suffix != ".py":
        raise SweepError(f"sweep file {path} must be a Python file ending in .py")
    source = path.read_bytes()
    try:
        namespace = runpy.run_path(str(path), run_name="__sweep__")
    except CimstatError as err:
        raise SweepError(f"sweep file {path}: {err}") from None
    except SyntaxError as err:
        raise SweepError(f"sweep file {path}: syntax error on line {err.lineno}: {err.msg}") from None
    except Exception as err:  # noqa: BLE001 - any failure of user code becomes one line
        raise SweepError(f"sweep file {path}: {type(err).__name__}: {err}") from None
    return build_sweep(namespace, name=path.stem, path=path,
                       source_sha256=hashlib.sha256(source).hexdigest())
