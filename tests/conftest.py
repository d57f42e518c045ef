"""Shared fixtures and helpers: tiny random models built in-process (nothing is downloaded), the dense oracle as an
attention function, and the embedded SmolLM2."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch

if not torch.cuda.is_available():
    # Triton kernels (optional dependency) then run in Triton's interpreter. The flag must be set before anything
    # imports triton (transformers does), since triton.language's own helpers are defined at that moment.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import oracle  # noqa: E402
import pytest  # noqa: E402
import transformers  # noqa: E402
from hypothesis import Phase, settings  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedModel  # noqa: E402

from duoattn.kernels.reference import reference_attention  # noqa: E402
from duoattn.patch import ROLES_ATTR, cache_kwarg  # noqa: E402

# `make mutants` runs the property tests without shrinking: a failing example is all mutation testing needs.
settings.register_profile("mutants", phases=[Phase.explicit, Phase.reuse, Phase.generate])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

TINY = dict(vocab_size=97, hidden_size=32, intermediate_size=64, max_position_embeddings=4096)
TOKENS = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0)


def tiny_llama(num_layers: int = 3, heads: int = 4, kv_heads: int = 2, seed: int = 0, **overrides) -> LlamaForCausalLM:
    """A random Llama small enough to run in milliseconds; float64 so that comparisons are tight."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        **TINY,
        num_hidden_layers=num_layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        attn_implementation="sdpa",
        **overrides,
    )
    return LlamaForCausalLM(config).to(torch.float64).eval()


@dataclass(frozen=True)
class Family:
    """How to build a tiny random model of one architecture family.

    ``attn`` is the implementation the model runs before DuoAttention (Gemma 2 has no SDPA path in recent
    transformers: soft-capping needs eager). ``window`` is the sliding window of its local layers, if any.
    """

    config: str
    model: str
    overrides: dict[str, Any] = field(default_factory=dict)
    attn: str = "sdpa"
    window: int | None = None

    def build(self, num_layers: int = 4, heads: int = 4, kv_heads: int = 2, seed: int = 0) -> PreTrainedModel:
        torch.manual_seed(seed)
        config = getattr(transformers, self.config)(
            **TINY,
            **TOKENS,
            num_hidden_layers=num_layers,
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            attn_implementation=self.attn,
            **self.overrides,
        )
        return getattr(transformers, self.model)(config).to(torch.float64).eval()


ALTERNATING = ["sliding_attention", "full_attention"] * 2  # 4 layers: local, global, local, global
FAMILIES: dict[str, Family] = {
    "llama": Family("LlamaConfig", "LlamaForCausalLM"),
    "mistral": Family("MistralConfig", "MistralForCausalLM", {"sliding_window": None}),
    "qwen2": Family("Qwen2Config", "Qwen2ForCausalLM"),  # q/k/v biases
    "qwen2-sliding": Family(  # use_sliding_window: the layers from max_window_layers on are local
        "Qwen2Config", "Qwen2ForCausalLM", {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 2},
        window=8,
    ),
    "qwen3": Family("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 8}),  # q/k norms
    "qwen3-sliding": Family(
        "Qwen3Config", "Qwen3ForCausalLM",
        {"head_dim": 8, "use_sliding_window": True, "sliding_window": 8, "max_window_layers": 1},
        window=8,
    ),
    "phi3": Family("Phi3Config", "Phi3ForCausalLM"),  # fused qkv projection
    # A window longer than the context never binds: Phi-3-128K style, its layers count as full attention.
    "phi3-long-window": Family("Phi3Config", "Phi3ForCausalLM", {"sliding_window": 8192}),
    "gemma2": Family(  # soft-capped logits, query_pre_attn_scalar != head_dim, alternating local / global layers
        "Gemma2Config",
        "Gemma2ForCausalLM",
        # initializer_range 0.3 makes attention scores large enough for the soft cap to bite
        {"head_dim": 8, "sliding_window": 8, "query_pre_attn_scalar": 16, "attn_logit_softcapping": 1.0,
         "initializer_range": 0.3},
        attn="eager",
        window=8,
    ),
    "gemma3": Family(  # q/k norms, local layers from layer_types, separate local RoPE
        "Gemma3TextConfig",
        "Gemma3ForCausalLM",
        {"head_dim": 8, "sliding_window": 8, "query_pre_attn_scalar": 16, "layer_types": ALTERNATING},
        window=8,
    ),
}


def dense_reference_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Attention function for the oracle: explicit per-head masks over the whole (uncached) sequence.

    A local layer of window W (no roles) is every head streaming with sink 0 and recent W.
    """
    roles = getattr(module, ROLES_ATTR, None)
    softcap = kwargs.get("softcap")
    if roles is None:
        no_retrieval = torch.zeros(key.shape[1], dtype=torch.bool)
        out = reference_attention(
            query, key, value, no_retrieval, 0, kwargs["sliding_window"], scale=scaling, softcap=softcap
        )
    else:
        out = reference_attention(
            query, key, value, roles.retrieval, roles.sink, roles.recent, scale=scaling, softcap=softcap
        )
    return out.transpose(1, 2), None


def reference_logits(model, pattern, ids, sparsity=None, sink=None, recent=None):
    """Logits of the whole sequence from the independent oracle (``tests/oracle.py``): roles binarised there from
    the pattern's gates, sink / recent applied there, the unpatched model's own projections."""
    layers = [w is None for w in oracle.local_windows(model.config.get_text_config())]
    roles = oracle.binarize(pattern.gates, sparsity=sparsity, layers=layers)
    sink = pattern.sink if sink is None else sink
    recent = pattern.recent if recent is None else recent
    return oracle.oracle_logits(model, roles, sink, recent, ids)


def run_chunks(model, ids, cache, sizes):
    """Feed ``ids`` through the model in chunks of the given sizes; return the logits of every position."""
    logits, start = [], 0
    for size in sizes:
        out = model(ids[:, start : start + size], **{cache_kwarg(model): cache}, use_cache=True)
        logits.append(out.logits)
        start += size
    assert start == ids.shape[1]
    return torch.cat(logits, dim=1)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one thread; on a busy 2-core machine, two threads mostly wait for each other.
    A test module opts in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def tiny_model() -> LlamaForCausalLM:
    return tiny_llama()


@pytest.fixture(scope="session")
def smol():
    """The embedded SmolLM2-135M-Instruct (float32, CPU)."""
    from duoattn import load_model

    return load_model(device="cpu")
