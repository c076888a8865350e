"""Noise propagation of every analog layer (ratios and weight sensitivities) -> noise_prop.pkl.

    python -m probing.noise_prop --model default --stat DIR/stat.pkl --out DIR/noise_prop.pkl \
        --method jacobian --n-images 128

Uses the first ``--n-images`` of the images ``stat.pkl`` was probed on (its ``probe`` split).
"""
from __future__ import annotations

import argparse
import time

from cimstat.cli import run_cli


def main(argv: list[str] | None = None) -> int:
    import torch

    from cimstat.models import MODELS, load
    from cimstat.noise_propagation import noise_propagation
    from cimstat.probes import read_stats, write_noise_prop
    from cimstat.errors import DataError

    ap = argparse.ArgumentParser(prog="python -m probing.noise_prop", description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, choices=sorted(MODELS))
    ap.add_argument("--weights", default=None, help="local state-dict file (required for resnet18-imagenet)")
    ap.add_argument("--data", default=None, help="dataset folder (ImageNet validation folder)")
    ap.add_argument("--stat", required=True, help="stat.pkl written by probing.activations for this model")
    ap.add_argument("--method", choices=("jacobian", "injection"), default="jacobian")
    ap.add_argument("--n-images", type=int, default=None, help="default: min(128, images in stat.pkl)")
    ap.add_argument("--class-probes", type=int, default=None,
                    help="Rademacher projections over classes instead of one backward per class")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--injection-sigma-rel", type=float, default=1e-3)
    ap.add_argument("--injection-draws", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", required=True, help="output file, e.g. DIR/noise_prop.pkl")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    stats = read_stats(args.stat)  # fail fast on a bad file, before loading the model
    model = load(args.model, args.weights)
    dataset = MODELS[args.model].dataset
    n = args.n_images if args.n_images is not None else min(128, stats.meta["n_images"])
    if n < 1:
        raise DataError(f"--n-images={n} must be at least 1")
    batch = args.batch_size or (32 if dataset == "default" else 4)
    t0 = time.time()
    noise = noise_propagation(model, args.model, dataset, stats, root=args.data, n_images=n, method=args.method,
                              batch_size=batch, seed=args.seed, class_probes=args.class_probes,
                              injection_sigma_rel=args.injection_sigma_rel, injection_draws=args.injection_draws)
    path = write_noise_prop(noise, args.out)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB): {len(noise.layers)} layers, {n} images, "
          f"method {args.method} ({noise.meta['class_estimator']}), {time.time() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
