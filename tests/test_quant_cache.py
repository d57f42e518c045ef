"""The quantised retrieval cache (kv_bits 8 / 4, a storage option of the one DuoCache): the torch kernels on
quantised storage against the dense oracle, model-level equivalences, memory."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import FAMILIES, reference_logits, run_chunks, tiny_llama
from test_deploy import MIXED

from duoattn import HeadPattern, duo_attention
from duoattn.attention import ROLES_ATTR
from duoattn.cache import DuoCache
from duoattn.deploy import cache_kwarg
from duoattn.kernels import dispatch
from duoattn.kernels.reference import reference_attention
from duoattn.quant.kv import KVQuantConfig, QuantizedKV, dequantize, quantize

pytestmark = pytest.mark.usefixtures("one_thread")


def rand(*shape, seed, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("hq, hkv", [(4, 4), (6, 2), (3, 1)])
@pytest.mark.parametrize("t, c", [(40, 40), (40, 1), (57, 9), (5, 5)])
@pytest.mark.parametrize("softcap", [None, 2.0])
def test_prefill_over_quantised_storage_matches_reference_on_dequantised_inputs(bits, hq, hkv, t, c, softcap):
    """A chunk's retrieval queries over a preallocated quantised buffer of which the first ``t`` tokens are stored."""
    q, k, v = rand(2, hq, c, 16, seed=t), rand(2, hkv, t, 16, seed=t + 1), rand(2, hkv, t, 16, seed=t + 2)
    cfg = KVQuantConfig(bits, group_size=8)
    qk, qv = quantize(k, cfg), quantize(v, cfg)
    store_k = QuantizedKV.zeros((2, hkv), 64, 16, cfg, torch.float64, torch.device("cpu"))
    store_v = QuantizedKV.zeros((2, hkv), 64, 16, cfg, torch.float64, torch.device("cpu"))
    store_k.write(0, qk)
    store_v.write(0, qv)
    ref = reference_attention(q, dequantize(qk), dequantize(qv), torch.ones(hkv, dtype=torch.bool), 0, 1,
                              softcap=softcap)
    out = dispatch.prefill_retrieval(q, store_k, store_v, t, 16**-0.5, softcap=softcap)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("bits", [8, 4])
def test_torch_decode_over_quantised_storage_matches_reference(bits):
    """The CPU decode path: retrieval heads over the dequantised prefix, streaming heads over the ring."""
    cfg = KVQuantConfig(bits)
    b, n_ret, n_str, g, d, t, cap = 2, 1, 2, 2, 16, 30, 7
    k, v = rand(b, n_ret, t, d, seed=1), rand(b, n_ret, t, d, seed=2)
    store_k = QuantizedKV.zeros((b, n_ret), 40, d, cfg, torch.float64, torch.device("cpu"))
    store_v = QuantizedKV.zeros((b, n_ret), 40, d, cfg, torch.float64, torch.device("cpu"))
    store_k.write(0, quantize(k, cfg))
    store_v.write(0, quantize(v, cfg))
    rk, rv = rand(b, n_str, cap, d, seed=3), rand(b, n_str, cap, d, seed=4)
    q = rand(b, (n_ret + n_str) * g, 1, d, seed=5)
    kernels = dispatch.KernelChoice("torch", "blocks")
    out = dispatch.decode_attention(kernels, q, store_k, store_v, rk, rv, torch.tensor(t), t, dispatch.Workspace(),
                                    d**-0.5, 1)
    ret = reference_attention(q[:, : n_ret * g], dequantize(quantize(k, cfg)), dequantize(quantize(v, cfg)),
                              torch.ones(n_ret, dtype=torch.bool), 0, 1)
    stream = reference_attention(q[:, n_ret * g :], rk, rv, torch.ones(n_str, dtype=torch.bool), 0, 1)
    torch.testing.assert_close(out, torch.cat([ret, stream], dim=1).transpose(1, 2), rtol=1e-10, atol=1e-10)


def test_prefill_over_quantised_storage_in_float32_and_bfloat16():
    """float32 / bfloat16 queries and scales give the float64 result within their own rounding."""
    q, k, v = rand(1, 4, 3, 64, seed=1), rand(1, 2, 300, 64, seed=2), rand(1, 2, 300, 64, seed=3)
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        qk, qv = quantize(k.to(dtype), KVQuantConfig(8)), quantize(v.to(dtype), KVQuantConfig(8))
        ref = reference_attention(q, dequantize(qk).double(), dequantize(qv).double(),
                                  torch.ones(2, dtype=torch.bool), 0, 1)
        out = dispatch.prefill_retrieval(q.to(dtype), qk, qv, 300, 64**-0.5)
        assert out.dtype == dtype
        torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol)


@pytest.fixture
def ids():
    return torch.randint(0, 97, (1, 60), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("bits, group", [(8, None), (4, None), (4, 4)])
def test_quantised_cache_matches_oracle_for_every_chunking(bits, group, ids):
    model = tiny_llama(heads=4, kv_heads=2)
    pattern = HeadPattern(MIXED, sink=3, recent=7)
    expected = reference_logits(model, pattern, ids, kv_quant=KVQuantConfig(bits, group))
    with duo_attention(model, pattern, kv_bits=bits, kv_group_size=group) as handle:
        assert handle.kv_bits == bits
        prefill = model(ids).logits
        chunked = run_chunks(model, ids, handle.new_cache(60), [7, 13, 1, 20, 19])
        decoded = run_chunks(model, ids, handle.new_cache(60), [20] + [1] * (ids.shape[1] - 20))
        prealloc = run_chunks(model, ids, handle.new_cache(64, batch_size=1), [25, 1, 1, 33])
    for got in (prefill, chunked, decoded, prealloc):
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_quantised_cache_in_other_families(family, ids):
    """Every family: biases, q / k norms, fused qkv, soft-capping and local sliding-window layers."""
    model = FAMILIES[family].build()
    pattern = HeadPattern(np.random.default_rng(0).random((4, 2)), sink=3, recent=7)
    kv_quant = KVQuantConfig(4, group_size=4)
    expected = reference_logits(model, pattern, ids, sparsity=0.5, kv_quant=kv_quant)
    with duo_attention(model, pattern, sparsity=0.5, kv_bits=4, kv_group_size=4) as handle:
        cache = handle.new_cache(64)
        chunked = run_chunks(model, ids, cache, [13, 1, 26, 1, 19])
        assert cache.kv_bytes() == handle.expected_kv_bytes(64)  # local layers counted too
        single = model(ids).logits
    tol = 1e-5 if FAMILIES[family].attn == "eager" else 1e-12  # eager (Gemma 2 local layers): float32 softmax
    torch.testing.assert_close(chunked, single, rtol=tol, atol=tol)  # chunking changes nothing
    # Gemma 2's local layers run eager attention, whose softmax is float32 even in a float64 model (as in
    # test_families.tolerance).
    atol = 1e-5 if FAMILIES[family].attn == "eager" else 1e-9
    torch.testing.assert_close(chunked, expected, rtol=0, atol=atol)


def teacher_forced_logits(model, pattern, seq, prompt_len, **kwargs):
    """Prefill ``prompt_len`` tokens, then decode the rest of ``seq`` one token at a time."""
    with duo_attention(model, pattern, **kwargs) as handle:
        return run_chunks(model, seq, handle.new_cache(seq.shape[1]), [prompt_len] + [1] * (seq.shape[1] - prompt_len))


def test_int8_decode_stays_close_to_unquantised_logits(ids):
    """Tolerance: int8 moves each key / value channel by at most 1/510 of its vector's range, so through 3 layers
    the logits of this random model move by well under 1% of their spread (measured: 0.3%). int4 steps are 17x
    coarser: its error must be several times larger (the check that quantisation is really applied) and still
    within 10% (measured: 5%)."""
    model = tiny_llama(num_layers=3, heads=4, kv_heads=2)
    pattern = HeadPattern(MIXED, sink=2, recent=6)
    with duo_attention(model, pattern):
        seq = model.generate(ids, max_new_tokens=10, do_sample=False)
    want = teacher_forced_logits(model, pattern, seq, ids.shape[1])
    spread = want.std().item()
    errors = {}
    for bits in (8, 4):
        got = teacher_forced_logits(model, pattern, seq, ids.shape[1], kv_bits=bits)
        errors[bits] = (got - want).abs().max().item() / spread
    assert errors[8] < 0.01, errors
    assert errors[8] * 4 < errors[4] < 0.1, errors


@pytest.mark.parametrize("bits, group", [(8, None), (4, None), (8, 2)])
def test_generate_kv_bytes_match_the_formula(bits, group, ids):
    model = tiny_llama()
    with duo_attention(model, HeadPattern(MIXED, sink=2, recent=6), prefill_chunk_size=16, kv_bits=bits,
                       kv_group_size=group) as handle:
        out = model.generate(ids, max_new_tokens=9, do_sample=False, return_dict_in_generate=True)
    cache = out[cache_kwarg(model)]
    t = ids.shape[1] + 9  # capacity: prompt + max_new_tokens
    assert isinstance(cache, DuoCache) and isinstance(cache.layers[0].full_k, QuantizedKV)
    assert cache.layers[0].full_k.bits == bits and cache.layers[0].full_k.group_size == (group or 8)
    # by hand: 3 layers with 1, 0, 1 retrieval KV heads of 2; head_dim 8; float64 scales
    groups = 8 // (group or 8)
    full_vec = 8 * bits // 8 + 2 * groups * 8
    formula = (2 * t * full_vec + 4 * min(t, 8) * 8 * 8) * 2
    assert cache.kv_bytes() == formula == handle.expected_kv_bytes(t)


def test_bad_kv_settings_are_refused(tiny_model):
    with pytest.raises(ValueError, match=r"kv_bits must be one of \(16, 8, 4\), got 2"):
        duo_attention(tiny_model, HeadPattern(MIXED), kv_bits=2).__enter__()
    with pytest.raises(ValueError, match="kv_group_size applies to a quantised cache only"):
        duo_attention(tiny_model, HeadPattern(MIXED), kv_group_size=4).__enter__()
    with pytest.raises(ValueError, match="group_size 3 must divide head_dim 8"):
        duo_attention(tiny_model, HeadPattern(MIXED), kv_bits=8, kv_group_size=3).__enter__()
    assert tiny_model.config._attn_implementation == "sdpa"
    assert np.all([not hasattr(m, ROLES_ATTR) for m in tiny_model.modules()])
