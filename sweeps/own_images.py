"""``python -m sweeps.own_images sweeps/<file>.py --subset EXPR [--chips K] [--out F.json]``:
the estimate next to a Monte Carlo on its own probe images, every chip's logits kept and taken apart
(:mod:`cimstat.sweeps.own_images`)."""
from cimstat.cli import run_cli
from cimstat.sweeps.own_images import own_images_main

if __name__ == "__main__":
    raise SystemExit(run_cli(own_images_main))
