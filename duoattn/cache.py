"""The split KV cache: one preallocated, graph-safe cache for every DuoAttention deployment.

Per DuoAttention layer (heads reordered retrieval-first by :mod:`duoattn.reorder`):

* retrieval KV heads keep ``[B, n_ret, max_len, D]``, in the model dtype or quantised (int8 / int4 codes with
  scales and zero points, :mod:`duoattn.quant.kv`);
* streaming KV heads keep a sink + recent ring ``[B, n_str, sink + recent, D]`` in the model dtype (slots:
  :func:`duoattn.layout.ring_slot`). Their middle tokens are never stored: that memory is never allocated.

Storage is allocated at the first token (batch size from the keys, length from ``max_len``, the size of the
request) and written in place afterwards: decoding copies nothing that grows with the context.

The cache shares one clock, a 0-d int64 tensor on the device holding the number of stored tokens. The first
DuoAttention layer advances it when new tokens arrive and every layer writes at ``clock - C .. clock - 1``. Decode
steps never read it on the host, so a CUDA graph captured once replays correctly as the sequence grows; a prefill
chunk is planned on the host (:class:`duoattn.layout.ChunkPlan`) from a host-side count kept beside the clock.

Local sliding-window layers (Gemma 2 / 3, Qwen's ``use_sliding_window``) keep transformers' own cache layers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from transformers import PretrainedConfig
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicCache, DynamicLayer

from .checks import check_int
from .kernels import dispatch
from .kernels.rows import DecodeRows, Member
from .layout import ChunkPlan, prefix_length, ring_slot, split_kv_bytes
from .prefill import PrefillMode, PromptHistory
from .quant.kv import KVQuantConfig, QuantizedKV, quantize
from .roles import LayerRoles

Stored = torch.Tensor | QuantizedKV


@dataclass
class DuoStates:
    """What :meth:`DuoLayer.update` hands to the attention function: the layer itself, the plan of the chunk
    being prefilled (None while decoding one token per sequence) and, when some of the chunk's queries attend fully
    on streaming heads (prefill ``"full"`` / ``"window:N"``), the streaming heads' keys and values
    ``[B, n_str, end, D]`` of every position up to the chunk's end."""

    layer: DuoLayer
    plan: ChunkPlan | None
    dense: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def shape(self):
        # Reached only when an attention function other than DuoAttention's gets these states.
        raise RuntimeError(
            "a DuoCache was passed to a model without DuoAttention enabled: use it inside duo_attention(model, "
            "pattern) (or enable_duo_attention), or give the model a stock transformers cache"
        )


def _nbytes(*stored: Stored | None) -> int:
    total = 0
    for s in stored:
        if isinstance(s, QuantizedKV):
            total += s.nbytes()
        elif s is not None:
            total += s.numel() * s.element_size()
    return total


def cache_kv_bytes(cache: Cache) -> int:
    """Bytes of key and value storage held by any transformers cache (a :class:`DuoCache` or a stock one)."""
    total = 0
    for layer in cache.layers:
        if isinstance(layer, DuoLayer):
            total += layer.kv_bytes()
        else:
            total += _nbytes(getattr(layer, "keys", None), getattr(layer, "values", None))
    return total


class CacheState:
    """What every layer of a :class:`DuoCache` shares: geometry, the clock, kernel choice and workspaces."""

    def __init__(self, max_len: int, sink: int, recent: int, kernels: dispatch.KernelChoice,
                 kv_quant: KVQuantConfig | None, first_layer: int, softcap: bool = False,
                 prefill: PrefillMode | None = None, last_layer: int | None = None):
        self.softcap = softcap
        self.prefill = prefill or PrefillMode()
        self.last_layer = first_layer if last_layer is None else last_layer
        # The prompt being prefilled ends at prompt_end; its queries from dense_from on attend fully on every head
        # (dense_from == prompt_end in the streaming mode). Declared by generate, or by the first chunk stored.
        self.prompt_declared = False
        self.prompt_end = self.dense_from = 0
        self._copy_stream: torch.cuda.Stream | None = None
        self.max_len, self.sink, self.recent, self.capacity = max_len, sink, recent, sink + recent
        self.kernels_requested, self.kv_quant, self.first_layer = kernels, kv_quant, first_layer
        self.kernels: dispatch.KernelChoice | None = None
        self.batch_size = 0
        self.dtype: torch.dtype | None = None
        self.device: torch.device | None = None
        self.clock: torch.Tensor | None = None
        self.length = 0  # host-side count; the graph runner advances it on replays
        self.plan: ChunkPlan | None = None
        self.workspace = dispatch.Workspace()

    def allocate(self, key_states: torch.Tensor, head_dim: int) -> None:
        self.batch_size, self.dtype, self.device = key_states.shape[0], key_states.dtype, key_states.device
        self.kernels = self.kernels_requested.resolve(self.device, head_dim, softcap=self.softcap,
                                                      quantized=self.kv_quant is not None)
        self.clock = torch.zeros((), dtype=torch.int64, device=self.device)

    @property
    def allocated(self) -> bool:
        return self.clock is not None

    @property
    def lengths(self) -> torch.Tensor:
        """The device length the decode kernels read: the clock, shared by every batch row."""
        return self.clock

    def member_lengths(self) -> list[int]:
        """Host-side length of each member of the decode rows: this cache alone."""
        return [self.length]

    def declare_prompt(self, length: int) -> None:
        """The next ``length`` tokens are a prompt: its last queries attend fully per the prefill mode."""
        if not self.prefill.streams and self.length:
            raise ValueError(f"prefill={self.prefill.name!r} needs the whole prompt in an empty cache: this one holds "
                             f"{self.length} tokens, whose streaming heads have dropped their middle tokens (use "
                             "prefill='streaming' to continue a cache)")
        self.prompt_declared = True
        self.prompt_end = self.length + length
        self.dense_from = self.length + self.prefill.dense_from(length)

    @property
    def copy_stream(self) -> torch.cuda.Stream | None:
        """The side stream that offloads prompt history to the host (CUDA only)."""
        if self._copy_stream is None and self.device is not None and self.device.type == "cuda":
            self._copy_stream = torch.cuda.Stream(self.device)
        return self._copy_stream


class PreallocatedLayer(CacheLayerMixin):
    """A cache layer sized once to ``self.state.max_len`` tokens per row (a :class:`DuoLayer`, or a batch view's
    layer): what transformers asks about its size; masks span the whole capacity, as for its static layers."""

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.state.max_len, 0

    def get_max_length(self) -> int:
        return self.state.max_len

    def get_max_cache_shape(self) -> int:
        return self.state.max_len


class DuoLayer(PreallocatedLayer):
    """One DuoAttention layer of a :class:`DuoCache`: ``n_ret`` retrieval KV heads (first), ``n_str`` streaming."""

    is_compileable = True  # decode steps are graph-safe; generate() then hands them to duoattn's graph runner
    is_sliding = False

    def __init__(self, state: CacheState, layer_idx: int, roles: LayerRoles):
        super().__init__()
        self.state, self.layer_idx, self.roles = state, layer_idx, roles
        self.n_ret, self.n_str = roles.num_retrieval, roles.num_streaming
        self.full_k: Stored | None = None
        self.full_v: Stored | None = None
        self.ring_k: torch.Tensor | None = None
        self.ring_v: torch.Tensor | None = None
        self.history: PromptHistory | None = None  # streaming heads' prompt keys, while dense queries need them
        self.rows: DecodeRows | None = None  # what a decode step reads and writes (built with the storage)
        self.splits = 1

    # -------------------------------------------------------------------------------------------- allocation
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        # Normal tensors even when the first forward runs under inference_mode: the cache outlives that call and
        # is updated in place later (a continued generate, a benchmark rewinding it).
        with torch.inference_mode(False):
            self._allocate(key_states)

    def _allocate(self, key_states: torch.Tensor) -> None:
        s = self.state
        bsz, hkv, _, d = key_states.shape
        if hkv != self.roles.num_kv_heads:
            raise ValueError(f"layer {self.layer_idx}: the cache expects {self.roles.num_kv_heads} KV heads, got keys "
                             f"of shape {tuple(key_states.shape)}")
        if not s.allocated:
            s.allocate(key_states, d)
        elif bsz != s.batch_size:
            raise ValueError(f"layer {self.layer_idx}: the cache holds batch {s.batch_size}, got {bsz}")
        kw = dict(dtype=s.dtype, device=s.device)
        if self.n_ret:
            lead = (bsz, self.n_ret)
            if s.kv_quant is None:
                # Zeroed: the CPU decode path may read whole buffers under a mask, and 0 * NaN = NaN.
                self.full_k = torch.zeros(*lead, s.max_len, d, **kw)
                self.full_v = torch.zeros(*lead, s.max_len, d, **kw)
            else:
                self.full_k = QuantizedKV.zeros(lead, s.max_len, d, s.kv_quant, s.dtype, s.device)
                self.full_v = QuantizedKV.zeros(lead, s.max_len, d, s.kv_quant, s.dtype, s.device)
        if self.n_str:
            # A cache shorter than the window never wraps (slot = position): it needs only max_len slots.
            ring = min(s.capacity, s.max_len)
            self.ring_k = torch.zeros(bsz, self.n_str, ring, d, **kw)
            self.ring_v = torch.zeros(bsz, self.n_str, ring, d, **kw)
        self.rows = DecodeRows.of(self.full_k, self.full_v, self.ring_k, self.ring_v,
                                  tables=s.kernels.decode == "triton")
        self.splits = dispatch.decode_splits(s.kernels, bsz, self.n_ret, s.max_len)
        s.workspace.reserve_decode(bsz, self.n_ret * self.roles.num_groups, self.splits,
                                   self.roles.num_kv_heads * self.roles.num_groups, d, s.dtype, s.device)
        self.device, self.dtype = s.device, s.dtype
        self.is_initialized = True

    # ------------------------------------------------------------------------------------------------ update
    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[DuoStates, DuoStates]:
        """Store ``[B, Hkv, C, D]`` new keys and values; return what the attention function needs."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        s = self.state
        c = key_states.shape[-2]
        if self.layer_idx == s.first_layer:
            self._advance(c)
        if c == 1 and s.plan is None:
            dispatch.append_rows(s.kernels, key_states, value_states, self.rows, s.clock, s.sink, s.recent)
            states = DuoStates(self, None)
        else:
            if s.plan is None or s.plan.size != c:
                raise RuntimeError(f"a prefill chunk reached layer {self.layer_idx} before it was planned")
            states = DuoStates(self, s.plan, self._store_chunk(key_states, value_states, s.plan))
        return states, states

    def _advance(self, c: int) -> None:
        s = self.state
        start = s.length
        if start + c > s.max_len:
            raise ValueError(
                f"the DuoAttention cache was sized for {s.max_len} tokens; {start} stored + {c} new would not fit "
                "(pass a larger max_new_tokens to generate, or a cache from handle.new_cache(max_len=...))"
            )
        if not s.prompt_declared and start == 0:  # a forward pass on an empty cache is the prompt
            s.declare_prompt(c)
        end = start + c
        if not s.prefill.streams and start < s.prompt_end < end:
            raise ValueError(f"a chunk at positions {start}..{end - 1} crosses the end of the prompt declared with "
                             f"cache.begin_prompt ({s.prompt_end} tokens): feed the prompt, then the rest")
        # some queries attend fully on every head: the chunk meets [dense_from, prompt_end), empty when streaming
        dense = max(start, s.dense_from) < min(end, s.prompt_end)
        keep = not s.prefill.streams and end < s.prompt_end  # a later prompt chunk has dense queries
        if c == 1 and not (dense or keep):  # a decode step
            s.plan = None
        else:
            s.plan = ChunkPlan.build(start, c, s.sink, s.recent, s.dense_from if dense else None, keep)
        s.length = end
        s.clock.add_(c)

    def _store_chunk(self, k: torch.Tensor, v: torch.Tensor, plan: ChunkPlan
                     ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Retrieval heads: write in place. Streaming heads: fill the scratch (old ring, then the chunk) for the
        streamed queries, then keep the chunk's sink and most recent tokens in the ring. Returns the streaming
        heads' keys and values up to the chunk's end when some of its queries attend fully (else None)."""
        if self.n_ret:
            kr, vr = k[:, : self.n_ret], v[:, : self.n_ret]
            if isinstance(self.full_k, QuantizedKV):
                q = self.state.kv_quant
                self.full_k.write(plan.start, quantize(kr, q))
                self.full_v.write(plan.start, quantize(vr, q))
            else:
                self.full_k[:, :, plan.start : plan.end].copy_(kr)
                self.full_v[:, :, plan.start : plan.end].copy_(vr)
        if not self.n_str:
            return None
        ks, vs = k[:, self.n_ret :], v[:, self.n_ret :]
        dense = None
        if plan.record or plan.n_streamed < plan.size:
            dense = self._prompt_history(plan, ks, vs)
        if plan.n_streamed:
            sub = plan.streamed()  # the streamed queries' layout: a prefix of the chunk's scratch
            sk, sv = self.scratch(sub)
            for dst, slot, n in sub.gather:
                sk[:, :, dst : dst + n].copy_(self.ring_k[:, :, slot : slot + n])
                sv[:, :, dst : dst + n].copy_(self.ring_v[:, :, slot : slot + n])
            sk[:, :, sub.prefix :].copy_(ks[:, :, : sub.size])
            sv[:, :, sub.prefix :].copy_(vs[:, :, : sub.size])
            if sub.sink_visible > sub.start:  # the chunk's own sink tokens, also beside the stored ones
                sk[:, :, sub.start : sub.sink_visible].copy_(ks[:, :, : sub.sink_visible - sub.start])
                sv[:, :, sub.start : sub.sink_visible].copy_(vs[:, :, : sub.sink_visible - sub.start])
        for off, slot, n in plan.keep:
            self.ring_k[:, :, slot : slot + n].copy_(ks[:, :, off : off + n])
            self.ring_v[:, :, slot : slot + n].copy_(vs[:, :, off : off + n])
        return dense

    def _prompt_history(self, plan: ChunkPlan, ks: torch.Tensor, vs: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Keep the streaming heads' chunk for later dense queries; return their keys up to the chunk's end if its
        own queries need them (prefill ``"full"``: history on the device; ``"window:N"``: on the host)."""
        s = self.state
        if self.history is None:
            self.history = PromptHistory(s.prefill.kind == "window", s.prompt_end, s.copy_stream)

        def room(length: int) -> tuple[torch.Tensor, torch.Tensor]:
            return s.workspace.dense(s.batch_size, self.n_str, length, ks.shape[-1], s.dtype, s.device)

        return self.history.chunk(plan.start, ks, vs, plan.record, plan.n_streamed < plan.size, room)

    def end_chunk(self, plan: ChunkPlan) -> None:
        """After the attention of ``plan``'s chunk: the prompt's last chunk frees the prompt history (and, at the
        last layer, the shared room it was brought back into)."""
        if plan.end < self.state.prompt_end:
            return
        if self.history is not None:
            self.history.free()
            self.history = None
        if self.layer_idx == self.state.last_layer:
            self.state.workspace.release_dense()

    def scratch(self, plan: ChunkPlan) -> tuple[torch.Tensor, torch.Tensor]:
        """This layer's streaming scratch ``[B, n_str, prefix + C, D]`` for ``plan`` (shared by all layers)."""
        s = self.state
        return s.workspace.scratch(s.batch_size, self.n_str, plan.scratch_length, self.full_or_ring_dim(), s.dtype,
                                   s.device)

    def full_or_ring_dim(self) -> int:
        t = self.ring_k if self.ring_k is not None else self.full_k
        return t.shape[-1] if isinstance(t, torch.Tensor) else t.head_dim

    def member(self) -> Member:
        """This layer's storage, as a member of a batch view's decode rows."""
        if not self.is_initialized:
            raise RuntimeError(f"layer {self.layer_idx} is not allocated yet")
        return Member(self.full_k, self.full_v, self.ring_k, self.ring_v)

    # ------------------------------------------------------------------------------------ cache protocol
    def get_seq_length(self) -> torch.Tensor | int:
        # A device tensor, as transformers' StaticLayer: position ids stay on the device inside a CUDA graph.
        return self.state.clock if self.state.allocated else 0

    def kv_bytes(self) -> int:
        """Bytes of key and value storage this layer holds (its preallocated capacity)."""
        return _nbytes(self.full_k, self.full_v, self.ring_k, self.ring_v)

    def _map_(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Apply ``fn`` to every buffer in place (the buffers keep their storage: captured graphs stay valid)."""
        for stored in (self.full_k, self.full_v, self.ring_k, self.ring_v):
            parts = (stored.data, stored.scale, stored.zero) if isinstance(stored, QuantizedKV) else (stored,)
            for t in parts:
                if t is not None:
                    t.copy_(fn(t))

    def reset(self) -> None:
        if self.state.allocated:
            self.state.clock.zero_()
        self.state.length = 0
        self.state.plan = None
        self.state.prompt_declared = False
        self.state.prompt_end = self.state.dense_from = 0
        self.history = None

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.is_initialized:
            self._map_(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise NotImplementedError("the DuoAttention cache keeps its batch size; start a new cache instead")

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("the DuoAttention cache keeps its batch size; start a new cache instead")

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove != 0:
            raise NotImplementedError(
                "a DuoAttention cache cannot be cropped: streaming heads have already dropped the evicted tokens"
            )

    def offload(self) -> None:
        raise NotImplementedError("cache offloading is not supported with DuoAttention")

    def prefetch(self) -> None:
        raise NotImplementedError("cache offloading is not supported with DuoAttention")


class DuoCache(Cache):
    """The split cache of a model with DuoAttention enabled; build it with ``handle.new_cache(max_len)``.

    Args:
        layer_roles: one entry per decoder layer; None keeps transformers' default cache layer for that layer (the
            local sliding-window layers of Gemma, for example).
        max_len: tokens per sequence the cache holds (prompt + generated).
        config: the model config, for the default layers.
        kv_quant: store the retrieval heads quantised (None: the model dtype).
        kernels: kernel choice (default: the fastest available on the keys' device).
        softcap: the model soft-caps attention scores (Gemma 2): kernels that cannot are not chosen.

    The prefill mode (:mod:`duoattn.prefill`) comes from the layers' roles. Its prompt is declared with
    :meth:`begin_prompt` (``generate`` does it); otherwise the first forward pass on an empty cache is the prompt.
    """

    def __init__(
        self,
        layer_roles: Sequence[LayerRoles | None],
        max_len: int,
        config: PretrainedConfig | None = None,
        kv_quant: KVQuantConfig | None = None,
        kernels: dispatch.KernelChoice | None = None,
        softcap: bool = False,
    ):
        check_int("max_len", max_len, 1)
        duo = [i for i, r in enumerate(layer_roles) if r is not None]
        if not duo:
            raise ValueError("a DuoCache needs at least one DuoAttention layer")
        first = next(r for r in layer_roles if r is not None)
        self.state = CacheState(max_len, first.sink, first.recent, kernels or dispatch.KernelChoice(), kv_quant,
                                duo[0], softcap, first.prefill, duo[-1])
        if config is not None and any(r is None for r in layer_roles):
            layers = list(DynamicCache(config=config).layers)
            if len(layers) != len(layer_roles):
                raise ValueError(f"config has {len(layers)} layers, layer_roles has {len(layer_roles)}")
        else:
            layers = [DynamicLayer() for _ in layer_roles]
        for idx, roles in enumerate(layer_roles):
            if roles is not None:
                layers[idx] = DuoLayer(self.state, idx, roles)
        super().__init__(layers=layers)

    @property
    def max_len(self) -> int:
        return self.state.max_len

    @property
    def graph_safe(self) -> bool:
        """Whether a decode step of this cache can be captured in a CUDA graph (every layer is a DuoLayer and the
        decode kernels read lengths from the device)."""
        s = self.state
        return (s.allocated and all(isinstance(layer, DuoLayer) for layer in self.layers)
                and dispatch.graph_safe(s.kernels))

    def get_seq_length(self, layer_idx: int = 0) -> torch.Tensor | int:
        if all(isinstance(layer, DuoLayer) for layer in self.layers):
            return self.layers[0].get_seq_length()
        return self.state.length  # local layers keep host-side counts: so does the cache

    def length(self) -> int:
        """Tokens stored (host-side count, no synchronisation)."""
        return self.state.length

    def begin_prompt(self, length: int) -> None:
        """Declare that the next ``length`` tokens, in one or more chunks, are a prompt: with prefill ``"full"`` or
        ``"window:N"`` its last queries attend fully on every head (the cache must then be empty)."""
        check_int("length", length, 1)
        if self.state.length + length > self.state.max_len:
            raise ValueError(f"a prompt of {length} tokens after {self.state.length} stored does not fit the cache "
                             f"({self.state.max_len} tokens)")
        self.state.declare_prompt(length)
        for layer in self.layers:
            if isinstance(layer, DuoLayer):
                layer.history = None

    @property
    def in_prompt(self) -> bool:
        """True while a declared prompt is being prefilled (its tokens do not run as decode steps)."""
        return self.state.length < self.state.prompt_end

    def kv_bytes(self) -> int:
        """Bytes of key and value storage held, over all layers (preallocated capacity included)."""
        return cache_kv_bytes(self)

    def kv_bytes_read(self, tokens: int) -> int:
        """Bytes of keys and values one decode step reads once ``tokens`` tokens are stored."""
        s = self.state
        duo = [l for l in self.layers if isinstance(l, DuoLayer)]
        elem = torch.empty((), dtype=s.dtype).element_size()
        d = duo[0].full_or_ring_dim()
        full_vec = None if s.kv_quant is None else s.kv_quant.bytes_per_vector(d, elem)
        n_ret, n_str = sum(l.n_ret for l in duo), sum(l.n_str for l in duo)
        return split_kv_bytes(n_ret, n_str, tokens, s.sink, s.recent, d, elem, full_vec, s.batch_size)

    def preallocate(self, batch_size: int, dtype: torch.dtype, device: torch.device | str, head_dim: int) -> None:
        """Allocate every DuoAttention layer's storage now (it is otherwise allocated at the first token)."""
        check_int("batch_size", batch_size, 1)
        for layer in self.layers:
            if isinstance(layer, DuoLayer) and not layer.is_initialized:
                like = torch.empty(batch_size, layer.roles.num_kv_heads, 0, head_dim, dtype=dtype, device=device)
                layer.lazy_initialization(like, like)

    def set_length(self, tokens: int) -> None:
        """Declare the first ``tokens`` positions stored (for caches filled directly, or to rewind a benchmark)."""
        s = self.state
        if not s.allocated:
            raise RuntimeError("the cache is not allocated yet: call preallocate() or run a forward pass first")
        if not 0 <= tokens <= s.max_len:
            raise ValueError(f"tokens must be in [0, {s.max_len}], got {tokens}")
        s.length, s.plan = tokens, None
        s.prompt_declared, s.prompt_end, s.dense_from = tokens > 0, 0, 0  # a rewound empty cache takes a new prompt
        for layer in self.layers:
            if isinstance(layer, DuoLayer):
                layer.history = None
        s.clock.fill_(tokens)

    def fill_random(self, tokens: int, generator: torch.Generator | None = None, std: float = 1.0) -> None:
        """Declare ``tokens`` positions stored with random keys and values: a stand-in for a prefill when only decode
        speed matters (normal times ``std``; a quantised cache gets random codes, scales and zero points)."""
        s = self.state
        if not s.allocated:
            raise RuntimeError("the cache is not allocated yet: call preallocate() or run a forward pass first")
        if not 0 <= tokens <= s.max_len:
            raise ValueError(f"tokens must be in [0, {s.max_len}], got {tokens}")
        n_ring = min(tokens, s.capacity)
        for layer in self.layers:
            if not isinstance(layer, DuoLayer):
                continue
            for stored, n in ((layer.full_k, tokens), (layer.full_v, tokens), (layer.ring_k, n_ring),
                              (layer.ring_v, n_ring)):
                if stored is None or not n:
                    continue
                if isinstance(stored, QuantizedKV):
                    stored.data[..., :n, :].random_(0, 256, generator=generator)
                    stored.scale[..., :n, :].uniform_(0.0, 2 * std / (2**stored.bits - 1), generator=generator)
                    stored.zero[..., :n, :].uniform_(-std, 0.0, generator=generator)
                else:
                    stored[:, :, :n].normal_(0.0, std, generator=generator)
        self.set_length(tokens)

    def describe(self) -> dict[str, int | str]:
        s = self.state
        k = s.kernels or s.kernels_requested
        return {"max_len": s.max_len, "batch_size": s.batch_size, "sink": s.sink, "recent": s.recent,
                "prefix": prefix_length(s.sink, s.recent), "decode_kernel": k.decode,
                "streaming_prefill_kernel": k.streaming_prefill,
                "kv_bits": 16 if s.kv_quant is None else s.kv_quant.bits}


__all__ = ["CacheState", "DuoCache", "DuoLayer", "DuoStates", "cache_kv_bytes", "ring_slot"]
