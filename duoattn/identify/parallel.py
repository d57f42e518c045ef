"""Sequence parallelism for identification: each process holds one contiguous slice of a sample.

Rank ``r`` of ``N`` holds positions ``bounds[r]..bounds[r+1]-1`` (:meth:`SequenceShard.split`: the first
``T mod N`` ranks one position more). Both passes run the model on the rank's own positions only; the attention
function exchanges what a slice cannot compute alone:

* **teacher** (full causal attention, no autograd): every rank all-gathers the keys and values of the layer
  (:func:`gather_sequence`) and attends with its queries to positions ``0..hi-1``. The record the student reads
  (the sink keys, the keys before the student's start) is cut from the gathered keys.
* **student** (sink + recent, with autograd): rank ``r`` computes positions ``first_r = max(lo_r, start)`` on
  (:meth:`SequenceShard.first`). Its windows reach back ``recent - 1`` keys; those before ``start`` come from the
  teacher's record, those in ``start..first_r-1`` are the student keys of earlier ranks, fetched by point-to-point
  sends (:func:`halo`): from one or several ranks when the window is longer than a slice. Its backward sends the
  gradient of each fetched key back to the rank that computed it, so the gates' gradient is that of one process.

The halo's backward runs on a rank only if its student keys take part in its loss; :func:`touch` ties every
student output into the rank's loss with a zero weight, so every rank runs the backward exchange that its later
peers wait for, whether or not its slice holds loss positions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class SequenceShard:
    """Rank ``rank`` of ``size`` holds positions ``bounds[rank]..bounds[rank + 1] - 1``; ``group`` is the process
    group (None: the default one)."""

    rank: int
    size: int
    bounds: tuple[int, ...]
    group: Any = None

    @classmethod
    def split(cls, length: int, rank: int, size: int, group: Any = None) -> SequenceShard:
        """Contiguous slices of ``length`` positions, as even as possible (the first ``length % size`` one longer)."""
        if size < 1 or not 0 <= rank < size:
            raise ValueError(f"rank must be in [0, {size - 1}] of {size} processes, got {rank}")
        if length < size:
            raise ValueError(f"a sample of {length} tokens cannot be split over {size} processes: each needs one")
        base, extra = divmod(length, size)
        bounds = [0]
        for r in range(size):
            bounds.append(bounds[-1] + base + (r < extra))
        return cls(rank, size, tuple(bounds), group)

    @property
    def lo(self) -> int:
        return self.bounds[self.rank]

    @property
    def hi(self) -> int:
        return self.bounds[self.rank + 1]

    def first(self, start: int, rank: int | None = None) -> int:
        """The first position rank ``rank`` (default this one) computes in a student pass from ``start``; equal to
        its ``hi`` when it computes none."""
        r = self.rank if rank is None else rank
        return min(max(self.bounds[r], start), self.bounds[r + 1])

    def computes(self, start: int, rank: int | None = None) -> bool:
        r = self.rank if rank is None else rank
        return self.first(start, r) < self.bounds[r + 1]

    def needs_from(self, start: int, sink: int, recent: int, rank: int | None = None) -> int:
        """The first student position (``>= start``) whose key rank ``rank`` reads but does not compute: its
        window reaches ``first - recent + 1``; a sink that extends past ``start`` is read from ``start`` on."""
        r = self.rank if rank is None else rank
        first = self.first(start, r)
        if first == start or not self.computes(start, r):
            return first
        if start < min(sink, self.bounds[r + 1]):
            return start
        return max(start, first - recent + 1)

    def halo_plan(self, start: int, sink: int, recent: int) -> tuple[list[tuple[int, int, int]],
                                                                      list[tuple[int, int, int]]]:
        """``(receives, sends)`` of this rank: ``(peer, a, b)`` = the student keys at positions ``a..b-1``, from a
        lower rank (receives, in position order) or to a higher one (sends)."""
        r = self.rank
        receives, sends = [], []
        if self.computes(start):
            need, first = self.needs_from(start, sink, recent), self.first(start)
            for p in range(r):
                a, b = max(need, self.first(start, p)), min(first, self.bounds[p + 1])
                if a < b:
                    receives.append((p, a, b))
            mine = (self.first(start), self.hi)
            for q in range(r + 1, self.size):
                if not self.computes(start, q):
                    continue
                a = max(self.needs_from(start, sink, recent, q), mine[0])
                b = min(self.first(start, q), mine[1])
                if a < b:
                    sends.append((q, a, b))
        return receives, sends


def gather_sequence(x: torch.Tensor, shard: SequenceShard) -> torch.Tensor:
    """``x [..., C, D]`` at this rank's positions -> ``[..., T, D]`` at every position (no autograd).

    Slices may differ by one position; all-gather needs equal sizes, so each is padded to the longest."""
    longest = max(b - a for a, b in zip(shard.bounds, shard.bounds[1:]))
    pad = longest - x.shape[-2]
    padded = torch.nn.functional.pad(x, (0, 0, 0, pad)) if pad else x.contiguous()
    pieces = [torch.empty_like(padded) for _ in range(shard.size)]
    dist.all_gather(pieces, padded, group=shard.group)
    return torch.cat([p[..., : b - a, :] for p, a, b in zip(pieces, shard.bounds, shard.bounds[1:])], dim=-2)


def _exchange(shard: SequenceShard, outgoing: list[tuple[int, torch.Tensor]],
              incoming: list[tuple[int, torch.Tensor]]) -> None:
    """Send and receive the given tensors point to point and wait for all of them."""
    ops = [dist.P2POp(dist.isend, t, peer, shard.group) for peer, t in outgoing]
    ops += [dist.P2POp(dist.irecv, t, peer, shard.group) for peer, t in incoming]
    if ops:
        for work in dist.batch_isend_irecv(ops):
            work.wait()


class _Halo(torch.autograd.Function):
    """``x [..., C, D]`` (the student's positions ``first..hi-1``) -> ``[..., first - need + C, D]`` (positions
    ``need..hi-1``): the earlier ranks' keys in front. The backward returns their gradient to them."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, shard: SequenceShard, start: int, sink: int, recent: int) -> torch.Tensor:
        receives, sends = shard.halo_plan(start, sink, recent)
        first = shard.first(start)
        shape = list(x.shape)
        buffers = []
        for _, a, b in receives:
            shape[-2] = b - a
            buffers.append(x.new_empty(shape))
        outgoing = [(q, x[..., a - first : b - first, :].contiguous()) for q, a, b in sends]
        _exchange(shard, outgoing, [(p, buf) for (p, _, _), buf in zip(receives, buffers)])
        ctx.plan = (receives, sends, first, shard)
        return torch.cat([*buffers, x], dim=-2)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        receives, sends, first, shard = ctx.plan
        need = receives[0][1] if receives else first
        outgoing = [(p, grad[..., a - need : b - need, :].contiguous()) for p, a, b in receives]
        shape = list(grad.shape)
        incoming = []
        for q, a, b in sends:
            shape[-2] = b - a
            incoming.append((q, grad.new_empty(shape)))
        _exchange(shard, outgoing, incoming)
        own = grad[..., first - need :, :].clone()
        for (_, a, b), (_, g) in zip(sends, incoming):
            own[..., a - first : b - first, :] += g
        return own, None, None, None, None


def halo(key: torch.Tensor, value: torch.Tensor, shard: SequenceShard | None, start: int, sink: int, recent: int
         ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The student keys and values this rank reads: ``[B, H, C, D]`` at its own positions with the earlier ranks'
    in front (autograd flows back to them); returns ``(keys, values, position of the first)``. One process (no
    shard): ``key`` and ``value`` themselves, from ``start``."""
    if shard is None:
        return key, value, start
    need = shard.needs_from(start, sink, recent)
    kv = _Halo.apply(torch.stack([key, value]), shard, start, sink, recent)  # one exchange for both
    return kv[0], kv[1], need


def touch(loss: torch.Tensor, *outputs: torch.Tensor) -> torch.Tensor:
    """``loss`` plus zero times every output: the backward then reaches every halo exchange of this rank (see the
    module docstring)."""
    for out in outputs:
        loss = loss + 0.0 * out.sum()
    return loss
