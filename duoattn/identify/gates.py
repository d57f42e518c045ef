"""Gated attention for head identification, through transformers' attention-function registry.

Every attention layer of the model gets one gate per KV head, ``alpha`` in [0, 1]; query heads take the gate of
their KV head. A training step runs two passes over one sample:

* :func:`teacher_forward`: plain causal attention on every head, without autograd. Each layer's attention output,
  and the keys and values the student pass takes from the teacher, are recorded.
* :func:`student_forward`: each head's output is ``alpha * full + (1 - alpha) * streaming``, where
  ``streaming`` is token-exact sink + recent attention over the student's own queries and keys (:mod:`.streaming`:
  block-wise on the CPU, FlexAttention on CUDA; never a ``T x T`` or ``T x window`` matrix) and ``full`` is, by
  :attr:`GateSet.full_term`:

  - ``teacher`` (the original implementation): the recorded teacher output of that layer. No backward pass goes
    through full attention, but a head at ``alpha = 1`` hands on the teacher's exact output whatever the student's
    earlier layers did, which a deployed retrieval head cannot.
  - ``student`` (the paper's formula): causal attention over the student's own queries and keys. At gates of 0
    and 1 the student is then exactly the deployed model (streaming prefill, no cache).

With :attr:`GateSet.hard` roles, the forward pass uses those 0/1 roles and the backward pass hands the gradient
to the continuous gates unchanged (straight-through): the loss is that of the binarised model at a budget, and the
gradient of a gate says how the loss moves if its head leans towards the other role.

Where the student pass starts (:meth:`GateSet.student_start`). Two facts let it skip a prefix of the sample
exactly, taking the keys and values of the skipped positions from the teacher (with the ``student`` full term
only the first holds, since a full-attention output depends on every earlier position):

1. A query at position ``i < sink + recent`` sees every earlier key under streaming attention too, so the student
   equals the teacher exactly at those positions, whatever the gates (and its gradient there is zero).
2. Only the loss positions count. Up to the first gated layer the student computes what the teacher does (layer
   0 reads the embeddings, local layers are not gated); a later layer's output at position ``p`` depends on the
   previous layer's outputs at ``p - reach .. p`` only (``reach = recent - 1``, or ``window - 1`` in a local
   layer). A student pass that starts at ``s`` with teacher keys before ``s`` is therefore exact from ``s`` plus
   the reaches of the layers after the first gated one. With the loss at the end of a long sample (the
   question-and-answer blocks), the student computes about ``L x recent`` positions plus the answers, not ``T``.

Soft-capped models (Gemma 2) pass ``softcap`` to every kernel. Local sliding-window layers (Gemma 2/3, Mistral
with a binding window) keep their window in both passes and are not gated: their gates stay at 1, take no part in
the regulariser, and :meth:`HeadPattern.binarize` is given the global layers only.

Nothing in the model's code changes: :func:`gated_attention` attaches a :class:`GateSet` to every attention module
and switches the model to the registered function; leaving the block restores the previous implementation.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import AttentionInterface, PreTrainedModel
from transformers.masking_utils import AttentionMaskInterface

from ..kernels.attention import causal_attention
from ..models import attention_modules, check_supported, text_config
from ..attention import duo_mask
from ..deploy import HANDLE_ATTR
from .parallel import SequenceShard, gather_sequence, halo
from .streaming import blocked_streaming_attention, flex_streaming_attention, resolve_kernel

GATED_ATTN = "duoattn_gated"
GATE_ATTR = "duo_gate"
FULL_TERMS = ("teacher", "student")


@dataclass
class TeacherLayer:
    """What the teacher pass keeps of one layer for the student pass.

    ``full [B, T - full_from, Hq, D]``: the attention output at positions ``full_from..T-1``. ``k_sink, v_sink
    [B, Hkv, n, D]``: the keys and values at ``0..n-1``. ``k_run, v_run``: those at ``run_from..run_from+m-1``.
    """

    full: torch.Tensor
    full_from: int
    k_sink: torch.Tensor
    v_sink: torch.Tensor
    k_run: torch.Tensor
    v_run: torch.Tensor
    run_from: int


class GateSet:
    """The gates of one model and what the teacher pass hands to the student pass.

    Attributes:
        gates: float32 ``[num_layers, num_kv_heads]`` (an ``nn.Parameter`` during training).
        sink, recent: the streaming window of the student's heads.
        kernel: the student's streaming kernel, ``blocks`` or ``flex`` (:mod:`.streaming`); ``auto`` picks by device.
        full_term: where the student's full-attention term comes from, ``teacher`` or ``student`` (module
            docstring).
        hard: bool ``[num_layers, num_kv_heads]`` roles (True = retrieval) the student uses in its forward pass,
            with straight-through gradients to ``gates``; None: the gates themselves mix the two terms.
        student: False during the teacher pass, True during the student pass.
        start: the first position the student pass computes (over all processes).
        shard: the slice of the sample this process holds (:mod:`.parallel`); None: the whole sample.
        teacher: per layer, the :class:`TeacherLayer` of the current sample.
    """

    def __init__(
        self, gates: torch.Tensor, num_query_heads: int, sink: int, recent: int,
        windows: list[int | None] | None = None, kernel: str = "auto", shard: SequenceShard | None = None,
        full_term: str = "teacher",
    ):
        if full_term not in FULL_TERMS:
            raise ValueError(f"full_term must be one of {FULL_TERMS}, got {full_term!r}")
        if gates.dim() != 2:
            raise ValueError(f"gates must have shape [num_layers, num_kv_heads], got {tuple(gates.shape)}")
        if num_query_heads % gates.shape[1]:
            raise ValueError(f"{num_query_heads} query heads cannot be grouped over {gates.shape[1]} KV heads")
        self.gates = gates
        self.full_term = full_term
        self.hard: torch.Tensor | None = None
        self.group = num_query_heads // gates.shape[1]
        self.sink = sink
        self.recent = recent
        self.kernel = resolve_kernel(kernel, gates.device)
        # per layer: the window of a local sliding-window layer (not gated), None for a gated layer
        self.windows = list(windows) if windows is not None else [None] * gates.shape[0]
        if len(self.windows) != gates.shape[0]:
            raise ValueError(f"{len(self.windows)} layer windows for {gates.shape[0]} layers of gates")
        # bool [num_layers]: the layers whose heads are gated (every layer but the local ones)
        self.gated_layers = torch.tensor([w is None for w in self.windows], device=gates.device)
        self.student = False
        self.start = 0
        self.shard = shard
        self.recorded_for: int | None = None  # the student start the teacher pass recorded for (None: any)
        self.clear()

    @property
    def first(self) -> int:
        """The first position this process computes in the current student pass."""
        return self.start if self.shard is None else self.shard.first(self.start)

    def query_gates(self, layer: int) -> torch.Tensor:
        """``[Hq, 1]``: the gate of each query head of ``layer`` (that of its KV head); with :attr:`hard` roles,
        exactly 0 or 1 in value and the gate's own gradient (straight-through)."""
        gates = self.gates[layer]
        if self.hard is not None:
            gates = self.hard[layer].to(gates.dtype) + (gates - gates.detach())
        return gates.repeat_interleave(self.group)[:, None]

    def window(self, layer: int) -> tuple[int, int]:
        """``(sink, recent)`` of the student's attention in ``layer``: a local layer keeps its own window."""
        local = self.windows[layer]
        return (self.sink, self.recent) if local is None else (0, local)

    def student_start(self, first_loss: int) -> int:
        """The latest position a student pass may start at and still be exact (value and gradient) at
        ``first_loss`` and after; see the module docstring."""
        prefix = min(self.sink + self.recent, first_loss)
        if self.full_term == "student":  # a full-attention term reads every earlier position of the student
            return prefix
        # A layer's input differs from the teacher's only after a gated layer (local layers are the same in both).
        gated = [layer for layer, w in enumerate(self.windows) if w is None]
        first_gated = gated[0] if gated else len(self.windows)
        reach = sum(self.window(layer)[1] - 1 for layer in range(first_gated + 1, len(self.windows)))
        return max(prefix, first_loss - reach)

    @contextmanager
    def student_pass(self, start: int) -> Iterator[None]:
        """Route attention to the student for the body (also while a checkpointed layer is recomputed)."""
        previous = self.student, self.start
        self.student, self.start = True, start
        try:
            yield
        finally:
            self.student, self.start = previous

    def clear(self) -> None:
        self.teacher: list[TeacherLayer | None] = [None] * self.gates.shape[0]
        self.recorded_for = None


def _keep(x: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """Positions ``lo..hi-1`` of ``x [B, H, T, D]`` in their own memory, so that the rest can be freed."""
    return x[:, :, lo:hi].clone()


def _teacher(gate_set: GateSet, layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
             scale: float, softcap: float | None) -> torch.Tensor:
    sink, recent = gate_set.window(layer)
    shard = gate_set.shard
    offset = 0  # the position of the first query
    if shard is not None:  # every earlier key: gathered from all ranks (positions 0..hi-1 are read)
        offset = shard.lo
        key, value = (gather_sequence(x, shard)[:, :, : shard.hi] for x in (key, value))
    if gate_set.windows[layer] is None:
        out = causal_attention(query, key, value, scale, softcap)
    else:  # a local layer: the last `window` keys, no sink
        empty = key[:, :, :0]
        out = blocked_streaming_attention(query, empty, empty, key, value, 0, recent, scale, softcap=softcap)
    out = out.transpose(1, 2)
    start = gate_set.recorded_for
    if start is None:  # keep everything: a student pass may start anywhere
        if shard is not None:
            raise RuntimeError("a sequence-parallel teacher pass records for one student start: pass start")
        record = TeacherLayer(out, 0, key[:, :, :sink], value[:, :, :sink], key, value, 0)
    else:  # keep only what a student pass from `start` reads: this process's queries from `first` on
        first = start if shard is None else shard.first(start)
        lo, n_sink = min(max(0, first - recent + 1), start), min(sink, start)
        if gate_set.full_term == "student":  # the student's full attention reads every key before `start`
            lo = 0
        full = out[:, first - offset :].clone() if first > offset else out
        record = TeacherLayer(full, first, _keep(key, 0, n_sink), _keep(value, 0, n_sink),
                              _keep(key, lo, start), _keep(value, lo, start), lo)
    gate_set.teacher[layer] = record
    return out


def _windowed(gate_set: GateSet, layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
              scale: float, softcap: float | None) -> torch.Tensor:
    """Sink + recent attention of this process's student queries at ``first..first+C-1`` -> ``[B, C, Hq, D]``;
    the keys before ``start`` come from the teacher, those in ``start..first-1`` from earlier ranks (the halo)."""
    sink, recent = gate_set.window(layer)
    record = gate_set.teacher[layer]
    start, first = gate_set.start, gate_set.first
    key, value, have = halo(key, value, gate_set.shard, start, sink, recent)  # student keys from `have` on
    # Sink keys: positions 0..min(sink, end)-1, from the teacher before `start`, from the student after it.
    n_sink = min(sink, first + query.shape[-2])
    taken = min(n_sink, start)
    a, b = max(0, taken - have), max(0, n_sink - have)
    k_sink = torch.cat([record.k_sink[:, :, :taken], key[:, :, a:b]], dim=2)
    v_sink = torch.cat([record.v_sink[:, :, :taken], value[:, :, a:b]], dim=2)
    # The run: every position a query's window can reach, lo..end-1.
    lo = max(0, first - recent + 1)
    a, b = min(lo, start) - record.run_from, start - record.run_from
    own = max(lo, start) - have
    k_run = torch.cat([record.k_run[:, :, a:b], key[:, :, own:]], dim=2)
    v_run = torch.cat([record.v_run[:, :, a:b], value[:, :, own:]], dim=2)
    if gate_set.kernel == "flex":
        out = flex_streaming_attention(query, k_sink, v_sink, k_run, v_run, lo, recent, scale, softcap=softcap)
    else:
        out = blocked_streaming_attention(query, k_sink, v_sink, k_run, v_run, lo, recent, scale, softcap=softcap)
    return out.transpose(1, 2)


def _student(gate_set: GateSet, layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
             scale: float, softcap: float | None) -> torch.Tensor:
    """Queries, keys and values at positions ``start..T-1``; earlier keys come from the teacher."""
    record = gate_set.teacher[layer]
    start, first = gate_set.start, gate_set.first
    if gate_set.recorded_for not in (None, start):
        raise RuntimeError(f"the teacher pass recorded for a student start of {gate_set.recorded_for}, not {start}")
    end = first + query.shape[-2]
    if record is None or record.full_from > first or record.full_from + record.full.shape[1] != end:
        raise RuntimeError(f"layer {layer}: run the teacher pass on the same input before the student pass")
    stream = _windowed(gate_set, layer, query, key, value, scale, softcap)
    if gate_set.windows[layer] is not None:  # a local layer keeps its window, ungated
        return stream
    # lerp(stream, full, alpha) = alpha * full + (1 - alpha) * stream, exact at alpha = 0 and alpha = 1. Mixed in
    # at least float32, so that a bfloat16 model does not round the gates to bfloat16 (which makes gates tie).
    dtype = torch.promote_types(stream.dtype, gate_set.gates.dtype)
    alpha = gate_set.query_gates(layer).to(dtype)
    if gate_set.full_term == "student":
        full = _own_full(gate_set, record, query, key, value, scale, softcap)
    else:
        full = record.full[:, first - record.full_from :]
    mixed = torch.lerp(stream.to(dtype), full.to(dtype), alpha)
    return mixed.to(query.dtype)


def _own_full(gate_set: GateSet, record: TeacherLayer, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
              scale: float, softcap: float | None) -> torch.Tensor:
    """Causal attention of the student's queries at ``start..T-1`` over the teacher's keys before ``start`` and the
    student's own from ``start`` on -> ``[B, C, Hq, D]`` (a whole sample in one process)."""
    if gate_set.shard is not None:
        raise RuntimeError("the student full term runs in one process: sequence parallelism takes the teacher's")
    start = gate_set.start
    if record.run_from != 0 or record.k_run.shape[2] < start:
        raise RuntimeError("the teacher pass did not keep the keys before the student start")
    keys = torch.cat([record.k_run[:, :, :start], key], dim=2)
    values = torch.cat([record.v_run[:, :, :start], value], dim=2)
    return causal_attention(query, keys, values, scale, softcap).transpose(1, 2)


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


def teacher_forward(
    model: PreTrainedModel, gate_set: GateSet, ids: torch.Tensor, start: int | None = None
) -> torch.Tensor:
    """Full attention over ``ids [1, T]`` without autograd; returns the final normalised hidden states
    ``[1, T, hidden]`` and records what :func:`student_forward` needs: for a student pass from ``start`` only
    (the attention outputs from ``start`` on, the sink keys and the ``recent - 1`` keys before ``start``), or,
    with ``start=None``, everything (a student pass may then start anywhere).

    With a :class:`~.parallel.SequenceShard` in ``gate_set`` (every rank calls this with the same ``ids``), the
    model runs on this rank's positions ``lo..hi-1`` only and the result is ``[1, hi - lo, hidden]``.
    """
    gate_set.clear()
    gate_set.student = False
    gate_set.recorded_for = start
    shard = gate_set.shard
    with torch.no_grad():
        if shard is None:
            return model.base_model(ids, use_cache=False).last_hidden_state
        if shard.bounds[-1] != ids.shape[1]:
            raise ValueError(f"the shard splits {shard.bounds[-1]} positions, the sample has {ids.shape[1]}")
        positions = torch.arange(shard.lo, shard.hi, device=ids.device)[None]
        return model.base_model(ids[:, shard.lo : shard.hi], position_ids=positions,
                                use_cache=False).last_hidden_state


def student_forward(
    model: PreTrainedModel, gate_set: GateSet, ids: torch.Tensor, start: int, exact_from: int | None = None
) -> torch.Tensor:
    """The gated model's final normalised hidden states ``[1, T - start, hidden]`` at positions ``start..T-1``.

    They are exact (equal to a pass over the whole sequence, gradient included) from ``exact_from`` on (default
    ``start``); ``start`` may be at most :meth:`GateSet.student_start` of ``exact_from``. Run
    :func:`teacher_forward` on the same ``ids`` first.

    Sequence parallel (a shard in ``gate_set``): the hidden states at this rank's positions ``first..hi-1``
    (:meth:`~.parallel.SequenceShard.first`), ``[1, 0, hidden]`` on a rank whose slice ends before ``start``.
    """
    exact_from = start if exact_from is None else exact_from
    length = ids.shape[1]
    if not 0 <= exact_from < length:
        raise ValueError(f"exact_from must be in [0, {length - 1}], got {exact_from}")
    latest = min(gate_set.student_start(exact_from), length - 1)
    if not 0 <= start <= latest:
        raise ValueError(f"start must be in [0, {latest}] for outputs exact from position {exact_from}, got {start}")
    shard = gate_set.shard
    first, end = (start, length) if shard is None else (shard.first(start), shard.hi)
    if first == end:  # this rank holds no student position
        return torch.zeros(1, 0, text_config(model).hidden_size, device=ids.device)
    positions = torch.arange(first, end, device=ids.device)[None]
    with gate_set.student_pass(start):
        return model.base_model(ids[:, first:end], position_ids=positions, use_cache=False).last_hidden_state


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
