"""Turning the fast engine on and off: reorder heads, attach contiguous roles, switch the attention function.

``with fast_duo_attention(model, pattern, sparsity=0.5) as engine:`` reorders each layer's weights so that its
retrieval heads come first (:mod:`duoattn.engine.reorder`), attaches the matching :class:`~duoattn.roles.LayerRoles`
and switches the model to the ``"duoattn_static"`` attention function. Caches come from ``engine.new_cache(...)``.
Leaving the block restores the previous attention implementation and every weight bit for bit.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
from transformers import PreTrainedModel

from ..checks import check_int
from ..kernels.dispatch import KernelChoice
from ..models import attention_modules, check_supported, sliding_windows, text_config
from ..models import head_dim as model_head_dim
from ..patch import HANDLE_ATTR, ROLES_ATTR
from ..pattern import HeadPattern
from ..roles import LayerRoles
from .attention import ATTN_NAME, register
from .cache import StaticDuoCache
from .compile import compile_norms as compile_norm_modules
from .compile import restore_norms
from .reorder import HeadOrder, permute_heads

ENGINE_ATTR = "_duoattn_engine"


@dataclass
class FastDuo:
    """What :func:`enable_fast_duo` did to a model.

    Attributes:
        roles: bool ``[layers, kv_heads]`` in the model's original head order, True for retrieval heads.
        order: the head permutation applied to the weights.
    """

    model: PreTrainedModel
    roles: np.ndarray
    order: HeadOrder
    sink: int
    recent: int
    previous_attn_implementation: str
    compiled_norms: list = field(default_factory=list)

    @property
    def retrieval_ratio(self) -> float:
        return float(self.roles.mean())

    def geometry(self) -> tuple[int, int, int]:
        """``(num_kv_heads, num_groups, head_dim)`` of the model."""
        cfg = text_config(self.model)
        return cfg.num_key_value_heads, cfg.num_attention_heads // cfg.num_key_value_heads, model_head_dim(cfg)

    def new_cache(
        self, max_len: int, batch_size: int = 1, kernels: KernelChoice | None = None, dtype: torch.dtype | None = None
    ) -> StaticDuoCache:
        """A preallocated cache for ``batch_size`` sequences of up to ``max_len`` tokens on the model's device."""
        hkv, groups, head_dim = self.geometry()
        param = next(self.model.parameters())
        return StaticDuoCache(
            self.order.num_retrieval, batch_size, max_len, hkv, groups, head_dim, self.sink, self.recent,
            dtype=dtype or param.dtype, device=param.device, kernels=kernels,
        )


def enable_fast_duo(
    model: PreTrainedModel,
    pattern: HeadPattern,
    sparsity: float | None = None,
    sink: int | None = None,
    recent: int | None = None,
    compile_norms: str | None = None,
) -> FastDuo:
    """Switch ``model`` to the fast engine in place; undo with :func:`disable_fast_duo`.

    ``pattern`` is binarised with ``sparsity`` (fraction of streaming heads) or, if None, threshold 0.5. A pattern of
    all retrieval heads gives the engine's full-attention path. ``compile_norms`` names a ``torch.compile`` backend
    for the model's RMSNorm modules (see :mod:`duoattn.engine.compile`).
    """
    if getattr(model, ENGINE_ATTR, None) is not None or getattr(model, HANDLE_ATTR, None) is not None:
        raise RuntimeError("DuoAttention is already enabled on this model; disable it first")
    if not isinstance(pattern, HeadPattern):
        raise TypeError(f"pattern must be a duoattn.HeadPattern, got {type(pattern).__name__}")
    cfg = check_supported(model)
    expected = (cfg.num_hidden_layers, cfg.num_key_value_heads)
    if pattern.shape != expected:
        raise ValueError(f"pattern shape {pattern.shape} (layers x KV heads) does not match the model's {expected}")
    local = [i for i, w in enumerate(sliding_windows(cfg)) if w is not None]
    if local or getattr(cfg, "attn_logit_softcapping", None) is not None:
        what = f"local sliding-window layers {local}" if local else "attention soft-capping"
        raise ValueError(
            f"the fast engine does not support {what} ({cfg.model_type}); use duo_attention(...), which does"
        )
    roles = pattern.binarize(sparsity=sparsity)
    sink = check_int("sink", pattern.sink if sink is None else sink, 0)
    recent = check_int("recent", pattern.recent if recent is None else recent, 1)
    order = HeadOrder.retrieval_first(roles)
    modules = attention_modules(model)
    groups = cfg.num_attention_heads // cfg.num_key_value_heads
    engine = FastDuo(model, roles, order, sink, recent, cfg._attn_implementation)
    permute_heads(model, order)
    setattr(model, ENGINE_ATTR, engine)
    try:
        for module, contiguous in zip(modules, order.roles):
            device = next(module.parameters()).device
            setattr(module, ROLES_ATTR, LayerRoles.build(torch.from_numpy(contiguous), groups, sink, recent, device))
        register()
        model.set_attn_implementation(ATTN_NAME)
        if compile_norms is not None:
            engine.compiled_norms = compile_norm_modules(model, backend=compile_norms)
    except BaseException:
        disable_fast_duo(model)
        raise
    return engine


def disable_fast_duo(model: PreTrainedModel) -> None:
    """Undo :func:`enable_fast_duo`: previous attention implementation, no roles, original weights (bit for bit)."""
    engine: FastDuo | None = getattr(model, ENGINE_ATTR, None)
    if engine is None:
        raise RuntimeError("the fast DuoAttention engine is not enabled on this model")
    restore_norms(engine.compiled_norms)
    if text_config(model)._attn_implementation != engine.previous_attn_implementation:
        model.set_attn_implementation(engine.previous_attn_implementation)
    for module in attention_modules(model):
        if hasattr(module, ROLES_ATTR):
            delattr(module, ROLES_ATTR)
    permute_heads(model, engine.order.inverse())
    delattr(model, ENGINE_ATTR)


@contextmanager
def fast_duo_attention(
    model: PreTrainedModel,
    pattern: HeadPattern,
    sparsity: float | None = None,
    sink: int | None = None,
    recent: int | None = None,
    compile_norms: str | None = None,
) -> Iterator[FastDuo]:
    """``with fast_duo_attention(model, pattern, sparsity=0.75) as engine:`` - see :func:`enable_fast_duo`."""
    engine = enable_fast_duo(model, pattern, sparsity, sink, recent, compile_norms)
    try:
        yield engine
    finally:
        disable_fast_duo(model)
