"""Quantization of the LM's linear layers: int8 (dynamic on CPU, weight-only anywhere), step
`quantize`; SmoothQuant's outlier migration before it, step `smoothquant`."""

from vlaopt.optimize.quant import smoothquant, step  # noqa: F401
from vlaopt.optimize.quant.int8 import Int8Linear

__all__ = ["Int8Linear"]
