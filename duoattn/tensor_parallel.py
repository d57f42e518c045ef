"""Tensor parallelism: which of a layer's attention heads this process holds.

A model loaded with ``from_pretrained(..., tp_plan="auto")`` under ``torchrun`` has its attention weights sharded
by transformers (Llama's plan: ``q_proj`` / ``k_proj`` / ``v_proj`` column-wise, ``o_proj`` row-wise): rank ``r``
of ``N`` holds KV heads ``r * H / N .. (r + 1) * H / N - 1`` of every layer, with their query heads, as DTensor
shards; its attention module computes only those heads and the row-wise ``o_proj`` sums the ranks' outputs.
DuoAttention then runs per rank: the pattern's roles are sliced to the rank's heads, the rank's heads are reordered
retrieval-first within its own shard, and each rank's :class:`~duoattn.cache.DuoCache` holds its own heads only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .models import attention_modules


@dataclass(frozen=True)
class HeadShard:
    """Rank ``rank`` of ``size`` holds a contiguous ``1 / size`` of every layer's KV heads (and their queries)."""

    rank: int
    size: int

    def kv_heads(self, num_kv_heads: int) -> slice:
        """The KV heads of this rank, of a layer's ``num_kv_heads``."""
        if num_kv_heads % self.size:
            raise ValueError(f"{num_kv_heads} KV heads cannot be split over {self.size} tensor-parallel ranks")
        per = num_kv_heads // self.size
        return slice(self.rank * per, (self.rank + 1) * per)


def local(param: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor parameter (the same storage); any other tensor as it is."""
    to_local = getattr(param, "to_local", None)
    return to_local() if callable(to_local) else param


def _shard_of(weight: torch.Tensor, dim: int) -> tuple[int, int] | None:
    """``(rank, size)`` of a DTensor sharded along ``dim`` over one mesh dimension; None if not sharded."""
    mesh, placements = getattr(weight, "device_mesh", None), getattr(weight, "placements", None)
    if mesh is None or placements is None:
        return None
    for mesh_dim, placement in enumerate(placements):
        if getattr(placement, "dim", None) == dim and placement.is_shard():
            return mesh.get_local_rank(mesh_dim), mesh.size(mesh_dim)
    return None


def head_shard(model: nn.Module) -> HeadShard | None:
    """The heads this process holds of a tensor-parallel model; None for a model that is not sharded.

    Raises a clear error for a sharding DuoAttention cannot follow (a fused ``qkv_proj``, projections sharded
    other than by heads, or layers sharded differently)."""
    size = getattr(model, "tp_size", None)
    if not size or size == 1:
        return None
    shards = set()
    for module in attention_modules(model):
        if not all(isinstance(getattr(module, n, None), nn.Module) for n in ("q_proj", "k_proj", "v_proj", "o_proj")):
            raise ValueError(f"tensor-parallel DuoAttention needs separate q_proj / k_proj / v_proj / o_proj, "
                             f"{type(module).__name__} has none")
        found = {name: _shard_of(getattr(module, name).weight, dim)
                 for name, dim in (("q_proj", 0), ("k_proj", 0), ("v_proj", 0), ("o_proj", 1))}
        if len(set(found.values())) != 1 or None in found.values():
            raise ValueError(f"tensor-parallel DuoAttention needs q / k / v sharded by output rows and o by input "
                             f"columns over the same ranks; {type(module).__name__} has {found}")
        shards.add(next(iter(found.values())))
    if len(shards) != 1:
        raise ValueError(f"attention layers are sharded over different ranks: {sorted(shards)}")
    rank, ranks = shards.pop()
    if ranks != size:
        raise ValueError(f"the model says tp_size={size}, its attention weights are sharded over {ranks} ranks")
    return HeadShard(rank, ranks)
