"""RULER (Hsieh et al., 2024) synthetic tasks, generated locally in RULER's own formats and scored with its string
match. The task table is RULER's ``synthetic.yaml``; each family lives in its own module."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

from tqdm import tqdm
from transformers import PreTrainedTokenizerBase

from ..prompts import Sample
from . import common_words, freq_words, niah, qa, variable_tracking
from .request import PromptRequest


@dataclass(frozen=True)
class TaskSpec:
    family: ModuleType  # a module with ``generate(request, **params)`` and ``TOKENS_TO_GENERATE``
    metric: str
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def generate(self) -> Callable[..., tuple[list[int], list[str], dict]]:
        return self.family.generate


def _niah(haystack: str, type_k: str, type_v: str, k: int = 1, v: int = 1, q: int = 1) -> TaskSpec:
    params = dict(haystack=haystack, type_k=type_k, type_v=type_v, num_k=k, num_v=v, num_q=q)
    return TaskSpec(niah, "string_match_all", params)


TASKS: dict[str, TaskSpec] = {
    "niah_single_1": _niah("repeat", "words", "numbers"),
    "niah_single_2": _niah("essay", "words", "numbers"),
    "niah_single_3": _niah("essay", "words", "uuids"),
    "niah_multikey_1": _niah("essay", "words", "numbers", k=4),
    "niah_multikey_2": _niah("needle", "words", "numbers"),
    "niah_multikey_3": _niah("needle", "uuids", "uuids"),
    "niah_multivalue": _niah("essay", "words", "numbers", v=4),
    "niah_multiquery": _niah("essay", "words", "numbers", q=4),
    "vt": TaskSpec(variable_tracking, "string_match_all", {"num_chains": 1, "num_hops": 4}),
    "cwe": TaskSpec(common_words, "string_match_all", {"freq_common": 30, "freq_other": 3, "num_common": 10}),
    "fwe": TaskSpec(freq_words, "string_match_all", {"alpha": 2.0}),
    "qa_1": TaskSpec(qa, "string_match_part", {"dataset": "squad"}),
    "qa_2": TaskSpec(qa, "string_match_part", {"dataset": "hotpotqa"}),
}
NIAH_TASKS = [name for name in TASKS if name.startswith("niah")]
DEFAULT_TASKS = [*NIAH_TASKS, "vt", "cwe", "fwe", "qa_1"]


@dataclass
class RulerTask:
    """RULER tasks at chosen lengths.

    Attributes:
        tasks: names from :data:`TASKS`.
        lengths: total tokens per prompt, the task's generation budget included (RULER's ``max_seq_length``).
        samples_per_task: prompts per task and length.
        seed: seeds every draw; sample ``i`` of a task at a length is the same in every run with this seed.
    """

    tasks: list[str] = field(default_factory=lambda: list(DEFAULT_TASKS))
    lengths: list[int] = field(default_factory=lambda: [2048, 4096])
    samples_per_task: int = 5
    seed: int = 42

    name = "ruler"

    def __post_init__(self) -> None:
        unknown = [t for t in self.tasks if t not in TASKS]
        if unknown or not self.tasks:
            raise ValueError(f"unknown RULER tasks {unknown or '(none given)'}; choose from {', '.join(TASKS)}")
        if not self.lengths or any(n < 1 for n in self.lengths):
            raise ValueError(f"lengths must be positive token counts, got {self.lengths}")
        if self.samples_per_task < 1:
            raise ValueError(f"samples_per_task must be >= 1, got {self.samples_per_task}")

    def samples(self, tokenizer: PreTrainedTokenizerBase, chat_template: bool) -> list[Sample]:
        out = []
        total = len(self.tasks) * len(self.lengths) * self.samples_per_task
        progress = tqdm(total=total, desc="prompts", unit="prompt")
        for task in self.tasks:
            spec = TASKS[task]
            budget_new = spec.family.TOKENS_TO_GENERATE
            for length in self.lengths:
                for i in range(self.samples_per_task):
                    request = PromptRequest(
                        tokenizer,
                        length=length,
                        budget=length - budget_new,
                        task_key=f"{self.seed}/{task}",
                        sample_key=f"{self.seed}/{task}/{length}/{i}",
                        index=i,
                        chat_template=chat_template,
                    )
                    ids, refs, meta = spec.generate(request, **spec.params)
                    out.append(
                        Sample(
                            key=f"{task}/L{length}/{i}",
                            input_ids=ids,
                            references=refs,
                            metric=spec.metric,
                            max_new_tokens=budget_new,
                            meta={"task": task, "length": length, "index": i, **meta},
                        )
                    )
                    progress.update()
        progress.close()
        return out
