"""Activation statistics of every analog layer over N probe images -> stat.pkl.

    python -m probing.activations --model default --n-images 1000 --out .cache/probes/default/stat.pkl
    python -m probing.activations --model resnet18-imagenet --weights resnet18.pth --data VAL_DIR \
        --n-images 50 --out probes/imagenet/stat.pkl

Images come from the dataset's ``probe`` split, never from the ``validation`` split that the
Monte Carlo check uses (the split is recorded in the file's metadata).
"""
from __future__ import annotations

import argparse
import time

from cimstat.cli import run_cli
from cimstat.errors import DataError


def main(argv: list[str] | None = None) -> int:
    import torch

    from cimstat.activation_stats import ProbeSettings, probe_model
    from cimstat.models import MODELS, load
    from cimstat.probes import write_stats

    ap = argparse.ArgumentParser(prog="python -m probing.activations", description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, choices=sorted(MODELS))
    ap.add_argument("--weights", default=None, help="local state-dict file (required for resnet18-imagenet)")
    ap.add_argument("--data", default=None, help="dataset folder (ImageNet validation folder of synset sub-folders)")
    ap.add_argument("--n-images", type=int, required=True)
    ap.add_argument("--seed", type=int, default=0, help="seed of the patch sub-sampling of M")
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--m-cost-ratio", type=float, default=ProbeSettings.m_cost_ratio,
                    help="cost of M as a multiple of each layer's MACs (0 = all patches)")
    ap.add_argument("--m-rank", type=int, default=ProbeSettings.m_rank)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", required=True, help="output file, e.g. DIR/stat.pkl")
    args = ap.parse_args(argv)
    if args.n_images < 1:
        raise DataError(f"--n-images={args.n_images} must be at least 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load(args.model, args.weights)
    dataset = MODELS[args.model].dataset
    batch = args.batch_size or (100 if dataset == "default" else 16)
    settings = ProbeSettings(m_cost_ratio=args.m_cost_ratio or None, m_rank=args.m_rank)
    t0 = time.time()
    stats = probe_model(model, args.model, dataset, root=args.data, n_images=args.n_images, seed=args.seed,
                        batch_size=batch, weights=args.weights, settings=settings)
    path = write_stats(stats, args.out)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB): {len(stats.layers)} layers, "
          f"{stats.meta['n_images']} images of {dataset}/probe, {time.time() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
