"""Sweeps: many hardware combinations at once, estimated and checked against Monte Carlo.

- :mod:`cimstat.sweeps.spec` — sweep files: ``params_sweep_list``, ``points``, ``fixed``,
  per-layer overrides; expanded into validated combinations.
- :mod:`cimstat.sweeps.rundir` — run folders: ``INCOMPLETE`` marker, row journal, atomic files.
- :mod:`cimstat.sweeps.runner` — evaluating combinations (parallel processes, ``--resume``).
- :mod:`cimstat.sweeps.evaluators` — one row: the analytic estimate, or estimate + Monte Carlo.
- :mod:`cimstat.sweeps.subset` — ``--subset`` expressions.
- :mod:`cimstat.sweeps.plots`, :mod:`cimstat.sweeps.report` — PNG plots, console table,
  ``docs/validation.md``.
- :mod:`cimstat.sweeps.commands` — ``python -m sweeps.run`` and ``python -m sweeps.validate``.
"""
from cimstat.sweeps.spec import Combination, SweepSpec, build_sweep, load_sweep

__all__ = ["Combination", "SweepSpec", "build_sweep", "load_sweep"]
