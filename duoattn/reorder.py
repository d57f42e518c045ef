"""Reversible head reordering: make each layer's retrieval KV heads (and their query heads) a contiguous prefix.

For every attention layer with KV-head permutation ``perm`` (new head ``i`` is old head ``perm[i]``, retrieval heads
first, each group in its original order), the rows of ``q_proj`` (per query head), ``k_proj`` and ``v_proj`` (per
KV head) and their biases, and the columns of ``o_proj`` are permuted. A fused ``qkv_proj`` is permuted block by
block; 8-bit linear layers (:class:`duoattn.quant.weights.Int8Linear`) permute their per-row scales with the rows. Attention is computed head by head and ``o_proj`` undoes the order, so the model computes the same function;
applying the inverse permutation restores every weight bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .models import attention_modules, text_config
from .models import head_dim as model_head_dim
from .tensor_parallel import local


@dataclass(frozen=True)
class HeadOrder:
    """Per layer, the KV-head permutation and how many retrieval heads lead.

    Attributes:
        perms: long CPU tensors ``[num_kv_heads]``: new head ``i`` is old head ``perms[layer][i]``.
        num_retrieval: retrieval heads per layer (the first ones after reordering).
    """

    perms: tuple[torch.Tensor, ...]
    num_retrieval: tuple[int, ...]

    @classmethod
    def retrieval_first(cls, roles: np.ndarray) -> HeadOrder:
        """Stable partition of bool ``roles [layers, kv_heads]`` (True = retrieval): retrieval heads first."""
        roles = np.asarray(roles, dtype=bool)
        if roles.ndim != 2:
            raise ValueError(f"roles must be a bool array [layers, kv_heads], got shape {roles.shape}")
        perms = tuple(torch.from_numpy(np.argsort(~row, kind="stable")).long() for row in roles)
        return cls(perms, tuple(int(row.sum()) for row in roles))

    def inverse(self) -> HeadOrder:
        return HeadOrder(tuple(torch.argsort(p) for p in self.perms), self.num_retrieval)

    @property
    def roles(self) -> np.ndarray:
        """Bool ``[layers, kv_heads]`` after reordering: each row is ``n_ret`` Trues then Falses."""
        h = len(self.perms[0])
        return np.array([[i < n for i in range(h)] for n in self.num_retrieval], dtype=bool)


def _rows(perm: torch.Tensor, width: int) -> torch.Tensor:
    """Row indices of the blocks of ``width`` rows, in the order ``perm``."""
    return (perm[:, None] * width + torch.arange(width)).flatten()


def _permute_(param: nn.Parameter | None, index: torch.Tensor, dim: int) -> None:
    if param is None:
        return
    with torch.no_grad():
        param = local(param)  # tensor parallel: this rank's shard holds (and permutes) its own heads only
        param.copy_(param.index_select(dim, index.to(param.device)))  # same storage: ties and hooks stay valid


def _is_linear(module: nn.Module | None) -> bool:
    """An ``nn.Linear`` or a layer that stores its weight as ``[out, in]`` rows the same way (Int8Linear)."""
    if isinstance(module, nn.Linear):
        return True
    weight = getattr(module, "weight", None)
    return isinstance(weight, torch.Tensor) and weight.dim() == 2 and hasattr(module, "out_features")


def _permute_rows(linear: nn.Module, rows: torch.Tensor) -> None:
    _permute_(linear.weight, rows, 0)
    _permute_(getattr(linear, "bias", None), rows, 0)
    scale = getattr(linear, "scale", None)  # Int8Linear: one scale per output row
    if isinstance(scale, torch.Tensor) and scale.dim() == 1:
        _permute_(scale, rows, 0)


def _permute_module(module: nn.Module, perm: torch.Tensor, groups: int, head_dim: int) -> None:
    q_rows = _rows(perm, groups * head_dim)  # a KV head's query group moves with it
    kv_rows = _rows(perm, head_dim)
    if all(_is_linear(getattr(module, n, None)) for n in ("q_proj", "k_proj", "v_proj", "o_proj")):
        for name, rows in (("q_proj", q_rows), ("k_proj", kv_rows), ("v_proj", kv_rows)):
            _permute_rows(getattr(module, name), rows)
    elif _is_linear(getattr(module, "qkv_proj", None)) and _is_linear(getattr(module, "o_proj", None)):
        hq = len(q_rows)
        hkv = len(kv_rows)
        rows = torch.cat([q_rows, hq + kv_rows, hq + hkv + kv_rows])
        if module.qkv_proj.out_features != hq + 2 * hkv:
            raise ValueError(
                f"{type(module).__name__}.qkv_proj has {module.qkv_proj.out_features} outputs; expected "
                f"q + k + v = {hq + 2 * hkv}"
            )
        _permute_rows(module.qkv_proj, rows)
    else:
        raise ValueError(
            f"cannot reorder heads of {type(module).__name__}: expected linear q_proj, k_proj, v_proj (or a fused "
            "qkv_proj) and o_proj"
        )
    _permute_(module.o_proj.weight, q_rows, 1)


def permute_heads(model: nn.Module, order: HeadOrder, shards: int = 1) -> None:
    """Apply ``order`` to the model's attention weights in place (use ``order.inverse()`` to undo); layers whose
    order is the identity are not touched. ``shards > 1``: a tensor-parallel model whose ranks each hold
    ``1 / shards`` of the heads; ``order`` permutes this rank's heads, in its own shard of the weights."""
    cfg = text_config(model)
    modules = attention_modules(model)
    if len(order.perms) != len(modules):
        raise ValueError(f"head order has {len(order.perms)} layers, the model {len(modules)}")
    groups = cfg.num_attention_heads // cfg.num_key_value_heads
    head_dim = model_head_dim(cfg)
    num_heads = cfg.num_key_value_heads // shards
    for idx, perm in enumerate(order.perms):
        if len(perm) != num_heads:
            raise ValueError(f"layer {idx}: permutation of {len(perm)} heads, the model has {num_heads}"
                             + (f" per rank ({shards} ranks)" if shards > 1 else ""))
        if not torch.equal(torch.sort(perm).values, torch.arange(len(perm))):
            raise ValueError(f"layer {idx}: {perm.tolist()} is not a permutation")
    done: list[tuple[nn.Module, torch.Tensor]] = []
    try:
        for module, perm in zip(modules, order.perms):
            if not torch.equal(perm, torch.arange(len(perm))):
                _permute_module(module, perm, groups, head_dim)
                done.append((module, perm))
    except BaseException:
        for module, perm in done:  # all or nothing: undo the layers already permuted
            _permute_module(module, torch.argsort(perm), groups, head_dim)
        raise
