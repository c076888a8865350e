"""Mean-field propagation through the whole network: the collapse regime's fc SNR and top-1.

The linear route (:mod:`.network`) propagates each layer's error to the logits through the float network's
Jacobians. Far from the float network that fails: noise rectified by every ReLU turns silent units on, the
features of all images drift toward one common vector and the image-specific signal shrinks (measured on the
default model, collapse-w4-prog5%: the logit error regressed on the clean logits has a slope of -0.59 and a
common mean; the linear route then says top-1 88 % where the Monte Carlo measures 80 %).

Here every activation of every probe image is carried as a Gaussian ``N(μ, v)`` per element through the
network's own graph (``torch.fx``), deterministically:

* an analog layer: ``μ' = (1 + a_c)·(W_eff * μ) + b + m_c``, ``v' = (1 + a_c)²·(W_eff² * v) + v_c``, with the
  engine's per-channel gain ``a_c`` and offset ``m_c`` (:mod:`.coherent`), ``v_c`` the rest of its expected
  squared error, and ``W_eff`` the quantized weights (weight rounding is one fixed draw, applied exactly); read
  noise is not spread evenly but follows each output's input patch, ``coef_c·Σ_k Var(δ_ck)·E[x_k²]``
  (:class:`PatchVariance`);
* an ADC's clipping at the noisy network's operating point: ``a_c`` and ``m_c`` were probed on clean inputs. Where
  the layer's perturbation has an ``operating_point``, the clean network is carried alongside, the layer's input
  means are fitted per input channel as ``α·x_clean + β`` where the clean input is not 0, and the noisy input's
  mean and spread are taken apart where it is (:func:`operating_point`, over the first
  :data:`OPERATING_POINT_IMAGES` images); the clipping part of the ADC gain, offset and curvature (below) is
  re-evaluated there (:func:`cimstat.engine.layer.adc_clipping_shift`);
* the ADC error's part that is nonlinear in the layer's output (clipping beyond the linear gain): a per-channel
  cubic ``h_c(W_eff μ)`` fitted on the probed input sample (:class:`cimstat.engine.sampled_adc.ChannelCubic`), added
  to the mean, its energy taken out of ``v_c``. Max pooling picks the largest outputs, where that error sits: with
  the linear gain alone the error after conv1's max pooling was 0.070 of the signal against the Monte Carlo's
  0.107 (thermal4-adc6), with the cubic 0.108;
* ReLU: the rectified-Gaussian moments ``E[max(0, X)] = μΦ(μ/σ) + σφ(μ/σ)``,
  ``E[max(0, X)²] = (μ² + v)Φ(μ/σ) + μσφ(μ/σ)``: the drift and the shrinkage;
* max pooling: Clark's moments of the maximum of independent Gaussians, folded over the window;
* residual additions, average pooling and the classifier: means add linearly, variances as for independent
  elements.

The logits come out as ``N(μ_n, v_n)`` per image ``n``: ``fc SNR = Σ z² / Σ ((μ - z)² + v)`` against the clean
logits ``z``, top-1 by the quadrature of :mod:`cimstat.accuracy` with per-image means and variances.

Assumptions: elements independent (the variance of a sum is the sum of the variances); errors Gaussian at every
ReLU. Errors fixed on a chip but random between chips (programming error) are correlated across the positions of
a feature map. Their variance is carried apart (``fixed_variance``) and taken as fully correlated over a kernel's
taps and a pooling window (:data:`FIXED_ERROR_CORRELATION`): collapse-w4-prog5% went from 84.1 % to 80.7 (the
Monte Carlo: 79.9), prog5%-state-indep-w4slices from 95.2 to 94.1 (90.7). The route's top-1 is over the probe images and the Monte Carlo's over
other images: at 40-90 % accuracy the two samples alone differ by a few points (thermal4-adc6: 42.1 % on the
1,000 probe images, 43.2 % on the Monte Carlo's 1,000 validation images, which measure 44.9 ± 1.6).
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Callable, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cimstat.errors import EstimationError

__all__ = ["LayerPerturbation", "PatchVariance", "MeanFieldNetwork", "relu_moments", "rectified_gaussian_for", "operating_point", "MEANFIELD_IMAGES", "MEANFIELD_INPUT_ELEMENTS",
           "OPERATING_POINT_IMAGES"]

MEANFIELD_IMAGES = 1000
"""Probe images the mean-field route runs over (at most; all the probe set has if fewer: the default probe split
is 1,000). Top-1 in the collapse regime is an average over images, and image samples of a few hundred differ by
several points (the binomial error of 500 images at 50 % is 2.2 pp; measured on the default model, thermal4-adc6:
the route says 40.4 % on the first 500 probe images, 41.9 % on all 1,000 and 43.2 % on the Monte Carlo's 1,000
validation images). ``Engine(meanfield_images=)`` to change."""

MEANFIELD_INPUT_ELEMENTS = 1000 * 3 * 64 * 64
"""Most input elements the route runs over: 1,000 default-model images (3x64x64), 80 at 3x224x224 (ImageNet), whose
forward passes cost about 12x as much each."""

FIXED_ERROR_CORRELATION = 1.0
"""Correlation taken between the errors fixed on a chip (``LayerPerturbation.fixed_variance``) at the taps of a
kernel and the positions an average pooling averages."""

OPERATING_POINT_IMAGES = 250
"""Images (the first of the route's) on which each layer's operating point is fitted (:func:`operating_point`):
a per-channel regression over images and positions, settled well before 250 images."""

_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


@dataclass(frozen=True)
class LayerPerturbation:
    """What one analog layer does to its output, per output channel (output units)."""

    gain: np.ndarray       #: (C_out,) relative gain a_c on ``W_eff x``
    offset: np.ndarray     #: (C_out,) offset m_c
    variance: np.ndarray   #: (C_out,) variance v_c added per output element (output units²)
    weight: np.ndarray | None = None  #: (C_out, K) the weights the layer computes with, or None: the float ones
    #: or None: ``(α, β, sd, m0, s0) -> (Δgain, Δoffset)`` (C_out,) each, the change of the gain and offset when
    #: the layer's input sits at the noisy network's operating point, given per input channel (:func:`operating_point`)
    #: the regression ``E[x_noisy] ≈ α·x_clean + β`` over the images and positions where the clean input is not 0,
    #: ``sd`` the root mean of the noisy input's variance there, and ``m0``, ``s0`` the noisy input's mean and
    #: standard deviation where the clean input is 0 (e.g. :func:`cimstat.engine.layer.adc_clipping_shift`)
    operating_point: Callable[..., tuple] | None = None
    #: the deterministic error's part nonlinear in ``y = W_eff x`` (output units; terms added), each a callable
    #: ``h(y)`` per element of the mean (e.g. :class:`.sampled_adc.ChannelCubic`); its energy is not in
    #: ``variance``. ``operating_point`` may return further terms as a third element
    curvature: tuple = ()
    #: (C_out,) or None: the part of ``variance`` from errors fixed on a chip (programming error: one draw of the
    #: weights serves every position and image), carried apart as correlated across a feature map's positions
    fixed_variance: np.ndarray | None = None
    #: device noise whose variance follows each output's input patch (:class:`PatchVariance`), added to ``variance``
    #: (which holds the rest, spread evenly over the elements)
    patch_variance: tuple = ()


@dataclass(frozen=True)
class PatchVariance:
    """An error variance that follows the energy of each output's input patch, as device noise does: a device
    deviation ``δ_ck`` adds ``Σ_k Var(δ_ck)·x_k²`` to output ``c``, nothing where the inputs are 0.

    Per element: ``v_c(p) = coef_c · Σ_k kernel_ck·E[x_k²](p)``, ``E[x²] = μ² + v`` of the layer's input there. With
    ``coef_c = variance_c / Σ_k kernel_ck·E_clean[x_k²]`` its mean over the clean probe inputs is the engine's
    ``variance_c``; on the noisy network's inputs it grows with their energy. Spread evenly instead, the noise of
    the background (zero patches) is rectified by the next ReLU, and where it belongs (active patches) too little
    is (u8-read8-si, 8 % state-independent read noise: top-1 33.9 % evenly, 24.4 shaped, the Monte Carlo on 1,000
    images 26.6 ± 1.4 %). Programming error stays even (:data:`FIXED_ERROR_CORRELATION` was set with it)."""

    coef: np.ndarray       #: (C_out,) variance per unit of ``Σ_k kernel_ck·E[x_k²]``
    kernel: np.ndarray     #: (C_out, K) per-weight variance of the deviation (any common unit; ``coef`` absorbs it)


def relu_moments(mean: torch.Tensor, var: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and variance of ``max(0, X)`` for ``X ~ N(mean, var)`` elementwise (``var = 0``: the plain ReLU, as
    ``z = ±inf`` makes Φ a step and φ zero): ``E = μΦ(z) + σφ(z)``, ``E[·²] = (μ² + v)Φ(z) + μσφ(z)``, ``z = μ/σ``."""
    sd = var.clamp_min(0).sqrt_().clamp_min_(1e-30)
    z = mean / sd
    cdf = torch.special.ndtr(z)
    sd_pdf = sd.mul_(z.square_().mul_(-0.5).exp_().mul_(_INV_SQRT_2PI))   # σφ(z), in sd's storage (z's reused)
    m1 = torch.addcmul(sd_pdf, mean, cdf)
    m2 = torch.mul(mean, mean, out=z).add_(var).mul_(cdf).addcmul_(mean, sd_pdf)
    return m1, m2.sub_(m1.square()).clamp_min_(0)


@lru_cache(maxsize=1)
def _rectified_grid() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``t`` in [-4, 8], ``E[max(0, t + ξ)]`` and ``E²/E[x²]`` there (:func:`relu_moments` at unit variance)."""
    t = torch.linspace(-4.0, 8.0, 3001, dtype=torch.float64)
    first, var = relu_moments(t, torch.ones_like(t))
    return t.numpy(), first.numpy(), (first.square() / (var + first.square())).numpy()


def rectified_gaussian_for(mean: np.ndarray, sd: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(μ, σ)`` of the Gaussian whose rectification ``max(0, μ + σ·ξ)`` has the given mean and standard deviation
    (elementwise; both ≥ 0): the inverse of :func:`relu_moments`. With ``t = μ/σ``, ``E²/E[x²]`` rises from 0 to 1
    with ``t`` and is inverted on a grid of ``t`` in [-4, 8], then ``σ = mean / E[max(0, t + ξ)]``. Above ``t = 8``
    (``sd < mean/8``, ``sd = 0`` included) the rectification is negligible: ``μ = mean, σ = sd``. Below ``t = -4``
    (``sd/mean`` above ~240) the mean is kept with the spread of ``t = -4``."""
    t, first, ratio = _rectified_grid()
    mean, sd = np.maximum(mean, 0.0), np.maximum(sd, 0.0)
    second = mean * mean + sd * sd
    q = np.divide(mean * mean, second, out=np.ones_like(second), where=second > 0)
    plain = q >= ratio[-1]
    tt = np.interp(q, ratio, t)
    sigma = np.where(plain, sd, mean / np.interp(tt, t, first))
    return np.where(plain, mean, tt * sigma), sigma


def _pair(v) -> tuple[int, int]:
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


_PADDING_MEAN = -1e15
"""The mean max pooling pads with: never the maximum (``α`` is ±inf or 0 against it, so its weight ``Φ(-α)`` is
exactly 0 in float32), and its square (1e30) is finite in float32."""


def _clark_max(m1: torch.Tensor, v1: torch.Tensor, m2: torch.Tensor, v2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and variance of ``max(X1, X2)`` for independent ``X_i ~ N(m_i, v_i)`` (Clark 1961):
    ``a = sqrt(v1 + v2)``, ``α = (m1 - m2)/a``, ``E = m1Φ(α) + m2Φ(-α) + aφ(α)``,
    ``E[·²] = (m1² + v1)Φ(α) + (m2² + v2)Φ(-α) + (m1 + m2)aφ(α)``. ``a = 0`` (both exact) gives ``α = ±inf`` or 0:
    the larger mean, or either. Means of :data:`_PADDING_MEAN` (padding) drop out exactly."""
    a = (v1 + v2).clamp_min_(0).sqrt_()
    alpha = (m1 - m2).div_(a.clamp_min(1e-30))
    cdf = torch.special.ndtr(alpha)
    a_pdf = a.mul_(alpha.square_().mul_(-0.5).exp_()).mul_(_INV_SQRT_2PI)   # aφ(α), in a's storage
    cdf_neg = 1.0 - cdf
    e1 = torch.addcmul(a_pdf, m1, cdf).addcmul_(m2, cdf_neg)
    e2 = (m1.square() + v1).mul_(cdf).addcmul_(m2.square() + v2, cdf_neg).addcmul_(m1 + m2, a_pdf)
    return e1, e2.sub_(e1.square()).clamp_min_(0)


def _max_pool_moments(mean: torch.Tensor, var: torch.Tensor, pool: nn.MaxPool2d) -> tuple[torch.Tensor, torch.Tensor]:
    """Max pooling of independent Gaussians: Clark's pairwise moments folded over the window's elements in order
    (:func:`_clark_max`), the padding at :data:`_PADDING_MEAN`; each window element is a strided view of the
    padded input (no copies of the windows). It keeps the noise's upward bias of the maximum, which the window's
    element of largest mean leaves out (0.4-0.5 in the test windows of variance up to 0.5; on thermal4-adc6 alone
    it moved top-1 by 0.6 pp and the fc SNR by 0.15 dB)."""
    k, s, p, d = (_pair(pool.kernel_size), _pair(pool.stride or pool.kernel_size), _pair(pool.padding),
                  _pair(pool.dilation))
    out_hw = F.max_pool2d(mean[:1, :1], k, s, p, d, pool.ceil_mode).shape[-2:]
    span = [dd * (kk - 1) + 1 for dd, kk in zip(d, k)]
    need = [(o - 1) * st + sp for o, st, sp in zip(out_hw, s, span)]
    h, w = mean.shape[-2:]
    pad = (p[1], max(need[1] - w - p[1], 0), p[0], max(need[0] - h - p[0], 0))
    padded_mean, padded_var = F.pad(mean, pad, value=_PADDING_MEAN), F.pad(var, pad, value=0.0)
    m = v = None
    for i in range(k[0]):
        for j in range(k[1]):
            rows = slice(i * d[0], i * d[0] + (out_hw[0] - 1) * s[0] + 1, s[0])
            cols = slice(j * d[1], j * d[1] + (out_hw[1] - 1) * s[1] + 1, s[1])
            mi, vi = padded_mean[:, :, rows, cols], padded_var[:, :, rows, cols]
            m, v = (mi, vi) if m is None else _clark_max(m, v, mi, vi)
    return m.contiguous(), v.contiguous()


def _ratio(part: torch.Tensor, whole: torch.Tensor) -> torch.Tensor:
    return torch.where(whole > 0, part / whole.clamp_min(1e-30), torch.zeros_like(whole)).clamp_(0, 1)


def _share(part: torch.Tensor | None, whole: torch.Tensor, after: torch.Tensor) -> torch.Tensor | None:
    """The fixed part of a variance through an elementwise operation: the same share of the variance after it."""
    return None if part is None else after * _ratio(part, whole)


def _channel_shape(t: torch.Tensor) -> tuple[int, ...]:
    return (1, -1) + (1,) * (t.dim() - 2)


def operating_point(clean: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> tuple[np.ndarray, ...]:
    """Per channel (dimension 1) over images and positions, the noisy network's input against the clean one,
    apart where the clean input is 0 (silent: a ReLU's dead outputs, whose noisy values are one-sided) and where it
    is not (active): ``(α, β, sd, m0, s0)``.

    - active: the least-squares fit ``mean ≈ α·clean + β`` and ``sd = sqrt(mean of var)`` (``α = 0`` on a channel
      whose clean input is constant; all three 0 on a channel that is 0 everywhere);
    - silent: ``m0`` the mean of ``mean`` and ``s0² = mean(mean² + var) − m0²`` (the spread of the elements' means
      included; both 0 on a channel without a silent element)."""
    dims = [0] + list(range(2, clean.dim()))
    x, m, v = clean.double(), mean.double(), var.double().clamp_min(0)
    silent = x == 0
    shape = _channel_shape(x)
    w = (~silent).double()
    n = w.sum(dims).clamp_min(1)
    ex, em = (w * x).sum(dims) / n, (w * m).sum(dims) / n
    xc = (x - ex.reshape(shape)) * w
    vx = xc.square().sum(dims) / n
    cxm = (xc * m).sum(dims) / n
    alpha = torch.where(vx > 0, cxm / vx.clamp_min(1e-300), torch.zeros_like(vx))
    beta = em - alpha * ex
    sd = ((w * v).sum(dims) / n).sqrt()
    s = silent.double()
    n0 = s.sum(dims).clamp_min(1)               # an empty set's sums are 0: its mean and spread come out 0
    m0 = (s * m).sum(dims) / n0
    s0 = ((s * (m * m + v)).sum(dims) / n0 - m0 * m0).clamp_min(0).sqrt()
    return alpha.numpy(), beta.numpy(), sd.numpy(), m0.numpy(), s0.numpy()


class MeanFieldNetwork:
    """A folded network (``torch.fx.GraphModule``) and probe images, ready to carry Gaussians to the logits.

    ``analog``: the names of its analog layers (``call_module`` targets that a :class:`LayerPerturbation` may
    name). Every node is checked here: an operation the route cannot carry raises :class:`EstimationError`."""

    _PASS_METHODS = ("flatten", "view", "reshape", "contiguous")

    def __init__(self, graph_module: torch.fx.GraphModule, images: torch.Tensor, batch_size: int = 250,
                 fit_images: int | None = None):
        if not isinstance(graph_module, torch.fx.GraphModule):
            raise EstimationError("mean-field route: the folded model is not a torch.fx graph (it could not be traced)")
        self.gm = graph_module.eval()
        self.images = images.to(torch.float32)
        self.batch_size = int(batch_size)
        #: images the operating points are fitted on (the first ones; :data:`OPERATING_POINT_IMAGES`)
        self.fit_images = OPERATING_POINT_IMAGES if fit_images is None else int(fit_images)
        self.modules = dict(self.gm.named_modules())
        nodes = list(self.gm.graph.nodes)
        for node in nodes:
            self._check(node)
        # before node i runs, the values no node from i on reads are dropped (memory: one batch's live values)
        last = {}
        for i, node in enumerate(nodes):
            for a in node.all_input_nodes:
                last[a.name] = i
        self._last_inputs: list[list[str]] = [[] for _ in nodes]
        for name, i in last.items():
            if i + 1 < len(nodes):
                self._last_inputs[i + 1].append(name)

    def _check(self, node: torch.fx.Node) -> None:
        ok = node.op in ("placeholder", "output", "get_attr")
        if node.op == "call_module":
            ok = isinstance(self.modules[node.target], (nn.Conv2d, nn.Linear, nn.ReLU, nn.MaxPool2d,
                                                         nn.AdaptiveAvgPool2d, nn.AvgPool2d, nn.Identity,
                                                         nn.Flatten, nn.Dropout))
        elif node.op == "call_function":
            ok = node.target in (operator.add, torch.add, torch.flatten, F.relu, torch.relu)
        elif node.op == "call_method":
            ok = node.target in self._PASS_METHODS + ("relu",)
        if not ok:
            what = type(self.modules[node.target]).__name__ if node.op == "call_module" else str(node.target)
            raise EstimationError(f"mean-field route: cannot carry Gaussians through {node.op} {what} "
                                  f"(node {node.name}); supported: conv, linear, ReLU, max/average pooling, "
                                  "residual addition, flatten")

    def _layer(self, mod: nn.Module, mean: torch.Tensor, var: torch.Tensor, pert: LayerPerturbation | None,
               clean: torch.Tensor | None = None, fitted: dict | None = None, fixed: torch.Tensor | None = None):
        weight = mod.weight
        if pert is not None and pert.weight is not None:
            weight = torch.from_numpy(np.array(pert.weight, dtype=np.float32)).reshape(weight.shape)
        if isinstance(mod, nn.Conv2d):
            def op(x, w):
                return F.conv2d(x, w, None, mod.stride, mod.padding, mod.dilation, mod.groups)
        else:
            def op(x, w):
                return F.linear(x, w)
        w2 = weight * weight
        y = op(mean, weight)
        vf = None
        if fixed is None:
            v = op(var, w2)
        else:  # fixed errors: correlated over the kernel's taps (FIXED_ERROR_CORRELATION)
            v = op(var - fixed, w2)
            vf = op(fixed, w2)
            if isinstance(mod, nn.Conv2d) and FIXED_ERROR_CORRELATION > 0:
                taps = math.prod(weight.shape[2:])
                summed = weight.sum(dim=tuple(range(2, weight.dim())), keepdim=True).square() / taps
                vf = (1 - FIXED_ERROR_CORRELATION) * vf + FIXED_ERROR_CORRELATION * op(fixed, summed.expand_as(weight))
            v = v + vf
        shape = _channel_shape(y)
        if pert is not None:
            gain, offset, curves = pert.gain, pert.offset, tuple(pert.curvature)
            if pert.operating_point is not None and clean is not None:
                d_gain, d_offset, *more = pert.operating_point(*operating_point(clean, mean, var))
                if fitted is not None:
                    fitted[id(pert)] = (d_gain, d_offset, tuple(more[0]) if more else ())
                gain, offset = gain + d_gain, offset + d_offset
                curves = curves + (tuple(more[0]) if more else ())
            a = 1.0 + torch.as_tensor(gain, dtype=torch.float32).reshape(shape)
            bent = sum((h(y) for h in curves), torch.zeros_like(y)) if curves else 0.0
            y = a * y + torch.as_tensor(offset, dtype=torch.float32).reshape(shape) + bent
            v = a * a * v + torch.as_tensor(pert.variance, dtype=torch.float32).clamp_min(0).reshape(shape)
            if vf is not None:
                vf = a * a * vf
            if pert.fixed_variance is not None:
                own = torch.as_tensor(pert.fixed_variance, dtype=torch.float32).clamp_min(0).reshape(shape)
                vf = own if vf is None else vf + own
            if pert.patch_variance:
                energy = mean * mean + var
                for pv in pert.patch_variance:
                    kernel = torch.from_numpy(np.asarray(pv.kernel, dtype=np.float32)).reshape(weight.shape)
                    own = op(energy, kernel).mul_(torch.as_tensor(pv.coef, dtype=torch.float32).clamp_min(0).reshape(shape))
                    v = v + own
        if mod.bias is not None:
            y = y + mod.bias.reshape(shape)
        return y, v, vf

    def _run(self, x: torch.Tensor, perturbations: Mapping[str, LayerPerturbation], fitted: dict | None = None):
        """The logits' ``(mean, variance)`` for images ``x``; where a perturbation has an ``operating_point``,
        the clean network runs alongside and the shifts it gives are stored in ``fitted`` (by ``id`` of the
        perturbation) when given. Every value is dropped after its last use."""
        env: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        fx: dict[str, torch.Tensor | None] = {}  # the part of each variance from errors fixed on the chip, or None
        # the clean network's values alongside, where a layer's perturbation depends on its operating point
        clean: dict[str, torch.Tensor] | None = (
            {} if any(p.operating_point is not None for p in perturbations.values()) else None)

        def arg(a):
            return env[a.name] if isinstance(a, torch.fx.Node) else a

        def clean_arg(a):
            return clean[a.name] if isinstance(a, torch.fx.Node) else a
        for index, node in enumerate(self.gm.graph.nodes):
            for done in self._last_inputs[index]:
                env.pop(done, None)
                fx.pop(done, None)
                if clean is not None:
                    clean.pop(done, None)
            if clean is not None and node.op in ("call_module", "call_function", "call_method"):
                args = torch.fx.node.map_arg(node.args, clean_arg)
                kwargs = {k: v for k, v in torch.fx.node.map_arg(node.kwargs, clean_arg).items() if k != "inplace"}
                mod = self.modules.get(node.target) if node.op == "call_module" else None
                if (isinstance(mod, nn.ReLU) or (node.op == "call_function" and node.target in (F.relu, torch.relu))
                        or (node.op == "call_method" and node.target == "relu")):
                    clean[node.name] = torch.relu(args[0])   # not in place: its input may have other users
                elif node.op == "call_module":
                    clean[node.name] = mod(*args, **kwargs)
                elif node.op == "call_function":
                    clean[node.name] = node.target(*args, **kwargs)
                else:
                    clean[node.name] = getattr(args[0], node.target)(*args[1:], **kwargs)
            elif clean is not None and node.op == "placeholder":
                clean[node.name] = x
            if node.op == "placeholder":
                env[node.name] = (x, torch.zeros_like(x))
                fx[node.name] = None
            elif node.op == "output":
                return env[node.args[0].name]
            elif node.op == "get_attr":
                raise EstimationError(f"mean-field route: constant tensor {node.target} in the graph")
            elif node.op == "call_module":
                mod = self.modules[node.target]
                m, v = env[node.args[0].name]
                vf = fx.get(node.args[0].name)
                if isinstance(mod, (nn.Conv2d, nn.Linear)):
                    y, v2, vf2 = self._layer(mod, m, v, perturbations.get(node.target),
                                             None if clean is None else clean[node.args[0].name], fitted, vf)
                    env[node.name], fx[node.name] = (y, v2), vf2
                elif isinstance(mod, nn.ReLU):
                    env[node.name] = relu_moments(m, v)
                    fx[node.name] = _share(vf, v, env[node.name][1])
                elif isinstance(mod, nn.MaxPool2d):
                    env[node.name] = _max_pool_moments(m, v, mod)
                    fx[node.name] = None if vf is None else env[node.name][1] * F.max_pool2d(
                        _ratio(vf, v), mod.kernel_size, mod.stride, mod.padding, mod.dilation, mod.ceil_mode)
                elif isinstance(mod, (nn.AdaptiveAvgPool2d, nn.AvgPool2d)):
                    out = mod(m)
                    # a mean of n independent elements: variance / n (n: elements per output, on average); the
                    # fixed errors' part correlated over the positions (FIXED_ERROR_CORRELATION)
                    k = mod.kernel_size if isinstance(mod, nn.AvgPool2d) else None
                    window = (math.prod((k, k) if isinstance(k, int) else k) if k is not None
                              else m[0, 0].numel() / out[0, 0].numel())
                    if vf is None:
                        env[node.name] = (out, mod(v) / window)
                        fx[node.name] = None
                    else:
                        pooled_f = mod(vf) * (FIXED_ERROR_CORRELATION + (1 - FIXED_ERROR_CORRELATION) / window)
                        env[node.name] = (out, mod(v - vf) / window + pooled_f)
                        fx[node.name] = pooled_f
                elif isinstance(mod, nn.Flatten):
                    env[node.name] = (mod(m), mod(v))
                    fx[node.name] = None if vf is None else mod(vf)
                else:  # Identity, Dropout (eval)
                    env[node.name] = (m, v)
                    fx[node.name] = vf
            elif node.op == "call_function":
                if node.target in (operator.add, torch.add):
                    (m1, v1), (m2, v2) = arg(node.args[0]), arg(node.args[1])
                    env[node.name] = (m1 + m2, v1 + v2)
                    f1, f2 = (fx.get(a.name) if isinstance(a, torch.fx.Node) else None for a in node.args[:2])
                    fx[node.name] = f1 if f2 is None else (f2 if f1 is None else f1 + f2)
                elif node.target is torch.flatten:
                    m, v = env[node.args[0].name]
                    vf = fx.get(node.args[0].name)
                    env[node.name] = (torch.flatten(m, *node.args[1:]), torch.flatten(v, *node.args[1:]))
                    fx[node.name] = None if vf is None else torch.flatten(vf, *node.args[1:])
                else:  # relu
                    m, v = env[node.args[0].name]
                    env[node.name] = relu_moments(m, v)
                    fx[node.name] = _share(fx.get(node.args[0].name), v, env[node.name][1])
            else:  # call_method
                m, v = env[node.args[0].name]
                vf = fx.get(node.args[0].name)
                if node.target == "relu":
                    env[node.name] = relu_moments(m, v)
                    fx[node.name] = _share(vf, v, env[node.name][1])
                else:
                    env[node.name] = (getattr(m, node.target)(*node.args[1:]), getattr(v, node.target)(*node.args[1:]))
                    fx[node.name] = None if vf is None else getattr(vf, node.target)(*node.args[1:])
        raise EstimationError("mean-field route: the graph has no output")

    def moments(self, perturbations: Mapping[str, LayerPerturbation]) -> tuple[np.ndarray, np.ndarray]:
        """``(mean, variance)`` of the logits, ``(N, n_classes)`` float64 each, over the probe images.

        Operating points (:attr:`LayerPerturbation.operating_point`) are fitted on the first
        :data:`OPERATING_POINT_IMAGES` images (one batch, the clean network alongside); the other images run in
        batches with the shifts found there."""
        means, variances = [], []
        start = 0
        with torch.no_grad():
            if any(p.operating_point is not None for p in perturbations.values()):
                fitted: dict[int, tuple] = {}
                start = min(len(self.images), max(self.fit_images, 1))
                m, v = self._run(self.images[:start], perturbations, fitted)
                means.append(m.double())
                variances.append(v.double())
                perturbations = {
                    name: (p if id(p) not in fitted else
                           replace(p, gain=p.gain + fitted[id(p)][0], offset=p.offset + fitted[id(p)][1],
                                   curvature=tuple(p.curvature) + fitted[id(p)][2], operating_point=None))
                    for name, p in perturbations.items()}
            for i in range(start, len(self.images), max(self.batch_size, 1)):
                m, v = self._run(self.images[i:i + self.batch_size], perturbations)
                means.append(m.double())
                variances.append(v.double())
        return torch.cat(means).numpy(), torch.cat(variances).numpy()
