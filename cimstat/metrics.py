"""Definitions shared by every report: SNR in dB (DESIGN.md §4)."""
from __future__ import annotations

import math

__all__ = ["snr_db"]


def snr_db(signal_energy: float, error_energy: float) -> float:
    """``10·log10(Σ ideal² / Σ (noisy - ideal)²)``; ``inf`` for zero error, ``-inf`` for zero signal."""
    if error_energy <= 0:
        return math.inf
    if signal_energy <= 0:
        return -math.inf
    return 10.0 * math.log10(signal_energy / error_energy)
