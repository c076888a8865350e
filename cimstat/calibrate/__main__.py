"""``python -m cimstat.calibrate --probes DIR --config FILE``: calibrate, print and store the ranges.

Prints one line per analog layer (input sign, input range chosen vs ``max``, ADC range per
(input slice, weight slice) and the expected ADC error relative to the ``max`` range) and
stores the calibrations under ``DIR/calibrations`` (keyed by everything they depend on; found
there next time). ``--compare`` computes the sampled, analytic and profiled ADC ranges side by side;
``--mc-images N`` measures Monte Carlo top-1 on N validation images with ``max`` and with the
calibrated ranges.
"""
from __future__ import annotations

import argparse
import time
from typing import Any

import numpy as np

from cimstat.cli import run_cli
from cimstat.errors import CalibrationError
from cimstat.hardware import HardwareConfig, RangeMode, load_config


def _fmt_table(table: np.ndarray | None) -> str:
    if table is None:
        return "ideal"
    return "[" + "; ".join(" ".join(f"{v:.4g}" for v in row) for row in np.asarray(table)) + "]"


def _max_config(config: HardwareConfig) -> HardwareConfig:
    """The config with every ``calibrated`` range replaced by ``max``."""
    def fix(over: dict[str, Any]) -> dict[str, Any]:
        return {k: (RangeMode.MAX if k in ("input_range", "adc_range") and str(v) == "calibrated" else v)
                for k, v in over.items()}
    default = config.default.replace(**{k: RangeMode.MAX for k in ("input_range", "adc_range")
                                        if getattr(config.default, k) is RangeMode.CALIBRATED})
    return HardwareConfig(default=default, layers={n: fix(dict(o)) for n, o in config.layers.items()},
                          seed=config.seed, name=(config.name + " (max ranges)").strip())


def print_ranges(resolved: dict, calibrations: Any, stats: Any, title: str) -> None:
    print(f"# {title}")
    print(f"{'layer':24s} {'sign':>4s} {'x_max':>9s} {'max|x|':>9s}  ADC range R [input slice; weight slice]"
          "  (expected ADC error / error at max, method)")
    for name, r in resolved.items():
        ls = stats.layers[name]
        abs_max = max(abs(float(ls.input_min)), abs(float(ls.input_max)))
        x = "float" if r.ranges.input_range is None else f"{r.ranges.input_range:.4g}"
        rec = calibrations.records.get(("adc", name))
        ratio = ""
        if rec is not None:
            err, err_max = np.asarray(rec["expected_error"]), np.asarray(rec["expected_error_max"])
            ratio = f"  ({float(err.sum()) / max(float(err_max.sum()), 1e-300):.3g}, {rec.get('method', '?')})"
        print(f"{name:24s} {'±' if r.ranges.signed_input else '+':>4s} {x:>9s} {abs_max:9.4g}  "
              f"{_fmt_table(r.ranges.adc_range)}{ratio}")


def main(argv: list[str] | None = None) -> int:
    from cimstat import models
    from cimstat.calibrate.ranges import METHODS, Calibrations, resolve
    from cimstat.probes import load_probes

    ap = argparse.ArgumentParser(prog="python -m cimstat.calibrate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--probes", required=True, help="probe folder holding stat.pkl")
    ap.add_argument("--config", required=True, help="hardware config: preset name, .json or .py file")
    ap.add_argument("--method", choices=METHODS, default="sampled",
                    help="ADC calibration from the partial sums of the probed input sample (sampled), modelled from "
                         "the probe statistics (analytic) or from Monte Carlo partial sums (profiled)")
    ap.add_argument("--compare", action="store_true", help="compute the ADC ranges of every method side by side")
    ap.add_argument("--profile-images", type=int, default=256, help="probe-split images for profiling")
    ap.add_argument("--profiled-layers", default="",
                    help="comma-separated layers whose ADC ranges are profiled whatever --method is")
    ap.add_argument("--weights", default=None, help="model weights file (models other than 'default')")
    ap.add_argument("--mc-images", type=int, default=0,
                    help="also measure MC top-1 on this many validation images with max and calibrated ranges")
    ap.add_argument("--progress", action="store_true", help="show progress bars")
    args = ap.parse_args(argv)
    if args.profile_images < 1:
        raise CalibrationError(f"--profile-images={args.profile_images} must be at least 1")
    probes = load_probes(args.probes)
    config = load_config(args.config)
    stats = probes.stats
    model_name = stats.meta.get("model")
    model = models.load(model_name, args.weights) if (args.weights or model_name == "default") else None
    store = probes.directory / "calibrations"
    methods = METHODS if args.compare else (args.method,)
    results = {}
    for method in methods:
        cal = Calibrations(store, model=model, method=method, profile_images=args.profile_images,
                           profiled_layers=[n for n in args.profiled_layers.split(",") if n],
                           progress=args.progress)
        t0 = time.perf_counter()
        resolved = resolve(config, probes, cal)
        used = sorted({rec.get("method", method) for (kind, _), rec in cal.records.items() if kind == "adc"})
        results["/".join(used) or method] = resolved
        print_ranges(resolved, cal, stats, f"{method} calibration ({time.perf_counter() - t0:.1f} s; computed "
                                           f"{cal.store.computed}, found {cal.store.loaded} in {store})")
    if args.mc_images > 0:
        from cimstat import data
        from cimstat.montecarlo import measure

        if model is None:
            raise CalibrationError("--mc-images needs the model weights (--weights)")
        from torch.utils.data import DataLoader, Subset

        val = data.dataset(stats.meta.get("dataset"), "validation", stats.meta.get("data_root"))
        # evenly spaced over the split (the default split is stored class by class)
        picks = np.unique(np.linspace(0, len(val) - 1, min(args.mc_images, len(val))).round().astype(int))
        loader = DataLoader(Subset(val, picks.tolist()), batch_size=100)
        plain = _max_config(config)
        runs = [("max", plain, resolve(plain, probes, Calibrations(store, model=model)))]
        runs += [(f"calibrated ({m})", config, r) for m, r in results.items()]
        print(f"# Monte Carlo top-1 on {len(picks)} validation images, evenly spaced (chip seed {config.seed})")
        for label, cfg, res in runs:
            out = measure(model, cfg, res, loader, 1, isolated=False, progress=args.progress)
            print(f"{label:24s} top-1 {100 * out.top1_mean:6.2f} %   logits SNR {out.logits_snr_db:6.2f} dB   "
                  f"(float {100 * out.float_top1:.2f} %)")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
