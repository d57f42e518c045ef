"""Every deployment path against the independent oracle (``tests/oracle.py``), on random tiny Llamas.

Property-based: hypothesis draws the geometry (layers, KV heads, query heads per KV head), the streaming window,
the prompt, the chunk size, the decode steps and the gates / sparsity (hence the retrieval set). The deployment
paths are the public API: ``duo_attention`` with ``model(ids)`` (with and without cache), chunked prefill and
token-by-token decode into ``handle.new_cache(max_len)``, and ``model.generate`` (greedy and beam search); plus the fast
engine while it has its own entry point.
"""

from __future__ import annotations

import functools

import numpy as np
import oracle
import pytest
import torch
from conftest import run_chunks
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import LlamaConfig, LlamaForCausalLM

from duoattn import HeadPattern, duo_attention
from duoattn.quant.kv import KVQuantConfig, dequantize, quantize

pytestmark = pytest.mark.usefixtures("one_thread")

HEAD_DIM = 8
VOCAB = 61
TOL = dict(rtol=1e-9, atol=1e-9)
PROPERTY = settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])

try:  # the fast engine, while it is a separate entry point
    from duoattn.engine import DecodeRunner, fast_duo_attention, prefill
except ImportError:  # merged into duo_attention: the duo_attention paths cover it
    fast_duo_attention = None


@functools.lru_cache(maxsize=None)
def model_of(layers: int, kv_heads: int, groups: int) -> LlamaForCausalLM:
    """A random float64 Llama of this geometry (cached: building one is most of a small example's time)."""
    torch.manual_seed(layers * 100 + kv_heads * 10 + groups)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=36, intermediate_size=32, num_hidden_layers=layers,
                         num_attention_heads=kv_heads * groups, num_key_value_heads=kv_heads, head_dim=HEAD_DIM,
                         max_position_embeddings=512, attn_implementation="sdpa", bos_token_id=1, eos_token_id=None,
                         pad_token_id=0)
    model = LlamaForCausalLM(config).to(torch.float64).eval()
    model.generation_config.eos_token_id = None  # generate exactly max_new_tokens
    return model


def ids_of(batch: int, length: int, seed: int) -> torch.Tensor:
    return torch.randint(1, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


@st.composite
def cases(draw):
    """A geometry, a streaming window, gates and a sparsity, and a prompt that exceeds the window more often
    than not (otherwise streaming heads see everything and the case says little)."""
    layers, kv_heads, groups = draw(st.integers(1, 3)), draw(st.integers(1, 3)), draw(st.integers(1, 3))
    sink, recent = draw(st.integers(0, 5)), draw(st.integers(1, 8))
    gates = draw(st.lists(st.sampled_from([0.0, 0.2, 0.5, 0.7, 1.0]) | st.floats(0, 1), min_size=layers * kv_heads,
                          max_size=layers * kv_heads))
    sparsity = draw(st.sampled_from([None, 0.0, 0.25, 0.5, 0.75, 1.0]) | st.floats(0, 1))
    return dict(
        shape=(layers, kv_heads, groups),
        pattern=HeadPattern(np.reshape(gates, (layers, kv_heads)), sink=sink, recent=recent),
        sparsity=sparsity,
        prompt=draw(st.integers(1, 3 * (sink + recent) + 2)),
        chunk=draw(st.integers(1, 12)),
        steps=draw(st.integers(0, 5)),
        seed=draw(st.integers(0, 1000)),
    )


def expected_roles(case) -> np.ndarray:
    return oracle.binarize(case["pattern"].gates, sparsity=case["sparsity"])


def expected_kv_bytes(roles: np.ndarray, sink: int, recent: int, tokens: int, batch: int = 1) -> int:
    """The documented formula: per layer ``(n_retrieval * T + n_streaming * min(T, sink + recent)) * head_dim * 2``
    elements of 8 bytes (float64)."""
    n_ret = int(roles.sum())
    n_str = roles.size - n_ret
    return batch * (n_ret * tokens + n_str * min(tokens, sink + recent)) * HEAD_DIM * 2 * 8


@PROPERTY
@given(cases())
def test_forward_chunked_prefill_and_decode_equal_the_oracle(case):
    model, pattern = model_of(*case["shape"]), case["pattern"]
    total = case["prompt"] + case["steps"]
    ids = ids_of(1, total, case["seed"])
    roles = expected_roles(case)
    expected = oracle.oracle_logits(model, roles, pattern.sink, pattern.recent, ids)
    chunks = [case["chunk"]] * (case["prompt"] // case["chunk"])
    chunks += [case["prompt"] % case["chunk"]] if case["prompt"] % case["chunk"] else []
    with duo_attention(model, pattern, sparsity=case["sparsity"]) as handle, torch.no_grad():
        np.testing.assert_array_equal(handle.roles, roles)
        torch.testing.assert_close(model(ids, use_cache=False).logits, expected, **TOL)
        torch.testing.assert_close(model(ids).logits, expected, **TOL)
        cache = handle.new_cache(total)
        got = run_chunks(model, ids, cache, chunks + [1] * case["steps"])
        assert cache.get_seq_length() == total
        assert cache.kv_bytes() == expected_kv_bytes(roles, pattern.sink, pattern.recent, total)
        assert handle.expected_kv_bytes(total) == expected_kv_bytes(roles, pattern.sink, pattern.recent, total)
    torch.testing.assert_close(got, expected, **TOL)


@PROPERTY
@given(cases())
def test_generate_equals_the_oracle(case):
    """Greedy ``generate`` (with chunked prefill) picks the oracle's tokens with the oracle's scores."""
    model, pattern = model_of(*case["shape"]), case["pattern"]
    ids = ids_of(1, case["prompt"], case["seed"])
    new = case["steps"] + 1
    kwargs = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, return_dict_in_generate=True,
                  output_scores=True)
    want = oracle.oracle_generate(model, expected_roles(case), pattern.sink, pattern.recent, ids, **kwargs)
    chunk = case["chunk"] if case["chunk"] > 1 else None
    with duo_attention(model, pattern, sparsity=case["sparsity"], prefill_chunk_size=chunk), torch.no_grad():
        got = model.generate(ids, **kwargs)
    assert torch.equal(got.sequences, want.sequences)
    torch.testing.assert_close(torch.stack(got.scores), torch.stack(want.scores), **TOL)


@pytest.mark.skipif(fast_duo_attention is None, reason="the fast engine is part of duo_attention")
@PROPERTY
@given(cases())
def test_fast_engine_equals_the_oracle(case):
    model, pattern = model_of(*case["shape"]), case["pattern"]
    prompt = max(case["prompt"], 2)
    ids = ids_of(1, prompt + case["steps"], case["seed"])
    expected = oracle.oracle_logits(model, expected_roles(case), pattern.sink, pattern.recent, ids)
    with fast_duo_attention(model, pattern, sparsity=case["sparsity"]) as engine, torch.no_grad():
        torch.testing.assert_close(model(ids).logits, expected, **TOL)  # no static cache: the gathering path
        cache = engine.new_cache(max_len=ids.shape[1])
        last = prefill(model, cache, ids[:, :prompt], max(case["chunk"], 2))
        runner = DecodeRunner(model, cache)
        decoded = [runner.step(ids[:, t]).clone() for t in range(prompt, ids.shape[1])]
    torch.testing.assert_close(last, expected[:, prompt - 1], **TOL)
    for t, logits in zip(range(prompt, ids.shape[1]), decoded):
        torch.testing.assert_close(logits, expected[:, t], **TOL)


# ----------------------------------------------------------------------- fixed cases the properties may miss
# Retrieval heads last in every layer: a path that takes head roles from the wrong head order (for instance
# the original order where it should use a retrieval-first permutation) attends with the wrong mask.
LAST_FIRST = HeadPattern(np.array([[0.1, 0.2, 0.9], [0.3, 0.8, 0.7], [0.0, 0.1, 0.6]]), sink=2, recent=5)


def test_retrieval_heads_not_first_in_their_layer():
    model = model_of(3, 3, 2)
    ids = ids_of(1, 40, seed=3)
    roles = oracle.binarize(LAST_FIRST.gates)
    assert not roles[:, 0].any() and roles[:, 2].all()
    expected = oracle.oracle_logits(model, roles, 2, 5, ids)
    with duo_attention(model, LAST_FIRST) as handle, torch.no_grad():
        torch.testing.assert_close(model(ids).logits, expected, **TOL)
        torch.testing.assert_close(run_chunks(model, ids, handle.new_cache(ids.shape[1]), [7, 20] + [1] * 13), expected, **TOL)
    if fast_duo_attention is not None:
        with fast_duo_attention(model, LAST_FIRST) as engine, torch.no_grad():
            torch.testing.assert_close(model(ids).logits, expected, **TOL)
            cache = engine.new_cache(max_len=40)
            torch.testing.assert_close(prefill(model, cache, ids[:, :30], 8), expected[:, 29], **TOL)
            runner = DecodeRunner(model, cache)
            for t in range(30, 40):
                torch.testing.assert_close(runner.step(ids[:, t]), expected[:, t], **TOL)


@pytest.mark.parametrize("chunk", [None, 6])
def test_beam_search_equals_the_oracle(chunk):
    """3-beam search reorders the cache at every step: the streaming heads' ring must follow the beams."""
    model = model_of(2, 3, 2)
    ids = ids_of(1, 30, seed=11)
    pattern = HeadPattern(LAST_FIRST.gates[:2], sink=2, recent=5)
    kwargs = dict(max_new_tokens=12, min_new_tokens=12, num_beams=3, num_return_sequences=3, do_sample=False,
                  return_dict_in_generate=True, output_scores=True, length_penalty=0.0)
    want = oracle.oracle_generate(model, oracle.binarize(pattern.gates), 2, 5, ids, **kwargs)
    with duo_attention(model, pattern, prefill_chunk_size=chunk), torch.no_grad():
        got = model.generate(ids, **kwargs)
    assert torch.equal(got.sequences, want.sequences)
    torch.testing.assert_close(got.sequences_scores, want.sequences_scores, **TOL)
    # the beams really differ, so a cache that does not follow them would be caught
    assert len({tuple(s.tolist()) for s in want.sequences}) == 3


def test_batch_without_padding_equals_the_oracle_per_row():
    model = model_of(2, 3, 2)
    ids = ids_of(3, 25, seed=5)
    pattern = HeadPattern(LAST_FIRST.gates[:2], sink=2, recent=5)
    roles = oracle.binarize(pattern.gates)
    expected = torch.cat([oracle.oracle_logits(model, roles, 2, 5, row[None]) for row in ids])
    kwargs = dict(max_new_tokens=6, do_sample=False, return_dict_in_generate=True, output_scores=True)
    want = [oracle.oracle_generate(model, roles, 2, 5, row[None], **kwargs) for row in ids]
    with duo_attention(model, pattern) as handle, torch.no_grad():
        torch.testing.assert_close(model(ids).logits, expected, **TOL)
        torch.testing.assert_close(run_chunks(model, ids, handle.new_cache(ids.shape[1]), [9, 9, 1, 1, 5]), expected, **TOL)
        got = model.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)
    assert torch.equal(got.sequences, torch.cat([w.sequences for w in want]))
    if fast_duo_attention is not None:
        with fast_duo_attention(model, pattern) as engine:
            cache = engine.new_cache(max_len=25, batch_size=3)
            torch.testing.assert_close(prefill(model, cache, ids[:, :20], 6), expected[:, 19], **TOL)
            runner = DecodeRunner(model, cache)
            for t in range(20, 25):
                torch.testing.assert_close(runner.step(ids[:, t]), expected[:, t], **TOL)


def test_padded_batch_is_refused_clearly():
    model = model_of(2, 3, 2)
    ids = ids_of(2, 12, seed=6)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding
    with duo_attention(model, HeadPattern.uniform(2, 3, 0.0, sink=2, recent=4)), torch.no_grad():
        with pytest.raises(ValueError, match="does not support padded batches"):
            model(ids, attention_mask=mask)
        with pytest.raises(ValueError, match="does not support padded batches"):
            model.generate(ids, attention_mask=mask, max_new_tokens=2, do_sample=False)


@PROPERTY
@given(cases(), st.sampled_from([8, 4]), st.sampled_from([None, 4]))
def test_quantised_cache_equals_the_oracle_with_the_codec(case, bits, group):
    """``kv_bits`` 8 / 4: the oracle with the retrieval heads' keys and values passed through the codec (whose own
    bound ``test_core_properties`` checks); streaming heads keep the model dtype."""
    model, pattern = model_of(*case["shape"]), case["pattern"]
    total = case["prompt"] + case["steps"]
    ids = ids_of(1, total, case["seed"])
    cfg = KVQuantConfig(bits, group)
    expected = oracle.oracle_logits(model, expected_roles(case), pattern.sink, pattern.recent, ids,
                                    codec=lambda x: dequantize(quantize(x, cfg)))
    chunks = [case["chunk"]] * (case["prompt"] // case["chunk"]) + [1] * (case["prompt"] % case["chunk"] + case["steps"])
    with duo_attention(model, pattern, sparsity=case["sparsity"], kv_bits=bits, kv_group_size=group) as handle:
        with torch.no_grad():
            torch.testing.assert_close(model(ids).logits, expected, **TOL)
            cache = handle.new_cache(total)
            torch.testing.assert_close(run_chunks(model, ids, cache, chunks), expected, **TOL)
        roles = expected_roles(case)
        n_ret = int(roles.sum())
        quantised = HEAD_DIM * bits // 8 + 2 * (HEAD_DIM // (group or HEAD_DIM)) * 8  # codes, float64 scale + zero
        streaming = (roles.size - n_ret) * min(total, pattern.sink + pattern.recent) * HEAD_DIM * 8
        assert cache.kv_bytes() == 2 * (n_ret * total * quantised + streaming) == handle.expected_kv_bytes(total)
