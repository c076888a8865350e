"""The error sources the engine breaks every layer's output error into."""
from __future__ import annotations

import enum

__all__ = ["ErrorSource", "PER_READ_SOURCES", "FIXED_SOURCES"]


class ErrorSource(str, enum.Enum):
    """One physical cause of output error (the keys of ``LayerEstimate.error``)."""

    INPUT_QUANTIZATION = "input_quantization"    #: input DAC rounding + clipping
    WEIGHT_QUANTIZATION = "weight_quantization"  #: weight code rounding (fixed)
    PROGRAMMING_ERROR = "programming_error"      #: device programming error, fixed per chip (+ clipping bias)
    READ_NOISE = "read_noise"                    #: device read noise, redrawn every read
    ADC_QUANTIZATION = "adc_quantization"        #: ADC rounding + clipping of the partial sums
    ADC_THERMAL_NOISE = "adc_thermal_noise"      #: ADC thermal noise (what it adds to rounding)

    def __str__(self) -> str:
        return self.value


PER_READ_SOURCES = (ErrorSource.INPUT_QUANTIZATION, ErrorSource.READ_NOISE, ErrorSource.ADC_QUANTIZATION,
                    ErrorSource.ADC_THERMAL_NOISE)
FIXED_SOURCES = (ErrorSource.WEIGHT_QUANTIZATION, ErrorSource.PROGRAMMING_ERROR)
