"""``duoattn bench``: decode and prefill speed, memory and KV bytes of the fast engine against full attention and
transformers' stock path, on named random-weight shapes or a real model."""

from __future__ import annotations

import json

import torch

from ..models import default_device
from .config import BenchConfig, Row
from .report import environment, summary, table, write_outputs
from .run import run_rows
from .timing import copy_bandwidth

__all__ = ["BenchConfig", "Row", "run_bench"]


def run_bench(config: BenchConfig) -> dict:
    """Measure, print the table and then one JSON line (the last line of output), write ``config.out`` if set."""
    device = torch.device(config.device or default_device())
    bandwidth = copy_bandwidth(device)
    rows = run_rows(config)
    report = summary(config, rows, environment(device), bandwidth)
    if config.out:
        write_outputs(config.out, config, rows, report)
    print(table(rows))
    print(json.dumps(report, separators=(",", ":")), flush=True)
    return report
