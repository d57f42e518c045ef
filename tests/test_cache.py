"""DuoLayer / DuoCache bookkeeping with hand-checkable contents (every key is its own position number), chunk plans by
hand, and the KV-bytes formula."""

from __future__ import annotations

import pytest
import torch

from duoattn.cache import DuoCache
from duoattn.kernels.dispatch import KernelChoice
from duoattn.layout import ChunkPlan, prefix_length, ring_slot, split_kv_bytes, visible
from duoattn.quant.kv import KVQuantConfig, QuantizedKV, dequantize, quantize
from duoattn.roles import LayerRoles


def position_chunk(t0, t1, heads, batch=1):
    """Keys / values ``[batch, heads, t1 - t0, 1]`` holding their own positions (values negated)."""
    pos = torch.arange(t0, t1, dtype=torch.float32).view(1, 1, -1, 1).expand(batch, heads, -1, 1)
    return pos.clone(), -pos.clone()


def one_layer(n_ret, heads, sink, recent, max_len, **kw):
    return DuoCache([LayerRoles(n_ret, heads, 1, sink, recent)], max_len=max_len, **kw)


@pytest.mark.parametrize("sink, recent", [(4, 6), (0, 5), (3, 1), (10, 10), (2, 130)])
@pytest.mark.parametrize("chunks", [[1] * 300, [7, 1, 1, 13, 1, 25] + [1] * 50 + [200], [150, 150], [3, 3, 3, 300]])
def test_ring_keeps_exactly_sink_and_recent_over_many_steps(sink, recent, chunks):
    cache = one_layer(1, 3, sink, recent, 320)
    layer = cache.layers[0]
    t = 0
    for size in chunks:
        k, v = position_chunk(t, t + size, 3)
        states, _ = cache.update(k, v, 0)
        t += size
        assert cache.length() == t and int(cache.get_seq_length()) == t
        assert layer.full_k[0, 0, :t, 0].tolist() == list(range(t))  # retrieval head: everything, in place
        assert layer.full_v[0, 0, :t, 0].tolist() == [-p for p in range(t)]
        assert layer.ring_k.shape == (1, 2, sink + recent, 1)  # only the two streaming heads, never more slots
        n = min(t, sink + recent)
        kept = set(range(min(sink, t))) | set(range(max(sink, t - recent), t))
        for h in range(2):  # both streaming heads hold exactly the kept positions, at their ring slots
            stored = layer.ring_k[0, h, :n, 0].tolist()
            assert len(set(stored)) == n and set(stored) == kept
            assert all(ring_slot(int(p), sink, recent) == i for i, p in enumerate(stored))
            assert layer.ring_v[0, h, :n, 0].tolist() == [-p for p in stored]
        if size > 1:  # the scratch holds what the chunk's streaming queries may see, at the planned indices
            plan = states.plan
            assert (plan.start, plan.end) == (t - size, t)
            sk, sv = layer.scratch(plan)
            got = sk[0, 0, :, 0]
            assert got[: plan.sink_visible].tolist() == list(range(plan.sink_visible))
            assert got[plan.prefix - plan.n_run : plan.prefix].tolist() == list(range(plan.run_start, plan.start))
            assert got[plan.prefix :].tolist() == list(range(plan.start, plan.end))
            assert sv[0, 1, plan.prefix :, 0].tolist() == [-p for p in range(plan.start, plan.end)]
            assert plan.run_start <= max(plan.sink_visible, plan.start - recent + 1)
        else:
            assert states.plan is None


def test_ring_slots_by_hand():
    # sink 2, recent 4: positions 0, 1 stay; 2..5 fill slots 2..5; 6 overwrites slot 2, 7 slot 3, ...
    assert [ring_slot(p, 2, 4) for p in range(10)] == [0, 1, 2, 3, 4, 5, 2, 3, 4, 5]
    assert ring_slot(torch.arange(10), 2, 4).tolist() == [0, 1, 2, 3, 4, 5, 2, 3, 4, 5]


def test_visibility_by_hand():
    # sink 1, recent 2: query i sees key 0 and keys i-1, i; a retrieval head sees every key j <= i
    streaming = [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 0, 1, 1, 0], [1, 0, 0, 1, 1]]
    causal = [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]
    pos = torch.arange(5)
    assert visible(pos, pos, 1, 2, True).int().tolist() == streaming
    assert visible(pos, pos, 1, 2, False).int().tolist() == causal
    heads = visible(pos, pos, 1, 2, torch.tensor([False, True, False]))
    assert heads.shape == (3, 5, 5) and heads.int().tolist() == [causal, streaming, causal]
    # queries 3, 4 of a later chunk against all keys: the rows of the full table, by absolute position
    assert visible(pos[3:], pos, 1, 2, True).int().tolist() == streaming[3:]
    # sink 0, recent 1: a streaming head sees only its own position
    assert visible(pos, pos, 0, 1, True).int().tolist() == torch.eye(5, dtype=torch.int).tolist()


def test_chunk_plan_by_hand():
    # sink 2, recent 4, 10 tokens stored, chunk 10..14: sees 0, 1 and 7, 8, 9;
    # keeps 11, 12, 13 | 14 in slots 3, 4, 5 | 2
    plan = ChunkPlan.build(10, 5, sink=2, recent=4)
    assert (plan.n_sink, plan.run_start, plan.n_run, plan.prefix) == (2, 7, 3, 128)
    # positions 7, 8, 9 live in slots 2 + (p - 2) % 4 = 3, 4, 5
    assert plan.gather == [(0, 0, 2), (125, 3, 3)]
    assert plan.keep == [(1, 3, 3), (4, 2, 1)]
    # by default every query streams and nothing is recorded for later dense queries
    assert plan.record is False and plan.n_streamed == 5 and plan.streamed() is plan
    with pytest.raises(ValueError, match="start >= 0 and size >= 1"):
        ChunkPlan.build(0, 0, 2, 4)


def test_prefix_length_by_hand():
    # room for sink + recent - 1 stored tokens, the smallest multiple of 128 (at least 128)
    assert prefix_length(0, 1) == 128 and prefix_length(4, 6) == 128
    assert prefix_length(4, 125) == 128  # 128 stored tokens fit exactly
    assert prefix_length(4, 126) == 256  # 129 do not
    assert prefix_length(64, 256) == 384  # 319 -> 3 blocks


def test_streamed_plan_by_hand():
    # sink 2, recent 4, chunk 10..14 whose queries from 12 on attend fully: queries 10, 11 stream, with the layout of
    # a chunk 10..11 (sees 0, 1 and 7, 8, 9 like the whole chunk; keeps 10, 11 in slots 2, 3)
    plan = ChunkPlan.build(10, 5, sink=2, recent=4, dense_from=12)
    assert plan.n_streamed == 2
    sub = plan.streamed()
    assert (sub.start, sub.size, sub.n_sink, sub.run_start, sub.n_run) == (10, 2, 2, 7, 3)
    assert sub.gather == [(0, 0, 2), (125, 3, 3)] and sub.keep == [(0, 2, 2)]
    assert plan.streamed() is sub  # built once per chunk, shared by every layer with its kernel artefacts
    every = ChunkPlan.build(10, 5, sink=2, recent=4, dense_from=15)
    assert every.n_streamed == 5 and every.streamed() is every


def test_kv_bytes_and_bytes_read_match_the_formula():
    r = [LayerRoles(n, 2, 3, 4, 6) for n in (2, 0, 1)]
    cache = DuoCache(r, max_len=100)
    assert cache.kv_bytes() == 0  # nothing allocated before the first token ...
    cache.preallocate(2, torch.float32, "cpu", 8)  # ... or preallocate()
    per_token_head = 2 * 8 * 2 * 4  # batch x head_dim x (K, V) x float32
    assert cache.kv_bytes() == ((2 + 1) * 100 + (0 + 2 + 1) * 10) * per_token_head
    assert cache.kv_bytes() == split_kv_bytes(3, 3, 100, 4, 6, 8, 4, batch_size=2)
    # one sequence unless told: 3 retrieval heads x 100 + 3 streaming heads x 10 vectors of 8 float32, K and V
    assert split_kv_bytes(3, 3, 100, 4, 6, 8, 4) == (3 * 100 + 3 * 10) * 8 * 4 * 2
    assert cache.kv_bytes_read(50) == ((2 + 1) * 50 + 3 * 10) * per_token_head
    assert cache.kv_bytes_read(7) == (3 * 7 + 3 * 7) * per_token_head
    k = torch.zeros(2, 2, 30, 8)
    for i in range(3):
        cache.update(k, k, i)
    assert cache.length() == 30 and cache.kv_bytes() == ((2 + 1) * 100 + 3 * 10) * per_token_head  # capacity held


def test_all_retrieval_and_all_streaming_layers():
    full = one_layer(2, 2, 2, 3, 10)
    full.update(*position_chunk(0, 10, 2), 0)
    layer = full.layers[0]
    assert layer.ring_k is None and layer.full_k[0, 1, :, 0].tolist() == list(range(10))
    stream = one_layer(0, 2, 2, 3, 10)
    stream.update(*position_chunk(0, 10, 2), 0)
    layer = stream.layers[0]
    assert layer.full_k is None and layer.ring_k.shape[-2] == 5
    assert sorted(layer.ring_k[0, 0, :, 0].tolist()) == [0, 1, 7, 8, 9]


def test_set_length_and_fill_random():
    cache = one_layer(1, 3, 2, 4, 20)
    with pytest.raises(RuntimeError, match="not allocated"):
        cache.set_length(3)
    cache.preallocate(1, torch.float32, "cpu", 4)
    layer = cache.layers[0]
    cache.fill_random(12, torch.Generator().manual_seed(0))
    assert cache.length() == 12 and int(cache.get_seq_length()) == 12
    assert (layer.full_k[:, :, :12] != 0).all() and (layer.full_k[:, :, 12:] == 0).all()
    assert (layer.ring_k != 0).all()  # 12 tokens fill the 6-slot ring
    cache.set_length(5)
    assert cache.length() == 5 and int(cache.state.clock) == 5
    with pytest.raises(ValueError, match=r"tokens must be in \[0, 20\]"):
        cache.set_length(21)
    q = one_layer(1, 2, 2, 4, 20, kv_quant=KVQuantConfig(4))
    q.preallocate(1, torch.float32, "cpu", 4)
    q.fill_random(7, torch.Generator().manual_seed(0))
    codes = q.layers[0].full_k.data
    assert codes.dtype == torch.uint8 and (codes[:, :, 7:] == 0).all() and codes[:, :, :7].any()


def test_batch_operations_and_unsupported_ones():
    cache = one_layer(1, 2, 2, 3, 8)
    layer = cache.layers[0]
    k = torch.arange(2 * 2 * 6, dtype=torch.float32).view(2, 2, 6, 1)
    cache.update(k, -k, 0)
    cache.reorder_cache(torch.tensor([1, 0]))
    assert layer.full_k[0, 0, :6, 0].tolist() == k[1, 0, :, 0].tolist()
    assert layer.full_v[1, 0, :6, 0].tolist() == (-k[0, 0, :, 0]).tolist()
    assert sorted(layer.ring_k[0, 0, :5, 0].tolist()) == sorted(k[1, 1, [0, 1, 3, 4, 5], 0].tolist())
    with pytest.raises(NotImplementedError, match="keeps its batch size"):
        layer.batch_select_indices(torch.tensor([1]))
    with pytest.raises(NotImplementedError, match="keeps its batch size"):
        layer.batch_repeat_interleave(2)
    with pytest.raises(NotImplementedError, match="cropped"):
        layer.crop(-2)
    before = cache.kv_bytes()
    cache.reset()
    assert int(cache.get_seq_length()) == 0 and cache.length() == 0
    assert cache.kv_bytes() == before  # the preallocated storage is kept for the next sequence
    cache.update(*position_chunk(0, 3, 2, batch=2), 0)  # and reused from position 0
    assert layer.full_k[1, 0, :3, 0].tolist() == [0, 1, 2]


def test_quantised_retrieval_storage_and_bytes():
    cfg = KVQuantConfig(4)
    cache = DuoCache([LayerRoles(1, 2, 1, 2, 3)], max_len=6, kv_quant=cfg)
    k = torch.randn(2, 2, 6, 8, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    cache.update(k, -k, 0)
    layer = cache.layers[0]
    assert isinstance(layer.full_k, QuantizedKV) and layer.full_k.data.shape == (2, 1, 6, 4)
    assert isinstance(layer.ring_k, torch.Tensor) and layer.ring_k.dtype == torch.float64  # streaming: model dtype
    # retrieval: 4 bytes of int4 codes + float64 scale and zero per vector; streaming: 5 float64 vectors; K and V
    assert cache.kv_bytes() == 2 * (2 * 6 * (4 + 16)) + 2 * (2 * 5 * 8 * 8)
    torch.testing.assert_close(dequantize(layer.full_k), dequantize(quantize(k[:, :1], cfg)), rtol=0, atol=0)
    cache.reorder_cache(torch.tensor([1, 0]))
    torch.testing.assert_close(dequantize(layer.full_k)[0], dequantize(quantize(k[1:2, :1], cfg))[0], rtol=0, atol=0)


def test_bad_cache_inputs_are_refused():
    with pytest.raises(ValueError, match="max_len must be an integer >= 1"):
        one_layer(1, 2, 4, 4, 0)
    with pytest.raises(ValueError, match="num_retrieval must be in"):
        LayerRoles(3, 2, 1, 4, 4)
    with pytest.raises(ValueError, match="at least one DuoAttention layer"):
        DuoCache([None, None], max_len=4)
    with pytest.raises(ValueError, match="decode kernel must be one of"):
        KernelChoice(decode="cuda")
    with pytest.raises(ValueError, match="streaming prefill kernel must be one of"):
        KernelChoice(streaming_prefill="cuda")
    cache = one_layer(1, 2, 4, 4, 10)
    with pytest.raises(ValueError, match="expects 2 KV heads"):
        cache.update(torch.zeros(1, 3, 2, 8), torch.zeros(1, 3, 2, 8), 0)
    with pytest.raises(ValueError, match="sized for 10 tokens"):
        cache.update(torch.zeros(1, 2, 11, 8), torch.zeros(1, 2, 11, 8), 0)
    two = DuoCache([LayerRoles(1, 2, 1, 4, 4)] * 2, max_len=10)
    two.update(torch.zeros(1, 2, 2, 8), torch.zeros(1, 2, 2, 8), 0)
    with pytest.raises(ValueError, match="holds batch 1, got 3"):
        two.update(torch.zeros(3, 2, 2, 8), torch.zeros(3, 2, 2, 8), 1)


def test_kernel_choice_resolves_to_what_runs_here():
    cpu = torch.device("cpu")
    assert KernelChoice().resolve(cpu, 64) == KernelChoice("torch", "blocks")
    assert KernelChoice().resolve(cpu, 64, softcap=True) == KernelChoice("torch", "blocks")
    with pytest.raises(ValueError, match="power-of-two head_dim >= 16"):
        KernelChoice(decode="triton").resolve(cpu, 24)
    with pytest.raises(ValueError, match="power-of-two head_dim >= 32"):
        KernelChoice(decode="triton").resolve(cpu, 16, quantized=True)
    with pytest.raises(ValueError, match="does not soft-cap"):
        KernelChoice(decode="triton").resolve(cpu, 16, softcap=True)
    with pytest.raises(ValueError, match="FlexAttention streaming prefill does not soft-cap"):
        KernelChoice(streaming_prefill="flex").resolve(cpu, 16, softcap=True)
