"""Passkey retrieval: a number hidden in repetitive filler text, asked for at the end.

The classic prompt of the long-context literature (Mohtashami & Jaggi, 2023). The embedded SmolLM2-135M answers it
reliably up to about 4K tokens, which makes it a quick, discriminating check of what a head pattern keeps.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field

from transformers import PreTrainedTokenizerBase

from ..checks import UsageError
from .prompts import Sample

INTRO = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
    "I will quiz you about the important information there.\n"
)
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = "\nWhat is the pass key? The pass key is"
MAX_NEW_TOKENS = 8  # a 5-digit key is at most a few tokens; the demo generates as many


@dataclass(frozen=True)
class PasskeySample:
    """One prompt: token ids and the expected passkey."""

    input_ids: list[int]
    answer: str
    depth: float
    seed: int


def passkey_sample(tokenizer: PreTrainedTokenizerBase, length: int, depth: float, seed: int) -> PasskeySample:
    """A prompt of about ``length`` tokens with a 5-digit passkey at relative ``depth`` in [0, 1]."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    key = str(random.Random(seed).randint(10000, 99999))
    fixed = len(tokenizer(INTRO + NEEDLE.format(key=key) + QUESTION, add_special_tokens=False).input_ids)
    per_filler = len(tokenizer(FILLER, add_special_tokens=False).input_ids)
    shortest = fixed + per_filler + len(tokenizer("").input_ids)  # one filler sentence and the special tokens
    if length < shortest:
        raise UsageError(
            f"length {length} is too short for a passkey prompt: the instructions, the passkey, the question and "
            f"one filler sentence take {shortest} tokens; use a length of at least {shortest}"
        )
    repeats = max(1, (length - fixed) // per_filler)
    before = round(depth * repeats)
    text = INTRO + FILLER * before + NEEDLE.format(key=key) + FILLER * (repeats - before) + QUESTION
    # The tokenizer adds its own special tokens (a BOS for Llama 3; nothing for SmolLM2).
    return PasskeySample(tokenizer(text).input_ids, key, depth, seed)


def score_passkey(answer: str, generated: str) -> float:
    """1.0 if the first number in the generated text is the passkey, else 0.0."""
    match = re.search(r"\d+", generated)
    return float(match is not None and match.group(0) == answer)


@dataclass
class PasskeyTask:
    """The demo's quick check: ``samples`` passkeys per length, at depths spread evenly over the context.

    Prompts and seeds are those of ``duoattn demo`` (same defaults), so both give the same answers. The prompt
    is always the raw completion prompt.
    """

    lengths: list[int] = field(default_factory=lambda: [1024, 2048, 4096])
    samples_per_length: int = 3
    seed: int = 20261129

    name = "passkey"

    def __post_init__(self) -> None:
        if not self.lengths or any(n < 1 for n in self.lengths):
            raise ValueError(f"lengths must be positive token counts, got {self.lengths}")
        if self.samples_per_length < 1:
            raise ValueError(f"samples_per_length must be >= 1, got {self.samples_per_length}")

    def samples(self, tokenizer: PreTrainedTokenizerBase, chat_template: bool) -> list[Sample]:
        if chat_template:
            raise ValueError("the passkey check uses the raw completion prompt; run it without --chat-template")
        out = []
        for length in self.lengths:
            for i in range(self.samples_per_length):
                depth = (i + 0.5) / self.samples_per_length
                s = passkey_sample(tokenizer, length, depth=depth, seed=self.seed + 1000 * length + i)
                out.append(
                    Sample(
                        key=f"L{length}/{i}",
                        input_ids=s.input_ids,
                        references=[s.answer],
                        metric="passkey",
                        max_new_tokens=MAX_NEW_TOKENS,
                        meta={"task": "passkey", "length": length, "depth": depth, "index": i},
                    )
                )
        return out
