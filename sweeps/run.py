"""``python -m sweeps.run sweeps/<file>.py [--probes DIR] [--out results/] [--jobs N] [--resume [RUN_DIR]]``:
analytic estimates of every combination -> results/<name>/<UTC time>/summary.csv and plots."""
from cimstat.cli import run_cli
from cimstat.sweeps.commands import run_main

if __name__ == "__main__":
    raise SystemExit(run_cli(run_main))
