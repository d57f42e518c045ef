"""Streaming-head prefill with FlexAttention: a block-sparse sink + recent mask, so masked blocks are never computed.

The keys are the streaming scratch of :mod:`duoattn.layout` (stored sink tokens, stored recent tokens, the
chunk). For each block of 128 queries the block mask lists only the key blocks that can hold a visible key: the sink
blocks, the stored recent blocks (first ``recent`` queries only) and the chunk blocks within ``recent`` of the block's
queries. Inside those blocks ``mask_mod`` applies the token-exact rule by absolute position, read from ``kv_pos``.

The query heads of each streaming KV head are folded into the batch dimension (``[B * n_str, G, C, D]`` against
``[B * n_str, 1, L, D]``), so layers with different numbers of streaming heads differ only in batch size, which the
compiled kernel treats as dynamic instead of recompiling per layer.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.nn.attention.flex_attention import BlockMask, flex_attention

BLOCK = 128
_compiled: Any = None
_states: dict[tuple[int, int, int, str], "FlexStreaming"] = {}


def _flex() -> Any:
    """FlexAttention compiled once per process (eager FlexAttention is a slow reference implementation)."""
    global _compiled
    if _compiled is None:
        _compiled = torch.compile(flex_attention)
    return _compiled


def streaming_state(sink: int, recent: int, prefix: int, device: torch.device) -> FlexStreaming:
    """The :class:`FlexStreaming` of this window and device, one per process: every cache with the same window
    shares its ``mask_mod``, so a second cache does not recompile the kernel. (A chunk's forward pass runs all
    layers before the next chunk is planned, so sharing the position tensors is safe.)"""
    key = (sink, recent, prefix, str(device))
    if key not in _states:
        _states[key] = FlexStreaming(sink, recent, prefix, device)
    return _states[key]


class FlexStreaming:
    """The position tensors ``mask_mod`` reads, updated in place for every chunk so that the same ``mask_mod`` (and
    so the same compiled kernel) serves every chunk and layer."""

    def __init__(self, sink: int, recent: int, prefix: int, device: torch.device):
        self.sink, self.recent, self.prefix, self.device = sink, recent, prefix, device
        self.kv_pos = torch.full((prefix + BLOCK,), -1, dtype=torch.int32, device=device)
        self.q_start = torch.zeros((), dtype=torch.int32, device=device)
        self.mask_mod = self._make_mask_mod()

    def _make_mask_mod(self):
        kv_pos, q_start, sink, recent = self.kv_pos, self.q_start, self.sink, self.recent

        def mask_mod(b, h, q_idx, kv_idx):
            k = kv_pos[kv_idx]
            q = q_start + q_idx
            return (k >= 0) & (k <= q) & ((k < sink) | (q - k < recent))

        return mask_mod

    def max_blocks(self) -> int:
        """Key blocks any query block can need: the whole prefix, sink blocks of the chunk and a window."""
        return self.prefix // BLOCK + math.ceil(self.sink / BLOCK) + math.ceil((self.recent - 1) / BLOCK) + 1

    def block_mask(self, plan: Any) -> BlockMask:
        """Set the positions for ``plan``'s chunk and build its block mask (once per chunk, shared by all layers)."""
        c, p = plan.size, plan.prefix
        if self.kv_pos.numel() < p + c + BLOCK:
            self.kv_pos = torch.full((p + c + BLOCK,), -1, dtype=torch.int32, device=self.device)
            self.mask_mod = self._make_mask_mod()
        pos = self.kv_pos
        pos.fill_(-1)
        ar = lambda lo, hi: torch.arange(lo, hi, dtype=torch.int32, device=self.device)  # noqa: E731
        pos[: plan.n_sink] = ar(0, plan.n_sink)
        pos[p - plan.n_run : p] = ar(plan.run_start, plan.start)
        pos[p : p + c] = ar(plan.start, plan.end)
        self.q_start.fill_(plan.start)

        # kv_indices is a full-width table (one column per key block); only the first `counts` entries of a row count.
        nq, pb, width = math.ceil(c / BLOCK), p // BLOCK, math.ceil((p + c) / BLOCK)
        sink_blocks = list(range(math.ceil(plan.n_sink / BLOCK)))
        run_blocks = list(range((p - plan.n_run) // BLOCK, pb)) if plan.n_run else []
        chunk_sink = max(0, min(c, self.sink - plan.start))
        chunk_sink_blocks = [pb + j for j in range(math.ceil(chunk_sink / BLOCK))]
        counts = torch.zeros(nq, dtype=torch.int32)
        indices = torch.zeros(nq, width, dtype=torch.int32)
        for i in range(nq):
            blocks = set(sink_blocks) | set(chunk_sink_blocks)
            if BLOCK * i < self.recent - 1:  # only the first `recent - 1` queries can see stored recent tokens
                blocks.update(run_blocks)
            first = max(0, BLOCK * i - (self.recent - 1)) // BLOCK
            blocks.update(range(pb + first, pb + i + 1))
            row = sorted(blocks)
            counts[i] = len(row)
            indices[i, : len(row)] = torch.tensor(row, dtype=torch.int32)
        return BlockMask.from_kv_blocks(
            counts.view(1, 1, nq).to(self.device),
            indices.view(1, 1, nq, width).to(self.device),
            BLOCK_SIZE=BLOCK,
            mask_mod=self.mask_mod,
            seq_lengths=(c, p + c),
        )


def flex_streaming_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_mask: BlockMask,
    scale: float,
    compiled: bool,
) -> torch.Tensor:
    """``q [B, n_str * G, C, D]`` over the scratch ``k, v [B, n_str, L, D]`` -> ``[B, n_str * G, C, D]``."""
    bsz, hq, c, d = q.shape
    n_str, length = k.shape[1], k.shape[2]
    group = hq // n_str
    qf = q.reshape(bsz * n_str, group, c, d)
    kf, vf = k.reshape(bsz * n_str, 1, length, d), v.reshape(bsz * n_str, 1, length, d)
    if compiled:
        for t in (qf, kf, vf):
            torch._dynamo.maybe_mark_dynamic(t, 0)
        out = _flex()(qf, kf, vf, block_mask=block_mask, scale=scale, enable_gqa=True)
    else:
        out = flex_attention(qf, kf, vf, block_mask=block_mask, scale=scale, enable_gqa=True)
    return out.view(bsz, hq, c, d)
