"""The Monte Carlo referee: a bit-accurate PyTorch simulation of the hardware model.

It implements the semantics of :mod:`cimstat.hardware` independently of the analytic engine
(it shares only the config):

- :func:`convert` — an analog copy of a model for one chip instance (batch norm folded, every
  Conv2d/Linear an :class:`AnalogLayer`, everything else exact digital logic);
- :func:`measure` — isolated and end-to-end SNR per layer, logits SNR and top-1 over chip
  instances (:class:`MCResult`);
- :func:`resolve_from_data` — ``max``/explicit ranges from a float pass when there are no probes;
- :func:`set_partial_sum_observer` — a hook on every ADC input, for calibration.

Modules: ``quantize`` (codes, slices, ADC), ``layers`` (the analog module, noise modes, the
observer), ``convert``, ``measure``, ``__main__`` (``python -m cimstat.montecarlo``).
"""
from cimstat.montecarlo.convert import analog_modules, convert, input_extrema, resolve_from_data, set_partial_sum_observer
from cimstat.montecarlo.layers import AnalogLayer, PartialSumObserver
from cimstat.montecarlo.measure import MCResult, measure, snr_db

__all__ = ["convert", "measure", "MCResult", "AnalogLayer", "PartialSumObserver", "analog_modules",
           "set_partial_sum_observer", "resolve_from_data", "input_extrema", "snr_db"]
