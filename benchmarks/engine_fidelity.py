"""Engine vs Monte Carlo on the default model: conv1, per-layer isolated, fc SNR and top-1.

    python benchmarks/engine_fidelity.py --images 200 --instances 2 [--configs NAME ...]

MC runs on the validation split (never the probed images). Prints one line per config and
writes a CSV (``--out``). The full 30+ configuration validation sweep lives in ``sweeps/``.
"""
from __future__ import annotations

import argparse
import csv
import math
import os
import tempfile
import time

import numpy as np
import torch

from cimstat import data, models
from cimstat.engine import engine_for
from cimstat.hardware import HardwareConfig, LayerConfig
from cimstat.montecarlo import measure
from cimstat.probes import ensure_default_probes, load_probes

CONFIGS: dict[str, dict] = {
    "w4": dict(input_bits=None, weight_bits=4),
    "in4": dict(input_bits=4, weight_bits=None),
    "int6": dict(input_bits=6, weight_bits=6),
    "int8_prog5_si": dict(input_bits=8, weight_bits=8, programming_error=0.05),
    "int8_read5_prop_ws2": dict(input_bits=8, weight_bits=8, weight_slice_bits=2, read_noise=0.05,
                                read_noise_model="proportional"),
    "adc6_cal_r256": dict(input_bits=8, weight_bits=8, rows_per_array=256, adc_bits=6, adc_range="calibrated"),
    "adc8_max_r128_th1": dict(input_bits=8, weight_bits=8, rows_per_array=128, adc_bits=8,
                              adc_thermal_noise_lsb=1.0),
    "offset_w_adc7_cal": dict(input_bits=8, weight_bits=8, weight_encoding="offset", rows_per_array=64, adc_bits=7,
                              adc_range="calibrated"),
    "bitserial_ws2_adc6": dict(input_bits=8, weight_bits=8, input_slice_bits=1, weight_slice_bits=2,
                               rows_per_array=128, adc_bits=6, adc_range="calibrated", adc_thermal_noise_lsb=0.5),
    "combo_collapse": dict(input_bits=5, weight_bits=5, rows_per_array=512, adc_bits=5, adc_range="calibrated",
                           programming_error=0.08, read_noise=0.04),
}


def _strided_batches(n: int, batch: int = 50) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``n`` validation images evenly spread over the split (the split is sorted by class)."""
    images, labels = data.default_tensors("validation")
    idx = torch.linspace(0, len(labels) - 1, min(n, len(labels))).round().long()
    return [(images[idx[i:i + batch]], labels[idx[i:i + batch]]) for i in range(0, len(idx), batch)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=200)
    p.add_argument("--instances", type=int, default=2)
    p.add_argument("--configs", nargs="*", default=list(CONFIGS))
    p.add_argument("--out", default="")
    args = p.parse_args()
    torch.set_num_threads(max(1, int(os.environ.get("CIMSTAT_THREADS", "1"))))
    probes = load_probes(ensure_default_probes(progress=False))
    engine = engine_for(probes)
    model = models.load("default")
    rows = []
    for name in args.configs:
        cfg = HardwareConfig(LayerConfig(**CONFIGS[name]), name=name)
        resolved = engine.resolve(cfg)
        t0 = time.perf_counter()
        est = engine.estimate(cfg, resolved)
        t_est = time.perf_counter() - t0
        t0 = time.perf_counter()
        loader = _strided_batches(args.images)
        mc = measure(model, cfg, resolved, loader, instances=args.instances, n_images=args.images,
                     progress=False, model_name="default")
        t_mc = time.perf_counter() - t0
        diffs = {n: est.layers[n].snr_db - mc.isolated_snr_db[n] for n in est.layers}
        finite = [abs(v) for v in diffs.values() if math.isfinite(v)]
        row = {"config": name, "conv1_est": est.conv1_snr_db, "conv1_mc": mc.conv1_snr_db,
               "layer_med_abs_db": float(np.median(finite)) if finite else math.nan,
               "layer_max_abs_db": float(np.max(finite)) if finite else math.nan,
               "worst_layer": max(diffs, key=lambda n: abs(diffs[n]) if math.isfinite(diffs[n]) else -1),
               "fc_est": est.fc_snr_db, "fc_mc": mc.fc_snr_db, "top1_est": 100 * est.top1,
               "top1_mc": 100 * mc.top1_mean, "top1_mc_std": 100 * mc.top1_std, "t_est_s": t_est, "t_mc_s": t_mc}
        for n in ("layer1.0.conv1", "layer3.1.conv2", "layer4.1.conv2", "fc"):
            row[f"{n}_est"] = est.layers[n].snr_db
            row[f"{n}_mc"] = mc.isolated_snr_db[n]
        rows.append(row)
        print(f"{name:22s} conv1 {row['conv1_est']:6.2f}/{row['conv1_mc']:6.2f}  layers med|d| "
              f"{row['layer_med_abs_db']:.2f} max|d| {row['layer_max_abs_db']:.2f} ({row['worst_layer']})  "
              f"fc {row['fc_est']:6.2f}/{row['fc_mc']:6.2f}  top1 {row['top1_est']:5.1f}/{row['top1_mc']:5.1f}  "
              f"t {t_est:.2f}s/{t_mc:.0f}s", flush=True)
    if args.out and rows:
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(args.out)) or ".", suffix=".tmp")
        with os.fdopen(fd, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
        os.replace(tmp, args.out)


if __name__ == "__main__":
    main()
