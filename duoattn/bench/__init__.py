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
    env = environment(device)

    def save(rows: list[Row], final: bool = False) -> None:
        if config.out:  # after every row, so that an interrupted run keeps what it measured
            write_outputs(config.out, config, rows, summary(config, rows, env, bandwidth), with_plot=final)

    rows = run_rows(config, on_row=save)
    report = summary(config, rows, env, bandwidth)
    save(rows, final=True)
    print(table(rows))
    print(json.dumps(report, separators=(",", ":")), flush=True)
    return report
