"""Draw the pattern-quality table of docs/results.md ("Targets for the 25% budget") as a PNG.

One panel per task (passkey, NIAH) and budget (25%, 50%): score against prompt length for full attention, each
pattern and random heads, with the target (a fraction of full attention's score) as a dotted line.

    python scripts/plot_pattern_targets.py [TABLE.json [OUT.png]]

Defaults: docs/runs/pattern-targets-2026-12-06.json and docs/img/pattern_targets.png.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from duoattn.io import save_figure

REPO = Path(__file__).resolve().parent.parent
PATTERN_STYLE = {
    "shipped": dict(color="#2ca02c", marker="^"),
    "refined-100": dict(color="#1f77b4", marker="o"),
    "refined-180": dict(color="#ff7f0e", marker="D"),
    "soft": dict(color="#2ca02c", marker="^"),
    "shipped (hard)": dict(color="#d62728", marker="o"),
    "hard-160": dict(color="#9467bd", marker="D"),
    "hard-160+30 (GPU)": dict(color="#8c564b", marker="v"),
    "hard-10 (CPU)": dict(color="#9467bd", marker="D"),
    "GPU, 100 steps at 2-8K": dict(color="#8c564b", marker="v"),
    "oracle 25%+50% (tasks)": dict(color="#1f77b4", marker="o"),
    "oracle 25% (tasks)": dict(color="#ff7f0e", marker="P"),
    "oracle 25% (tasks, from soft)": dict(color="#17becf", marker="X"),
    "hard-80 (previous)": dict(color="#d62728", marker="o"),
    "nested, CPU (shipped)": dict(color="#2ca02c", marker="^", linewidth=2.5),
    "nested, GPU, 70 steps": dict(color="#1f77b4", marker="D"),
    "nested, qa, 2-8K, 30 steps": dict(color="#8c564b", marker="v"),
    "both budgets, answers": dict(color="#ff7f0e", marker="P"),
}
TASK_NAME = {"passkey": "passkey", "niah": "NIAH"}


def _checked(table: dict[str, Any]) -> dict[str, Any]:
    """``table`` itself, after checking that every row has one score (or null) per length and task."""
    for key in ("lengths", "tasks", "targets", "rows"):
        if key not in table:
            raise SystemExit(f"table: missing key {key!r} (expected lengths, tasks, targets, rows)")
    n = len(table["lengths"])
    for row in table["rows"]:
        for task in table["tasks"]:
            if len(row.get(task, ())) != n:
                raise SystemExit(f"table: row {row.get('label')!r} needs {n} {task} scores, one per length")
    return table


def plot(table: dict[str, Any], path: Path) -> Path:
    lengths = table["lengths"]
    rows = table["rows"]
    full = next(r for r in rows if r["method"] == "full")
    budgets = sorted({r["budget"] for r in rows if r["method"] == "duo"})
    fig = Figure(figsize=(11, 0.6 + 3.6 * len(budgets)), layout="constrained")
    axes = fig.subplots(len(budgets), len(table["tasks"]), squeeze=False)
    targets_label = "target: " + ", ".join(
        f"{100 * table['targets'][f'duo-{100 * b:.0f}%']:.0f}% of full at {100 * b:.0f}%" for b in budgets
    )
    for i, budget in enumerate(budgets):
        name = f"duo-{100 * budget:.0f}%"
        target = table["targets"][name]
        for j, task in enumerate(table["tasks"]):
            ax = axes[i][j]
            ax.plot(lengths, full[task], color="black", linestyle="--", label="full attention")
            ax.plot(lengths, [target * s for s in full[task]], color="black", linestyle=":", linewidth=1,
                    label=targets_label)
            for row in rows:
                if row["budget"] != budget or row["method"] == "full":
                    continue
                points = [(n, s) for n, s in zip(lengths, row[task]) if s is not None]
                xs, ys = zip(*points)
                if row["method"] == "random":
                    ax.plot(xs, ys, color="#7f7f7f", marker="s", label="random heads (seed 0)")
                else:
                    missing = [f"{n // 1024}K" for n, s in zip(lengths, row[task]) if s is None]
                    label = row["pattern"] + (f" ({', '.join(missing)} not run)" if missing else "")
                    ax.plot(xs, ys, label=label, **PATTERN_STYLE.get(row["pattern"], {}))
            ax.set_xscale("log", base=2)
            ax.set_xticks(lengths, [f"{n // 1024}K" for n in lengths])
            ax.minorticks_off()
            ax.set_ylim(-0.03, 1.05)
            ax.set_xlabel("prompt length (tokens)")
            ax.set_ylabel("score")
            ax.set_title(f"{TASK_NAME.get(task, task)}, {100 * budget:.0f}% retrieval heads")
            ax.grid(alpha=0.3)
    # One legend for all panels (inside a panel it would hide points); a pattern run at one budget only shows in
    # that budget's panels, so the entries are gathered from every panel.
    entries: dict[str, Any] = {}
    for ax in axes.flat:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            entries.setdefault(label, handle)
    fig.legend(list(entries.values()), list(entries), loc="outside lower center", ncol=4, fontsize=9)
    fig.suptitle(f"SmolLM2-135M-Instruct, {table.get('device', '')}, {table.get('date', '')}")
    return save_figure(fig, path, bbox_inches="tight")


def main(argv: list[str]) -> None:
    if len(argv) > 2:
        sys.exit(__doc__)
    source = Path(argv[0]) if argv else REPO / "docs/runs/pattern-targets-2026-12-06.json"
    out = Path(argv[1]) if len(argv) > 1 else REPO / "docs/img/pattern_targets.png"
    try:
        table = json.loads(source.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise SystemExit(f"{source}: cannot read the table as JSON ({err})") from None
    print(plot(_checked(table), out))


if __name__ == "__main__":
    main(sys.argv[1:])
