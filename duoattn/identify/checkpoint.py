"""Training checkpoints: gates and AdamW state in safetensors, step / settings / history in JSON.

A checkpoint directory holds ``step-NNNNNN.safetensors`` and ``state.json``. The JSON names the safetensors file it
belongs to and is written last, so it is the commit point: a run killed at any moment leaves either the previous
checkpoint or the new one, never a mix. Every file is written to a temporary name and renamed into place.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save as save_tensors

from ..io import atomic_write_bytes

STATE_FILE = "state.json"
GATES_KEY = "gates"
OPTIM_PREFIX = "optimizer."




@dataclass
class Checkpoint:
    """The state of a run after ``step`` completed steps.

    Attributes:
        settings: the run's result-determining settings; a resume must match them exactly.
        history: one record per completed step (loss terms, mean gate, learning rate, ...).
        gates: float32 ``[num_layers, num_kv_heads]``.
        optimizer_state: the ``"state"`` part of the optimizer's ``state_dict()`` (per-parameter tensors).
    """

    step: int
    settings: dict[str, Any]
    history: list[dict[str, Any]]
    gates: torch.Tensor
    optimizer_state: dict[int, dict[str, torch.Tensor]]


def save_checkpoint(directory: Path, ckpt: Checkpoint) -> None:
    """Write ``ckpt`` into ``directory`` (created if needed) and drop older tensor files."""
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {GATES_KEY: ckpt.gates.detach().to("cpu", copy=True).contiguous()}
    for index, state in ckpt.optimizer_state.items():
        for name, value in state.items():
            tensors[f"{OPTIM_PREFIX}{index}.{name}"] = torch.as_tensor(value).detach().to("cpu", copy=True)
    name = f"step-{ckpt.step:06d}.safetensors"
    atomic_write_bytes(directory / name, save_tensors(tensors, metadata={"step": str(ckpt.step)}))
    record = {"step": ckpt.step, "tensors": name, "settings": ckpt.settings, "history": ckpt.history}
    atomic_write_bytes(directory / STATE_FILE, (json.dumps(record, indent=1) + "\n").encode("utf-8"))
    for old in directory.glob("step-*.safetensors"):
        if old.name != name:
            old.unlink()


def has_checkpoint(directory: Path) -> bool:
    return (directory / STATE_FILE).is_file()


def load_checkpoint(directory: Path) -> Checkpoint:
    """Read the checkpoint in ``directory``; a clear error if it is missing or inconsistent."""
    state_path = directory / STATE_FILE
    if not state_path.is_file():
        raise FileNotFoundError(f"no checkpoint in {str(directory)!r} (missing {STATE_FILE})")
    try:
        record = json.loads(state_path.read_text(encoding="utf-8"))
        step, name = int(record["step"]), str(record["tensors"])
        settings, history = dict(record["settings"]), list(record["history"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{state_path} is not a valid checkpoint record: {err}") from None
    tensor_path = directory / name
    if not tensor_path.is_file():
        raise FileNotFoundError(f"checkpoint {state_path} names {name}, which is missing")
    with safe_open(str(tensor_path), framework="pt") as fh:
        saved_step = (fh.metadata() or {}).get("step")
        tensors = {key: fh.get_tensor(key) for key in fh.keys()}
    if saved_step != str(step) or len(history) != step or GATES_KEY not in tensors:
        raise ValueError(f"checkpoint in {str(directory)!r} is inconsistent (step {step}, tensors of step {saved_step})")
    optimizer_state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith(OPTIM_PREFIX):
            index, field = key[len(OPTIM_PREFIX) :].split(".", 1)
            optimizer_state.setdefault(int(index), {})[field] = value
    return Checkpoint(step, settings, history, tensors[GATES_KEY], optimizer_state)
