"""What ``duoattn bench`` prints and writes: a table, one JSON line, and a plot of decode latency and memory."""

from __future__ import annotations

import json
import os
import platform
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from ..io import atomic_write_bytes, save_figure
from .config import BenchConfig, Row

GIB = float(1 << 30)


def environment(device: torch.device) -> dict[str, Any]:
    import transformers

    from .. import __version__

    env: dict[str, Any] = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "duoattn": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "device": str(device),
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if device.type == "cuda":
        env["device_name"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
        env["gpu_memory_gib"] = round(torch.cuda.get_device_properties(device).total_memory / GIB, 1)
    else:
        env["device_name"] = platform.processor() or platform.machine()
    return env


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _tokens(n: int) -> str:
    if n >= 1 << 20 and n % (1 << 20) == 0:
        return f"{n >> 20}M"
    if n >= 1 << 10 and n % (1 << 10) == 0:
        return f"{n >> 10}K"
    return str(n)


def table(rows: list[Row]) -> str:
    """A fixed-width table, one line per row."""
    head = ("kind", "shape", "path", "retr", "kv", "w", "context", "fill", "ms/tok", "bound ms", "x bound",
            "prefill s", "1st call s", "peak GiB", "KV GiB", "status")
    lines = [head]
    for r in rows:
        lines.append((
            r.kind, r.shape, r.path, f"{r.ratio:.2f}", str(r.kv_bits), str(r.weight_bits),
            _tokens(r.context) if r.context else "-", r.fill or "-",
            _fmt(r.ms_per_token, ".2f"), _fmt(r.bound_ms, ".2f"), _fmt(r.vs_bound, ".2f"), _fmt(r.prefill_s, ".2f"),
            _fmt(r.first_call_s, ".2f"), _fmt(None if r.peak_bytes is None else r.peak_bytes / GIB, ".1f"),
            _fmt(None if r.kv_bytes is None else r.kv_bytes / GIB, ".2f"), r.status,
        ))
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    out = ["  ".join(cell.rjust(w) for cell, w in zip(line, widths)) for line in lines]
    out.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(out)


def _label(r: Row) -> str:
    label = f"{r.shape} {r.path}" + (f" {r.ratio:.0%}" if r.path == "duo" else "")
    if r.kv_bits != 16:
        label += f" int{r.kv_bits} KV"
    if r.weight_bits != 16:
        label += " W8"
    return label


def summary(config: BenchConfig, rows: list[Row], env: dict[str, Any], bandwidth: float | None) -> dict[str, Any]:
    return {
        "bench": "duoattn",
        **env,
        "measured_copy_bandwidth": bandwidth,
        "bound_bandwidth": config.bandwidth,
        "settings": config.to_dict(),
        "rows": [r.to_dict() for r in rows],
    }




def plot(rows: list[Row], path: Path) -> bool:
    """``generate`` decode ms/token and peak memory versus context, one line per setting; the longest contexts as
    bars when there are any. False if nothing to plot."""
    decode = [r for r in rows if r.kind == "generate" and r.fill == "random" and r.status == "ok"
              and r.ms_per_token is not None]
    capacity = [r for r in rows if r.kind == "max_context" and r.status == "ok"]
    if not decode and not capacity:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3 if capacity else 2, figsize=(17 if capacity else 12, 4.5))
    ax_t, ax_m = axes[0], axes[1]
    series: dict[str, list[Row]] = {}
    for r in decode:
        series.setdefault(_label(r), []).append(r)
    for label, rs in sorted(series.items()):
        rs.sort(key=lambda r: r.context)
        style = {"stock": ":", "full": "--", "duo": "-"}[rs[0].path]
        xs = [r.context for r in rs]
        ax_t.plot(xs, [r.ms_per_token for r in rs], style, marker="o", label=label)
        if all(r.peak_bytes is not None for r in rs):
            ax_m.plot(xs, [r.peak_bytes / GIB for r in rs], style, marker="o", label=label)
    for ax, title, unit in ((ax_t, "generate: decode latency", "ms / token"), (ax_m, "peak GPU memory", "GiB")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel(unit)
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
    ax_t.legend(fontsize=7)
    if capacity:
        ax_c = axes[2]
        labels = [_label(r) for r in capacity]
        ax_c.barh(labels, [r.context / 1e6 for r in capacity])
        ax_c.set_xlabel("longest context that fits and decodes (M tokens)")
        ax_c.set_title("capacity")
        ax_c.tick_params(axis="y", labelsize=7)
        ax_c.grid(True, axis="x", alpha=0.3)
    fig.tight_layout()
    try:
        save_figure(fig, path)
    finally:
        plt.close(fig)
    return True


def write_outputs(
    out: str | os.PathLike[str], config: BenchConfig, rows: list[Row], report: dict[str, Any], with_plot: bool = True
) -> Path:
    """``config.json`` (what made the run), ``results.json``, ``table.txt`` and ``decode.png`` under ``out``."""
    directory = Path(out)
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(directory / "config.json", (json.dumps(config.to_dict(), indent=2) + "\n").encode())
    atomic_write_bytes(directory / "results.json", (json.dumps(report, indent=2) + "\n").encode())
    atomic_write_bytes(directory / "table.txt", (table(rows) + "\n").encode())
    if with_plot:
        plot(rows, directory / "decode.png")
    return directory
