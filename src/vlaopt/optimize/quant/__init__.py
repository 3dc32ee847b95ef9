"""Quantization of the LM's linear layers: int8 (dynamic on CPU, weight-only anywhere); step `quantize`."""

from vlaopt.optimize.quant import step  # noqa: F401
from vlaopt.optimize.quant.int8 import Int8Linear

__all__ = ["Int8Linear"]
