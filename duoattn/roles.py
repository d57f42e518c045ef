"""Per-layer head roles after head reordering: the first ``num_retrieval`` KV heads are retrieval heads.

:mod:`duoattn.reorder` permutes each DuoAttention layer's weights so that its retrieval KV heads (and their query
heads) come first. Every split of keys, values, queries and outputs by role is then a slice: the cache, the
attention function and the kernels never gather heads or loop over them in Python.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .prefill import PrefillMode


@dataclass(frozen=True)
class LayerRoles:
    """Head roles of one attention layer (in the reordered head order).

    Attributes:
        num_retrieval: KV heads ``0..num_retrieval-1`` are retrieval heads, the rest stream.
        num_kv_heads: KV heads of the layer.
        num_groups: query heads per KV head (query head ``h`` follows KV head ``h // num_groups``).
        sink, recent: the streaming window.
        prefill: how streaming heads attend while a prompt is prefilled (:mod:`duoattn.prefill`).
    """

    num_retrieval: int
    num_kv_heads: int
    num_groups: int
    sink: int
    recent: int
    prefill: PrefillMode = field(default_factory=PrefillMode)

    def __post_init__(self) -> None:
        if not 0 <= self.num_retrieval <= self.num_kv_heads:
            raise ValueError(f"num_retrieval must be in [0, {self.num_kv_heads}], got {self.num_retrieval}")

    @property
    def num_streaming(self) -> int:
        return self.num_kv_heads - self.num_retrieval

    @property
    def q_retrieval(self) -> int:
        """Query heads ``0..q_retrieval-1`` belong to retrieval KV heads."""
        return self.num_retrieval * self.num_groups

    @property
    def all_retrieval(self) -> bool:
        return self.num_streaming == 0

    @property
    def all_streaming(self) -> bool:
        return self.num_retrieval == 0
