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
  squared error, and ``W_eff`` the quantized weights (weight rounding is one fixed draw, applied exactly);
* an ADC's clipping at the noisy network's operating point: ``a_c`` and ``m_c`` were probed on clean inputs. Where
  the layer's perturbation has an ``operating_point``, the clean network is carried alongside, the layer's input
  means are fitted per input channel as ``α·x_clean + β`` (:func:`operating_point`, over all the images at once)
  and the clipping part of the ADC gain and offset is re-evaluated there
  (:func:`cimstat.engine.layer.adc_clipping_shift`);
* ReLU: the rectified-Gaussian moments ``E[max(0, X)] = μΦ(μ/σ) + σφ(μ/σ)``,
  ``E[max(0, X)²] = (μ² + v)Φ(μ/σ) + μσφ(μ/σ)``: the drift and the shrinkage;
* max pooling: the element of largest mean, with its variance;
* residual additions, average pooling and the classifier: means add linearly, variances as for independent
  elements.

The logits come out as ``N(μ_n, v_n)`` per image ``n``: ``fc SNR = Σ z² / Σ ((μ - z)² + v)`` against the clean
logits ``z``, top-1 by the quadrature of :mod:`cimstat.accuracy` with per-image means and variances.

Assumptions: elements independent (the variance of a sum is the sum of the variances); errors Gaussian at every
ReLU. Errors fixed on a chip but random between chips (programming error) are correlated across the positions of
a feature map, which independence underrates at pooling: on the validation sweep the programming-error collapse
configurations come out 4-5 pp optimistic (collapse-w4-prog5%: 83.7 % against the Monte Carlo's 79.9; 79.6 with no
variance shrinkage at the average pooling at all, the fully correlated bound). ADC thermal noise of 4 LSB
(thermal4-adc6) came out 25 pp pessimistic with the clean-input ADC gains (19.6 % against 44.8) and is 21 pp
optimistic with the clipping moved to the operating point (66.3 %): from layer1.0.conv1 on the route's end-to-end
SNR is ~1 dB above the Monte Carlo's (6.4 against 5.4 dB there), where its input's max pooling, taken as the
element of largest mean, leaves out the noise's upward bias of the maximum.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Callable, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cimstat.errors import EstimationError

__all__ = ["LayerPerturbation", "MeanFieldNetwork", "relu_moments", "operating_point", "MEANFIELD_IMAGES", "MEANFIELD_INPUT_ELEMENTS"]

MEANFIELD_IMAGES = 500
"""Probe images the mean-field route runs over (at most; all the probe set has if fewer). Top-1 in the collapse
regime varies by several points between image samples of a few hundred (weight_bits=3, where the route is exact:
61.4 % on 256 probe images, 67.0 % on 500 validation images; the binomial error of 500 images at 50 % is 2.2 pp);
500 images of the default model took 4.6 s on two cores (``Engine(meanfield_images=)`` to change)."""

MEANFIELD_INPUT_ELEMENTS = 500 * 3 * 64 * 64
"""Most input elements the route runs over: 500 default-model images (3x64x64), 40 at 3x224x224 (ImageNet), whose
forward passes cost about 12x as much each."""

_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


@dataclass(frozen=True)
class LayerPerturbation:
    """What one analog layer does to its output, per output channel (output units)."""

    gain: np.ndarray       #: (C_out,) relative gain a_c on ``W_eff x``
    offset: np.ndarray     #: (C_out,) offset m_c
    variance: np.ndarray   #: (C_out,) variance v_c added per output element (output units²)
    weight: np.ndarray | None = None  #: (C_out, K) the weights the layer computes with, or None: the float ones
    #: or None: ``(α, β, sd) -> (Δgain, Δoffset)`` (C_out,) each, the change of the gain and offset when the
    #: layer's input sits at the noisy network's operating point, given per input channel the regression
    #: ``E[x_noisy] ≈ α·x_clean + β`` over the images and positions and ``sd`` the root mean of the noisy input's
    #: variance (e.g. :func:`cimstat.engine.layer.adc_clipping_shift`)
    operating_point: Callable[[np.ndarray, np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]] | None = None


def relu_moments(mean: torch.Tensor, var: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and variance of ``max(0, X)`` for ``X ~ N(mean, var)`` elementwise (``var = 0``: the plain ReLU, as
    ``z = ±inf`` makes Φ a step and φ zero): ``E = μΦ(z) + σφ(z)``, ``E[·²] = (μ² + v)Φ(z) + μσφ(z)``, ``z = μ/σ``."""
    sd = var.clamp_min(0).sqrt().clamp_min_(1e-30)
    z = mean / sd
    cdf = torch.special.ndtr(z)
    sd_pdf = sd.mul_(torch.exp(z.square().mul_(-0.5)).mul_(_INV_SQRT_2PI))   # σφ(z), in sd's storage
    m1 = torch.addcmul(sd_pdf, mean, cdf)
    m2 = torch.addcmul(mean * sd_pdf, mean.square().add_(var), cdf)
    return m1, m2.sub_(m1.square()).clamp_min_(0)


def _max_pool_moments(mean: torch.Tensor, var: torch.Tensor, pool: nn.MaxPool2d) -> tuple[torch.Tensor, torch.Tensor]:
    """Max pooling of Gaussians, as the element of largest mean: the maximum's upward bias from the noise is left
    out (Clark's pairwise moments over the window, tried on the validation sweep's collapse configurations, moved
    top-1 by under 1.5 pp and took half the route's time)."""
    out, idx = F.max_pool2d(mean, pool.kernel_size, pool.stride, pool.padding, pool.dilation, pool.ceil_mode,
                            return_indices=True)
    return out, var.flatten(2).gather(2, idx.flatten(2)).reshape(out.shape)


def _channel_shape(t: torch.Tensor) -> tuple[int, ...]:
    return (1, -1) + (1,) * (t.dim() - 2)


def operating_point(clean: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per channel (dimension 1) over images and positions: ``(α, β, sd)`` of the least-squares fit
    ``mean ≈ α·clean + β`` and ``sd = sqrt(mean of var)`` (``α = 0`` on a channel whose clean input is constant)."""
    dims = [0] + list(range(2, clean.dim()))
    x, m = clean.double(), mean.double()
    ex, em = x.mean(dims), m.mean(dims)
    xc = x - ex.reshape(_channel_shape(x))
    vx = xc.square().mean(dims)
    cxm = (xc * m).mean(dims)
    alpha = torch.where(vx > 0, cxm / vx.clamp_min(1e-300), torch.zeros_like(vx))
    beta = em - alpha * ex
    sd = var.double().clamp_min(0).mean(dims).sqrt()
    return alpha.numpy(), beta.numpy(), sd.numpy()


class MeanFieldNetwork:
    """A folded network (``torch.fx.GraphModule``) and probe images, ready to carry Gaussians to the logits.

    ``analog``: the names of its analog layers (``call_module`` targets that a :class:`LayerPerturbation` may
    name). Every node is checked here: an operation the route cannot carry raises :class:`EstimationError`."""

    _PASS_METHODS = ("flatten", "view", "reshape", "contiguous")

    def __init__(self, graph_module: torch.fx.GraphModule, images: torch.Tensor, batch_size: int = 250):
        if not isinstance(graph_module, torch.fx.GraphModule):
            raise EstimationError("mean-field route: the folded model is not a torch.fx graph (it could not be traced)")
        self.gm = graph_module.eval()
        self.images = images.to(torch.float32)
        self.batch_size = int(batch_size)
        self.modules = dict(self.gm.named_modules())
        for node in self.gm.graph.nodes:
            self._check(node)

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
               clean: torch.Tensor | None = None):
        weight = mod.weight
        if pert is not None and pert.weight is not None:
            weight = torch.from_numpy(np.array(pert.weight, dtype=np.float32)).reshape(weight.shape)
        if isinstance(mod, nn.Conv2d):
            def op(x, w):
                return F.conv2d(x, w, None, mod.stride, mod.padding, mod.dilation, mod.groups)
        else:
            def op(x, w):
                return F.linear(x, w)
        y, v = op(mean, weight), op(var, weight * weight)
        shape = _channel_shape(y)
        if pert is not None:
            gain, offset = pert.gain, pert.offset
            if pert.operating_point is not None and clean is not None:
                d_gain, d_offset = pert.operating_point(*operating_point(clean, mean, var))
                gain, offset = gain + d_gain, offset + d_offset
            a = 1.0 + torch.as_tensor(gain, dtype=torch.float32).reshape(shape)
            y = a * y + torch.as_tensor(offset, dtype=torch.float32).reshape(shape)
            v = a * a * v + torch.as_tensor(pert.variance, dtype=torch.float32).clamp_min(0).reshape(shape)
        if mod.bias is not None:
            y = y + mod.bias.reshape(shape)
        return y, v

    def _run(self, x: torch.Tensor, perturbations: Mapping[str, LayerPerturbation]):
        env: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        # the clean network's values alongside, where a layer's perturbation depends on its operating point
        clean: dict[str, torch.Tensor] | None = (
            {} if any(p.operating_point is not None for p in perturbations.values()) else None)

        def arg(a):
            return env[a.name] if isinstance(a, torch.fx.Node) else a

        def clean_arg(a):
            return clean[a.name] if isinstance(a, torch.fx.Node) else a
        for node in self.gm.graph.nodes:
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
            elif node.op == "output":
                return env[node.args[0].name]
            elif node.op == "get_attr":
                raise EstimationError(f"mean-field route: constant tensor {node.target} in the graph")
            elif node.op == "call_module":
                mod = self.modules[node.target]
                m, v = env[node.args[0].name]
                if isinstance(mod, (nn.Conv2d, nn.Linear)):
                    env[node.name] = self._layer(mod, m, v, perturbations.get(node.target),
                                                 None if clean is None else clean[node.args[0].name])
                elif isinstance(mod, nn.ReLU):
                    env[node.name] = relu_moments(m, v)
                elif isinstance(mod, nn.MaxPool2d):
                    env[node.name] = _max_pool_moments(m, v, mod)
                elif isinstance(mod, (nn.AdaptiveAvgPool2d, nn.AvgPool2d)):
                    out = mod(m)
                    # a mean of n independent elements: variance / n (n: elements per output, on average)
                    k = mod.kernel_size if isinstance(mod, nn.AvgPool2d) else None
                    window = (math.prod((k, k) if isinstance(k, int) else k) if k is not None
                              else m[0, 0].numel() / out[0, 0].numel())
                    env[node.name] = (out, mod(v) / window)
                elif isinstance(mod, nn.Flatten):
                    env[node.name] = (mod(m), mod(v))
                else:  # Identity, Dropout (eval)
                    env[node.name] = (m, v)
            elif node.op == "call_function":
                if node.target in (operator.add, torch.add):
                    (m1, v1), (m2, v2) = arg(node.args[0]), arg(node.args[1])
                    env[node.name] = (m1 + m2, v1 + v2)
                elif node.target is torch.flatten:
                    m, v = env[node.args[0].name]
                    env[node.name] = (torch.flatten(m, *node.args[1:]), torch.flatten(v, *node.args[1:]))
                else:  # relu
                    env[node.name] = relu_moments(*env[node.args[0].name])
            else:  # call_method
                m, v = env[node.args[0].name]
                if node.target == "relu":
                    env[node.name] = relu_moments(m, v)
                else:
                    env[node.name] = (getattr(m, node.target)(*node.args[1:]), getattr(v, node.target)(*node.args[1:]))
        raise EstimationError("mean-field route: the graph has no output")

    def moments(self, perturbations: Mapping[str, LayerPerturbation]) -> tuple[np.ndarray, np.ndarray]:
        """``(mean, variance)`` of the logits, ``(N, n_classes)`` float64 each, over the probe images."""
        means, variances = [], []
        # operating points are fitted over all the images at once (one batch)
        batch = (len(self.images) if any(p.operating_point is not None for p in perturbations.values())
                 else self.batch_size)
        with torch.no_grad():
            for i in range(0, len(self.images), max(batch, 1)):
                m, v = self._run(self.images[i:i + batch], perturbations)
                means.append(m.double())
                variances.append(v.double())
        return torch.cat(means).numpy(), torch.cat(variances).numpy()
