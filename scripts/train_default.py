"""Train the embedded default model: python scripts/train_default.py [--epochs 8] [--out PATH]."""
from __future__ import annotations

import argparse

import torch

from cimstat.models import DEFAULT_WEIGHTS
from cimstat.training import train_default


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(DEFAULT_WEIGHTS))
    args = parser.parse_args()
    torch.set_num_threads(2)
    acc = train_default(args.out, epochs=args.epochs, seed=args.seed)
    print(f"saved {args.out}; validation top-1 of the stored fp16 weights: {100 * acc:.2f}%")


if __name__ == "__main__":
    main()
