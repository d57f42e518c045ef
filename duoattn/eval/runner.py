"""The cell loop: for each method, for each prompt, generate on the deployment path, score, record.

Each method is applied once (``Method.applied``: the same ``duo_attention`` context a deployment uses) and
every prompt runs through ``model.generate`` under it. Cells already in the store are skipped, so an
interrupted run continues where it stopped.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from tqdm import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..pattern import HeadPattern
from .generation import GenerationSettings, generate_answer
from .methods import Method
from .prompts import Sample
from .scoring import score
from .store import ResultStore


def settings_for(
    sample: Sample, cap: int | None, prefill_chunk_size: int | None, chat_template: bool
) -> GenerationSettings:
    """The sample's own generation budget, capped by the run's ``max_new_tokens`` if one is set."""
    budget = sample.max_new_tokens if cap is None else min(cap, sample.max_new_tokens)
    return GenerationSettings(max_new_tokens=budget, prefill_chunk_size=prefill_chunk_size, chat_template=chat_template)


def run_cells(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    methods: Sequence[Method],
    samples: Sequence[Sample],
    store: ResultStore,
    learned: HeadPattern | None,
    sink: int,
    recent: int,
    max_new_tokens: int | None = None,
    prefill_chunk_size: int | None = None,
    chat_template: bool = False,
    after_method: Callable[[Method], None] | None = None,
) -> None:
    """Score every (method, sample) cell not yet in ``store``, appending each as soon as it is done."""
    total = len(methods) * len(samples)
    left = {m.name: [s for s in samples if not store.done(m.name, s.key)] for m in methods}
    progress = tqdm(total=total, initial=total - sum(map(len, left.values())), desc="eval", unit="cell")
    try:
        for method in methods:
            if not left[method.name]:
                continue
            progress.set_postfix_str(method.name)
            with method.applied(model, learned, sink, recent) as handle:
                ratio = 1.0 if handle is None else handle.retrieval_ratio
                for sample in left[method.name]:
                    settings = settings_for(sample, max_new_tokens, prefill_chunk_size, chat_template)
                    start = time.perf_counter()
                    text, kv_bytes = generate_answer(model, tokenizer, sample.input_ids, settings)
                    seconds = time.perf_counter() - start
                    store.append({
                        "method": method.name,
                        "label": method.label,
                        "kind": method.kind,
                        "sparsity": method.sparsity,
                        "seed": method.seed if method.kind == "random" else None,
                        "kv_bits": method.kv_bits,
                        "prefill": method.prefill,
                        "retrieval_ratio": ratio,
                        "sample": sample.key,
                        **sample.meta,
                        "prompt_tokens": len(sample.input_ids),
                        "max_new_tokens": settings.max_new_tokens,
                        "prediction": text,
                        "references": sample.references,
                        "metric": sample.metric,
                        "score": score(sample.metric, text, sample.references),
                        "kv_bytes": kv_bytes,
                        "seconds": round(seconds, 4),
                    })
                    progress.update()
            if after_method is not None:
                after_method(method)
    finally:
        progress.close()
