"""The machine a measurement ran on: what it is (`machine_info`) and its limit, the measured dense
matmul throughput (`matmul_throughput`), so each stage can be reported as a fraction of what this
machine can do."""

from __future__ import annotations

import platform
import statistics
import time
from pathlib import Path
from typing import Any

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


def processor_name() -> str:
    """The CPU's model name (from /proc/cpuinfo where there is one), else what `platform` knows."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def machine_info(device: str | torch.device = "cpu", peak: bool = True) -> dict[str, Any]:
    """Platform, CPU model, device (and GPU name on CUDA), torch threads, torch and transformers
    versions, and with `peak` the measured fp32 matmul throughput (`matmul_gflops`) on `device`."""
    import transformers

    device = torch.device(device)
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "processor": processor_name(),
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    if peak:
        info["matmul_gflops"] = matmul_throughput(device) / 1e9
    return info
