"""Quantization of the LM's linear layers: int8 (dynamic on CPU, weight-only anywhere) and int4
(weight-only, CPU and CUDA), step `quantize`; SmoothQuant's outlier migration before it, step
`smoothquant`."""

from vlaopt.optimize.quant import smoothquant, step  # noqa: F401
from vlaopt.optimize.quant.int4 import Int4Linear
from vlaopt.optimize.quant.int8 import Int8Linear

__all__ = ["Int4Linear", "Int8Linear"]
