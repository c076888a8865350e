"""Input and ADC range calibration, and ``resolve`` (every range of a config a number).

``resolve(config, probes, calibrations=None)`` is what the Monte Carlo simulator and the
analytic engine call; ``python -m cimstat.calibrate --probes DIR --config FILE`` prints and
stores the calibrated ranges.
"""
from cimstat.calibrate.ranges import Calibrations, METHODS, resolve
from cimstat.calibrate.store import CalibrationStore

__all__ = ["resolve", "Calibrations", "CalibrationStore", "METHODS"]
