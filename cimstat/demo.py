"""`make demo`: the whole workflow on the embedded default, in a few minutes on 2 cores.

1. the float accuracy of the default model on its validation split;
2. probe the default model if its probe files are missing or stale (``.cache/probes/default``);
3. run an example sweep (analytic estimates of every combination) -> CSV + plots;
4. a small Monte Carlo validation of a few of its combinations -> CSV + scatter plot;
5. print where everything is.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from cimstat.cli import run_cli
from cimstat.data import DEFAULT_SPLITS, loader
from cimstat.models import load

SWEEPS_DIR = Path(__file__).resolve().parent.parent / "sweeps"
DEMO_SWEEP = SWEEPS_DIR / "conv1_weight_bits.py"
DEMO_SUBSET = "0:9:4"
"""conv1 weight bits 6, 10 and 14."""


def evaluate_default(batch_size: int = 250) -> float:
    """Top-1 accuracy (fraction) of the default model on the default validation split."""
    model = load("default")
    correct = total = 0
    with torch.no_grad():
        for images, labels in loader("default", "validation", batch_size):
            correct += int((model(images).argmax(1) == labels).sum())
            total += len(labels)
    return correct / total


def _latest_run(out: Path, sweep_name: str) -> Path | None:
    runs = sorted((p for p in (out / sweep_name).glob("*") if p.is_dir() and not p.name.startswith(".")),
                  key=lambda p: p.stat().st_mtime)
    return runs[-1] if runs else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sweep", type=Path, default=DEMO_SWEEP, help=f"example sweep (default {DEMO_SWEEP.name})")
    parser.add_argument("--subset", default=DEMO_SUBSET, help=f"combinations to validate (default {DEMO_SUBSET!r})")
    parser.add_argument("--n-images", type=int, default=100, help="Monte Carlo images (default 100)")
    parser.add_argument("--instances", type=int, default=1,
                        help="Monte Carlo chip instances (default 1: this sweep has no device noise)")
    parser.add_argument("--out", type=Path, default=Path("results"), help="results root (default results)")
    args = parser.parse_args(argv)
    from cimstat.probes import ensure_default_probes
    from cimstat.sweeps.commands import run_main, validate_main
    from cimstat.sweeps.spec import load_sweep

    spec = load_sweep(args.sweep)  # a bad sweep file fails here, before anything runs
    t0 = time.time()
    acc = evaluate_default()
    print(f"[1/4] default model (torchvision resnet18, 10 classes) on the default validation split "
          f"({DEFAULT_SPLITS['validation']} held-out MNIST digits): top-1 {100 * acc:.2f}% ({time.time() - t0:.1f} s)")

    t0 = time.time()
    probe_dir = Path(ensure_default_probes())
    print(f"[2/4] probes of the default model: {probe_dir} ({time.time() - t0:.1f} s)")

    t0 = time.time()
    print(f"[3/4] sweep {args.sweep}: analytic estimates of all {len(spec.combinations)} combinations")
    run_main([str(args.sweep), "--probes", str(probe_dir), "--out", str(args.out)])
    summary_dir = _latest_run(args.out, spec.name)
    print(f"      ({time.time() - t0:.1f} s)")

    t0 = time.time()
    print(f"[4/4] Monte Carlo check of combinations {args.subset} ({args.n_images} validation images, "
          f"{args.instances} chip instances)")
    validate_main([str(args.sweep), "--probes", str(probe_dir), "--out", str(args.out), "--subset", args.subset,
                   "--n-images", str(args.n_images), "--instances", str(args.instances)])
    validation_dir = _latest_run(args.out, spec.name)
    print(f"      ({time.time() - t0:.1f} s)")

    print("\nwhere to look:")
    print(f"  estimates : {summary_dir}/summary.csv and {summary_dir}/*.png")
    print(f"  validation: {validation_dir}/validation.csv, validation.md and validation_scatter.png")
    print("next: edit a sweep file in sweeps/ (see the README's workflow section), then "
          "python -m sweeps.run sweeps/<file>.py and python -m sweeps.validate sweeps/<file>.py --subset ...")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
