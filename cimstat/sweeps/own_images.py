"""The estimate against a Monte Carlo on the estimate's own probe images, chip by chip (a diagnostic).

The validation report runs the Monte Carlo on images the probes never saw, as the issue asks, so its top-1
error also holds the difference between two image samples: a few points at 40-90 % accuracy. Here the referee
runs on the probe images themselves (the images the engine's top-1 is an average over), keeps every chip's
logits, and takes the error apart:

* ``mc_top1``: the truth on these images, the mean over chips of each chip's top-1 (its SE over the chips);
* ``gauss_diag_top1``: the engine's quadrature (:func:`cimstat.accuracy.correct_probability`) fed with the Monte
  Carlo's own per-image logit means and per-class variances over the chips: what a perfect estimate of those
  moments would say under the engine's assumption of independent classes;
* ``gauss_cov_top1``: the same with the full class covariance of the logit errors (Gaussian draws, seeded: a
  diagnostic, never the engine), so ``gauss_diag_top1 - gauss_cov_top1`` is what the classes' correlations are
  worth and ``gauss_cov_top1 - mc_top1`` the rest of the non-Gaussian shape;
* each chip's class bias (its logit error averaged over the images): its spread over the chips per class, the
  correlations of that spread between classes, and the top-1 the chips would have without it (removed whole: its
  part common to all chips, such as a deterministic drift's class offsets, goes too; on thermal4-adc6, which has
  no chip-to-chip errors, that part alone takes top-1 from 44.7 % to 90.3 %).

The Monte Carlo side uses :func:`cimstat.montecarlo.convert` only; the engine side the public
:func:`cimstat.engine.estimate`; the two meet here, as in the validation sweep.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import torch

from cimstat.accuracy import correct_probability
from cimstat.errors import ConfigError
from cimstat.metrics import snr_db

__all__ = ["ChipLogits", "chip_logits", "breakdown"]


@dataclass(frozen=True)
class ChipLogits:
    """Every chip's logits on the same images, with the float network's and the labels."""

    logits: np.ndarray   #: (chips, N, classes) float64, the analog network of each chip instance
    clean: np.ndarray    #: (N, classes) float64, the float (batch-norm folded) network
    labels: np.ndarray   #: (N,) int64


def chip_logits(model: torch.nn.Module, config, resolved: Mapping[str, Any], images: torch.Tensor,
                labels: torch.Tensor | np.ndarray, chips: int, batch_size: int = 250,
                progress: bool = True) -> ChipLogits:
    """The logits of chip instances ``0 .. chips-1`` of ``config`` (:func:`cimstat.montecarlo.convert`, read noise
    drawn per forward pass) and of the float network on ``images``."""
    from tqdm import tqdm

    from cimstat.montecarlo import convert
    from cimstat.network import fold_batchnorm

    if isinstance(chips, bool) or not isinstance(chips, int) or chips < 1:
        raise ConfigError(f"chips={chips!r} must be a positive integer")
    if len(images) != len(labels) or len(images) == 0:
        raise ConfigError(f"{len(images)} images and {len(labels)} labels: expected the same positive number")

    def run(net: torch.nn.Module) -> np.ndarray:
        with torch.no_grad():
            return torch.cat([net(images[i:i + batch_size]) for i in range(0, len(images), batch_size)]
                             ).double().cpu().numpy()
    clean = run(fold_batchnorm(model).eval())
    out = [run(convert(model, config, resolved, instance=i))
           for i in tqdm(range(chips), desc="chips", unit="chip", disable=not progress)]
    return ChipLogits(np.stack(out), clean, np.asarray(labels, dtype=np.int64))


def breakdown(chips: ChipLogits, draws: int = 4000, seed: int = 0) -> dict[str, Any]:
    """The truth on these images and what each of the engine's top-1 assumptions is worth (module doc). Top-1 in
    %, SNR in dB; the Gaussian and class-bias entries need at least 2 chips (NaN otherwise)."""
    lg, z, y = chips.logits, chips.clean, chips.labels
    k, n, c = lg.shape
    per_chip = 100.0 * (lg.argmax(2) == y[None]).mean(1)
    err = lg - z[None]
    out: dict[str, Any] = {
        "chips": k, "images": n, "clean_top1": 100.0 * float((z.argmax(1) == y).mean()),
        "mc_top1": float(per_chip.mean()),
        "mc_top1_se": float(per_chip.std(ddof=1) / math.sqrt(k)) if k > 1 else math.nan,
        "mc_top1_chip_min": float(per_chip.min()), "mc_top1_chip_max": float(per_chip.max()),
        "mc_fc_snr_db": snr_db(float((z ** 2).sum()), float((err ** 2).sum() / k)),
    }
    nan_fields = ("gauss_diag_top1", "gauss_cov_top1", "top1_without_chip_bias", "class_bias_corr_min",
                  "class_bias_corr_max")
    if k < 2:
        out.update({f: math.nan for f in nan_fields}, class_bias_sd=[math.nan] * c)
        return out
    mean, var = err.mean(0), err.var(0, ddof=1)
    out["gauss_diag_top1"] = 100.0 * float(correct_probability(z + mean, y, var).mean())
    rng = np.random.default_rng(seed)
    hits = 0.0
    for i in range(n):   # full class covariance per image, over the chips
        w, v = np.linalg.eigh(np.cov(err[:, i, :], rowvar=False))
        sample = z[i] + mean[i] + (rng.standard_normal((draws, c)) * np.sqrt(np.maximum(w, 0.0))) @ v.T
        hits += float((sample.argmax(1) == y[i]).mean())
    out["gauss_cov_top1"] = 100.0 * hits / n
    bias = err.mean(1)                               # (chips, classes): each chip's common class bias
    cov = np.cov(bias, rowvar=False)
    sd = np.sqrt(np.diag(cov))
    corr = cov / np.outer(np.where(sd > 0, sd, 1.0), np.where(sd > 0, sd, 1.0))
    off = corr[~np.eye(c, dtype=bool)]
    out.update(class_bias_sd=[float(s) for s in sd], class_bias_corr_min=float(off.min()),
               class_bias_corr_max=float(off.max()),
               top1_without_chip_bias=100.0 * float(((lg - bias[:, None, :]).argmax(2) == y[None]).mean()))
    return out


def own_images_main(argv: list[str] | None = None) -> int:
    """``python -m sweeps.own_images``: the estimate next to a Monte Carlo on its own probe images, taken apart."""
    import argparse
    import json
    from pathlib import Path

    from cimstat import data, models
    from cimstat.engine import engine_for
    from cimstat.errors import SweepError
    from cimstat.sweeps.commands import resolve_probe_dir, select_combinations
    from cimstat.sweeps.evaluators import EstimateEvaluator
    from cimstat.sweeps.rundir import atomic_write_bytes
    from cimstat.sweeps.spec import load_sweep

    parser = argparse.ArgumentParser(
        prog="python -m sweeps.own_images",
        description="Monte Carlo on the probe images (the estimate's own), every chip's logits kept: the truth "
                    "the estimate's top-1 aims at there, and what its assumptions are worth (default model).")
    parser.add_argument("sweep_file", type=Path)
    parser.add_argument("--subset", required=True, metavar="EXPR",
                        help="which combinations (as for sweeps.validate), e.g. \"label in ['thermal4-adc6']\"")
    parser.add_argument("--chips", type=int, default=2, help="chip instances (default 2; more with programming error)")
    parser.add_argument("--batch-size", type=int, default=250)
    parser.add_argument("--probes", type=Path, default=None, help="probe folder (default: the default model's)")
    parser.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    if args.chips < 1 or args.batch_size < 1:
        raise SweepError(f"--chips={args.chips} and --batch-size={args.batch_size} must be at least 1")
    spec = load_sweep(args.sweep_file)
    if spec.model not in (None, "default") or spec.weights is not None:
        raise SweepError(f"sweep {spec.name!r} uses model {spec.model!r}: this diagnostic runs on the default model")
    probe_dir = resolve_probe_dir(args.probes, spec, progress=not args.quiet)
    estimator = EstimateEvaluator(probe_dir)   # the sweeps' own ranges (stored calibrations) and estimate
    estimator.setup()
    engine_labels = engine_for(estimator._probes).labels
    images, labels = data.default_tensors("probe")
    n = len(engine_labels)   # the images the estimate's top-1 averages over, all of them
    if n > len(images) or not np.array_equal(labels[:n].numpy(), engine_labels):
        raise SweepError(f"the probe folder {probe_dir} was not made from the default probe split in its order")
    model = models.load("default")
    results = []
    for combo in select_combinations(spec, args.subset):
        resolved, _ = estimator.resolve(combo)
        est = estimator.estimate(combo, resolved)
        row = {"label": combo.label or str(combo.index), "route": est["route"],
               "est_top1": 100.0 * est["top1"], "est_fc_snr_db": est["fc_snr_db"],
               **breakdown(chip_logits(model, combo.config, resolved, images[:n], labels[:n], args.chips,
                                       args.batch_size, progress=not args.quiet))}
        row["est_minus_mc_top1"] = row["est_top1"] - row["mc_top1"]
        results.append(row)
        print(f"{row['label']}: estimate {row['est_top1']:.2f} % ({row['route']}), fc {row['est_fc_snr_db']:.2f} dB | "
              f"MC on these {n} images {row['mc_top1']:.2f} ± {row['mc_top1_se']:.2f} % over {args.chips} chips "
              f"({row['mc_top1_chip_min']:.1f}-{row['mc_top1_chip_max']:.1f}), fc {row['mc_fc_snr_db']:.2f} dB | "
              f"Gaussian, MC moments: {row['gauss_diag_top1']:.2f} (classes independent), "
              f"{row['gauss_cov_top1']:.2f} (class covariance) | without each chip's class bias "
              f"{row['top1_without_chip_bias']:.2f}", flush=True)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(args.out, json.dumps(results, indent=1).encode())   # no partial file
        print(f"results: {args.out}")
    return 0
