"""duoattn: DuoAttention for Hugging Face transformers (Xiao et al., arXiv 2410.10819).

Retrieval heads keep the full KV cache; streaming heads keep only the first ``sink`` and the last ``recent``
tokens. The split is real: streaming-head memory is never allocated.

    >>> from duoattn import load_model, HeadPattern, duo_attention
    >>> model, tokenizer = load_model()                      # the embedded SmolLM2-135M-Instruct
    >>> pattern = HeadPattern.from_pretrained("SmolLM2-135M-Instruct")
    >>> with duo_attention(model, pattern, sparsity=0.5):     # half the KV heads become streaming
    ...     out = model.generate(**tokenizer("...", return_tensors="pt"), max_new_tokens=32)

``duo_attention(..., prefill="window:64")`` lets the prompt's last 64 queries attend fully on every head
(``"full"``: every prompt query); decoding and the memory kept afterwards do not change (:mod:`duoattn.prefill`).
"""

from .cache import DuoCache, DuoLayer
from .models import load_model
from .deploy import DuoAttentionHandle, disable_duo_attention, duo_attention, enable_duo_attention
from .pattern import HeadPattern
from .pipelines import DuoPipeline, pipeline
from .prefill import PrefillMode

__version__ = "0.1.0"

__all__ = [
    "DuoAttentionHandle",
    "DuoCache",
    "DuoLayer",
    "DuoPipeline",
    "HeadPattern",
    "PrefillMode",
    "disable_duo_attention",
    "duo_attention",
    "enable_duo_attention",
    "load_model",
    "pipeline",
]
