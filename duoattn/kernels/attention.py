"""Attention kernels built on PyTorch SDPA; they run on any device and support autograd.

Positions are absolute token indices. Query heads map to KV heads in groups (GQA) through SDPA's ``enable_gqa``,
so keys and values are never repeated in memory.

* :func:`causal_attention` - retrieval heads: the queries are the last ``C`` of ``T`` keys.
* :func:`streaming_attention` - streaming heads, token-exact sink + recent window, computed block by block so
  that no ``T x T`` mask is ever built: each block of queries attends only to the sink keys and the
  ``block + recent - 1`` keys that can fall inside its windows.
* :func:`dense_attention` - every key visible to every query (one decoding query over a streaming cache).

Every kernel takes an optional ``softcap`` (Gemma 2): scores become ``softcap * tanh(scores / softcap)`` before
the softmax. SDPA cannot do that, so soft-capped calls take a math path (:func:`softcapped_attention`) over the
same blocks; calls without ``softcap`` never leave SDPA.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

# Soft-capped causal attention materialises scores for one block of queries at a time; a block holds at most this
# many (query, key) pairs per head.
SOFTCAP_SCORES_PER_BLOCK = 1 << 22


def softcapped_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, softcap: float, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Math attention with soft-capped scores.

    Args:
        q: ``[..., Hq, C, D]``; k, v: ``[..., Hkv, T, D]`` with ``Hq`` a multiple of ``Hkv`` (query head ``h`` uses
            KV head ``h // (Hq / Hkv)``).
        mask: bool, True = visible, broadcastable to ``[..., Hq, C, T]`` with a head dimension of size 1.
    Returns:
        ``[..., Hq, C, D]``.
    """
    *lead, hq, c, d = q.shape
    hkv = k.shape[-3]
    # Group the query heads by KV head so that keys broadcast instead of being repeated.
    qg = q.reshape(*lead, hkv, hq // hkv, c, d)
    scores = (qg @ k.unsqueeze(-3).transpose(-1, -2)) * scale
    scores = torch.tanh(scores / softcap) * softcap
    if mask is not None:
        scores = scores.masked_fill(~mask.unsqueeze(-3), float("-inf"))
    # The softmax runs in at least float32 (as the models' eager paths do), in float64 for float64 inputs.
    probs = torch.softmax(scores, dim=-1, dtype=torch.promote_types(scores.dtype, torch.float32)).to(v.dtype)
    return (probs @ v.unsqueeze(-3)).reshape(*lead, hq, c, d)


def dense_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, softcap: float | None = None
) -> torch.Tensor:
    """``q [B, Hq, C, D]`` attends to every key of ``k, v [B, Hkv, T, D]``."""
    if softcap is not None:
        return softcapped_attention(q, k, v, scale, softcap)
    return F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=True)


def _causal_softcapped(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, softcap: float) -> torch.Tensor:
    """Soft-capped causal attention, one block of queries at a time: never a ``C x T`` score matrix at once."""
    c, t = q.shape[-2], k.shape[-2]
    offset = t - c  # absolute position of the first query
    block = max(1, min(c, SOFTCAP_SCORES_PER_BLOCK // t))
    out = torch.empty_like(q)
    for start in range(0, c, block):
        end = min(c, start + block)
        n_keys = offset + end  # keys past the block's last query are never visible
        q_pos = torch.arange(offset + start, offset + end, device=q.device)
        mask = torch.arange(n_keys, device=q.device)[None, :] <= q_pos[:, None]
        out[..., start:end, :] = softcapped_attention(
            q[..., start:end, :], k[..., :n_keys, :], v[..., :n_keys, :], scale, softcap, mask
        )
    return out


def causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, softcap: float | None = None
) -> torch.Tensor:
    """Causal attention where the ``C`` queries ``[B, Hq, C, D]`` sit at the last ``C`` of ``T`` key positions."""
    c, t = q.shape[-2], k.shape[-2]
    if c == 1:
        return dense_attention(q, k, v, scale, softcap)
    if softcap is not None:
        return _causal_softcapped(q, k, v, scale, softcap)
    if c == t:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
    # Lower-right aligned causal mask; flash / memory-efficient kernels take it without materialising it.
    return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(c, t), scale=scale, enable_gqa=True)


def default_block(recent: int) -> int:
    """Query block size for :func:`streaming_attention`: about one window, within [64, 1024]."""
    return max(64, min(1024, recent))


def _window_mask(
    num_blocks: int,
    block: int,
    window: int,
    num_sink: int,
    run_start: int,
    run_len: int,
    first_query: int,
    pad_left: int,
    recent: int,
    device: torch.device,
) -> torch.Tensor:
    """Bool ``[num_blocks, 1, block, num_sink + window]`` visibility for :func:`streaming_attention`."""
    last = run_start + run_len - 1
    q_abs = (run_start + first_query + torch.arange(num_blocks * block, device=device)).clamp(max=last)
    q_abs = q_abs.view(num_blocks, block, 1)
    slot = torch.arange(num_blocks, device=device)[:, None] * block + torch.arange(window, device=device)[None, :]
    k_abs = (run_start + slot - pad_left)[:, None, :]  # [nb, 1, W]
    real = ((slot >= pad_left) & (slot < pad_left + run_len))[:, None, :]
    # Run keys at positions < num_sink are already among the sink keys: count them once.
    win = real & (k_abs <= q_abs) & (q_abs - k_abs < recent) & (k_abs >= num_sink)
    sink = torch.arange(num_sink, device=device).view(1, 1, -1) <= q_abs
    return torch.cat([sink, win], dim=-1).unsqueeze(1)


def streaming_attention(
    q: torch.Tensor,
    k_sink: torch.Tensor,
    v_sink: torch.Tensor,
    k_run: torch.Tensor,
    v_run: torch.Tensor,
    run_start: int,
    recent: int,
    scale: float,
    block: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Token-exact sink + recent attention.

    Args:
        q: ``[B, Hq, C, D]`` queries at the last ``C`` positions of the run.
        k_sink, v_sink: ``[B, Hkv, S, D]`` the keys at positions ``0..S-1`` (``S <= sink``; may be empty).
        k_run, v_run: ``[B, Hkv, R, D]`` keys at consecutive positions ``run_start..run_start+R-1``; ``R >= C``.
            The run must cover every window position: ``run_start <= max(S, first query - recent + 1)``.
            Run keys at positions below ``S`` are ignored (they are the sink keys).
        recent: the window: query ``i`` sees run key ``j`` iff ``j <= i`` and ``i - j < recent``; it sees sink key
            ``s`` iff ``s <= i``.
        softcap: if set, scores are soft-capped (math path, same blocks).
    Returns:
        ``[B, Hq, C, D]``.
    """
    bsz, hq, c, d = q.shape
    num_sink, run_len = k_sink.shape[-2], k_run.shape[-2]
    if run_len < c:
        raise ValueError(f"the run ({run_len} keys) must contain the {c} query positions")
    # Drop run keys that no query can see.
    first_query = run_len - c
    lo = max(0, first_query - (recent - 1))
    k_run, v_run = k_run[..., lo:, :], v_run[..., lo:, :]
    run_start, run_len, first_query = run_start + lo, run_len - lo, first_query - lo

    block = min(block or default_block(recent), c)
    num_blocks = math.ceil(c / block)
    window = block + recent - 1
    pad_left, pad_right = recent - 1 - first_query, num_blocks * block - c

    def windows(run: torch.Tensor, sink: torch.Tensor) -> torch.Tensor:
        # [B, Hkv, R, D] -> [B, nb, Hkv, S + W, D]: the sink keys followed by each block's window.
        x = F.pad(run, (0, 0, pad_left, pad_right)).unfold(2, window, block)  # [B, Hkv, nb, D, W]
        x = x.permute(0, 2, 1, 4, 3)
        if num_sink == 0:
            return x
        return torch.cat([sink.unsqueeze(1).expand(-1, num_blocks, -1, -1, -1), x], dim=3)

    keys, values = windows(k_run, k_sink), windows(v_run, v_sink)
    queries = F.pad(q, (0, 0, 0, pad_right)).view(bsz, hq, num_blocks, block, d).transpose(1, 2)
    mask = _window_mask(num_blocks, block, window, num_sink, run_start, run_len, first_query, pad_left, recent, q.device)
    if softcap is None:
        out = F.scaled_dot_product_attention(queries, keys, values, attn_mask=mask, scale=scale, enable_gqa=True)
    else:
        out = softcapped_attention(queries, keys, values, scale, softcap, mask)
    return out.transpose(1, 2).reshape(bsz, hq, num_blocks * block, d)[:, :, :c]
