"""The oracle: dense, per-head masked attention over the whole sequence. Slow, obviously correct, for tests only.

DuoAttention's rule for a streaming head (token-exact): the query at absolute position ``i`` sees the key at
absolute position ``j`` if and only if ``j <= i`` and (``j < sink`` or ``i - j < recent``). A retrieval head sees
every ``j <= i``. A query head takes the role of its KV head (query head ``h`` uses KV head ``h // group``).
A sliding-window layer of window ``W`` is the same rule with every head streaming, ``sink = 0`` and ``recent = W``.
Prefill modes (:mod:`duoattn.prefill`): a query whose position lies in ``dense_queries = (lo, hi)`` (the prompt's
last ``N`` positions for ``"window:N"``, the whole prompt for ``"full"``) sees every ``j <= i`` on every head.
"""

from __future__ import annotations

import torch


def visibility(q_pos: torch.Tensor, k_pos: torch.Tensor, sink: int, recent: int, streaming: bool,
               dense_queries: tuple[int, int] | None = None) -> torch.Tensor:
    """Bool ``[len(q_pos), len(k_pos)]``: True where the query may attend to the key."""
    i, j = q_pos[:, None], k_pos[None, :]
    causal = j <= i
    if not streaming:
        return causal
    window = causal & ((j < sink) | (i - j < recent))
    if dense_queries is None:
        return window
    lo, hi = dense_queries
    return torch.where((i >= lo) & (i < hi), causal, window)


def reference_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    retrieval: torch.Tensor,
    sink: int,
    recent: int,
    q_pos: torch.Tensor | None = None,
    scale: float | None = None,
    softcap: float | None = None,
    dense_queries: tuple[int, int] | None = None,
) -> torch.Tensor:
    """DuoAttention computed densely in float64.

    Args:
        q: ``[B, Hq, C, D]`` queries at absolute positions ``q_pos`` (default: the last C positions of the keys).
        k, v: ``[B, Hkv, T, D]`` keys and values at absolute positions ``0..T-1``.
        retrieval: bool ``[Hkv]``, True for retrieval (full) heads.
        softcap: if set, scores become ``softcap * tanh(scores / softcap)`` before masking and softmax.
        dense_queries: ``(lo, hi)``: queries at positions ``lo <= i < hi`` attend fully on streaming heads too.
    Returns:
        ``[B, Hq, C, D]`` in the dtype of ``q``.
    """
    b, hq, c, d = q.shape
    hkv, t = k.shape[1], k.shape[2]
    group = hq // hkv
    if q_pos is None:
        q_pos = torch.arange(t - c, t)
    k_pos = torch.arange(t)
    scale = d**-0.5 if scale is None else scale
    out = torch.empty(b, hq, c, d, dtype=torch.float64)
    for h in range(hq):
        kv = h // group
        mask = visibility(q_pos.cpu(), k_pos, sink, recent, not bool(retrieval[kv]), dense_queries)
        scores = q[:, h].double() @ k[:, kv].double().transpose(-1, -2) * scale
        if softcap is not None:
            scores = softcap * torch.tanh(scores / softcap)
        scores = scores.masked_fill(~mask.to(scores.device), float("-inf"))
        out[:, h] = (scores.softmax(-1) @ v[:, kv].double()).cpu()
    return out.to(q.dtype).to(q.device)
