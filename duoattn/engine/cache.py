"""A preallocated, graph-safe DuoAttention cache for the fast engine.

Per layer, retrieval KV heads keep ``[B, n_ret, max_len, D]`` and streaming KV heads a sink + recent ring
``[B, n_str, sink + recent, D]`` (slot layout of :mod:`duoattn.cache`). It relies on the head order made by
:mod:`duoattn.engine.reorder`: a layer's retrieval KV heads are its first ``n_ret`` heads, so the cache slices the
new keys instead of gathering them.

The whole cache shares one clock, a 0-d int64 tensor on the device holding the number of stored tokens. Layer 0
advances it when it receives new tokens and every layer writes at ``clock - C .. clock - 1``. The decode path never
reads it on the host, so a CUDA graph captured once replays correctly as the sequence grows; a prefill chunk reads
it once (at layer 0) to plan the chunk.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from ..checks import check_int
from ..kernels import dispatch
from .plan import ChunkPlan, prefix_length


@dataclass
class StaticStates:
    """What :meth:`StaticDuoLayer.update` hands to the attention function: the layer itself, and the plan of the
    chunk being prefilled (None while decoding one token)."""

    layer: StaticDuoLayer
    plan: ChunkPlan | None


class CacheState:
    """What every layer of a :class:`StaticDuoCache` shares: geometry, the clock, kernel choice and workspaces."""

    def __init__(
        self,
        batch_size: int,
        max_len: int,
        num_kv_heads: int,
        num_groups: int,
        head_dim: int,
        sink: int,
        recent: int,
        dtype: torch.dtype,
        device: torch.device,
        kernels: dispatch.KernelChoice,
    ):
        self.batch_size, self.max_len = batch_size, max_len
        self.num_kv_heads, self.num_groups, self.head_dim = num_kv_heads, num_groups, head_dim
        self.sink, self.recent, self.capacity = sink, recent, sink + recent
        self.dtype, self.device, self.kernels = dtype, device, kernels
        self.clock = torch.zeros((), dtype=torch.int64, device=device)
        self.plan: ChunkPlan | None = None
        hq = num_kv_heads * num_groups
        self.decode_out = torch.empty(batch_size, 1, hq, head_dim, dtype=dtype, device=device)
        self.partial_out: torch.Tensor | None = None
        self.partial_lse: torch.Tensor | None = None
        self.scratch_k: torch.Tensor | None = None
        self.scratch_v: torch.Tensor | None = None
        self.kernel_workspace: dict[str, object] = {}

    def reserve_partials(self, rows: int, splits: int) -> None:
        """Float32 split-KV workspaces for ``rows`` query heads and ``splits`` ranges (shared by all layers)."""
        have = self.partial_lse
        if have is not None and have.shape[1] >= rows and have.shape[2] >= splits:
            return
        rows = max(rows, 0 if have is None else have.shape[1])
        splits = max(splits, 0 if have is None else have.shape[2])
        b, d = self.batch_size, self.head_dim
        self.partial_out = torch.empty(b, rows, splits, d, dtype=torch.float32, device=self.device)
        self.partial_lse = torch.empty(b, rows, splits, dtype=torch.float32, device=self.device)

    def scratch(self, heads: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Streaming scratch ``[B, heads, length, D]`` (views of one buffer grown on demand, shared by all layers)."""
        have = self.scratch_k
        if have is None or have.shape[1] < heads or have.shape[2] < length:
            shape = (self.batch_size, max(heads, 0 if have is None else have.shape[1]),
                     max(length, 0 if have is None else have.shape[2]), self.head_dim)
            # Zeroed: slots no token uses are masked out, and masked garbage could still be NaN (0 * NaN = NaN).
            self.scratch_k = torch.zeros(shape, dtype=self.dtype, device=self.device)
            self.scratch_v = torch.zeros(shape, dtype=self.dtype, device=self.device)
        return self.scratch_k[:, :heads, :length], self.scratch_v[:, :heads, :length]


class StaticDuoLayer(CacheLayerMixin):
    """One layer: ``n_ret`` retrieval KV heads (first) and ``n_str`` streaming KV heads (last), preallocated."""

    is_compileable = False  # keeps generate() from compiling on its own; the engine captures CUDA graphs instead
    is_sliding = False
    is_croppable = False

    def __init__(self, state: CacheState, layer_idx: int, num_retrieval: int):
        super().__init__()
        if not 0 <= num_retrieval <= state.num_kv_heads:
            raise ValueError(
                f"layer {layer_idx}: num_retrieval must be in [0, {state.num_kv_heads}], got {num_retrieval}"
            )
        self.state, self.layer_idx = state, layer_idx
        self.n_ret, self.n_str = num_retrieval, state.num_kv_heads - num_retrieval
        s = state
        kw = dict(dtype=s.dtype, device=s.device)
        full = (s.batch_size, self.n_ret, s.max_len, s.head_dim)
        ring = (s.batch_size, self.n_str, s.capacity, s.head_dim)
        # Zeroed, not empty: the torch decode path reads the whole buffer under a mask, and a masked-out NaN left
        # in fresh memory would still poison `softmax @ V` (0 * NaN = NaN).
        self.full_k = torch.zeros(full, **kw) if self.n_ret else None
        self.full_v = torch.zeros(full, **kw) if self.n_ret else None
        self.ring_k = torch.zeros(ring, **kw) if self.n_str else None
        self.ring_v = torch.zeros(ring, **kw) if self.n_str else None
        self.splits = dispatch.decode_splits(s.kernels, s.batch_size, self.n_ret, s.max_len)
        if self.n_ret:
            s.reserve_partials(self.n_ret * s.num_groups, self.splits)
        self.device, self.dtype = s.device, s.dtype
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        pass  # allocated up front: the engine sizes the cache before the first token

    # ------------------------------------------------------------------------------------------------ update
    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[StaticStates, StaticStates]:
        """Store ``[B, Hkv, C, D]`` new keys and values; return what the attention function needs."""
        s = self.state
        bsz, hkv, c, _ = key_states.shape
        if (bsz, hkv) != (s.batch_size, s.num_kv_heads):
            raise ValueError(
                f"layer {self.layer_idx}: the cache holds batch {s.batch_size} x {s.num_kv_heads} KV heads, "
                f"got keys of shape {tuple(key_states.shape)}"
            )
        if self.layer_idx == 0:
            self._advance(c)
        if c == 1:
            dispatch.append_token(s.kernels, key_states, value_states, self.full_k, self.full_v, self.ring_k,
                                  self.ring_v, s.clock, s.sink, s.recent)
            states = StaticStates(self, None)
        else:
            if s.plan is None or s.plan.size != c:
                raise RuntimeError(f"a prefill chunk reached layer {self.layer_idx} before layer 0 planned it")
            self._store_chunk(key_states, value_states, s.plan)
            states = StaticStates(self, s.plan)
        return states, states

    def _advance(self, c: int) -> None:
        s = self.state
        if c == 1:
            s.plan = None
            s.clock.add_(1)
            return
        start = int(s.clock)  # one host read per chunk (not on the decode path)
        if start + c > s.max_len:
            raise ValueError(f"the cache holds max_len={s.max_len} tokens; a chunk would end at {start + c}")
        s.plan = ChunkPlan.build(start, c, s.sink, s.recent)
        s.clock.add_(c)

    def _store_chunk(self, k: torch.Tensor, v: torch.Tensor, plan: ChunkPlan) -> None:
        """Retrieval heads: write in place. Streaming heads: fill the scratch (old ring, then the chunk), then keep
        the chunk's sink and most recent tokens in the ring."""
        if self.n_ret:
            self.full_k[:, :, plan.start : plan.end].copy_(k[:, : self.n_ret])
            self.full_v[:, :, plan.start : plan.end].copy_(v[:, : self.n_ret])
        if not self.n_str:
            return
        ks, vs = k[:, self.n_ret :], v[:, self.n_ret :]
        sk, sv = self.state.scratch(self.n_str, plan.scratch_length)
        for dst, slot, n in plan.gather:
            sk[:, :, dst : dst + n].copy_(self.ring_k[:, :, slot : slot + n])
            sv[:, :, dst : dst + n].copy_(self.ring_v[:, :, slot : slot + n])
        sk[:, :, plan.prefix :].copy_(ks)
        sv[:, :, plan.prefix :].copy_(vs)
        if plan.sink_visible > plan.start:  # the chunk's own sink tokens, also beside the stored ones
            sk[:, :, plan.start : plan.sink_visible].copy_(ks[:, :, : plan.sink_visible - plan.start])
            sv[:, :, plan.start : plan.sink_visible].copy_(vs[:, :, : plan.sink_visible - plan.start])
        for off, slot, n in plan.keep:
            self.ring_k[:, :, slot : slot + n].copy_(ks[:, :, off : off + n])
            self.ring_v[:, :, slot : slot + n].copy_(vs[:, :, off : off + n])

    def scratch(self, plan: ChunkPlan) -> tuple[torch.Tensor, torch.Tensor]:
        """This layer's streaming scratch for ``plan`` (valid after :meth:`update` stored the chunk)."""
        return self.state.scratch(self.n_str, plan.scratch_length)

    # ------------------------------------------------------------------------------------ cache protocol
    def get_seq_length(self) -> torch.Tensor:
        return self.state.clock  # a device tensor, as transformers' StaticLayer: position ids stay on the device

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.state.max_len, 0

    def get_max_length(self) -> int:
        return self.state.max_len

    def kv_bytes(self) -> int:
        """Bytes of key and value storage this layer holds (the preallocated capacity)."""
        return sum(t.numel() * t.element_size() for t in (self.full_k, self.full_v, self.ring_k, self.ring_v)
                   if t is not None)

    def reset(self) -> None:
        self.state.clock.zero_()
        self.state.plan = None

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove != 0:
            raise NotImplementedError(
                "a DuoAttention cache cannot be cropped: streaming heads dropped the evicted tokens"
            )

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError("the static DuoAttention cache does not support beam search")

    def offload(self) -> None:
        raise NotImplementedError("cache offloading is not supported with DuoAttention")

    def prefetch(self) -> None:
        raise NotImplementedError("cache offloading is not supported with DuoAttention")


class StaticDuoCache(Cache):
    """A preallocated DuoAttention cache for a reordered model (see :mod:`duoattn.engine.enable`).

    Args:
        num_retrieval: per decoder layer, its number of retrieval KV heads (they come first in the layer).
        batch_size, max_len: sequences and tokens per sequence the cache holds.
        num_kv_heads, num_groups, head_dim: the model's attention geometry (``num_groups`` query heads per KV head).
        sink, recent: the streaming window.
        kernels: which kernels to use (default: the fastest available on ``device``).
    """

    def __init__(
        self,
        num_retrieval: Sequence[int],
        batch_size: int,
        max_len: int,
        num_kv_heads: int,
        num_groups: int,
        head_dim: int,
        sink: int,
        recent: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        kernels: dispatch.KernelChoice | None = None,
    ):
        for name, value, low in (("batch_size", batch_size, 1), ("max_len", max_len, 1), ("sink", sink, 0),
                                 ("recent", recent, 1), ("head_dim", head_dim, 1), ("num_kv_heads", num_kv_heads, 1),
                                 ("num_groups", num_groups, 1)):
            check_int(name, value, low)
        device = torch.device(device)
        kernels = (kernels or dispatch.KernelChoice()).resolve(device, head_dim)
        self.state = CacheState(batch_size, max_len, num_kv_heads, num_groups, head_dim, sink, recent, dtype, device,
                                kernels)
        layers = [StaticDuoLayer(self.state, idx, n) for idx, n in enumerate(num_retrieval)]
        super().__init__(layers=layers)

    @property
    def clock(self) -> torch.Tensor:
        return self.state.clock

    def length(self) -> int:
        """Tokens stored (reads the device clock: a synchronisation)."""
        return int(self.state.clock)

    def set_length(self, tokens: int) -> None:
        """Declare the first ``tokens`` positions valid (for caches filled directly, e.g. with random keys)."""
        if not 0 <= tokens <= self.state.max_len:
            raise ValueError(f"tokens must be in [0, {self.state.max_len}], got {tokens}")
        self.state.clock.fill_(tokens)
        self.state.plan = None

    def kv_bytes(self) -> int:
        """Bytes of key and value storage held, over all layers (preallocated capacity included)."""
        return sum(layer.kv_bytes() for layer in self.layers)

    def kv_bytes_read(self, tokens: int) -> int:
        """Bytes of keys and values one decode step reads once ``tokens`` tokens are stored."""
        s = self.state
        per_head = s.head_dim * 2 * torch.empty((), dtype=s.dtype).element_size() * s.batch_size
        return sum((l.n_ret * tokens + l.n_str * min(tokens, s.capacity)) * per_head for l in self.layers)

    def fill_random(self, tokens: int, generator: torch.Generator | None = None, std: float = 1.0) -> None:
        """Fill the first ``tokens`` positions of every layer with random keys and values (standard normal times
        ``std``) and set the clock: a stand-in for a prefill when only decode speed matters."""
        self.set_length(tokens)
        n_ring = min(tokens, self.state.capacity)
        for layer in self.layers:
            parts = ((layer.full_k, tokens), (layer.full_v, tokens), (layer.ring_k, n_ring), (layer.ring_v, n_ring))
            for t, n in parts:
                if t is not None and n:
                    t[:, :, :n].normal_(0.0, std, generator=generator)

    def describe(self) -> dict[str, int | str]:
        s = self.state
        return {"max_len": s.max_len, "batch_size": s.batch_size, "sink": s.sink, "recent": s.recent,
                "prefix": prefix_length(s.sink, s.recent), "decode_kernel": s.kernels.decode,
                "streaming_prefill_kernel": s.kernels.streaming_prefill}
