"""The figures of an evaluation (PNG, drawn with matplotlib's Agg canvas; no display needed).

* :func:`niah_heatmap`: one method's needle grid, context length on x, needle depth on y, green = found.
* :func:`budget_sweep`: score against the retrieval-head ratio, and against the KV-cache size, per method.
* :func:`scores_by`: score per length (or per task) for every method, as grouped bars.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from matplotlib.colors import LinearSegmentedColormap
from matplotlib.figure import Figure

from ..io import save_figure

# Red for a missed needle, through yellow, to green for a found one.
FOUND_CMAP = LinearSegmentedColormap.from_list("found", ["#F0496E", "#EBB839", "#0CD79F"])
KIND_STYLE = {
    "full": dict(color="black", linestyle="--"),
    "duo": dict(color="#1f77b4", marker="o"),
    "random": dict(color="#7f7f7f", marker="s"),
    "streaming": dict(color="#d62728", marker="x", markersize=9, linestyle="none"),
}


def _length_label(n: int) -> str:
    return f"{n / 1024:g}K" if n % 256 == 0 else str(n)


def niah_heatmap(
    scores: dict[tuple[int, float], float], title: str, path: str | os.PathLike[str]
) -> Path:
    """``scores[(length, depth)]`` in [0, 1] as a grid: lengths left to right, depths top (0%) to bottom."""
    lengths = sorted({k[0] for k in scores})
    depths = sorted({k[1] for k in scores})
    grid = [[scores.get((n, d), math.nan) for n in lengths] for d in depths]
    fig = Figure(figsize=(1.2 + 0.75 * len(lengths), 1.0 + 0.42 * len(depths)))
    ax = fig.add_subplot()
    image = ax.imshow(grid, cmap=FOUND_CMAP, vmin=0.0, vmax=1.0, aspect="auto")
    ax.set_xticks(range(len(lengths)), [_length_label(n) for n in lengths])
    ax.set_yticks(range(len(depths)), [f"{100 * d:g}%" for d in depths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth")
    found = [v for row in grid for v in row if not math.isnan(v)]
    mean = sum(found) / max(1, len(found))
    ax.set_title(f"{title}  (mean {mean:.2f})")
    fig.colorbar(image, ax=ax, label="needle words recovered")
    return save_figure(fig, path, bbox_inches="tight")


def budget_sweep(summary: dict[str, Any], title: str, path: str | os.PathLike[str]) -> Path:
    """Score against the retrieval-head ratio (left) and the measured KV fraction of full attention (right)."""
    labels = summary["labels"]
    has_kv = any(s["kv_fraction"] is not None for s in labels.values())
    fig = Figure(figsize=(11 if has_kv else 5.8, 4.2))
    axes = fig.subplots(1, 2 if has_kv else 1, squeeze=False)[0]
    for ax, x_key, x_label in zip(
        axes, ("retrieval_ratio", "kv_fraction"), ("retrieval-head ratio", "KV cache, fraction of full attention")
    ):
        for kind in ("duo", "random", "streaming"):
            points = sorted(
                (s[x_key], s["score"], s["score_std"])
                for s in labels.values()
                if s["kind"] == kind and s[x_key] is not None
            )
            if points:
                xs, ys, errs = zip(*points)
                style = KIND_STYLE[kind]
                name = {"duo": "DuoAttention", "random": "random heads", "streaming": "StreamingLLM"}[kind]
                if kind == "random" and any(errs):
                    ax.errorbar(xs, ys, yerr=errs, capsize=3, label=f"{name} (mean ± sd over seeds)", **style)
                else:
                    ax.plot(xs, ys, label=name, **style)
        if "full" in labels:
            ax.axhline(labels["full"]["score"], label="full attention", **KIND_STYLE["full"])
        ax.set_xlim(-0.03, 1.03)
        ax.set_ylim(-0.03, 1.03)
        ax.set_xlabel(x_label)
        ax.set_ylabel("score")
        ax.grid(alpha=0.3)
    axes[0].legend(loc="lower right", fontsize=8)
    fig.suptitle(title)
    return save_figure(fig, path, bbox_inches="tight")


def scores_by(summary: dict[str, Any], key: str, title: str, path: str | os.PathLike[str]) -> Path:
    """Grouped bars: one group per length (``key="by_length"``) or task (``"by_task"``), one bar per method."""
    labels = summary["labels"]
    groups = list(dict.fromkeys(k for s in labels.values() for k in s[key]))
    if key == "by_length":
        groups.sort(key=int)
    width = 0.8 / max(1, len(labels))
    fig = Figure(figsize=(max(6.0, 0.35 * len(groups) * len(labels) + 2), 4.2))
    ax = fig.add_subplot()
    for i, (label, s) in enumerate(labels.items()):
        xs = [g + (i - (len(labels) - 1) / 2) * width for g in range(len(groups))]
        ax.bar(xs, [s[key].get(g, math.nan) for g in groups], width, label=label)
    names = [_length_label(int(g)) for g in groups] if key == "by_length" else groups
    slanted = key != "by_length"
    ax.set_xticks(range(len(groups)), names, rotation=35 if slanted else 0, ha="right" if slanted else "center")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("score")
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    return save_figure(fig, path, bbox_inches="tight")
