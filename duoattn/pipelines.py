"""``duoattn.pipeline``: questions about one long context, answered from a single DuoAttention prefill.

In the style of transformers' and kvpress's pipelines::

    >>> pipe = duoattn.pipeline()                        # the embedded SmolLM2-135M and its shipped pattern
    >>> pipe(context=long_text, question=["Who?", "When?"])

The context is prefilled once into a DuoAttention cache; each question continues ``model.generate`` from a copy
of that cache (the last one from the cache itself), so the context is never recomputed. Because DuoAttention's
streaming rule does not depend on how a sequence is split into forward calls, the answers equal those of one
``generate`` call over context + question.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from transformers.cache_utils import Cache

from .models import EMBEDDED_NAME, load_model, text_config
from .deploy import DuoAttentionHandle, cache_kwarg, duo_attention
from .pattern import HeadPattern

_SLOT = "\x00duoattn-context\x00"  # stands for the user message while splitting the chat template around it


@dataclass(frozen=True)
class SamplingSettings:
    """How answers are decoded.

    Attributes:
        max_new_tokens: the longest answer, in tokens.
        temperature: 0 decodes greedily; above 0 samples.
        top_p: nucleus sampling mass (sampling only).
        seed: seeds torch's generator before each answer (sampling only); None leaves it as it is.
    """

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {self.temperature!r}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")

    def generate_kwargs(self, tokenizer: PreTrainedTokenizerBase) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"max_new_tokens": self.max_new_tokens, "do_sample": self.temperature > 0}
        if self.temperature > 0:
            kwargs.update(temperature=self.temperature, top_p=self.top_p)
        else:  # the model's generation config may carry sampling values that greedy decoding would warn about
            kwargs.update(temperature=None, top_p=None, top_k=None)
        if tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
            kwargs["pad_token_id"] = tokenizer.eos_token_id
        return kwargs


def context_window(model: PreTrainedModel) -> int | None:
    """The longest sequence the model takes (``max_position_embeddings``), or None if its config does not say."""
    value = getattr(text_config(model), "max_position_embeddings", None)
    return int(value) if value else None


def copy_cache(cache: Cache) -> Cache:
    """An independent copy of a prefilled cache, so that one question's decoding leaves it untouched.

    The only place that copies a cache: a cache class that cannot be deep-copied gets its copy rule here.
    """
    return copy.deepcopy(cache)


@torch.inference_mode()
def prefill(
    model: PreTrainedModel,
    handle: DuoAttentionHandle,
    ids: torch.Tensor,
    max_len: int,
    chunk_size: int | None = None,
    on_chunk: Callable[[int], None] | None = None,
) -> Cache:
    """Run ``ids [1, T]`` through the model into a fresh DuoAttention cache sized for ``max_len`` tokens (the
    context, the longest question and its answer), ``chunk_size`` tokens per forward.

    ``on_chunk(n)`` is called after each forward with its number of tokens (for progress bars). Only the last
    position's logits are computed: a prefill needs the cache, not the logits.
    """
    cache = handle.new_cache(max_len)
    total = ids.shape[1]
    step = total if chunk_size is None else chunk_size
    for start in range(0, total, max(step, 1)):
        chunk = ids[:, start : start + step]
        model(chunk, **{cache_kwarg(model): cache}, use_cache=True, logits_to_keep=1)
        if on_chunk is not None:
            on_chunk(chunk.shape[1])
    return cache


class DuoPipeline:
    """A model, its tokenizer and a head pattern; call it with a context and one or several questions.

    DuoAttention is enabled for the duration of each call only: between calls the model is left as it was.

    Args:
        model, tokenizer: a loaded causal LM and its tokenizer.
        pattern: the head pattern for ``model``.
        sparsity: fraction of KV heads made streaming.
        sink, recent: the streaming window (default: the pattern's).
        kv_bits: 16, or 8 / 4 for a quantised retrieval cache.
        prefill_chunk_size: prefill in forward calls of this many tokens (None: one call).
        chat_template: wrap context and question in the tokenizer's chat template (one user turn); None uses it
            when the tokenizer has one.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        pattern: HeadPattern,
        sparsity: float | None = 0.5,
        sink: int | None = None,
        recent: int | None = None,
        kv_bits: int = 16,
        prefill_chunk_size: int | None = None,
        chat_template: bool | None = None,
    ):
        if not isinstance(pattern, HeadPattern):
            raise TypeError(f"pattern must be a duoattn.HeadPattern, got {type(pattern).__name__}")
        has_template = bool(getattr(tokenizer, "chat_template", None))
        if chat_template and not has_template:
            raise ValueError("chat_template=True, but the tokenizer has no chat template")
        self.model, self.tokenizer, self.pattern = model, tokenizer, pattern
        self.sparsity, self.sink, self.recent, self.kv_bits = sparsity, sink, recent, kv_bits
        self.prefill_chunk_size = prefill_chunk_size
        self.chat_template = has_template if chat_template is None else chat_template
        with self.enabled():  # refuse a pattern / setting that does not fit the model now, not at the first call
            pass

    @contextmanager
    def enabled(self) -> Iterator[DuoAttentionHandle]:
        """DuoAttention on the pipeline's model with the pipeline's settings, for a ``with`` block."""
        with duo_attention(self.model, self.pattern, sparsity=self.sparsity, sink=self.sink, recent=self.recent,
                           kv_bits=self.kv_bits) as handle:
            yield handle

    # ------------------------------------------------------------------------------------------- prompts
    def _frame(self) -> tuple[str, str]:
        """The text before and after the user message (empty without a chat template)."""
        if not self.chat_template:
            return "", ""
        text = self.tokenizer.apply_chat_template(
            [{"role": "user", "content": _SLOT}], add_generation_prompt=True, tokenize=False
        )
        pieces = text.split(_SLOT)
        if len(pieces) != 2:
            raise ValueError("the tokenizer's chat template does not write the user message exactly once; "
                             "use chat_template=False (--no-chat-template)")
        return pieces[0], pieces[1]

    def encode(self, context: str, questions: Sequence[str]) -> tuple[list[int], list[list[int]]]:
        """Token ids of the context part and of each question part; context + question is the whole prompt.

        The context part ends where the questions begin, so its cache serves every question. With a chat
        template both sit in one user turn, the question after a blank line.
        """
        if not isinstance(context, str):
            raise TypeError(f"context must be a string, got {type(context).__name__}")
        before, after = self._frame()
        # A chat template writes its own special tokens (BOS included), as apply_chat_template(tokenize=True) does.
        special = not self.chat_template
        ctx_ids = self.tokenizer(before + context, add_special_tokens=special).input_ids if (before or context) else []
        parts = []
        for q in questions:
            if not isinstance(q, str):
                raise TypeError(f"every question must be a string, got {type(q).__name__}")
            sep = "\n\n" if context and q else ""
            text = sep + q + after
            ids = self.tokenizer(text, add_special_tokens=special and not ctx_ids).input_ids if text else []
            parts.append(ids)
        if any(not ids for ids in parts):
            # generate needs at least one token after the cache: hand the context's last token to the questions
            if not ctx_ids:
                raise ValueError("context and question are both empty: there is nothing to answer")
            ctx_ids, parts = ctx_ids[:-1], [ctx_ids[-1:] + ids for ids in parts]
        return ctx_ids, parts

    def check_length(self, prompt_tokens: int, max_new_tokens: int) -> None:
        """Refuse a prompt that, with its answer, would not fit the model's context window."""
        window = context_window(self.model)
        if window is not None and prompt_tokens + max_new_tokens > window:
            raise ValueError(
                f"the prompt has {prompt_tokens} tokens; with max_new_tokens={max_new_tokens} that exceeds the "
                f"model's context of {window} tokens (max_position_embeddings): shorten the input or the answer"
            )

    # ---------------------------------------------------------------------------------------- generation
    @torch.inference_mode()
    def continue_from(
        self,
        cache: Cache,
        ctx_ids: list[int],
        question_ids: list[int],
        settings: SamplingSettings,
        streamer: Any = None,
    ) -> list[int]:
        """Generate after context + question, reusing ``cache`` (which holds the context); the new token ids."""
        device = self.model.device
        ids = torch.tensor([ctx_ids + question_ids], device=device)
        if settings.seed is not None and settings.temperature > 0:
            torch.manual_seed(settings.seed)
        out = self.model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            streamer=streamer,
            **{cache_kwarg(self.model): cache},
            **settings.generate_kwargs(self.tokenizer),
        )
        return out[0, ids.shape[1] :].tolist()

    def __call__(
        self,
        context: str,
        question: str | Sequence[str] = "",
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
    ) -> str | list[str]:
        """The answer to ``question`` about ``context`` (a list of answers for a list of questions)."""
        settings = SamplingSettings(max_new_tokens, temperature, top_p, seed)
        questions = [question] if isinstance(question, str) else list(question)
        if not questions:
            raise ValueError("question is an empty list: give at least one question")
        ctx_ids, parts = self.encode(context, questions)
        self.check_length(len(ctx_ids) + max(len(p) for p in parts), settings.max_new_tokens)
        answers = []
        with self.enabled() as handle:
            device = self.model.device
            max_len = len(ctx_ids) + max(len(p) for p in parts) + settings.max_new_tokens
            cache = prefill(self.model, handle, torch.tensor([ctx_ids], device=device), max_len,
                            self.prefill_chunk_size)
            for i, q_ids in enumerate(parts):
                run_cache = cache if i == len(parts) - 1 else copy_cache(cache)
                new = self.continue_from(run_cache, ctx_ids, q_ids, settings)
                answers.append(self.tokenizer.decode(new, skip_special_tokens=True))
        return answers[0] if isinstance(question, str) else answers


def pipeline(
    model: str | PreTrainedModel | None = None,
    pattern: str | HeadPattern | None = None,
    sparsity: float | None = 0.5,
    tokenizer: PreTrainedTokenizerBase | None = None,
    sink: int | None = None,
    recent: int | None = None,
    kv_bits: int = 16,
    prefill_chunk_size: int | None = None,
    chat_template: bool | None = None,
    device: str | None = None,
    dtype: str | torch.dtype | None = None,
) -> DuoPipeline:
    """A :class:`DuoPipeline`: ``duoattn.pipeline()(context=..., question=...)``.

    Args:
        model: None for the embedded SmolLM2-135M-Instruct; a Hugging Face id, directory or ``.gguf`` file
            (loaded with ``load_model`` on ``device`` in ``dtype``); or a loaded model (then pass ``tokenizer``).
        pattern: a :class:`HeadPattern`, or a name, directory or Hub repo id (``HeadPattern.from_pretrained``);
            None for the pattern shipped for the embedded model (other models need one).
        Others: see :class:`DuoPipeline`.
    """
    if pattern is None:
        if model is not None:
            raise ValueError("a model other than the embedded one needs a pattern (a name, directory or Hub repo id)")
        pattern = EMBEDDED_NAME
    if not isinstance(pattern, HeadPattern):
        pattern = HeadPattern.from_pretrained(pattern)
    if isinstance(model, PreTrainedModel):
        if tokenizer is None:
            raise ValueError("a loaded model needs its tokenizer: pipeline(model, tokenizer=...)")
    else:
        if tokenizer is not None:
            raise ValueError("tokenizer is for a loaded model; a model given by name loads its own")
        model, tokenizer = load_model(model, dtype=dtype, device=device)
    return DuoPipeline(model, tokenizer, pattern, sparsity=sparsity, sink=sink, recent=recent, kv_bits=kv_bits,
                       prefill_chunk_size=prefill_chunk_size, chat_template=chat_template)
