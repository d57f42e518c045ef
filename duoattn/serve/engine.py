"""What the HTTP handlers call: prompts to token ids, request limits, and one generation as a stream of text.

The engine sits between the FastAPI handlers (event-loop thread) and the :class:`~.scheduler.Scheduler` (worker
thread): it checks a request against the model's context, reserves its KV memory from the :class:`~.pool.KVPool`,
hands it to the worker, turns the worker's token events into text (stop sequences included) and cancels the
request when its client goes away.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import torch
from starlette.requests import Request
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..deploy import HANDLE_ATTR, DuoAttentionHandle
from ..models import text_config
from .config import CPU_BUDGET_GIB, CUDA_FREE_FRACTION, GIB, ServeConfig
from .metrics import ServerMetrics
from .pool import KVPool, PoolRefusal
from .sampling import SamplingParams
from .scheduler import Event, Scheduler, Sequence
from .schema import ChatCompletionRequest, CompletionRequest, GenerationRequest
from .text import TextStream

COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
DISCONNECT_POLL_S = 0.25  # how often a waiting request checks whether its client is still there


class APIError(Exception):
    """An error answered with an OpenAI-style body: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or ("invalid_request_error" if status < 500 else "server_error")


@dataclass(frozen=True)
class Piece:
    """A piece of generated text; the last one has a ``finish_reason``. ``tokens``: generated so far."""

    text: str
    finish_reason: str | None
    tokens: int


def kv_budget_bytes(config: ServeConfig, device: torch.device) -> int:
    """The KV pool size: ``--kv-budget-gib``, else a fraction of free GPU memory, else a fixed CPU budget."""
    if config.kv_budget_gib is not None:
        return int(config.kv_budget_gib * GIB)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * CUDA_FREE_FRACTION)
    return int(CPU_BUDGET_GIB * GIB)


class Engine:
    """A model with DuoAttention enabled, served to many requests at once.

    Args:
        model, tokenizer: the model (DuoAttention already enabled, ``handle`` its handle) and its tokenizer.
        config: server settings (batch, queue, budget, prefill chunk, limits).
        served_name: the model name requests must send.
    """

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, handle: DuoAttentionHandle,
                 config: ServeConfig, served_name: str):
        if getattr(model, HANDLE_ATTR, None) is not handle:
            raise ValueError("handle must be the DuoAttention handle of model (enable_duo_attention(model, ...))")
        self.model, self.tokenizer, self.handle, self.config = model, tokenizer, handle, config
        self.served_name = served_name
        self.created = int(time.time())
        cfg = text_config(model)
        limits = [getattr(cfg, "max_position_embeddings", None), config.max_model_len]
        self.context_len = min(x for x in limits if x is not None)
        self.vocab_size = cfg.vocab_size
        eos = model.generation_config.eos_token_id
        eos = tokenizer.eos_token_id if eos is None else eos
        self.eos_ids = {int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]) if e is not None}
        self.metrics = ServerMetrics()
        if handle.prefill.name != config.prefill:
            raise ValueError(f"config.prefill is {config.prefill!r} but the model's DuoAttention prefills with "
                             f"{handle.prefill.name!r}: enable it with prefill={config.prefill!r}")
        # One request prefills at a time: the pool keeps room for the prompt history of the longest prompt.
        budget = kv_budget_bytes(config, model.device)
        self.prefill_reserve = handle.prompt_history_bytes(self.context_len)
        if self.prefill_reserve >= budget:
            raise ValueError(f"prefill {config.prefill!r} needs {self.prefill_reserve / GIB:.2f} GiB for the history "
                             f"of a {self.context_len}-token prompt, more than the KV budget of "
                             f"{budget / GIB:.2f} GiB: raise --kv-budget-gib, lower --max-model-len, or use "
                             "--prefill window:N or streaming")
        self.pool = KVPool(budget - self.prefill_reserve, config.max_batch, config.queue_size, config.queue_timeout)
        self.metrics.watch(lambda: self.pool.waiting, lambda: self.pool.running, lambda: self.pool.in_use,
                           lambda: self.pool.capacity)
        self.scheduler = Scheduler(model, handle, self.eos_ids, config.prefill_chunk, self.metrics,
                                   cuda_graphs=config.cuda_graphs, max_len=self.context_len)

    # --------------------------------------------------------------------------------------------- checks
    def check_model(self, name: str) -> None:
        if name != self.served_name:
            raise APIError(404, f"model {name!r} is not served here; this server serves {self.served_name!r}",
                           param="model", code="model_not_found")

    # The tokenizer runs on the event-loop thread only: a fast tokenizer used from two threads at once can fail
    # ("Already borrowed"), and the handlers' text streams decode with it there.
    def completion_prompt(self, body: CompletionRequest) -> list[int]:
        """Token ids of a completion prompt (text is tokenised as ``tokenizer(prompt)``, special tokens included)."""
        if isinstance(body.prompt, str):
            return self.tokenizer(body.prompt).input_ids
        bad = next((t for t in body.prompt if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise APIError(400, f"prompt: token id {bad} is outside the vocabulary [0, {self.vocab_size})",
                           param="prompt")
        return list(body.prompt)

    def chat_prompt(self, body: ChatCompletionRequest) -> list[int]:
        """Token ids of the messages rendered with the tokenizer's chat template, ready for the assistant's turn."""
        if not getattr(self.tokenizer, "chat_template", None):
            raise APIError(400, f"model {self.served_name!r} has no chat template; use /v1/completions",
                           param="messages")
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        try:
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except Exception as err:  # noqa: BLE001 - templates raise their own errors (roles out of order, ...)
            raise APIError(400, f"messages: the chat template refused them: {err}", param="messages") from None
        return self.tokenizer(text, add_special_tokens=False).input_ids  # the template holds the special tokens

    def sampling(self, body: GenerationRequest, prompt_len: int, max_tokens: int | None, prompt_param: str,
                 default_max_tokens: int) -> SamplingParams:
        """The request's sampling parameters, once prompt + completion fit in the context."""
        if prompt_len == 0:
            raise APIError(400, f"{prompt_param}: the prompt has no tokens", param=prompt_param)
        if prompt_len >= self.context_len:
            raise APIError(400, f"{prompt_param}: the prompt has {prompt_len} tokens; this model's context holds "
                           f"{self.context_len} tokens, prompt and completion together", param=prompt_param,
                           code="context_length_exceeded")
        if max_tokens is None:
            max_tokens = min(default_max_tokens, self.context_len - prompt_len)
        elif prompt_len + max_tokens > self.context_len:
            raise APIError(400, f"max_tokens: {prompt_len} prompt tokens + max_tokens {max_tokens} exceed this "
                           f"model's context of {self.context_len} tokens", param="max_tokens",
                           code="context_length_exceeded")
        return SamplingParams(max_tokens=max_tokens,
                              temperature=1.0 if body.temperature is None else body.temperature,
                              top_p=1.0 if body.top_p is None else body.top_p, seed=body.seed)

    # ----------------------------------------------------------------------------------------- generation
    async def generate(self, request: Request, prompt: list[int], params: SamplingParams,
                       stops: list[str]) -> AsyncIterator[Piece]:
        """Generate after ``prompt``, yielding text pieces; the last piece has a finish reason.

        Raises :class:`APIError` (503) when no memory can be had or the device runs out of it. The request is
        cancelled, and its memory released, when the client disconnects or the caller stops iterating.
        """
        if not self.scheduler.alive:
            raise APIError(503, "the server's worker has stopped; see the server log", code="worker_stopped")
        arrival = time.perf_counter()  # time to first token includes the wait for memory
        nbytes = self.handle.expected_kv_bytes(len(prompt) + params.max_tokens)
        try:
            await self.pool.acquire(nbytes)
        except PoolRefusal as refusal:
            raise APIError(503, refusal.message, code=refusal.code) from None
        self.metrics.prompt_tokens.inc(len(prompt))
        seq = Sequence(prompt, params, nbytes, asyncio.get_running_loop(), self.pool.release, arrival=arrival)
        self.scheduler.submit(seq)
        text = TextStream(self.tokenizer, stops)
        finished = False
        try:
            while True:
                event = await self._next_event(seq, request)
                if event is None:  # the client went away
                    return
                if event.kind == "token":
                    piece = text.add(event.token)
                    if text.stopped:
                        yield Piece(piece, "stop", len(text.ids))
                        return
                    if piece:
                        yield Piece(piece, None, len(text.ids))
                elif event.kind == "done":
                    finished = True
                    yield Piece(text.finish(), event.reason, len(text.ids))
                    return
                else:
                    finished = True
                    raise APIError(event.status, event.message, code=event.code)
        finally:
            if not finished:
                self.scheduler.cancel(seq)

    async def _next_event(self, seq: Sequence, request: Request) -> Event | None:
        """The next event of ``seq``, or None once the client has disconnected (checked whenever it must wait)."""
        while True:
            if seq.events.empty() and await request.is_disconnected():
                return None
            try:
                return await asyncio.wait_for(seq.events.get(), DISCONNECT_POLL_S)
            except asyncio.TimeoutError:
                continue
