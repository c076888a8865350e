"""`make demo`: the main job on the embedded default (model + data shipped with cimstat)."""
from __future__ import annotations

import argparse
import time

import torch

from cimstat.cli import run_cli
from cimstat.data import DEFAULT_SPLITS, loader
from cimstat.models import load


def evaluate_default(batch_size: int = 250) -> float:
    """Top-1 accuracy (fraction) of the default model on the default validation split."""
    model = load("default")
    correct = total = 0
    with torch.no_grad():
        for images, labels in loader("default", "validation", batch_size):
            correct += int((model(images).argmax(1) == labels).sum())
            total += len(labels)
    return correct / total


def main(argv: list[str] | None = None) -> int:
    argparse.ArgumentParser(description=__doc__).parse_args(argv)
    t0 = time.time()
    acc = evaluate_default()
    print(f"default model (torchvision resnet18, 10 classes) on the default validation split "
          f"({DEFAULT_SPLITS['validation']} held-out MNIST digits): top-1 {100 * acc:.2f}% ({time.time() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
