"""RULER's variable tracking: a chain ``VAR A = 12345``, ``VAR B = VAR A``, ... hidden in noise; name every
variable that holds the value.

Task format as in RULER (``variable_tracking.py``): 5-letter variable names, one chain of 4 hops, noise lines,
and one solved example (3-letter names, a 500-token prompt) placed before the question, its answer names
re-drawn for every sample.
"""

from __future__ import annotations

import random
import re
import string

from transformers import PreTrainedTokenizerBase

from ..prompts import fit_units
from .request import PromptRequest

TOKENS_TO_GENERATE = 30
NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.\n"
TEMPLATE = (
    "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n{context}\n"
    "Question: Find all variables that are assigned the value {query} in the text above."
)
# "assgined" is RULER's spelling; kept so that prompts are RULER's own.
ANSWER_PREFIX = (
    " Answer: According to the chain(s) of variable assignment in the text above, {num_v} variables are assgined "
    "the value {query}, they are: "
)
EXAMPLE_LENGTH = 500


def _names(rng: random.Random, count: int, letters: int) -> list[str]:
    names: list[str] = []
    while len(names) < count:  # distinct, so that a chain never names one variable twice
        name = "".join(rng.choices(string.ascii_uppercase, k=letters))
        if name not in names:
            names.append(name)
    return names


def _chains(
    rng: random.Random, num_chains: int, num_hops: int, letters: int
) -> tuple[list[list[str]], list[list[str]]]:
    """``(names, statements)`` per chain: ``VAR A = 12345``, ``VAR B = VAR A``, ..."""
    names = _names(rng, num_chains * (num_hops + 1), letters)
    groups = [names[i : i + num_hops + 1] for i in range(0, len(names), num_hops + 1)]
    chains = []
    for group in groups:
        chain = [f"VAR {group[0]} = {rng.randint(10000, 99998)}"]
        chain += [f"VAR {group[j + 1]} = VAR {group[j]} " for j in range(num_hops)]
        chains.append(chain)
    return groups, chains


def _task_text(rng: random.Random, n: int, chains: list[list[str]], num_hops: int) -> tuple[str, str]:
    """``(question, answer prefix)`` with the chains inserted in order among ``n`` noise lines."""
    lines = [NOISE] * n
    for chain in chains:
        positions = sorted(rng.sample(range(len(lines)), len(chain)))
        for offset, (position, statement) in enumerate(zip(positions, chain)):
            lines.insert(position + offset, statement)
    context = " ".join(lines).replace(". \n", ".\n")
    value = chains[0][0].split("=")[-1].strip()
    return TEMPLATE.format(context=context, query=value), ANSWER_PREFIX.format(num_v=num_hops + 1, query=value)


def solved_example(
    tokenizer: PreTrainedTokenizerBase, rng_key: str, num_chains: int, num_hops: int
) -> tuple[str, list[str]]:
    """RULER's in-context example: a short solved instance (raw text ending in two new lines) and its answer."""
    budget = EXAMPLE_LENGTH - TOKENS_TO_GENERATE

    def build(n: int) -> tuple[list[int], tuple[str, list[str]]]:
        rng = random.Random(rng_key)
        groups, chains = _chains(rng, num_chains, num_hops, letters=3)
        question, prefix = _task_text(rng, n, chains, num_hops)
        text = question + prefix + " " + " ".join(groups[0]) + "\n\n"
        return tokenizer(text, add_special_tokens=False).input_ids, (text, groups[0])

    _, _, example = fit_units(build, budget, num_hops + 1, budget, what="variable-tracking example")
    return example


def _redraw(example: str, answer: list[str], rng: random.Random) -> str:
    """The example with its answer's names replaced by fresh random ones (RULER's ``randomize_icl``)."""
    for name in answer:
        fresh = "".join(rng.choices(string.ascii_uppercase, k=len(name)))
        example = re.sub(rf"\b{name}\b", fresh, example)
    return example


def generate(request: PromptRequest, num_chains: int = 1, num_hops: int = 4) -> tuple[list[int], list[str], dict]:
    """A prompt of at most ``request.budget`` tokens; returns ``(input_ids, references, meta)``.

    ``request.task_key`` seeds what all samples of the task share (the solved example), ``request.sample_key``
    the rest.
    """
    example, answer = solved_example(request.tokenizer, request.task_key + "/example", num_chains, num_hops)
    shown = _redraw(example, answer, random.Random(request.sample_key + "/redraw"))

    def build(n: int) -> tuple[list[int], list[str]]:
        rng = random.Random(request.sample_key)
        groups, chains = _chains(rng, num_chains, num_hops, letters=5)
        question, prefix = _task_text(rng, n, chains, num_hops)
        return request.encode(" " + shown + "\n\n" + question, prefix), groups[0]

    n, ids, refs = request.fit(
        build, num_chains * (num_hops + 1), request.budget, what="variable-tracking prompt"
    )
    return ids, refs, {"noise_lines": n}
