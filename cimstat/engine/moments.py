"""The second-moment matrix ``M = E[x x^T]`` of a layer's input patches, as a factor.

``M ≈ F F^T + diag(D)`` (``F (K, r)``): the probe's own ``eig+diag`` compression is used as
stored; a dense ``M`` is factored exactly (``r = K``) when small and compressed to its top
``r`` eigenpairs plus the exact residual diagonal when large. Quadratic forms over the whole
dot product or per row tile then cost ``O(N·K·r)``.
"""
from __future__ import annotations

import numpy as np

__all__ = ["SecondMoment", "MAX_EXACT_K", "DEFAULT_RANK"]

MAX_EXACT_K = 640     #: dense M up to this K is factored without loss
DEFAULT_RANK = 96     #: eigenpairs kept when a large dense M is compressed


class SecondMoment:
    """``E[x x^T] ≈ F F^T + diag(D)`` and the row means ``μ`` of one layer's input patches."""

    def __init__(self, factor: np.ndarray, diag: np.ndarray, mean: np.ndarray, sq_mean: np.ndarray):
        self.factor = np.asarray(factor, dtype=np.float64)   #: (K, r)
        self.diag = np.asarray(diag, dtype=np.float64)       #: (K,) >= 0
        self.mean = np.asarray(mean, dtype=np.float64)       #: (K,) E[x_k]
        self.sq_mean = np.asarray(sq_mean, dtype=np.float64)  #: (K,) E[x_k²]
        self.var = np.maximum(self.sq_mean - self.mean ** 2, 0.0)

    @classmethod
    def from_layer_stats(cls, stats, rank: int = DEFAULT_RANK) -> "SecondMoment":
        """From :class:`cimstat.probes.LayerStats` (dense or ``eig+diag``)."""
        if stats.m_method == "dense":
            m = np.asarray(stats.m_dense, dtype=np.float64)
            m = (m + m.T) / 2
            k = m.shape[0]
            vals, vecs = np.linalg.eigh(m)
            vals = np.maximum(vals, 0.0)
            if k <= MAX_EXACT_K or rank >= k:
                return cls(vecs * np.sqrt(vals), np.zeros(k), stats.row_mean, stats.row_sq_mean)
            top = np.argsort(vals)[::-1][:rank]
            f = vecs[:, top] * np.sqrt(vals[top])
            resid = np.maximum(np.diag(m) - (f * f).sum(1), 0.0)
            return cls(f, resid, stats.row_mean, stats.row_sq_mean)
        v = np.asarray(stats.m_eigvecs, dtype=np.float64)
        lam = np.maximum(np.asarray(stats.m_eigvals, dtype=np.float64), 0.0)
        return cls(v * np.sqrt(lam), stats.m_resid_diag, stats.row_mean, stats.row_sq_mean)

    @property
    def fan_in(self) -> int:
        return int(self.diag.shape[0])

    def quad_form(self, v: np.ndarray) -> np.ndarray:
        """``E[(v_c · x)²]`` for ``v (..., K)`` -> ``(...)``."""
        proj = v @ self.factor
        return (proj * proj).sum(-1) + (v * v) @ self.diag

    def affine_quad_form(self, v: np.ndarray, const: np.ndarray | float) -> np.ndarray:
        """``E[(v · x + const)²] = vMv + 2·const·(v·μ) + const²``."""
        return self.quad_form(v) + 2 * const * (v @ self.mean) + np.square(const)

    def variance(self, v: np.ndarray) -> np.ndarray:
        """``Var(v · x)``."""
        return np.maximum(self.quad_form(v) - (v @ self.mean) ** 2, 0.0)

    def tile_variance(self, v: np.ndarray, n_rows: int) -> np.ndarray:
        """``Var(Σ_{k in tile t} v_k x_k)`` for every tile of ``n_rows`` rows: ``v (N, K)`` -> ``(N, T)``."""
        n, k = v.shape
        t = -(-k // n_rows)
        pad = t * n_rows - k
        vp = np.pad(v, ((0, 0), (0, pad))).reshape(n, t, n_rows)
        fp = np.pad(self.factor, ((0, pad), (0, 0))).reshape(t, n_rows, -1)
        proj = np.einsum("ntk,tkr->ntr", vp, fp, optimize=True)
        diag = np.pad(self.diag, (0, pad)).reshape(t, n_rows)
        quad = (proj * proj).sum(-1) + np.einsum("ntk,tk->nt", vp * vp, diag)
        mean = np.einsum("ntk,tk->nt", vp, np.pad(self.mean, (0, pad)).reshape(t, n_rows))
        return np.maximum(quad - mean ** 2, 0.0)
