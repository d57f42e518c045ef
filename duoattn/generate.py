"""``duoattn generate``: ask a question about long documents, on any supported model, with less KV memory.

The documents are prefilled once under DuoAttention (progress on stderr for long inputs), the answer streams to
stdout as it is decoded, and one line on stderr closes the run: prompt tokens, prefill seconds, decoding speed and
the KV-cache bytes held against what full attention would hold for the same tokens.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import torch
from tqdm import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase, TextStreamer

from .hub import upstream_pattern
from .models import EMBEDDED_NAME, load_model, sliding_windows, text_config
from .models import head_dim as model_head_dim
from .pattern import HeadPattern
from .pipelines import DuoPipeline, SamplingSettings, prefill

STDIN = "-"
PROGRESS_MIN_TOKENS = 4096  # shorter prompts prefill in a moment: no progress bar


@dataclass
class GenerateConfig:
    """Settings of ``duoattn generate``.

    Attributes:
        model: HF id, directory or ``.gguf``; None for the embedded SmolLM2-135M-Instruct.
        pattern: a directory, a shipped or published name, or a Hub repo id; None for the embedded model's pattern.
        sparsity: fraction of KV heads made streaming.
        kv_bits: 16, or 8 / 4 for a quantised retrieval cache.
        files: documents to read, in order; ``-`` reads stdin.
        prompt: text put after the documents as it is.
        question: a question about the documents (framed as a question without a chat template).
        chat_template: wrap the prompt in the tokenizer's chat template; None: when the tokenizer has one.
        max_new_tokens, temperature, top_p, seed: decoding (temperature 0 = greedy).
        sink, recent: the streaming window (default: the pattern's).
        prefill_chunk_size: tokens per prefill forward call (also the progress bar's step).
        device, dtype: default ``cuda`` if available, float32 on the CPU, bfloat16 on a GPU.
    """

    model: str | None = None
    pattern: str | None = None
    sparsity: float = 0.5
    kv_bits: int = 16
    files: list[str] = field(default_factory=list)
    prompt: str | None = None
    question: str | None = None
    chat_template: bool | None = None
    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    sink: int | None = None
    recent: int | None = None
    prefill_chunk_size: int | None = 2048
    device: str | None = None
    dtype: str | None = None

    def __post_init__(self) -> None:
        if self.prompt is not None and self.question is not None:
            raise ValueError("give --prompt or --question, not both")
        if not self.files and not self.prompt and not self.question:
            raise ValueError("nothing to answer: give --file DOC (or - for stdin) and/or --prompt / --question")
        if self.files.count(STDIN) > 1:
            raise ValueError("stdin can be read once: give --file - at most once")
        if not 0.0 <= self.sparsity <= 1.0:
            raise ValueError(f"sparsity must be in [0, 1] (the fraction of streaming heads), got {self.sparsity}")
        if self.prefill_chunk_size is not None and self.prefill_chunk_size < 1:
            raise ValueError(f"prefill_chunk_size must be >= 1, got {self.prefill_chunk_size}")
        self.sampling()  # validates max_new_tokens, temperature, top_p

    def sampling(self) -> SamplingSettings:
        return SamplingSettings(self.max_new_tokens, self.temperature, self.top_p, self.seed)

    def pattern_source(self) -> str:
        if self.pattern is not None:
            return self.pattern
        if self.model is None:
            return EMBEDDED_NAME
        known = upstream_pattern(self.model)
        hint = f"; the pattern published for it is --pattern {known.name}" if known else ""
        raise ValueError(f"--model {self.model} needs --pattern (a directory, a name or a Hub repo id){hint}")


def read_documents(files: list[str], stdin: TextIO) -> str:
    """The documents' text, in order; several are each headed by their name."""
    texts = []
    for name in files:
        if name == STDIN:
            texts.append((name, stdin.read()))
            continue
        path = Path(name)
        if not path.is_file():
            raise FileNotFoundError(f"--file {name!r} is not a file")
        try:
            texts.append((name, path.read_text(encoding="utf-8")))
        except UnicodeDecodeError as err:
            raise ValueError(f"--file {name!r} is not UTF-8 text: {err}") from None
    if len(texts) == 1:
        return texts[0][1]
    return "\n\n".join(f"--- {'stdin' if name == STDIN else name} ---\n{text}" for name, text in texts)


def full_attention_kv_bytes(model: PreTrainedModel, tokens: int) -> int:
    """What transformers' own cache holds for ``tokens`` tokens in the model dtype: every KV head of every layer
    (local sliding-window layers keep ``window - 1`` tokens)."""
    cfg = text_config(model)
    vector = model_head_dim(cfg) * torch.empty((), dtype=model.dtype).element_size()
    kept = sum(tokens if w is None else min(tokens, w - 1) for w in sliding_windows(cfg))
    return kept * cfg.num_key_value_heads * vector * 2


class TimedStreamer(TextStreamer):
    """A ``TextStreamer`` that writes to ``out`` and records when the first and the last new token came."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, out: TextIO):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.out = out
        self.first: float | None = None
        self.last: float | None = None
        self.tokens = 0

    def put(self, value: torch.Tensor) -> None:
        is_prompt = self.skip_prompt and self.next_tokens_are_prompt
        super().put(value)
        if not is_prompt:
            now = time.perf_counter()
            self.first = now if self.first is None else self.first
            self.last = now
            self.tokens += value.numel()

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        self.out.write(text + ("\n" if stream_end else ""))
        self.out.flush()


@dataclass
class GenerateResult:
    """What one ``duoattn generate`` run produced and measured."""

    text: str
    prompt_tokens: int
    new_tokens: int
    prefill_s: float
    tokens_per_s: float | None
    kv_bytes: int
    full_kv_bytes: int

    def summary(self) -> str:
        speed = "n/a" if self.tokens_per_s is None else f"{self.tokens_per_s:.1f}"
        return (
            f"prompt {self.prompt_tokens} tokens | prefill {self.prefill_s:.2f} s | {speed} tokens/s "
            f"({self.new_tokens} new) | KV {format_bytes(self.kv_bytes)} held vs {format_bytes(self.full_kv_bytes)} "
            f"full attention ({self.kv_bytes / self.full_kv_bytes:.2f}x)"
        )


def format_bytes(n: int) -> str:
    """``n`` bytes in the largest binary unit that keeps the number at 1 or more (B, KiB, MiB, GiB, TiB)."""
    value, unit = float(n), "B"
    for larger in ("KiB", "MiB", "GiB", "TiB"):
        if value < 1024:
            break
        value, unit = value / 1024, larger
    return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"


def _question_text(config: GenerateConfig, chat: bool) -> str:
    if config.prompt is not None:
        return config.prompt
    if config.question is None:
        return ""
    return config.question if chat else f"Question: {config.question}\nAnswer:"


def run_generate(
    config: GenerateConfig,
    stdin: TextIO | None = None,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
    loaded: tuple[PreTrainedModel, PreTrainedTokenizerBase] | None = None,
) -> GenerateResult:
    """Answer once, streaming to ``stdout``; progress and the closing summary line go to ``stderr``.

    ``loaded`` reuses a model and tokenizer already in memory instead of loading ``config.model``.
    """
    stdin, stdout, stderr = stdin or sys.stdin, stdout or sys.stdout, stderr or sys.stderr
    documents = read_documents(config.files, stdin)
    pattern = HeadPattern.from_pretrained(config.pattern_source())
    model, tokenizer = loaded or load_model(config.model, dtype=config.dtype, device=config.device)
    pipe = DuoPipeline(model, tokenizer, pattern, sparsity=config.sparsity, sink=config.sink, recent=config.recent,
                       kv_bits=config.kv_bits, prefill_chunk_size=config.prefill_chunk_size,
                       chat_template=config.chat_template)
    settings = config.sampling()
    ctx_ids, (q_ids,) = pipe.encode(documents, [_question_text(config, pipe.chat_template)])
    prompt_tokens = len(ctx_ids) + len(q_ids)
    pipe.check_length(prompt_tokens, settings.max_new_tokens)
    streamer = TimedStreamer(tokenizer, stdout)
    with pipe.enabled() as handle:
        progress = tqdm(total=len(ctx_ids), desc="prefill", unit="tok", file=stderr,
                        disable=len(ctx_ids) < PROGRESS_MIN_TOKENS)
        start = time.perf_counter()
        ids = torch.tensor([ctx_ids], device=model.device)
        cache = prefill(model, handle, ids, prompt_tokens + settings.max_new_tokens, config.prefill_chunk_size,
                        on_chunk=progress.update)
        progress.close()
        new = pipe.continue_from(cache, ctx_ids, q_ids, settings, streamer=streamer)
    first = streamer.first if streamer.first is not None else time.perf_counter()
    decoded = streamer.tokens - 1  # the first new token closes the prefill
    speed = decoded / (streamer.last - first) if decoded > 0 and streamer.last > first else None
    seen = cache.max_len  # the cache is sized for the prompt and the answer; full attention's would be too
    result = GenerateResult(
        text=tokenizer.decode(new, skip_special_tokens=True),
        prompt_tokens=prompt_tokens,
        new_tokens=len(new),
        prefill_s=first - start,
        tokens_per_s=speed,
        kv_bytes=cache.kv_bytes(),
        full_kv_bytes=full_attention_kv_bytes(model, seen),
    )
    print(result.summary(), file=stderr, flush=True)
    return result
