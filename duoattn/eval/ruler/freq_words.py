"""RULER's frequent words extraction: coded words drawn from a Zipf law; name the three most frequent ones.

Task format as in RULER (``freq_words_extraction.py``): random 6-letter words, ``length // 50`` of them, the
word of rank k appearing ``floor(N k^-alpha / zeta(alpha))`` times; the top-ranked word is ``...`` (noise the
question says to ignore), so the answer is the words of ranks 2 to 4.
"""

from __future__ import annotations

import math
import random
import string

from .request import PromptRequest

TOKENS_TO_GENERATE = 50
TEMPLATE = (
    "Read the following coded text and track the frequency of each coded word. Find the three most frequently "
    "appeared coded words. {context}\nQuestion: Do not provide any explanation. Please ignore the dots '....'. "
    "What are the three most frequently appeared words in the above coded text?"
)
ANSWER_PREFIX = " Answer: According to the coded text above, the three most frequently appeared words are:"


def zeta(alpha: float, terms: int = 10_000) -> float:
    """Riemann zeta for ``alpha > 1``: a partial sum plus its Euler-Maclaurin tail (error far below 1e-12)."""
    if not alpha > 1.0:
        raise ValueError(f"zeta needs alpha > 1, got {alpha}")
    head = math.fsum(k**-alpha for k in range(1, terms))
    n = float(terms)
    tail = n ** (1 - alpha) / (alpha - 1) + n**-alpha / 2 + alpha * n ** (-alpha - 1) / 12
    return head + tail


def zipf_counts(num_words: int, vocab_size: int, alpha: float) -> list[int]:
    """How often the word of each rank 1..vocab_size appears among about ``num_words`` words."""
    z = zeta(alpha)
    return [int(num_words * k**-alpha / z) for k in range(1, vocab_size + 1)]


def coded_vocabulary(rng: random.Random, size: int, letters: int) -> list[str]:
    vocab: set[str] = set()
    while len(vocab) < size:
        vocab.add("".join(rng.choices(string.ascii_lowercase, k=letters)))
    words = sorted(vocab)
    rng.shuffle(words)
    words[0] = "..."  # the most frequent "word" is noise
    return words


def generate(request: PromptRequest, alpha: float = 2.0, letters: int = 6) -> tuple[list[int], list[str], dict]:
    """A prompt of at most ``request.budget`` tokens; ``(input_ids, references, meta)``."""
    vocab = coded_vocabulary(random.Random(request.sample_key), max(4, request.length // 50), letters)

    def build(n: int) -> tuple[list[int], list[str]]:
        text = [w for w, count in zip(vocab, zipf_counts(n, len(vocab), alpha)) for _ in range(count)]
        random.Random(request.sample_key + "/order").shuffle(text)
        body = TEMPLATE.format(context=" ".join(text))
        return request.encode(body, ANSWER_PREFIX), vocab[1:4]

    n, ids, refs = request.fit(build, 0, 2 * request.length, what="frequent-words prompt")
    return ids, refs, {"words": n}
