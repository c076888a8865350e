"""``python -m sweeps.mc_jobs BUNDLE --device cuda --out results.jsonl [--claims DIR] [--time-budget S]``: run the
Monte Carlo jobs exported by ``python -m sweeps.validate --export-mc-jobs`` (e.g. on a GPU machine)."""
from cimstat.cli import run_cli
from cimstat.sweeps.commands import mc_jobs_main

if __name__ == "__main__":
    raise SystemExit(run_cli(mc_jobs_main))
