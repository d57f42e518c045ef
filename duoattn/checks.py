"""Argument checks shared by the configs and entry points: each error names the argument, the value and what it
must be.

:class:`UsageError` marks bad input (an argument, an input file): the command line prints its message and exits
with code 2, without a traceback. It is a ``ValueError``, so API callers catch it as one.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np


class UsageError(ValueError):
    """A bad argument or input file; the message says which, what it was and what was expected."""


def check_int(name: str, value: Any, minimum: int) -> int:
    """``value`` as an ``int`` if it is an integer (not a bool) of at least ``minimum``; else a ``UsageError``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise UsageError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def check_ints(name: str, values: Any, minimum: int) -> list[int]:
    """A non-empty list of integers, each at least ``minimum``."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        raise UsageError(f"{name} must be a list of integers >= {minimum}, got {values!r}")
    values = list(values)
    if not values:
        raise UsageError(f"{name} must hold at least one integer >= {minimum}, got an empty list")
    bad = [v for v in values if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < minimum]
    if bad:
        raise UsageError(f"{name} must be integers >= {minimum}, got {bad[0]!r} in {values}")
    return [int(v) for v in values]


def check_number(name: str, value: Any, low: float | None = None, high: float | None = None) -> float:
    """A finite real number in ``[low, high]`` (either bound may be None)."""
    ok = not isinstance(value, bool) and isinstance(value, (int, float, np.integer, np.floating))
    if ok and math.isfinite(value) and (low is None or value >= low) and (high is None or value <= high):
        return float(value)
    bounds = f" in [{low}, {high}]" if low is not None and high is not None else (
        f" >= {low}" if low is not None else f" <= {high}" if high is not None else "")
    raise UsageError(f"{name} must be a finite number{bounds}, got {value!r}")


def check_choice(name: str, value: Any, choices: Sequence[Any]) -> Any:
    if value not in choices:
        raise UsageError(f"{name} must be one of {tuple(choices)}, got {value!r}")
    return value


DTYPES = ("float32", "bfloat16", "float16", "float64")


def check_dtype(name: str, value: Any, choices: Sequence[str] = DTYPES) -> str:
    """A torch dtype by name (``"bfloat16"``; a ``torch.dtype`` is accepted and named)."""
    text = str(value).removeprefix("torch.")
    if text not in choices:
        raise UsageError(f"{name} must be one of {tuple(choices)}, got {value!r}")
    return text


def check_device(name: str, value: Any) -> str:
    """A device this machine has: ``cpu``, ``cuda`` or ``cuda:N`` (N below the number of GPUs)."""
    import torch

    try:
        device = torch.device(value)
    except (RuntimeError, TypeError):
        raise UsageError(f"{name} must be cpu, cuda or cuda:N, got {value!r}") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise UsageError(f"{name} is {value!r} but this machine has no CUDA GPU (torch sees none); use cpu")
        if device.index is not None and device.index >= count:
            raise UsageError(f"{name} is {value!r} but this machine has {count} CUDA GPU(s) (cuda:0..{count - 1})")
    elif device.type != "cpu":
        raise UsageError(f"{name} must be cpu, cuda or cuda:N, got {value!r}")
    return str(device)


def check_file(name: str, path: str | os.PathLike[str]) -> Path:
    """An existing regular file."""
    p = Path(path)
    if p.is_dir():
        raise UsageError(f"{name} {str(p)!r} is a directory, expected a file")
    if not p.is_file():
        raise FileNotFoundError(f"{name} {str(p)!r} does not exist")
    return p


def check_output_dir(name: str, path: str | os.PathLike[str]) -> Path:
    """A directory that exists or can be created, and can be written; nothing is created."""
    out = Path(path)
    if not str(path).strip():
        raise UsageError(f"{name} must name an output directory, got {str(path)!r}")
    probe = out
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise NotADirectoryError(
            f"cannot use {name} {str(out)!r} as output directory: {str(probe)!r} is not a directory (a file)"
        )
    try:
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as err:
        raise PermissionError(f"cannot write to {name} {str(out)!r}: {err}") from None
    return out
