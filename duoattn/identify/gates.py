"""Gated attention for head identification, through transformers' attention-function registry.

Every attention layer of the model gets one gate per KV head, ``alpha`` in [0, 1]; query heads take the gate of
their KV head. A forward pass runs in one of two modes:

* ``teacher``: plain causal attention on every head. Each layer's attention output is recorded (no autograd).
* ``student``: each head's output is ``alpha * teacher_full + (1 - alpha) * streaming``, where ``teacher_full`` is
  the recorded teacher output of that layer and ``streaming`` is token-exact sink + recent attention over the
  student's own queries and keys (block-wise, never a ``T x T`` mask).

Taking the full term from the teacher (as the original implementation does) means no backward pass ever goes
through full attention: one identification step costs one full forward without autograd, one streaming forward
and one backward through streaming attention only. docs/identification.md weighs this against the paper's formula.

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
from ..patch import HANDLE_ATTR, duo_mask

GATED_ATTN = "duoattn_gated"
GATE_ATTR = "duo_gate"
MODES = ("teacher", "student")


class GateSet:
    """The gates of one model and what a gated forward pass needs to share between layers.

    Attributes:
        gates: float32 ``[num_layers, num_kv_heads]`` (an ``nn.Parameter`` during training).
        sink, recent: the streaming window of the student's heads.
        mode: ``"teacher"`` or ``"student"``.
        teacher: per layer, the teacher's attention output ``[B, T, Hq, D]`` of the current sample.
    """

    def __init__(self, gates: torch.Tensor, num_query_heads: int, sink: int, recent: int):
        if gates.dim() != 2:
            raise ValueError(f"gates must have shape [num_layers, num_kv_heads], got {tuple(gates.shape)}")
        if num_query_heads % gates.shape[1]:
            raise ValueError(f"{num_query_heads} query heads cannot be grouped over {gates.shape[1]} KV heads")
        self.gates = gates
        self.group = num_query_heads // gates.shape[1]
        self.sink = sink
        self.recent = recent
        self.mode = "teacher"
        self.teacher: list[torch.Tensor | None] = [None] * gates.shape[0]

    def query_gates(self, layer: int) -> torch.Tensor:
        """``[Hq, 1]``: the gate of each query head of ``layer`` (that of its KV head)."""
        return self.gates[layer].repeat_interleave(self.group)[:, None]

    def set_mode(self, mode: str) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.mode = mode

    def clear(self) -> None:
        self.teacher = [None] * len(self.teacher)


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
    """The registered attention function: ``query [B, Hq, T, D]``, ``key [B, Hkv, T, D]`` -> ``[B, T, Hq, D]``.

    Runs without a cache only: queries and keys are the whole sequence at positions ``0..T-1``.
    """
    gate_set: GateSet = getattr(module, GATE_ATTR)
    layer = module.layer_idx
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    if query.shape[-2] != key.shape[-2]:
        raise RuntimeError("gated attention runs on whole sequences: call the model with use_cache=False")
    if gate_set.mode == "teacher":
        out = causal_attention(query, key, value, scale).transpose(1, 2)
        gate_set.teacher[layer] = out
        return out, None
    full = gate_set.teacher[layer]
    if full is None or full.shape[1] != query.shape[-2]:
        raise RuntimeError(f"layer {layer}: run the teacher pass on the same input before the student pass")
    n_sink = min(gate_set.sink, key.shape[-2])
    stream = streaming_attention(
        query, key[:, :, :n_sink], value[:, :, :n_sink], key, value, 0, gate_set.recent, scale
    ).transpose(1, 2)
    # lerp(stream, full, alpha) = alpha * full + (1 - alpha) * stream, exact at alpha = 0 and alpha = 1. Mixed in
    # float32 so that a bfloat16 model does not round the gates to bfloat16 (which makes many gates tie).
    dtype = torch.promote_types(stream.dtype, gate_set.gates.dtype)
    alpha = gate_set.query_gates(layer).to(dtype)
    mixed = torch.lerp(stream.to(dtype), full.to(dtype), alpha)
    return mixed.to(query.dtype), None


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
