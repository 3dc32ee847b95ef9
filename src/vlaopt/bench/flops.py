"""FLOP counting: `torch.utils.flop_counter` for every op except attention, which is counted
analytically from the shapes of each `scaled_dot_product_attention` call (torch 2.13 counts zero
for SDPA on CPU, and the per-kernel formulas differ across devices), and int8 dynamic linears
(`quantized.linear_dynamic`, which the flop counter does not see), counted as 2 x inputs x outputs."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils.flop_counter import FlopCounterMode


class _AnalyticCounter(TorchFunctionMode):
    """Adds 4 B H Sq Sk D for every SDPA call (QK^T and PV, a multiply-add = 2 FLOPs) and
    2 x rows x in x out for every int8 dynamic linear."""

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
        out = func(*args, **kwargs)
        if func in (torch.ops.quantized.linear_dynamic, torch.ops.quantized.linear_dynamic.default):
            self.flops += 2 * args[0].numel() * out.shape[-1]
        return out


@contextmanager
def _counting() -> Iterator[Callable[[], int]]:
    """Count FLOPs inside the block; the yielded function returns the count afterwards."""
    with FlopCounterMode(display=False) as counter, _AnalyticCounter() as analytic:
        yield lambda: sum(n for op, n in counter.get_flop_counts().get("Global", {}).items()
                          if "attention" not in str(op)) + analytic.flops


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of running `fn()` once."""
    with _counting() as total:
        fn()
    return total()


class FlopRecorder:
    """A stage recorder (same interface as `StageTimer`) that counts FLOPs per stage instead of time;
    a nested stage such as `lm.prune` is also counted in its enclosing stage, as with time."""

    def __init__(self) -> None:
        self.flops: dict[str, int] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        with _counting() as total:
            yield
        self.flops[name] = self.flops.get(name, 0) + total()


def analytic_lm_flops(config: Any, seq_lens: list[int], batch: int = 1) -> int:
    """Forward FLOPs of a Llama/Qwen-style decoder run with `seq_lens[i]` tokens in layer i:
    q/k/v/o and gated-MLP projections (2 FLOPs per multiply-add) plus full attention over the
    layer's tokens. Used to check the counter and to explain what pruning saves."""
    d, inter = config.hidden_size, config.intermediate_size
    heads, kv = config.num_attention_heads, config.num_key_value_heads
    hd = getattr(config, "head_dim", None) or d // heads
    per_token = 2 * (d * heads * hd * 2 + d * kv * hd * 2 + 3 * d * inter)
    return batch * sum(per_token * s + 4 * heads * hd * s * s for s in seq_lens)
