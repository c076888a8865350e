"""The analog layers of a model: names, batch-norm-folded weights, shapes, execution order.

Every ``Conv2d`` and ``Linear`` of a model is an analog layer; everything else (batch norm
folded into the preceding conv, ReLU, pooling, residual adds) is exact digital logic.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

__all__ = ["AnalogLayerSpec", "fold_batchnorm", "analog_layers", "analog_layer_names", "replace_module"]


@dataclass(frozen=True)
class AnalogLayerSpec:
    """One analog layer of a batch-norm-folded model."""

    name: str
    """Module name in the model (``conv1``, ``layer1.0.conv1``, ``layer2.0.downsample.0``, ``fc``)."""
    kind: str
    """``"conv"`` or ``"linear"``."""
    weight: torch.Tensor
    """Folded float weight, ``(C_out, C_in, kh, kw)`` or ``(C_out, C_in)``."""
    bias: torch.Tensor | None
    """Folded float bias ``(C_out,)`` (digital) or None."""
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1

    @property
    def out_channels(self) -> int:
        return int(self.weight.shape[0])

    @property
    def fan_in(self) -> int:
        """K: the length of one dot product (``C_in·kh·kw`` per group)."""
        return int(self.weight[0].numel())

    @property
    def weight_matrix(self) -> torch.Tensor:
        """``(C_out, K)`` in PyTorch's im2col row order (C_in, kh, kw)."""
        return self.weight.reshape(self.out_channels, -1)

    @property
    def kernel_size(self) -> tuple[int, int]:
        return tuple(self.weight.shape[2:]) if self.kind == "conv" else (1, 1)


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """An eval-mode copy with every BatchNorm folded into the conv feeding it.

    Uses ``torch.fx`` (data-flow, not module order); module names are kept. A model that
    ``torch.fx`` cannot trace is copied unchanged (its BatchNorms then stay digital).
    """
    from torch.fx.experimental.optimization import fuse

    model = copy.deepcopy(model).eval()
    try:
        return fuse(model)
    except Exception:  # untraceable model: keep BN as digital ops
        return model


def _iter_analog(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    for name, module in model.named_modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            yield name, module


def analog_layers(folded: nn.Module, example: torch.Tensor | None = None) -> list[AnalogLayerSpec]:
    """The analog layers of a folded model, in execution order if ``example`` is given
    (one forward pass records it), else in module-definition order."""
    modules = dict(_iter_analog(folded))
    order = list(modules)
    if example is not None:
        seen: list[str] = []
        hooks = [m.register_forward_hook(lambda _m, _i, _o, n=n: seen.append(n)) for n, m in modules.items()]
        try:
            with torch.no_grad():
                folded(example)
        finally:
            for h in hooks:
                h.remove()
        order = list(dict.fromkeys(seen)) + [n for n in order if n not in seen]
    specs = []
    for name in order:
        m = modules[name]
        bias = None if m.bias is None else m.bias.detach().clone()
        if isinstance(m, nn.Conv2d):
            if m.padding_mode != "zeros" or isinstance(m.padding, str):
                raise NotImplementedError(f"layer {name}: only zero padding given as numbers is supported")
            specs.append(AnalogLayerSpec(name, "conv", m.weight.detach().clone(), bias, tuple(m.stride),
                                         tuple(m.padding), tuple(m.dilation), int(m.groups)))
        else:
            specs.append(AnalogLayerSpec(name, "linear", m.weight.detach().clone(), bias))
    return specs


def analog_layer_names(model: nn.Module) -> list[str]:
    """Names of every Conv2d and Linear of ``model`` in definition order."""
    return [n for n, _ in _iter_analog(model)]


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` where the submodule ``name`` is (works for GraphModules too)."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
