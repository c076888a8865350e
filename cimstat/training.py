"""Deterministic CPU training of the embedded default model (ResNet-18 on the default digits).

Recipe: torchvision ``resnet18(num_classes=10)``, SGD (momentum 0.9, Nesterov, weight decay
5e-4), one-cycle learning rate peaking at 0.05, batch 64, label smoothing 0.05, random
translations of up to 4 pixels; seed 0, CPU, deterministic algorithms. Only the ``train``
split is used; the reported accuracy is on ``validation``.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch
from torch import nn

from cimstat.data import default_tensors

__all__ = ["train_default", "evaluate"]


def evaluate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 250) -> float:
    """Top-1 accuracy (fraction) of ``model`` on tensors."""
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(labels), batch_size):
            correct += int((model(images[i:i + batch_size]).argmax(1) == labels[i:i + batch_size]).sum())
    return correct / len(labels)


def _translate(batch: torch.Tensor, gen: torch.Generator, max_shift: int = 4) -> torch.Tensor:
    """Shift each image by a random integer offset, filling with the background value."""
    out = torch.empty_like(batch)
    background = batch.amin(dim=(1, 2, 3), keepdim=True)
    shifts = torch.randint(-max_shift, max_shift + 1, (len(batch), 2), generator=gen)
    for i, (dy, dx) in enumerate(shifts.tolist()):
        padded = torch.nn.functional.pad(batch[i:i + 1], (max_shift,) * 4, value=float(background[i]))
        h, w = batch.shape[-2:]
        out[i] = padded[0, :, max_shift + dy:max_shift + dy + h, max_shift + dx:max_shift + dx + w]
    return out


def train_default(out: str | Path, epochs: int = 8, seed: int = 0, batch_size: int = 64,
                  lr: float = 0.05, log=print) -> float:
    """Train, save fp16 weights to ``out``, return validation accuracy (fraction)."""
    from torchvision.models import resnet18

    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)
    gen = torch.Generator().manual_seed(seed)
    x_train, y_train = default_tensors("train")
    x_val, y_val = default_tensors("validation")
    model = resnet18(num_classes=10)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    steps_per_epoch = (len(y_train) + batch_size - 1) // batch_size
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps_per_epoch)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=0.05)
    for epoch in range(epochs):
        model.train()
        t0 = time.time()
        perm = torch.randperm(len(y_train), generator=gen)
        total = 0.0
        for i in range(0, len(perm), batch_size):
            idx = perm[i:i + batch_size]
            xb = _translate(x_train[idx], gen)
            loss = loss_fn(model(xb), y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss) * len(idx)
        acc = evaluate(model, x_val, y_val)
        log(f"epoch {epoch + 1}/{epochs}: train loss {total / len(y_train):.4f}, "
            f"validation top-1 {100 * acc:.2f}% ({time.time() - t0:.0f} s)")
    state = {k: (v.half() if v.is_floating_point() else v) for k, v in model.state_dict().items()}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(out)
    # accuracy of the weights as stored (fp16 -> fp32)
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    return evaluate(model, x_val, y_val)
