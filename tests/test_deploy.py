"""DuoAttention on a model, end to end (the one deployment path): against the unpatched model and the dense oracle
(conftest: the unpatched model with explicit per-head masks, head roles computed independently of duoattn)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import assert_restored, model_state, reference_logits, roles_table, run_chunks, tiny_llama
from transformers import GPT2Config, GPT2LMHeadModel

from duoattn import HeadPattern, disable_duo_attention, duo_attention, enable_duo_attention
from duoattn.attention import ATTN_NAME, ROLES_ATTR
from duoattn.cache import DuoCache
from duoattn.deploy import cache_kwarg
from duoattn.kernels.dispatch import KernelChoice

pytestmark = pytest.mark.usefixtures("one_thread")

MIXED = np.array([[1.0, 0.0], [0.0, 0.0], [0.2, 0.9]])  # 3 layers x 2 KV heads: mixed, all streaming, mixed (retrieval second)


@pytest.fixture
def ids():
    return torch.randint(0, 97, (1, 60), generator=torch.Generator().manual_seed(1))


def ids_of(length, seed=1, vocab=97):
    return torch.randint(0, vocab, (1, length), generator=torch.Generator().manual_seed(seed))


def test_all_retrieval_equals_unpatched_model(tiny_model, ids):
    expected = tiny_model(ids).logits
    expected_tokens = tiny_model.generate(ids, max_new_tokens=12, do_sample=False)
    with duo_attention(tiny_model, HeadPattern.uniform(3, 2, 1.0, sink=2, recent=4)) as handle:
        torch.testing.assert_close(tiny_model(ids).logits, expected, rtol=0, atol=1e-12)
        tokens = tiny_model.generate(ids, max_new_tokens=12, do_sample=False)
        # prefill in chunks of 10, then one token at a time on a preallocated cache
        cache = handle.new_cache(64, batch_size=1)
        got = run_chunks(tiny_model, ids, cache, [10, 10, 5] + [1] * 35)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
    assert torch.equal(tokens, expected_tokens)


def test_window_covering_the_sequence_equals_full_attention(tiny_model, ids):
    expected = tiny_model.generate(ids, max_new_tokens=10, do_sample=False, output_scores=True,
                                   return_dict_in_generate=True)
    with duo_attention(tiny_model, HeadPattern.uniform(3, 2, 0.0), sink=30, recent=45):  # 30 + 45 >= 70 tokens
        got = tiny_model.generate(ids, max_new_tokens=10, do_sample=False, output_scores=True,
                                  return_dict_in_generate=True)
    assert torch.equal(got.sequences, expected.sequences)
    torch.testing.assert_close(torch.stack(got.scores), torch.stack(expected.scores), rtol=0, atol=1e-10)


def test_roles_are_the_independent_binarisation_and_heads_are_reordered(tiny_model):
    gates = np.random.default_rng(7).random((3, 2))
    for sparsity in (None, 0.5, 1 / 3):
        with duo_attention(tiny_model, HeadPattern(gates), sparsity=sparsity) as handle:
            table = roles_table(tiny_model, HeadPattern(gates), sparsity)
            np.testing.assert_array_equal(handle.roles, table)
            assert [lr.num_retrieval for lr in handle.layer_roles] == table.sum(axis=1).tolist()
            assert handle.order.num_retrieval == tuple(table.sum(axis=1).tolist())
            for row, perm in zip(table, handle.order.perms):  # retrieval heads first, each group in its order
                assert perm.tolist() == [h for h in range(2) if row[h]] + [h for h in range(2) if not row[h]]


@pytest.mark.parametrize("kv_heads", [2, 4, 1])
@pytest.mark.parametrize("sink, recent", [(3, 7), (0, 5), (8, 1)])
def test_every_path_matches_the_dense_reference(kv_heads, sink, recent, ids):
    model = tiny_llama(heads=4, kv_heads=kv_heads)
    gates = np.random.default_rng(kv_heads + sink).random((3, kv_heads))
    pattern = HeadPattern(gates, sink=sink, recent=recent)
    expected = reference_logits(model, pattern, ids, sparsity=0.5)
    with duo_attention(model, pattern, sparsity=0.5) as handle:
        assert 0 < handle.retrieval_ratio < 1 or kv_heads == 1
        single = model(ids, use_cache=False).logits  # no cache: plain keys
        prefill = model(ids).logits  # a DuoCache injected by forward, one chunk
        chunked = run_chunks(model, ids, handle.new_cache(60), [7, 13, 1, 20, 19])
        decoded = run_chunks(model, ids, handle.new_cache(60), [1] * ids.shape[1])
        prealloc = run_chunks(model, ids, handle.new_cache(64, batch_size=1), [25, 1, 1, 33])
    for got in (single, prefill, chunked, decoded, prealloc):
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)


CASES = [  # (KV heads, sink, recent, streaming prefill kernel): MHA / GQA / MQA, windows shorter and longer than a chunk
    (2, 3, 7, "blocks"), (4, 0, 5, "flex"), (1, 8, 1, "blocks"), (2, 130, 20, "flex"), (2, 3, 7, "flex"),
    (4, 0, 5, "blocks"),
]


@pytest.mark.parametrize("kv_heads, sink, recent, kernel", CASES)
def test_long_prefill_and_decode_match_the_dense_reference(kv_heads, sink, recent, kernel):
    """Prompts longer than a 128-token scratch block, prefilled in one or several chunks with the block-sparse
    (FlexAttention, eager on the CPU) or the block-by-block SDPA streaming kernel, then decoded token by token."""
    model = tiny_llama(heads=4, kv_heads=kv_heads)
    ids = ids_of(170, seed=kv_heads)
    gates = np.random.default_rng(kv_heads + sink).random((3, kv_heads))
    pattern = HeadPattern(gates, sink=sink, recent=recent)
    expected = reference_logits(model, pattern, ids, sparsity=0.5)
    choice = KernelChoice(streaming_prefill="flex-eager" if kernel == "flex" else "blocks")
    # no_grad: FlexAttention has no backward on the CPU (generate runs without gradients anyway)
    with torch.no_grad(), duo_attention(model, pattern, sparsity=0.5, kernels=choice) as handle:
        for chunk in (37, 150):
            cache = handle.new_cache(180)
            sizes = [chunk] * (150 // chunk) + ([150 % chunk] if 150 % chunk else []) + [1] * 20
            got = run_chunks(model, ids, cache, sizes)
            assert cache.describe()["streaming_prefill_kernel"] == choice.streaming_prefill
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


def test_generate_returns_a_duo_cache_sized_to_the_request_with_the_formula_bytes(tiny_model, ids):
    with duo_attention(tiny_model, HeadPattern(MIXED, sink=2, recent=6), prefill_chunk_size=16) as handle:
        out = tiny_model.generate(ids, max_new_tokens=9, do_sample=False, return_dict_in_generate=True)
    cache = out[cache_kwarg(tiny_model)]
    assert isinstance(cache, DuoCache)
    t = ids.shape[1] + 9 - 1  # the last generated token is never fed back
    assert cache.length() == t and isinstance(cache.get_seq_length(), torch.Tensor) and cache.get_seq_length() == t
    capacity = ids.shape[1] + 9  # preallocated for prompt + max_new_tokens
    assert cache.max_len == capacity
    # 3 layers; retrieval heads per layer 1, 0, 1 of 2; head_dim 8; float64; (K, V)
    formula = (2 * capacity + 4 * min(capacity, 2 + 6)) * 8 * 8 * 2
    assert cache.kv_bytes() == formula == handle.expected_kv_bytes(capacity)
    assert handle.expected_kv_bytes(capacity, batch_size=3) == 3 * formula


def test_kv_bytes_of_a_preallocated_cache_do_not_depend_on_what_it_holds(tiny_model, ids):
    with duo_attention(tiny_model, HeadPattern(MIXED, sink=2, recent=6)) as handle:
        cache = handle.new_cache(100, batch_size=2)
        assert cache.kv_bytes() == handle.expected_kv_bytes(100, batch_size=2) == 2 * (2 * 100 + 4 * 8) * 8 * 8 * 2
        run_chunks(tiny_model, ids[:, :30].expand(2, -1), cache, [30])
        assert cache.length() == 30 and cache.kv_bytes() == handle.expected_kv_bytes(100, batch_size=2)


def test_kv_bytes_of_a_cache_shorter_than_the_streaming_window_match_the_formula(tiny_model):
    with duo_attention(tiny_model, HeadPattern(MIXED, sink=2, recent=6)) as handle:
        short = handle.new_cache(5, batch_size=1)  # 5 tokens < sink + recent = 8
        # by hand: 2 retrieval KV heads x 5 tokens + 4 streaming KV heads x min(5, 8) slots, head_dim 8, float64, K+V
        assert handle.expected_kv_bytes(5) == (2 * 5 + 4 * 5) * 8 * 8 * 2
        assert short.kv_bytes() == handle.expected_kv_bytes(5)


def test_context_manager_is_reversible(tiny_model, ids):
    before = tiny_model(ids).logits
    state = model_state(tiny_model)
    with duo_attention(tiny_model, HeadPattern(MIXED, sink=1, recent=2)) as handle:
        assert tiny_model.config._attn_implementation == ATTN_NAME
        assert handle.order.num_retrieval == (1, 0, 1)
        assert not torch.equal(tiny_model.model.layers[2].self_attn.k_proj.weight,
                               state["model.layers.2.self_attn.k_proj.weight"])  # layer 2's heads were swapped
        assert not torch.allclose(tiny_model(ids).logits, before)
    assert_restored(tiny_model, state)
    torch.testing.assert_close(tiny_model(ids).logits, before, rtol=0, atol=0)
    # enable / disable pair
    enable_duo_attention(tiny_model, HeadPattern(MIXED))
    with pytest.raises(RuntimeError, match="already enabled"):
        enable_duo_attention(tiny_model, HeadPattern(MIXED))
    disable_duo_attention(tiny_model)
    with pytest.raises(RuntimeError, match="not enabled"):
        disable_duo_attention(tiny_model)
    assert_restored(tiny_model, state)


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
    with pytest.raises(TypeError, match="KernelChoice"):
        enable_duo_attention(tiny_model, HeadPattern(MIXED), kernels="triton")
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=16, vocab_size=50))
    with pytest.raises(ValueError, match="model_type 'gpt2'.*supported: llama"):
        enable_duo_attention(gpt2, HeadPattern.uniform(2, 2))
    assert tiny_model.config._attn_implementation == "sdpa"  # failed enables leave nothing behind
    assert not any(hasattr(m, ROLES_ATTR) for m in tiny_model.modules())


def test_a_cache_too_small_for_the_request_is_refused(tiny_model, ids):
    state = model_state(tiny_model)
    with duo_attention(tiny_model, HeadPattern(MIXED, sink=1, recent=2)) as handle:
        with pytest.raises(ValueError, match="sized for 8 tokens"):
            tiny_model(ids[:, :9], **{cache_kwarg(tiny_model): handle.new_cache(8)})
        cache = handle.new_cache(8)
        run_chunks(tiny_model, ids[:, :8], cache, [4, 3, 1])  # exactly full
        with pytest.raises(ValueError, match="sized for 8 tokens"):
            tiny_model(ids[:, 8:9], **{cache_kwarg(tiny_model): cache})
    assert_restored(tiny_model, state)


def test_padded_batches_are_refused_and_equal_length_batches_work(tiny_model):
    ids = torch.randint(0, 97, (2, 30), generator=torch.Generator().manual_seed(3))
    pattern = HeadPattern(MIXED, sink=2, recent=5)
    with duo_attention(tiny_model, pattern):
        mask = torch.ones_like(ids)
        mask[0, :4] = 0
        with pytest.raises(ValueError, match=r"^DuoAttention does not support padded batches \(attention_mask has "
                           r"zeros\): run one sequence at a time, or batch sequences of equal length without padding$"):
            tiny_model.generate(ids, attention_mask=mask, max_new_tokens=3)
        short = torch.ones(2, 2, dtype=torch.long)  # the shortest prompt that can be padded: two tokens
        short[0, 0] = 0
        with pytest.raises(ValueError, match="padded batches"):
            tiny_model.generate(ids[:, :2], attention_mask=short, max_new_tokens=3)
        batched = tiny_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False)
        one = tiny_model.generate(ids[1:], max_new_tokens=4, do_sample=False)
        zero = tiny_model.generate(ids[:1], max_new_tokens=4, do_sample=False)
    assert torch.equal(batched, torch.cat([zero, one]))


def test_generate_with_a_generation_config_still_gets_a_duo_cache(tiny_model, ids):
    from transformers import GenerationConfig

    config = GenerationConfig(max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
    with duo_attention(tiny_model, HeadPattern(MIXED, sink=2, recent=6), prefill_chunk_size=16):
        out = tiny_model.generate(ids, generation_config=config)
    assert isinstance(out[cache_kwarg(tiny_model)], DuoCache) and out[cache_kwarg(tiny_model)].max_len == 63
    assert config.prefill_chunk_size is None  # the user's config is not modified


def test_a_failing_enable_leaves_the_model_untouched(tiny_model, ids, monkeypatch):
    before = tiny_model(ids).logits
    state = model_state(tiny_model)

    def broken(*args, **kwargs):
        raise RuntimeError("cannot switch")

    monkeypatch.setattr(type(tiny_model), "set_attn_implementation", broken)
    with pytest.raises(RuntimeError, match="cannot switch"):
        enable_duo_attention(tiny_model, HeadPattern(MIXED))  # after the heads were reordered
    monkeypatch.undo()
    assert_restored(tiny_model, state)
    torch.testing.assert_close(tiny_model(ids).logits, before, rtol=0, atol=0)
    enable_duo_attention(tiny_model, HeadPattern(MIXED))  # and it can be enabled afterwards
    disable_duo_attention(tiny_model)


def test_a_duo_cache_without_duo_attention_is_refused_clearly(tiny_model, ids):
    with duo_attention(tiny_model, HeadPattern(MIXED)) as handle:
        cache = handle.new_cache(16)
    with pytest.raises((ValueError, RuntimeError), match="DuoAttention"):
        tiny_model(ids[:, :4], **{cache_kwarg(tiny_model): cache})


def test_attention_function_scaling_none_is_the_inverse_square_root_of_the_head_size(tiny_model):
    """The registered function called directly, as other callers than transformers' modules may: ``scaling=None``
    means ``head_dim ** -0.5``, an explicit ``scaling`` is honoured, and a mask tensor is refused by name."""
    from duoattn.attention import CUSTOM_MASK_ERROR, duo_attention_forward, duo_mask

    gen = torch.Generator().manual_seed(9)
    with duo_attention(tiny_model, HeadPattern(MIXED, sink=2, recent=4)):
        module = tiny_model.model.layers[0].self_attn
        hq, hkv = tiny_model.config.num_attention_heads, tiny_model.config.num_key_value_heads
        d = tiny_model.config.hidden_size // hq
        q = torch.randn(1, hq, 12, d, generator=gen, dtype=torch.float64)
        k, v = (torch.randn(1, hkv, 12, d, generator=gen, dtype=torch.float64) for _ in "kv")
        default, _ = duo_attention_forward(module, q, k, v, None)
        explicit, _ = duo_attention_forward(module, q, k, v, None, scaling=d**-0.5)
        doubled, _ = duo_attention_forward(module, q, k, v, None, scaling=2 * d**-0.5)
        # the same call with the queries scaled instead: softmax(2 q k^T / sqrt(d)) = softmax((2q) k^T / sqrt(d))
        by_queries, _ = duo_attention_forward(module, 2 * q, k, v, None)
        with pytest.raises(ValueError) as err:
            duo_attention_forward(module, q, k, v, torch.zeros(1, 1, 12, 12, dtype=torch.float64))
        with pytest.raises(ValueError) as mask_err:  # a mask function other than causal, e.g. bidirectional spans
            duo_mask(batch_size=1, q_length=12, kv_length=12, mask_function=lambda b, h, q, kv: True)
    assert str(err.value) == CUSTOM_MASK_ERROR and str(mask_err.value) == CUSTOM_MASK_ERROR
    assert default.shape == (1, 12, hq, d)
    torch.testing.assert_close(default, explicit, rtol=0, atol=0)
    torch.testing.assert_close(doubled, by_queries, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(default, doubled)


def test_a_stock_cache_decodes_by_the_streaming_rule_in_every_prefill_mode(tiny_model):
    """A transformers DynamicCache passed by hand: its prompt pass follows the prefill mode, its decode steps the
    streaming rule (only a pass whose queries are the whole sequence is a prompt), as on a DuoCache."""
    from transformers import DynamicCache

    ids = ids_of(40, seed=4)
    pattern = HeadPattern(MIXED, sink=2, recent=4)
    for mode in ("full", "window:8"):
        with duo_attention(tiny_model, pattern, prefill=mode) as handle, torch.no_grad():
            stock = DynamicCache()
            tiny_model(ids[:, :36], past_key_values=stock, use_cache=True)
            got = torch.cat([tiny_model(ids[:, t : t + 1], past_key_values=stock, use_cache=True).logits
                             for t in range(36, 40)], dim=1)
            cache = handle.new_cache(40)
            want = run_chunks(tiny_model, ids, cache, [36, 1, 1, 1, 1])[:, 36:]
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
