"""Turning DuoAttention on and off on a Hugging Face model, through transformers' own seams.

Nothing in the model's code is replaced. Enabling DuoAttention:

1. binarises the pattern and reorders each DuoAttention layer's heads retrieval-first (:mod:`duoattn.reorder`:
   the rows of q / k / v and the columns of o are permuted, so the model computes the same function);
2. attaches the layer's roles to its attention module (attribute ``duo_roles``), registers the ``"duoattn"``
   attention and mask functions (:mod:`duoattn.attention`) and switches the model to them with
   ``set_attn_implementation``;
3. makes ``model.generate`` build a :class:`~duoattn.cache.DuoCache` sized to the request (prompt +
   ``max_new_tokens``) and ``model.forward`` one sized to its input, when they would otherwise build their default
   cache; and answers generate's request for a compiled call (``get_compiled_call``) with CUDA-graph decode steps
   (:mod:`duoattn.graphs`).

Everything is undone by :func:`disable_duo_attention` (or on leaving :func:`duo_attention`, also by an exception):
the weights come back bit for bit.
"""

from __future__ import annotations

import copy
import functools
import inspect
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

from .attention import ATTN_NAME, LOCAL_ATTR, LOCAL_MASK_ATTR, ROLES_ATTR, register
from .cache import DuoCache
from .checks import check_int
from .graphs import DecodeGraphs
from .kernels.dispatch import KernelChoice
from .layout import split_kv_bytes
from .models import attention_modules, check_supported, sliding_windows, text_config
from .models import head_dim as model_head_dim
from .pattern import HeadPattern
from .prefill import PrefillMode
from .quant.kv import KV_BITS, KVQuantConfig
from .reorder import HeadOrder, permute_heads
from .roles import LayerRoles
from .tensor_parallel import HeadShard, head_shard

HANDLE_ATTR = "_duoattn_handle"
_INSTANCE_ATTRS = ("generate", "get_compiled_call")


def cache_kwarg(model: nn.Module) -> str:
    """The name under which this transformers release passes the cache to ``forward`` / ``generate``."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


@dataclass
class DuoAttentionHandle:
    """What :func:`enable_duo_attention` did to a model, and helpers to work with it.

    Attributes:
        roles: bool ``[num_layers, num_kv_heads]`` in the model's original head order, True for retrieval heads;
            rows of local layers are all True.
        order: the head permutation applied to the weights (retrieval heads first in every layer).
        layer_roles: per layer, the :class:`LayerRoles` attached to its attention module; None for a local
            sliding-window layer, which DuoAttention leaves as it was.
        sliding_windows: per layer, the window of a local layer, None for a DuoAttention layer.
        kv_quant: how retrieval heads store keys and values (None: the model dtype, ``kv_bits=16``).
        kernels: the kernels requested (``auto``: the fastest on the device).
        graphs: decode steps of ``generate`` on CUDA, replayed from CUDA graphs.
        prefill: how streaming heads attend while a prompt is prefilled (:mod:`duoattn.prefill`).
        shard: tensor parallelism: the KV heads this rank holds (:mod:`duoattn.tensor_parallel`); ``order``,
            ``layer_roles`` and the caches are this rank's, ``roles`` the whole model's.
    """

    model: PreTrainedModel
    roles: np.ndarray
    order: HeadOrder
    sink: int
    recent: int
    prefill_chunk_size: int | None
    layer_roles: list[LayerRoles | None]
    previous_attn_implementation: str
    sliding_windows: list[int | None] = field(default_factory=list)
    kv_quant: KVQuantConfig | None = None
    kernels: KernelChoice = field(default_factory=KernelChoice)
    graphs: DecodeGraphs | None = None
    prefill: PrefillMode = field(default_factory=PrefillMode)
    shard: HeadShard | None = None
    _hooks: list[Any] = field(default_factory=list)

    @property
    def rank_roles(self) -> np.ndarray:
        """Bool ``[num_layers, kv_heads of this rank]``: ``roles`` sliced to this rank's heads (all of them without
        tensor parallelism), in the model's original order."""
        return self.roles if self.shard is None else self.roles[:, self.shard.kv_heads(self.roles.shape[1])]

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

    def new_cache(self, max_len: int, batch_size: int | None = None, kernels: KernelChoice | None = None) -> DuoCache:
        """A fresh split cache for sequences of up to ``max_len`` tokens (prompt + generated).

        Storage is allocated at the first token, for the batch size it brings, or now if ``batch_size`` is given.
        """
        cfg = text_config(self.model)
        cache = DuoCache(self.layer_roles, max_len=max_len, config=cfg, kv_quant=self.kv_quant,
                         kernels=kernels or self.kernels,
                         softcap=getattr(cfg, "attn_logit_softcapping", None) is not None)
        if batch_size is not None:
            cache.preallocate(batch_size, self.model.dtype, self.model.device, model_head_dim(cfg))
        return cache

    def prompt_history_bytes(self, prompt_len: int, batch_size: int = 1, dtype: torch.dtype | None = None) -> int:
        """Device bytes a cache holds on top of :meth:`expected_kv_bytes` while a prompt of ``prompt_len`` tokens is
        prefilled, by the prefill mode (:mod:`duoattn.prefill`): 0 for ``"streaming"``; for ``"full"`` the
        streaming heads' keys and values of the whole prompt in every DuoAttention layer; for ``"window:N"`` one
        layer's worth (the room they come back into from host memory; the host copies are not counted). Freed
        after the prompt's last chunk."""
        if self.prefill.streams:
            return 0
        elem = torch.empty((), dtype=dtype or self.model.dtype).element_size()
        roles = self.rank_roles[self.duo_layers]
        n_str = (~roles).sum(axis=1)
        heads = int(n_str.sum()) if self.prefill.kind == "full" else int(n_str.max(initial=0))
        return 2 * batch_size * heads * int(prompt_len) * model_head_dim(text_config(self.model)) * elem

    def expected_kv_bytes(self, max_len: int | torch.Tensor, batch_size: int = 1,
                          dtype: torch.dtype | None = None) -> int:
        """Key + value bytes of a cache sized for ``max_len`` tokens (what ``cache.kv_bytes()`` reports); under
        tensor parallelism, this rank's cache.

        ``sum over DuoAttention layers of (n_retrieval * T * R + n_streaming * min(T, sink + recent) * S) * 2``,
        with ``S = head_dim * bytes`` one vector in the model dtype and ``R = S`` unquantised, else
        ``head_dim * bits / 8 + 2 * (head_dim / group_size) * bytes`` (codes, scales and zero points). A local layer
        of window ``W`` adds ``num_kv_heads * min(T, W - 1) * S``: what transformers' own sliding-window cache keeps.
        """
        tokens = int(max_len)
        elem = torch.empty((), dtype=dtype or self.model.dtype).element_size()
        head_dim = model_head_dim(text_config(self.model))
        full_vec = None if self.kv_quant is None else self.kv_quant.bytes_per_vector(head_dim, elem)
        roles = self.rank_roles
        duo = roles[self.duo_layers]
        n_ret = int(duo.sum())
        total = split_kv_bytes(n_ret, int(duo.size - n_ret), tokens, self.sink, self.recent, head_dim, elem, full_vec,
                               batch_size)
        local = sum(roles.shape[1] * min(tokens, w - 1) for w in self.sliding_windows if w is not None)
        return total + batch_size * 2 * local * head_dim * elem


def enable_duo_attention(
    model: PreTrainedModel,
    pattern: HeadPattern,
    sparsity: float | None = None,
    sink: int | None = None,
    recent: int | None = None,
    prefill_chunk_size: int | None = None,
    kv_bits: int = 16,
    kv_group_size: int | None = None,
    kernels: KernelChoice | None = None,
    cuda_graphs: bool = True,
    prefill: str | PrefillMode = "streaming",
    balance_ranks: int | None = None,
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
        kernels: kernel choice (default: Triton decode and FlexAttention prefill on CUDA, SDPA elsewhere).
        cuda_graphs: replay ``generate``'s decode steps from CUDA graphs where the kernels allow it.
        prefill: ``"streaming"`` (streaming heads stream during the prompt too: the paper's deployment, lowest
            memory), ``"full"`` (every prompt query attends fully on every head; the streaming heads' middle tokens
            are freed once the prompt is in) or ``"window:N"`` (the last N prompt queries attend fully on every
            head). Decoding is the same in every mode; see :mod:`duoattn.prefill`.
        balance_ranks: binarise so that, in every layer, each of this many groups of KV heads (the ranks of a
            tensor-parallel model) holds the same number of retrieval heads (:meth:`HeadPattern.binarize`).

    A tensor-parallel model (``from_pretrained(..., tp_plan="auto")`` under torchrun) is enabled on every rank with
    the same arguments: each rank reorders and caches its own heads (:mod:`duoattn.tensor_parallel`).
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
    roles = pattern.binarize(sparsity=sparsity, layers=np.array([w is None for w in windows]),
                             balance_ranks=balance_ranks)
    shard = head_shard(model)
    heads = slice(None) if shard is None else shard.kv_heads(cfg.num_key_value_heads)
    rank_roles = roles[:, heads]
    sink = check_int("sink", pattern.sink if sink is None else sink, 0)
    recent = check_int("recent", pattern.recent if recent is None else recent, 1)
    if prefill_chunk_size is not None:
        prefill_chunk_size = check_int("prefill_chunk_size", prefill_chunk_size, 1)
    if kernels is not None and not isinstance(kernels, KernelChoice):
        raise TypeError(f"kernels must be a duoattn.kernels.dispatch.KernelChoice, got {type(kernels).__name__}")
    kv_quant = _kv_quant_config(kv_bits, kv_group_size, model_head_dim(cfg))
    prefill = PrefillMode.parse(prefill)

    groups = cfg.num_attention_heads // cfg.num_key_value_heads
    layer_roles: list[LayerRoles | None] = [
        None if w is not None else LayerRoles(int(row.sum()), row.size, groups, sink, recent, prefill)
        for row, w in zip(rank_roles, windows)
    ]
    register()
    previous = cfg._attn_implementation
    handle = DuoAttentionHandle(
        model=model, roles=roles, order=HeadOrder.retrieval_first(rank_roles), sink=sink, recent=recent,
        prefill_chunk_size=prefill_chunk_size, layer_roles=layer_roles, previous_attn_implementation=previous,
        sliding_windows=windows, kv_quant=kv_quant, kernels=kernels or KernelChoice(),
        graphs=DecodeGraphs(model, cache_kwarg(model), enabled=cuda_graphs), prefill=prefill, shard=shard,
    )
    for module, lr in zip(modules, layer_roles):  # refuse what cannot run before anything is changed
        if lr is None:
            _previous_attention(module, previous)
    permute_heads(model, handle.order, 1 if shard is None else shard.size)
    setattr(model, HANDLE_ATTR, handle)
    try:
        for module, lr in zip(modules, layer_roles):
            if lr is None:
                setattr(module, LOCAL_ATTR, _previous_attention(module, previous))
            else:
                setattr(module, ROLES_ATTR, lr)
        has_local = any(lr is None for lr in layer_roles)
        setattr(cfg, LOCAL_MASK_ATTR, previous if has_local and previous in ALL_MASK_ATTENTION_FUNCTIONS else None)
        model.set_attn_implementation(ATTN_NAME)
        _install(model, handle)
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


def _request_length(args: tuple, kwargs: dict[str, Any]) -> tuple[int, int] | None:
    """``(batch, tokens)`` of the ids or embeddings a call brings, or None."""
    ids = kwargs.get("input_ids", args[0] if args and isinstance(args[0], torch.Tensor) else None)
    if ids is None:
        ids = kwargs.get("inputs_embeds")
    if not isinstance(ids, torch.Tensor) or ids.dim() < 2:
        return None
    if ids.shape[0] == 0 or ids.shape[1] == 0:
        raise ValueError(f"input_ids is empty (shape {tuple(ids.shape)}): give at least one token per sequence")
    return ids.shape[0], ids.shape[1]


def _install(model: PreTrainedModel, handle: DuoAttentionHandle) -> None:
    """``generate`` and ``forward`` get a DuoCache where they would build their default cache; ``generate``'s
    compiled call replays decode steps from CUDA graphs."""
    name = cache_kwarg(model)
    original_generate = model.generate

    @functools.wraps(original_generate)
    def generate(*args: Any, **kwargs: Any) -> Any:
        gen_config = kwargs.get("generation_config") or model.generation_config
        use_cache = kwargs.get("use_cache", gen_config.use_cache)
        request = _request_length(args, kwargs)
        if use_cache is not False and kwargs.get(name) is None and kwargs.get("past_key_values") is None:
            if request is not None:
                new = kwargs.get("max_new_tokens", gen_config.max_new_tokens)
                if new is None:
                    new = kwargs.get("max_length", gen_config.max_length) - request[1]
                kwargs[name] = handle.new_cache(max_len=request[1] + max(int(new), 1))
        cache = kwargs.get(name, kwargs.get("past_key_values"))
        continuing = isinstance(cache, DuoCache) and cache.length() > 0
        if isinstance(cache, DuoCache) and request is not None and request[1] > cache.length():
            # The ids hold the whole sequence (transformers slices off what the cache holds): the rest is the prompt,
            # however generate chunks it.
            cache.begin_prompt(request[1] - cache.length())
        # A prompt that continues a filled cache is not chunked by default: transformers releases differ in how
        # they chunk around a non-empty cache.
        if handle.prefill_chunk_size is not None and kwargs.get("prefill_chunk_size") is None and not continuing:
            if kwargs.get("generation_config") is not None:  # one source of settings, as generate asks
                if kwargs["generation_config"].prefill_chunk_size is None:
                    kwargs["generation_config"] = copy.deepcopy(kwargs["generation_config"])
                    kwargs["generation_config"].prefill_chunk_size = handle.prefill_chunk_size
            else:
                kwargs["prefill_chunk_size"] = handle.prefill_chunk_size
        return original_generate(*args, **kwargs)

    def inject_cache(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
        use_cache = kwargs.get("use_cache")
        use_cache = text_config(model).use_cache if use_cache is None else use_cache  # multimodal: in the text config
        if use_cache is not False and kwargs.get(name) is None and kwargs.get("past_key_values") is None:
            request = _request_length(args, kwargs)
            if request is not None:
                kwargs[name] = handle.new_cache(max_len=request[1])
        return args, kwargs

    def get_compiled_call(compile_config: Any = None) -> Callable:
        return handle.graphs.compiled_call

    model.generate = generate  # instance attributes: shadow the class methods until deleted
    model.get_compiled_call = get_compiled_call
    handle._hooks.append(model.register_forward_pre_hook(inject_cache, with_kwargs=True))


def disable_duo_attention(model: PreTrainedModel) -> None:
    """Undo :func:`enable_duo_attention`: the model is exactly as it was before (weights bit for bit)."""
    handle: DuoAttentionHandle | None = getattr(model, HANDLE_ATTR, None)
    if handle is None:
        raise RuntimeError("DuoAttention is not enabled on this model")
    for hook in handle._hooks:
        hook.remove()
    for attr in _INSTANCE_ATTRS:
        if attr in vars(model):
            delattr(model, attr)
    cfg = text_config(model)
    if cfg._attn_implementation != handle.previous_attn_implementation:
        model.set_attn_implementation(handle.previous_attn_implementation)
    for module in attention_modules(model):
        for attr in (ROLES_ATTR, LOCAL_ATTR):
            if attr in vars(module):
                delattr(module, attr)
    if LOCAL_MASK_ATTR in vars(cfg):
        delattr(cfg, LOCAL_MASK_ATTR)
    if handle.graphs is not None:
        handle.graphs.steps.clear()
    permute_heads(model, handle.order.inverse(), 1 if handle.shard is None else handle.shard.size)
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
    kernels: KernelChoice | None = None,
    cuda_graphs: bool = True,
    prefill: str | PrefillMode = "streaming",
    balance_ranks: int | None = None,
) -> Iterator[DuoAttentionHandle]:
    """``with duo_attention(model, pattern, sparsity=0.5): model.generate(...)`` - see :func:`enable_duo_attention`."""
    handle = enable_duo_attention(model, pattern, sparsity, sink, recent, prefill_chunk_size, kv_bits, kv_group_size,
                                  kernels, cuda_graphs, prefill, balance_ranks)
    try:
        yield handle
    finally:
        disable_duo_attention(model)
