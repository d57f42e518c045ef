"""An evaluation's output directory: its config, one JSON line per scored cell, and the final results.

* ``config.json``: everything that decides the results; a directory only ever holds one config, so a rerun
  with the same config continues where the last one stopped and a different config is refused.
* ``cells.jsonl``: one line per (method, prompt), appended and flushed as soon as the cell is scored; a line cut
  short by an interruption is dropped when the directory is opened again.
* ``results.json``: config, cells and summary together, rewritten (atomically) as the run goes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..io import atomic_write_text

CONFIG_FILE = "config.json"
CELLS_FILE = "cells.jsonl"
RESULTS_FILE = "results.json"


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
        if config_path.is_file():
            try:
                saved = json.loads(config_path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as err:
                raise ValueError(f"{config_path} is not valid JSON: {err}") from None
            diff = _differences(saved, self.config)
            if diff:
                raise ValueError(
                    f"{self.dir} holds a run with a different config ({'; '.join(diff[:5])}); "
                    "choose another output directory to start a new run"
                )
        else:
            atomic_write_text(config_path, json.dumps(self.config, indent=2) + "\n")
        self.cells: list[dict[str, Any]] = self._read_cells()
        self._done = {(c["method"], c["sample"]) for c in self.cells}

    def _read_cells(self) -> list[dict[str, Any]]:
        path = self.dir / CELLS_FILE
        if not path.is_file():
            return []
        text = path.read_text(encoding="utf-8")
        lines = text.split("\n")
        cells, kept = [], []
        for number, line in enumerate(lines):
            if not line.strip():
                continue
            try:
                cells.append(json.loads(line))
                kept.append(line)
            except json.JSONDecodeError:
                if number == len(lines) - 1:  # the last line, cut short by an interruption: drop it
                    atomic_write_text(path, "".join(k + "\n" for k in kept))
                    break
                raise ValueError(f"{path}, line {number + 1}, is not valid JSON: the file is damaged") from None
        return cells

    def done(self, method: str, sample: str) -> bool:
        return (method, sample) in self._done

    def append(self, cell: dict[str, Any]) -> None:
        """Record one scored cell durably before the next one starts."""
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
