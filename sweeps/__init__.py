"""Sweep files (``params_sweep_list`` / ``points``) and their commands.

``python -m sweeps.run sweeps/<file>.py`` estimates every combination;
``python -m sweeps.validate sweeps/<file>.py`` checks them against the Monte Carlo referee.
The logic lives in :mod:`cimstat.sweeps`.
"""
