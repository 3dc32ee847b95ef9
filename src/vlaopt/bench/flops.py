"""FLOP counting: `torch.utils.flop_counter` for every op except attention, which is counted
analytically from the shapes of each `scaled_dot_product_attention` call (torch 2.13 counts zero
for SDPA on CPU, and the per-kernel formulas differ across devices)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils.flop_counter import FlopCounterMode


class _SDPACounter(TorchFunctionMode):
    """Adds 4 B H Sq Sk D for every SDPA call (QK^T and PV, a multiply-add = 2 FLOPs)."""

    def __init__(self) -> None:
        super().__init__()
        self.flops = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            q, k = args[0], args[1]
            *batch, sq, d = q.shape
            sk, dv = k.shape[-2], args[2].shape[-1]
            self.flops += 2 * int(torch.tensor(batch).prod()) * sq * sk * (d + dv)
        return func(*args, **kwargs)


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of running `fn()` once."""
    with FlopCounterMode(display=False) as counter, _SDPACounter() as sdpa:
        fn()
    total = 0
    for op, n in counter.get_flop_counts().get("Global", {}).items():
        if "attention" not in str(op):
            total += n
    return total + sdpa.flops
