"""Where a decode step's GPU time goes: kernel time per category from the PyTorch profiler (CUPTI)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .timing import synchronize

MATMUL = ("gemm", "gemv", "cutlass", "xmma", "nvjet", "cublas", "splitk", "matmul")
ATTENTION = ("_decode_kernel", "_combine_kernel", "_append_kernel", "flash", "fmha", "attention", "efficient")


def category(name: str) -> str:
    low = name.lower()
    if any(key in low for key in MATMUL):
        return "matmul"
    if any(key in low for key in ATTENTION):
        return "attention"
    return "other"


def kernel_profile(fn: Callable[[], object], device: torch.device, iters: int = 3) -> dict[str, Any] | None:
    """Per call of ``fn``: GPU milliseconds by category (matmul, attention, other), kernel count, top kernels.
    Kernels launched from a CUDA graph are included when CUPTI reports them; None off the GPU."""
    if device.type != "cuda":
        return None
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    synchronize(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        synchronize(device)
    per_cat: dict[str, float] = {"matmul": 0.0, "attention": 0.0, "other": 0.0}
    per_name: dict[str, float] = {}
    count = 0
    for evt in prof.events():
        if getattr(evt, "device_type", None) != DeviceType.CUDA:
            continue
        us = evt.time_range.elapsed_us()
        per_cat[category(evt.name)] += us
        per_name[evt.name] = per_name.get(evt.name, 0.0) + us
        count += 1
    top = sorted(per_name.items(), key=lambda kv: -kv[1])[:6]
    return {
        "kernel_ms": {k: round(v / iters / 1e3, 4) for k, v in per_cat.items()},
        "kernel_ms_total": round(sum(per_cat.values()) / iters / 1e3, 4),
        "kernels_per_step": count / iters,
        "top": [[name[:80], round(us / iters / 1e3, 4)] for name, us in top],
    }
