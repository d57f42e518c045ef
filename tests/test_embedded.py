"""The embedded SmolLM2-135M-Instruct under DuoAttention (CPU, float32, short prompts)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import reference_logits

from duoattn import HeadPattern, duo_attention
from duoattn.eval.generation import GenerationSettings, generate_answer
from duoattn.eval.passkey import passkey_sample, score_passkey
from duoattn.deploy import cache_kwarg

pytestmark = pytest.mark.slow


def test_embedded_model_shape(smol):
    model, tokenizer = smol
    cfg = model.config
    assert (cfg.model_type, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (
        "llama", 30, 9, 3)
    assert cfg.hidden_size // cfg.num_attention_heads == 64 and cfg.max_position_embeddings == 8192
    assert model.dtype == torch.float32 and not model.training
    assert tokenizer.decode(tokenizer("The pass key is 12345.").input_ids) == "The pass key is 12345."


def test_all_retrieval_matches_unpatched_and_streaming_really_forgets(smol):
    model, tokenizer = smol
    sample = passkey_sample(tokenizer, 600, depth=0.5, seed=3)
    settings = GenerationSettings(max_new_tokens=7)
    full_text, full_bytes = generate_answer(model, tokenizer, sample.input_ids, settings)
    assert score_passkey(sample.answer, full_text) == 1.0
    with duo_attention(model, HeadPattern.uniform(30, 3, 1.0, sink=16, recent=64)):
        text, nbytes = generate_answer(model, tokenizer, sample.input_ids, settings)
    # the stock cache holds the tokens it saw (prompt + 6); the DuoCache is sized for prompt + max_new_tokens
    per_token = 30 * 3 * 64 * 4 * 2  # layers x KV heads x head_dim x float32 x (K, V)
    assert full_bytes == per_token * (len(sample.input_ids) + 6)
    assert text == full_text and nbytes == per_token * (len(sample.input_ids) + 7)
    with duo_attention(model, HeadPattern.uniform(30, 3, 0.0, sink=16, recent=64)) as duo:
        text, nbytes = generate_answer(model, tokenizer, sample.input_ids, settings)
    # the passkey sits ~300 tokens back, outside every head's sink + recent window: it cannot be recovered
    assert score_passkey(sample.answer, text) == 0.0
    assert nbytes == duo.expected_kv_bytes(80) < full_bytes / 7


def test_mixed_pattern_matches_dense_reference(smol):
    model, tokenizer = smol
    ids = torch.tensor([passkey_sample(tokenizer, 300, depth=0.3, seed=5).input_ids])
    pattern = HeadPattern.random(30, 3, seed=0, sink=16, recent=64)
    expected = reference_logits(model, pattern, ids, sparsity=0.5)
    with torch.inference_mode(), duo_attention(model, pattern, sparsity=0.5) as duo:
        single = model(ids).logits
        cache, chunks = duo.new_cache(ids.shape[1]), []
        for start in range(0, ids.shape[1] - 20, 70):  # chunked prefill, then 20 single-token steps
            chunks.append(model(ids[:, start : min(start + 70, ids.shape[1] - 20)], **{cache_kwarg(model): cache}).logits)
        for pos in range(ids.shape[1] - 20, ids.shape[1]):
            chunks.append(model(ids[:, pos : pos + 1], **{cache_kwarg(model): cache}).logits)
        assert cache.kv_bytes() == duo.expected_kv_bytes(ids.shape[1])
    torch.testing.assert_close(single, expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(torch.cat(chunks, dim=1), expected, rtol=1e-4, atol=1e-4)
    assert np.isclose(duo.retrieval_ratio, 0.5, atol=0.01)
