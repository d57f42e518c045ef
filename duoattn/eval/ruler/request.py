"""What a RULER family generates from: one sample of one task at one length, its seeds and its token budget.

Every family's ``generate(request, **params)`` builds its text from a number of units and sizes it with
:meth:`PromptRequest.fit`, which encodes with the run's tokenizer and prompt style.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from transformers import PreTrainedTokenizerBase

from ..prompts import encode_prompt, fit_units

T = TypeVar("T")


@dataclass(frozen=True)
class PromptRequest:
    """One sample to generate.

    Attributes:
        tokenizer: the model's tokenizer; prompt sizes are counted in its tokens.
        length: total tokens of the task (RULER's ``max_seq_length``), the generation budget included.
        budget: prompt tokens at most (``length`` minus the family's ``TOKENS_TO_GENERATE``).
        task_key: seeds what all samples of the task share.
        sample_key: seeds every other draw of this sample.
        index: the sample's number within its task and length.
        chat_template: the body is a user turn and the answer prefix opens the assistant turn; otherwise a raw
            completion prompt.
    """

    tokenizer: PreTrainedTokenizerBase
    length: int
    budget: int
    task_key: str
    sample_key: str
    index: int
    chat_template: bool

    def encode(self, body: str, answer_prefix: str) -> list[int]:
        """Token ids of ``body`` then ``answer_prefix`` in this request's prompt style."""
        return encode_prompt(self.tokenizer, body, answer_prefix, self.chat_template)

    def fit(
        self, build: Callable[[int], tuple[list[int], T]], lo: int, hi: int, what: str
    ) -> tuple[int, list[int], T]:
        """``(n, ids, extra)`` for the largest ``n`` in ``[lo, hi]`` whose ``build(n)`` fits :attr:`budget`."""
        return fit_units(build, self.budget, lo, hi, what=what)
