"""An evaluation's output directory: its config, one JSON line per scored cell, and the final results.

* ``config.json``: everything that decides the results; a directory only ever holds one config, so a rerun
  with the same config continues where the last one stopped and a different config is refused.
* ``cells.jsonl``: one line per (method, prompt), appended and flushed as soon as the cell is scored; a line cut
  short by an interruption is dropped when the directory is opened again.
* ``results.json``: config, cells and summary together, rewritten (atomically) as the run goes.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from ..checks import UsageError
from ..io import atomic_write_text, parse_json, read_json

CONFIG_FILE = "config.json"
CELLS_FILE = "cells.jsonl"
RESULTS_FILE = "results.json"


_NUMBER = (int, float)
# What every cell must hold for the summary, the table and the plots: key -> (types, lowest value or None).
CELL_KEYS: dict[str, tuple[tuple[type, ...], float | None]] = {
    "method": ((str,), None), "label": ((str,), None), "kind": ((str,), None), "sample": ((str,), None),
    "task": ((str,), None), "length": ((int,), 1), "score": (_NUMBER, 0.0), "kv_bytes": ((int,), 0),
    "seconds": (_NUMBER, 0.0), "retrieval_ratio": (_NUMBER, 0.0),
    "sparsity": ((*_NUMBER, type(None)), 0.0), "seed": ((int, type(None)), 0),
}


def check_cell(cell: Any, where: str) -> dict[str, Any]:
    """``cell`` if it holds every key of :data:`CELL_KEYS` with a value of the right type and range."""
    if not isinstance(cell, dict):
        raise UsageError(f"{where} must be a JSON object, got {type(cell).__name__}")
    missing = [k for k in CELL_KEYS if k not in cell]
    if missing:
        raise UsageError(f"{where} lacks {', '.join(missing)}")
    for key, (types, low) in CELL_KEYS.items():
        value = cell[key]
        ok = isinstance(value, types) and not isinstance(value, bool)
        if ok and isinstance(value, _NUMBER):
            ok = math.isfinite(value) and (low is None or value >= low)
        if not ok:
            expected = " or ".join(t.__name__ for t in types) + ("" if low is None else f" >= {low}")
            raise UsageError(f"{where}: {key} must be {expected}, got {value!r}")
    return cell


def _normalised(obj: Any) -> Any:
    """The value as it reads back from JSON (tuples become lists, keys strings)."""
    return json.loads(json.dumps(obj))


def _differences(old: Any, new: Any, path: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new)):
            out += _differences(old.get(key), new.get(key), f"{path}.{key}" if path else key)
        return out
    return [] if old == new else [f"{path}: {old!r} -> {new!r}"]


class ResultStore:
    """The results of one evaluation run, kept on disk as they come."""

    def __init__(self, directory: str | os.PathLike[str], config: dict[str, Any]):
        self.dir = Path(directory)
        self.config = _normalised(config)
        if self.dir.exists() and not self.dir.is_dir():
            raise NotADirectoryError(f"output path {str(self.dir)!r} exists and is not a directory")
        self.dir.mkdir(parents=True, exist_ok=True)
        config_path = self.dir / CONFIG_FILE
        if config_path.exists():
            if not config_path.is_file():
                raise UsageError(f"run config {str(config_path)!r} is not a regular file")
            diff = _differences(read_json(config_path, "run config"), self.config)
            if diff:
                raise UsageError(
                    f"{self.dir} holds a run with a different config ({'; '.join(diff[:5])}); "
                    "choose another output directory to start a new run"
                )
        # Cells are read before anything is written: a damaged file leaves the directory as it was.
        self.cells: list[dict[str, Any]] = self._read_cells()
        self._done: set[tuple[str, str]] = set()
        for number, cell in enumerate(self.cells, 1):
            key = (cell["method"], cell["sample"])
            if key in self._done:
                raise UsageError(f"{self.dir / CELLS_FILE} records cell {key} twice (cell {number})")
            self._done.add(key)
        if not config_path.exists():
            atomic_write_text(config_path, json.dumps(self.config, indent=2) + "\n")

    def _read_cells(self) -> list[dict[str, Any]]:
        path = self.dir / CELLS_FILE
        if not path.is_file():
            return []
        if not path.is_file():
            raise UsageError(f"results file {str(path)!r} is not a regular file")
        lines = path.read_bytes().split(b"\n")
        cells, kept = [], []
        for number, raw in enumerate(lines):
            if not raw.strip():
                continue
            where = f"{path}, line {number + 1},"
            try:
                line = raw.decode("utf-8")
                cell = parse_json(line, where)
            except (UnicodeDecodeError, UsageError) as err:
                if number == len(lines) - 1:  # the last line, cut short by an interruption: drop it
                    atomic_write_text(path, "".join(k + "\n" for k in kept))
                    break
                if isinstance(err, UnicodeDecodeError):
                    raise UsageError(f"{where} is not UTF-8 text: the file is damaged") from None
                raise UsageError(f"{where} is not valid JSON: the file is damaged") from None
            cells.append(check_cell(cell, f"{path}, line {number + 1}"))
            kept.append(line)
        return cells

    def done(self, method: str, sample: str) -> bool:
        return (method, sample) in self._done

    def append(self, cell: dict[str, Any]) -> None:
        """Record one scored cell durably before the next one starts."""
        check_cell(cell, "cell")
        key = (cell["method"], cell["sample"])
        if key in self._done:
            raise ValueError(f"cell {key} is already recorded")
        with open(self.dir / CELLS_FILE, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(cell) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        self.cells.append(cell)
        self._done.add(key)

    def write_results(self, summary: dict[str, Any]) -> Path:
        path = self.dir / RESULTS_FILE
        payload = {"config": self.config, "summary": summary, "cells": self.cells}
        atomic_write_text(path, json.dumps(payload, indent=1) + "\n")
        return path
