"""Model loaders: the embedded default ResNet-18 and torchvision's ImageNet ResNet-18.

Both are exactly ``torchvision.models.resnet18`` (same layer names: conv1, bn1, layer1..4,
fc), so every code path that serves the default serves ImageNet. Weights are read from
local files only (``torch.load(weights_only=True)``); nothing is downloaded.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from cimstat.errors import ModelError

__all__ = ["MODELS", "ModelInfo", "load", "weights_fingerprint", "DEFAULT_WEIGHTS"]

DEFAULT_WEIGHTS = Path(__file__).resolve().parent / "assets" / "resnet18_mnist_default.pt"


@dataclass(frozen=True)
class ModelInfo:
    name: str
    dataset: str
    n_classes: int
    description: str


MODELS: dict[str, ModelInfo] = {
    "default": ModelInfo("default", "default", 10,
                         "torchvision resnet18(num_classes=10) trained on the default MNIST split "
                         "(scripts/train_default.py), weights shipped in cimstat/assets"),
    "resnet18-imagenet": ModelInfo("resnet18-imagenet", "imagenet", 1000,
                                   "torchvision resnet18 with a local ImageNet state-dict file"),
}


def model_info(name: str) -> ModelInfo:
    if name not in MODELS:
        raise ModelError(f"unknown model {name!r}; expected one of {sorted(MODELS)}")
    return MODELS[name]


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise ModelError(f"weights file {str(path)!r} does not exist; expected a PyTorch state-dict file (.pt/.pth)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for corrupt files
        raise ModelError(f"weights file {str(path)!r} is not a readable PyTorch state dict ({type(err).__name__}: "
                         f"{str(err).splitlines()[0] if str(err) else ''})") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelError(f"weights file {str(path)!r} does not hold a state dict of tensors")
    return state


def _apply_state_dict(model: nn.Module, state: dict[str, torch.Tensor], path: Path, name: str) -> None:
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [f"{k} {tuple(state[k].shape)} (expected {tuple(v.shape)})"
             for k, v in expected.items() if k in state and state[k].shape != v.shape]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing {missing[:3]}{'...' if len(missing) > 3 else ''}")
        if unexpected:
            parts.append(f"unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''}")
        if wrong:
            parts.append(f"wrong shape {wrong[:3]}{'...' if len(wrong) > 3 else ''}")
        raise ModelError(f"weights file {str(path)!r} does not fit model {name!r}: " + "; ".join(parts))
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()})


def load(name: str, weights: str | Path | None = None) -> nn.Module:
    """A float model in eval mode.

    ``"default"``: ResNet-18 (10 classes) with the shipped weights (fp16 on disk, fp32 here),
    or ``weights`` if given. ``"resnet18-imagenet"``: torchvision ResNet-18 (1000 classes)
    from the local state-dict file ``weights`` (required).
    """
    from torchvision.models import resnet18

    info = model_info(name)
    if name == "resnet18-imagenet" and weights is None:
        raise ModelError("model 'resnet18-imagenet' needs a local weights file (--weights PATH), e.g. "
                         "torchvision's resnet18-f37072fd.pth; cimstat never downloads weights")
    path = Path(weights) if weights is not None else DEFAULT_WEIGHTS
    model = resnet18(num_classes=info.n_classes)
    _apply_state_dict(model, _read_state_dict(path), path, name)
    model.eval()
    return model


def weights_fingerprint(model: nn.Module) -> str:
    """SHA-256 (first 16 hex digits) over the float32 bytes of every parameter and buffer, in order."""
    h = hashlib.sha256()
    for key, value in model.state_dict().items():
        h.update(key.encode())
        h.update(value.detach().to(torch.float32).cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]
