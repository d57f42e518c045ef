"""Timing and memory probes: CUDA events on a GPU, a monotonic clock elsewhere; medians of many runs."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], object], device: torch.device, warmup: int, iters: int) -> list[float]:
    """Milliseconds of each of ``iters`` calls of ``fn`` after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    if device.type != "cuda":
        out = []
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            out.append((time.perf_counter() - t0) * 1e3)
        return out
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
    for start, end in events:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize(device)
    return [start.elapsed_time(end) for start, end in events]


def time_once_s(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds of one call (for long runs such as a whole prefill)."""
    synchronize(device)
    t0 = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - t0


def median(values: list[float]) -> float:
    return float(statistics.median(values))


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak_bytes(device: torch.device) -> int | None:
    """Peak bytes allocated by PyTorch since the last :func:`reset_peak` (None off the GPU)."""
    if device.type != "cuda":
        return None
    return int(torch.cuda.max_memory_allocated(device))


def copy_bandwidth(device: torch.device, gib: float = 4.0) -> float | None:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read plus bytes written (None off the GPU)."""
    if device.type != "cuda":
        return None
    n = int(gib * (1 << 30)) // 2
    src = torch.empty(n, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    ms = median(time_ms(lambda: dst.copy_(src), device, warmup=3, iters=20))
    del src, dst
    return 2 * n * 2 / (ms * 1e-3)
