"""Pictures of an identification run: the gates as a heatmap and the loss curve (matplotlib, Agg backend)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from ..io import save_figure  # noqa: E402


def _save(fig: Any, path: Path) -> None:
    try:
        save_figure(fig, path, bbox_inches="tight")
    finally:
        plt.close(fig)


def plot_gates(gates: np.ndarray, path: Path, title: str) -> None:
    """Heatmap of ``gates [num_layers, num_kv_heads]``: layers down, KV heads across, values written in."""
    layers, heads = gates.shape
    fig, ax = plt.subplots(figsize=(1.6 + 0.7 * heads, 1.2 + 0.22 * layers))
    image = ax.imshow(gates, cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto", interpolation="nearest")
    if layers * heads <= 400:
        for (layer, head), value in np.ndenumerate(gates):
            ax.text(head, layer, f"{value:.2f}", ha="center", va="center", fontsize=6,
                    color="black" if value > 0.6 else "white")
    ax.set_xlabel("KV head")
    ax.set_ylabel("layer")
    ax.set_xticks(range(heads))
    ax.set_yticks(range(0, layers, max(1, layers // 15)))
    ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax, label="gate (1 = retrieval)")
    _save(fig, path)


def plot_history(history: Sequence[dict[str, Any]], path: Path, title: str) -> None:
    """Distillation loss per step (log scale, left); mean gate and relative learning rate (right, 0..1)."""
    steps = [r["step"] for r in history]
    peak = max(r["lr"] for r in history)
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, [max(r["distill"], 1e-12) for r in history], label="distillation MSE", color="tab:blue")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("distillation MSE")
    right = ax.twinx()
    right.plot(steps, [r["mean_gate"] for r in history], label="mean gate", color="tab:orange")
    right.plot(steps, [r["lr"] / peak for r in history], label=f"learning rate / {peak:g}", color="tab:gray",
               linestyle=":")
    right.set_ylim(0.0, 1.05)
    right.set_ylabel("mean gate, relative learning rate")
    lines = ax.get_lines() + right.get_lines()
    ax.legend(lines, [line.get_label() for line in lines], loc="center right", fontsize=8)
    ax.set_title(title, fontsize=9)
    _save(fig, path)


def plot_validation(report: dict[str, Any], path: Path, title: str) -> None:
    """Validation loss (log scale, left) and passkey accuracy, exact and per answer token (right), of the binarised pattern per budget, for the
    trained gates and, when there are any, the selected (refined) ones; full attention's accuracy as a line."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for name, style in (("trained", "o-"), ("selected", "s--")):
        rows = report.get(name) or []
        if not rows:
            continue
        x = [100 * r["budget"] for r in rows]
        left.plot(x, [max(r["loss"], 1e-12) for r in rows], style, label=f"{name} gates")
        right.plot(x, [r["accuracy"] for r in rows], style, label=f"{name} gates: exact")
        right.plot(x, [r.get("token_accuracy", float("nan")) for r in rows], style, alpha=0.5,
                   label=f"{name} gates: answer tokens")
    right.axhline(report["full_accuracy"], color="tab:gray", linestyle=":", label="full attention: exact")
    if "full_token_accuracy" in report:
        right.axhline(report["full_token_accuracy"], color="tab:gray", linestyle="--", label="full attention: tokens")
    left.set_yscale("log")
    left.set_ylabel("distillation MSE (binarised)")
    right.set_ylabel("passkey accuracy (exact / per answer token)")
    right.set_ylim(-0.02, 1.02)
    for ax in (left, right):
        ax.set_xlabel("retrieval heads (% of KV heads)")
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    _save(fig, path)
