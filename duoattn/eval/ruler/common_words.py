"""RULER's common words extraction: a long numbered word list in which ten words recur often; name those ten.

Task format as in RULER (``common_words_extraction.py``): English nouns, adjectives and verbs; common words
appear 30 times and the others 3 times (6 and 1 below 4K tokens), after one solved example of the same task.
"""

from __future__ import annotations

import random

from .data import word_list
from .request import PromptRequest

TOKENS_TO_GENERATE = 120
TEMPLATE = (
    "Below is a numbered list of words. In these words, some appear more often than others. Memorize the ones "
    "that appear most often.\n{context}\nQuestion: What are the 10 most common words in the above list?"
)
ANSWER_PREFIX = " Answer: The top 10 words that appear most often in the list are:"


def _numbered(words: list[str]) -> str:
    return " ".join(f"{i + 1}. {w}" for i, w in enumerate(words))


def _word_list(rng: random.Random, vocabulary: list[str], num_words: int, common_repeats: int, other_repeats: int,
               num_common: int) -> tuple[str, list[str]]:
    """A numbered list of ``num_words`` distinct words, the first ``num_common`` of them repeated more."""
    chosen = rng.sample(vocabulary, num_words)
    common, others = chosen[:num_common], chosen[num_common:]
    items = common * common_repeats + others * other_repeats
    rng.shuffle(items)
    return _numbered(items), common


def generate(
    request: PromptRequest, freq_common: int = 30, freq_other: int = 3, num_common: int = 10
) -> tuple[list[int], list[str], dict]:
    """A prompt of at most ``request.budget`` tokens; ``(input_ids, references, meta)``."""
    vocabulary = sorted({*word_list("nouns"), *word_list("adjectives"), *word_list("verbs")})
    random.Random(request.task_key).shuffle(vocabulary)
    if request.length < 4096:  # RULER's short-context setting
        example_args, freqs = (20, 3, 1), (6, 1)
    else:
        example_args, freqs = (40, 10, 3), (freq_common, freq_other)

    def build(n: int) -> tuple[list[int], list[str]]:
        rng = random.Random(request.sample_key)
        example, example_answer = _word_list(rng, vocabulary, *example_args, num_common)
        context, answer = _word_list(rng, vocabulary, n, *freqs, num_common)
        solved = TEMPLATE.format(context=example) + ANSWER_PREFIX + _numbered(example_answer)
        return request.encode(solved + "\n" + TEMPLATE.format(context=context), ANSWER_PREFIX), answer

    n, ids, refs = request.fit(build, num_common, len(vocabulary), what="common-words prompt")
    return ids, refs, {"list_words": n}
