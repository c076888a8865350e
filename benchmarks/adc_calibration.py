"""Sampled (default) or analytic vs profiled ADC ranges on the default model: ranges side by side, MC top-1.

Design (issue 7 evidence): 8-bit inputs in 2-bit slices (calibrated input ranges), 4-bit differential
weights in 2-bit slices, 256 rows per array, no device noise, ADC bits 3..8.

For each ADC resolution: the ranges of ``--method`` (``sampled``: partial sums of the probed input sample;
``analytic``: modelled from the probe statistics), the profiled ones (one Monte Carlo
pass over probe images with ideal ADCs, histograms of the observed partial sums, shared by every
resolution), the empirical ADC error of both on the profiled histograms, and MC top-1 on evenly spaced
validation images (1 chip) with ``max``, ``--method`` and profiled ranges.

    python benchmarks/adc_calibration.py --bits 3 4 5 6 7 8 --mc-images 300 --profile-images 256
    python benchmarks/adc_calibration.py --bits 3 --mc-images 0          # ranges and errors only
    python benchmarks/adc_calibration.py --method analytic --bits 4 6    # the statistics-only model

Prints as it goes (run with ``python -u`` when writing to a file).
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch


def design(adc_bits: int):
    from cimstat.hardware import HardwareConfig, LayerConfig

    return HardwareConfig(LayerConfig(input_bits=8, weight_bits=4, input_slice_bits=2, weight_slice_bits=2,
                                      rows_per_array=256, adc_bits=adc_bits, input_range="calibrated",
                                      adc_range="calibrated"), name=f"in8s2-w4s2-r256-adc{adc_bits}")


def main() -> None:
    from torch.utils.data import DataLoader, Subset

    from cimstat import data, models
    from cimstat.calibrate import Calibrations, resolve
    from cimstat.calibrate.__main__ import _max_config
    from cimstat.calibrate.adc_range import adc_error, choose_adc_range
    from cimstat.calibrate.profile import profiled_adc_calibrations
    from cimstat.hardware import LayerRanges, ResolvedLayer
    from cimstat.montecarlo import measure
    from cimstat.probes import ensure_default_probes, load_probes

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bits", type=int, nargs="+", default=[3, 4, 5, 6, 7, 8])
    ap.add_argument("--mc-images", type=int, default=300)
    ap.add_argument("--profile-images", type=int, default=256)
    ap.add_argument("--layers", default="conv1,layer1.0.conv1,layer2.0.conv2,layer3.1.conv1,layer4.1.conv2,fc",
                    help="layers whose ranges are printed side by side")
    ap.add_argument("--method", choices=("sampled", "analytic"), default="sampled",
                    help="calibration compared with the profiled one")
    ap.add_argument("--runs", default="max,method,profiled", help="which ranges to measure with the MC")
    ap.add_argument("--probes", default=None, help="probe folder (default: the cached default probes)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    probes = load_probes(args.probes or ensure_default_probes(progress=False))
    stats = probes.stats
    model = models.load("default")
    show = [n for n in args.layers.split(",") if n]

    # one profiling pass (ideal ADCs: the observed partial sums do not depend on the ADC bits)
    t0 = time.perf_counter()
    prof_ctx = Calibrations(None, model=model, method="profiled", profile_images=args.profile_images)
    holder: dict = {}
    profiled_adc_calibrations(prof_ctx, stats, design(args.bits[0]), histograms=holder)
    hist = holder["histograms"]
    print(f"# profiling pass: {args.profile_images} probe images, {time.perf_counter() - t0:.0f} s")

    if args.mc_images > 0:
        val = data.dataset("default", "validation")
        picks = np.unique(np.linspace(0, len(val) - 1, min(args.mc_images, len(val))).round().astype(int))
        loader = DataLoader(Subset(val, picks.tolist()), batch_size=100)

    rows = []
    for bits in args.bits:
        config = design(bits)
        t0 = time.perf_counter()
        chosen = resolve(config, probes, Calibrations(None, model=model, method=args.method))
        t_ana = time.perf_counter() - t0
        profiled: dict = {}
        for name, r in chosen.items():
            cfg = config.layer(name)
            table = cfg.adc_max_range(r.ranges.signed_input, int(stats.layers[name].fan_in))
            best = np.empty_like(table)
            for i in range(table.shape[0]):
                for j in range(table.shape[1]):
                    best[i, j] = choose_adc_range(hist.mixture(name, i, j), float(table[i, j]), bits,
                                                  cfg.adc_signed, cfg.adc_thermal_noise_lsb)[0]
            profiled[name] = ResolvedLayer(name, cfg, LayerRanges(r.ranges.signed_input, r.ranges.input_range,
                                                                  best))
        print(f"\n## ADC {bits} bits ({args.method} calibration of the whole network: {t_ana:.1f} s)")
        print(f"{'layer':18s} {'slice':>5s} {args.method + ' R':>11s} {'profiled R':>11s} {'ratio':>6s} "
              f"{'err/opt':>11s}")
        excess, layer_ratio = [], []
        for name, r in chosen.items():
            cfg = config.layer(name)
            a_tab, p_tab = r.ranges.adc_range, profiled[name].ranges.adc_range
            # shift-and-add weight of each conversion's error in the layer output
            o_in = np.cumsum((0,) + cfg.input_slices(r.ranges.signed_input))
            o_w = np.cumsum((0,) + cfg.weight_slices())
            tot = np.zeros(2)
            for i in range(a_tab.shape[0]):
                for j in range(a_tab.shape[1]):
                    mix = hist.mixture(name, i, j)
                    ea = adc_error(mix, a_tab[i, j], bits, cfg.adc_signed, 0.0)[0]
                    ep = adc_error(mix, p_tab[i, j], bits, cfg.adc_signed, 0.0)[0]
                    floor = 1e-6 * float(mix.probs @ mix.values ** 2)   # both ~exact: ratio 1
                    ratio = (ea + floor) / (ep + floor)
                    tot += 4.0 ** (o_in[i] + o_w[j]) * np.array([ea, ep])
                    excess.append((name, i, j, ratio))
                    if name in show:
                        print(f"{name:18s} {i},{j:>3d} {a_tab[i, j]:11.4g} {p_tab[i, j]:11.4g} "
                              f"{a_tab[i, j] / p_tab[i, j]:6.2f} {ratio:11.3f}")
            layer_ratio.append((name, (tot[0] + 1e-300) / (tot[1] + 1e-300)))
        ratios = np.array([e[3] for e in excess])
        worst = sorted(excess, key=lambda e: -e[3])[:5]
        print(f"empirical ADC error {args.method}/profiled-optimum over {ratios.size} conversions: median "
              f"{np.median(ratios):.3f}, 90 % {np.quantile(ratios, 0.9):.3f}, max {ratios.max():.3f} "
              f"(worst: {', '.join(f'{n}[{i},{j}] {v:.2f}' for n, i, j, v in worst)})")
        lr = np.array([v for _, v in layer_ratio])
        worst_l = max(layer_ratio, key=lambda e: e[1])
        print(f"per layer, shift-and-add weighted ADC error {args.method}/profiled: median {np.median(lr):.3f}, "
              f"max {lr.max():.3f} ({worst_l[0]})")
        if args.mc_images > 0:
            plain = _max_config(config)
            runs = {"max": lambda: (plain, resolve(plain, stats, Calibrations(None, model=model))),
                    "method": lambda: (config, chosen), "profiled": lambda: (config, profiled)}
            top1 = {k: float("nan") for k in runs}
            for label in args.runs.split(","):
                cfg_, res = runs[label]()
                out = measure(model, cfg_, res, loader, 1, isolated=False, progress=False)
                top1[label] = 100 * out.top1_mean
            rows.append((bits, top1["max"], top1["method"], top1["profiled"]))
            print(f"MC top-1 ({len(picks)} validation images, 1 chip): max {top1['max']:.2f} %, {args.method} "
                  f"{top1['method']:.2f} %, profiled {top1['profiled']:.2f} %, float {100 * out.float_top1:.2f} %")
    if rows:
        print(f"\n| ADC bits | max | calibrated ({args.method}) | calibrated (profiled) | {args.method} - profiled |")
        print("|---|---|---|---|---|")
        for bits, m, a, p in rows:
            print(f"| {bits} | {m:.2f} | {a:.2f} | {p:.2f} | {a - p:+.2f} pp |")


if __name__ == "__main__":
    main()
