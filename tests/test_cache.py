"""DuoLayer / DuoCache bookkeeping with hand-checkable contents (every key is its own position number), chunk plans by
hand, and the KV-bytes formula."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from duoattn.cache import DuoCache
from duoattn.kernels import dispatch
from duoattn.kernels.dispatch import KernelChoice
from duoattn.kernels.rows import Member
from duoattn.layout import ChunkPlan, prefix_length, ring_slot, split_kv_bytes, visible
from duoattn.quant.kv import KVQuantConfig, QuantizedKV, dequantize, quantize
from duoattn.prefill import PrefillMode
from duoattn.roles import LayerRoles


HAVE_TRITON = importlib.util.find_spec("triton") is not None and (
    torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1")
if HAVE_TRITON:
    from test_triton_kernels import interpreter_on_numpy2  # noqa: F401 - the interpreter fix-up (autouse)


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


NOT_ALLOCATED = "the cache is not allocated yet: call preallocate() or run a forward pass first"


def mixed_cache(max_len=40, **kw):
    """A transformers layer first, then a mixed, an all-streaming and an all-retrieval DuoAttention layer (sink 2,
    recent 4)."""
    roles = [None, LayerRoles(1, 3, 1, 2, 4), LayerRoles(0, 2, 1, 2, 4), LayerRoles(2, 2, 1, 2, 4)]
    return DuoCache(roles, max_len=max_len, **kw)


def buffers(cache):
    """Every key / value buffer of the DuoAttention layers (``None`` where a layer has no such heads)."""
    return [b for layer in cache.layers[1:] for b in (layer.full_k, layer.full_v, layer.ring_k, layer.ring_v)]


def test_fill_random_fills_the_stored_positions_from_the_generator():
    cache = mixed_cache()
    with pytest.raises(RuntimeError, match=f"^{NOT_ALLOCATED}$".replace("(", r"\(").replace(")", r"\)")):
        cache.fill_random(3)
    cache.preallocate(1, torch.float64, "cpu", 16)
    with pytest.raises(ValueError, match=r"^tokens must be in \[0, 40\], got 41$"):
        cache.fill_random(41)
    with pytest.raises(ValueError, match=r"^tokens must be in \[0, 40\], got -1$"):
        cache.fill_random(-1)
    # 30 tokens: retrieval positions 0..29 and the whole 6-slot ring of every layer, nothing else
    cache.fill_random(30, torch.Generator().manual_seed(0), std=0.5)
    assert cache.length() == 30 and int(cache.get_seq_length()) == 30 and not cache.in_prompt
    mixed, streaming, retrieval = cache.layers[1:]
    assert not cache.layers[0].is_initialized  # the transformers layer is left alone
    assert mixed.full_k.shape == (1, 1, 40, 16) and streaming.full_k is None and retrieval.ring_k is None
    for full in (mixed.full_k, mixed.full_v, retrieval.full_k, retrieval.full_v):
        assert full.dtype == torch.float64 and (full[:, :, :30] != 0).all() and (full[:, :, 30:] == 0).all()
    for ring in (mixed.ring_k, mixed.ring_v, streaming.ring_k, streaming.ring_v):
        assert ring.shape[-2] == 6 and ring.dtype == torch.float64 and (ring != 0).all()
    # normal with mean 0 and standard deviation std (3648 values: the sample's within a few hundredths)
    values = torch.cat([b[:, :, :30].flatten() for b in buffers(cache) if b is not None])
    assert values.numel() == 2 * (1 * 30 + 2 * 6 + 2 * 6 + 2 * 30) * 16  # K, V x heads x positions x D and values.isfinite().all()
    assert abs(values.mean()) < 0.05 and 0.45 < values.std() < 0.55
    # the same seed gives the same values whatever the global generator did; another seed others
    again = mixed_cache()
    again.preallocate(1, torch.float64, "cpu", 16)
    torch.manual_seed(123)
    again.fill_random(30, torch.Generator().manual_seed(0), std=0.5)
    assert all(torch.equal(a, b) for a, b in zip(buffers(cache), buffers(again)) if a is not None)
    torch.manual_seed(456)
    again.fill_random(30, torch.Generator().manual_seed(0), std=0.5)
    assert all(torch.equal(a, b) for a, b in zip(buffers(cache), buffers(again)) if a is not None)
    again.fill_random(30, torch.Generator().manual_seed(1), std=0.5)
    assert not torch.equal(again.layers[1].full_k, cache.layers[1].full_k)
    # the default standard deviation is 1
    again.fill_random(30, torch.Generator().manual_seed(2))
    values = torch.cat([b[:, :, :30].flatten() for b in buffers(again) if b is not None])
    assert abs(values.mean()) < 0.1 and 0.9 < values.std() < 1.1
    # 4 tokens: positions 0..3, in ring slots 0..3 (below sink + recent a slot is the position)
    fresh = mixed_cache()
    fresh.preallocate(1, torch.float64, "cpu", 16)
    fresh.fill_random(4, torch.Generator().manual_seed(0))
    for layer in fresh.layers[1:]:
        for t in (layer.full_k, layer.full_v, layer.ring_k, layer.ring_v):
            if t is not None:
                assert (t[:, :, :4] != 0).all() and (t[:, :, 4:] == 0).all()
    assert fresh.length() == 4
    # the whole capacity, and none
    fresh.fill_random(40)
    assert fresh.length() == 40 and (fresh.layers[3].full_k != 0).all()
    fresh.fill_random(0)
    assert fresh.length() == 0 and int(fresh.get_seq_length()) == 0


def test_fill_random_quantised_codes_scales_and_zero_points():
    # int4, std 0.5: codes uniform over every byte (two 4-bit codes each), scales uniform in [0, 2 std / 15) (the
    # step of 15 code steps spanning 2 std), zero points uniform in [-std, 0]
    cache = DuoCache([LayerRoles(2, 2, 1, 2, 4)], max_len=40, kv_quant=KVQuantConfig(4))
    cache.preallocate(1, torch.float32, "cpu", 64)
    cache.fill_random(30, torch.Generator().manual_seed(0), std=0.5)
    layer = cache.layers[0]
    assert layer.ring_k is None and cache.length() == 30
    step = 2 * 0.5 / 15
    for stored in (layer.full_k, layer.full_v):
        codes, scale, zero = stored.data, stored.scale, stored.zero
        assert codes.shape == (1, 2, 40, 32) and scale.shape == zero.shape == (1, 2, 40, 1)
        assert (codes[:, :, 30:] == 0).all() and (scale[:, :, 30:] == 0).all() and (zero[:, :, 30:] == 0).all()
        assert int(codes[:, :, :30].min()) == 0 and int(codes[:, :, :30].max()) == 255  # 1920 draws per tensor
        assert len(codes[:, :, :30].unique()) > 250
        s, z = scale[:, :, :30], zero[:, :, :30]  # 60 draws each
        assert (s >= 0).all() and (s < step).all() and s.max() > 0.9 * step and s.min() < 0.1 * step
        assert (z >= -0.5).all() and (z <= 0).all() and z.min() < -0.45 and z.max() > -0.05
    # the same seed, whatever the global generator did: the same codes, scales and zero points
    again = DuoCache([LayerRoles(2, 2, 1, 2, 4)], max_len=40, kv_quant=KVQuantConfig(4))
    again.preallocate(1, torch.float32, "cpu", 64)
    torch.manual_seed(7)
    again.fill_random(30, torch.Generator().manual_seed(0), std=0.5)
    for mine, theirs in ((layer.full_k, again.layers[0].full_k), (layer.full_v, again.layers[0].full_v)):
        for a, b in zip((mine.data, mine.scale, mine.zero), (theirs.data, theirs.scale, theirs.zero)):
            assert torch.equal(a, b)


def test_bytes_read_of_a_quantised_and_a_half_precision_cache_by_hand():
    # one all-retrieval int8 layer in float64: a vector is 16 bytes of codes + a float64 scale and zero point
    q = DuoCache([LayerRoles(2, 2, 1, 2, 4)], max_len=40, kv_quant=KVQuantConfig(8))
    q.preallocate(1, torch.float64, "cpu", 16)
    assert q.kv_bytes_read(30) == 2 * 2 * 30 * (16 + 2 * 8)  # (K, V) x heads x tokens x bytes per vector
    assert q.kv_bytes_read(30) == q.kv_bytes() * 30 // 40  # the storage of 30 of its 40 positions
    # int4 in groups of 4 channels, batch 3: 8 bytes of codes + 4 groups x (scale, zero) x 8 bytes per vector
    g = DuoCache([LayerRoles(2, 2, 1, 2, 4)], max_len=40, kv_quant=KVQuantConfig(4, group_size=4))
    g.preallocate(3, torch.float64, "cpu", 16)
    assert g.kv_bytes_read(10) == 3 * 2 * 2 * 10 * (8 + 4 * 2 * 8)
    # bfloat16, one retrieval and one streaming head, head_dim 8: 2 bytes per channel, the ring's 6 slots at most
    h = one_layer(1, 2, 2, 4, 40)
    h.preallocate(1, torch.bfloat16, "cpu", 8)
    assert h.kv_bytes_read(30) == 2 * (30 + 6) * 8 * 2
    assert h.kv_bytes_read(3) == 2 * (3 + 3) * 8 * 2


def test_describe_by_hand():
    cache = one_layer(1, 2, 4, 130, 300)
    # before the first token: the kernels asked for; sink 4 + recent 130 - 1 = 133 stored tokens -> 2 blocks of 128
    assert cache.describe() == {"max_len": 300, "batch_size": 0, "sink": 4, "recent": 130, "prefix": 256,
                                "decode_kernel": "auto", "streaming_prefill_kernel": "auto", "kv_bits": 16}
    cache.preallocate(2, torch.bfloat16, "cpu", 16)  # then what runs on the CPU
    assert cache.describe() == {"max_len": 300, "batch_size": 2, "sink": 4, "recent": 130, "prefix": 256,
                                "decode_kernel": "torch", "streaming_prefill_kernel": "blocks", "kv_bits": 16}
    q = DuoCache([LayerRoles(1, 2, 1, 2, 4)], max_len=10, kv_quant=KVQuantConfig(4),
                 kernels=KernelChoice("torch", "flex-eager"))
    assert q.describe() == {"max_len": 10, "batch_size": 0, "sink": 2, "recent": 4, "prefix": 128,
                            "decode_kernel": "torch", "streaming_prefill_kernel": "flex-eager", "kv_bits": 4}


def test_prompt_declaration_and_rewinding():
    cache = one_layer(1, 2, 2, 4, 40)
    with pytest.raises(ValueError, match=r"^length must be an integer >= 1, got 0$"):
        cache.begin_prompt(0)
    with pytest.raises(ValueError, match=r"^a prompt of 41 tokens after 0 stored does not fit the cache \(40 tokens\)$"):
        cache.begin_prompt(41)
    assert not cache.in_prompt
    cache.begin_prompt(40)  # exactly the capacity
    assert cache.in_prompt
    with pytest.raises(RuntimeError, match=f"^{NOT_ALLOCATED}$".replace("(", r"\(").replace(")", r"\)")):
        cache.set_length(3)
    cache.update(*position_chunk(0, 30, 2), 0)
    assert cache.in_prompt  # 30 of the prompt's 40 tokens
    cache.set_length(30)  # a cache filled directly holds no prompt
    assert not cache.in_prompt
    with pytest.raises(ValueError, match=r"^a prompt of 11 tokens after 30 stored does not fit the cache \(40 tokens\)$"):
        cache.begin_prompt(11)
    cache.begin_prompt(10)
    assert cache.in_prompt
    cache.set_length(40)  # every position
    assert cache.length() == 40 and int(cache.get_seq_length()) == 40 and not cache.in_prompt
    with pytest.raises(ValueError, match=r"^tokens must be in \[0, 40\], got 41$"):
        cache.set_length(41)
    cache.set_length(0)  # rewound to empty
    assert cache.length() == 0 and int(cache.get_seq_length()) == 0 and not cache.in_prompt
    states, _ = cache.update(*position_chunk(0, 5, 2), 0)  # the next forward is a prompt again
    assert (states.plan.start, states.plan.end) == (0, 5)
    cache.reset()
    assert cache.length() == 0 and int(cache.get_seq_length()) == 0 and not cache.in_prompt
    cache.begin_prompt(40)
    assert cache.in_prompt


def test_a_rewound_full_prefill_cache_attends_its_next_prompt_fully():
    """After reset() or set_length(0), in the middle of a "full" prompt: the next chunk at position 0 is a new
    prompt whose queries all attend fully (its streaming heads' keys come back whole), history of the old one gone."""
    for rewind in ("reset", "set_length"):
        cache = DuoCache([LayerRoles(1, 2, 1, 2, 4, PrefillMode("full"))], max_len=40)
        cache.begin_prompt(30)
        cache.update(*position_chunk(0, 20, 2), 0)
        layer = cache.layers[0]
        assert layer.history is not None and layer.history.k.shape == (1, 1, 30, 1)
        cache.reset() if rewind == "reset" else cache.set_length(0)
        k, v = position_chunk(100, 108, 2)  # 8 new tokens: a prompt of 8, all of it dense
        states, _ = cache.update(k, v, 0)
        assert (states.plan.start, states.plan.end, states.plan.n_streamed) == (0, 8, 0), rewind
        assert torch.equal(states.dense[0], k[:, 1:]) and torch.equal(states.dense[1], v[:, 1:])
        layer.end_chunk(states.plan)  # the prompt's last chunk: the history is freed
        assert layer.history is None and not cache.in_prompt


def test_preallocate_allocates_once():
    cache = DuoCache([None, LayerRoles(1, 2, 1, 2, 4)], max_len=10)
    with pytest.raises(ValueError, match=r"^batch_size must be an integer >= 1, got 0$"):
        cache.preallocate(0, torch.float32, "cpu", 1)
    cache.update(*position_chunk(0, 5, 2), 1)
    layer = cache.layers[1]
    cache.preallocate(1, torch.float32, "cpu", 1)  # already allocated: the stored tokens stay
    assert layer.full_k[0, 0, :5, 0].tolist() == [0, 1, 2, 3, 4] and layer.full_v[0, 0, 4, 0] == -4
    assert sorted(layer.ring_k[0, 0, :5, 0].tolist()) == [0, 1, 2, 3, 4]
    assert not cache.layers[0].is_initialized and cache.layers[0].keys is None  # the transformers layer untouched


def test_member_is_the_layers_own_storage():
    cache = one_layer(1, 2, 2, 4, 10)
    layer = cache.layers[0]
    with pytest.raises(RuntimeError, match="^layer 0 is not allocated yet$"):
        layer.member()
    cache.preallocate(3, torch.float32, "cpu", 4)
    m = layer.member()
    assert isinstance(m, Member) and m.batch == 3
    assert m.full_k is layer.full_k and m.full_v is layer.full_v and m.ring_k is layer.ring_k
    assert m.ring_v is layer.ring_v


def test_unsupported_layer_operations_say_why():
    cache = one_layer(1, 2, 2, 3, 8)
    layer = cache.layers[0]
    cache.update(*position_chunk(0, 4, 2), 0)
    batch = "^the DuoAttention cache keeps its batch size; start a new cache instead$"
    with pytest.raises(NotImplementedError, match=batch):
        layer.batch_select_indices(torch.tensor([0]))
    with pytest.raises(NotImplementedError, match=batch):
        layer.batch_repeat_interleave(2)
    layer.crop(0)  # removing nothing is allowed
    for n in (1, -1):
        with pytest.raises(NotImplementedError, match="^a DuoAttention cache cannot be cropped: streaming heads have "
                                                      "already dropped the evicted tokens$"):
            layer.crop(n)
    offloading = "^cache offloading is not supported with DuoAttention$"
    with pytest.raises(NotImplementedError, match=offloading):
        layer.offload()
    with pytest.raises(NotImplementedError, match=offloading):
        layer.prefetch()
    assert cache.length() == 4 and layer.full_k[0, 0, :4, 0].tolist() == [0, 1, 2, 3]


def test_refusals_while_storing_name_the_positions():
    cache = one_layer(1, 2, 2, 4, 10)
    cache.update(*position_chunk(0, 8, 2), 0)
    with pytest.raises(ValueError, match=r"^the DuoAttention cache was sized for 10 tokens; 8 stored \+ 3 new would "
                                         r"not fit \(pass a larger max_new_tokens to generate, or a cache from "
                                         r"handle\.new_cache\(max_len=\.\.\.\)\)$"):
        cache.update(*position_chunk(8, 11, 2), 0)
    full = DuoCache([LayerRoles(1, 2, 1, 2, 4, PrefillMode("full"))], max_len=40)
    full.begin_prompt(12)
    with pytest.raises(ValueError, match=r"^a chunk at positions 0\.\.15 crosses the end of the prompt declared with "
                                         r"cache\.begin_prompt \(12 tokens\): feed the prompt, then the rest$"):
        full.update(*position_chunk(0, 16, 2), 0)
    full.update(*position_chunk(0, 5, 2), 0)  # a prompt of 5 declared by its first forward
    with pytest.raises(ValueError, match=r"^prefill='full' needs the whole prompt in an empty cache: this one holds 5 "
                                         r"tokens, whose streaming heads have dropped their middle tokens \(use "
                                         r"prefill='streaming' to continue a cache\)$"):
        full.begin_prompt(3)
    # the streaming mode continues a cache: a chunk may run past the declared prompt (all its queries stream), a
    # prompt may follow stored tokens
    past = one_layer(1, 2, 2, 4, 40)
    past.begin_prompt(12)
    states, _ = past.update(*position_chunk(0, 16, 2), 0)
    assert (states.plan.start, states.plan.end, states.plan.n_streamed) == (0, 16, 16) and states.dense is None
    stream = one_layer(1, 2, 2, 4, 40)
    stream.update(*position_chunk(0, 16, 2), 0)
    stream.begin_prompt(4)
    assert stream.in_prompt and stream.length() == 16


@pytest.mark.parametrize("mode, chunks, expected", [
    # (start, end, streamed queries, kept for later dense queries) per chunk; None: a decode step
    ("streaming", [10, 1, 1, 8], [(0, 10, 10, False), None, None, (12, 20, 8, False)]),
    ("full", [10, 1, 9, 1], [(0, 10, 0, True), (10, 11, 0, True), (11, 20, 0, False), None]),
    ("window:5", [10, 5, 1, 4, 1], [(0, 10, 10, True), (10, 15, 5, True), (15, 16, 0, True), (16, 20, 0, False),
                                    None]),
    ("full", [20, 1], [(0, 20, 0, False), None]),  # a prompt in one pass keeps nothing
])
def test_chunk_plans_of_a_20_token_prompt_by_hand(mode, chunks, expected):
    """A declared 20-token prompt: full mode's queries all attend fully; window:5's from position 15 on. A chunk is
    kept while a later prompt chunk has dense queries; a token after the prompt is a decode step."""
    cache = DuoCache([LayerRoles(1, 2, 1, 2, 4, PrefillMode.parse(mode))], max_len=40)
    cache.begin_prompt(20)
    t, got = 0, []
    for size in chunks:
        states, _ = cache.update(*position_chunk(t, t + size, 2), 0)
        plan = states.plan
        got.append(None if plan is None else (plan.start, plan.end, plan.n_streamed, plan.record))
        if plan is not None:
            cache.layers[0].end_chunk(plan)
        t += size
    assert got == expected
    assert cache.layers[0].history is None and not cache.in_prompt
    if mode == "streaming":
        return
    fresh = DuoCache([LayerRoles(1, 2, 1, 2, 4, PrefillMode.parse(mode))], max_len=40)
    states, _ = fresh.update(*position_chunk(0, 1, 2), 0)  # a one-token prompt in a dense mode is not a decode step
    assert (states.plan.start, states.plan.end, states.plan.n_streamed) == (0, 1, 0)


def test_kernel_choice_is_checked_against_the_cache_at_allocation():
    capped = DuoCache([LayerRoles(1, 2, 1, 2, 4)], max_len=8, softcap=True, kernels=KernelChoice(streaming_prefill="flex"))
    with pytest.raises(ValueError, match="FlexAttention streaming prefill does not soft-cap"):
        capped.preallocate(1, torch.float32, "cpu", 16)
    assert DuoCache([LayerRoles(1, 2, 1, 2, 4)], max_len=8, kernels=KernelChoice(streaming_prefill="flex")).describe()[
        "streaming_prefill_kernel"] == "flex"
    quantised = DuoCache([LayerRoles(1, 2, 1, 2, 4)], max_len=8, kv_quant=KVQuantConfig(8),
                         kernels=KernelChoice(decode="triton"))
    with pytest.raises(ValueError, match="power-of-two head_dim >= 32, got 16"):
        quantised.preallocate(1, torch.float32, "cpu", 16)
    plain = DuoCache([LayerRoles(1, 2, 1, 2, 4)], max_len=8, kernels=KernelChoice(decode="triton"))
    plain.preallocate(1, torch.float32, "cpu", 16)  # 16 channels suffice unquantised
    assert plain.describe()["decode_kernel"] == "triton"


def test_storage_allocated_under_inference_mode_is_updated_after_it():
    """A cache first used inside inference_mode (a generate call) is later rewound and refilled outside it."""
    cache = one_layer(1, 2, 2, 4, 20)
    with torch.inference_mode():
        cache.update(*position_chunk(0, 6, 2), 0)
    layer = cache.layers[0]
    assert not layer.full_k.is_inference() and not cache.state.clock.is_inference()
    cache.update(*position_chunk(6, 7, 2), 0)  # a decode step outside
    cache.set_length(3)
    cache.fill_random(5, torch.Generator().manual_seed(0))
    assert cache.length() == 5 and (layer.full_k[0, 0, :5, 0] != 0).all()


def test_a_chunk_must_be_planned_by_the_first_layer():
    """The first DuoAttention layer plans each forward's chunk; another layer receiving a chunk it was not planned for
    (none yet, or of another size) is refused."""
    cache = DuoCache([LayerRoles(1, 2, 1, 2, 4)] * 2, max_len=20)
    unplanned = "^a prefill chunk reached layer 1 before it was planned$"
    with pytest.raises(RuntimeError, match=unplanned):
        cache.update(*position_chunk(0, 5, 2), 1)
    cache.update(*position_chunk(0, 5, 2), 0)
    with pytest.raises(RuntimeError, match=unplanned):
        cache.update(*position_chunk(0, 3, 2), 1)
    states, _ = cache.update(*position_chunk(0, 5, 2), 1)  # the planned chunk
    assert (states.plan.start, states.plan.end) == (0, 5) and cache.length() == 5
    assert cache.layers[1].full_k[0, 0, :5, 0].tolist() == [0, 1, 2, 3, 4]


@pytest.mark.skipif(not HAVE_TRITON, reason="needs triton (the interpreter without a GPU)")
@pytest.mark.parametrize("kv_quant", [None, KVQuantConfig(8)], ids=["dense", "int8"])
def test_triton_decode_reads_what_the_cache_allocated(kv_quant):
    """A Triton cache's decode steps (append, then split-KV decode over the cache's own rows, offset tables, splits
    and workspaces) against the torch decode of a cache holding the same tokens: batch 2, two query heads per KV
    head, one retrieval and one streaming KV head."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    caches = {}
    for decode in ("torch", "triton"):
        cache = DuoCache([LayerRoles(1, 2, 2, 2, 4)], max_len=40, kv_quant=kv_quant, kernels=KernelChoice(decode))
        cache.preallocate(2, torch.float32, device, 32)
        cache.fill_random(25, torch.Generator(device=device).manual_seed(0))
        caches[decode] = cache
    assert caches["triton"].describe()["decode_kernel"] == "triton"
    gen = torch.Generator(device=device).manual_seed(1)
    outs = {}
    for decode, cache in caches.items():
        layer, s = cache.layers[0], cache.state
        steps = []
        for step in range(2):
            k = torch.randn(2, 2, 1, 32, generator=gen.manual_seed(10 + step), device=device)
            q = torch.randn(2, 4, 1, 32, generator=gen.manual_seed(20 + step), device=device)
            states, _ = cache.update(k, -k, 0)
            assert states.plan is None  # a decode step
            steps.append(dispatch.decode_rows(s.kernels, q, layer.rows, s.lengths, s.member_lengths, s.workspace,
                                              32 ** -0.5, layer.splits).clone())
        outs[decode] = torch.stack(steps)
    assert outs["triton"].shape == (2, 2, 1, 4, 32)
    torch.testing.assert_close(outs["triton"], outs["torch"], rtol=1e-4, atol=1e-4)


def test_local_layers_keep_the_cache_layers_of_the_config():
    """Layers without roles (Gemma 2's sliding-window layers) get transformers' layer for the config's layer type;
    without a config, a dynamic layer."""
    import transformers
    from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

    from duoattn.cache import DuoLayer

    config = transformers.Gemma2Config(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                       num_attention_heads=4, num_key_value_heads=2, head_dim=8, sliding_window=6)
    assert config.layer_types == ["sliding_attention", "full_attention"] * 2
    roles = LayerRoles(1, 2, 2, 2, 4)
    cache = DuoCache([None, roles, None, roles], max_len=20, config=config)
    assert [type(layer) for layer in cache.layers] == [DynamicSlidingWindowLayer, DuoLayer] * 2
    assert (cache.layers[1].layer_idx, cache.layers[3].layer_idx) == (1, 3)
    assert (cache.state.first_layer, cache.state.last_layer) == (1, 3)
    plain = DuoCache([None, roles], max_len=20)
    assert [type(layer) for layer in plain.layers] == [DynamicLayer, DuoLayer]
    with pytest.raises(ValueError, match="^config has 4 layers, layer_roles has 2$"):
        DuoCache([None, roles], max_len=20, config=config)
    assert len(DuoCache([roles] * 2, max_len=20, config=config).layers) == 2  # no layer needs the config
    with pytest.raises(ValueError, match="^a DuoCache needs at least one DuoAttention layer$"):
        DuoCache([None, None], max_len=4, config=config)
