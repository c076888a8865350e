"""Exception classes a cimstat user can see.

Every error raised on purpose by cimstat derives from :class:`CimstatError`, so a
caller can catch one class; command-line entry points turn it into one line on
stderr and a non-zero exit code (see :func:`cimstat.cli.run_cli`).
"""
from __future__ import annotations


class CimstatError(Exception):
    """Base class of every error cimstat raises on purpose."""


class ConfigError(CimstatError, ValueError):
    """A hardware-config field has an invalid value (the message names the field)."""


class ModelError(CimstatError):
    """Unknown model name, or a weights file that is missing or does not fit."""


class DataError(CimstatError):
    """Unknown dataset or split, or a data folder that is missing or empty."""


class ProbeFileError(CimstatError):
    """A probe file is missing, truncated, unsafe, of an unknown schema or for another model."""


class EstimationError(CimstatError):
    """The analytic engine cannot estimate this combination faithfully."""


class CalibrationError(CimstatError):
    """A calibration is missing, stale or cannot be computed."""


class SweepError(CimstatError):
    """A sweep file or its parameters are invalid."""
