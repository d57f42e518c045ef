"""The worker thread that owns the model: requests join and leave the running set between decode steps.

Each running request (:class:`Sequence`) has its own batch-1 :class:`~duoattn.cache.DuoCache`, sized to its prompt
plus ``max_tokens``, and prefills in it. A scheduling round runs ONE ``[B, 1]`` decode forward for every request
that has finished its prefill, through a :class:`~duoattn.batch.BatchCache` over their caches (each row with its
own length), then at most one prefill chunk of the oldest request still prefilling, so a long prompt delays every
other stream by one chunk per round, not by its whole prefill. The batch view is rebuilt (on the GPU: a static
view of the batch-size bucket, rebound in place, whose CUDA graph replays the step) only when the set of decoding
requests changes (a request joins after its prefill, or leaves), and let go as soon as one leaves, so its memory
goes back at once. Models with local sliding-window layers (whose transformers caches a view cannot gather) decode
one request at a time.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..batch import BatchCache
from ..cache import DuoCache
from ..deploy import DuoAttentionHandle, cache_kwarg
from ..graphs import BatchGraphs
from ..models import text_config
from .metrics import ServerMetrics
from .sampling import SamplingParams, sample

log = logging.getLogger("duoattn.serve")


@dataclass(frozen=True)
class Event:
    """What the worker tells a request: a new ``token``, ``done`` (with ``reason`` stop / length) or ``error``."""

    kind: str
    token: int | None = None
    reason: str | None = None
    status: int = 200
    code: str | None = None
    message: str = ""


@dataclass(eq=False)
class Sequence:
    """One request as the worker sees it. ``reserved`` bytes of the pool are released when it leaves."""

    prompt: list[int]
    params: SamplingParams
    reserved: int
    loop: asyncio.AbstractEventLoop
    release: Callable[[int], None]  # the pool's release, called on the loop
    arrival: float = field(default_factory=time.perf_counter)  # perf_counter seconds, for time to first token
    events: asyncio.Queue[Event] = field(default_factory=asyncio.Queue)
    cancelled: bool = False  # set from the event loop (a disconnect, a stop sequence); read by the worker
    # worker-side state
    cache: DuoCache | None = None
    generator: torch.Generator | None = None
    prefilled: int = 0
    generated: list[int] = field(default_factory=list)
    last_token_at: float = 0.0

    @property
    def decoding(self) -> bool:
        return self.prefilled == len(self.prompt)

    def post(self, event: Event) -> None:
        """Hand ``event`` to the request's handler on the event loop (thread-safe)."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the loop is closed: the server is shutting down and nobody listens
            pass


_WAKE = object()
_STOP = object()


class Scheduler:
    """Runs every request on one worker thread; :meth:`submit` and :meth:`cancel` are called from the event loop."""

    def __init__(self, model: nn.Module, handle: DuoAttentionHandle, eos_ids: set[int], prefill_chunk: int,
                 metrics: ServerMetrics, cuda_graphs: bool = True, max_len: int | None = None):
        self.model, self.handle = model, handle
        self.eos_ids = eos_ids
        self.prefill_chunk = prefill_chunk
        self.metrics = metrics
        self.cache_name = cache_kwarg(model)
        self.device = model.device
        # On the GPU a decode step replays the cache's CUDA graph (captured at its first step); prefill chunks and
        # the CPU run the model eagerly.
        graphs = handle.graphs if cuda_graphs and self.device.type == "cuda" else None
        # Both replaceable (the tests inject failures through them).
        self.decode_forward: Callable[..., Any] = graphs.compiled_call if graphs is not None else model
        self.new_cache: Callable[..., DuoCache] = handle.new_cache
        self.running: list[Sequence] = []
        # One decode forward for all decoding requests, unless a layer keeps transformers' own cache.
        self.batched = all(r is not None for r in handle.layer_roles)
        # On the GPU the batched step replays a CUDA graph too: one per batch-size bucket, over a static view that
        # is rebound when requests join or leave (a lone request replays its own cache's graph).
        self.batch_graphs: BatchGraphs | None = None
        if graphs is not None and self.batched:
            if max_len is None:
                max_len = getattr(text_config(model), "max_position_embeddings", None)
            if max_len is None:
                raise ValueError("max_len is needed: the model's config has no max_position_embeddings")
            self.batch_graphs = BatchGraphs(model, self.cache_name, handle.new_cache, max_len)
        self.sequential_max = 1 if graphs is not None else 0
        self._batch: BatchCache | None = None
        self._batch_seqs: tuple[Sequence, ...] = ()
        self.peak_running = 0  # most requests ever running at once (a diagnostic)
        self._inbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self.failure: BaseException | None = None  # what stopped the worker, if it died

    def warm_up(self, max_batch: int) -> None:
        """Compile and capture before the first request, so that no request waits for it: prefill chunks (the
        compiled streaming prefill at every chunk shape a prompt brings), a decode step (the Triton kernels) and the
        CUDA graph of every batch-size bucket up to ``max_batch``. Runs on the caller's thread, before :meth:`start`;
        leaves no request, cache or reservation behind."""
        if self._thread is not None:
            raise RuntimeError("warm up before the scheduler starts")
        chunk = self.prefill_chunk
        sizes = [chunk, chunk, max(1, chunk // 2 + 1)]  # first chunk, a chunk after stored tokens, a shorter last one
        with torch.no_grad():
            cache = self.new_cache(sum(sizes) + 2, batch_size=1)
            cache.begin_prompt(sum(sizes))  # the prefill mode's dense chunks compile too
            for n in sizes:
                self.model(input_ids=torch.zeros(1, n, dtype=torch.long, device=self.device), use_cache=True,
                           logits_to_keep=1, **{self.cache_name: cache})
            self._logits(self.decode_forward, torch.zeros(1, 1, dtype=torch.long, device=self.device), cache)
            if self.batch_graphs is not None:
                self.batch_graphs.warm_up(max_batch)
        del cache
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    # ------------------------------------------------------------------------------------ event-loop side
    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("the scheduler is already running")
        self._thread = threading.Thread(target=self._run, name="duoattn-serve-worker", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        if self._thread is None:
            return
        self._inbox.put(_STOP)
        self._thread.join(timeout)
        self._thread = None

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def submit(self, seq: Sequence) -> None:
        self._inbox.put(seq)

    def cancel(self, seq: Sequence) -> None:
        seq.cancelled = True
        self._inbox.put(_WAKE)  # a worker with nothing to run sleeps on the inbox

    # ------------------------------------------------------------------------------------------ worker side
    def _run(self) -> None:
        try:
            with torch.no_grad():  # as generate runs (CUDA-graph capture included), so answers match it
                while self._drain(block=not self.running):
                    self._round()
        except BaseException as err:  # noqa: BLE001 - recorded for /health; requests get an error below
            self.failure = err
            log.exception("the serving worker stopped")
        finally:
            waiting = []
            while not self._inbox.empty():
                item = self._inbox.get()
                if isinstance(item, Sequence):
                    waiting.append(item)
            for seq in list(self.running) + waiting:
                self._finish(seq, Event("error", status=503, code="server_stopping",
                                        message="the server stopped before this request finished"))

    def _drain(self, block: bool) -> bool:
        """Admit what arrived; False once asked to stop."""
        while True:
            try:
                item = self._inbox.get(block=block)
            except queue.Empty:
                return True
            block = False
            if item is _STOP:
                return False
            if isinstance(item, Sequence):
                self._admit(item)

    def _admit(self, seq: Sequence) -> None:
        if seq.cancelled:
            self._finish(seq, None)
            return
        try:
            seq.cache = self.new_cache(len(seq.prompt) + seq.params.max_tokens, batch_size=1)
            seq.cache.begin_prompt(len(seq.prompt))  # in chunks, over many rounds: the prefill mode needs its end
            seq.generator = seq.params.generator(self.device)
        except Exception as err:  # noqa: BLE001
            self._advance(seq, err)
            return
        self.running.append(seq)
        self.peak_running = max(self.peak_running, len(self.running))

    def _round(self) -> None:
        """Drop cancelled requests, one decode step per decoding request, one prefill chunk."""
        for seq in [s for s in self.running if s.cancelled]:
            self._finish(seq, None)
        decoding = [s for s in self.running if s.decoding]
        for seq, logits in zip(decoding, self.decode(decoding)):
            self._advance(seq, logits)
        prefilling = next((s for s in self.running if not s.decoding), None)
        if prefilling is not None:
            self._guarded(prefilling, self._prefill_chunk)

    def decode(self, seqs: list[Sequence]) -> list[torch.Tensor | BaseException]:
        """One decode step for each of ``seqs``: the logits ``[vocab]`` of its next token, or what went wrong.

        Batched: one ``[B, 1]`` forward over a batch view of their caches, replayed from a CUDA graph on the GPU
        (a failure of that forward fails every one of them). Otherwise one batch-1 forward per request.
        """
        if not seqs:
            return []
        if not self.batched or len(seqs) <= self.sequential_max:
            if self._batch_seqs:  # a request's own step must not run while a view holds its rows
                self._drop_batch()
            return [self._decode_one(seq) for seq in seqs]
        tokens = [seq.generated[-1] for seq in seqs]
        try:
            if self.batch_graphs is not None:
                logits = self.batch_graphs.step([seq.cache for seq in seqs], tokens).float()
                self._batch_seqs = tuple(seqs)
            else:
                view = self._batch_of(seqs)
                output = self.decode_forward(**view.step_inputs(tokens), use_cache=True, logits_to_keep=1,
                                             **{self.cache_name: view})
                logits = output.logits[:, -1].float()
        except Exception as err:  # noqa: BLE001 - the batch fails; the worker goes on
            self._drop_batch()
            return [err] * len(seqs)
        return list(logits.unbind(0))

    def _batch_of(self, seqs: list[Sequence]) -> BatchCache:
        """The batch view over ``seqs``' caches: the current one if the membership is unchanged, else a new one."""
        key = tuple(seqs)
        if self._batch is None or key != self._batch_seqs:
            self._drop_batch()
            self._batch = BatchCache([seq.cache for seq in seqs])
            self._batch_seqs = key
        return self._batch

    def _drop_batch(self) -> None:
        if self._batch is not None:
            self._batch.release()
        if self.batch_graphs is not None:
            self.batch_graphs.unbind()
        self._batch, self._batch_seqs = None, ()

    def _decode_one(self, seq: Sequence) -> torch.Tensor | BaseException:
        ids = torch.tensor([[seq.generated[-1]]], device=self.device)
        try:
            return self._logits(self.decode_forward, ids, seq.cache)
        except Exception as err:  # noqa: BLE001 - one request's failure must not stop the others
            return err

    def _logits(self, forward: Callable[..., Any], ids: torch.Tensor, cache: DuoCache) -> torch.Tensor:
        output = forward(input_ids=ids, use_cache=True, logits_to_keep=1, **{self.cache_name: cache})
        # A replayed graph's logits are a static buffer, overwritten by that cache's next step: the caller samples
        # from them before then.
        return output.logits[0, -1].float()

    def _prefill_chunk(self, seq: Sequence) -> torch.Tensor | None:
        start = seq.prefilled
        chunk = seq.prompt[start : start + self.prefill_chunk]
        logits = self._logits(self.model, torch.tensor([chunk], device=self.device), seq.cache)
        seq.prefilled += len(chunk)
        return logits if seq.decoding else None

    def _guarded(self, seq: Sequence, step: Callable[[Sequence], torch.Tensor | None]) -> None:
        try:
            logits = step(seq)
        except Exception as err:  # noqa: BLE001
            self._advance(seq, err)
            return
        if logits is not None:
            self._advance(seq, logits)

    def _advance(self, seq: Sequence, logits: torch.Tensor | BaseException) -> None:
        """Sample the next token of ``seq`` from ``logits`` and tell its handler; finish it if it is done."""
        if _out_of_memory(logits):
            self._finish(seq, Event("error", status=503, code="out_of_memory",
                                    message="the device ran out of memory for this request; retry later or send a "
                                    "shorter prompt or a smaller max_tokens"))
            return
        if isinstance(logits, BaseException):
            log.error("request failed", exc_info=logits)
            self._finish(seq, Event("error", status=500, code="internal_error",
                                    message=f"generation failed: {type(logits).__name__}: {logits}"))
            return
        try:
            token = sample(logits, seq.params, seq.generator)
        except Exception as err:  # noqa: BLE001 - e.g. non-finite logits: this request fails, the worker goes on
            self._advance(seq, err)
            return
        now = time.perf_counter()
        if seq.generated:
            self.metrics.inter_token_latency.observe(now - seq.last_token_at)
        else:
            self.metrics.time_to_first_token.observe(now - seq.arrival)
        seq.last_token_at = now
        seq.generated.append(token)
        self.metrics.generation_tokens.inc()
        if token in self.eos_ids:
            self._finish(seq, Event("done", reason="stop"))
            return
        seq.post(Event("token", token=token))
        if len(seq.generated) >= seq.params.max_tokens:
            self._finish(seq, Event("done", reason="length"))

    def _finish(self, seq: Sequence, event: Event | None) -> None:
        """Take ``seq`` out, drop its cache, give its memory back, then send ``event`` (None: nobody listens)."""
        if seq in self.running:
            self.running.remove(seq)
        if seq in self._batch_seqs:  # the view holds its storage: drop it now, the next round builds another
            self._drop_batch()
        seq.cache = None
        seq.generator = None
        try:
            seq.loop.call_soon_threadsafe(seq.release, seq.reserved)
        except RuntimeError:  # loop closed at shutdown
            pass
        if event is not None:
            seq.post(event)
        else:
            self.metrics.cancelled.inc()


def _out_of_memory(err: object) -> bool:
    """A failed allocation: torch's CUDA OOM, or the CPU allocator's (a plain RuntimeError)."""
    return isinstance(err, (torch.OutOfMemoryError, MemoryError)) or (
        isinstance(err, RuntimeError) and "can't allocate memory" in str(err))
