"""Per-layer head roles: which KV heads (and so which query heads) are retrieval and which are streaming.

Built once when DuoAttention is enabled, so the attention function and the cache only slice or gather with
ready index tensors and never loop over heads in Python.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True, eq=False)
class LayerRoles:
    """Head roles of one attention layer.

    Attributes:
        retrieval: bool ``[num_kv_heads]`` on the CPU, True for retrieval heads.
        sink, recent: the streaming window of this layer's streaming heads.
        kv_retrieval, kv_streaming: long index tensors of KV heads, on the layer's device.
        q_retrieval, q_streaming: long index tensors of query heads (query head ``h`` follows KV head ``h // group``).
    """

    retrieval: torch.Tensor
    sink: int
    recent: int
    num_groups: int
    kv_retrieval: torch.Tensor
    kv_streaming: torch.Tensor
    q_retrieval: torch.Tensor
    q_streaming: torch.Tensor

    @classmethod
    def build(
        cls, retrieval: torch.Tensor, num_groups: int, sink: int, recent: int, device: torch.device | str
    ) -> LayerRoles:
        retrieval = torch.as_tensor(retrieval, dtype=torch.bool).cpu()
        kv_ret = torch.nonzero(retrieval).flatten()
        kv_str = torch.nonzero(~retrieval).flatten()

        def query_heads(kv: torch.Tensor) -> torch.Tensor:
            return (kv[:, None] * num_groups + torch.arange(num_groups)).flatten()

        return cls(
            retrieval=retrieval,
            sink=sink,
            recent=recent,
            num_groups=num_groups,
            kv_retrieval=kv_ret.to(device),
            kv_streaming=kv_str.to(device),
            q_retrieval=query_heads(kv_ret).to(device),
            q_streaming=query_heads(kv_str).to(device),
        )

    @property
    def num_kv_heads(self) -> int:
        return int(self.retrieval.numel())

    @property
    def num_retrieval(self) -> int:
        return int(self.retrieval.sum())

    @property
    def num_streaming(self) -> int:
        return self.num_kv_heads - self.num_retrieval

    @property
    def all_retrieval(self) -> bool:
        return self.num_streaming == 0

    @property
    def all_streaming(self) -> bool:
        return self.num_retrieval == 0
