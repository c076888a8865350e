"""Monte Carlo measurements: isolated and end-to-end SNR per layer, logits SNR, top-1 over chip instances.

For chip instance ``i`` (seed ``config.seed + i``), over the images of a loader:

* *isolated* SNR of layer ``l``: the float (BN-folded) network runs; the analog layer ``l`` of the
  instance gets exactly the float input of ``l``, its output is compared to the float output of ``l``;
* *end-to-end* SNR of layer ``l``: the whole analog network runs; the output of analog layer ``l`` is
  compared to the float output of ``l`` on the same image; the logits SNR is that of the network output;
* top-1: arg-max of the analog logits against the labels; per image, the number of instances that got it
  right and whether the float network did (for paired, per-image statistics of the accuracy drop).

On a CUDA ``device`` the whole run stays on the GPU: the float reference and every analog layer (TF32 is
switched off for the run: integer partial sums are exact in float32 as on the CPU; non-integer sums and the float
reference differ from a CPU run in the last bits, by summation order). Chips are the same as on
the CPU (weight codes and programming errors are drawn there); read and thermal noise come from the device's own
generator, so per-read draws differ from a CPU run while their distribution is the same.

``SNR(dB) = 10·log10(Σ ideal² / Σ (noisy − ideal)²)`` with both sums over all outputs, images and —
for the reported ``*_snr_db`` — all instances (the ratio of the summed energies, i.e. of the
instance-averaged expected squared error); per-instance values are kept too. ``top1_std`` is the
sample standard deviation (ddof=1) over instances, 0 for a single instance.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from cimstat.errors import ConfigError
from cimstat.hardware import HardwareConfig, ResolvedLayer
from cimstat.montecarlo.convert import analog_modules, convert
from cimstat.montecarlo.layers import exact_float32
from cimstat.network import analog_layer_names, fold_batchnorm

from cimstat.metrics import snr_db  # re-exported: the shared SNR definition

__all__ = ["MCResult", "measure", "resolve_device", "device_name", "snr_db"]


@dataclass
class MCResult:
    """What one Monte Carlo run measured (see the module docstring for definitions)."""

    model: str
    config_name: str
    n_images: int
    instances: int
    layers: list[str]
    """Analog layer names in execution order."""
    isolated_snr_db: dict[str, float]
    e2e_snr_db: dict[str, float]
    logits_snr_db: float
    top1_per_instance: list[float]
    float_top1: float
    isolated_snr_db_per_instance: dict[str, list[float]] = field(default_factory=dict)
    e2e_snr_db_per_instance: dict[str, list[float]] = field(default_factory=dict)
    logits_snr_db_per_instance: list[float] = field(default_factory=list)
    seconds: float = 0.0
    config: dict[str, Any] = field(default_factory=dict)
    correct_instances_per_image: list[int] = field(default_factory=list)
    """Per image, in loader order: on how many of the ``instances`` chips the analog arg-max was the label
    (empty without labels or end-to-end runs)."""
    float_correct_per_image: list[bool] = field(default_factory=list)
    """Per image, in loader order: whether the float network's arg-max was the label (empty without labels)."""

    @property
    def top1_mean(self) -> float:
        return float(np.mean(self.top1_per_instance)) if self.top1_per_instance else math.nan

    @property
    def top1_std(self) -> float:
        t = self.top1_per_instance
        return float(np.std(t, ddof=1)) if len(t) > 1 else 0.0

    @property
    def conv1_snr_db(self) -> float:
        """Isolated SNR of the first analog layer."""
        return self.isolated_snr_db.get(self.layers[0], math.nan) if self.layers else math.nan

    @property
    def fc_snr_db(self) -> float:
        """End-to-end SNR at the logits."""
        return self.logits_snr_db

    def to_row(self) -> dict[str, Any]:
        """One flat dict (a table row): summary numbers plus per-layer SNRs."""
        row: dict[str, Any] = {
            "model": self.model, "config": self.config_name, "n_images": self.n_images,
            "instances": self.instances, "top1_mean": self.top1_mean, "top1_std": self.top1_std,
            "float_top1": self.float_top1, "conv1_snr_db": self.conv1_snr_db, "fc_snr_db": self.fc_snr_db,
        }
        for name in self.layers:
            if name in self.isolated_snr_db:
                row[f"snr_isolated_db[{name}]"] = self.isolated_snr_db[name]
            if name in self.e2e_snr_db:
                row[f"snr_e2e_db[{name}]"] = self.e2e_snr_db[name]
        return row

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.update(top1_mean=self.top1_mean, top1_std=self.top1_std, conv1_snr_db=self.conv1_snr_db,
                   fc_snr_db=self.fc_snr_db)
        return out

    def write_json(self, path: str | Path) -> None:
        """Atomic JSON write; infinite SNRs are written as the strings ``"inf"``/``"-inf"``."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps(_json_safe(self.to_dict()), indent=2)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as fh:
                fh.write(text + "\n")
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def table(self) -> str:
        """A readable table: summary, then isolated and end-to-end SNR per layer."""
        fmt = lambda v: f"{v:8.2f}" if math.isfinite(v) else f"{v!s:>8}"  # noqa: E731
        lines = [
            f"Monte Carlo: model={self.model} config={self.config_name or '-'} images={self.n_images} "
            f"instances={self.instances} ({self.seconds:.1f} s)",
            f"top-1 {100 * self.top1_mean:.2f}% ± {100 * self.top1_std:.2f}% (float {100 * self.float_top1:.2f}%)   "
            f"logits SNR {fmt(self.logits_snr_db).strip()} dB   conv1 SNR {fmt(self.conv1_snr_db).strip()} dB",
            f"{'layer':<24} {'isolated dB':>11} {'end-to-end dB':>13}",
        ]
        for name in self.layers:
            iso = self.isolated_snr_db.get(name, math.nan)
            e2e = self.e2e_snr_db.get(name, math.nan)
            lines.append(f"{name:<24} {fmt(iso):>11} {fmt(e2e):>13}")
        lines.append(f"{'logits':<24} {'':>11} {fmt(self.logits_snr_db):>13}")
        return "\n".join(lines)


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return "nan" if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


class _Energy:
    """Running ``Σ ideal²`` and ``Σ (noisy − ideal)²`` (float64)."""

    def __init__(self) -> None:
        self.signal = 0.0
        self.error = 0.0

    def add(self, noisy: torch.Tensor, ideal: torch.Tensor) -> None:
        ideal64 = ideal.detach().to(torch.float64)
        self.signal += float((ideal64 * ideal64).sum())
        diff = noisy.detach().to(torch.float64) - ideal64
        self.error += float((diff * diff).sum())


def _batches(loader: Iterable, n_images: int | None) -> Iterable[tuple[torch.Tensor, torch.Tensor | None]]:
    seen = 0
    for batch in loader:
        if isinstance(batch, (tuple, list)):
            x, y = batch[0], batch[1] if len(batch) > 1 else None
        else:
            x, y = batch, None
        if n_images is not None:
            if seen >= n_images:
                return
            keep = n_images - seen
            x = x[:keep]
            y = None if y is None else y[:keep]
        seen += x.shape[0]
        yield x, y


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``device`` as a :class:`torch.device` (None: the CPU); a CUDA device must be available."""
    try:
        dev = torch.device("cpu" if device is None else device)
    except (RuntimeError, TypeError) as err:
        raise ConfigError(f"device={device!r} is not a torch device name (expected 'cpu', 'cuda' or 'cuda:N')") \
            from err
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"device={device!r}: the simulator runs on 'cpu' or 'cuda', not {dev.type!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={device!r}: this machine has no CUDA device (torch.cuda.is_available() is False)")
    return dev


def device_name(device: str | torch.device | None) -> str:
    """What a result records as where it ran: ``"cpu"`` or the GPU's name (``"NVIDIA H200"``)."""
    dev = resolve_device(device)
    return torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"


def measure(model: nn.Module, config: HardwareConfig, resolved: Mapping[str, ResolvedLayer] | None,
            loader: Iterable, instances: int = 1, *, n_images: int | None = None, isolated: bool = True,
            end_to_end: bool = True, exact_read_noise: bool = False, progress: bool = True,
            model_name: str = "", device: str | torch.device | None = None) -> MCResult:
    """Run ``instances`` chip instances of ``model`` under ``config`` over ``loader`` (``(images, labels)``
    batches, at most ``n_images`` images) on ``device`` (default the CPU; ``"cuda"`` for a GPU) and return an
    :class:`MCResult`."""
    dev = resolve_device(device)
    with torch.no_grad(), exact_float32(dev):
        return _measure(model, config, resolved, loader, instances, n_images=n_images, isolated=isolated,
                        end_to_end=end_to_end, exact_read_noise=exact_read_noise, progress=progress,
                        model_name=model_name, device=dev)


def _measure(model: nn.Module, config: HardwareConfig, resolved: Mapping[str, ResolvedLayer] | None,
             loader: Iterable, instances: int, *, n_images: int | None, isolated: bool, end_to_end: bool,
             exact_read_noise: bool, progress: bool, model_name: str, device: torch.device) -> MCResult:
    if isinstance(instances, bool) or not isinstance(instances, int) or instances < 1:
        raise ConfigError(f"instances={instances!r} must be a positive integer")
    if n_images is not None and (isinstance(n_images, bool) or not isinstance(n_images, int) or n_images < 1):
        raise ConfigError(f"n_images={n_images!r} must be a positive integer or None")
    start = time.perf_counter()
    folded = fold_batchnorm(model).to(device)
    names = analog_layer_names(folded)
    order: list[str] = []
    float_in: dict[str, torch.Tensor] = {}
    float_out: dict[str, torch.Tensor] = {}

    def float_hook(name: str):
        def record(_m, inputs, output):
            if name not in order:
                order.append(name)
            # clones: torchvision's in-place ReLU and residual add overwrite these tensors later
            float_in[name] = inputs[0].clone()
            float_out[name] = output.clone()
        return record

    for name in names:
        folded.get_submodule(name).register_forward_hook(float_hook(name))

    iso = {n: [_Energy() for _ in range(instances)] for n in names}
    e2e = {n: [_Energy() for _ in range(instances)] for n in names}
    logits = [_Energy() for _ in range(instances)]
    correct = np.zeros(instances)
    float_correct = 0
    per_image_correct: list[torch.Tensor] = []  # per batch: instances right, summed over instances
    per_image_float: list[torch.Tensor] = []
    total = 0
    labelled = True
    n_batches = len(loader) if hasattr(loader, "__len__") else None
    if n_batches is not None and n_images is not None and hasattr(loader, "batch_size") and loader.batch_size:
        n_batches = min(n_batches, math.ceil(n_images / loader.batch_size))
    bar = tqdm(total=None if n_batches is None else instances * n_batches, desc="Monte Carlo batches",
               disable=not progress, leave=False)
    for inst in range(instances):
        analog = convert(model, config, resolved, inst, exact_read_noise=exact_read_noise, device=device)
        layers = analog_modules(analog)
        capture = {"on": False}

        def analog_hook(name: str, inst: int = inst):
            def record(_m, _inputs, output):
                if capture["on"]:
                    e2e[name][inst].add(output, float_out[name])
            return record

        for name, layer in layers.items():
            layer.register_forward_hook(analog_hook(name))
        for batch, (x, y) in enumerate(_batches(loader, n_images)):
            x = x.to(device, torch.float32)
            y = None if y is None else y.to(device)
            ideal_logits = folded(x)
            if inst == 0:
                total += x.shape[0]
                if y is None:
                    labelled = False
                else:
                    right = ideal_logits.argmax(dim=1) == y
                    float_correct += int(right.sum())
                    per_image_float.append(right)
            if isolated:
                for name in names:
                    if name in float_in:
                        iso[name][inst].add(layers[name](float_in[name]), float_out[name])
            if end_to_end:
                capture["on"] = True
                noisy_logits = analog(x)
                capture["on"] = False
                logits[inst].add(noisy_logits, ideal_logits)
                if y is not None:
                    right = (noisy_logits.argmax(dim=1) == y).to(torch.int64)
                    correct[inst] += int(right.sum())
                    if inst == 0:
                        per_image_correct.append(right)
                    else:
                        per_image_correct[batch] += right
            float_in.clear()
            float_out.clear()
            bar.update(1)
    bar.close()
    if total == 0:
        raise ConfigError("the data loader gave no images")
    layer_order = order + [n for n in names if n not in order]

    def pooled(energies: list[_Energy]) -> float:
        return snr_db(sum(e.signal for e in energies), sum(e.error for e in energies))

    result = MCResult(
        model=model_name, config_name=config.name, n_images=total, instances=instances, layers=layer_order,
        isolated_snr_db={n: pooled(iso[n]) for n in layer_order} if isolated else {},
        e2e_snr_db={n: pooled(e2e[n]) for n in layer_order} if end_to_end else {},
        logits_snr_db=pooled(logits) if end_to_end else math.nan,
        top1_per_instance=[float(c / total) for c in correct] if (end_to_end and labelled) else [],
        float_top1=float(float_correct / total) if labelled else math.nan,
        isolated_snr_db_per_instance={n: [snr_db(e.signal, e.error) for e in iso[n]] for n in layer_order}
        if isolated else {},
        e2e_snr_db_per_instance={n: [snr_db(e.signal, e.error) for e in e2e[n]] for n in layer_order}
        if end_to_end else {},
        logits_snr_db_per_instance=[snr_db(e.signal, e.error) for e in logits] if end_to_end else [],
        seconds=time.perf_counter() - start, config=config.to_dict(),
        correct_instances_per_image=torch.cat(per_image_correct).cpu().tolist()
        if (end_to_end and labelled and per_image_correct) else [],
        float_correct_per_image=torch.cat(per_image_float).cpu().tolist() if (labelled and per_image_float) else [],
    )
    return result
