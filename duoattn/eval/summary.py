"""Summaries of scored cells: per method, per length, per task, per (length, depth); and the printed table.

A method's ``score`` is the mean over its cells. Methods that differ only by seed (random heads) share a label;
a label's ``score`` is the mean over seeds and ``score_std`` the spread between the seeds' means.
``kv_fraction`` is the method's KV-cache bytes over full attention's on the same prompts (when both ran).
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from typing import Any


def _mean(values: list[float]) -> float:
    return float(statistics.fmean(values)) if values else float("nan")


def _group_mean(cells: list[dict], key: str) -> dict[str, float]:
    groups: dict[str, list[float]] = defaultdict(list)
    for c in cells:
        groups[str(c[key])].append(c["score"])
    return {k: _mean(v) for k, v in groups.items()}


def _method_summary(cells: list[dict], full_bytes: dict[str, int]) -> dict[str, Any]:
    first = cells[0]
    fractions = [c["kv_bytes"] / full_bytes[c["sample"]] for c in cells if full_bytes.get(c["sample"])]
    out: dict[str, Any] = {
        "label": first["label"],
        "kind": first["kind"],
        "sparsity": first["sparsity"],
        "seed": first["seed"],
        "retrieval_ratio": first["retrieval_ratio"],
        "cells": len(cells),
        "score": _mean([c["score"] for c in cells]),
        "kv_bytes": _mean([c["kv_bytes"] for c in cells]),
        "kv_fraction": _mean(fractions) if fractions else None,
        "seconds": sum(c["seconds"] for c in cells),
        "by_length": _group_mean(cells, "length"),
        "by_task": _group_mean(cells, "task"),
    }
    if all("depth" in c for c in cells):
        grid: dict[str, list[float]] = defaultdict(list)
        for c in cells:
            grid[f"{c['length']}/{c['depth']:g}"].append(c["score"])
        out["by_length_depth"] = {k: _mean(v) for k, v in grid.items()}
    return out


def summarize(cells: list[dict[str, Any]]) -> dict[str, Any]:
    """``{"methods": {name: ...}, "labels": {label: ...}}`` in the order the methods first appear."""
    by_method: dict[str, list[dict]] = defaultdict(list)
    for c in cells:
        by_method[c["method"]].append(c)
    full_bytes = {c["sample"]: c["kv_bytes"] for c in by_method.get("full", [])}
    methods = {name: _method_summary(group, full_bytes) for name, group in by_method.items()}
    by_label: dict[str, list[dict]] = defaultdict(list)
    for m in methods.values():
        by_label[m["label"]].append(m)
    labels = {}
    for label, group in by_label.items():
        scores = [m["score"] for m in group]
        fractions = [m["kv_fraction"] for m in group if m["kv_fraction"] is not None]
        labels[label] = {
            "kind": group[0]["kind"],
            "retrieval_ratio": _mean([m["retrieval_ratio"] for m in group]),
            "seeds": len(group),
            "score": _mean(scores),
            "score_std": float(statistics.pstdev(scores)) if len(scores) > 1 else 0.0,
            "kv_fraction": _mean(fractions) if fractions else None,
            "by_length": {
                k: _mean([m["by_length"][k] for m in group if k in m["by_length"]]) for k in group[0]["by_length"]
            },
            "by_task": {k: _mean([m["by_task"][k] for m in group if k in m["by_task"]]) for k in group[0]["by_task"]},
        }
    return {"methods": methods, "labels": labels}


def format_table(summary: dict[str, Any], columns: str = "by_length") -> str:
    """One row per label: the score per length (or per task), overall, retrieval ratio and KV fraction."""
    labels = summary["labels"]
    # lengths in numeric order (digit strings: shorter first), task names alphabetically after them
    keys = sorted({k for s in labels.values() for k in s[columns]}, key=lambda k: (len(k) if k.isdigit() else 99, k))
    head = ["method", *keys, "mean", "retrieval", "KV vs full"]
    rows = []
    for label, s in labels.items():
        spread = f"±{s['score_std']:.2f}" if s["seeds"] > 1 else ""
        kv = "-" if s["kv_fraction"] is None else f"{s['kv_fraction']:.2f}"
        rows.append([label, *(f"{s[columns].get(k, float('nan')):.2f}" for k in keys), f"{s['score']:.2f}{spread}",
                     f"{s['retrieval_ratio']:.2f}", kv])
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    fmt = "  ".join(f"{{:<{w}}}" if i == 0 else f"{{:>{w}}}" for i, w in enumerate(widths))
    return "\n".join(fmt.format(*r) for r in [head, *rows])
