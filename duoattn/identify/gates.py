"""Gated attention for head identification, through transformers' attention-function registry.

Every attention layer of the model gets one gate per KV head, ``alpha`` in [0, 1]; query heads take the gate of
their KV head. A training step runs two passes over one sample:

* :func:`teacher_forward`: plain causal attention on every head, without autograd. Each layer's attention output,
  keys and values are recorded.
* :func:`student_forward`: each head's output is ``alpha * teacher_full + (1 - alpha) * streaming``, where
  ``teacher_full`` is the recorded teacher output of that layer and ``streaming`` is token-exact sink + recent
  attention over the student's own queries and keys (block-wise, never a ``T x T`` mask).

Taking the full term from the teacher (as the original implementation does) means no backward pass ever goes
through full attention. docs/identification.md weighs this against the paper's formula.

A query at position ``i < sink + recent`` sees every earlier key under streaming attention too, so the student
equals the teacher exactly at those positions, whatever the gates (and its gradient there is zero). The student
pass therefore starts at ``start`` (at most ``sink + recent``) and takes the keys and values of the positions
before it from the teacher: the result and its gradient are exactly those of a pass over the whole sequence.

Soft-capped models (Gemma 2) pass ``softcap`` to every kernel. Local sliding-window layers (Gemma 2/3, Mistral
with a binding window) keep their window in both passes and are not gated: their gates stay at 1, take no part in
the regulariser, and :meth:`HeadPattern.binarize` is given the global layers only.

Nothing in the model's code changes: :func:`gated_attention` attaches a :class:`GateSet` to every attention module
and switches the model to the registered function; leaving the block restores the previous implementation.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from transformers import AttentionInterface, PreTrainedModel
from transformers.masking_utils import AttentionMaskInterface

from ..kernels.attention import causal_attention, streaming_attention
from ..models import attention_modules, check_supported
from ..attention import duo_mask
from ..deploy import HANDLE_ATTR

GATED_ATTN = "duoattn_gated"
GATE_ATTR = "duo_gate"


class GateSet:
    """The gates of one model and what the teacher pass hands to the student pass.

    Attributes:
        gates: float32 ``[num_layers, num_kv_heads]`` (an ``nn.Parameter`` during training).
        sink, recent: the streaming window of the student's heads.
        student: False during the teacher pass, True during the student pass.
        start: the first position the student pass computes.
        full, keys, values: per layer, the teacher's attention output ``[B, T, Hq, D]`` and its keys and values
            ``[B, Hkv, T, D]`` for the current sample.
    """

    def __init__(
        self, gates: torch.Tensor, num_query_heads: int, sink: int, recent: int,
        windows: list[int | None] | None = None,
    ):
        if gates.dim() != 2:
            raise ValueError(f"gates must have shape [num_layers, num_kv_heads], got {tuple(gates.shape)}")
        if num_query_heads % gates.shape[1]:
            raise ValueError(f"{num_query_heads} query heads cannot be grouped over {gates.shape[1]} KV heads")
        self.gates = gates
        self.group = num_query_heads // gates.shape[1]
        self.sink = sink
        self.recent = recent
        # per layer: the window of a local sliding-window layer (not gated), None for a gated layer
        self.windows = list(windows) if windows is not None else [None] * gates.shape[0]
        if len(self.windows) != gates.shape[0]:
            raise ValueError(f"{len(self.windows)} layer windows for {gates.shape[0]} layers of gates")
        # bool [num_layers]: the layers whose heads are gated (every layer but the local ones)
        self.gated_layers = torch.tensor([w is None for w in self.windows], device=gates.device)
        self.student = False
        self.start = 0
        self.clear()

    def query_gates(self, layer: int) -> torch.Tensor:
        """``[Hq, 1]``: the gate of each query head of ``layer`` (that of its KV head)."""
        return self.gates[layer].repeat_interleave(self.group)[:, None]

    def clear(self) -> None:
        num_layers = self.gates.shape[0]
        self.full: list[torch.Tensor | None] = [None] * num_layers
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers


def _teacher(gate_set: GateSet, layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
             scale: float, softcap: float | None) -> torch.Tensor:
    window = gate_set.windows[layer]
    if window is None:
        out = causal_attention(query, key, value, scale, softcap)
    else:  # a local layer: the last `window` keys, no sink
        empty = key[:, :, :0]
        out = streaming_attention(query, empty, empty, key, value, 0, window, scale, softcap=softcap)
    out = out.transpose(1, 2)
    gate_set.full[layer], gate_set.keys[layer], gate_set.values[layer] = out, key, value
    return out


def _windowed(gate_set: GateSet, layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
              scale: float, softcap: float | None, sink: int, recent: int) -> torch.Tensor:
    """Sink + recent attention of the student's queries at ``start..T-1`` -> ``[B, C, Hq, D]``; the keys before
    ``start`` come from the teacher."""
    t_keys, t_values = gate_set.keys[layer], gate_set.values[layer]
    start, total = gate_set.start, gate_set.start + query.shape[-2]
    # Sink keys: positions 0..min(sink, T)-1, from the teacher before `start`, from the student after it.
    n_sink = min(sink, total)
    taken = min(n_sink, start)
    k_sink = torch.cat([t_keys[:, :, :taken], key[:, :, : n_sink - taken]], dim=2)
    v_sink = torch.cat([t_values[:, :, :taken], value[:, :, : n_sink - taken]], dim=2)
    # The run: every position a query's window can reach, lo..T-1.
    lo = max(0, start - recent + 1)
    k_run = torch.cat([t_keys[:, :, lo:start], key], dim=2)
    v_run = torch.cat([t_values[:, :, lo:start], value], dim=2)
    out = streaming_attention(query, k_sink, v_sink, k_run, v_run, lo, recent, scale, softcap=softcap)
    return out.transpose(1, 2)


def _student(gate_set: GateSet, layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
             scale: float, softcap: float | None) -> torch.Tensor:
    """Queries, keys and values at positions ``start..T-1``; earlier keys come from the teacher."""
    full = gate_set.full[layer]
    if full is None or full.shape[1] != gate_set.start + query.shape[-2]:
        raise RuntimeError(f"layer {layer}: run the teacher pass on the same input before the student pass")
    window = gate_set.windows[layer]
    if window is not None:  # a local layer keeps its window, ungated
        return _windowed(gate_set, layer, query, key, value, scale, softcap, 0, window)
    stream = _windowed(gate_set, layer, query, key, value, scale, softcap, gate_set.sink, gate_set.recent)
    # lerp(stream, full, alpha) = alpha * full + (1 - alpha) * stream, exact at alpha = 0 and alpha = 1. Mixed in
    # at least float32, so that a bfloat16 model does not round the gates to bfloat16 (which makes gates tie).
    dtype = torch.promote_types(stream.dtype, gate_set.gates.dtype)
    alpha = gate_set.query_gates(layer).to(dtype)
    mixed = torch.lerp(stream.to(dtype), full[:, gate_set.start:].to(dtype), alpha)
    return mixed.to(query.dtype)


def gated_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """The registered attention function: ``query [B, Hq, C, D]``, ``key [B, Hkv, C, D]`` -> ``[B, C, Hq, D]``.

    Runs without a cache only (see :func:`teacher_forward` and :func:`student_forward`).
    """
    gate_set: GateSet = getattr(module, GATE_ATTR)
    if query.shape[-2] != key.shape[-2]:
        raise RuntimeError("gated attention runs without a cache: call the model with use_cache=False")
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    attend = _student if gate_set.student else _teacher
    return attend(gate_set, module.layer_idx, query, key, value, scale, kwargs.get("softcap")), None


def teacher_forward(model: PreTrainedModel, gate_set: GateSet, ids: torch.Tensor) -> torch.Tensor:
    """Full attention over ``ids [1, T]`` without autograd; returns the final normalised hidden states
    ``[1, T, hidden]`` and records what :func:`student_forward` needs."""
    gate_set.clear()
    gate_set.student = False
    with torch.no_grad():
        return model.base_model(ids, use_cache=False).last_hidden_state


def student_forward(model: PreTrainedModel, gate_set: GateSet, ids: torch.Tensor, start: int) -> torch.Tensor:
    """The gated model's final normalised hidden states ``[1, T - start, hidden]`` at positions ``start..T-1``.

    ``start`` may be at most ``sink + recent``: the student equals the teacher before that. Run
    :func:`teacher_forward` on the same ``ids`` first.
    """
    if not 0 <= start <= min(gate_set.sink + gate_set.recent, ids.shape[1] - 1):
        raise ValueError(f"start must be in [0, min(sink + recent, T - 1)], got {start}")
    gate_set.student, gate_set.start = True, start
    positions = torch.arange(start, ids.shape[1], device=ids.device)[None]
    try:
        return model.base_model(ids[:, start:], position_ids=positions, use_cache=False).last_hidden_state
    finally:
        gate_set.student, gate_set.start = False, 0


def register() -> None:
    """Register the gated attention function and its (no-op) mask function with transformers (idempotent)."""
    AttentionInterface.register(GATED_ATTN, gated_attention_forward)
    AttentionMaskInterface.register(GATED_ATTN, duo_mask)


@contextmanager
def gated_attention(model: PreTrainedModel, gate_set: GateSet) -> Iterator[GateSet]:
    """Run the body with ``gate_set`` attached to every attention layer of ``model``; restore the model after."""
    if getattr(model, HANDLE_ATTR, None) is not None:
        raise RuntimeError("DuoAttention is enabled on this model; disable it before identifying heads")
    cfg = check_supported(model)
    modules = attention_modules(model)
    expected = (cfg.num_hidden_layers, cfg.num_key_value_heads)
    if tuple(gate_set.gates.shape) != expected:
        raise ValueError(f"gates have shape {tuple(gate_set.gates.shape)}, the model needs {expected}")
    previous = cfg._attn_implementation
    register()
    try:
        for module in modules:
            setattr(module, GATE_ATTR, gate_set)
        model.set_attn_implementation(GATED_ATTN)
        yield gate_set
    finally:
        if cfg._attn_implementation != previous:
            model.set_attn_implementation(previous)
        for module in modules:
            if hasattr(module, GATE_ATTR):
                delattr(module, GATE_ATTR)
        gate_set.clear()
