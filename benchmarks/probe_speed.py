"""Cost of probing on the default model.

Prints (CPU seconds of this process, torch threads):
1. activation probing over N images / plain float inference over the same images (target <= 2x);
2. jacobian noise propagation (ratio only, and with weight sensitivities) vs injection, per image
   and extrapolated to every channel of the network (target >= 50x for the ratio);
3. the sizes of the probe files written.

    .venv/bin/python benchmarks/probe_speed.py [--n-images 1000] [--noise-images 32] [--threads 2]
    .venv/bin/python benchmarks/probe_speed.py --only-activations --n-images 300   # quick: step 1 only

The float-inference baseline is plain ``folded(x)`` under ``torch.no_grad`` with the same thread
count and batch size as probing; both are timed in this process (CPU seconds of every thread,
which on a shared machine is steadier than wall time; wall seconds are printed alongside).
Probing runs its statistics on one thread inside the forward hooks; the forward itself keeps the
thread count. ``--repeats`` alternates baseline and probing and reports the median ratio.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def _cpu() -> float:
    return time.process_time()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-images", type=int, default=1000)
    ap.add_argument("--noise-images", type=int, default=32)
    ap.add_argument("--injection-channels", type=int, default=8, help="channels per layer timed by injection")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=100)
    ap.add_argument("--only-activations", action="store_true", help="time activation probing only (step 1)")
    ap.add_argument("--repeats", type=int, default=1, help="alternate baseline/probing this many times (median)")
    ap.add_argument("--m-error", action="store_true",
                    help="also measure quad_form of the stored (sub-sampled/compressed) M against the exact M")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from cimstat import data, models, network
    from cimstat.activation_stats import probe_activations
    from cimstat.noise_propagation import injection_ratio, jacobian_propagation
    from cimstat.probes import ActivationStats, LayerNoiseProp, NoiseProp, write_noise_prop, write_stats

    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, cpus {os.cpu_count()}")
    model = models.load("default")
    folded = network.fold_batchnorm(model)
    images, labels = data.default_tensors("probe")
    images, labels = images[:args.n_images], labels[:args.n_images]
    bs = args.batch_size
    batches = [(images[i:i + bs], labels[i:i + bs]) for i in range(0, len(labels), bs)]

    with torch.no_grad():
        folded(images[:bs])  # warm-up
    ratios, fwd, probe = [], [], []
    for _ in range(max(1, args.repeats)):
        with torch.no_grad():
            t0, w0 = _cpu(), time.perf_counter()
            for x, _ in batches:
                folded(x)
            fwd.append((_cpu() - t0, time.perf_counter() - w0))
        t0, w0 = _cpu(), time.perf_counter()
        layers, logits, labs = probe_activations(folded, batches)
        probe.append((_cpu() - t0, time.perf_counter() - w0))
        ratios.append(probe[-1][0] / fwd[-1][0])
    i = int(np.argsort(ratios)[len(ratios) // 2])
    (t_fwd, w_fwd), (t_probe, w_probe) = fwd[i], probe[i]
    print(f"[activations] {len(labels)} images: float inference {t_fwd:.2f} s CPU ({w_fwd:.2f} s wall), "
          f"probing {t_probe:.2f} s CPU ({w_probe:.2f} s wall), ratio {t_probe / t_fwd:.2f}x CPU "
          f"({w_probe / w_fwd:.2f}x wall) (target <= 2x)" + (f"; ratios of {len(ratios)} repeats "
                                                             f"{', '.join(f'{r:.2f}' for r in ratios)}"
                                                             if len(ratios) > 1 else ""))
    if args.only_activations:
        if args.m_error:
            m_error_report(folded, batches, layers)
        return 0

    n = args.noise_images
    nb = [(images[i:i + 32], labels[i:i + 32]) for i in range(0, n, 32)]
    t0 = _cpu()
    jac_ratio_only, _, _ = jacobian_propagation(folded, nb, weight_sens=False)
    t_jac = _cpu() - t0
    t0 = _cpu()
    jac_full, _, _ = jacobian_propagation(folded, nb)
    t_full = _cpu() - t0
    n_channels = sum(l.out_channels for l in layers.values())
    t_inj = 0.0
    timed = 0
    for name in ["layer1.0.conv1", "layer3.0.conv2", "layer4.1.conv1"]:
        rms = torch.as_tensor(np.sqrt(layers[name].out_sq_mean), dtype=torch.float32)
        t0 = _cpu()
        injection_ratio(folded, name, images[:n], 1e-3 * rms, channels=range(args.injection_channels), draws=4)
        t_inj += _cpu() - t0
        timed += args.injection_channels
    t_inj_all = t_inj / timed * n_channels
    print(f"[noise_prop] {n} images: jacobian ratio {t_jac:.2f} s, jacobian ratio+weight_sens {t_full:.2f} s CPU; "
          f"injection (4 draws) {t_inj / timed:.2f} s per channel -> {t_inj_all:.0f} s for all {n_channels} channels")
    print(f"[noise_prop] speed ratio injection/jacobian: {t_inj_all / t_jac:.0f}x for ratio (target >= 50x), "
          f"{t_inj_all / t_full:.0f}x counting weight sensitivities")

    meta = {"schema_version": 1, "model": "default", "fingerprint": models.weights_fingerprint(model),
            "dataset": "default", "split": "probe", "n_images": len(labs), "seed": 0, "created": "bench"}
    with tempfile.TemporaryDirectory() as tmp:
        p1 = write_stats(ActivationStats(meta, layers, logits, labs), Path(tmp) / "stat.pkl")
        p2 = write_noise_prop(NoiseProp({**meta, "n_images": n, "method": "jacobian"}, jac_full), Path(tmp) / "np.pkl")
        print(f"[files] stat.pkl {p1.stat().st_size / 1e6:.1f} MB, noise_prop.pkl {p2.stat().st_size / 1e6:.1f} MB")
    if args.m_error:
        m_error_report(folded, batches, layers)
    return 0


def m_error_report(folded, batches, layers) -> None:
    """quad_form with the stored M (default settings) vs the exact dense M over the same images:
    10·log10(Σ_c approx / Σ_c exact) for random dW and for 4-/8-bit rounding error of the weights."""
    from cimstat.activation_stats import ProbeSettings, probe_activations
    from cimstat.network import analog_layers

    exact, _, _ = probe_activations(folded, batches, settings=ProbeSettings(m_cost_ratio=None, m_dense_max_k=10**6))
    specs = {s.name: s for s in analog_layers(folded, batches[0][0][:1])}
    rng = np.random.default_rng(0)
    print("[M] layer, K, method, patches used for M / all, quad_form error in dB (sum over channels; worst channel)"
          " for: random dW | 4-bit | 8-bit weight rounding")
    for name, st in layers.items():
        m = exact[name].matrix()
        w = specs[name].weight_matrix.double().numpy()
        cases = [rng.standard_normal(w.shape)]
        for bits in (4, 8):
            step = np.abs(w).max() / (2 ** (bits - 1) - 1)
            cases.append(np.round(w / step) * step - w)
        parts = []
        for dw in cases:
            ref = ((dw @ m) * dw).sum(1)                 # (einsum "ck,kl,cl->c" does not use BLAS: minutes)
            got = st.quad_form(dw)
            total = 10 * np.log10(got.sum() / ref.sum())
            worst = np.max(np.abs(10 * np.log10(np.maximum(got, 1e-300) / np.maximum(ref, 1e-300))))
            parts.append(f"{total:+.3f} ({worst:.2f})")
        print(f"[M] {name:24s} K={st.fan_in:5d} {st.m_method:8s} {st.m_n_patches:6d}/{st.n_patches:6d}  "
              + " | ".join(parts))


if __name__ == "__main__":
    raise SystemExit(main())
