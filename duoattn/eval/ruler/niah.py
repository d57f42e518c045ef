"""RULER's needle-in-a-haystack family: "special magic" key-value needles in noise, essays or other needles.

Task format as in RULER (``niah.py`` and ``constants.py`` of nvidia-long-context-eval): the needle sentence, the
question and the answer prefix, the 40 insertion depths, 7-digit numbers, adjective-noun word keys and UUIDs.
"""

from __future__ import annotations

import random
import uuid

from ...data.haystack import split_sentences
from .data import essay_words, word_list
from .request import PromptRequest

TOKENS_TO_GENERATE = 128
NEEDLE = "One of the special magic {type_v} for {key} is: {value}."
TEMPLATE = (
    "Some special magic {type_v} are hidden within the following text. Make sure to memorize it. I will quiz you "
    "about the {type_v} afterwards.\n{context}\nWhat are all the special magic {type_v} for {query} mentioned in "
    "the provided text?"
)
ANSWER_PREFIX = " The special magic {type_v} for {query} mentioned in the provided text are"
NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
DEPTHS = [round(i * 100 / 39) for i in range(40)]  # percent; RULER's np.linspace(0, 100, 40) rounded
HAYSTACKS = ("repeat", "essay", "needle")
ITEM_TYPES = ("numbers", "words", "uuids")


def random_item(rng: random.Random, kind: str) -> str:
    if kind == "numbers":
        return str(rng.randint(1_000_000, 9_999_999))
    if kind == "words":  # a uniform adjective-noun pair, as RULER's list of all pairs
        return f"{rng.choice(word_list('adjectives'))}-{rng.choice(word_list('nouns'))}"
    if kind == "uuids":
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))
    raise ValueError(f"needle item type must be one of {ITEM_TYPES}, got {kind!r}")


def _singular(text: str) -> str:
    """RULER's wording for one key with one value."""
    return text.replace("Some", "A").replace("are all", "is").replace("are", "is").replace("answers", "answer")


def _context(rng: random.Random, haystack: str, n: int, needles: list[str], type_v: str, type_k: str) -> str:
    """``n`` haystack units (essay words, noise lines or distractor needles) with the needles inserted."""
    if haystack == "essay":
        sentences = [s.strip() for s in split_sentences(" ".join(essay_words()[:n]).strip())]
        cuts = sorted(int(len(sentences) * d / 100) for d in rng.sample(DEPTHS, len(needles)))
        bounds = [0, *cuts, len(sentences)]
        pieces = []
        for i in range(1, len(bounds)):
            pieces.append(" ".join(sentences[bounds[i - 1] : bounds[i]]))
            if i - 1 < len(needles):
                pieces.append(needles[i - 1])
        return " ".join(pieces)
    if haystack == "repeat":
        lines = [NOISE] * n
    else:
        lines = [
            NEEDLE.format(type_v=type_v, key=random_item(rng, type_k), value=random_item(rng, type_v))
            for _ in range(n)
        ]
    for index, needle in zip(sorted(rng.sample(range(n), len(needles)), reverse=True), needles):
        lines.insert(index, needle)
    return "\n".join(lines)


def generate(
    request: PromptRequest,
    haystack: str,
    type_k: str,
    type_v: str,
    num_k: int = 1,
    num_v: int = 1,
    num_q: int = 1,
) -> tuple[list[int], list[str], dict]:
    """A prompt of at most ``request.budget`` tokens; returns ``(input_ids, references, meta)``. All draws are
    seeded by ``request.sample_key``."""
    if haystack not in HAYSTACKS:
        raise ValueError(f"haystack must be one of {HAYSTACKS}, got {haystack!r}")
    num_k = max(num_k, num_q)

    def build(n: int) -> tuple[list[int], list[str]]:
        rng = random.Random(request.sample_key)
        keys, values, needles = [], [], []
        for _ in range(num_k):
            keys.append(random_item(rng, type_k))
            values.append([random_item(rng, type_v) for _ in range(num_v)])
            needles += [NEEDLE.format(type_v=type_v, key=keys[-1], value=v) for v in values[-1]]
        rng.shuffle(needles)
        context = _context(rng, haystack, n, needles, type_v, type_k)
        asked = rng.sample(range(num_k), num_q)
        queries = [keys[i] for i in asked]
        query = queries[0] if len(queries) == 1 else ", ".join(queries[:-1]) + ", and " + queries[-1]
        template, prefix, shown_v = TEMPLATE, ANSWER_PREFIX, type_v
        if num_q * num_v == 1:
            template, prefix, shown_v = _singular(template), _singular(prefix), type_v[:-1]
        body = template.format(type_v=shown_v, context=context, query=query)
        ids = request.encode(body, prefix.format(type_v=shown_v, query=query))
        return ids, [v for i in asked for v in values[i]]

    units = len(essay_words()) if haystack == "essay" else request.budget  # a noise line or needle is > 1 token
    lo = 1 if haystack == "essay" else num_k * num_v
    n, ids, refs = request.fit(build, lo, units, what=f"RULER niah prompt ({haystack} haystack)")
    return ids, refs, {"haystack_units": n}
