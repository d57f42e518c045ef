"""Draw the data-choice comparison of docs/results.md ("Made on the GPU: seeds and data choices") as a PNG.

One row per data choice (haystack, passkeys, lengths); each point is one identification run, its x the duo-50%
mean over passkey and NIAH at 1K / 2K / 4K on the harness, labelled with its seed. The shipped CPU pattern's mean
(rerun in the same call) is a vertical line.

    python scripts/plot_data_choices.py [RUNS.json [OUT.png]]

Defaults: docs/runs/gpu-nested-2026-12-06.json and docs/img/data_choices.png.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from duoattn.io import save_figure

REPO = Path(__file__).resolve().parent.parent


def plot(runs: dict[str, Any], path: Path) -> Path:
    candidates = runs.get("candidates")
    if not isinstance(candidates, dict) or not candidates:
        raise SystemExit("runs: missing 'candidates' (name -> {data, seed, steps, mean_50})")
    for name, run in candidates.items():
        missing = [k for k in ("data", "seed", "steps", "mean_50") if k not in run]
        if missing:
            raise SystemExit(f"runs: candidate {name!r} lacks {', '.join(missing)} "
                             "(expected data, seed, steps, mean_50)")
    # Runs cut short are labelled with their step count: the one most runs share is the full run.
    full_steps = Counter(run["steps"] for run in candidates.values()).most_common(1)[0][0]
    choices: dict[str, list[tuple[str, dict[str, Any]]]] = {}
    for name, run in candidates.items():
        choices.setdefault(run["data"], []).append((name, run))
    fig = Figure(figsize=(9, 0.9 + 0.55 * len(choices)), layout="constrained")
    ax = fig.subplots()
    for y, (choice, members) in enumerate(choices.items()):
        for name, run in members:
            selected = name == runs.get("selected")
            ax.plot(run["mean_50"], y, marker="*" if selected else "o", markersize=13 if selected else 7,
                    color="#d62728" if selected else "#1f77b4", linestyle="none")
            ax.annotate(f"{run['seed']}" + (f", {run['steps']} steps" if run["steps"] != full_steps else ""),
                        (run["mean_50"], y), textcoords="offset points", xytext=(0, 7), ha="center", fontsize=8)
    shipped = runs.get("shipped_cpu_rerun", {}).get("mean_50")
    if shipped is not None:
        ax.axvline(shipped, color="black", linestyle="--", linewidth=1, label=f"CPU pattern ({shipped:.3f})")
        ax.legend(loc="upper left", fontsize=8)
    ax.set_yticks(range(len(choices)), list(choices))
    ax.set_ylim(-0.6, len(choices) - 0.4)
    ax.invert_yaxis()
    ax.set_xlabel("duo-50% mean, passkey and NIAH at 1K / 2K / 4K (labels: seed)")
    ax.grid(axis="x", alpha=0.3)
    ax.set_title(f"Nested-budget runs by data choice, {runs.get('device', '')}, {runs.get('date', '')}", fontsize=10)
    return save_figure(fig, path, bbox_inches="tight")


def main(argv: list[str]) -> None:
    if len(argv) > 2:
        sys.exit(__doc__)
    source = Path(argv[0]) if argv else REPO / "docs/runs/gpu-nested-2026-12-06.json"
    out = Path(argv[1]) if len(argv) > 1 else REPO / "docs/img/data_choices.png"
    try:
        runs = json.loads(source.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise SystemExit(f"{source}: cannot read the runs as JSON ({err})") from None
    print(plot(runs, out))


if __name__ == "__main__":
    main(sys.argv[1:])
