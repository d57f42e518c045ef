"""Needle in a haystack: one sentence hidden at a chosen depth of long natural text, asked about at the end.

The prompt follows the DuoAttention needle evaluation: the haystack is wrapped as a "very long story book", the
question comes after it, and the answer is primed with ``answer_prefix``. The needle goes between two
sentences, never inside one. A cell's score is the fraction of the answer's words the model recovers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tqdm import tqdm
from transformers import PreTrainedTokenizerBase

from ..data.haystack import load_haystack, split_sentences
from .prompts import Sample, encode_prompt, fit_units
from .scoring import words

NEEDLE = "The best thing to do in San Francisco is eat a sandwich and sit in Dolores Park on a sunny day."
QUESTION = "Based on the content of the book, what is the best thing to do in San Francisco?"
ANSWER = "eat a sandwich and sit in Dolores Park on a sunny day"
ANSWER_PREFIX = "The best thing to do in San Francisco is"
MAX_NEW_TOKENS = 32
BOOK = "This is a very long story book: <book> {context} </book>.\n\nQuestion: {question}"


@dataclass
class NiahTask:
    """The needle-in-a-haystack grid.

    Attributes:
        lengths: total tokens per prompt (prompt + ``MAX_NEW_TOKENS``), the x axis of the heatmap.
        depths: where the needle sits, 0 = first sentence, 1 = last; the y axis.
        needle, question: the hidden sentence and the question about it.
        answer: the words a correct answer contains (each must occur in the needle); scored by word recall.
        answer_prefix: the start of the answer, after ``"Answer: "`` (raw prompt) or in the assistant turn.
        haystack: text files to use instead of Paul Graham's essays (``"essays"`` among them adds the essays).
    """

    lengths: list[int] = field(default_factory=lambda: [1024, 2048, 4096, 8192])
    depths: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    needle: str = NEEDLE
    question: str = QUESTION
    answer: str = ANSWER
    answer_prefix: str = ANSWER_PREFIX
    haystack: list[str] | None = None

    name = "niah"

    def __post_init__(self) -> None:
        if not self.lengths or any(n < 1 for n in self.lengths):
            raise ValueError(f"lengths must be positive token counts, got {self.lengths}")
        if not self.depths or any(not 0.0 <= d <= 1.0 for d in self.depths):
            raise ValueError(f"depths must be in [0, 1], got {self.depths}")
        self.depths = [float(d) for d in self.depths]
        for name in ("needle", "question", "answer"):
            if not getattr(self, name).strip():
                raise ValueError(f"{name} must not be empty")
        missing = words(self.answer) - words(self.needle)
        if missing:
            raise ValueError(f"answer words {sorted(missing)} do not occur in the needle {self.needle!r}")

    def samples(self, tokenizer: PreTrainedTokenizerBase, chat_template: bool) -> list[Sample]:
        text = load_haystack(self.haystack or ())
        sentences = [s.strip() for s in split_sentences(text) if s.strip()]
        cells = [(length, depth) for length in self.lengths for depth in self.depths]
        return [
            self._sample(tokenizer, sentences, length, depth, chat_template)
            for length, depth in tqdm(cells, desc="prompts", unit="prompt")
        ]

    def _sample(
        self, tokenizer: PreTrainedTokenizerBase, sentences: list[str], length: int, depth: float, chat_template: bool
    ) -> Sample:
        prefix = self.answer_prefix if chat_template else "\n\nAnswer: " + self.answer_prefix

        def build(n: int) -> list[int]:
            cut = round(depth * n)
            context = " ".join(sentences[:cut] + [self.needle.strip()] + sentences[cut:n])
            body = BOOK.format(context=context, question=self.question)
            return encode_prompt(tokenizer, body, prefix, chat_template), None

        n, ids, _ = fit_units(build, length - MAX_NEW_TOKENS, 0, len(sentences), what=f"needle prompt at {length}")
        return Sample(
            key=f"L{length}/D{depth:g}",
            input_ids=ids,
            references=[self.answer],
            metric="word_recall",
            max_new_tokens=MAX_NEW_TOKENS,
            meta={"task": "niah", "length": length, "depth": depth, "haystack_sentences": n},
        )
