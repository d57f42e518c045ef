"""Running a model with the fast engine: chunked prefill, and decode steps replayed from one CUDA graph.

The decode step is the model's own ``forward`` (transformers' modeling code, the static cache, the registered
attention function). Everything it does per token is device work driven by the cache's device clock, so it is
captured once into a CUDA graph and replayed; only the input token is copied in before each replay.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from ..patch import cache_kwarg
from .cache import StaticDuoCache


def _forward(model: nn.Module, ids: torch.Tensor, cache: StaticDuoCache) -> torch.Tensor:
    """Logits of the last position ``[B, vocab]``; only that position goes through the LM head."""
    out = model(input_ids=ids, use_cache=True, logits_to_keep=1, **{cache_kwarg(model): cache})
    return out.logits[:, -1]


@torch.no_grad()
def prefill(
    model: nn.Module, cache: StaticDuoCache, input_ids: torch.Tensor, chunk_size: int, progress: bool = False
) -> torch.Tensor:
    """Feed ``input_ids [B, T]`` in chunks of ``chunk_size`` tokens; return the last position's logits ``[B, V]``.

    Streaming-head memory stays constant: the ring plus one chunk of scratch, whatever ``T``.
    """
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 2:
        raise ValueError(f"chunk_size must be an integer >= 2 (single tokens are decode steps), got {chunk_size!r}")
    total = input_ids.shape[1]
    if total < 1:
        raise ValueError("input_ids is empty")
    stored, capacity = cache.length(), cache.state.max_len
    if stored + total > capacity:
        raise ValueError(f"the cache holds max_len={capacity} tokens; {stored} stored + {total} new would not fit")
    starts = range(0, total, chunk_size)
    logits = None
    for start in tqdm(starts, desc="prefill", unit="chunk", disable=not progress):
        # A last chunk of one token goes through the decode path, which handles any position.
        logits = _forward(model, input_ids[:, start : start + chunk_size], cache)
    return logits


class DecodeRunner:
    """Greedy-friendly decode steps over a :class:`StaticDuoCache`, from a CUDA graph when on a GPU.

    Args:
        model: a model with the fast engine enabled.
        cache: the cache to decode into; its current length is where decoding starts.
        graph: capture a CUDA graph (default: when the model is on a CUDA device).
        warmup: eager steps before capturing (they compile kernels; the cache clock is restored after each).
    """

    def __init__(self, model: nn.Module, cache: StaticDuoCache, graph: bool | None = None, warmup: int = 2):
        self.model, self.cache = model, cache
        state = cache.state
        self.device = state.device
        self.graph_enabled = self.device.type == "cuda" if graph is None else graph
        if self.graph_enabled and self.device.type != "cuda":
            raise ValueError("CUDA graphs need the model and cache on a CUDA device")
        self.ids = torch.zeros(state.batch_size, 1, dtype=torch.long, device=self.device)
        self.position = cache.length()  # host-side count, kept in step with the clock to refuse overflow
        self.logits: torch.Tensor | None = None
        self.graph: torch.cuda.CUDAGraph | None = None
        if self.graph_enabled:
            self._capture(warmup)

    @torch.no_grad()
    def _capture(self, warmup: int) -> None:
        clock = self.cache.clock
        saved = clock.clone()
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(max(1, warmup)):
                _forward(self.model, self.ids, self.cache)
                clock.copy_(saved)  # warm-up steps all write the same position: no kept token is overwritten
        torch.cuda.current_stream(self.device).wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = _forward(self.model, self.ids, self.cache)
        clock.copy_(saved)

    @torch.no_grad()
    def step(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Append ``token_ids [B]`` (or ``[B, 1]``) and return the next-token logits ``[B, V]``.

        With a graph the result is a static buffer overwritten by the next step: clone it to keep it.
        """
        if self.position >= self.cache.state.max_len:
            raise ValueError(f"the cache is full (max_len={self.cache.state.max_len} tokens)")
        self.ids.copy_(token_ids.view(self.ids.shape))
        if self.graph is not None:
            self.graph.replay()
        else:
            self.logits = _forward(self.model, self.ids, self.cache)
        self.position += 1
        return self.logits

    def replay(self) -> None:
        """One decode step on whatever token is in the input buffer (for timing)."""
        if self.position >= self.cache.state.max_len:
            raise ValueError(f"the cache is full (max_len={self.cache.state.max_len} tokens)")
        if self.graph is not None:
            self.graph.replay()
        else:
            self.logits = _forward(self.model, self.ids, self.cache)
        self.position += 1

    @torch.no_grad()
    def greedy(self, first: torch.Tensor, steps: int) -> torch.Tensor:
        """Decode ``steps`` tokens greedily starting from ``first [B]``; returns ``[B, steps]`` (``first`` excluded)."""
        out: list[Any] = []
        token = first
        for _ in range(steps):
            token = self.step(token).argmax(-1)
            out.append(token.clone())
        return torch.stack(out, dim=1)
