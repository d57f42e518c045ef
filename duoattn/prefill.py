"""Prefill modes: how streaming heads attend while the prompt is prefilled. Decoding is the same in every mode.

* ``"streaming"`` (the paper's deployment, the default): streaming heads follow the sink + recent rule for every
  query, prompt included. Lowest peak memory, fastest prefill.
* ``"full"``: every prompt query attends to every earlier prompt token on every head. Streaming heads keep their
  keys and values in a temporary full-length buffer on the device while the prompt is prefilled; once the last
  prompt chunk is through, the buffer is freed and only the sink + recent ring remains.
* ``"window:N"``: the last ``N`` prompt queries (the question, usually) attend fully on every head; earlier ones
  stream. Streaming heads copy each chunk's keys and values to host memory (pinned, asynchronously, on CUDA) and a
  layer brings them back only for the chunk that holds window queries, one layer at a time, then drops them: the
  device holds at most one layer's full-length streaming keys at once.

The rule, once (the oracle's :func:`duoattn.kernels.reference.reference_attention` follows it): for a prompt of
``T`` tokens, a query at position ``i`` in ``[dense_from(T), T)`` sees every ``j <= i`` on every head; every other
query (earlier prompt queries, decoded tokens) follows the streaming rule of :mod:`duoattn.layout`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

PREFILL_KINDS = ("streaming", "full", "window")
PREFILL_HELP = "streaming (default), full, or window:N (the last N prompt tokens attend fully on every head)"


@dataclass(frozen=True)
class PrefillMode:
    """A parsed prefill mode; build it with :meth:`parse`. ``window`` is N for ``"window:N"``, else 0."""

    kind: str = "streaming"
    window: int = 0

    def __post_init__(self) -> None:
        if self.kind not in PREFILL_KINDS:
            raise ValueError(f"prefill kind must be one of {PREFILL_KINDS}, got {self.kind!r}")
        if (self.kind == "window") != (self.window > 0):
            raise ValueError(f"prefill {self.kind!r} with window {self.window}: only 'window' takes N >= 1")

    @classmethod
    def parse(cls, value: str | PrefillMode | None) -> PrefillMode:
        """``"streaming"``, ``"full"`` or ``"window:N"`` (N >= 1 tokens); None means ``"streaming"``."""
        if value is None:
            return cls()
        if isinstance(value, PrefillMode):
            return value
        if not isinstance(value, str):
            raise TypeError(f"prefill must be a string ({PREFILL_HELP}), got {type(value).__name__}")
        text = value.strip().lower()
        if text in ("streaming", "full"):
            return cls(text)
        head, sep, tail = text.partition(":")
        if head == "window" and sep and tail.isdigit() and int(tail) >= 1:
            return cls("window", int(tail))
        raise ValueError(f"prefill must be {PREFILL_HELP}; got {value!r}")

    @property
    def name(self) -> str:
        return f"window:{self.window}" if self.kind == "window" else self.kind

    @property
    def streams(self) -> bool:
        """True for the default mode: no query attends fully on streaming heads."""
        return self.kind == "streaming"

    def dense_from(self, prompt_length: int) -> int:
        """Offset in a prompt of ``prompt_length`` tokens of the first query that attends fully on every head
        (``prompt_length``: none does)."""
        if self.kind == "streaming":
            return prompt_length
        if self.kind == "full":
            return 0
        return max(0, prompt_length - self.window)


class PromptHistory:
    """One layer's streaming-head keys and values of the prompt so far, kept while the prompt is prefilled so that
    its dense queries see them. Dropped (:meth:`free`) after the prompt's last chunk.

    On the device (``"full"``: every chunk reads the whole history) it is one ``[B, n_str, T, D]`` buffer per
    tensor, written in place. On the host (``"window:N"``) it is a list of per-chunk copies ``[B, n_str, C, D]``,
    pinned and written asynchronously on ``copy_stream`` (CUDA), brought back into device room shared by all
    layers for a chunk with dense queries.
    """

    def __init__(self, on_host: bool, prompt_end: int, copy_stream: torch.cuda.Stream | None = None):
        self.on_host, self.prompt_end, self.copy_stream = on_host, prompt_end, copy_stream
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None
        self.chunks: list[tuple[int, torch.Tensor, torch.Tensor]] = []  # (start, k, v) on the host

    def chunk(self, start: int, k: torch.Tensor, v: torch.Tensor, keep: bool, dense: bool,
              room: Callable[[int], tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Take the chunk ``k, v [B, n_str, C, D]`` at positions ``start..end-1``.

        ``keep``: a later chunk's dense queries will need it. ``dense``: some of its own queries attend fully; then
        return the keys and values ``[B, n_str, end, D]`` of positions ``0..end-1`` (history, then the chunk), built
        for host history in ``room(end)``, device room for one layer.
        """
        end = start + k.shape[2]
        if not self.on_host:  # the history is the dense queries' keys: write in place, read a prefix
            if keep or (dense and start > 0):  # a single-pass prompt reads the chunk itself
                self._write(start, k, v)
            if not dense:
                return None
            return (k, v) if start == 0 else (self.k[:, :, :end], self.v[:, :, :end])
        out = None
        if dense:
            out = (k, v) if start == 0 else self._gather(start, k, v, room(end))
        if keep:
            self._offload(start, k, v)
        return out

    def _write(self, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        if self.k is None:
            shape = (*k.shape[:2], self.prompt_end, k.shape[-1])
            self.k = torch.empty(shape, dtype=k.dtype, device=k.device)
            self.v = torch.empty(shape, dtype=v.dtype, device=v.device)
        self.k[:, :, start : start + k.shape[2]].copy_(k)
        self.v[:, :, start : start + v.shape[2]].copy_(v)

    def _offload(self, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        if self.copy_stream is None:  # CPU: the host is the device; a copy, since the chunk's tensors are reused
            self.chunks.append((start, k.clone(), v.clone()))
            return
        # Device -> pinned host on a side stream, so the copy overlaps the next layers' compute.
        hk = torch.empty(k.shape, dtype=k.dtype, pin_memory=True)
        hv = torch.empty(v.shape, dtype=v.dtype, pin_memory=True)
        self.copy_stream.wait_stream(torch.cuda.current_stream(k.device))
        with torch.cuda.stream(self.copy_stream):
            hk.copy_(k, non_blocking=True)
            hv.copy_(v, non_blocking=True)
        k.record_stream(self.copy_stream)  # the allocator must not reuse k / v before the copy is done
        v.record_stream(self.copy_stream)
        self.chunks.append((start, hk, hv))

    def _gather(self, start: int, k: torch.Tensor, v: torch.Tensor, room: tuple[torch.Tensor, torch.Tensor]
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Host history of positions ``0..start-1`` and the chunk, in ``room`` (device) -> views of it."""
        end = start + k.shape[2]
        bk, bv = room[0][:, :, :end], room[1][:, :, :end]
        if self.copy_stream is not None:
            torch.cuda.current_stream(k.device).wait_stream(self.copy_stream)
        covered = 0
        for pos, hk, hv in self.chunks:
            if pos != covered or pos >= start:
                break
            n = min(hk.shape[2], start - pos)
            bk[:, :, pos : pos + n].copy_(hk[:, :, :n], non_blocking=True)
            bv[:, :, pos : pos + n].copy_(hv[:, :, :n], non_blocking=True)
            covered = pos + n
        if covered != start:
            raise RuntimeError(f"the prompt history holds positions 0..{covered - 1}, but the chunk starts at {start}")
        bk[:, :, start:end].copy_(k)
        bv[:, :, start:end].copy_(v)
        return bk, bv

    def free(self) -> None:
        self.k = self.v = None
        self.chunks = []
