"""Speed of the Monte Carlo referee against float inference.

Models: the default model (64x64 validation digits) and torchvision ResNet-18 at 224x224
(random weights, random images; nothing is downloaded). Configs:
(a) float: the analog copy under the ``ideal`` preset (float inputs and weights);
(b) int8: 8-bit inputs and weights, one slice, ideal ADC, no noise;
(c) bit-serial: 1-bit input slices x 2-bit weight slices, 256 rows per array, 6-bit ADC (max
    range), ADC thermal noise 0.5 LSB, programming error 0.02, read noise 0.01.
Each line prints images/s (wall and CPU time) and the ratio of time per image to plain float
inference of the same torch model. Ranges come from a float pass over the same images.

    python benchmarks/mc_speed.py                 # short default run
    python benchmarks/mc_speed.py --images 32 --images-224 4 --threads 2
    python benchmarks/mc_speed.py --device cuda --images 500 --batch 500 --images-224 64 --batch-224 64

On a CUDA device both the float reference and the analog copy run there (TF32 off for both, as in
``cimstat.montecarlo.measure``); times are synchronised wall-clock times.
"""
from __future__ import annotations

import argparse
import copy
import resource
import time

import torch
from torch import nn

from cimstat.hardware import PRESETS, HardwareConfig, LayerConfig, RangeMode
from cimstat.montecarlo import convert, resolve_from_data
from cimstat.montecarlo.measure import resolve_device

CONFIGS: dict[str, HardwareConfig] = {
    "a-float": PRESETS["ideal"],
    "b-int8": HardwareConfig(LayerConfig(input_bits=8, weight_bits=8), name="int8"),
    "c-bitserial": HardwareConfig(
        LayerConfig(input_bits=8, weight_bits=8, input_slice_bits=1, weight_slice_bits=2, rows_per_array=256,
                    adc_bits=6, adc_range=RangeMode.MAX, adc_thermal_noise_lsb=0.5, programming_error=0.02,
                    read_noise=0.01),
        name="bitserial"),
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, images: torch.Tensor, batch: int) -> tuple[float, float]:
    """(wall s, CPU s) of ``fn`` over ``images`` in batches, after one warm-up batch."""
    with torch.no_grad():
        fn(images[:1])
        _sync(images.device)
        wall, cpu = time.perf_counter(), time.process_time()
        for i in range(0, images.shape[0], batch):
            fn(images[i:i + batch])
        _sync(images.device)
        return time.perf_counter() - wall, time.process_time() - cpu


def _bench(label: str, model: nn.Module, images: torch.Tensor, batch: int) -> None:
    n, device = images.shape[0], images.device
    model = model.eval()
    ref_wall, ref_cpu = _timed(copy.deepcopy(model).to(device), images, batch)
    print(f"{label}: {n} images of {tuple(images.shape[1:])}, batch {batch}, "
          f"float inference {n / ref_wall:.1f} img/s (CPU {ref_cpu / n * 1e3:.1f} ms/img)")
    for name, config in CONFIGS.items():
        resolved = resolve_from_data(model, config, images.cpu())
        analog = convert(model, config, resolved, device=device)
        wall, cpu = _timed(analog, images, batch)
        print(f"  {name:<12} {n / wall:9.2f} img/s  CPU {cpu / n:8.3f} s/img   "
              f"ratio to float: wall {wall / ref_wall:7.1f}x  CPU {cpu / ref_cpu:7.1f}x")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=8, help="default-model images (default 8)")
    p.add_argument("--images-224", type=int, default=2, help="ResNet-18 224x224 images (default 2)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--batch-224", type=int, default=2, help="ResNet-18 224x224 batch (default 2)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    args = p.parse_args()
    device = resolve_device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        print(f"device {torch.cuda.get_device_name(device)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s)")
    if args.images > 0:
        from cimstat.data import loader
        from cimstat.models import load

        images = torch.cat([x for x, _ in loader("default", "validation", 50, n_images=args.images)])[:args.images]
        _bench("default model", load("default"), images.to(device), args.batch)
    if args.images_224 > 0:
        from torchvision.models import resnet18

        torch.manual_seed(0)
        model = resnet18(num_classes=1000).eval()
        images = torch.randn(args.images_224, 3, 224, 224)
        _bench("ResNet-18 224x224 (random weights)", model, images.to(device), args.batch_224)
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
    print(f"peak resident memory {peak_gb:.2f} GB")


if __name__ == "__main__":
    main()
