"""The analytic variance engine: closed-form SNR and top-1 of a network on CIM hardware.

``estimate(probes, config) -> Estimate``: per analog layer and output channel the expected
squared output error by :class:`ErrorSource`, isolated SNR per layer, end-to-end logits SNR
and predicted top-1, with no Monte Carlo and no random sampling. One module per error source
(``input_quantization``, ``weight_quantization``, ``device_noise``, ``adc``), ``layer`` for
one layer's sum, ``network`` for the propagation to the logits.
"""
from cimstat.engine.layer import LayerEstimate, LayerModel, estimate_layer
from cimstat.engine.network import Engine, Estimate, engine_for, estimate
from cimstat.engine.sources import ErrorSource

__all__ = ["estimate", "Estimate", "ErrorSource", "Engine", "engine_for", "LayerEstimate", "LayerModel",
           "estimate_layer"]
