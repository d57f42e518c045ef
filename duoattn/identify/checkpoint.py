"""Training checkpoints: gates and optimiser state in safetensors, step / settings / history in JSON.

The optimiser state is AdamW's (the gates, clamped to [0, 1]) or, after a switch to hard steps, the SGD momentum
(the gates are then unclamped scores).

A checkpoint directory holds ``step-NNNNNN.safetensors`` and ``state.json``. The JSON names the safetensors file it
belongs to and is written last, so it is the commit point: a run killed at any moment leaves either the previous
checkpoint or the new one, never a mix. Every file is written to a temporary name and renamed into place.

Loading checks everything a resume relies on (keys, shapes, dtypes, finiteness, ranges, step counts) and names the
file in every error: a damaged checkpoint is refused, never trained on or silently reset.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as save_tensors

from ..checks import UsageError
from ..io import atomic_write_bytes, read_json, read_safetensors

STATE_FILE = "state.json"
GATES_KEY = "gates"
OPTIM_PREFIX = "optimizer."
# AdamW's per-parameter state (torch.optim.AdamW without amsgrad); the gates are its only parameter.
ADAM_FIELDS = ("exp_avg", "exp_avg_sq", "step")
# SGD with momentum (the hard steps of budget-aware training).
SGD_FIELDS = ("momentum_buffer",)


@dataclass
class Checkpoint:
    """The state of a run after ``step`` completed steps.

    Attributes:
        settings: the run's result-determining settings; a resume must match them exactly.
        history: one record per completed step (loss terms, mean gate, learning rate, ...).
        gates: float32 ``[num_layers, num_kv_heads]`` (unclamped scores in the hard steps).
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
    """Whether ``directory`` holds a checkpoint; a checkpoint path that is not what it should be is an error."""
    state = directory / STATE_FILE
    if directory.exists() and not directory.is_dir():
        raise UsageError(f"checkpoint directory {str(directory)!r} is a file, not a directory")
    if state.exists() and not state.is_file():
        raise UsageError(f"checkpoint record {str(state)!r} is not a regular file")
    return state.is_file()


def _record(state_path: Path) -> tuple[int, str, dict[str, Any], list[dict[str, Any]]]:
    record = read_json(state_path, "checkpoint record")
    where = f"checkpoint record {str(state_path)!r}"
    if not isinstance(record, dict):
        raise UsageError(f"{where} must hold a JSON object, got {type(record).__name__}")
    missing = [k for k in ("step", "tensors", "settings", "history") if k not in record]
    if missing:
        raise UsageError(f"{where} lacks {', '.join(missing)}")
    step, name, settings, history = record["step"], record["tensors"], record["settings"], record["history"]
    if isinstance(step, bool) or not isinstance(step, int) or step < 1:
        raise UsageError(f"{where}: step must be an integer >= 1, got {step!r}")
    if not isinstance(name, str) or Path(name).name != name or not name.endswith(".safetensors"):
        raise UsageError(f"{where}: tensors must name a .safetensors file beside it, got {name!r}")
    if not isinstance(settings, dict):
        raise UsageError(f"{where}: settings must be a JSON object, got {type(settings).__name__}")
    if not isinstance(history, list) or not all(isinstance(r, dict) for r in history):
        raise UsageError(f"{where}: history must be a list of JSON objects (one per step)")
    return step, name, settings, history


def _tensor(tensors: dict[str, torch.Tensor], key: str, shape: tuple[int, ...], where: str) -> torch.Tensor:
    if key not in tensors:
        raise UsageError(f"{where} lacks the tensor {key!r}")
    value = tensors[key]
    if value.dtype != torch.float32 or tuple(value.shape) != shape:
        raise UsageError(f"{where}: {key} must be float32 of shape {list(shape)}, got {value.dtype} "
                         f"{list(value.shape)}")
    if not torch.isfinite(value).all():
        raise UsageError(f"{where}: {key} holds NaN or infinite values")
    return value


def load_checkpoint(directory: Path) -> Checkpoint:
    """Read the checkpoint in ``directory``; a clear error naming the file if it is missing or damaged."""
    state_path = directory / STATE_FILE
    if not has_checkpoint(directory):
        raise FileNotFoundError(f"no checkpoint in {str(directory)!r} (missing {STATE_FILE})")
    step, name, settings, history = _record(state_path)
    tensor_path = directory / name
    if not tensor_path.is_file():
        raise FileNotFoundError(f"checkpoint {state_path} names {name}, which is missing")
    tensors, metadata = read_safetensors(tensor_path, "checkpoint tensors")
    where = f"checkpoint tensors {str(tensor_path)!r}"
    if metadata.get("step") != str(step):
        raise UsageError(f"checkpoint in {str(directory)!r} is inconsistent: {state_path.name} is of step {step}, "
                         f"{name} of step {metadata.get('step')}")
    if [r.get("step") for r in history] != list(range(1, step + 1)):
        raise UsageError(f"checkpoint in {str(directory)!r} is inconsistent: the history of {state_path} must "
                         f"hold one record per step 1..{step}")
    if GATES_KEY not in tensors or tensors[GATES_KEY].dim() != 2 or 0 in tensors[GATES_KEY].shape:
        raise UsageError(f"{where} lacks the gates (a float32 tensor [num_layers, num_kv_heads])")
    shape = tuple(tensors[GATES_KEY].shape)
    gates = _tensor(tensors, GATES_KEY, shape, where)
    momentum = f"{OPTIM_PREFIX}0.{SGD_FIELDS[0]}"
    fields = SGD_FIELDS if momentum in tensors else ADAM_FIELDS
    expected = {GATES_KEY} | {f"{OPTIM_PREFIX}0.{f}" for f in fields}
    unknown = sorted(set(tensors) - expected)
    if unknown:
        raise UsageError(f"{where} holds unexpected tensors {unknown}; expected {sorted(expected)}")
    if fields == SGD_FIELDS:  # hard steps: the gates are scores, any finite value
        state = {0: {SGD_FIELDS[0]: _tensor(tensors, momentum, shape, where)}}
        return Checkpoint(step, settings, history, gates, state)
    if gates.min() < 0 or gates.max() > 1:
        raise UsageError(f"{where}: gates must lie in [0, 1] (they are clamped after every step), got "
                         f"{gates.min().item():g}..{gates.max().item():g}")
    exp_avg = _tensor(tensors, f"{OPTIM_PREFIX}0.exp_avg", shape, where)
    exp_avg_sq = _tensor(tensors, f"{OPTIM_PREFIX}0.exp_avg_sq", shape, where)
    adam_step = _tensor(tensors, f"{OPTIM_PREFIX}0.step", (), where)
    if (exp_avg_sq < 0).any():
        raise UsageError(f"{where}: optimizer exp_avg_sq must be >= 0 (a running mean of squares)")
    if adam_step.item() != step:
        raise UsageError(f"{where}: optimizer step is {adam_step.item():g}, expected {step}")
    optimizer_state = {0: {"exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq, "step": adam_step}}
    return Checkpoint(step, settings, history, gates, optimizer_state)
