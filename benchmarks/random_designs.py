"""Random designs through the engine alone: does every valid configuration give a sane answer?

    python benchmarks/random_designs.py --seed 1 --designs 25 [--out designs.csv]

Draws ``--designs`` valid configurations over every knob (bit widths 3-8 or float, slices, encodings, scales,
array rows, ADC bits / range / mode / thermal noise, device noise of both models, digital first and last
layers), runs :meth:`cimstat.engine.Engine.estimate` on the default probes and flags what a user must never
see: a crash (an exception that is not a :class:`cimstat.errors.CimstatError`), a NaN SNR, a top-1 outside
[0, 1], or a linear-route top-1 more than ``--above-clean`` pp above the float network's (noise does not make
a network better by more than its image sample's noise). Declined estimates (a ``CimstatError`` or a NaN
top-1 with its note) are reported, not flagged. No Monte Carlo: this checks robustness, not accuracy
(``sweeps/`` does that). Prints one line per design and a summary; exits 1 if anything was flagged.
Cold estimates took 0.0-37 s each on an idle 2-core machine (seeds 1 and 2, their ADC calibrations already on
disk; up to 50 s with a first calibration): the caches are per quantization structure, and most draws are new.
"""
from __future__ import annotations

import argparse
import csv
import math
import os
import random
import sys
import time
import traceback

import torch

from cimstat.engine import engine_for
from cimstat.errors import CimstatError, ConfigError
from cimstat.hardware import DIGITAL, HardwareConfig, LayerConfig
from cimstat.probes import ensure_default_probes, load_probes


def draw_design(rng: random.Random) -> tuple[dict, dict]:
    """``(default layer knobs, per-layer overrides)`` of one random design (may be invalid: the caller
    builds the config and draws again on a :class:`ConfigError`)."""
    k: dict = {"input_bits": rng.choice([None, 3, 4, 5, 6, 7, 8, 8]),
               "weight_bits": rng.choice([None, 3, 4, 5, 6, 7, 8, 8])}
    if rng.random() < .3:
        k["weight_scale"] = "per_channel"
    if rng.random() < .3:
        k["weight_encoding"] = "offset"
    if rng.random() < .3:
        k["signed_input_encoding"] = "offset"
    if rng.random() < .2:
        k["input_range"] = "calibrated"
    if k["input_bits"] and rng.random() < .6:
        k["input_slice_bits"] = rng.choice([1, 2, 4])
    if k["weight_bits"] and rng.random() < .6:
        k["weight_slice_bits"] = rng.choice([1, 2, 3, 4])
    if k["input_bits"] and k["weight_bits"] and rng.random() < .7:
        k["rows_per_array"] = rng.choice([32, 64, 128, 256, 512, 1152])
        k["adc_bits"] = rng.choice([4, 5, 6, 7, 8, 9, 10])
        k["adc_range"] = rng.choice(["max", "calibrated", "calibrated"])
        if rng.random() < .3:
            k["adc_mode"] = "separate"
        if rng.random() < .4:
            k["adc_thermal_noise_lsb"] = rng.choice([0.25, 0.5, 1.0, 2.0])
    for knob in ("programming_error", "read_noise"):
        if k["weight_bits"] and rng.random() < .4:
            k[knob] = rng.choice([0.005, 0.01, 0.02, 0.05])
            k[f"{knob}_model"] = rng.choice(["state_independent", "proportional"])
    layers = {name: DIGITAL for name in ("conv1", "fc") if rng.random() < .3}
    return k, layers


def _flags(est, above_clean_pp: float) -> list[str]:
    bad = []
    if math.isnan(est.fc_snr_db) or any(math.isnan(le.snr_db) for le in est.layers.values()):
        bad.append("NaN SNR")
    if not math.isnan(est.top1) and not 0.0 <= est.top1 <= 1.0:
        bad.append("top-1 outside [0, 1]")
    if est.route == "linear" and 100 * (est.top1 - est.top1_clean) > above_clean_pp:
        bad.append(f"top-1 {100 * est.top1:.2f} % above the float network's {100 * est.top1_clean:.2f} %")
    return bad


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--designs", type=int, default=25)
    p.add_argument("--above-clean", type=float, default=0.5, metavar="PP",
                   help="flag a linear-route top-1 this many pp above the float network's (default 0.5)")
    p.add_argument("--out", default="", help="also write one CSV row per design here")
    args = p.parse_args()
    if args.designs < 1:
        p.error("--designs must be at least 1")
    torch.set_num_threads(max(1, int(os.environ.get("CIMSTAT_THREADS", "2"))))
    engine = engine_for(load_probes(ensure_default_probes(progress=False)))
    rng = random.Random(args.seed)
    rows, flagged, declined = [], 0, 0
    while len(rows) < args.designs:
        knobs, layers = draw_design(rng)
        try:
            cfg = HardwareConfig(LayerConfig(**knobs), layers=layers, name=f"random-{len(rows)}")
        except ConfigError:
            continue
        t = time.perf_counter()
        row = {"design": cfg.name, "knobs": repr(knobs), "digital": ",".join(layers), "route": "", "fc_snr_db": "",
               "top1": "", "top1_clean": "", "outcome": "ok", "detail": ""}
        try:
            est = engine.estimate(cfg)
            row.update(route=est.route, fc_snr_db=f"{est.fc_snr_db:.2f}", top1=f"{100 * est.top1:.2f}",
                       top1_clean=f"{100 * est.top1_clean:.2f}")
            bad = _flags(est, args.above_clean)
            if bad:
                row.update(outcome="FLAGGED", detail="; ".join(bad))
            elif math.isnan(est.top1):
                row.update(outcome="declined", detail=est.top1_note)
        except CimstatError as err:
            row.update(outcome="declined", detail=f"{type(err).__name__}: {err}")
        except Exception as err:  # noqa: BLE001 - a crash is what this check looks for
            row.update(outcome="FLAGGED", detail=f"crash {type(err).__name__}: {err}")
            traceback.print_exc()
        row["seconds"] = f"{time.perf_counter() - t:.1f}"
        flagged += row["outcome"] == "FLAGGED"
        declined += row["outcome"] == "declined"
        rows.append(row)
        print(f"{row['seconds']:>6s} s {row['outcome']:8s} {row['route']:9s} fc {row['fc_snr_db']:>7s} dB "
              f"top-1 {row['top1']:>6s} % {row['detail'][:100]} {knobs} {layers or ''}", flush=True)
    routes = {r: sum(x["route"] == r for x in rows) for r in ("linear", "meanfield")}
    print(f"{len(rows)} designs (seed {args.seed}): {routes['linear']} linear route, {routes['meanfield']} mean-field, "
          f"{declined} declined, {flagged} flagged")
    if args.out:
        tmp = f"{args.out}.tmp"
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
        os.replace(tmp, args.out)
    return 1 if flagged else 0


if __name__ == "__main__":
    sys.exit(main())
