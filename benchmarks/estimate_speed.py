"""Speed of the analytic engine: default network and torchvision ResNet-18 224x224 shapes.

    python benchmarks/estimate_speed.py [--repeats 3] [--mc-images 20] [--precise]

For a few configurations: the median wall time of ``Engine.estimate`` (warm caches for
config-independent data, a fresh config each repeat so per-config work is redone: a new read-noise
level, or a new thermal-noise level under an ADC), and
for the default network the ratio to one Monte Carlo instance on ``--mc-images`` validation
images scaled to the probe set size. ResNet-18 224x224 uses synthetic probes of the true
layer shapes (timing only). Prints CPU time and thread count too, the time of a collapsed configuration
(20-23 % read noise), whose fc SNR and top-1 come from the mean-field route (on 1,000 and on 250 probe images,
with the predicted top-1's image-sampling error), and of a calibrated ADC over a
thermal-noise sweep: the calibration of its ranges (``resolve``, redone per level) and the estimate.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np
import torch

from cimstat.engine import Engine, engine_for
from cimstat.hardware import HardwareConfig, LayerConfig
from cimstat.probes import ActivationStats, LayerNoiseProp, LayerStats, NoiseProp, ProbeSet

CONFIGS = {
    "int8": dict(input_bits=8, weight_bits=8),
    "int8_noise": dict(input_bits=8, weight_bits=8, programming_error=0.03, read_noise=0.02),
    "adc6_r256": dict(input_bits=8, weight_bits=8, rows_per_array=256, adc_bits=6, adc_range=0.0),
    "bitserial_ws2_adc6": dict(input_bits=8, weight_bits=8, input_slice_bits=1, weight_slice_bits=2,
                               rows_per_array=128, adc_bits=6, adc_range=0.0, adc_thermal_noise_lsb=0.5),
    # the slowest kind: device noise under an ADC, per element (as design-in4-w4-adc5 of the validation sweep)
    "in4_w4_adc5_read2": dict(input_bits=4, weight_bits=4, input_slice_bits=2, weight_slice_bits=1,
                              rows_per_array=128, adc_bits=5, adc_range=0.0, adc_thermal_noise_lsb=1.0,
                              read_noise=0.02),
}


def _configs(thermal_offset: float) -> dict[str, HardwareConfig]:
    out = {}
    for name, knobs in CONFIGS.items():
        knobs = dict(knobs)
        if knobs.get("adc_range") == 0.0:
            knobs["adc_range"] = "max"
        if "adc_bits" in knobs:  # a new value each repeat: per-config work is redone, caches of the rest kept
            knobs["adc_thermal_noise_lsb"] = knobs.get("adc_thermal_noise_lsb", 0.0) + thermal_offset
        else:
            knobs["read_noise"] = knobs.get("read_noise", 0.0) + thermal_offset / 100
        out[name] = HardwareConfig(LayerConfig(**knobs), name=name)
    return out


def time_engine(engine: Engine, repeats: int, cold: dict | None = None) -> dict[str, tuple[float, float]]:
    """Median (wall s, CPU s) per config, first call excluded (its times go to ``cold``). Each config's
    repeats run back to back, as in a sweep over noise levels within one quantization structure: five
    structures in turn would evict each other's partial sums from the per-layer cache."""
    res: dict[str, list[tuple[float, float]]] = {n: [] for n in CONFIGS}
    for name in CONFIGS:
        for r in range(repeats + 1):
            cfg = _configs(0.01 * (r + 1))[name]
            resolved = engine.resolve(cfg)
            w0, c0 = time.perf_counter(), time.process_time()
            engine.estimate(cfg, resolved)
            t = (time.perf_counter() - w0, time.process_time() - c0)
            if r > 0:
                res[name].append(t)
            elif cold is not None:
                cold[name] = t
    return {n: (statistics.median(t[0] for t in v), statistics.median(t[1] for t in v)) for n, v in res.items()}


def _print_cold(label: str, cold: dict) -> None:
    for name, (wall, cpu) in cold.items():
        print(f"{label} {name:20s} first call (cold) {1e3 * wall:9.1f} ms (cpu {1e3 * cpu:9.1f} ms)")


def synthetic_imagenet_probes(n_images: int = 64, rank: int = 64, seed: int = 0) -> tuple[ProbeSet, dict]:
    """Probe-shaped random statistics for torchvision ResNet-18 at 224x224 (timing only)."""
    from torchvision.models import resnet18

    from cimstat.network import analog_layers, fold_batchnorm

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = resnet18(num_classes=1000).eval()
    specs = analog_layers(fold_batchnorm(model), torch.zeros(1, 3, 224, 224))
    layers, noise, weights = {}, {}, {}
    edges = np.linspace(-3.0, 3.0, 2049)
    for s in specs:
        k, c_out = s.fan_in, s.out_channels
        kh, kw = s.kernel_size
        c_in = k // (kh * kw)
        signed = s.name == "conv1"
        counts = rng.integers(0, 1000, size=(c_in, 2048)) * (1 if signed else (edges[1:] > 0))
        zeros = rng.integers(0, 100_000, size=c_in) * (0 if signed else 1)
        v = np.linalg.qr(rng.normal(size=(k, min(rank, k))))[0].astype(np.float32)
        layers[s.name] = LayerStats(
            name=s.name, kind=s.kind, weight_shape=tuple(s.weight.shape), stride=s.stride, padding=s.padding,
            dilation=s.dilation, groups=1, fan_in=k, out_channels=c_out, in_channels=c_in, n_positions=49,
            n_patches=49 * n_images, signed_input=signed, input_min=-3.0 if signed else 0.0, input_max=3.0,
            hist_edges=edges, hist_counts=counts.astype(np.int64), zero_counts=zeros.astype(np.int64),
            total_counts=(counts.sum(1) + zeros).astype(np.int64), row_mean=np.full(k, 0.3),
            row_sq_mean=np.full(k, 0.5), out_mean=np.zeros(c_out), out_sq_mean=np.ones(c_out),
            m_method="eig+diag", m_n_patches=49 * n_images, m_eigvecs=v, m_eigvals=np.linspace(k / 10, 1, v.shape[1]),
            m_resid_diag=np.full(k, 0.1))
        noise[s.name] = LayerNoiseProp(s.name, rng.random((c_out, 1000)), rng.random((c_out, k)),
                                       rng.random((c_out, 1000)))
        weights[s.name] = s.weight_matrix.double().numpy()
    logits = rng.normal(size=(n_images, 1000)).astype(np.float32)
    stats = ActivationStats(meta={"model": "resnet18-imagenet"}, layers=layers, logits=logits,
                            labels=rng.integers(0, 1000, n_images))
    return ProbeSet(stats, NoiseProp(meta={}, layers=noise)), weights


def mc_seconds(cfg: HardwareConfig, engine: Engine, n_images: int) -> float:
    from cimstat import data, models
    from cimstat.montecarlo import measure

    images, labels = data.default_tensors("validation")
    idx = torch.linspace(0, len(labels) - 1, n_images).round().long()
    t0 = time.perf_counter()
    measure(models.load("default"), cfg, engine.resolve(cfg), [(images[idx], labels[idx])], instances=1,
            isolated=False, progress=False)
    return (time.perf_counter() - t0) * len(engine.labels) / n_images


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--mc-images", type=int, default=20)
    p.add_argument("--skip-imagenet", action="store_true")
    p.add_argument("--precise", action="store_true",
                   help="also time the precise ADC route (adc_per_image) on the default network, one repeat")
    args = p.parse_args()
    from cimstat.probes import ensure_default_probes, load_probes

    print(f"threads: torch {torch.get_num_threads()}, cpu_count {os.cpu_count()}, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")
    probes = load_probes(ensure_default_probes(progress=False))
    t0 = time.perf_counter()
    engine = engine_for(probes)
    print(f"default: engine set-up {time.perf_counter() - t0:.2f} s (once per probe set)")
    cold: dict = {}
    times = time_engine(engine, args.repeats, cold)
    _print_cold("default ", cold)
    for name, (wall, cpu) in times.items():
        mc = mc_seconds(_configs(0.0)[name], engine, args.mc_images)
        print(f"default  {name:20s} estimate {1e3 * wall:9.1f} ms (cpu {1e3 * cpu:9.1f} ms)  "
              f"MC 1 instance x {len(engine.labels)} images ~{mc:8.1f} s  ratio MC/estimate {mc / wall:9.0f}")
    print(f"default  median over configs: {1e3 * statistics.median(t[0] for t in times.values()):.1f} ms "
          f"(target 20 ms)")
    # the collapse regime: fc SNR and top-1 from the mean-field route (one pass over the probe images)
    # with fewer images (Engine(meanfield_images=), --meanfield-images): faster, with a larger image-sampling error
    collapse = HardwareConfig(LayerConfig(read_noise=0.2), name="read20%")
    for eng in (engine, Engine(probes, meanfield_images=250)):
        eng.estimate(collapse)  # builds the route's network once (reloads the probe images)
        for r in range(args.repeats):
            cfg = HardwareConfig(LayerConfig(read_noise=0.2 + 0.01 * (r + 1)), name="read20%")
            resolved = eng.resolve(cfg)
            w0, c0 = time.perf_counter(), time.process_time()
            est = eng.estimate(cfg, resolved)
            print(f"default  collapse read noise {100 * cfg.default.read_noise:.0f}% ({est.route} route, "
                  f"{min(eng.meanfield_images, len(eng.labels))} images) estimate "
                  f"{1e3 * (time.perf_counter() - w0):9.1f} ms (cpu {1e3 * (time.process_time() - c0):9.1f} ms)  "
                  f"top-1 {100 * est.top1:.2f} ± {100 * est.top1_se:.2f} %, fc {est.fc_snr_db:.2f} dB")
    # a calibrated ADC in a thermal-noise sweep: every level recalibrates the ranges (resolve, in-memory store)
    from cimstat.calibrate import resolve as calibrate
    from cimstat.calibrate.store import CalibrationStore

    for r in range(args.repeats + 1):
        thermal = 0.5 + 0.37 * r
        cfg = HardwareConfig(LayerConfig(input_slice_bits=1, rows_per_array=256, adc_bits=6, adc_range="calibrated",
                                         adc_thermal_noise_lsb=thermal), name="adc6-cal")
        w0, c0 = time.perf_counter(), time.process_time()
        resolved = calibrate(cfg, probes, CalibrationStore(None))
        wall_r, cpu_r = time.perf_counter() - w0, time.process_time() - c0
        w0, c0 = time.perf_counter(), time.process_time()
        engine.estimate(cfg, resolved)
        print(f"default  calibrated adc6 bit-serial, thermal {thermal:.2f} LSB: calibration {1e3 * wall_r:9.1f} ms "
              f"(cpu {1e3 * cpu_r:9.1f} ms){' (first: partial-sum pmfs)' if r == 0 else ''}, estimate "
              f"{1e3 * (time.perf_counter() - w0):9.1f} ms (cpu {1e3 * (time.process_time() - c0):9.1f} ms)")
    if args.precise:
        precise = Engine(probes, adc_per_image=True)
        for name, (wall, cpu) in time_engine(precise, 1).items():
            print(f"precise  {name:20s} estimate {1e3 * wall:9.1f} ms (cpu {1e3 * cpu:9.1f} ms)")
    if not args.skip_imagenet:
        probes_in, weights = synthetic_imagenet_probes()
        t0 = time.perf_counter()
        eng = Engine(probes_in, weights)
        print(f"imagenet-shapes: engine set-up {time.perf_counter() - t0:.2f} s")
        from cimstat.hardware import LayerRanges, ResolvedLayer

        def resolve(cfg: HardwareConfig) -> dict:
            out = {}
            for n, ls in probes_in.stats.layers.items():
                c = cfg.layer(n)
                adc = c.adc_max_range(ls.signed_input, ls.fan_in) if c.adc_bits is not None else None
                out[n] = ResolvedLayer(n, c, LayerRanges(ls.signed_input, 3.0, adc))
            return out
        eng.resolve = resolve  # type: ignore[method-assign]
        cold_in: dict = {}
        warm_in = time_engine(eng, max(1, args.repeats // 2), cold_in)
        _print_cold("imagenet", cold_in)
        for name, (wall, cpu) in warm_in.items():
            print(f"imagenet {name:20s} estimate {1e3 * wall:9.1f} ms (cpu {1e3 * cpu:9.1f} ms)")


if __name__ == "__main__":
    main()
