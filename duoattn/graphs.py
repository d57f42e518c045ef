"""Decode steps replayed from a CUDA graph: what ``model.generate`` runs per token under DuoAttention on a GPU.

A decode step is the model's own ``forward`` (transformers' modeling code, the split cache, the registered attention
function). Everything it does per token is device work driven by the cache's device clock, so it is captured once
per cache and replayed; only the input token is copied in before each replay. transformers' ``generate`` asks the
model for its compiled call when the cache is compileable (:meth:`DecodeGraphs.compiled_call` is installed as that
call); prefill chunks and anything a graph cannot replay run the model eagerly.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch import nn

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
