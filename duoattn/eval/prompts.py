"""Prompts as the harness sees them: token ids of a target length, the references and the metric that scores
the answer.

Every task builds its text from a number of "units" (haystack sentences, essay words, noise lines, documents,
list words) and :func:`fit_units` finds the largest count whose prompt, plus the tokens the task may generate,
fits the target length, measured with the model's own tokenizer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from transformers import PreTrainedTokenizerBase

T = TypeVar("T")


@dataclass(frozen=True)
class Sample:
    """One prompt of a task.

    Attributes:
        key: unique within a run (e.g. ``"niah_single_1/L4096/3"``); results are stored and resumed under it.
        input_ids: the whole prompt, special tokens included.
        references: the strings the metric looks for in the answer.
        metric: a name in :data:`duoattn.eval.scoring.METRICS`.
        max_new_tokens: the task's own generation budget (the run may cap it).
        meta: what the plots and tables group by: ``task``, ``length`` and, per task, ``depth`` or ``index``.
    """

    key: str
    input_ids: list[int]
    references: list[str]
    metric: str
    max_new_tokens: int
    meta: dict[str, Any] = field(default_factory=dict)


def encode_prompt(tokenizer: PreTrainedTokenizerBase, body: str, answer_prefix: str, chat_template: bool) -> list[int]:
    """Token ids of ``body`` followed by ``answer_prefix``, the start of the answer the model continues.

    With ``chat_template`` the body is the user turn and the answer prefix opens the assistant turn; otherwise
    the text is a raw completion prompt (the tokenizer adds its usual special tokens, e.g. a BOS).
    """
    if not chat_template:
        return tokenizer(body + answer_prefix).input_ids
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("chat_template=True but the tokenizer has no chat template; use the raw prompt")
    messages = [{"role": "user", "content": body}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text + answer_prefix.lstrip(), add_special_tokens=False).input_ids


def fit_units(
    build: Callable[[int], tuple[list[int], T]], budget: int, lo: int, hi: int, what: str = "prompt"
) -> tuple[int, list[int], T]:
    """The largest ``n`` in ``[lo, hi]`` whose prompt ``build(n) = (ids, extra)`` has at most ``budget`` tokens.

    Returns ``(n, ids, extra)``. Gallops from ``lo`` then bisects, so the texts tokenised stay near the budget
    even when ``hi`` is huge. ``build`` must be deterministic in ``n`` (``extra`` carries what else depends on
    it, e.g. the references); a token count that is not monotone in ``n`` only makes ``n`` a little smaller than
    it could be: the prompt returned always fits.
    """
    best_ids, best_extra = build(lo)
    if len(best_ids) > budget:
        raise ValueError(
            f"the {what} needs {len(best_ids)} tokens with the fewest units ({lo}), more than the {budget} "
            "available: choose a longer length"
        )
    best, bad, step = lo, hi + 1, 1
    while best < hi:  # gallop: best fits, try best + step
        n = min(best + step, hi)
        ids, extra = build(n)
        if len(ids) > budget:
            bad = n
            break
        best, best_ids, best_extra, step = n, ids, extra, step * 2
    while bad - best > 1:  # bisect between a fitting and a failing count
        mid = (best + bad) // 2
        ids, extra = build(mid)
        if len(ids) <= budget:
            best, best_ids, best_extra = mid, ids, extra
        else:
            bad = mid
    return best, best_ids, best_extra
