"""The one place that picks the fast engine's kernels.

=================  ==========================================  =========================================
step               CUDA                                        elsewhere (and the reference)
=================  ==========================================  =========================================
append a token     Triton: one launch per layer                ``index_copy_`` at the device clock
decode attention   Triton split-KV + ring, then a merge        SDPA over the whole buffer, masked by the clock
prefill retrieval  SDPA (flash), causal aligned lower-right     the same
prefill streaming  FlexAttention, block-sparse                 SDPA block by block (``streaming_attention``)
=================  ==========================================  =========================================

Every path is graph-safe on the decode side: lengths are read from the device clock, never from the host.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from .attention import causal_attention, streaming_attention

try:  # optional: the Triton kernels need the triton package (CUDA machines have it with PyTorch)
    from . import decode_triton
except ImportError:
    decode_triton = None

DECODE_KERNELS = ("auto", "triton", "torch")
STREAMING_PREFILL_KERNELS = ("auto", "flex", "flex-eager", "blocks")
DECODE_BLOCK = 64


def triton_available() -> bool:
    return decode_triton is not None


@dataclass(frozen=True)
class KernelChoice:
    """Kernels of a static cache. ``auto`` picks Triton / compiled FlexAttention on CUDA, the SDPA paths elsewhere.

    ``flex-eager`` runs FlexAttention without compiling it (slow; for checking the block mask on the CPU).
    """

    decode: str = "auto"
    streaming_prefill: str = "auto"

    def __post_init__(self) -> None:
        if self.decode not in DECODE_KERNELS:
            raise ValueError(f"decode kernel must be one of {DECODE_KERNELS}, got {self.decode!r}")
        if self.streaming_prefill not in STREAMING_PREFILL_KERNELS:
            raise ValueError(
                f"streaming prefill kernel must be one of {STREAMING_PREFILL_KERNELS}, got {self.streaming_prefill!r}"
            )

    def resolve(self, device: torch.device, head_dim: int) -> KernelChoice:
        """Replace ``auto`` by what runs on ``device``; refuse a Triton choice that cannot run there."""
        cuda = device.type == "cuda"
        pow2 = head_dim >= 16 and head_dim & (head_dim - 1) == 0
        decode = self.decode
        if decode == "auto":
            decode = "triton" if cuda and triton_available() and pow2 else "torch"
        elif decode == "triton":
            if not triton_available():
                raise ValueError("decode kernel 'triton' needs the triton package")
            if not pow2:
                raise ValueError(f"decode kernel 'triton' needs a power-of-two head_dim >= 16, got {head_dim}")
        streaming = self.streaming_prefill
        if streaming == "auto":
            streaming = "flex" if cuda else "blocks"
        return KernelChoice(decode, streaming)


# ----------------------------------------------------------------------------------------------------- decode
def decode_splits(kernels: KernelChoice, batch: int, n_ret: int, max_len: int) -> int:
    """How many ranges the split-KV kernel cuts each retrieval head's cache into (1 for the torch path)."""
    if kernels.decode != "triton":
        return 1
    return decode_triton.default_splits(batch, n_ret, max_len, DECODE_BLOCK)


def append_token(
    kernels: KernelChoice,
    k: torch.Tensor,
    v: torch.Tensor,
    full_k: torch.Tensor | None,
    full_v: torch.Tensor | None,
    ring_k: torch.Tensor | None,
    ring_v: torch.Tensor | None,
    clock: torch.Tensor,
    sink: int,
    recent: int,
) -> None:
    """Store one token ``k, v [B, Hkv, 1, D]`` at position ``clock - 1`` (retrieval heads first, then the ring)."""
    if kernels.decode == "triton":
        decode_triton.append_token(k, v, full_k, full_v, ring_k, ring_v, clock, sink, recent)
        return
    pos = (clock - 1).view(1)
    n_ret = 0 if full_k is None else full_k.shape[1]
    if full_k is not None:
        full_k.index_copy_(2, pos, k[:, :n_ret])
        full_v.index_copy_(2, pos, v[:, :n_ret])
    if ring_k is not None:
        slot = torch.where(pos < sink, pos, sink + (pos - sink).remainder(recent))
        ring_k.index_copy_(2, slot, k[:, n_ret:])
        ring_v.index_copy_(2, slot, v[:, n_ret:])


def decode_attention(
    kernels: KernelChoice,
    q: torch.Tensor,
    full_k: torch.Tensor | None,
    full_v: torch.Tensor | None,
    ring_k: torch.Tensor | None,
    ring_v: torch.Tensor | None,
    clock: torch.Tensor,
    out: torch.Tensor,
    scale: float,
    splits: int,
    partial_out: torch.Tensor | None,
    partial_lse: torch.Tensor | None,
) -> torch.Tensor:
    """``q [B, Hq, 1, D]`` (retrieval query heads first) over the cache -> ``out [B, 1, Hq, D]``."""
    if kernels.decode == "triton":
        decode_triton.decode_attention(q, full_k, full_v, ring_k, ring_v, clock, out, partial_out, partial_lse, scale,
                                       splits, block=DECODE_BLOCK)
        return out
    n_ret = 0 if full_k is None else full_k.shape[1]
    n_str = 0 if ring_k is None else ring_k.shape[1]
    hr = q.shape[1] * n_ret // (n_ret + n_str)
    for lo, hi, k, v in ((0, hr, full_k, full_v), (hr, q.shape[1], ring_k, ring_v)):
        if k is None:
            continue
        visible = (torch.arange(k.shape[2], device=k.device) < clock).view(1, 1, 1, -1)
        o = F.scaled_dot_product_attention(q[:, lo:hi], k, v, attn_mask=visible, scale=scale, enable_gqa=True)
        out[:, 0, lo:hi] = o[:, :, 0]
    return out


# ---------------------------------------------------------------------------------------------------- prefill
def prefill_retrieval(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal attention of the chunk's ``C`` queries (the last ``C`` of the ``T`` keys) -> ``[B, Hq, C, D]``."""
    return causal_attention(q, k, v, scale)


def prefill_streaming(
    kernels: KernelChoice,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    plan: Any,
    workspace: dict[str, Any],
    scale: float,
) -> torch.Tensor:
    """Streaming heads of one chunk: ``q [B, n_str * G, C, D]`` over the scratch ``k, v [B, n_str, L, D]`` laid out by
    ``plan`` (a :class:`duoattn.engine.plan.ChunkPlan`) -> ``[B, n_str * G, C, D]``.

    ``workspace`` is per cache. If compiled FlexAttention fails, the cache falls back to the block-by-block SDPA
    kernel for good, records why in ``workspace["flex_failed"]`` and warns once.
    """
    if kernels.streaming_prefill in ("flex", "flex-eager") and not workspace.get("flex_failed"):
        try:
            return _flex_prefill(kernels, q, k, v, plan, workspace, scale)
        except Exception as err:  # noqa: BLE001 - any compile failure leaves a correct, slower path
            if kernels.streaming_prefill == "flex-eager":
                raise
            workspace["flex_failed"] = repr(err)
            warnings.warn(f"FlexAttention failed ({err!r}); streaming heads use block-by-block SDPA", stacklevel=2)
    p, c = plan.prefix, plan.size
    return streaming_attention(
        q, k[:, :, : plan.sink_visible], v[:, :, : plan.sink_visible], k[:, :, p - plan.n_run : p + c],
        v[:, :, p - plan.n_run : p + c], plan.run_start, plan.recent, scale,
    )


def _flex_prefill(kernels, q, k, v, plan, workspace, scale) -> torch.Tensor:
    from .flex import flex_streaming_attention, streaming_state

    mask = plan.extras.get("flex_mask")
    if mask is None:
        state = streaming_state(plan.sink, plan.recent, plan.prefix, q.device)
        mask = plan.extras["flex_mask"] = state.block_mask(plan)
    return flex_streaming_attention(q, k, v, mask, scale, compiled=kernels.streaming_prefill == "flex")
