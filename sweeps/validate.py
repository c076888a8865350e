"""``python -m sweeps.validate sweeps/<file>.py [--n-images N] [--instances K] [--subset EXPR] [--jobs N]
[--resume [RUN_DIR]] [--report docs/validation.md]``: estimate and Monte Carlo side by side."""
from cimstat.cli import run_cli
from cimstat.sweeps.commands import validate_main

if __name__ == "__main__":
    raise SystemExit(run_cli(validate_main))
