"""The fast engine on the CPU: head reordering, the static cache and its ring, prefill and decode against the dense
oracle and the unpatched model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import FAMILIES, reference_logits, tiny_llama

from duoattn import HeadPattern, duo_attention
from duoattn.engine import DecodeRunner, HeadOrder, StaticDuoCache, fast_duo_attention, permute_heads, prefill
from duoattn.engine.enable import enable_fast_duo
from duoattn.engine.plan import ChunkPlan
from duoattn.kernels.dispatch import KernelChoice
from duoattn.patch import ROLES_ATTR

MIXED = np.array([[1.0, 0.0], [0.0, 0.0], [0.2, 0.9]])  # mixed, all streaming, mixed with retrieval second


def ids_of(length, seed=1, vocab=97):
    return torch.randint(0, vocab, (1, length), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------------- reordering
@pytest.mark.parametrize("kv_heads, bias", [(2, False), (4, True), (1, False)])
def test_reordering_keeps_outputs_and_restores_weights_bit_for_bit(kv_heads, bias):
    model = tiny_llama(heads=4, kv_heads=kv_heads, attention_bias=bias)
    ids = ids_of(40)
    before = model(ids).logits
    state = {k: v.clone() for k, v in model.state_dict().items()}
    roles = np.random.default_rng(kv_heads).random((3, kv_heads)) > 0.5
    order = HeadOrder.retrieval_first(roles)
    permute_heads(model, order)
    if not all(torch.equal(torch.sort(p).values, p) for p in order.perms):  # something moved
        assert any(not torch.equal(v, state[k]) for k, v in model.state_dict().items())
    torch.testing.assert_close(model(ids).logits, before, rtol=0, atol=1e-12)
    permute_heads(model, order.inverse())
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_head_order_puts_retrieval_heads_first_stably():
    order = HeadOrder.retrieval_first(np.array([[False, True, False, True], [True, True, False, False]]))
    assert [p.tolist() for p in order.perms] == [[1, 3, 0, 2], [0, 1, 2, 3]]
    assert order.num_retrieval == (2, 2)
    assert order.roles.tolist() == [[True, True, False, False]] * 2
    assert [p.tolist() for p in order.inverse().perms] == [[2, 0, 3, 1], [0, 1, 2, 3]]


def test_reordering_a_fused_qkv_projection_matches_separate_projections():
    """A fused ``qkv_proj`` is permuted exactly as q_proj, k_proj and v_proj stacked."""
    from duoattn.engine.reorder import _permute_module

    torch.manual_seed(0)
    hq, hkv, d, hidden = 4, 2, 3, 5
    sep, fused = torch.nn.Module(), torch.nn.Module()
    for name, out in (("q_proj", hq * d), ("k_proj", hkv * d), ("v_proj", hkv * d)):
        setattr(sep, name, torch.nn.Linear(hidden, out))
    sep.o_proj, fused.o_proj = torch.nn.Linear(hq * d, hidden), torch.nn.Linear(hq * d, hidden)
    fused.qkv_proj = torch.nn.Linear(hidden, (hq + 2 * hkv) * d)
    with torch.no_grad():
        fused.o_proj.weight.copy_(sep.o_proj.weight)
        fused.qkv_proj.weight.copy_(torch.cat([sep.q_proj.weight, sep.k_proj.weight, sep.v_proj.weight]))
        fused.qkv_proj.bias.copy_(torch.cat([sep.q_proj.bias, sep.k_proj.bias, sep.v_proj.bias]))
    q_before = sep.q_proj.weight.clone()
    _permute_module(sep, torch.tensor([1, 0]), hq // hkv, d)
    _permute_module(fused, torch.tensor([1, 0]), hq // hkv, d)
    assert torch.equal(sep.q_proj.weight, torch.cat([q_before[2 * d :], q_before[: 2 * d]]))  # groups of 2 heads
    assert torch.equal(fused.qkv_proj.weight, torch.cat([sep.q_proj.weight, sep.k_proj.weight, sep.v_proj.weight]))
    assert torch.equal(fused.qkv_proj.bias, torch.cat([sep.q_proj.bias, sep.k_proj.bias, sep.v_proj.bias]))
    assert torch.equal(fused.o_proj.weight, sep.o_proj.weight)
    bad = torch.nn.Module()
    bad.qkv_proj, bad.o_proj = torch.nn.Linear(hidden, 7), torch.nn.Linear(hq * d, hidden)
    with pytest.raises(ValueError, match="qkv_proj has 7 outputs"):
        _permute_module(bad, torch.tensor([1, 0]), hq // hkv, d)
    with pytest.raises(ValueError, match="cannot reorder heads"):
        _permute_module(torch.nn.Module(), torch.tensor([1, 0]), hq // hkv, d)


# ----------------------------------------------------------------------------------------------- ring buffer
def position_chunk(t0, t1, heads):
    """Keys / values ``[1, heads, t1 - t0, 1]`` holding their own positions (values negated)."""
    pos = torch.arange(t0, t1, dtype=torch.float32).view(1, 1, -1, 1).expand(1, heads, -1, 1)
    return pos.clone(), -pos.clone()


@pytest.mark.parametrize("sink, recent", [(4, 6), (0, 5), (3, 1), (10, 10), (2, 130)])
@pytest.mark.parametrize("chunks", [[1] * 300, [7, 1, 1, 13, 1, 25] + [1] * 50 + [200], [150, 150], [3, 3, 3, 300]])
def test_ring_keeps_exactly_sink_and_recent_over_many_steps(sink, recent, chunks):
    cache = StaticDuoCache([1], batch_size=1, max_len=320, num_kv_heads=3, num_groups=1, head_dim=1, sink=sink,
                           recent=recent)
    layer = cache.layers[0]
    t = 0
    for size in chunks:
        k, v = position_chunk(t, t + size, 3)
        _, states = layer.update(k, v)
        t += size
        assert cache.length() == t
        assert layer.full_k[0, 0, :t, 0].tolist() == list(range(t))  # retrieval head: everything, in place
        n = min(t, sink + recent)
        kept = set(range(min(sink, t))) | set(range(max(sink, t - recent), t))
        for h in range(2):  # both streaming heads hold exactly the kept positions, values beside their keys
            stored = layer.ring_k[0, h, :n, 0].tolist()
            assert len(set(stored)) == n and set(stored) == kept
            assert layer.ring_v[0, h, :n, 0].tolist() == [-p for p in stored]
        if size > 1:  # the scratch holds what the chunk's streaming queries may see, at the planned indices
            plan = states.plan
            sk, _ = layer.scratch(plan)
            got = sk[0, 0, :, 0]
            assert got[: plan.sink_visible].tolist() == list(range(plan.sink_visible))
            assert got[plan.prefix - plan.n_run : plan.prefix].tolist() == list(range(plan.run_start, plan.start))
            assert got[plan.prefix :].tolist() == list(range(plan.start, plan.end))
            assert plan.run_start <= max(plan.sink_visible, plan.start - recent + 1)


def test_chunk_plan_by_hand():
    # sink 2, recent 4, 10 tokens stored, chunk 10..14: sees 0, 1 and 7, 8, 9;
    # keeps 11, 12, 13 | 14 in slots 3, 4, 5 | 2
    plan = ChunkPlan.build(10, 5, sink=2, recent=4)
    assert (plan.n_sink, plan.run_start, plan.n_run, plan.prefix) == (2, 7, 3, 128)
    # positions 7, 8, 9 live in slots 2 + (p - 2) % 4 = 3, 4, 5
    assert plan.gather == [(0, 0, 2), (125, 3, 3)]
    assert plan.keep == [(1, 3, 3), (4, 2, 1)]


def test_kv_bytes_and_bytes_read_match_the_formula():
    cache = StaticDuoCache([2, 0, 1], batch_size=2, max_len=100, num_kv_heads=2, num_groups=3, head_dim=8, sink=4,
                           recent=6)
    per_token_head = 2 * 8 * 2 * 4  # batch x head_dim x (K, V) x float32
    assert cache.kv_bytes() == ((2 + 1) * 100 + (0 + 2 + 1) * 10) * per_token_head
    assert cache.kv_bytes_read(50) == ((2 + 1) * 50 + 3 * 10) * per_token_head
    assert cache.kv_bytes_read(7) == (3 * 7 + 3 * 7) * per_token_head


def test_bad_cache_inputs_are_refused():
    with pytest.raises(ValueError, match="max_len must be an integer >= 1"):
        StaticDuoCache([1], 1, 0, 2, 1, 8, 4, 4)
    with pytest.raises(ValueError, match="num_retrieval must be in"):
        StaticDuoCache([3], 1, 10, 2, 1, 8, 4, 4)
    with pytest.raises(ValueError, match="decode kernel must be one of"):
        KernelChoice(decode="cuda")
    cache = StaticDuoCache([1], 1, 10, 2, 1, 8, 4, 4)
    with pytest.raises(ValueError, match="holds batch 1 x 2 KV heads"):
        cache.update(torch.zeros(1, 3, 2, 8), torch.zeros(1, 3, 2, 8), 0)
    with pytest.raises(ValueError, match="max_len=10"):
        cache.update(torch.zeros(1, 2, 11, 8), torch.zeros(1, 2, 11, 8), 0)


# ------------------------------------------------------------------------------------------------ end to end
CASES = [  # (KV heads, sink, recent, kernels): MHA / GQA / MQA, windows shorter and longer than a chunk
    (2, 3, 7, "sdpa"), (4, 0, 5, "flex"), (1, 8, 1, "sdpa"), (2, 130, 20, "flex"), (2, 3, 7, "flex"), (4, 0, 5, "sdpa"),
]


@pytest.mark.parametrize("kv_heads, sink, recent, kernels", CASES)
def test_engine_matches_dense_reference(kv_heads, sink, recent, kernels):
    model = tiny_llama(heads=4, kv_heads=kv_heads)
    ids = ids_of(170, seed=kv_heads)
    gates = np.random.default_rng(kv_heads + sink).random((3, kv_heads))
    pattern = HeadPattern(gates, sink=sink, recent=recent)
    expected = reference_logits(model, pattern, ids, sparsity=0.5)
    choice = KernelChoice(streaming_prefill="flex-eager" if kernels == "flex" else "blocks")
    with fast_duo_attention(model, pattern, sparsity=0.5) as engine:
        for chunk in (37, 150):
            cache = engine.new_cache(max_len=180, kernels=choice)
            last = prefill(model, cache, ids[:, :150], chunk)
            torch.testing.assert_close(last, expected[:, 149], rtol=1e-9, atol=1e-9)
            runner = DecodeRunner(model, cache)
            decoded = torch.stack([runner.step(ids[:, t]).clone() for t in range(150, 170)], dim=1)
            torch.testing.assert_close(decoded, expected[:, 150:170], rtol=1e-9, atol=1e-9)


def test_all_retrieval_engine_equals_unpatched_model(tiny_model):
    ids = ids_of(60)
    expected = tiny_model(ids).logits
    tokens = tiny_model.generate(ids[:, :30], max_new_tokens=10, do_sample=False)
    with fast_duo_attention(tiny_model, HeadPattern.uniform(3, 2, 1.0, sink=2, recent=4)) as engine:
        cache = engine.new_cache(max_len=64)
        torch.testing.assert_close(prefill(tiny_model, cache, ids[:, :25], 10), expected[:, 24], rtol=0, atol=1e-12)
        runner = DecodeRunner(tiny_model, cache)
        for t in range(25, 60):
            torch.testing.assert_close(runner.step(ids[:, t]), expected[:, t], rtol=0, atol=1e-12)
        cache = engine.new_cache(max_len=64)
        first = prefill(tiny_model, cache, ids[:, :30], 8).argmax(-1)
        greedy = DecodeRunner(tiny_model, cache).greedy(first, 9)
    assert torch.equal(torch.cat([first[:, None], greedy], dim=1), tokens[:, 30:])


GLOBAL_ONLY = [name for name, fam in FAMILIES.items() if fam.window is None and fam.attn != "eager"]


@pytest.mark.parametrize("family", GLOBAL_ONLY)
def test_engine_matches_dense_reference_in_every_family(family):
    """Biases (Qwen2), q / k norms (Qwen3), the fused qkv projection (Phi-3) through reordering and the engine."""
    model = FAMILIES[family].build(num_layers=3, heads=4, kv_heads=2)
    ids = ids_of(60, seed=5)
    pattern = HeadPattern(np.random.default_rng(1).random((3, 2)), sink=2, recent=6)
    expected = reference_logits(model, pattern, ids, sparsity=0.5)
    with fast_duo_attention(model, pattern, sparsity=0.5) as engine:
        cache = engine.new_cache(max_len=64)
        last = prefill(model, cache, ids[:, :40], 16)
        torch.testing.assert_close(last, expected[:, 39], rtol=1e-9, atol=1e-9)
        runner = DecodeRunner(model, cache)
        decoded = torch.stack([runner.step(ids[:, t]).clone() for t in range(40, 60)], dim=1)
        torch.testing.assert_close(decoded, expected[:, 40:60], rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("family", [name for name in FAMILIES if name not in GLOBAL_ONLY])
def test_engine_refuses_local_layers_and_soft_capping(family):
    model = FAMILIES[family].build(num_layers=4, heads=4, kv_heads=2)
    with pytest.raises(ValueError, match="fast engine does not support"):
        enable_fast_duo(model, HeadPattern.uniform(4, 2, 1.0, sink=2, recent=6))
    assert model.config._attn_implementation == FAMILIES[family].attn  # left as it was


def test_generate_with_the_static_cache_matches_the_core_cache(tiny_model):
    ids = ids_of(40)
    pattern = HeadPattern(MIXED, sink=2, recent=6)
    with duo_attention(tiny_model, pattern):
        expected = tiny_model.generate(ids, max_new_tokens=12, do_sample=False)
    from duoattn.patch import cache_kwarg

    with fast_duo_attention(tiny_model, pattern) as engine:
        cache = engine.new_cache(max_len=64)
        got = tiny_model.generate(ids, max_new_tokens=12, do_sample=False, **{cache_kwarg(tiny_model): cache})
    assert torch.equal(got, expected)


def test_fast_engine_is_reversible_and_refuses_misuse(tiny_model):
    ids = ids_of(30)
    before = tiny_model(ids).logits
    state = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    with fast_duo_attention(tiny_model, HeadPattern(MIXED, sink=1, recent=2)) as engine:
        assert tiny_model.config._attn_implementation == "duoattn_static"
        assert engine.order.num_retrieval == (1, 0, 1)
        with pytest.raises(RuntimeError, match="already enabled"):
            enable_fast_duo(tiny_model, HeadPattern(MIXED))
        cache = engine.new_cache(max_len=8)
        with pytest.raises(ValueError, match="max_len=8"):
            prefill(tiny_model, cache, ids[:, :9], 4)
        cache = engine.new_cache(max_len=8)
        prefill(tiny_model, cache, ids[:, :7], 4)
        runner = DecodeRunner(tiny_model, cache)
        runner.step(ids[:, 7])
        with pytest.raises(ValueError, match="cache is full"):
            runner.step(ids[:, 8])
    assert tiny_model.config._attn_implementation == "sdpa"
    assert not any(hasattr(m, ROLES_ATTR) for m in tiny_model.modules())
    assert all(torch.equal(v, state[k]) for k, v in tiny_model.state_dict().items())
    torch.testing.assert_close(tiny_model(ids).logits, before, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"pattern shape \(2, 2\)"):
        enable_fast_duo(tiny_model, HeadPattern.uniform(2, 2))
    assert tiny_model.config._attn_implementation == "sdpa"


def test_the_static_cache_without_the_engine_is_refused(tiny_model):
    from duoattn.engine.attention import register

    register()
    cache = StaticDuoCache([1, 1, 1], 1, 16, 2, 2, 8, 2, 4, dtype=torch.float64)
    tiny_model.set_attn_implementation("duoattn_static")
    try:
        with pytest.raises(RuntimeError, match="fast engine enabled"):
            tiny_model(ids_of(4), past_key_values=cache)
    finally:
        tiny_model.set_attn_implementation("sdpa")


# ------------------------------------------------------------------------------------------- block-sparse mask
@pytest.mark.parametrize("start, size, sink, recent", [
    (0, 1000, 64, 256), (5000, 1000, 64, 256), (100, 700, 64, 256), (0, 300, 200, 100), (40, 513, 0, 129),
    (300, 2048, 4, 1),
])
def test_flex_block_mask_lists_every_block_with_a_visible_key(start, size, sink, recent):
    """Token-level visibility by absolute position (the oracle's rule) over the scratch layout, reduced to 128 x 128
    blocks, must be covered by the block mask; and the mask must skip the rest of a long chunk."""
    from duoattn.kernels.flex import BLOCK, FlexStreaming
    from duoattn.kernels.reference import visibility

    plan = ChunkPlan.build(start, size, sink, recent)
    flex = FlexStreaming(sink, recent, plan.prefix, torch.device("cpu"))
    listed = flex.block_mask(plan).to_dense()[0, 0].bool()  # [q blocks, kv blocks]
    kv_pos = flex.kv_pos[: plan.scratch_length].long()
    q_pos = torch.arange(start, start + size)
    seen = visibility(q_pos, kv_pos.clamp(min=0), sink, recent, streaming=True) & (kv_pos >= 0)
    # every position the chunk may see appears exactly once in the layout
    expected = visibility(torch.tensor([start + size - 1]), torch.arange(start + size), sink, recent, True)[0]
    assert sorted(kv_pos[seen[-1]].tolist()) == torch.nonzero(expected).flatten().tolist()
    nq, nk = listed.shape
    pad = torch.zeros(nq * BLOCK, nk * BLOCK, dtype=torch.bool)
    pad[:size, : plan.scratch_length] = seen
    needed = pad.view(nq, BLOCK, nk, BLOCK).any(dim=3).any(dim=1)
    assert not (needed & ~listed).any(), "a block holding visible keys is missing from the block mask"
    assert listed.sum(dim=1).max() <= flex.max_blocks()
    if size >= 2048:
        assert listed.float().mean() < 0.5  # long chunks: most blocks are skipped


# ----------------------------------------------------------------------------------------------- compilation
def test_the_decode_step_traces_as_one_graph_reused_across_cache_sizes(tiny_model):
    """Dynamo (eager backend: tracing only) sees the whole decode step - transformers' forward, the static cache, the
    registered attention - as one graph without breaks, reused for a cache of another size: nothing on the decode
    path depends on host-side state. The traced step computes what the plain step computes."""
    from torch._dynamo.utils import counters

    from duoattn.engine.runner import _forward

    ids = ids_of(50)
    torch._dynamo.reset()
    counters.clear()
    step = torch.compile(_forward, backend="eager", fullgraph=True)
    with fast_duo_attention(tiny_model, HeadPattern(MIXED, sink=3, recent=7)) as engine:
        outs = []
        for fn, max_len in ((_forward, 64), (step, 64), (step, 80)):
            cache = engine.new_cache(max_len=max_len)
            prefill(tiny_model, cache, ids[:, :30], 15)
            for layer in cache.layers:
                for t in (layer.full_k, layer.full_v):
                    if t is not None:
                        torch._dynamo.maybe_mark_dynamic(t, 2)
            with torch.no_grad():
                outs.append(torch.stack([fn(tiny_model, ids[:, t : t + 1], cache) for t in range(30, 50)], dim=1))
    for other in outs[1:]:
        torch.testing.assert_close(other, outs[0], rtol=0, atol=1e-12)
    assert not counters["graph_break"] and counters["stats"]["unique_graphs"] == 1


def test_compiled_norms_match_and_are_removed_on_exit(tiny_model):
    ids = ids_of(20)
    pattern = HeadPattern(MIXED, sink=3, recent=7)
    with fast_duo_attention(tiny_model, pattern) as engine:
        expected = prefill(tiny_model, engine.new_cache(20), ids, 10)
    with fast_duo_attention(tiny_model, pattern, compile_norms="eager") as engine:
        assert len(engine.compiled_norms) == 7 and all("forward" in vars(m) for m in engine.compiled_norms)
        got = prefill(tiny_model, engine.new_cache(20), ids, 10)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
    assert not any("forward" in vars(m) for m in tiny_model.modules())
