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
from .checks import check_int
from .kernels import dispatch
from .kernels.rows import DecodeRows


class BatchState:
    """What every layer of a :class:`BatchCache` shares: the members' states, per-row device lengths, kernels and
    workspaces.

    ``rows`` > the members' rows pads the view with rows of ``pad`` (a batch-1 cache holding one token), whose length
    never moves (``increment`` 0): a view of fixed size whose members can be rebound (:meth:`BatchCache.bind`).
    ``max_len`` (default: the longest member) sizes the split-KV partition.
    """

    def __init__(self, caches: Sequence[DuoCache], pad: DuoCache | None = None, rows: int | None = None,
                 max_len: int | None = None):
        self.pad = pad
        members = list(caches) if caches else [pad]
        first = members[0].state
        self.kernels = first.kernels
        self.sink, self.recent = first.sink, first.recent
        self.first_layer = first.first_layer
        self.dtype, self.device = first.dtype, first.device
        used = sum(c.state.batch_size for c in caches)
        self.batch = used if rows is None else rows
        self.max_len = max_len if max_len is not None else max(c.state.max_len for c in members)
        with torch.inference_mode(False):  # outlive the call that built them; updated in place by every step
            self.lengths = torch.zeros(self.batch, dtype=torch.int64, device=self.device)
            self.increment = torch.zeros(self.batch, dtype=torch.int64, device=self.device)
            self.positions = torch.empty(self.batch, 1, dtype=torch.long, device=self.device)
            self.ids = torch.zeros(self.batch, 1, dtype=torch.long, device=self.device)
            self._host_ids = torch.zeros(self.batch, 1, dtype=torch.long,
                                         pin_memory=self.device.type == "cuda")
        self._host_view = self._host_ids.numpy()
        self.workspace = dispatch.Workspace()
        self.caches: list[DuoCache] = []
        self.states: list[CacheState] = []
        self.row_states: list[CacheState] = []
        self.used = 0

    def set_members(self, caches: Sequence[DuoCache]) -> list[DuoCache]:
        """Take ``caches`` as the members (then padding): their lengths and increments on the device. Returns the
        cache of every member in row order, padding included."""
        self.caches = list(caches)  # kept alive while the view holds them
        self.states: list[CacheState] = [c.state for c in self.caches]
        self.used = sum(s.batch_size for s in self.states)
        if self.used > self.batch:
            raise ValueError(f"the members hold {self.used} rows, the view {self.batch}")
        padded = self.caches + [self.pad] * (self.batch - self.used)
        self.row_states = [c.state for c in padded]
        lengths = [s.length for s in self.row_states for _ in range(s.batch_size)]
        increment = [1] * self.used + [0] * (self.batch - self.used)
        self.lengths.copy_(torch.tensor(lengths, dtype=torch.int64))
        self.increment.copy_(torch.tensor(increment, dtype=torch.int64))
        return padded

    def member_lengths(self) -> list[int]:
        """Host-side length of each member of the decode rows (padding included)."""
        return [s.length for s in self.row_states]

    def count(self) -> None:
        """One token for every member's host count (the device lengths move in the step itself)."""
        for i, s in enumerate(self.states):
            if s.length + 1 > s.max_len:
                raise ValueError(f"member {i} of the batch: its DuoAttention cache was sized for {s.max_len} tokens "
                                 "and is full")
        for s in self.states:  # per sequence, never per head
            s.length += 1

    def advance(self) -> None:
        """One token for every member row: the host counts, and the device lengths (padding rows stay)."""
        self.count()
        self.lengths.add_(self.increment)


class BatchLayer(PreallocatedLayer):
    """One DuoAttention layer of a :class:`BatchCache`: the members' storage of that layer as decode rows."""

    is_compileable = False
    is_sliding = False

    def __init__(self, state: BatchState, layer_idx: int, layers: Sequence[DuoLayer]):
        super().__init__()
        self.state, self.layer_idx = state, layer_idx
        roles = layers[0].roles
        self.roles = roles
        self.n_ret, self.n_str = roles.num_retrieval, roles.num_streaming
        self.rows: DecodeRows | None = None
        self.bind(layers)
        self.splits = dispatch.decode_splits(state.kernels, state.batch, self.n_ret, state.max_len)
        state.workspace.reserve_decode(state.batch, self.n_ret * roles.num_groups, self.splits,
                                       roles.num_kv_heads * roles.num_groups, self.rows.head_dim, state.dtype,
                                       state.device)
        self.device, self.dtype = state.device, state.dtype
        self.is_initialized = True

    def bind(self, layers: Sequence[DuoLayer]) -> None:
        """Address the storage of ``layers`` (one per member, padding included): through the same base pointers and
        offset table as before, once the view has been built."""
        for i, layer in enumerate(layers):
            if (layer.n_ret, layer.n_str) != (self.n_ret, self.n_str):
                raise ValueError(f"layer {self.layer_idx}: member {i} has {layer.n_ret} retrieval / {layer.n_str} "
                                 f"streaming KV heads, the view {self.n_ret} / {self.n_str}")
        tables = self.state.kernels.decode == "triton"
        old = self.rows
        fixed = {} if old is None or not tables else {"base": old.base, "codes": old.codes, "out": old.offsets}
        s = self.state
        cap = min(s.max_len, s.sink + s.recent) if s.pad is not None and self.n_str else None
        self.rows = DecodeRows([layer.member() for layer in layers], tables=tables, ring_cap=cap, **fixed)

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

    A view made by :meth:`static` has a fixed number of rows and is rebound to other members in place
    (:meth:`bind`): every tensor a decode step reads stays where it is, so one captured CUDA graph per view decodes
    any membership that fits (:class:`~duoattn.graphs.BatchGraphs`).
    """

    def __init__(self, caches: Sequence[DuoCache], *, _pad: DuoCache | None = None, _rows: int | None = None,
                 _max_len: int | None = None):
        check_members(list(caches) + ([_pad] if _pad is not None else []))
        self.state = BatchState(caches, _pad, _rows, _max_len)
        padded = self.state.set_members(caches)
        layers = [BatchLayer(self.state, i, [c.layers[i] for c in padded]) for i in range(len(padded[0].layers))]
        super().__init__(layers=layers)

    @classmethod
    def static(cls, pad: DuoCache, rows: int, max_len: int) -> BatchCache:
        """A view of ``rows`` rows, all of them padding until :meth:`bind` gives it members.

        ``pad``: a batch-1 cache like the members' (same handle) holding one token, written by every padding row
        (its contents are garbage); ``max_len``: the longest member it will hold (sizes the split-KV partition).
        """
        check_int("rows", rows, 1)
        check_int("max_len", max_len, 1)
        if pad.state.batch_size != 1 or pad.length() != 1:
            raise ValueError(f"pad must be a batch-1 cache holding one token, got batch {pad.state.batch_size} with "
                             f"{pad.length()} tokens")
        return cls([], _pad=pad, _rows=rows, _max_len=max_len)

    @property
    def padded(self) -> bool:
        return self.state.pad is not None

    def bind(self, caches: Sequence[DuoCache]) -> None:
        """Make ``caches`` the members (a view made by :meth:`static`; the rest of its rows pad). The old members'
        clocks are brought up to date first (:meth:`release`)."""
        s = self.state
        if s.pad is None:
            raise ValueError("only a view made by BatchCache.static() can be rebound; build a new view instead")
        check_members(list(caches) + [s.pad])
        rows = sum(c.state.batch_size for c in caches)
        if rows > s.batch:
            raise ValueError(f"caches hold {rows} rows, the view {s.batch}")
        longest = max((c.state.max_len for c in caches), default=0)
        if longest > s.max_len:
            raise ValueError(f"a cache sized for {longest} tokens does not fit a view made for {s.max_len}")
        self.release()
        padded = s.set_members(caches)
        for i, layer in enumerate(self.layers):
            layer.bind([c.layers[i] for c in padded])

    def unbind(self) -> None:
        """Let go of the members (their memory can go back): every row pads until the next :meth:`bind`."""
        self.bind([])

    @property
    def aligned(self) -> tuple[bool, ...]:
        """Whether each layer's offsets allow vectorised loads (a captured step holds the kernels it was captured
        with)."""
        return tuple(layer.rows.aligned for layer in self.layers)

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
        """Host-side length of each member, padding left out (no synchronisation)."""
        return [st.length for st in self.state.states]

    def step_inputs(self, tokens: Sequence[int]) -> dict[str, torch.Tensor]:
        """The forward inputs of one decode step: ``input_ids`` ``[B, 1]`` (one token per row, from the host) and
        ``position_ids`` ``[B, 1]`` (each row's length: the position of its new token), padding rows included.
        Static buffers, no allocation."""
        s = self.state
        if len(tokens) != s.used:
            raise ValueError(f"tokens must hold one token per member row ({s.used}), got {len(tokens)}")
        s._host_view[: s.used, 0] = tokens  # padding rows keep token 0
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
