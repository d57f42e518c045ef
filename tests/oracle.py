"""An oracle for DuoAttention that shares no code with ``duoattn``.

Roles are an explicit boolean table ``[layers, kv_heads]`` (True: retrieval). The oracle runs the *unpatched* model
with an attention function of its own, registered under its own name, that applies one dense float64 mask per
query head: query ``i`` sees key ``j`` iff ``j <= i`` and (its KV head is retrieval, or ``j < sink``, or
``i - j < recent``). Local sliding-window layers (Gemma, Qwen with ``use_sliding_window``) are left to their window
``i - j < W``. Positions are cache indices, so the same function serves a forward without cache and ``generate``
with transformers' own ``DynamicCache`` (beam search included: transformers reorders that cache itself).

:func:`binarize` derives a role table from gates by the rule documented in ``HeadPattern.binarize``, written here
from the documentation in a few lines of plain Python.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from transformers import AttentionInterface, PretrainedConfig, PreTrainedModel
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "duo_oracle"


def binarize(
    gates: Sequence[Sequence[float]] | np.ndarray,
    sparsity: float | None = None,
    threshold: float | None = None,
    layers: Sequence[bool] | None = None,
) -> np.ndarray:
    """Roles from gates, as documented: gates are clipped to [0, 1]; ``sparsity=s`` makes the ``round(s * n)``
    (half up) lowest-gate heads of the selected layers streaming, ties going to the earlier (layer, head) first;
    otherwise heads with gate < ``threshold`` (default 0.5) stream. Rows of unselected layers are all retrieval."""
    rows = [[min(max(float(g), 0.0), 1.0) for g in row] for row in np.atleast_2d(np.asarray(gates, dtype=float))]
    selected = [True] * len(rows) if layers is None else [bool(x) for x in layers]
    roles = np.ones((len(rows), len(rows[0])), dtype=bool)
    heads = [(rows[l][h], l, h) for l in range(len(rows)) if selected[l] for h in range(len(rows[0]))]
    if sparsity is None:
        t = 0.5 if threshold is None else threshold
        for g, l, h in heads:
            roles[l, h] = g >= t
        return roles
    k = math.floor(sparsity * len(heads) + 0.5)
    for _, l, h in sorted(heads)[:k]:  # tuples sort by gate, then layer, then head
        roles[l, h] = False
    return roles


def local_windows(config: PretrainedConfig) -> list[int | None]:
    """Per layer, the window of a local sliding-window layer, else None. As documented, a window at least as long as
    the model's context never binds, so such layers count as global."""
    n, window = config.num_hidden_layers, getattr(config, "sliding_window", None)
    kinds = getattr(config, "layer_types", None) or ["sliding_attention" if window else "full_attention"] * n
    context = getattr(config, "max_position_embeddings", None)
    binds = window is not None and (context is None or window < context)
    return [window if kind == "sliding_attention" and binds else None for kind in kinds[:n]]


@dataclass(frozen=True)
class Spec:
    """What the oracle applies to one model: roles ``[layers, kv_heads]``, the streaming window, and optionally
    a codec that the retrieval heads' keys and values go through (a quantised cache: quantise, then dequantise)."""

    roles: np.ndarray
    sink: int
    recent: int
    windows: tuple[int | None, ...]
    codec: Callable[[torch.Tensor], torch.Tensor] | None = None


_SPECS: dict[int, Spec] = {}  # id(text config) -> spec, while the oracle runs on that model


def head_mask(retrieval: bool, sink: int, recent: int, window: int | None, q_pos: torch.Tensor, k_pos: torch.Tensor):
    """Bool ``[C, T]``: which keys one query head sees."""
    i, j = q_pos[:, None], k_pos[None, :]
    causal = j <= i
    if window is not None:
        return causal & (i - j < window)
    if retrieval:
        return causal
    return causal & ((j < sink) | (i - j < recent))


def oracle_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    softcap: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """``query [B, Hq, C, D]``, ``key / value [B, Hkv, T, D]`` (the last C keys are the queries' own) ->
    ``[B, C, Hq, D]``, computed densely in float64."""
    spec = _SPECS[id(module.config)]
    layer = module.layer_idx
    b, hq, c, d = query.shape
    hkv, t = key.shape[1], key.shape[2]
    groups = hq // hkv
    q_pos = torch.arange(t - c, t, device=query.device)
    k_pos = torch.arange(t, device=query.device)
    masks = torch.stack([
        head_mask(bool(spec.roles[layer, h // groups]), spec.sink, spec.recent, spec.windows[layer], q_pos, k_pos)
        for h in range(hq)
    ])[None]  # [1, Hq, C, T]; query head h reads KV head h // groups
    if attention_mask is not None:  # padding, from transformers' own mask function
        masks = masks & attention_mask.to(torch.bool)
    if spec.codec is not None and spec.windows[layer] is None:
        keep = torch.as_tensor(spec.roles[layer], device=key.device)[None, :, None, None]
        key = torch.where(keep, spec.codec(key).to(key.dtype), key)
        value = torch.where(keep, spec.codec(value).to(value.dtype), value)
    q, k, v = (x.to(torch.float64) for x in (query, key, value))
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = q @ k.transpose(-1, -2) * (d**-0.5 if scaling is None else scaling)
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~masks, -math.inf)
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # a fully padded query row sees nothing
    return (probs @ v).to(query.dtype).transpose(1, 2).contiguous(), None


def _text_config(model: PreTrainedModel) -> PretrainedConfig:
    return model.config.get_text_config()


@contextlib.contextmanager
def oracle(model: PreTrainedModel, roles: np.ndarray, sink: int, recent: int,
           codec: Callable[[torch.Tensor], torch.Tensor] | None = None) -> Iterator[None]:
    """Run ``model`` (not patched by duoattn) under the oracle inside the block."""
    cfg = _text_config(model)
    roles = np.asarray(roles, dtype=bool)
    assert roles.shape == (cfg.num_hidden_layers, cfg.num_key_value_heads), roles.shape
    AttentionInterface.register(NAME, oracle_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    previous = cfg._attn_implementation
    _SPECS[id(cfg)] = Spec(roles, sink, recent, tuple(local_windows(cfg)), codec)
    model.set_attn_implementation(NAME)
    try:
        yield
    finally:
        model.set_attn_implementation(previous)
        del _SPECS[id(cfg)]


def oracle_logits(model: PreTrainedModel, roles: np.ndarray, sink: int, recent: int, ids: torch.Tensor,
                  codec: Callable[[torch.Tensor], torch.Tensor] | None = None, **kwargs: Any) -> torch.Tensor:
    """Logits of every position of ``ids`` under the oracle, in one pass without cache."""
    with oracle(model, roles, sink, recent, codec), torch.no_grad():
        return model(ids, use_cache=False, **kwargs).logits


def oracle_generate(model: PreTrainedModel, roles: np.ndarray, sink: int, recent: int, ids: torch.Tensor,
                    **kwargs: Any) -> Any:
    """``model.generate`` under the oracle, with transformers' default cache."""
    with oracle(model, roles, sink, recent), torch.no_grad():
        return model.generate(ids, **kwargs)
