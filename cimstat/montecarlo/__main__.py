"""``python -m cimstat.montecarlo``: run the Monte Carlo referee on a model and print a table.

Example::

    python -m cimstat.montecarlo --model default --config int8 --n-images 200 --instances 3 --json out.json
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from cimstat.cli import run_cli
from cimstat.errors import CimstatError, ConfigError

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m cimstat.montecarlo", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="default", help="model name (default | resnet18-imagenet)")
    p.add_argument("--weights", default=None, help="local weights file (required for resnet18-imagenet)")
    p.add_argument("--config", required=True, help="preset name, JSON file or Python file defining `config`")
    p.add_argument("--n-images", type=int, default=200, help="images to simulate (default 200)")
    p.add_argument("--instances", type=int, default=3, help="chip instances (default 3)")
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--split", default="validation", help="dataset split to simulate (default validation)")
    p.add_argument("--data-root", default=None, help="dataset folder (ImageNet)")
    p.add_argument("--ranges", choices=("probes", "data"), default="probes",
                   help="probes: cimstat.calibrate.resolve on probe files (default); data: max/explicit ranges "
                        "from a float pass over --n-range-images images of the probe split")
    p.add_argument("--probes", default=None, help="probe folder (default: the default model's probes)")
    p.add_argument("--n-range-images", type=int, default=200)
    p.add_argument("--exact-read-noise", action="store_true", help="per-device read noise (slow; tiny models)")
    p.add_argument("--no-isolated", action="store_true", help="skip the isolated per-layer SNRs")
    p.add_argument("--threads", type=int, default=None, help="torch threads")
    p.add_argument("--json", default=None, help="write the result as JSON here")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def _resolve(args: argparse.Namespace, model: torch.nn.Module, config, dataset: str):
    if args.ranges == "data":
        from cimstat.data import loader
        from cimstat.montecarlo import resolve_from_data

        probe_split = "probe"
        return resolve_from_data(model, config, loader(dataset, probe_split, args.batch_size, args.data_root,
                                                       n_images=args.n_range_images))
    try:
        from cimstat.calibrate import resolve
        from cimstat.probes import ensure_default_probes, load_probes
    except ImportError as err:
        raise CimstatError(f"range resolution from probes is unavailable ({err}); use --ranges data") from None
    if args.probes is None:
        if args.model != "default":
            raise ConfigError(f"--probes DIR is required for model {args.model!r} (or use --ranges data)")
        probe_dir = ensure_default_probes(progress=not args.quiet)
    else:
        probe_dir = Path(args.probes)
    probes = load_probes(probe_dir, model)
    return resolve(config, probes)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    for flag in ("n_images", "instances", "batch_size", "n_range_images"):
        if getattr(args, flag) < 1:
            raise ConfigError(f"--{flag.replace('_', '-')}={getattr(args, flag)} must be a positive integer")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    from cimstat.data import loader
    from cimstat.hardware import load_config
    from cimstat.models import load, model_info
    from cimstat.montecarlo import measure

    config = load_config(args.config)
    model = load(args.model, args.weights)
    dataset = model_info(args.model).dataset
    resolved = _resolve(args, model, config, dataset)
    data = loader(dataset, args.split, args.batch_size, args.data_root, n_images=args.n_images)
    result = measure(model, config, resolved, data, instances=args.instances, n_images=args.n_images,
                     isolated=not args.no_isolated, exact_read_noise=args.exact_read_noise,
                     progress=not args.quiet, model_name=args.model)
    print(result.table())
    if args.json:
        result.write_json(args.json)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
