"""The device's limit: measured dense matmul throughput, so each stage can be reported as a
fraction of what this machine can do."""

from __future__ import annotations

import statistics
import time

import torch


def matmul_throughput(device: str | torch.device = "cpu", size: int = 1024, repeats: int = 10) -> float:
    """Median FLOP/s of a fp32 (size x size) @ (size x size) matmul on `device`."""
    device = torch.device(device)
    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    flops = 2 * size**3
    for _ in range(3):
        a @ b
    rates = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        rates.append(flops / (time.perf_counter() - t0))
    return statistics.median(rates)
