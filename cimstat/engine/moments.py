"""The second-moment matrix ``M = E[x x^T]`` of a layer's input patches, as a factor.

``M ≈ F F^T + diag(D)`` (``F (K, r)``): the probe's own ``eig+diag`` compression is used as
stored; a dense ``M`` is factored exactly (``r = K``) when small and compressed to its top
``r`` eigenpairs plus the exact residual diagonal when large. Quadratic forms over the whole
dot product or per row tile then cost ``O(N·K·r)``.

Speed: the factorisation of a dense ``M`` is config independent; it is kept on disk
(``<repo>/.cache/engine_moments``, keyed by a hash of ``M`` and the row moments, written
atomically) so a new process does not redo the eigendecomposition. The projections of a
:meth:`SecondMoment.pin`-ned array (the layer's float weights, used by every coherent split)
are computed once for good.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from pathlib import Path

import numpy as np

__all__ = ["SecondMoment", "MAX_EXACT_K", "DEFAULT_RANK"]

MAX_EXACT_K = 640     #: dense M up to this K is factored without loss
DEFAULT_RANK = 96     #: eigenpairs kept when a large dense M is compressed
_CACHE_VERSION = b"moments-v1"


def _cache_dir() -> Path | None:
    env = os.environ.get("CIMSTAT_MOMENT_CACHE")
    if env is not None:
        return Path(env) if env else None  # empty: no disk cache
    from cimstat.probes import repo_root

    return repo_root() / ".cache" / "engine_moments"


def _dense_factor(m32: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """``(F, D)`` of a dense ``M`` (see the module doc): eigendecomposition, cached on disk."""
    m = np.asarray(m32, dtype=np.float64)
    k = m.shape[0]
    exact = k <= MAX_EXACT_K or rank >= k
    folder = _cache_dir()
    path = None
    if folder is not None:
        h = hashlib.blake2b(_CACHE_VERSION, digest_size=20)
        h.update(str((m32.dtype.str, m32.shape, int(rank), bool(exact), MAX_EXACT_K)).encode())
        h.update(np.ascontiguousarray(m32).tobytes())
        path = folder / f"{h.hexdigest()}.npz"
        try:
            with np.load(path) as z:
                f, d = z["factor"], z["diag"]
            if f.shape[0] == k and d.shape == (k,):
                return f, d
        except (OSError, KeyError, ValueError, EOFError):
            pass
    m = (m + m.T) / 2
    vals, vecs = np.linalg.eigh(m)
    vals = np.maximum(vals, 0.0)
    if exact:
        f, d = vecs * np.sqrt(vals), np.zeros(k)
    else:
        top = np.argsort(vals)[::-1][:rank]
        f = vecs[:, top] * np.sqrt(vals[top])
        d = np.maximum(np.diag(m) - (f * f).sum(1), 0.0)
    if path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
            try:
                with os.fdopen(fd, "wb") as fh:
                    np.savez(fh, factor=f, diag=d)
                os.replace(tmp, path)  # atomic: readers see the old file or the whole new one
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
        except OSError:
            pass  # a read-only checkout: compute every time
    return f, d


class SecondMoment:
    """``E[x x^T] ≈ F F^T + diag(D)`` and the row means ``μ`` of one layer's input patches."""

    def __init__(self, factor: np.ndarray, diag: np.ndarray, mean: np.ndarray, sq_mean: np.ndarray):
        self.factor = np.asarray(factor, dtype=np.float64)   #: (K, r)
        self.diag = np.asarray(diag, dtype=np.float64)       #: (K,) >= 0
        self.mean = np.asarray(mean, dtype=np.float64)       #: (K,) E[x_k]
        self.sq_mean = np.asarray(sq_mean, dtype=np.float64)  #: (K,) E[x_k²]
        self.var = np.maximum(self.sq_mean - self.mean ** 2, 0.0)
        self._has_diag = bool(np.any(self.diag))
        self._pinned: list[tuple[np.ndarray, dict]] = []   # (array, {"proj", "quad", "mean"})

    @classmethod
    def from_layer_stats(cls, stats, rank: int = DEFAULT_RANK) -> "SecondMoment":
        """From :class:`cimstat.probes.LayerStats` (dense or ``eig+diag``)."""
        if stats.m_method == "dense":
            f, d = _dense_factor(np.asarray(stats.m_dense), rank)
            return cls(f, d, stats.row_mean, stats.row_sq_mean)
        v = np.asarray(stats.m_eigvecs, dtype=np.float64)
        lam = np.maximum(np.asarray(stats.m_eigvals, dtype=np.float64), 0.0)
        return cls(v * np.sqrt(lam), stats.m_resid_diag, stats.row_mean, stats.row_sq_mean)

    @property
    def fan_in(self) -> int:
        return int(self.diag.shape[0])

    # ---- memoised pieces ------------------------------------------------------------
    def pin(self, v: np.ndarray) -> None:
        """Keep the projections of ``v`` for good (``v`` must never be modified in place)."""
        if not any(a is v for a, _ in self._pinned):
            self._pinned.append((v, {}))

    def _memo(self, v: np.ndarray, key: str, compute):
        """``compute()``, kept under ``key`` when ``v`` is a pinned array."""
        slot = next((d for a, d in self._pinned if a is v), None)
        if slot is None:
            return compute()
        if key not in slot:
            slot[key] = compute()
        return slot[key]

    def project(self, v: np.ndarray) -> np.ndarray:
        """``v F``."""
        return self._memo(v, "proj", lambda: v @ self.factor)

    def pinned_mean(self, v: np.ndarray) -> np.ndarray:
        """``v·μ`` (kept when ``v`` is pinned)."""
        return self._memo(v, "mean", lambda: v @ self.mean)

    def _diag_term(self, u: np.ndarray, v: np.ndarray) -> np.ndarray | float:
        return (u * v) @ self.diag if self._has_diag else 0.0

    # ---- forms --------------------------------------------------------------------
    def quad_form(self, v: np.ndarray) -> np.ndarray:
        """``E[(v_c · x)²]`` for ``v (..., K)`` -> ``(...)``."""
        def compute():
            proj = self.project(v)
            return (proj * proj).sum(-1) + self._diag_term(v, v)
        return self._memo(v, "quad", compute)

    def low_rank_form_single(self, v: np.ndarray) -> np.ndarray:
        """The low-rank part of :meth:`quad_form`, ``Σ_r ((v F)_r)²``, of an unpinned ``v`` with the projection in
        float32 (squares summed in float64): about 2x faster, relative error ~1e-7 — for config-dependent error
        vectors, whose energies matter to far fewer digits. The caller adds ``Σ_k v_k² D_k`` (its only caller has it
        from a per-code histogram)."""
        if not hasattr(self, "_factor32"):
            self._factor32 = self.factor.astype(np.float32)
        proj = np.asarray(v, dtype=np.float32) @ self._factor32
        return np.einsum("...r,...r->...", proj, proj, dtype=np.float64)

    def cross_form(self, u: np.ndarray, v: np.ndarray) -> np.ndarray:
        """``E[(u_c · x)(v_c · x)]`` row by row for ``u, v (..., K)`` -> ``(...)``."""
        return (self.project(u) * self.project(v)).sum(-1) + self._diag_term(u, v)

    def affine_quad_form(self, v: np.ndarray, const: np.ndarray | float) -> np.ndarray:
        """``E[(v · x + const)²] = vMv + 2·const·(v·μ) + const²``."""
        return self.quad_form(v) + 2 * const * self.pinned_mean(v) + np.square(const)

    def variance(self, v: np.ndarray) -> np.ndarray:
        """``Var(v · x)``."""
        return np.maximum(self.quad_form(v) - self.pinned_mean(v) ** 2, 0.0)

    def tile_variance(self, v: np.ndarray, n_rows: int) -> np.ndarray:
        """``Var(Σ_{k in tile t} v_k x_k)`` for every tile of ``n_rows`` rows: ``v (N, K)`` -> ``(N, T)``."""
        n, k = v.shape
        t = -(-k // n_rows)
        pad = t * n_rows - k
        vp = np.pad(v, ((0, 0), (0, pad))).reshape(n, t, n_rows)
        fp = np.pad(self.factor, ((0, pad), (0, 0))).reshape(t, n_rows, -1)
        proj = np.einsum("ntk,tkr->ntr", vp, fp, optimize=True)
        quad = (proj * proj).sum(-1)
        if self._has_diag:
            diag = np.pad(self.diag, (0, pad)).reshape(t, n_rows)
            quad = quad + np.einsum("ntk,tk->nt", vp * vp, diag)
        mean = np.einsum("ntk,tk->nt", vp, np.pad(self.mean, (0, pad)).reshape(t, n_rows))
        return np.maximum(quad - mean ** 2, 0.0)
