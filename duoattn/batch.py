"""A batch view over several caches: one ``[B, 1]`` decode step for sequences of different lengths.

Each request keeps its own preallocated :class:`~duoattn.cache.DuoCache` (its exact memory, its own prefill). A
:class:`BatchCache` gathers the members' storage layer by layer into :class:`~duoattn.kernels.rows.DecodeRows`
(the Triton offset tables are built here, once per membership) and keeps one device length per row. It is a
transformers :class:`~transformers.cache_utils.Cache`, so the model's own attention modules call ``update`` on it;
the registered attention function then runs the same decode kernels as for one cache.

A step through the view (:meth:`BatchCache.step_inputs`, then the model's forward) reads every length from the
device and allocates nothing: the first DuoAttention layer adds one to ``lengths`` on the device and to each
member's host count, every layer appends at ``lengths[b] - 1`` and attends over ``lengths[b]`` tokens. The members'
own clocks are brought up to date by :meth:`BatchCache.release` (a decode step through the view does not touch
them). Membership is fixed: when a sequence leaves or joins, build a new view.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers.cache_utils import Cache

from .cache import CacheState, DuoCache, DuoLayer, DuoStates, PreallocatedLayer
from .kernels import dispatch
from .kernels.rows import DecodeRows


class BatchState:
    """What every layer of a :class:`BatchCache` shares: the members' states, per-row device lengths, kernels and
    workspaces."""

    def __init__(self, caches: Sequence[DuoCache]):
        self.caches = list(caches)  # kept alive while the view lives
        self.states: list[CacheState] = [c.state for c in self.caches]
        first = self.states[0]
        self.kernels = first.kernels
        self.sink, self.recent = first.sink, first.recent
        self.first_layer = first.first_layer
        self.dtype, self.device = first.dtype, first.device
        self.batch = sum(s.batch_size for s in self.states)
        self.max_len = max(s.max_len for s in self.states)
        with torch.inference_mode(False):  # outlive the call that built them; updated in place by every step
            self.lengths = torch.tensor([s.length for s in self.states for _ in range(s.batch_size)],
                                        dtype=torch.int64, device=self.device)
            self.positions = torch.empty(self.batch, 1, dtype=torch.long, device=self.device)
            self.ids = torch.zeros(self.batch, 1, dtype=torch.long, device=self.device)
            self._host_ids = torch.zeros(self.batch, 1, dtype=torch.long,
                                         pin_memory=self.device.type == "cuda")
        self._host_view = self._host_ids.numpy()
        self.workspace = dispatch.Workspace()

    def member_lengths(self) -> list[int]:
        """Host-side length of each member (cache)."""
        return [s.length for s in self.states]

    def advance(self) -> None:
        """One token for every row: the device lengths, and each member's host count."""
        for i, s in enumerate(self.states):
            if s.length + 1 > s.max_len:
                raise ValueError(f"member {i} of the batch: its DuoAttention cache was sized for {s.max_len} tokens "
                                 "and is full")
        for s in self.states:  # per sequence, never per head
            s.length += 1
        self.lengths.add_(1)


class BatchLayer(PreallocatedLayer):
    """One DuoAttention layer of a :class:`BatchCache`: the members' storage of that layer as decode rows."""

    is_compileable = False
    is_sliding = False

    def __init__(self, state: BatchState, layer_idx: int, layers: Sequence[DuoLayer]):
        super().__init__()
        self.state, self.layer_idx = state, layer_idx
        roles = layers[0].roles
        for i, layer in enumerate(layers):
            if (layer.n_ret, layer.n_str) != (roles.num_retrieval, roles.num_streaming):
                raise ValueError(f"layer {layer_idx}: member {i} has {layer.n_ret} retrieval / {layer.n_str} streaming "
                                 f"KV heads, member 0 {roles.num_retrieval} / {roles.num_streaming}")
        self.roles = roles
        self.n_ret, self.n_str = roles.num_retrieval, roles.num_streaming
        self.rows = DecodeRows([layer.member() for layer in layers], tables=state.kernels.decode == "triton")
        self.splits = dispatch.decode_splits(state.kernels, state.batch, self.n_ret, state.max_len)
        state.workspace.reserve_decode(state.batch, self.n_ret * roles.num_groups, self.splits,
                                       roles.num_kv_heads * roles.num_groups, self.rows.head_dim, state.dtype,
                                       state.device)
        self.device, self.dtype = state.device, state.dtype
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        raise RuntimeError("a batch view holds no storage of its own: its members are allocated caches")

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
               ) -> tuple[DuoStates, DuoStates]:
        """Store one token per row, ``[B, Hkv, 1, D]``; return what the attention function needs."""
        s = self.state
        if key_states.shape[-2] != 1 or key_states.shape[0] != s.batch:
            raise ValueError(f"a batch view decodes one token for each of its {s.batch} rows, got keys of shape "
                             f"{tuple(key_states.shape)}; prefill each sequence in its own cache")
        if self.layer_idx == s.first_layer:
            s.advance()
        dispatch.append_rows(s.kernels, key_states, value_states, self.rows, s.lengths, s.sink, s.recent)
        states = DuoStates(self, None)
        return states, states

    def get_seq_length(self) -> torch.Tensor:
        return self.state.lengths  # one length per row, on the device

    def reset(self) -> None:
        raise NotImplementedError("a batch view cannot be reset: reset its member caches and build a new view")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError("a batch view does not reorder rows: build a new view from the caches")

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("a batch view cannot be cropped")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise NotImplementedError("a batch view keeps its members: build a new view when they change")

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("a batch view keeps its members: build a new view when they change")

    def offload(self) -> None:
        raise NotImplementedError("cache offloading is not supported with DuoAttention")

    def prefetch(self) -> None:
        raise NotImplementedError("cache offloading is not supported with DuoAttention")


def check_members(caches: Sequence[DuoCache]) -> None:
    """Raise a clear error unless ``caches`` can decode together in one batch view."""
    if not caches:
        raise ValueError("a batch view needs at least one cache")
    first = caches[0]
    for i, c in enumerate(caches):
        if not isinstance(c, DuoCache):
            raise TypeError(f"caches[{i}] is a {type(c).__name__}, expected a DuoCache")
        s = c.state
        if not s.allocated:
            raise ValueError(f"caches[{i}] is not allocated yet: prefill it (or preallocate it) first")
        if c.in_prompt:
            raise ValueError(f"caches[{i}] is still prefilling its prompt ({s.length} of {s.prompt_end} tokens)")
        if not all(isinstance(layer, DuoLayer) for layer in c.layers):
            raise ValueError(f"caches[{i}] has local sliding-window layers (transformers' own caches), which a batch "
                             "view cannot gather: decode such models one cache at a time")
        f = first.state
        if len(c.layers) != len(first.layers):
            raise ValueError(f"caches[{i}] has {len(c.layers)} layers, caches[0] {len(first.layers)}")
        mine = (s.sink, s.recent, s.kernels, s.kv_quant, s.dtype, s.device, s.softcap)
        theirs = (f.sink, f.recent, f.kernels, f.kv_quant, f.dtype, f.device, f.softcap)
        if mine != theirs:
            raise ValueError(f"caches[{i}] differs from caches[0] in (sink, recent, kernels, kv_quant, dtype, device, "
                             f"softcap): {mine} vs {theirs}")


class BatchCache(Cache):
    """Several :class:`~duoattn.cache.DuoCache` (each past its prompt) decoding as one batch, row ``b`` with its own
    length. Rows are the members' batch rows, in order.

    Usage: ``inputs = view.step_inputs(tokens)``, then ``model(**inputs, cache=view, use_cache=True)``
    (``past_key_values=`` on older transformers); call :meth:`release` when done with the view.
    """

    def __init__(self, caches: Sequence[DuoCache]):
        check_members(caches)
        self.state = BatchState(caches)
        layers = [BatchLayer(self.state, i, [c.layers[i] for c in caches]) for i in range(len(caches[0].layers))]
        super().__init__(layers=layers)

    @property
    def caches(self) -> list[DuoCache]:
        return self.state.caches

    @property
    def batch_size(self) -> int:
        return self.state.batch

    @property
    def max_len(self) -> int:
        return self.state.max_len

    def get_seq_length(self, layer_idx: int = 0) -> torch.Tensor:
        """``[B]`` lengths on the device (one per row)."""
        return self.state.lengths

    def lengths(self) -> list[int]:
        """Host-side length of each member (no synchronisation)."""
        return self.state.member_lengths()

    def step_inputs(self, tokens: Sequence[int]) -> dict[str, torch.Tensor]:
        """The forward inputs of one decode step: ``input_ids`` ``[B, 1]`` (one token per row, from the host) and
        ``position_ids`` ``[B, 1]`` (each row's length: the position of its new token). Static buffers, no
        allocation."""
        s = self.state
        if len(tokens) != s.batch:
            raise ValueError(f"tokens must hold one token per row ({s.batch}), got {len(tokens)}")
        s._host_view[:, 0] = tokens
        s.ids.copy_(s._host_ids, non_blocking=True)
        s.positions.copy_(s.lengths.view(-1, 1))
        return {"input_ids": s.ids, "position_ids": s.positions}

    def release(self) -> None:
        """Bring every member's device clock up to its host count (the view advanced only the counts)."""
        for s in self.state.states:
            s.clock.fill_(s.length)

    def kv_bytes(self) -> int:
        """Bytes of key and value storage the members hold."""
        return sum(c.kv_bytes() for c in self.state.caches)


__all__ = ["BatchCache", "BatchLayer", "BatchState", "check_members"]
