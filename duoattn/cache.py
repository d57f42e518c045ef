"""The DuoAttention KV cache: full history for retrieval heads, sink + recent tokens for streaming heads.

Built on transformers' cache seam: :class:`DuoLayer` is a ``CacheLayerMixin`` and :class:`DuoCache` a ``Cache``,
so ``model.generate`` and ``model(...)`` drive it like any other cache. Streaming memory is never allocated beyond
``min(T, sink + recent)`` tokens per head (plus the chunk in flight during a prefill step).

Streaming storage layout, per layer ``[B, n_streaming, min(T, sink + recent), D]``: slot ``p`` holds position ``p``
for ``p < sink``; position ``p >= sink`` lives in slot ``sink + (p - sink) % recent`` (a ring). While
``T <= sink + recent`` this means slot = position, so the buffer simply grows until it is full, then wraps.

``DuoLayer.update`` returns :class:`DuoStates` instead of plain tensors: the registered DuoAttention function
(``duoattn.patch``) knows how to attend over them. Model code only passes them through.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from transformers import PretrainedConfig
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicCache, DynamicLayer

from .quant.kv import QuantizedKV
from .roles import LayerRoles


@dataclass
class DuoStates:
    """Keys (or values) one attention call needs, split by head role.

    Attributes:
        full: ``[B, n_retrieval, T, D]`` positions ``0..T-1``; the queries are the last C of them. None if no
            retrieval head; a ``QuantizedKV`` if the layer stores them quantised.
        sink: ``[B, n_streaming, S, D]`` streaming keys at positions ``0..S-1``. When ``run`` is None (decoding one
            token) it instead holds exactly the keys the query sees, in any order.
        run: ``[B, n_streaming, R, D]`` consecutive positions ``run_start..`` ending at the last query.
    """

    full: torch.Tensor | QuantizedKV | None
    sink: torch.Tensor | None
    run: torch.Tensor | None
    run_start: int


def _take_heads(x: torch.Tensor, index: torch.Tensor, every: bool) -> torch.Tensor:
    return x if every else x.index_select(1, index)


def _nbytes(*tensors: torch.Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def cache_kv_bytes(cache: Cache) -> int:
    """Bytes of key and value storage held by any transformers cache (a :class:`DuoCache` or a stock one)."""
    total = 0
    for layer in cache.layers:
        if isinstance(layer, DuoLayer):
            total += layer.kv_bytes()
        else:
            total += _nbytes(getattr(layer, "keys", None), getattr(layer, "values", None))
    return total


class DuoLayer(CacheLayerMixin):
    """One layer's cache with per-head roles.

    Args:
        roles: the layer's head roles and streaming window.
        max_cache_len: if given, the retrieval cache is preallocated to this many tokens (decoding then writes in
            place and allocates nothing); otherwise it grows by concatenation and holds exactly ``T`` tokens.
    """

    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(self, roles: LayerRoles, max_cache_len: int | None = None):
        super().__init__()
        self.roles = roles
        self.max_cache_len = max_cache_len
        self.seen = 0
        self.full_keys: torch.Tensor | None = None
        self.full_values: torch.Tensor | None = None
        self.stream_keys: torch.Tensor | None = None
        self.stream_values: torch.Tensor | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device, self.dtype = key_states.device, key_states.dtype
        self.is_initialized = True

    # ------------------------------------------------------------------------------------------------ update
    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[DuoStates, DuoStates]:
        """Store a chunk ``[B, Hkv, C, D]`` at positions ``seen..seen+C-1``; return what attention needs."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        r = self.roles
        t0, t1 = self.seen, self.seen + key_states.shape[-2]
        full_k = full_v = sink_k = sink_v = run_k = run_v = None
        run_start = 0
        if r.num_retrieval:
            full_k, full_v = self._append_full(
                _take_heads(key_states, r.kv_retrieval, r.all_retrieval),
                _take_heads(value_states, r.kv_retrieval, r.all_retrieval),
                t0,
                t1,
            )
        if r.num_streaming:
            k = _take_heads(key_states, r.kv_streaming, r.all_streaming)
            v = _take_heads(value_states, r.kv_streaming, r.all_streaming)
            sink_k, sink_v, run_k, run_v, run_start = self._update_streaming(k, v, t0, t1)
        self.seen = t1
        return DuoStates(full_k, sink_k, run_k, run_start), DuoStates(full_v, sink_v, run_v, run_start)

    def _append_full(
        self, k: torch.Tensor, v: torch.Tensor, t0: int, t1: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.max_cache_len is None:
            if self.full_keys is None:
                self.full_keys, self.full_values = k.contiguous(), v.contiguous()
            else:
                self.full_keys = torch.cat([self.full_keys, k], dim=-2)
                self.full_values = torch.cat([self.full_values, v], dim=-2)
            return self.full_keys, self.full_values
        if t1 > self.max_cache_len:
            raise ValueError(f"the cache was preallocated for max_cache_len={self.max_cache_len} tokens; got {t1}")
        if self.full_keys is None:
            shape = (k.shape[0], k.shape[1], self.max_cache_len, k.shape[3])
            self.full_keys = torch.empty(shape, dtype=k.dtype, device=k.device)
            self.full_values = torch.empty(shape, dtype=v.dtype, device=v.device)
        self.full_keys[:, :, t0:t1].copy_(k)
        self.full_values[:, :, t0:t1].copy_(v)
        return self.full_keys[:, :, :t1], self.full_values[:, :, :t1]

    def _update_streaming(self, k: torch.Tensor, v: torch.Tensor, t0: int, t1: int):
        sink, recent = self.roles.sink, self.roles.recent
        self._grow_streaming(k, min(t1, sink + recent))
        if t1 - t0 == 1:
            # Decoding: after the write the buffer holds exactly the keys this query sees.
            self._write(k, v, t0, t1)
            n = min(t1, sink + recent)
            return self.stream_keys[:, :, :n], self.stream_values[:, :, :n], None, None, 0
        # A chunk: its queries need the recent past in position order, followed by the chunk itself.
        old_k, old_v, run_start = self._ring_in_order(t0)
        run_k = torch.cat([old_k, k], dim=-2)
        run_v = torch.cat([old_v, v], dim=-2)
        self._write(k, v, t0, t1)
        n_sink = min(t1, sink)
        return self.stream_keys[:, :, :n_sink], self.stream_values[:, :, :n_sink], run_k, run_v, run_start

    def _grow_streaming(self, like: torch.Tensor, capacity: int) -> None:
        """Make room for ``capacity`` slots (only while the buffer is still filling: slot = position)."""
        old = self.stream_keys
        if old is not None and old.shape[-2] >= capacity:
            return
        shape = (like.shape[0], like.shape[1], capacity, like.shape[3])
        new_k = torch.empty(shape, dtype=like.dtype, device=like.device)
        new_v = torch.empty(shape, dtype=like.dtype, device=like.device)
        if old is not None:
            new_k[:, :, : old.shape[-2]].copy_(old)
            new_v[:, :, : old.shape[-2]].copy_(self.stream_values)
        self.stream_keys, self.stream_values = new_k, new_v

    def _ring_in_order(self, t0: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        """The stored positions ``[max(sink, t0 - recent), t0)`` in order, and the first of them."""
        sink, recent = self.roles.sink, self.roles.recent
        keys, values = self.stream_keys, self.stream_values
        if t0 <= sink:
            return keys[:, :, :0], values[:, :, :0], t0
        start = max(sink, t0 - recent)
        if t0 <= sink + recent:  # not wrapped yet: slot = position
            return keys[:, :, start:t0], values[:, :, start:t0], start
        split = sink + (t0 - sink) % recent  # slot of the oldest kept position
        order_k = torch.cat([keys[:, :, split:], keys[:, :, sink:split]], dim=-2)
        order_v = torch.cat([values[:, :, split:], values[:, :, sink:split]], dim=-2)
        return order_k, order_v, start

    def _write(self, k: torch.Tensor, v: torch.Tensor, t0: int, t1: int) -> None:
        """Store the chunk's positions that are kept: those below ``sink`` and the last ``recent`` overall."""
        sink, recent = self.roles.sink, self.roles.recent
        if t0 < sink:
            n = min(t1, sink) - t0
            self.stream_keys[:, :, t0 : t0 + n].copy_(k[:, :, :n])
            self.stream_values[:, :, t0 : t0 + n].copy_(v[:, :, :n])
        first = max(sink, t1 - recent, t0)
        if first >= t1:
            return
        k, v = k[:, :, first - t0 :], v[:, :, first - t0 :]
        slot = sink + (first - sink) % recent
        n1 = min(t1 - first, sink + recent - slot)  # the part before the ring wraps
        self.stream_keys[:, :, slot : slot + n1].copy_(k[:, :, :n1])
        self.stream_values[:, :, slot : slot + n1].copy_(v[:, :, :n1])
        if n1 < t1 - first:
            n2 = t1 - first - n1
            self.stream_keys[:, :, sink : sink + n2].copy_(k[:, :, n1:])
            self.stream_values[:, :, sink : sink + n2].copy_(v[:, :, n1:])

    # ------------------------------------------------------------------------------------ cache protocol
    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen + query_length, 0

    def get_max_length(self) -> int:
        return -1 if self.max_cache_len is None else self.max_cache_len

    def kv_bytes(self) -> int:
        """Bytes of key and value storage this layer holds (preallocated capacity included)."""
        return _nbytes(self.full_keys, self.full_values, self.stream_keys, self.stream_values)

    def _map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        for name in ("full_keys", "full_values", "stream_keys", "stream_values"):
            tensor = getattr(self, name)
            if tensor is not None:
                setattr(self, name, fn(tensor))

    def reset(self) -> None:
        self.full_keys = self.full_values = self.stream_keys = self.stream_values = None
        self.seen = 0
        self.is_initialized = False

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map(lambda t: t[indices])

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
    """A cache with a :class:`DuoLayer` for every DuoAttention layer.

    Args:
        layer_roles: one entry per decoder layer; None keeps transformers' default cache layer for that layer (for
            example the local sliding-window layers of Gemma).
        config: the model config, used to build the default layers (sliding windows included).
        max_cache_len: preallocate retrieval caches to this many tokens (see :class:`DuoLayer`).
        layer_factory: builds each DuoAttention layer as ``layer_factory(roles, max_cache_len=...)``; default
            :class:`DuoLayer` (``duoattn.quant.cache.QuantizedDuoLayer`` stores retrieval heads quantised).
    """

    def __init__(
        self,
        layer_roles: Sequence[LayerRoles | None],
        config: PretrainedConfig | None = None,
        max_cache_len: int | None = None,
        layer_factory: Callable[..., DuoLayer] | None = None,
    ):
        if config is not None:
            layers = list(DynamicCache(config=config).layers)
            if len(layers) != len(layer_roles):
                raise ValueError(f"config has {len(layers)} layers, layer_roles has {len(layer_roles)}")
        else:
            layers = [DynamicLayer() for _ in layer_roles]
        make = layer_factory or DuoLayer
        for idx, roles in enumerate(layer_roles):
            if roles is not None:
                layers[idx] = make(roles, max_cache_len=max_cache_len)
        super().__init__(layers=layers)

    def kv_bytes(self) -> int:
        """Bytes of key and value storage the cache holds, over all layers."""
        return cache_kv_bytes(self)
