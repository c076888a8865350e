"""Probe files: schema, versioned writing, safe loading, fingerprints.

Two pickles per (model, dataset), written by :mod:`probing`:

``stat.pkl`` (:class:`ActivationStats`)
    ``{"schema": "cimstat.stat", "schema_version": 1, "meta": {...}, "layers": [<layer dict>...],
    "logits": (N, n_classes) float32, "labels": (N,) int64}``. One layer dict per analog layer
    in execution order with the fields of :class:`LayerStats`.
``noise_prop.pkl`` (:class:`NoiseProp`)
    ``{"schema": "cimstat.noise_prop", "schema_version": 1, "meta": {...}, "layers": [...]}``
    with the fields of :class:`LayerNoiseProp`.

Both hold only plain containers (dict, list, tuple, str, int, float, bool, None) and numpy
arrays; they are read with :class:`RestrictedUnpickler`, which refuses every global except
the few numpy functions that rebuild an array. ``meta`` always holds ``schema_version``,
``model``, ``fingerprint`` (:func:`cimstat.models.weights_fingerprint` of the *unfolded*
model), ``dataset``, ``split``, ``n_images``, ``seed``, ``created`` (UTC ISO time).
"""
from __future__ import annotations

import datetime as _dt
import io
import os
import pickle
import tempfile
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from cimstat.errors import ProbeFileError

__all__ = [
    "SCHEMA_VERSION", "NOISE_SCHEMA_VERSION", "STAT_FILE", "NOISE_PROP_FILE", "LayerStats", "ActivationStats", "LayerNoiseProp",
    "NoiseProp", "ProbeSet", "RestrictedUnpickler", "write_stats", "write_noise_prop", "read_stats",
    "read_noise_prop", "load_probes", "default_probe_dir", "ensure_default_probes", "repo_root",
]

SCHEMA_VERSION = 1          #: of ``stat.pkl``
#: of ``noise_prop.pkl`` (2: coherent-error Jacobians ``gain_jac``/``offset_jac``; 3: ``weight_grad``;
#: 4: ``input_sample`` of small layers; 5: of every layer; 6: ``sample_grad_weight``; 7: ``out_grad`` and
#: ``layer_input``)
NOISE_SCHEMA_VERSION = 7
#: versions :func:`read_noise_prop` accepts (3: no input samples, 4: samples of small layers only, the engine
#: models the ADC input of layers without one; 5: no gradient weights, white errors taken as stationary)
NOISE_SCHEMA_READABLE = (3, 4, 5, 6, 7)
STAT_FILE = "stat.pkl"
NOISE_PROP_FILE = "noise_prop.pkl"
_STAT_SCHEMA = "cimstat.stat"
_NOISE_SCHEMA = "cimstat.noise_prop"
_META_KEYS = ("schema_version", "model", "fingerprint", "dataset", "split", "n_images", "seed", "created")


# ---------------------------------------------------------------------------- schema
@dataclass
class LayerStats:
    """Input/output statistics of one analog layer, over the rows of its im2col patches.

    Every statistic counts each padded input position once per patch that contains it
    (padding zeros included), over all output positions of all probed images.
    ``M = E[x x^T]`` is stored exactly (``m_dense``) or as ``V diag(λ) V^T + diag(d)``
    (``m_eigvecs (K, r)``, ``m_eigvals (r,)``, ``m_resid_diag (K,)``: top-r eigenpairs and the
    exact diagonal of what they leave out). Use :meth:`quad_form` and :meth:`matrix`.
    """

    name: str
    kind: str                       #: "conv" or "linear"
    weight_shape: tuple[int, ...]   #: (C_out, C_in, kh, kw) or (C_out, C_in)
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    groups: int
    fan_in: int                     #: K = C_in*kh*kw (rows of a patch)
    out_channels: int
    in_channels: int
    n_positions: int                #: output positions per image (Ho*Wo; 1 for linear)
    n_patches: int                  #: patch vectors seen (n_images * n_positions)
    signed_input: bool              #: some input was < 0
    input_min: float                #: smallest input value seen (input units)
    input_max: float                #: largest input value seen (input units)
    hist_edges: np.ndarray          #: (n_bins+1,) float64, uniform, shared by the layer's channels
    hist_counts: np.ndarray         #: (C_in, n_bins) int64, counts of the non-zero patch entries
    zero_counts: np.ndarray         #: (C_in,) int64, exact zeros (padding included)
    total_counts: np.ndarray        #: (C_in,) int64 = hist_counts.sum(1) + zero_counts
    row_mean: np.ndarray            #: (K,) float64, E[x_k]
    row_sq_mean: np.ndarray         #: (K,) float64, E[x_k^2]
    out_mean: np.ndarray            #: (C_out,) float64, E[y_c] of the float output (bias included)
    out_sq_mean: np.ndarray         #: (C_out,) float64, E[y_c^2]
    m_method: str                   #: "dense" or "eig+diag"
    m_n_patches: int                #: patches the off-diagonal of M was estimated from
    m_dense: np.ndarray | None = None        #: (K, K) float32 when m_method == "dense"
    m_eigvecs: np.ndarray | None = None      #: (K, r) float32
    m_eigvals: np.ndarray | None = None      #: (r,) float64
    m_resid_diag: np.ndarray | None = None   #: (K,) float64, diag(M) - diag(V Λ V^T) >= 0

    @property
    def kernel_size(self) -> tuple[int, int]:
        return tuple(self.weight_shape[2:]) if self.kind == "conv" else (1, 1)  # type: ignore[return-value]

    @property
    def n_bins(self) -> int:
        return int(self.hist_counts.shape[1])

    @property
    def zero_fraction(self) -> np.ndarray:
        """(C_in,) exact probability that an input of channel c is 0."""
        return self.zero_counts / np.maximum(self.total_counts, 1)

    @property
    def channel_of_row(self) -> np.ndarray:
        """(K,) input channel of every patch row (PyTorch order C_in, kh, kw)."""
        kh, kw = self.kernel_size
        return np.repeat(np.arange(self.fan_in // (kh * kw)), kh * kw)

    def quad_form(self, dw: np.ndarray) -> np.ndarray:
        """``diag(dW M dW^T)`` for ``dW (C, K)`` (or ``(K,)``): E[(dW_c · x)^2] per row c."""
        dw = np.asarray(dw, dtype=np.float64)
        one = dw.ndim == 1
        dw2 = dw[None] if one else dw
        if dw2.shape[-1] != self.fan_in:
            raise ValueError(f"quad_form of layer {self.name}: dW has {dw2.shape[-1]} columns, expected K={self.fan_in}")
        if self.m_method == "dense":
            out = np.einsum("ck,ck->c", dw2 @ self.m_dense.astype(np.float64, copy=False), dw2)
        else:
            proj = dw2 @ self.m_eigvecs.astype(np.float64, copy=False)
            out = (proj * proj) @ self.m_eigvals + (dw2 * dw2) @ self.m_resid_diag
        return out[0] if one else out

    def matrix(self) -> np.ndarray:
        """The (K, K) float64 second-moment matrix as stored (dense, or rebuilt from its compression)."""
        if self.m_method == "dense":
            return self.m_dense.astype(np.float64)
        v = self.m_eigvecs.astype(np.float64)
        return (v * self.m_eigvals) @ v.T + np.diag(self.m_resid_diag)


@dataclass
class ActivationStats:
    """Everything probing records about a (model, dataset): ``stat.pkl``."""

    meta: dict[str, Any]
    layers: dict[str, LayerStats]   #: in execution order
    logits: np.ndarray              #: (N, n_classes) float32 clean logits of the probed images
    labels: np.ndarray              #: (N,) int64

    @property
    def layer_names(self) -> list[str]:
        return list(self.layers)

    @property
    def n_classes(self) -> int:
        return int(self.logits.shape[1])


@dataclass
class LayerNoiseProp:
    """How errors at the output of one analog layer reach the logits (linear regime)."""

    name: str
    ratio: np.ndarray               #: (C_out, n_classes) logit variance per unit white-noise variance per channel
    weight_sens: np.ndarray         #: (C_out, K) S_k = E_x sum_j (dz_j/dW_k)^2
    weight_sens_class: np.ndarray   #: (C_out, n_classes) sum_{k in c} E_x (dz_j/dW_k)^2
    #: (N, C_out, D) per probe image n, channel c, logit direction d: ``Σ_p (y_cp - b_c)·∂z_d/∂y_cp``,
    #: the change of ``z_d`` per unit relative gain error of channel c (``y - b``: output without bias)
    gain_jac: np.ndarray | None = None
    #: (N, C_out, D) ``Σ_p ∂z_d/∂y_cp``: the change of ``z_d`` per unit constant offset of channel c
    offset_jac: np.ndarray | None = None
    #: (N, D) per image: ``Σ_c Σ_p (∂z_d/∂y_cp)²`` (how strongly white noise of this layer reaches
    #: logit direction d for this image; the images of ``gain_jac``)
    ratio_image: np.ndarray | None = None
    #: (N, D) per image: ``Σ_{c,k} (∂z_d/∂W_ck)²`` (the same for fixed weight errors)
    sens_image: np.ndarray | None = None
    #: (N, D, C_out, K) per-sample weight gradients ``∂z_d/∂W_ck`` of the ``gain_jac`` images (float16);
    #: small layers only
    weight_grad: np.ndarray | None = None
    #: (S, K) float32 (float16 for wide layers): a fixed sample of S im2col input vectors of the layer
    #: (patch rows in PyTorch's (C_in, kh, kw) order) drawn evenly from the images of ``stat.pkl``
    #: (:func:`cimstat.input_sample.sample_size`; schema 4 had it for fan-in <= 512 only). The engine takes
    #: its ADC and input-rounding expectations over it where moments are not enough (conv1: whole
    #: all-background patches are one point mass; deeper layers: clipping at tight calibrated ranges)
    input_sample: np.ndarray | None = None
    #: (S, C_out) float16, mean 1 per channel: the gradient weight of each sampled vector's outputs,
    #: ``Σ_j (∂z_j/∂y_{c,p})²`` at its image and position over its mean (schema 6;
    #: :func:`cimstat.input_sample.collect_input_samples_with_gradients`). The engine weights the white
    #: (per-read) errors it takes over the sample by it: errors that sit where the logits are sensitive count more
    sample_grad_weight: np.ndarray | None = None
    #: (N, D, C_out, P) float16: the output gradients ``∂z_d/∂y_{c,p}`` of the ``gain_jac`` images, divided by
    #: ``out_grad_scale`` (schema 7; layers without ``weight_grad`` whose ``N·D·C_out·P`` is at most
    #: :data:`cimstat.noise_propagation.OUT_GRAD_MAX_ELEMENTS`). With ``layer_input`` they give the exact
    #: logit shift of any fixed weight error ``dW`` on those images, ``Σ_{c,p} g_{d,c,p}·(dW * x)_{c,p}``
    #: (:meth:`cimstat.engine.Engine`), as ``weight_grad`` does for small layers
    out_grad: np.ndarray | None = None
    out_grad_scale: float = 1.0
    #: the layer's input activations of the same images, float16: (N, C_in, H, W) for a conv, (N, K) for a linear layer
    layer_input: np.ndarray | None = None


@dataclass
class NoiseProp:
    """``noise_prop.pkl``: per-layer propagation ratios and weight sensitivities."""

    meta: dict[str, Any]            #: + "method" ("jacobian"/"injection"), "class_estimator",
    #: "coherent_directions": "classes" (direction d = logit d) or "rademacher(D)" (random ±1 projections)
    layers: dict[str, LayerNoiseProp]


@dataclass
class ProbeSet:
    """What :func:`load_probes` returns."""

    stats: ActivationStats
    noise_prop: NoiseProp | None
    directory: Path | None = None

    @property
    def fingerprint(self) -> str:
        return str(self.stats.meta["fingerprint"])

    def check_model(self, model_or_fingerprint: Any) -> None:
        """Raise :class:`ProbeFileError` unless the probes were made for this model (weights fingerprint)."""
        check_fingerprint(self.stats.meta, model_or_fingerprint, self.directory)


# ---------------------------------------------------------------------------- writing
def _atomic_pickle(obj: Any, path: Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            pickle.dump(obj, f, protocol=4)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; probe files are ordinary files
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def _plain(value: Any) -> Any:
    if isinstance(value, np.ndarray) or value is None or isinstance(value, (str, bool, int, float)):
        return value
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if hasattr(value, "detach"):  # torch tensor
        return value.detach().cpu().numpy()
    raise TypeError(f"cannot store {type(value).__name__} in a probe file")


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def write_stats(stats: ActivationStats, path: str | Path) -> Path:
    """Write ``stats`` to ``path`` (atomically)."""
    doc = {"schema": _STAT_SCHEMA, "schema_version": SCHEMA_VERSION, "meta": _plain(stats.meta),
           "layers": [_plain({f.name: getattr(l, f.name) for f in fields(LayerStats)}) for l in stats.layers.values()],
           "logits": np.asarray(stats.logits, dtype=np.float32), "labels": np.asarray(stats.labels, dtype=np.int64)}
    _atomic_pickle(doc, Path(path))
    return Path(path)


def write_noise_prop(noise: NoiseProp, path: str | Path) -> Path:
    """Write ``noise`` to ``path`` (atomically)."""
    doc = {"schema": _NOISE_SCHEMA, "schema_version": NOISE_SCHEMA_VERSION, "meta": _plain(noise.meta),
           "layers": [_plain({f.name: getattr(l, f.name) for f in fields(LayerNoiseProp)})
                      for l in noise.layers.values()]}
    _atomic_pickle(doc, Path(path))
    return Path(path)


# ---------------------------------------------------------------------------- reading
_ALLOWED_GLOBALS = {
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
}
_ALLOWED_DTYPE_KINDS = set("biuf")  # bool, int, uint, float: never object arrays


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays only; every other global is refused."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"refused to import {module}.{name}")
        obj = super().find_class(module, name)
        if name == "dtype":
            def safe_dtype(spec: Any, *args: Any) -> np.dtype:
                dt = np.dtype(spec, *args)
                if dt.kind not in _ALLOWED_DTYPE_KINDS:
                    raise pickle.UnpicklingError(f"refused numpy dtype {dt!r}")
                return dt
            return safe_dtype
        return obj


def _read_pickle(path: Path) -> Any:
    if not path.is_file():
        raise ProbeFileError(f"probe file {str(path)!r} does not exist (run probing first, e.g. "
                             f"python -m probing.activations ...)")
    try:
        data = path.read_bytes()
        return RestrictedUnpickler(io.BytesIO(data)).load()
    except pickle.UnpicklingError as err:
        msg = str(err)
        if "refused" in msg:
            raise ProbeFileError(f"probe file {str(path)!r} is unsafe: {msg}; only numpy arrays and plain "
                                 "containers are allowed") from None
        raise ProbeFileError(f"probe file {str(path)!r} is corrupt or truncated ({msg})") from None
    except (EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError, MemoryError,
            OverflowError, ImportError, UnicodeDecodeError) as err:
        raise ProbeFileError(f"probe file {str(path)!r} is corrupt or truncated "
                             f"({type(err).__name__}: {str(err)[:120]})") from None


class _Reader:
    """Typed access to one decoded pickle, raising ProbeFileError that names file and key."""

    def __init__(self, path: Path):
        self.path = path

    def fail(self, what: str) -> ProbeFileError:
        return ProbeFileError(f"probe file {str(self.path)!r}: {what}")

    def get(self, d: Any, key: str, where: str, types: tuple[type, ...] | type | None = None) -> Any:
        if not isinstance(d, dict):
            raise self.fail(f"{where} is a {type(d).__name__}, expected a dict")
        if key not in d:
            raise self.fail(f"missing key {key!r} in {where}")
        v = d[key]
        if types is not None and not isinstance(v, types):
            raise self.fail(f"{where}[{key!r}] is a {type(v).__name__}, expected {types}")
        return v

    def array(self, d: Any, key: str, where: str, shape: tuple[int | None, ...], kind: str = "f",
              optional: bool = False) -> np.ndarray | None:
        if optional and (not isinstance(d, dict) or d.get(key) is None):
            return None
        v = self.get(d, key, where)
        if not isinstance(v, np.ndarray):
            raise self.fail(f"{where}[{key!r}] is a {type(v).__name__}, expected a numpy array")
        if v.dtype.kind not in kind:
            raise self.fail(f"{where}[{key!r}] has dtype {v.dtype}, expected kind {kind!r}")
        if v.ndim != len(shape) or any(s is not None and s != t for s, t in zip(shape, v.shape)):
            raise self.fail(f"{where}[{key!r}] has shape {v.shape}, expected {shape}")
        if v.dtype.kind == "f" and not np.all(np.isfinite(v)):
            raise self.fail(f"{where}[{key!r}] holds non-finite values")
        return v

    def header(self, doc: Any, schema: str, expected: int | tuple[int, ...] = SCHEMA_VERSION) -> dict[str, Any]:
        if not isinstance(doc, dict):
            raise self.fail(f"top level is a {type(doc).__name__}, expected a dict")
        got = doc.get("schema")
        if got != schema:
            raise self.fail(f"schema {got!r}, expected {schema!r}")
        version = doc.get("schema_version")
        accepted = expected if isinstance(expected, tuple) else (expected,)
        if isinstance(version, bool) or version not in accepted:
            raise self.fail(f"schema version {version!r} is not supported (this cimstat reads version "
                            f"{' or '.join(map(str, accepted))}); re-run probing")
        meta = self.get(doc, "meta", "file", dict)
        for k in _META_KEYS:
            self.get(meta, k, "meta")
        return meta


def _as_tuple(r: _Reader, d: dict, key: str, where: str, n: int | None) -> tuple[int, ...]:
    v = r.get(d, key, where, (tuple, list))
    if (n is not None and len(v) != n) or not all(isinstance(i, int) and not isinstance(i, bool) for i in v):
        raise r.fail(f"{where}[{key!r}]={v!r}, expected a tuple of {n or 'some'} ints")
    return tuple(v)


def _parse_layer_stats(r: _Reader, d: Any, i: int) -> LayerStats:
    where = f"layers[{i}]"
    name = r.get(d, "name", where, str)
    where = f"layer {name!r}"
    kind = r.get(d, "kind", where, str)
    if kind not in ("conv", "linear"):
        raise r.fail(f"{where}: kind {kind!r}, expected 'conv' or 'linear'")
    ints = {k: r.get(d, k, where, int) for k in ("groups", "fan_in", "out_channels", "in_channels",
                                                   "n_positions", "n_patches", "m_n_patches")}
    k_, c_out, c_in = ints["fan_in"], ints["out_channels"], ints["in_channels"]
    edges = r.array(d, "hist_edges", where, (None,))
    n_bins = edges.shape[0] - 1
    if n_bins < 1:
        raise r.fail(f"{where}: hist_edges has {edges.shape[0]} entries, expected at least 2")
    method = r.get(d, "m_method", where, str)
    if method not in ("dense", "eig+diag"):
        raise r.fail(f"{where}: m_method {method!r}, expected 'dense' or 'eig+diag'")
    ls = LayerStats(
        name=name, kind=kind, weight_shape=_as_tuple(r, d, "weight_shape", where, None),
        stride=_as_tuple(r, d, "stride", where, 2), padding=_as_tuple(r, d, "padding", where, 2),
        dilation=_as_tuple(r, d, "dilation", where, 2), **{k: v for k, v in ints.items() if k != "m_n_patches"},
        signed_input=r.get(d, "signed_input", where, bool),
        input_min=float(r.get(d, "input_min", where, (int, float))),
        input_max=float(r.get(d, "input_max", where, (int, float))),
        hist_edges=edges, hist_counts=r.array(d, "hist_counts", where, (c_in, n_bins), "iu"),
        zero_counts=r.array(d, "zero_counts", where, (c_in,), "iu"),
        total_counts=r.array(d, "total_counts", where, (c_in,), "iu"),
        row_mean=r.array(d, "row_mean", where, (k_,)), row_sq_mean=r.array(d, "row_sq_mean", where, (k_,)),
        out_mean=r.array(d, "out_mean", where, (c_out,)), out_sq_mean=r.array(d, "out_sq_mean", where, (c_out,)),
        m_method=method, m_n_patches=ints["m_n_patches"])
    if ls.weight_shape[0] != c_out or int(np.prod(ls.weight_shape[1:])) != k_:
        raise r.fail(f"{where}: weight_shape {ls.weight_shape} does not match out_channels={c_out}, fan_in={k_}")
    if np.any(ls.hist_counts.sum(1) + ls.zero_counts != ls.total_counts):
        raise r.fail(f"{where}: hist_counts + zero_counts != total_counts")
    if method == "dense":
        ls.m_dense = r.array(d, "m_dense", where, (k_, k_))
    else:
        ls.m_eigvecs = r.array(d, "m_eigvecs", where, (k_, None))
        ls.m_eigvals = r.array(d, "m_eigvals", where, (ls.m_eigvecs.shape[1],))
        ls.m_resid_diag = r.array(d, "m_resid_diag", where, (k_,))
    return ls


def read_stats(path: str | Path) -> ActivationStats:
    """Read and validate a ``stat.pkl``."""
    path = Path(path)
    r = _Reader(path)
    doc = _read_pickle(path)
    meta = r.header(doc, _STAT_SCHEMA)
    layers_raw = r.get(doc, "layers", "file", list)
    layers = {}
    for i, d in enumerate(layers_raw):
        ls = _parse_layer_stats(r, d, i)
        layers[ls.name] = ls
    if not layers:
        raise r.fail("no layers")
    logits = r.array(doc, "logits", "file", (None, None))
    labels = r.array(doc, "labels", "file", (logits.shape[0],), "iu")
    if meta["n_images"] != logits.shape[0]:
        raise r.fail(f"meta n_images={meta['n_images']} but logits hold {logits.shape[0]} images")
    return ActivationStats(meta=meta, layers=layers, logits=logits, labels=labels.astype(np.int64))


def read_noise_prop(path: str | Path, stats: ActivationStats | None = None) -> NoiseProp:
    """Read and validate a ``noise_prop.pkl`` (shapes checked against ``stats`` when given)."""
    path = Path(path)
    r = _Reader(path)
    doc = _read_pickle(path)
    meta = r.header(doc, _NOISE_SCHEMA, NOISE_SCHEMA_READABLE)
    r.get(meta, "method", "meta", str)
    layers: dict[str, LayerNoiseProp] = {}
    for i, d in enumerate(r.get(doc, "layers", "file", list)):
        name = r.get(d, "name", f"layers[{i}]", str)
        where = f"layer {name!r}"
        c_out = k_ = n_cls = None
        if stats is not None:
            if name not in stats.layers:
                raise r.fail(f"{where} is not a layer of the activation statistics")
            c_out, k_, n_cls = stats.layers[name].out_channels, stats.layers[name].fan_in, stats.n_classes
        ratio = r.array(d, "ratio", where, (c_out, n_cls))
        c_out, n_cls = ratio.shape
        gain = r.array(d, "gain_jac", where, (None, c_out, None), optional=True)
        n_coh = None if gain is None else gain.shape[0]
        offset = r.array(d, "offset_jac", where, (n_coh, c_out, None if gain is None else gain.shape[2]),
                         optional=True)
        n_dir = None if gain is None else gain.shape[2]
        ratio_img = r.array(d, "ratio_image", where, (n_coh, n_dir), optional=True)
        sens_img = r.array(d, "sens_image", where, (n_coh, n_dir), optional=True)
        if len({gain is None, offset is None, ratio_img is None, sens_img is None}) != 1:
            raise r.fail(f"{where} has only some of gain_jac / offset_jac / ratio_image / sens_image")
        sens = r.array(d, "weight_sens", where, (c_out, k_))
        k_ = sens.shape[1]
        layers[name] = LayerNoiseProp(name, ratio, sens, r.array(d, "weight_sens_class", where, (c_out, n_cls)),
                                      gain, offset, ratio_img, sens_img,
                                      r.array(d, "weight_grad", where, (n_coh, n_dir, c_out, k_), optional=True),
                                      r.array(d, "input_sample", where, (None, k_), optional=True))
        sample = layers[name].input_sample
        gw = r.array(d, "sample_grad_weight", where, (None if sample is None else sample.shape[0], c_out),
                     optional=True)
        if gw is not None and sample is None:
            raise r.fail(f"{where} has sample_grad_weight but no input_sample")
        layers[name].sample_grad_weight = gw
        og = r.array(d, "out_grad", where, (n_coh, n_dir, c_out, None if stats is None else
                                            stats.layers[name].n_positions), optional=True)
        if og is not None:
            if layers[name].weight_grad is not None or n_coh is None:
                raise r.fail(f"{where} has out_grad with weight_grad or without gain_jac (one route per layer)")
            scale = d.get("out_grad_scale")
            if isinstance(scale, bool) or not isinstance(scale, (int, float, np.floating)) or not scale > 0:
                raise r.fail(f"{where}['out_grad_scale'] is {scale!r}, expected a positive number")
            conv = stats is None or stats.layers[name].kind == "conv"
            x = r.array(d, "layer_input", where, (n_coh, None, None, None) if conv else (n_coh, k_))
            if stats is not None and conv and x.shape[1] != stats.layers[name].in_channels:
                raise r.fail(f"{where}['layer_input'] has {x.shape[1]} channels, expected "
                             f"{stats.layers[name].in_channels}")
            layers[name].out_grad, layers[name].out_grad_scale, layers[name].layer_input = og, float(scale), x
    if stats is not None:
        missing = [n for n in stats.layers if n not in layers]
        if missing:
            raise r.fail(f"no noise propagation for layer(s) {missing[:3]}")
    return NoiseProp(meta=meta, layers=layers)


def _fingerprint_of(model_or_fingerprint: Any) -> str:
    if isinstance(model_or_fingerprint, str):
        return model_or_fingerprint
    from cimstat.models import weights_fingerprint
    return weights_fingerprint(model_or_fingerprint)


def check_fingerprint(meta: Mapping[str, Any], model_or_fingerprint: Any, where: Path | None = None) -> None:
    """Raise :class:`ProbeFileError` if ``meta['fingerprint']`` is not that of the model in use."""
    want = _fingerprint_of(model_or_fingerprint)
    if meta.get("fingerprint") != want:
        raise ProbeFileError(f"probes {str(where) if where else ''!s} were made for model {meta.get('model')!r} with "
                             f"weights fingerprint {meta.get('fingerprint')!r}, but the model in use has {want!r}; "
                             "re-run probing for this model")


def load_probes(directory: str | Path, model: Any = None, *, require_noise_prop: bool = False) -> ProbeSet:
    """Read ``stat.pkl`` (and ``noise_prop.pkl`` if present) from ``directory``.

    ``model`` (an ``nn.Module`` or a fingerprint string), when given, must match the weights
    the probes were made with. Every problem raises :class:`ProbeFileError`.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise ProbeFileError(f"probe folder {str(directory)!r} does not exist; expected a folder holding "
                             f"{STAT_FILE} (and {NOISE_PROP_FILE})")
    stats = read_stats(directory / STAT_FILE)
    noise = None
    noise_path = directory / NOISE_PROP_FILE
    if noise_path.exists() or require_noise_prop:
        noise = read_noise_prop(noise_path, stats)
        if noise.meta["fingerprint"] != stats.meta["fingerprint"]:
            raise ProbeFileError(f"{str(noise_path)!r} was made for weights {noise.meta['fingerprint']!r} but "
                                 f"{STAT_FILE} for {stats.meta['fingerprint']!r}; re-run probing")
    probes = ProbeSet(stats, noise, directory)
    if model is not None:
        probes.check_model(model)
    return probes


# ---------------------------------------------------------------------------- default probes
def repo_root() -> Path:
    return Path(__file__).resolve().parent.parent


def default_probe_dir() -> Path:
    """``<repo>/.cache/probes/default``: where :func:`ensure_default_probes` keeps the default model's probes."""
    return repo_root() / ".cache" / "probes" / "default"


DEFAULT_STAT_IMAGES = 1000   #: the whole default probe split
DEFAULT_NOISE_IMAGES = 64


def _fresh_stats(directory: Path, fingerprint: str, n_stat: int, seed: int) -> ActivationStats | None:
    """The folder's activation statistics if they are readable and made with these settings, else None."""
    from cimstat.data import info

    try:
        stats = read_stats(directory / STAT_FILE)
        check_fingerprint(stats.meta, fingerprint, directory)
    except ProbeFileError:
        return None
    s = stats.meta
    fresh = (s.get("dataset_description") == info("default").description  # same split and image order
             and s["n_images"] == n_stat and s["seed"] == seed)
    return stats if fresh else None


def _noise_fresh(directory: Path, stats: ActivationStats, n_noise: int) -> bool:
    try:
        n = read_noise_prop(directory / NOISE_PROP_FILE, stats).meta
    except ProbeFileError:
        return False
    return (n["fingerprint"] == stats.meta["fingerprint"] and n["n_images"] == n_noise
            and n.get("method") == "jacobian" and n["schema_version"] == NOISE_SCHEMA_VERSION)


def ensure_default_probes(directory: str | Path | None = None, *, n_stat_images: int = DEFAULT_STAT_IMAGES,
                          n_noise_images: int = DEFAULT_NOISE_IMAGES, seed: int = 0, progress: bool = True,
                          batch_size: int = 100) -> Path:
    """Probe files of the default model in ``directory`` (default :func:`default_probe_dir`).

    Re-probes only what is missing, unreadable, of another schema version, made for other
    weights, or with other settings (fresh activation statistics are kept when only
    ``noise_prop.pkl`` is stale); a file lock keeps concurrent callers from probing
    twice. Returns the directory.
    """
    import fcntl

    from cimstat.activation_stats import probe_model
    from cimstat.models import load, weights_fingerprint
    from cimstat.noise_propagation import noise_propagation

    directory = Path(directory) if directory is not None else default_probe_dir()
    directory.mkdir(parents=True, exist_ok=True)
    model = load("default")
    fp = weights_fingerprint(model)
    stats = _fresh_stats(directory, fp, n_stat_images, seed)
    if stats is not None and _noise_fresh(directory, stats, n_noise_images):
        return directory
    with open(directory / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        stats = _fresh_stats(directory, fp, n_stat_images, seed)  # another process may have probed meanwhile
        if stats is not None and _noise_fresh(directory, stats, n_noise_images):
            return directory
        if stats is None:  # otherwise only noise_prop.pkl is stale
            stats = probe_model(model, "default", "default", n_images=n_stat_images, seed=seed,
                                batch_size=batch_size, progress=progress)
            write_stats(stats, directory / STAT_FILE)
        noise = noise_propagation(model, "default", "default", stats, n_images=n_noise_images,
                                  method="jacobian", batch_size=32, progress=progress)
        write_noise_prop(noise, directory / NOISE_PROP_FILE)
    return directory
