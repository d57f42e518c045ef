"""Causal attention over a quantised KV cache, one tile of keys at a time.

Only one tile of keys and values is ever dequantised (into the float32 work dtype, float64 for float64 inputs);
tiles are merged with an online softmax (running max, running sum, running weighted values), so memory stays
``O(tile)`` however long the cache is. This is the CPU / any-device path; on CUDA the Triton decode kernel in
``duoattn.kernels.triton_quant`` does the same in registers.

Query head ``h`` reads KV head ``h // group`` (GQA): the ``group`` query heads of one KV head are folded into the
query-row axis so that each dequantised tile serves all of them.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

from ..quant.kv import QuantizedKV, dequantize, work_dtype

DEFAULT_TILE = 512


@functools.cache
def _triton_decode() -> Callable | None:
    try:
        from .triton_quant import quantized_decode_attention
    except ImportError:  # no triton: the tiled path serves every device
        return None
    return quantized_decode_attention


def quantized_attention(
    q: torch.Tensor, k: QuantizedKV, v: QuantizedKV, scale: float, softcap: float | None = None
) -> torch.Tensor:
    """Causal attention over a quantised cache: the Triton split-KV kernel for one decoding query on CUDA (head_dim
    a power of two >= 32, no soft-capping), :func:`quantized_causal_attention` otherwise."""
    d = q.shape[-1]
    if q.is_cuda and q.shape[-2] == 1 and softcap is None and d >= 32 and not d & (d - 1):
        kernel = _triton_decode()
        if kernel is not None:
            return kernel(q, k, v, scale)
    return quantized_causal_attention(q, k, v, scale, softcap=softcap)


def quantized_causal_attention(
    q: torch.Tensor,
    k: QuantizedKV,
    v: QuantizedKV,
    scale: float,
    tile: int = DEFAULT_TILE,
    softcap: float | None = None,
) -> torch.Tensor:
    """Causal attention where the ``C`` queries ``[B, Hq, C, D]`` sit at the last ``C`` of the ``T`` cached
    positions (lower-right causal rule: query ``i`` sees keys ``0..T-C+i``).

    Args:
        k, v: quantised ``[B, Hkv, T, ...]`` (see :class:`~duoattn.quant.kv.QuantizedKV`).
        tile: keys dequantised at once.
        softcap: if set, scores become ``softcap * tanh(scores / softcap)`` (Gemma 2).
    Returns:
        ``[B, Hq, C, D]`` in the dtype of ``q``.
    """
    bsz, hq, c, d = q.shape
    hkv, t = k.data.shape[1], k.num_tokens
    if hq % hkv:
        raise ValueError(f"{hq} query heads cannot share {hkv} KV heads evenly")
    if c > t:
        raise ValueError(f"{c} queries but only {t} cached positions")
    group = hq // hkv
    work = work_dtype(k.scale.dtype)
    rows = q.to(work).reshape(bsz, hkv, group * c, d) * scale  # [B, Hkv, G*C, D]
    q_pos = torch.arange(t - c, t, device=q.device).repeat(group)  # row r = head j * C + query i
    first_query = t - c

    row_max = torch.full((bsz, hkv, group * c, 1), float("-inf"), dtype=work, device=q.device)
    row_sum = torch.zeros((bsz, hkv, group * c, 1), dtype=work, device=q.device)
    acc = torch.zeros((bsz, hkv, group * c, d), dtype=work, device=q.device)
    for start in range(0, t, tile):
        stop = min(start + tile, t)
        keys = dequantize(k.tokens(start, stop), work)  # [B, Hkv, n, D]
        scores = rows @ keys.transpose(-1, -2)  # [B, Hkv, G*C, n]
        if softcap is not None:
            scores = torch.tanh(scores / softcap) * softcap
        if stop - 1 > first_query:  # some key of this tile lies after some query
            k_pos = torch.arange(start, stop, device=q.device)
            scores.masked_fill_(k_pos[None, :] > q_pos[:, None], float("-inf"))
        # The first tile holds key 0, which every query sees, so row_max is finite from then on.
        new_max = torch.maximum(row_max, scores.amax(dim=-1, keepdim=True))
        probs = torch.exp(scores - new_max)
        correction = torch.exp(row_max - new_max)
        row_sum = row_sum * correction + probs.sum(dim=-1, keepdim=True)
        acc = acc * correction + probs @ dequantize(v.tokens(start, stop), work)
        row_max = new_max
    out = acc / row_sum
    return out.reshape(bsz, hq, c, d).to(q.dtype)
