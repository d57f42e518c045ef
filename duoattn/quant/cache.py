"""A :class:`~duoattn.cache.DuoLayer` whose retrieval heads keep their keys and values quantised.

Every incoming key and value of a retrieval head is quantised before anyone attends to it (the current chunk's
included), so what attention sees does not depend on how the prompt was chunked. The streaming heads' ring
(``sink + recent`` tokens) stays in the model dtype: it is small and constant-size.

``update`` returns :class:`~duoattn.quant.kv.QuantizedKV` in ``DuoStates.full``; the attention function reads it
tile by tile (``duoattn.kernels.tiled``) and never materialises the dequantised cache.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..cache import DuoLayer, _nbytes
from ..roles import LayerRoles
from .kv import KVQuantConfig, QuantizedKV, quantize


class QuantizedDuoLayer(DuoLayer):
    """A DuoLayer with int8 / int4 retrieval-head storage.

    Args:
        roles, max_cache_len: as for :class:`~duoattn.cache.DuoLayer`.
        kv_quant: bits and group size of the retrieval heads' keys and values.
    """

    def __init__(self, roles: LayerRoles, max_cache_len: int | None = None, *, kv_quant: KVQuantConfig):
        super().__init__(roles, max_cache_len=max_cache_len)
        self.kv_quant = kv_quant
        self.full_keys: QuantizedKV | None = None
        self.full_values: QuantizedKV | None = None

    def _append_full(
        self, k: torch.Tensor, v: torch.Tensor, t0: int, t1: int
    ) -> tuple[QuantizedKV, QuantizedKV]:
        qk, qv = quantize(k, self.kv_quant), quantize(v, self.kv_quant)
        if self.max_cache_len is None:
            if self.full_keys is None:
                self.full_keys, self.full_values = qk, qv
            else:
                self.full_keys = QuantizedKV.cat(self.full_keys, qk)
                self.full_values = QuantizedKV.cat(self.full_values, qv)
            return self.full_keys, self.full_values
        if t1 > self.max_cache_len:
            raise ValueError(f"the cache was preallocated for max_cache_len={self.max_cache_len} tokens; got {t1}")
        if self.full_keys is None:
            lead = (k.shape[0], k.shape[1])
            make = QuantizedKV.empty
            self.full_keys = make(lead, self.max_cache_len, k.shape[-1], self.kv_quant, k.dtype, k.device)
            self.full_values = make(lead, self.max_cache_len, v.shape[-1], self.kv_quant, v.dtype, v.device)
        self.full_keys.write(t0, qk)
        self.full_values.write(t0, qv)
        return self.full_keys.tokens(0, t1), self.full_values.tokens(0, t1)

    def kv_bytes(self) -> int:
        """Bytes held: packed codes + scales + zero points of the retrieval heads, plus the streaming ring."""
        full = sum(x.nbytes() for x in (self.full_keys, self.full_values) if x is not None)
        return full + _nbytes(self.stream_keys, self.stream_values)

    def _map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        for name in ("full_keys", "full_values"):
            stored = getattr(self, name)
            if stored is not None:
                setattr(self, name, stored.map(fn))
        for name in ("stream_keys", "stream_values"):
            tensor = getattr(self, name)
            if tensor is not None:
                setattr(self, name, fn(tensor))
