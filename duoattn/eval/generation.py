"""One greedy generation on the deployment path, returning the answer and the KV bytes the cache held."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from numbers import Integral

import torch
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase

from ..cache import cache_kv_bytes
from ..checks import UsageError
from ..deploy import cache_kwarg


@dataclass(frozen=True)
class GenerationSettings:
    """Greedy decoding settings, saved with every evaluation result.

    Attributes:
        max_new_tokens: tokens generated after the prompt.
        prefill_chunk_size: prefill the prompt in chunks of this many tokens (None: one pass).
        chat_template: wrap the prompt in the tokenizer's chat template (False: raw completion prompt).
    """

    max_new_tokens: int = 16
    prefill_chunk_size: int | None = None
    chat_template: bool = False

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.prefill_chunk_size is not None and self.prefill_chunk_size < 1:
            raise ValueError(f"prefill_chunk_size must be >= 1, got {self.prefill_chunk_size}")

    def to_dict(self) -> dict:
        return {"decoding": "greedy", **asdict(self)}


@torch.inference_mode()
def generate_answer(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    input_ids: list[int],
    settings: GenerationSettings,
) -> tuple[str, int]:
    """Greedy-decode after ``input_ids``; return the decoded new text and the KV-cache bytes at the end."""
    if len(input_ids) == 0:
        raise UsageError("input_ids is empty: the prompt needs at least one token")
    vocab = model.get_input_embeddings().num_embeddings
    bad = [i for i in input_ids if isinstance(i, bool) or not isinstance(i, Integral) or not 0 <= i < vocab]
    if bad:
        raise UsageError(f"input_ids must be token ids in [0, {vocab}), got {bad[0]!r}")
    ids = torch.tensor([input_ids], device=model.device)
    config = GenerationConfig(
        max_new_tokens=settings.max_new_tokens,
        do_sample=False,
        prefill_chunk_size=settings.prefill_chunk_size,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        return_dict_in_generate=True,
    )
    out = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config)
    text = tokenizer.decode(out.sequences[0, ids.shape[1] :], skip_special_tokens=True)
    return text, cache_kv_bytes(out[cache_kwarg(model)])
