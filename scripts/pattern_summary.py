"""Print the summary of a ``scripts/gpu_pattern.sh`` run: the validation report, the selection, and passkey / NIAH
accuracy per method and length.

    python scripts/pattern_summary.py OUT_ROOT
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from duoattn.identify.validate import validation_table


def _load(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def main(root: Path) -> None:
    validation = _load(root / "pattern" / "validation.json")
    if validation is not None:
        print(validation_table(validation))
    selection = _load(root / "pattern" / "selection.json")
    for b in (selection or {}).get("budgets", []):
        print(f"selection at {100 * b['budget']:.0f}% ({b['retrieval_heads']} heads): validation loss "
              f"{b['loss_before']:.4g} -> {b['loss_after']:.4g}, {b['accepted']} of {b['evaluations']} swaps kept, "
              f"added {b['added']}, removed {b['removed']}")
    columns, table = [], {}
    for task in ("passkey", "niah"):
        runs = sorted(root.glob(f"{task}-*"), key=lambda p: int(p.name.split("-")[1]) if p.name.split("-")[1].isdigit()
                      else 0)
        for run in runs:
            results = _load(run / "results.json")
            if results is None or not run.is_dir():
                continue
            column = f"{task} {run.name.split('-')[1]}"
            columns.append(column)
            for label, summary in results["summary"]["labels"].items():
                table.setdefault(label, {})[column] = summary["score"]
    if not columns:
        print("no eval results")
        return
    width = max(len(c) for c in columns)
    print(f"{'method':<12}" + "".join(f"{c:>{width + 2}}" for c in columns))
    for label, row in table.items():
        cells = "".join(f"{row[c]:>{width + 2}.2f}" if c in row else f"{'-':>{width + 2}}" for c in columns)
        print(f"{label:<12}{cells}")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(Path(sys.argv[1]))
