"""Shared fixtures: tiny random models built in-process (nothing is downloaded) and the embedded SmolLM2."""

from __future__ import annotations

import os

import torch

# Without CUDA, Triton kernels run under the Triton interpreter. It must be chosen before anything imports triton
# (transformers may), because triton's own helpers (tl.zeros, ...) are compiled or interpreted when it is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from duoattn.kernels.reference import reference_attention  # noqa: E402
from duoattn.patch import ROLES_ATTR  # noqa: E402


def tiny_llama(num_layers: int = 3, heads: int = 4, kv_heads: int = 2, seed: int = 0, **overrides) -> LlamaForCausalLM:
    """A random Llama small enough to run in milliseconds; float64 so that comparisons are tight."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=num_layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=4096,
        attn_implementation="sdpa",
        **overrides,
    )
    return LlamaForCausalLM(config).to(torch.float64).eval()


def dense_reference_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Attention function for the oracle: explicit per-head masks over the whole (uncached) sequence."""
    roles = getattr(module, ROLES_ATTR)
    out = reference_attention(query, key, value, roles.retrieval, roles.sink, roles.recent, scale=scaling)
    return out.transpose(1, 2), None


@pytest.fixture
def tiny_model() -> LlamaForCausalLM:
    return tiny_llama()


@pytest.fixture(scope="session")
def smol():
    """The embedded SmolLM2-135M-Instruct (float32, CPU)."""
    from duoattn import load_model

    return load_model(device="cpu")
