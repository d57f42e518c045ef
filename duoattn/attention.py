"""The one DuoAttention attention function, registered with transformers as ``"duoattn"``, and its mask function.

The model's own attention module projects q / k / v, applies RoPE (and q/k norms, biases, fused projections:
whatever the architecture does) and calls ``cache.update``; a :class:`~duoattn.cache.DuoLayer` returns
:class:`~duoattn.cache.DuoStates`, and this function attends over them. Heads are reordered retrieval-first
(:mod:`duoattn.roles`), so every split by role is a slice:

* decoding (one query per sequence): split-KV attention over the retrieval cache plus attention over the ring;
* a prefill chunk: causal attention of the retrieval heads over the stored prefix, block-sparse attention of the
  streaming heads over the sink + recent scratch, except for the prompt queries that the prefill mode
  (:mod:`duoattn.prefill`) lets attend fully: causal attention over the streaming heads' prompt history;
* plain key tensors (``use_cache=False``, or a stock cache): the same rule by position.

Kernels are chosen in one place, :mod:`duoattn.kernels.dispatch`. Local sliding-window layers (no roles attached)
go to the attention function the model used before.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from transformers import AttentionInterface, PretrainedConfig
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface, causal_mask_function

from .cache import DuoStates
from .kernels import dispatch
from .roles import LayerRoles

ATTN_NAME = "duoattn"
ROLES_ATTR = "duo_roles"
LOCAL_ATTR = "duo_local_attention"  # on local (sliding-window) layers: the attention function they had before
LOCAL_MASK_ATTR = "_duoattn_local_mask"  # on the decoder config: mask implementation of its local layers, or None

CUSTOM_MASK_ERROR = (
    "DuoAttention layers attend causally by token position and cannot honour a custom attention mask (a 4-D mask, "
    "bidirectional spans such as image tokens, or packed sequences); pass a 2-D attention_mask of ones or none"
)


def _cached(query: torch.Tensor, states: DuoStates, roles: LayerRoles, scale: float,
            softcap: float | None) -> torch.Tensor:
    layer, plan = states.layer, states.plan
    s = layer.state
    if plan is None:
        # A DuoLayer (one cache) or a BatchLayer (several caches, one length each): the same rows interface.
        return dispatch.decode_rows(s.kernels, query, layer.rows, s.lengths, s.member_lengths, s.workspace, scale,
                                    layer.splits, softcap)
    hr = roles.q_retrieval
    parts = []
    if layer.n_ret:
        parts.append(dispatch.prefill_retrieval(query[:, :hr], layer.full_k, layer.full_v, plan.end, scale, softcap))
    if layer.n_str:
        def stream(q: torch.Tensor) -> torch.Tensor:  # only called when some queries stream
            sub = plan.streamed()
            k, v = layer.scratch(sub)
            return dispatch.prefill_streaming(s.kernels, q, k, v, sub, s.workspace, scale, softcap)

        dense_k, dense_v = states.dense or (None, None)
        parts.append(dispatch.split_streaming_prefill(query[:, hr:], plan.n_streamed, stream, dense_k, dense_v, scale,
                                                      softcap))
    layer.end_chunk(plan)
    out = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
    return out.transpose(1, 2)


def duo_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor | DuoStates,
    value: torch.Tensor | DuoStates,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """``query [B, Hq, C, D]`` -> output ``[B, C, Hq, D]``.

    DuoAttention layers take causality and windows from positions: they refuse any mask tensor (the mask function
    below gives them none) and ignore ``sliding_window`` (None on them); they honour ``scaling`` and ``softcap``.
    """
    roles: LayerRoles | None = getattr(module, ROLES_ATTR, None)
    if roles is None:
        previous = getattr(module, LOCAL_ATTR, sdpa_attention_forward)
        return previous(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    if attention_mask is not None:
        raise ValueError(CUSTOM_MASK_ERROR)
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    softcap = kwargs.get("softcap")
    if isinstance(key, DuoStates):
        return _cached(query, key, roles, scale, softcap), None
    # Without a DuoCache, a pass whose queries are the whole sequence is a prompt (later passes of a stock cache
    # decode, and follow the streaming rule).
    c, t = query.shape[-2], key.shape[-2]
    dense_from = roles.prefill.dense_from(t) if c == t else None
    out = dispatch.uncached_attention(query, key, value, roles.num_retrieval, roles.num_groups, roles.sink,
                                      roles.recent, scale, softcap, dense_from)
    return out.transpose(1, 2), None


def duo_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    mask_function: Callable = causal_mask_function,
    attention_mask: torch.Tensor | None = None,
    local_size: int | None = None,
    config: PretrainedConfig | None = None,
    **kwargs: Any,
) -> Any:
    """Mask function: DuoAttention layers need no mask tensor (causality and windows come from positions).

    Masks for local sliding-window layers (``local_size`` set), which DuoAttention leaves alone, are built by the
    mask function of the implementation the model used before. Padded batches are refused when a prompt arrives
    (one check per prefill, none per decoded token); custom masks are refused.
    """
    if attention_mask is not None and attention_mask.dim() == 2 and q_length > 1 and not bool(attention_mask.all()):
        raise ValueError(
            "DuoAttention does not support padded batches (attention_mask has zeros): run one sequence at a time, "
            "or batch sequences of equal length without padding"
        )
    if local_size is None:
        if mask_function is not causal_mask_function:
            raise ValueError(CUSTOM_MASK_ERROR)
        return None
    previous = getattr(config, LOCAL_MASK_ATTR, "sdpa")
    if previous is None:
        return None
    return ALL_MASK_ATTENTION_FUNCTIONS[previous](
        batch_size=batch_size,
        q_length=q_length,
        kv_length=kv_length,
        q_offset=q_offset,
        kv_offset=kv_offset,
        mask_function=mask_function,
        attention_mask=attention_mask,
        local_size=local_size,
        config=config,
        **kwargs,
    )


def register() -> None:
    """Register the ``"duoattn"`` attention and mask functions with transformers (idempotent)."""
    AttentionInterface.register(ATTN_NAME, duo_attention_forward)
    AttentionMaskInterface.register(ATTN_NAME, duo_mask)
