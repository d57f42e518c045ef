"""DuoAttention on a model, end to end, against the unpatched model and the dense oracle."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import reference_logits, run_chunks, tiny_llama
from transformers import GPT2Config, GPT2LMHeadModel

from duoattn import HeadPattern, disable_duo_attention, duo_attention, enable_duo_attention
from duoattn.cache import DuoCache
from duoattn.patch import ATTN_NAME, ROLES_ATTR, cache_kwarg

MIXED = np.array([[1.0, 0.0], [0.0, 0.0], [0.0, 1.0]])  # 3 layers x 2 KV heads: mixed, all streaming, mixed


@pytest.fixture
def ids():
    return torch.randint(0, 97, (1, 60), generator=torch.Generator().manual_seed(1))


def test_all_retrieval_equals_unpatched_model(tiny_model, ids):
    expected = tiny_model(ids).logits
    expected_tokens = tiny_model.generate(ids, max_new_tokens=12, do_sample=False)
    with duo_attention(tiny_model, HeadPattern.uniform(3, 2, 1.0, sink=2, recent=4)):
        torch.testing.assert_close(tiny_model(ids).logits, expected, rtol=0, atol=1e-12)
        tokens = tiny_model.generate(ids, max_new_tokens=12, do_sample=False)
    assert torch.equal(tokens, expected_tokens)


def test_window_covering_the_sequence_equals_full_attention(tiny_model, ids):
    expected = tiny_model.generate(ids, max_new_tokens=10, do_sample=False, output_scores=True,
                                   return_dict_in_generate=True)
    with duo_attention(tiny_model, HeadPattern.uniform(3, 2, 0.0), sink=30, recent=45):  # 30 + 45 >= 70 tokens
        got = tiny_model.generate(ids, max_new_tokens=10, do_sample=False, output_scores=True,
                                  return_dict_in_generate=True)
    assert torch.equal(got.sequences, expected.sequences)
    torch.testing.assert_close(torch.stack(got.scores), torch.stack(expected.scores), rtol=0, atol=1e-10)


@pytest.mark.parametrize("kv_heads", [2, 4, 1])
@pytest.mark.parametrize("sink, recent", [(3, 7), (0, 5), (8, 1)])
def test_fast_path_matches_dense_reference(kv_heads, sink, recent, ids):
    model = tiny_llama(heads=4, kv_heads=kv_heads)
    gates = np.random.default_rng(kv_heads + sink).random((3, kv_heads))
    pattern = HeadPattern(gates, sink=sink, recent=recent)
    expected = reference_logits(model, pattern, ids, sparsity=0.5)
    with duo_attention(model, pattern, sparsity=0.5) as handle:
        assert 0 < handle.retrieval_ratio < 1 or kv_heads == 1
        single = model(ids, use_cache=False).logits  # no cache: plain keys
        prefill = model(ids).logits  # DuoCache, one chunk
        chunked = run_chunks(model, ids, handle.new_cache(), [7, 13, 1, 20, 19])
        decoded = run_chunks(model, ids, handle.new_cache(), [1] * ids.shape[1])
        prealloc = run_chunks(model, ids, handle.new_cache(max_cache_len=64), [25, 1, 1, 33])
    for got in (single, prefill, chunked, decoded, prealloc):
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("chunk", [1, 5, 16, 59, 200])
def test_chunked_prefill_in_generate_matches_single_pass(tiny_model, ids, chunk):
    pattern = HeadPattern(MIXED, sink=2, recent=6)
    kw = dict(max_new_tokens=8, do_sample=False, output_scores=True, return_dict_in_generate=True)
    with duo_attention(tiny_model, pattern):
        single = tiny_model.generate(ids, **kw)
    with duo_attention(tiny_model, pattern, prefill_chunk_size=chunk) as handle:
        chunked = tiny_model.generate(ids, **kw)
    assert torch.equal(chunked.sequences, single.sequences)
    torch.testing.assert_close(torch.stack(chunked.scores), torch.stack(single.scores), rtol=1e-9, atol=1e-9)
    assert handle.prefill_chunk_size == chunk


def test_generate_returns_a_duo_cache_with_the_formula_bytes(tiny_model, ids):
    with duo_attention(tiny_model, HeadPattern(MIXED, sink=2, recent=6), prefill_chunk_size=16) as handle:
        out = tiny_model.generate(ids, max_new_tokens=9, do_sample=False, return_dict_in_generate=True)
    cache = out[cache_kwarg(tiny_model)]
    assert isinstance(cache, DuoCache)
    t = ids.shape[1] + 9 - 1  # the last generated token is never fed back
    assert cache.get_seq_length() == t
    # 3 layers; retrieval heads per layer 1, 0, 1 of 2; head_dim 8; float64
    formula = (2 * t + 4 * min(t, 2 + 6)) * 8 * 2 * 8
    assert cache.kv_bytes() == formula == handle.expected_kv_bytes(t)


def test_context_manager_is_reversible(tiny_model, ids):
    before = tiny_model(ids).logits
    state = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    with duo_attention(tiny_model, HeadPattern(MIXED, sink=1, recent=2)):
        assert tiny_model.config._attn_implementation == ATTN_NAME
        assert not torch.allclose(tiny_model(ids).logits, before)
    assert tiny_model.config._attn_implementation == "sdpa"
    assert "generate" not in vars(tiny_model)
    assert not any(hasattr(m, ROLES_ATTR) for m in tiny_model.modules())
    assert not tiny_model._forward_pre_hooks
    torch.testing.assert_close(tiny_model(ids).logits, before, rtol=0, atol=0)
    assert all(torch.equal(v, state[k]) for k, v in tiny_model.state_dict().items())
    # enable / disable pair, and the context manager restores even on error
    enable_duo_attention(tiny_model, HeadPattern(MIXED))
    with pytest.raises(RuntimeError, match="already enabled"):
        enable_duo_attention(tiny_model, HeadPattern(MIXED))
    disable_duo_attention(tiny_model)
    with pytest.raises(RuntimeError, match="not enabled"):
        disable_duo_attention(tiny_model)
    with pytest.raises(KeyError):
        with duo_attention(tiny_model, HeadPattern(MIXED)):
            raise KeyError("boom")
    assert tiny_model.config._attn_implementation == "sdpa"


def test_bad_inputs_are_refused_clearly(tiny_model):
    with pytest.raises(ValueError, match=r"pattern shape \(2, 2\).*\(3, 2\)"):
        enable_duo_attention(tiny_model, HeadPattern.uniform(2, 2))
    with pytest.raises(ValueError, match="sparsity must be in"):
        enable_duo_attention(tiny_model, HeadPattern(MIXED), sparsity=1.2)
    with pytest.raises(ValueError, match="recent must be an integer >= 1"):
        enable_duo_attention(tiny_model, HeadPattern(MIXED), recent=0)
    with pytest.raises(ValueError, match="prefill_chunk_size"):
        enable_duo_attention(tiny_model, HeadPattern(MIXED), prefill_chunk_size=0)
    with pytest.raises(TypeError, match="HeadPattern"):
        enable_duo_attention(tiny_model, MIXED)
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=16, vocab_size=50))
    with pytest.raises(ValueError, match="model_type 'gpt2'.*supported: llama"):
        enable_duo_attention(gpt2, HeadPattern.uniform(2, 2))
    assert tiny_model.config._attn_implementation == "sdpa"  # failed enables leave nothing behind


def test_padded_batches_are_refused_and_equal_length_batches_work(tiny_model):
    ids = torch.randint(0, 97, (2, 30), generator=torch.Generator().manual_seed(3))
    pattern = HeadPattern(MIXED, sink=2, recent=5)
    with duo_attention(tiny_model, pattern):
        mask = torch.ones_like(ids)
        mask[0, :4] = 0
        with pytest.raises(ValueError, match="padded batches"):
            tiny_model.generate(ids, attention_mask=mask, max_new_tokens=3)
        batched = tiny_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False)
        one = tiny_model.generate(ids[1:], max_new_tokens=4, do_sample=False)
    assert torch.equal(batched[1:], one)


def test_generate_with_a_generation_config_still_gets_a_duo_cache(tiny_model, ids):
    from transformers import GenerationConfig

    config = GenerationConfig(max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
    with duo_attention(tiny_model, HeadPattern(MIXED, sink=2, recent=6)):
        out = tiny_model.generate(ids, generation_config=config)
    assert isinstance(out[cache_kwarg(tiny_model)], DuoCache)


def test_a_failing_enable_leaves_the_model_untouched(tiny_model, ids, monkeypatch):
    before = tiny_model(ids).logits

    def broken(*args, **kwargs):
        raise RuntimeError("cannot switch")

    monkeypatch.setattr(type(tiny_model), "set_attn_implementation", broken)
    with pytest.raises(RuntimeError, match="cannot switch"):
        enable_duo_attention(tiny_model, HeadPattern(MIXED))
    monkeypatch.undo()
    assert not any(hasattr(m, ROLES_ATTR) for m in tiny_model.modules())
    assert "generate" not in vars(tiny_model) and not tiny_model._forward_pre_hooks
    torch.testing.assert_close(tiny_model(ids).logits, before, rtol=0, atol=0)
    enable_duo_attention(tiny_model, HeadPattern(MIXED))  # and it can be enabled afterwards
    disable_duo_attention(tiny_model)
