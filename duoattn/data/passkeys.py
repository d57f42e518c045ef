"""Multi-passkey samples for head identification.

A sample is long natural text (the haystack) with ``num_passkeys`` passkeys hidden at random depths, in order,
followed by one question-and-answer block per passkey. Each passkey is ``passkey_words`` NATO-alphabet words.
Answering needs the whole context, so the hidden states at the question-and-answer tokens (the loss positions)
change when a head that reads far back loses its view: that is what identification measures.

Samples are built from token ids of separately tokenised pieces (haystack sentences, needle and question
templates, passkey words), so every position is known exactly: the passkey spans and the loss positions are
recorded, not searched for. Sample ``k`` depends only on ``(seed, k)``, so a run can be resumed at any step.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from ..checks import check_int
from .haystack import split_sentences

NATO_WORDS = (
    "alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliett", "kilo", "lima",
    "mike", "november", "oscar", "papa", "quebec", "romeo", "sierra", "tango", "uniform", "victor", "whiskey",
    "xray", "yankee", "zulu",
)  # fmt: skip

INTRO = "Below is a long text with passkeys hidden in it. Remember every passkey and the order they come in.\n\n"
NEEDLE_HEAD = "\n\nHere is the {ordinal} passkey, a sequence of words:"
NEEDLE_TAIL = ". Keep the {ordinal} passkey in mind.\n\n"
OUTRO = "\n\nThat was the whole text. Now the questions.\n\n"
QUESTION = "Question: what is the {ordinal} passkey in the text?\nAnswer: the {ordinal} passkey is"
ANSWER_TAIL = ".\n\n"
LOSS_POSITIONS = ("qa", "answers")


def ordinal(k: int) -> str:
    """1 -> "1st", 2 -> "2nd", 11 -> "11th", 23 -> "23rd"."""
    suffix = "th" if 10 <= k % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(k % 10, "th")
    return f"{k}{suffix}"


@dataclass(frozen=True)
class PasskeyConfig:
    """How multi-passkey samples are drawn.

    Attributes:
        num_passkeys: passkeys per sample (and question-and-answer blocks).
        passkey_words: NATO-alphabet words per passkey.
        min_len, max_len: sample lengths in tokens are drawn uniformly from ``[min_len, max_len]``.
        min_depth, max_depth: passkey depths (fractions of the haystack) are drawn uniformly from this range.
        loss: the loss positions of a sample: ``qa`` (every token of the question-and-answer blocks, as the
            original) or ``answers`` (the positions whose next token is a passkey word's, or the one after it).
    """

    num_passkeys: int = 4
    passkey_words: int = 8
    min_len: int = 1024
    max_len: int = 2048
    min_depth: float = 0.05
    max_depth: float = 0.95
    loss: str = "qa"

    def __post_init__(self) -> None:
        if self.loss not in LOSS_POSITIONS:
            raise ValueError(f"loss must be one of {LOSS_POSITIONS}, got {self.loss!r}")
        for name in ("num_passkeys", "passkey_words", "min_len", "max_len"):
            check_int(name, getattr(self, name), 1)
        if self.min_len > self.max_len:
            raise ValueError(f"min_len ({self.min_len}) must not exceed max_len ({self.max_len})")
        if not 0.0 <= self.min_depth <= self.max_depth <= 1.0:
            raise ValueError(
                f"depths must satisfy 0 <= min_depth <= max_depth <= 1, got {self.min_depth}, {self.max_depth}"
            )


@dataclass(frozen=True)
class PasskeySample:
    """One training sample.

    Attributes:
        input_ids: long ``[T]``.
        passkeys: the passkeys, each ``passkey_words`` space-separated words, in the order they appear.
        passkey_spans: per passkey, the token range ``[start, end)`` of its words inside its needle.
        qa_spans: per passkey, the token range ``[start, end)`` of its question-and-answer block.
        answer_spans: per passkey, the token range ``[start, end)`` of the passkey's words in its answer.
        depths: per passkey, where its needle starts, as a fraction of the haystack tokens.
        loss: which positions :attr:`loss_positions` gives (:class:`PasskeyConfig`).
    """

    input_ids: torch.Tensor
    passkeys: tuple[str, ...]
    passkey_spans: tuple[tuple[int, int], ...]
    qa_spans: tuple[tuple[int, int], ...]
    depths: tuple[float, ...]
    answer_spans: tuple[tuple[int, int], ...] = ()
    loss: str = "qa"

    @property
    def length(self) -> int:
        return int(self.input_ids.numel())

    @property
    def loss_positions(self) -> torch.Tensor:
        """Long ``[N]``: every token of every question-and-answer block (``qa``), or for every answer ``[a, b)``
        the positions ``a - 1 .. b - 1``, whose hidden states predict the passkey's tokens and the one after it
        (``answers``)."""
        if self.loss == "answers":
            return torch.cat([torch.arange(a - 1, b) for a, b in self.answer_spans])
        return torch.cat([torch.arange(a, b) for a, b in self.qa_spans])


class PasskeyDataset:
    """Seeded multi-passkey samples on a haystack text.

    Args:
        tokenizer: called as ``tokenizer(list_of_texts, add_special_tokens=...)["input_ids"]``.
        text: the haystack; it must hold at least ``config.max_len`` tokens (no text is repeated in a sample).
        config: lengths, depths and passkey sizes.
        seed: sample ``k`` is a function of ``(seed, k)`` only.
        fit_min_len: raise a ``min_len`` too short for the passkeys to the least they need (``self.config`` then
            holds it) instead of refusing it.
    """

    def __init__(self, tokenizer: Any, text: str, config: PasskeyConfig, seed: int, fit_min_len: bool = False):
        self.config = config
        self.seed = int(seed)
        sentences = [s.strip() for s in split_sentences(text)]
        sentences = [s for s in sentences if s]
        if not sentences:
            raise ValueError("the haystack text is empty")
        # A leading space per sentence: word-level pre-tokenisers then see the same words as in running text.
        self._sentences = _tokenize(tokenizer, [" " + s for s in sentences])
        self._offsets = np.cumsum([0] + [len(s) for s in self._sentences])
        total = int(self._offsets[-1])
        if total < config.max_len:
            raise ValueError(
                f"the haystack is too short: it holds {total} tokens, but samples of max_len={config.max_len} "
                "tokens need at least that many (give more or longer --haystack files, or lower --max-len)"
            )
        self._intro = _tokenize(tokenizer, [INTRO], add_special_tokens=True)[0]
        self._outro = _tokenize(tokenizer, [OUTRO])[0]
        self._answer_tail = _tokenize(tokenizer, [ANSWER_TAIL])[0]
        self._words = _tokenize(tokenizer, [" " + w for w in NATO_WORDS])
        n = config.num_passkeys
        ords = [ordinal(k + 1) for k in range(n)]
        self._needle_heads = _tokenize(tokenizer, [NEEDLE_HEAD.format(ordinal=o) for o in ords])
        self._needle_tails = _tokenize(tokenizer, [NEEDLE_TAIL.format(ordinal=o) for o in ords])
        self._questions = _tokenize(tokenizer, [QUESTION.format(ordinal=o) for o in ords])
        fixed = self.max_fixed_tokens()
        if fit_min_len and config.min_len < 2 * fixed <= config.max_len:
            self.config = config = replace(config, min_len=2 * fixed)
        if config.min_len < 2 * fixed:
            raise ValueError(
                f"min_len={config.min_len} is too short: the introduction, {n} needles and {n} questions take up to "
                f"{fixed} tokens, and the haystack must be at least as long (min_len >= {2 * fixed}); "
                "raise --min-len or use fewer or shorter passkeys"
            )

    def max_fixed_tokens(self) -> int:
        """The most tokens a sample spends outside the haystack (its passkeys drawn with the longest words)."""
        longest_key = self.config.passkey_words * max(len(w) for w in self._words)
        per_key = [
            len(h) + len(t) + len(q) + len(self._answer_tail) + 2 * longest_key
            for h, t, q in zip(self._needle_heads, self._needle_tails, self._questions)
        ]
        return len(self._intro) + len(self._outro) + sum(per_key)

    def sample(self, index: int, length: int | None = None) -> PasskeySample:
        """Sample number ``index`` (any non-negative integer); ``length`` replaces its drawn length (the other
        draws stay those of ``index``), for samples of chosen lengths in ``[min_len, max_len]``."""
        cfg = self.config
        rng = np.random.default_rng([self.seed, int(index)])
        drawn = int(rng.integers(cfg.min_len, cfg.max_len + 1))
        if length is None:
            length = drawn
        elif not cfg.min_len <= length <= cfg.max_len:
            raise ValueError(f"length must be in [min_len, max_len] = [{cfg.min_len}, {cfg.max_len}], got {length}")
        keys = rng.integers(0, len(NATO_WORDS), size=(cfg.num_passkeys, cfg.passkey_words))
        depths = np.sort(rng.uniform(cfg.min_depth, cfg.max_depth, size=cfg.num_passkeys))
        start = int(rng.integers(0, len(self._sentences)))

        key_tokens = [[t for w in key for t in self._words[w]] for key in keys]
        fixed = len(self._intro) + len(self._outro) + sum(
            len(h) + len(t) + len(q) + len(self._answer_tail) + 2 * len(k)
            for h, t, q, k in zip(self._needle_heads, self._needle_tails, self._questions, key_tokens)
        )
        hay, bounds = self._haystack(start, length - fixed)
        # Needles go between sentences: at the sentence boundary nearest to each drawn depth.
        cuts = [bounds[_nearest(bounds, d * len(hay))] for d in depths]

        ids = list(self._intro)
        spans, prev = [], 0
        for cut, head, key, tail in zip(cuts, self._needle_heads, key_tokens, self._needle_tails):
            ids += hay[prev:cut] + head
            spans.append((len(ids), len(ids) + len(key)))
            ids += key + tail
            prev = cut
        ids += hay[prev:] + self._outro
        qa_spans, answer_spans = [], []
        for question, key in zip(self._questions, key_tokens):
            begin = len(ids)
            answer_spans.append((begin + len(question), begin + len(question) + len(key)))
            ids += question + key + self._answer_tail
            qa_spans.append((begin, len(ids)))
        assert len(ids) == length
        return PasskeySample(
            input_ids=torch.tensor(ids, dtype=torch.long),
            passkeys=tuple(" ".join(NATO_WORDS[w] for w in key) for key in keys),
            passkey_spans=tuple(spans),
            qa_spans=tuple(qa_spans),
            depths=tuple(c / len(hay) for c in cuts),
            answer_spans=tuple(answer_spans),
            loss=cfg.loss,
        )

    def _haystack(self, start: int, budget: int) -> tuple[list[int], list[int]]:
        """``budget`` tokens of consecutive sentences from sentence ``start`` on (wrapping around to the first)
        and the token offsets of the sentence boundaries in them (0 and ``budget`` included)."""
        tokens: list[int] = []
        bounds = [0]
        i = start
        while len(tokens) < budget:
            tokens += self._sentences[i % len(self._sentences)]
            bounds.append(min(len(tokens), budget))
            i += 1
        return tokens[:budget], bounds


def _tokenize(tokenizer: Any, texts: Sequence[str], add_special_tokens: bool = False) -> list[list[int]]:
    return [list(ids) for ids in tokenizer(list(texts), add_special_tokens=add_special_tokens)["input_ids"]]


def _nearest(sorted_values: Sequence[int], x: float) -> int:
    """Index of the value of ``sorted_values`` nearest to ``x`` (the lower one on a tie)."""
    i = bisect.bisect_left(sorted_values, x)
    if i == 0:
        return 0
    if i == len(sorted_values) or x - sorted_values[i - 1] <= sorted_values[i] - x:
        return i - 1
    return i
