"""RULER's question answering: a SQuAD (qa_1) or HotpotQA (qa_2) question over its gold paragraphs hidden among
distractor paragraphs.

Task format as in RULER (``qa.py``): sample ``i`` asks question ``i`` of the dataset; distractors are first the
other paragraphs of the same article, then random paragraphs; all are shuffled and numbered "Document k".
"""

from __future__ import annotations

import random

from .data import qa_dataset
from .request import PromptRequest

TOKENS_TO_GENERATE = 32
DOCUMENT = "Document {i}:\n{document}"
TEMPLATE = (
    "Answer the question based on the given documents. Only give me the answer and do not output any other words."
    "\n\nThe following are given documents.\n\n{context}\n\nAnswer the question based on the given documents. "
    "Only give me the answer and do not output any other words.\n\nQuestion: {query}"
)
ANSWER_PREFIX = " Answer:"


def generate(request: PromptRequest, dataset: str = "squad") -> tuple[list[int], list[str], dict]:
    """A prompt of at most ``request.budget`` tokens; ``(input_ids, references, meta)``."""
    questions, docs = qa_dataset(dataset)
    if request.index >= len(questions):
        raise ValueError(
            f"{dataset} has {len(questions)} questions; sample index {request.index} is out of range"
        )
    question = questions[request.index]
    gold = list(dict.fromkeys(question["gold"]))
    rng = random.Random(request.sample_key)
    related = [i for i in question["related"] if i not in gold]
    rng.shuffle(related)
    taken = set(gold) | set(related)
    others = [i for i in range(len(docs)) if i not in taken]
    rng.shuffle(others)
    # A prefix of this order is a uniform draw of distractors in RULER's preference order, and grows with n.
    order = gold + related + others

    def build(n: int) -> tuple[list[int], list[str]]:
        chosen = order[:n]
        random.Random(f"{request.sample_key}/{n}").shuffle(chosen)
        context = "\n\n".join(DOCUMENT.format(i=k + 1, document=docs[d]) for k, d in enumerate(chosen))
        body = TEMPLATE.format(context=context, query=question["query"])
        return request.encode(body, ANSWER_PREFIX), question["answers"]

    n, ids, refs = request.fit(build, len(gold), len(order), what=f"{dataset} QA prompt")
    return ids, refs, {"documents": n, "question": question["query"]}
