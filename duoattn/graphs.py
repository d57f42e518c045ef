"""Decode steps replayed from a CUDA graph: what ``model.generate`` runs per token under DuoAttention on a GPU.

A decode step is the model's own ``forward`` (transformers' modeling code, the split cache, the registered attention
function). Everything it does per token is device work driven by the cache's device clock, so it is captured once
per cache and replayed; only the input token is copied in before each replay. transformers' ``generate`` asks the
model for its compiled call when the cache is compileable (:meth:`DecodeGraphs.compiled_call` is installed as that
call); prefill chunks and anything a graph cannot replay run the model eagerly.

A server decodes many caches at once: :class:`BatchGraphs` keeps one static batch view per batch-size bucket and
one graph captured over it; the view is rebound in place when requests join or leave, so the graph replays for any
set of requests that fits its bucket.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch import nn

from .batch import BatchCache
from .cache import DuoCache

# Keyword arguments a captured step ignores because the cache and its clock already determine them.
_DERIVED = {"input_ids", "attention_mask", "position_ids", "cache_position", "use_cache", "return_dict",
            "logits_to_keep", "past_key_values", "cache"}


class GraphStep:
    """One captured decode step over one cache.

    It holds the cache only weakly (the graphs are kept per cache and dropped with it) and returns an output whose
    logits are a static buffer, overwritten by the next step.
    """

    def __init__(self, model: nn.Module, cache: DuoCache, cache_name: str, warmup: int = 2):
        self.model, self.cache_name = model, cache_name
        self._cache = weakref.ref(cache)
        state = cache.state
        with torch.inference_mode(False):  # the graph's input buffer outlives the call that captured it
            self.ids = torch.zeros(state.batch_size, 1, dtype=torch.long, device=state.device)
        self.graph = torch.cuda.CUDAGraph()
        self._capture(warmup)

    @property
    def cache(self) -> DuoCache:
        cache = self._cache()
        if cache is None:
            raise RuntimeError("the cache of this captured decode step is gone")
        return cache

    def _forward(self) -> Any:
        return self.model(input_ids=self.ids, use_cache=True, logits_to_keep=1, **{self.cache_name: self.cache})

    @torch.no_grad()
    def _capture(self, warmup: int) -> None:
        state = self.cache.state
        clock, length = state.clock.clone(), state.length
        stream = torch.cuda.Stream(state.device)
        stream.wait_stream(torch.cuda.current_stream(state.device))
        try:
            with torch.cuda.stream(stream):
                for _ in range(max(1, warmup)):  # compiles kernels; every warm-up step writes the same position
                    self._forward()
                    state.clock.copy_(clock)
                    state.length = length
            torch.cuda.current_stream(state.device).wait_stream(stream)
            with torch.cuda.graph(self.graph, stream=stream):
                output = self._forward()
            # Keep the static logits, not the output object: it refers to the cache.
            self.output_type = type(output)
            self.fields = {k: v for k, v in output.items() if not isinstance(v, DuoCache)}
            self.cache_fields = [k for k, v in output.items() if isinstance(v, DuoCache)]
        finally:  # the captured step ran once on the host side only: the cache is as before
            torch.cuda.current_stream(state.device).wait_stream(stream)
            state.clock.copy_(clock)
            state.length = length

    def __call__(self, input_ids: torch.Tensor) -> Any:
        """Append ``input_ids [B, 1]``; the output's logits are a static buffer, overwritten by the next step."""
        state = self.cache.state
        if state.length + 1 > state.max_len:
            raise ValueError(f"the DuoAttention cache was sized for {state.max_len} tokens and is full")
        self.ids.copy_(input_ids, non_blocking=True)
        self.graph.replay()
        state.length += 1
        return self.output_type(**self.fields, **{k: self.cache for k in self.cache_fields})


class DecodeGraphs:
    """The decode-step graphs of one model, one per cache (dropped with the cache)."""

    def __init__(self, model: nn.Module, cache_name: str, enabled: bool = True):
        self.model, self.cache_name, self.enabled = model, cache_name, enabled
        self.steps: weakref.WeakKeyDictionary[DuoCache, GraphStep] = weakref.WeakKeyDictionary()
        self.failed: str | None = None

    def replayable(self, kwargs: dict[str, Any]) -> DuoCache | None:
        """The cache if this forward call is a decode step a graph can replay, else None."""
        if not self.enabled or self.failed is not None:
            return None
        cache = kwargs.get(self.cache_name)
        ids = kwargs.get("input_ids")
        if not isinstance(cache, DuoCache) or ids is None or ids.dim() != 2 or ids.shape[1] != 1:
            return None
        if any(kwargs.get(k) for k in ("output_attentions", "output_hidden_states")) or any(
            v is not None for k, v in kwargs.items() if k not in _DERIVED and k not in ("output_attentions",
                                                                                          "output_hidden_states")
        ):
            return None
        if not cache.graph_safe or ids.shape[0] != cache.state.batch_size or cache.in_prompt:
            return None
        return cache

    def compiled_call(self, *args: Any, **kwargs: Any) -> Any:
        """A forward call: replayed from the cache's graph when it is a decode step, else run eagerly."""
        cache = self.replayable(kwargs) if not args else None
        if cache is None:
            return self.model(*args, **kwargs)
        step = self.steps.get(cache)
        if step is None:
            try:
                step = self.steps[cache] = GraphStep(self.model, cache, self.cache_name)
            except torch.cuda.OutOfMemoryError:
                raise
            except Exception as err:  # noqa: BLE001 - capture failures leave the eager path, which is correct
                self.failed = repr(err)[:300]
                return self.model(*args, **kwargs)
        return step(kwargs["input_ids"])


def bucket_rows(n: int) -> int:
    """Rows of the static batch view that decodes ``n`` rows: the next power of two, at least 2."""
    if n < 1:
        raise ValueError(f"a batch needs at least one row, got {n}")
    return max(2, 1 << (n - 1).bit_length())


class BatchGraphStep:
    """One captured ``[B, 1]`` decode step over a static batch view (:meth:`BatchCache.static`).

    Captured while every row pads (no member's storage is touched by the warm-up), then replayed for whatever
    members the view is bound to: the offset tables, lengths and inputs it reads are rebound in place.
    """

    def __init__(self, model: nn.Module, view: BatchCache, cache_name: str, warmup: int = 2):
        self.model, self.view, self.cache_name = model, view, cache_name
        s = view.state
        if s.used:
            raise ValueError("capture a batch step while the view has no members (every row pads)")
        self.aligned = view.aligned  # the kernels' vectorised-load choice is fixed in the graph
        self.graph = torch.cuda.CUDAGraph()
        stream = torch.cuda.Stream(s.device)
        stream.wait_stream(torch.cuda.current_stream(s.device))
        with torch.no_grad(), torch.cuda.stream(stream):
            for _ in range(max(1, warmup)):  # compiles kernels; padding rows only, whose lengths never move
                self._forward()
            with torch.cuda.graph(self.graph, stream=stream):
                self.logits = self._forward().logits  # [rows, 1, vocab], overwritten by every replay
        torch.cuda.current_stream(s.device).wait_stream(stream)

    def _forward(self) -> Any:
        s = self.view.state
        return self.model(input_ids=s.ids, position_ids=s.positions, use_cache=True, logits_to_keep=1,
                          **{self.cache_name: self.view})

    def fits(self) -> bool:
        """Whether the view's current tables address storage the way the captured kernels expect."""
        return self.view.aligned == self.aligned

    def __call__(self, tokens: list[int]) -> torch.Tensor:
        """One token per member row; returns the logits ``[members' rows, vocab]`` (a static buffer)."""
        self.view.step_inputs(tokens)
        self.view.state.count()
        self.graph.replay()
        return self.logits[: self.view.state.used, -1]


class BatchGraphs:
    """Batched decode steps of one model over many caches: one static view per batch-size bucket (powers of two),
    rebound in place when the set of sequences changes, each with its CUDA graph (``capture``) or run eagerly.

    ``new_cache``: the handle's ``new_cache`` (for the padding cache); ``max_len``: the longest cache a view will hold.
    A capture that fails leaves eager steps over the same views, which are correct.
    """

    def __init__(self, model: nn.Module, cache_name: str, new_cache: Any, max_len: int, capture: bool = True):
        self.model, self.cache_name, self.max_len, self.capture = model, cache_name, max_len, capture
        self._new_cache = new_cache
        self._pad: DuoCache | None = None
        self.views: dict[int, BatchCache] = {}
        self.steps: dict[int, BatchGraphStep] = {}
        self.failed: str | None = None
        self.bound: BatchCache | None = None
        self._members: tuple[DuoCache, ...] = ()

    def _view(self, rows: int) -> BatchCache:
        view = self.views.get(rows)
        if view is None:
            if self._pad is None:
                pad = self._new_cache(1, batch_size=1)
                pad.set_length(1)
                self._pad = pad
            view = self.views[rows] = BatchCache.static(self._pad, rows, self.max_len)
            if self.capture and self.failed is None:
                try:
                    self.steps[rows] = BatchGraphStep(self.model, view, self.cache_name)
                except torch.cuda.OutOfMemoryError:
                    raise
                except Exception as err:  # noqa: BLE001 - eager steps over the view stay correct
                    self.failed = repr(err)[:300]
        return view

    def warm_up(self, rows: int) -> None:
        """Build (and capture) the view of every bucket up to the one of ``rows`` rows."""
        n = 2
        while n <= bucket_rows(rows):
            self._view(n)
            n *= 2

    def bind(self, caches: list[DuoCache]) -> BatchCache:
        """The view decoding ``caches`` (rebound only when they change)."""
        members = tuple(caches)
        if self.bound is not None and members == self._members:
            return self.bound
        self.unbind()
        view = self._view(bucket_rows(sum(c.state.batch_size for c in caches)))
        view.bind(caches)
        self.bound, self._members = view, members
        return view

    def unbind(self) -> None:
        """Let the bound caches go (their clocks brought up to date)."""
        if self.bound is not None:
            self.bound.unbind()
        self.bound, self._members = None, ()

    def step(self, caches: list[DuoCache], tokens: list[int]) -> torch.Tensor:
        """One decode step of ``caches`` (batch 1 each) on ``tokens``: logits ``[len(caches), vocab]``, a buffer
        the next step overwrites."""
        view = self.bind(caches)
        graph = self.steps.get(view.state.batch)
        if graph is not None and graph.fits():
            return graph(tokens)
        output = self.model(**view.step_inputs(tokens), use_cache=True, logits_to_keep=1,
                            **{self.cache_name: view})
        return output.logits[: view.state.used, -1]
