"""Named model shapes with random weights, built directly on the device (speed does not depend on weight values)."""

from __future__ import annotations

from typing import Any

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedModel

SHAPES: dict[str, dict[str, Any]] = {
    # Llama-3-8B: GQA, 32 query / 8 KV heads.
    "llama-3-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-5,
                       rope_parameters={"rope_type": "default", "rope_theta": 500000.0}),
    # Llama-2-7B: MHA, 32 query / 32 KV heads.
    "llama-2-7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32, head_dim=128, rms_norm_eps=1e-5,
                       rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
    # A few milliseconds per step on a CPU: for smoke tests of the benchmark itself.
    "tiny": dict(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                 rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
}


def shape_config(name: str) -> LlamaConfig:
    if name not in SHAPES:
        raise ValueError(f"unknown model shape {name!r}; known: {', '.join(SHAPES)}")
    return LlamaConfig(**SHAPES[name], max_position_embeddings=1 << 23, tie_word_embeddings=False,
                       attn_implementation="sdpa")


def build_random_model(name: str, device: torch.device | str, dtype: torch.dtype, seed: int = 0) -> PreTrainedModel:
    """A Llama of shape ``name`` with random weights, created on ``device`` in ``dtype`` (nothing is downloaded)."""
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(shape_config(name), dtype=dtype)
    return model.eval()


def weight_bytes_read(model: PreTrainedModel, batch_size: int = 1) -> int:
    """Bytes of weights one decode step reads: every parameter except the input embedding table, of which only
    ``batch_size`` rows are read."""
    embed = model.get_input_embeddings().weight
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    total -= embed.numel() * embed.element_size()
    return total + batch_size * embed.shape[1] * embed.element_size()
