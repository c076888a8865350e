"""cimstat: closed-form SNR and accuracy loss of neural networks on analog compute-in-memory
hardware, with a bit-accurate Monte Carlo referee.

Top-level shortcuts (imported lazily so ``import cimstat`` stays light):

- :func:`cimstat.load_probes` — read probe files (``stat.pkl``, ``noise_prop.pkl``).
- :func:`cimstat.estimate` — the analytic engine: per-layer error breakdown, SNRs, top-1.
"""
from __future__ import annotations

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "load_probes": ("cimstat.probes", "load_probes"),
    "estimate": ("cimstat.engine", "estimate"),
    "HardwareConfig": ("cimstat.hardware", "HardwareConfig"),
    "LayerConfig": ("cimstat.hardware", "LayerConfig"),
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module, attr = _LAZY[name]
        return getattr(import_module(module), attr)
    raise AttributeError(f"module 'cimstat' has no attribute {name!r}")
