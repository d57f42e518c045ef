"""The streaming layout rule, in one place: what a streaming head sees, where its tokens live, what the cache holds.

**Visibility.** A streaming head lets the query at absolute position ``i`` see the key at position ``j`` iff
``j <= i`` and (``j < sink`` or ``i - j < recent``); a retrieval head sees every ``j <= i`` (:func:`visible`).

**Ring slots.** A streaming head keeps ``sink + recent`` slots: position ``p < sink`` lives in slot ``p``, position
``p >= sink`` in slot ``sink + (p - sink) % recent`` (:func:`ring_slot`). While the sequence is shorter than the ring,
slot = position; once it is full, the oldest recent token is overwritten.

**Chunk plans.** The streaming heads of a chunk at positions ``start..end-1`` attend over a scratch buffer laid out as::

    index:    0 .. n_sink-1   |  (unused)  |  prefix-n_run .. prefix-1  |  prefix .. prefix+C-1
    position: 0 .. n_sink-1   |            |  run_start .. start-1      |  start .. end-1

i.e. the stored sink tokens, the stored recent tokens in position order, then the chunk. When the chunk itself
holds sink positions (``start < sink``) they are also copied to indices ``start .. min(end, sink) - 1``, so that
indices ``0 .. sink_visible - 1`` hold every sink token the chunk sees; kernels that read positions per index count
those copies once (see :mod:`duoattn.kernels.flex`). ``prefix`` is a fixed
multiple of 128 (so the chunk starts on a block boundary for block-sparse kernels) of at least ``sink + recent - 1``.
The recent part and the chunk form one consecutive run of positions, which is what
:func:`duoattn.kernels.attention.streaming_attention` expects.

**Bytes.** :func:`split_kv_bytes` is the one formula for what a split cache holds.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

BLOCK = 128


def visible(q_pos: torch.Tensor, k_pos: torch.Tensor, sink: int, recent: int, streaming: bool | torch.Tensor
            ) -> torch.Tensor:
    """Bool ``[..., len(q_pos), len(k_pos)]``: True where the query may attend to the key.

    ``streaming`` is a bool, or a bool tensor of heads ``[H]`` (the result is then ``[H, Q, K]``).
    """
    i, j = q_pos[:, None], k_pos[None, :]
    causal = j <= i
    window = causal & ((j < sink) | (i - j < recent))
    if isinstance(streaming, bool):
        return window if streaming else causal
    return torch.where(streaming.view(-1, 1, 1).to(causal.device), window, causal)


def ring_slot(pos, sink: int, recent: int):
    """The ring slot of position ``pos`` (an int or an integer tensor)."""
    if isinstance(pos, torch.Tensor):
        return torch.where(pos < sink, pos, sink + (pos - sink).remainder(recent))
    return pos if pos < sink else sink + (pos - sink) % recent


def split_kv_bytes(
    num_retrieval: int, num_streaming: int, capacity: int, sink: int, recent: int, head_dim: int,
    stream_bytes: int, full_vector_bytes: int | None = None, batch_size: int = 1,
) -> int:
    """Key + value bytes of a split cache sized for ``capacity`` tokens, summed over layers.

    ``num_retrieval`` / ``num_streaming`` count KV heads over all DuoAttention layers. Retrieval heads hold
    ``capacity`` vectors of ``full_vector_bytes`` (default: ``head_dim * stream_bytes``, the model dtype; a quantised
    cache passes its codes + scales + zero points), streaming heads ``min(capacity, sink + recent)`` vectors in the
    model dtype.
    """
    stream_vec = head_dim * stream_bytes
    full_vec = stream_vec if full_vector_bytes is None else full_vector_bytes
    ring = min(capacity, sink + recent)
    return batch_size * 2 * (num_retrieval * capacity * full_vec + num_streaming * ring * stream_vec)


def prefix_length(sink: int, recent: int) -> int:
    """Scratch slots before the chunk: room for ``sink`` + ``recent - 1`` stored tokens, rounded up to 128."""
    need = sink + recent - 1
    return max(BLOCK, -(-need // BLOCK) * BLOCK)


def _ring_spans(first: int, last: int, sink: int, recent: int) -> list[tuple[int, int, int]]:
    """Positions ``first..last-1`` (all ``>= sink``, at most ``recent`` of them) as ``(offset, slot, count)`` spans of
    consecutive ring slots: the ring wraps at most once."""
    spans, pos = [], first
    while pos < last:
        slot = ring_slot(pos, sink, recent)
        count = min(last - pos, sink + recent - slot)
        spans.append((pos - first, slot, count))
        pos += count
    return spans


@dataclass
class ChunkPlan:
    """One prefill chunk ``[start, start + size)``: what the streaming heads see and which tokens the ring keeps.

    Attributes:
        n_sink: stored sink tokens the chunk can see (positions ``0..n_sink-1``).
        run_start, n_run: stored recent tokens the chunk can see (positions ``run_start..start-1``).
        gather: ``(scratch_index, slot, count)`` copies from the ring into the scratch, before the chunk is stored.
        keep: ``(chunk_offset, slot, count)`` copies of chunk tokens into the ring, after the scratch is filled.
        dense_from: absolute position of the chunk's first query that attends fully on every head (prefill modes
            ``"full"`` / ``"window:N"``, :mod:`duoattn.prefill`); ``end`` or more: every query streams.
        record: the streaming heads' keys of this chunk must be kept for dense queries of a later chunk.
        extras: per-kernel artefacts built once per chunk and shared by every layer (for example a block mask).
    """

    start: int
    size: int
    sink: int
    recent: int
    prefix: int
    n_sink: int = 0
    run_start: int = 0
    n_run: int = 0
    gather: list[tuple[int, int, int]] = field(default_factory=list)
    keep: list[tuple[int, int, int]] = field(default_factory=list)
    dense_from: int = 1 << 62
    record: bool = False
    extras: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def build(cls, start: int, size: int, sink: int, recent: int, dense_from: int | None = None,
              record: bool = False) -> ChunkPlan:
        if start < 0 or size < 1:
            raise ValueError(f"a chunk needs start >= 0 and size >= 1, got start={start}, size={size}")
        plan = cls(start=start, size=size, sink=sink, recent=recent, prefix=prefix_length(sink, recent),
                   record=record)
        if dense_from is not None:
            plan.dense_from = dense_from
        end = start + size
        plan.n_sink = min(start, sink)
        # The first query (at `start`) sees positions > start - recent; later queries see less of the past.
        plan.run_start = max(sink, start - recent + 1) if start > sink else start
        plan.n_run = start - plan.run_start
        if plan.n_sink:
            plan.gather.append((0, 0, plan.n_sink))
        first = plan.prefix - plan.n_run
        plan.gather += [(first + off, slot, n) for off, slot, n in _ring_spans(plan.run_start, start, sink, recent)]
        # Kept: positions below `sink`, and the last `recent` positions >= sink overall.
        if start < sink:
            plan.keep.append((0, start, min(end, sink) - start))
        first_kept = max(start, sink, end - recent)
        kept = _ring_spans(first_kept, end, sink, recent)
        plan.keep += [(first_kept - start + off, slot, n) for off, slot, n in kept]
        return plan

    @property
    def end(self) -> int:
        return self.start + self.size

    @property
    def n_streamed(self) -> int:
        """Queries ``start..start+n_streamed-1`` follow the streaming rule; the rest attend fully."""
        return min(self.size, max(0, self.dense_from - self.start))

    def streamed(self) -> ChunkPlan:
        """The plan of the streamed queries alone (``self`` if every query streams): the same scratch layout up to
        index ``prefix + n_streamed``, so that the streaming kernels run on a prefix of the chunk's scratch."""
        n = self.n_streamed
        if n == self.size:
            return self
        sub = self.extras.get("streamed")
        if sub is None:
            sub = self.extras["streamed"] = ChunkPlan.build(self.start, n, self.sink, self.recent)
        return sub

    @property
    def sink_visible(self) -> int:
        """Sink tokens visible to the chunk's last query, stored or in the chunk: indices ``0..sink_visible-1``."""
        return min(self.end, self.sink)

    @property
    def scratch_length(self) -> int:
        return self.prefix + self.size
