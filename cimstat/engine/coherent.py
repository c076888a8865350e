"""Deterministic layer errors split into a per-channel gain, a per-channel offset and the rest.

Some errors are fixed linear functions of the layer input, the same for every image and
position: the clipping bias of off devices (``E[max(0, g + e)] > g``), the part of input
rounding/clipping error that regresses on ``x``, weight rounding, ADC mean errors. Written as
``e_c = v_c·x + k_c`` (``v (C_out, K)``, ``k (C_out,)``), least squares over the probed input
distribution splits each output channel into

``e_c = a_c·y_c + m_c + r_c``,  ``y_c = W_c·x`` (the float output without bias),
``a_c = Cov(v_c·x, y_c) / Var(y_c)``,  ``m_c = E[e_c] - a_c·E[y_c]``,

with ``r_c`` uncorrelated with ``y_c`` and of zero mean. The gain ``a`` and offset ``m`` are
propagated to the logits per image through ``gain_jac``/``offset_jac`` (:mod:`cimstat.noise_propagation`):
they add as amplitudes over layers and sources. The remainder ``r_c = (v_c - a_c W_c)·x - E[·]``
is left to the incoherent routes (per-weight sensitivities for fixed errors).

Why it matters (measured on the default model, state-independent read noise 1 %): the off-device
bias shrinks every layer's weights by a few percent; perturbing all layers at once moves the
logits 4x (6 dB) more in energy than the sum of the layers perturbed one at a time, and the
per-channel gain captures all but 1 % of it.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from .moments import SecondMoment

__all__ = ["CoherentSplit", "coherent_energy", "coherent_parts", "split_coherent"]


@dataclass(frozen=True)
class CoherentSplit:
    """One deterministic error ``e_c = v_c·x + k_c`` of a layer, split per output channel."""

    gain: np.ndarray       #: (C_out,) a_c, relative (dimensionless)
    offset: np.ndarray     #: (C_out,) m_c, output units
    coherent_sq: np.ndarray  #: (C_out,) E[(a_c y_c + m_c)²], output units²
    residual_sq: np.ndarray  #: (C_out,) E[r_c²] = Var((v_c - a_c W_c)·x), output units²
    residual: np.ndarray | None = None  #: (C_out, K) v - a W: the per-weight remainder (weight units)

    @property
    def energy(self) -> np.ndarray:
        """(C_out,) ``E[e_c²] = E[(a_c y_c + m_c)²] + E[r_c²]`` (the parts are uncorrelated)."""
        return self.coherent_sq + self.residual_sq


def coherent_energy(a: np.ndarray, m: np.ndarray, ey2: np.ndarray, ey: np.ndarray) -> np.ndarray:
    """``E[(a·y + m)²] = a²·E[y²] + 2am·E[y] + m²`` per channel."""
    return a * a * ey2 + 2 * a * m * ey + m * m


def coherent_parts(ey: np.ndarray, quad_w: np.ndarray, ev: np.ndarray, k: np.ndarray | float,
                   cross_vw: np.ndarray, quad_v: np.ndarray) -> CoherentSplit:
    """The split from the channel's moments alone (no per-weight remainder): ``ey = W·μ``,
    ``quad_w = E[(W·x)²]``, ``ev = v·μ``, ``cross_vw = E[(v·x)(W·x)]``, ``quad_v = E[(v·x)²]``;
    ``Var(r) = E[(v·x)²] - 2a·E[(v·x)(W·x)] + a²·E[(W·x)²] - (ev - a·ey)²``."""
    var_y = np.maximum(quad_w - ey * ey, 0.0)
    cov = cross_vw - ev * ey
    a = np.where(var_y > 0, cov / np.where(var_y > 0, var_y, 1.0), 0.0)
    m = ev + k - a * ey
    coherent_sq = coherent_energy(a, m, var_y + ey * ey, ey)
    var_r = quad_v - 2 * a * cross_vw + a * a * quad_w - (ev - a * ey) ** 2
    return CoherentSplit(gain=a, offset=m, coherent_sq=np.maximum(coherent_sq, 0.0),
                         residual_sq=np.maximum(var_r, 0.0))


def split_coherent(moment: SecondMoment, w: np.ndarray, v: np.ndarray,
                   k: np.ndarray | float = 0.0) -> CoherentSplit:
    """Split ``e_c = v_c·x + k_c`` against the layer's float weights ``w (C_out, K)`` (see module doc)."""
    mu = moment.mean
    sp = coherent_parts(moment.pinned_mean(w), moment.quad_form(w), v @ mu, k, moment.cross_form(v, w),
                        moment.quad_form(v))
    return dataclasses.replace(sp, residual=v - sp.gain[:, None] * w)
