"""The fast engine's attention function, registered with transformers as ``"duoattn_static"``.

With a :class:`~duoattn.engine.cache.StaticDuoCache` the keys arrive as :class:`StaticStates` and the head roles are
contiguous (retrieval query heads first), so every split is a slice:

* decoding (one query per head): split-KV attention over the retrieval cache plus attention over the ring, written
  straight into one preallocated output;
* a prefill chunk: SDPA causal attention for the retrieval heads over the cache prefix, block-sparse attention for
  the streaming heads over the scratch (sink + recent + chunk).

Anything else (no cache, another cache class) goes to the core function, which gathers by role indices.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from ..kernels import dispatch
from ..patch import ROLES_ATTR, duo_attention_forward, duo_mask
from .cache import StaticStates

ATTN_NAME = "duoattn_static"


def _decode(query: torch.Tensor, states: StaticStates, scale: float) -> torch.Tensor:
    layer = states.layer
    s = layer.state
    out = s.decode_out
    if out.shape[2] != query.shape[1] or out.dtype != query.dtype:
        raise ValueError(f"query of shape {tuple(query.shape)} does not fit this cache ({tuple(out.shape)})")
    return dispatch.decode_attention(
        s.kernels, query, layer.full_k, layer.full_v, layer.ring_k, layer.ring_v, s.clock, out, scale, layer.splits,
        s.partial_out, s.partial_lse,
    )


def _prefill(query: torch.Tensor, states: StaticStates, scale: float) -> torch.Tensor:
    layer, plan = states.layer, states.plan
    s = layer.state
    bsz, hq, c, d = query.shape
    hr = layer.n_ret * s.num_groups
    out = query.new_empty(bsz, c, hq, d)
    if layer.n_ret:
        k, v = layer.full_k[:, :, : plan.end], layer.full_v[:, :, : plan.end]
        out[:, :, :hr] = dispatch.prefill_retrieval(query[:, :hr], k, v, scale).transpose(1, 2)
    if layer.n_str:
        k, v = layer.scratch(plan)
        o = dispatch.prefill_streaming(s.kernels, query[:, hr:], k, v, plan, s.kernel_workspace, scale)
        out[:, :, hr:] = o.transpose(1, 2)
    return out


def static_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor | StaticStates,
    value: torch.Tensor | StaticStates,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """``query [B, Hq, C, D]`` -> ``[B, C, Hq, D]``."""
    if not isinstance(key, StaticStates):
        return duo_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                     **kwargs)
    if getattr(module, ROLES_ATTR, None) is None:
        raise RuntimeError("the static DuoAttention cache is used on a model without the fast engine enabled")
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    if key.plan is None:
        return _decode(query, key, scale), None
    return _prefill(query, key, scale), None


def register() -> None:
    """Register ``"duoattn_static"`` with transformers (idempotent)."""
    AttentionInterface.register(ATTN_NAME, static_attention_forward)
    AttentionMaskInterface.register(ATTN_NAME, duo_mask)
