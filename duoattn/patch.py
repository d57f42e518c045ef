"""Turning DuoAttention on and off on a Hugging Face model, through transformers' own seams.

Nothing in the model's code is replaced. Enabling DuoAttention:

1. registers one attention function and one mask function under the name ``"duoattn"`` in transformers'
   ``AttentionInterface`` / ``AttentionMaskInterface`` registries and switches the model to it with
   ``set_attn_implementation`` (the previous implementation is restored on disable);
2. attaches the head roles of each layer to its attention module (attribute ``duo_roles``);
3. makes the model build a :class:`~duoattn.cache.DuoCache` when it would otherwise build its default cache:
   ``model.generate`` gets a thin per-instance wrapper and ``model.forward`` a removable pre-hook.

Everything is undone by :func:`disable_duo_attention` (or on leaving :func:`duo_attention`).
"""

from __future__ import annotations

import functools
import inspect
import sys
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import AttentionInterface, PretrainedConfig, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface, causal_mask_function
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .cache import DuoCache, DuoStates
from .checks import check_int
from .kernels.attention import causal_attention, dense_attention, streaming_attention
from .kernels.tiled import quantized_attention
from .models import attention_modules, check_supported, sliding_windows, text_config
from .models import head_dim as model_head_dim
from .pattern import HeadPattern
from .quant.cache import QuantizedDuoLayer
from .quant.kv import KV_BITS, KVQuantConfig, QuantizedKV
from .roles import LayerRoles

ATTN_NAME = "duoattn"
ROLES_ATTR = "duo_roles"
LOCAL_ATTR = "duo_local_attention"  # on local (sliding-window) layers: the attention function they had before
HANDLE_ATTR = "_duoattn_handle"

# id(decoder config) -> (weak reference to it, mask implementation of its local layers or None if it has none).
# Mask functions only receive the config, so this is how they find out what the model used before.
_LOCAL_MASKS: dict[int, tuple[weakref.ref, str | None]] = {}


# ---------------------------------------------------------------------------------------- attention function
def _attend_dense(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, roles: LayerRoles, scale: float, softcap: float | None
) -> torch.Tensor:
    """Keys are plain ``[B, Hkv, T, D]`` at positions ``0..T-1`` (no cache, or another cache class)."""
    if roles.all_retrieval:
        return causal_attention(q, k, v, scale, softcap)
    c, t = q.shape[-2], k.shape[-2]
    out = torch.empty_like(q)
    if roles.num_retrieval:
        q_r = q.index_select(1, roles.q_retrieval)
        k_r, v_r = k.index_select(1, roles.kv_retrieval), v.index_select(1, roles.kv_retrieval)
        out.index_copy_(1, roles.q_retrieval, causal_attention(q_r, k_r, v_r, scale, softcap))
    # Only the sink and the last C + recent - 1 keys can be seen by a streaming head.
    n_sink, lo = min(roles.sink, t), max(0, t - c - roles.recent + 1)
    k_s, v_s = k[:, :, lo:].index_select(1, roles.kv_streaming), v[:, :, lo:].index_select(1, roles.kv_streaming)
    sink_k = k[:, :, :n_sink].index_select(1, roles.kv_streaming)
    sink_v = v[:, :, :n_sink].index_select(1, roles.kv_streaming)
    q_s = q.index_select(1, roles.q_streaming)
    out_s = streaming_attention(q_s, sink_k, sink_v, k_s, v_s, lo, roles.recent, scale, softcap=softcap)
    out.index_copy_(1, roles.q_streaming, out_s)
    return out


def _attend_full(
    q: torch.Tensor,
    k: torch.Tensor | QuantizedKV,
    v: torch.Tensor | QuantizedKV,
    scale: float,
    softcap: float | None,
) -> torch.Tensor:
    """Retrieval heads: causal attention over the whole cache, read tile by tile when it is quantised."""
    if isinstance(k, QuantizedKV):
        return quantized_attention(q, k, v, scale, softcap)
    return causal_attention(q, k, v, scale, softcap)


def _attend_cached(
    q: torch.Tensor, k: DuoStates, v: DuoStates, roles: LayerRoles, scale: float, softcap: float | None
) -> torch.Tensor:
    """Keys come from a :class:`DuoLayer`: retrieval and streaming heads are already apart."""
    if roles.all_retrieval:
        return _attend_full(q, k.full, v.full, scale, softcap)
    q_s = q if roles.all_streaming else q.index_select(1, roles.q_streaming)
    if k.run is None:  # decoding: the streaming cache holds exactly the visible keys
        out_s = dense_attention(q_s, k.sink, v.sink, scale, softcap)
    else:
        out_s = streaming_attention(
            q_s, k.sink, v.sink, k.run, v.run, k.run_start, roles.recent, scale, softcap=softcap
        )
    if roles.all_streaming:
        return out_s
    out = torch.empty_like(q)
    out.index_copy_(1, roles.q_streaming, out_s)
    q_r = q.index_select(1, roles.q_retrieval)
    out.index_copy_(1, roles.q_retrieval, _attend_full(q_r, k.full, v.full, scale, softcap))
    return out


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
    """The registered attention function: ``query [B, Hq, C, D]`` -> output ``[B, C, Hq, D]``.

    DuoAttention layers ignore ``attention_mask`` (causality and windows come from positions) and
    ``sliding_window`` (it is None on them, or too long to bind); they honour ``scaling`` and ``softcap``.
    Local sliding-window layers go to the attention function the model used before.
    """
    roles: LayerRoles | None = getattr(module, ROLES_ATTR, None)
    if roles is None:
        previous = getattr(module, LOCAL_ATTR, sdpa_attention_forward)
        return previous(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    softcap = kwargs.get("softcap")
    if isinstance(key, DuoStates):
        out = _attend_cached(query, key, value, roles, scale, softcap)
    else:
        out = _attend_dense(query, key, value, roles, scale, softcap)
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
    mask function of the implementation the model used before. Padded batches and custom masks (bidirectional
    spans, packed sequences) are refused: DuoAttention layers attend causally by token position.
    """
    if attention_mask is not None and attention_mask.dim() == 2 and not bool(attention_mask.all()):
        raise ValueError(
            "DuoAttention does not support padded batches (attention_mask has zeros): run one sequence at a time, "
            "or batch sequences of equal length without padding"
        )
    if local_size is None:
        if mask_function is not causal_mask_function:
            raise ValueError(
                "DuoAttention layers attend causally by token position; this forward asks for a custom mask "
                "(bidirectional spans such as image tokens, or packed sequences), which they cannot honour"
            )
        return None
    previous = _local_mask_implementation(config)
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


def _local_mask_implementation(config: PretrainedConfig | None) -> str | None:
    """The mask implementation for the local layers of the model owning ``config``; None if it has no local layers.

    A config that was not registered by :func:`enable_duo_attention` gets SDPA masks.
    """
    entry = _LOCAL_MASKS.get(id(config))
    if entry is None or entry[0]() is not config:
        return "sdpa"
    return entry[1]


def _previous_attention(module: nn.Module, implementation: str) -> Callable:
    """The attention function ``module`` ran under ``implementation`` (``"eager"`` lives in its modeling file)."""
    if implementation == "eager":
        eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
        if eager is None:
            raise ValueError(f"{type(module).__name__} has no eager_attention_forward to keep its local layers on")
        return eager
    if implementation not in ALL_ATTENTION_FUNCTIONS:
        raise ValueError(f"attention implementation {implementation!r} of the local layers is not registered")
    return ALL_ATTENTION_FUNCTIONS[implementation]


def register() -> None:
    """Register the ``"duoattn"`` attention and mask functions with transformers (idempotent)."""
    AttentionInterface.register(ATTN_NAME, duo_attention_forward)
    AttentionMaskInterface.register(ATTN_NAME, duo_mask)
    assert ATTN_NAME in ALL_MASK_ATTENTION_FUNCTIONS


# -------------------------------------------------------------------------------------------- enable / disable
def cache_kwarg(model: nn.Module) -> str:
    """The name under which this transformers release passes the cache to ``forward`` / ``generate``."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


@dataclass
class DuoAttentionHandle:
    """What :func:`enable_duo_attention` did to a model, and helpers to work with it.

    Attributes:
        roles: bool ``[num_layers, num_kv_heads]``, True for retrieval heads; rows of local layers are all True.
        layer_roles: per layer, the :class:`LayerRoles` attached to its attention module; None for a local
            sliding-window layer, which DuoAttention leaves as it was.
        sliding_windows: per layer, the window of a local layer, None for a DuoAttention layer.
        kv_quant: how retrieval heads store keys and values (None: the model dtype, ``kv_bits=16``).
    """

    model: PreTrainedModel
    roles: np.ndarray
    sink: int
    recent: int
    prefill_chunk_size: int | None
    layer_roles: list[LayerRoles | None]
    previous_attn_implementation: str
    sliding_windows: list[int | None] = field(default_factory=list)
    kv_quant: KVQuantConfig | None = None
    _hooks: list[Any] = field(default_factory=list)

    @property
    def duo_layers(self) -> np.ndarray:
        """Bool ``[num_layers]``: True for the layers DuoAttention applies to."""
        return np.array([r is not None for r in self.layer_roles])

    @property
    def retrieval_ratio(self) -> float:
        """Fraction of retrieval heads among the KV heads of DuoAttention layers."""
        return float(self.roles[self.duo_layers].mean())

    @property
    def kv_bits(self) -> int:
        return 16 if self.kv_quant is None else self.kv_quant.bits

    def new_cache(self, max_cache_len: int | None = None) -> DuoCache:
        """A fresh :class:`DuoCache` for this model (``max_cache_len`` preallocates the retrieval heads)."""
        factory = None
        if self.kv_quant is not None:
            factory = functools.partial(QuantizedDuoLayer, kv_quant=self.kv_quant)
        return DuoCache(
            self.layer_roles, config=text_config(self.model), max_cache_len=max_cache_len, layer_factory=factory
        )

    def expected_kv_bytes(self, seq_len: int, batch_size: int = 1, dtype: torch.dtype | None = None) -> int:
        """``sum over layers of (n_retrieval * T * R + n_streaming * min(T, sink + recent) * S) * 2`` bytes.

        ``S = head_dim * bytes`` is one vector in the model dtype; ``R = S`` unquantised, else
        ``head_dim * bits / 8 + 2 * (head_dim / group_size) * bytes`` (codes, scales and zero points). A local
        layer of window ``W`` adds ``num_kv_heads * min(T, W - 1) * S``: what transformers' own sliding-window
        cache keeps between forward calls.
        """
        dtype = dtype or self.model.dtype
        elem = torch.empty((), dtype=dtype).element_size()
        head_dim = model_head_dim(text_config(self.model))
        stream_vec = head_dim * elem
        full_vec = stream_vec if self.kv_quant is None else self.kv_quant.bytes_per_vector(head_dim, elem)
        duo = self.roles[self.duo_layers]
        n_ret = int(duo.sum())
        n_str = int(duo.size - n_ret)
        tokens = n_str * min(seq_len, self.sink + self.recent)
        tokens += sum(self.roles.shape[1] * min(seq_len, w - 1) for w in self.sliding_windows if w is not None)
        return batch_size * (n_ret * seq_len * full_vec + tokens * stream_vec) * 2


def enable_duo_attention(
    model: PreTrainedModel,
    pattern: HeadPattern,
    sparsity: float | None = None,
    sink: int | None = None,
    recent: int | None = None,
    prefill_chunk_size: int | None = None,
    kv_bits: int = 16,
    kv_group_size: int | None = None,
) -> DuoAttentionHandle:
    """Switch ``model`` to DuoAttention in place; undo with :func:`disable_duo_attention`.

    Local sliding-window layers (Gemma 2 / 3, Qwen with ``use_sliding_window``) keep their window, their
    attention implementation and transformers' own cache layers; DuoAttention applies to the other layers.

    Args:
        pattern: gates per (layer, KV head), one row per decoder layer; binarised with ``sparsity`` (fraction of
            streaming heads) or, if None, with threshold 0.5. Rows of local layers are ignored: ``sparsity`` ranks
            the heads of DuoAttention layers only.
        sink, recent: the streaming window; default to the pattern's.
        prefill_chunk_size: if set, ``model.generate`` prefills the prompt in chunks of this many tokens.
        kv_bits: 16 keeps the retrieval heads' cache in the model dtype; 8 or 4 stores it quantised
            (``duoattn.quant``). The streaming heads' small cache always keeps the model dtype.
        kv_group_size: channels per scale / zero point of the quantised cache (default: head_dim).
    """
    if getattr(model, HANDLE_ATTR, None) is not None:
        raise RuntimeError("DuoAttention is already enabled on this model; disable it first")
    if not isinstance(pattern, HeadPattern):
        raise TypeError(f"pattern must be a duoattn.HeadPattern, got {type(pattern).__name__}")
    cfg = check_supported(model)
    modules = attention_modules(model)
    expected = (cfg.num_hidden_layers, cfg.num_key_value_heads)
    if pattern.shape != expected:
        raise ValueError(
            f"pattern shape {pattern.shape} (layers x KV heads) does not match the model's "
            f"{expected} ({cfg.model_type}, {cfg.num_hidden_layers} layers, {cfg.num_key_value_heads} KV heads)"
        )
    windows = sliding_windows(cfg)
    roles = pattern.binarize(sparsity=sparsity, layers=np.array([w is None for w in windows]))
    sink = check_int("sink", pattern.sink if sink is None else sink, 0)
    recent = check_int("recent", pattern.recent if recent is None else recent, 1)
    if prefill_chunk_size is not None:
        prefill_chunk_size = check_int("prefill_chunk_size", prefill_chunk_size, 1)
    kv_quant = _kv_quant_config(kv_bits, kv_group_size, model_head_dim(text_config(model)))

    groups = cfg.num_attention_heads // cfg.num_key_value_heads
    layer_roles: list[LayerRoles | None] = []
    for idx, (module, window) in enumerate(zip(modules, windows)):
        if window is not None:
            layer_roles.append(None)
            continue
        device = next(module.parameters()).device
        layer_roles.append(LayerRoles.build(torch.from_numpy(roles[idx]), groups, sink, recent, device))
    register()
    previous = cfg._attn_implementation
    handle = DuoAttentionHandle(
        model=model,
        roles=roles,
        sink=sink,
        recent=recent,
        prefill_chunk_size=prefill_chunk_size,
        layer_roles=layer_roles,
        previous_attn_implementation=previous,
        sliding_windows=windows,
        kv_quant=kv_quant,
    )
    setattr(model, HANDLE_ATTR, handle)
    try:
        for module, lr in zip(modules, layer_roles):
            if lr is None:
                setattr(module, LOCAL_ATTR, _previous_attention(module, previous))
            else:
                setattr(module, ROLES_ATTR, lr)
        has_local = any(lr is None for lr in layer_roles)
        local_mask = previous if has_local and previous in ALL_MASK_ATTENTION_FUNCTIONS else None
        _LOCAL_MASKS[id(cfg)] = (weakref.ref(cfg), local_mask)
        model.set_attn_implementation(ATTN_NAME)
        _install_cache_defaults(model, handle)
    except BaseException:
        disable_duo_attention(model)  # leave nothing half-applied
        raise
    return handle


def _kv_quant_config(kv_bits: Any, kv_group_size: int | None, head_dim: int) -> KVQuantConfig | None:
    if isinstance(kv_bits, bool) or kv_bits not in KV_BITS:
        raise ValueError(f"kv_bits must be one of {KV_BITS}, got {kv_bits!r}")
    if kv_bits == 16:
        if kv_group_size is not None:
            raise ValueError("kv_group_size applies to a quantised cache only (kv_bits 8 or 4)")
        return None
    config = KVQuantConfig(bits=int(kv_bits), group_size=kv_group_size)
    config.group(head_dim)  # refuse a group size that does not divide head_dim now, not at the first token
    return config


def _install_cache_defaults(model: PreTrainedModel, handle: DuoAttentionHandle) -> None:
    """Make ``generate`` and ``forward`` build a DuoCache where they would build their default cache."""
    name = cache_kwarg(model)
    original_generate = model.generate


    @functools.wraps(original_generate)
    def generate(*args: Any, **kwargs: Any) -> Any:
        gen_config = kwargs.get("generation_config") or model.generation_config
        use_cache = kwargs.get("use_cache", gen_config.use_cache)
        if use_cache is not False and kwargs.get(name) is None and kwargs.get("past_key_values") is None:
            kwargs[name] = handle.new_cache()
        if handle.prefill_chunk_size is not None:
            kwargs.setdefault("prefill_chunk_size", handle.prefill_chunk_size)
        return original_generate(*args, **kwargs)

    def inject_cache(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
        use_cache = kwargs.get("use_cache")
        use_cache = text_config(model).use_cache if use_cache is None else use_cache  # multimodal: in the text config
        if use_cache is not False and kwargs.get(name) is None and kwargs.get("past_key_values") is None:
            kwargs[name] = handle.new_cache()
        return args, kwargs

    model.generate = generate  # instance attribute: shadows the class method until deleted
    handle._hooks.append(model.register_forward_pre_hook(inject_cache, with_kwargs=True))


def disable_duo_attention(model: PreTrainedModel) -> None:
    """Undo :func:`enable_duo_attention`: the model is exactly as it was before."""
    handle: DuoAttentionHandle | None = getattr(model, HANDLE_ATTR, None)
    if handle is None:
        raise RuntimeError("DuoAttention is not enabled on this model")
    for hook in handle._hooks:
        hook.remove()
    if "generate" in vars(model):
        del model.generate
    if text_config(model)._attn_implementation != handle.previous_attn_implementation:
        model.set_attn_implementation(handle.previous_attn_implementation)
    for module in attention_modules(model):
        for attr in (ROLES_ATTR, LOCAL_ATTR):
            if attr in vars(module):
                delattr(module, attr)
    _LOCAL_MASKS.pop(id(text_config(model)), None)
    delattr(model, HANDLE_ATTR)


@contextmanager
def duo_attention(
    model: PreTrainedModel,
    pattern: HeadPattern,
    sparsity: float | None = None,
    sink: int | None = None,
    recent: int | None = None,
    prefill_chunk_size: int | None = None,
    kv_bits: int = 16,
    kv_group_size: int | None = None,
) -> Iterator[DuoAttentionHandle]:
    """``with duo_attention(model, pattern, sparsity=0.5): model.generate(...)`` - see :func:`enable_duo_attention`."""
    handle = enable_duo_attention(model, pattern, sparsity, sink, recent, prefill_chunk_size, kv_bits, kv_group_size)
    try:
        yield handle
    finally:
        disable_duo_attention(model)
