"""SDPA kernels against the dense oracle (explicit per-head masks in float64)."""

from __future__ import annotations

import itertools

import pytest
import torch

from duoattn.kernels.attention import causal_attention, dense_attention, streaming_attention
from duoattn.kernels.reference import reference_attention, visibility


def rand(*shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64)


def test_visibility_rule_by_hand():
    # sink 2, recent 3: query 6 sees keys 0, 1 (sink) and 4, 5, 6 (window)
    row = visibility(torch.tensor([6]), torch.arange(8), sink=2, recent=3, streaming=True)[0]
    assert row.tolist() == [True, True, False, False, True, True, True, False]
    row = visibility(torch.tensor([6]), torch.arange(8), sink=2, recent=3, streaming=False)[0]
    assert row.tolist() == [True] * 7 + [False]


CASES = list(
    itertools.product(
        [(4, 4), (6, 2), (3, 1)],  # (query heads, KV heads): MHA, GQA, MQA
        [(33, 33), (40, 1), (57, 9), (64, 64)],  # (T keys, C queries at the end)
        [(0, 1), (4, 8), (3, 20), (50, 40)],  # (sink, recent)
        [None, 5],  # query block size
    )
)


@pytest.mark.parametrize("heads, lengths, window, block", CASES)
def test_streaming_attention_matches_reference(heads, lengths, window, block):
    (hq, hkv), (t, c), (sink, recent) = heads, lengths, window
    seed = hash((heads, lengths, window)) % 1000
    q, k, v = rand(2, hq, c, 8, seed=seed), rand(2, hkv, t, 8, seed=seed + 1), rand(2, hkv, t, 8, seed=seed + 2)
    n_sink = min(sink, t)
    out = streaming_attention(q, k[:, :, :n_sink], v[:, :, :n_sink], k, v, 0, recent, 8**-0.5, block=block)
    ref = reference_attention(q, k, v, torch.zeros(hkv, dtype=torch.bool), sink, recent)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("t, c, run_from", [(100, 10, 60), (100, 1, 70), (300, 37, 200)])
def test_streaming_attention_with_a_partial_run(t, c, run_from):
    """The cache passes only the sink and a tail of the sequence; positions must stay absolute."""
    sink, recent = 4, 30
    q, k, v = rand(1, 4, c, 8, seed=1), rand(1, 2, t, 8, seed=2), rand(1, 2, t, 8, seed=3)
    out = streaming_attention(q, k[:, :, :sink], v[:, :, :sink], k[:, :, run_from:], v[:, :, run_from:], run_from,
                              recent, 8**-0.5)
    ref = reference_attention(q, k, v, torch.zeros(2, dtype=torch.bool), sink, recent)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("t, c", [(20, 20), (20, 1), (20, 7), (5, 5)])
def test_causal_attention_matches_reference(t, c):
    q, k, v = rand(2, 6, c, 8, seed=t), rand(2, 2, t, 8, seed=t + 1), rand(2, 2, t, 8, seed=t + 2)
    ref = reference_attention(q, k, v, torch.ones(2, dtype=torch.bool), sink=0, recent=1)
    torch.testing.assert_close(causal_attention(q, k, v, 8**-0.5), ref, rtol=1e-10, atol=1e-10)


def test_dense_attention_is_plain_softmax_attention():
    q, k, v = rand(1, 4, 1, 8, seed=5), rand(1, 2, 9, 8, seed=6), rand(1, 2, 9, 8, seed=7)
    kk, vv = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
    expected = torch.softmax(q @ kk.transpose(-1, -2) * 8**-0.5, dim=-1) @ vv
    torch.testing.assert_close(dense_attention(q, k, v, 8**-0.5), expected)


def test_streaming_attention_has_gradients_like_reference():
    q = rand(1, 2, 24, 4, seed=11).requires_grad_()
    k, v = rand(1, 1, 24, 4, seed=12), rand(1, 1, 24, 4, seed=13)
    streaming_attention(q, k[:, :, :2], v[:, :, :2], k, v, 0, 5, 0.5).sum().backward()
    q_ref = q.detach().clone().requires_grad_()
    from duoattn.kernels.reference import visibility as vis

    mask = vis(torch.arange(24), torch.arange(24), 2, 5, True)
    scores = (q_ref @ k.transpose(-1, -2) * 0.5).masked_fill(~mask, float("-inf"))
    (scores.softmax(-1) @ v).sum().backward()
    torch.testing.assert_close(q.grad, q_ref.grad)


# ------------------------------------------------------------------------------------ soft-capped scores (Gemma 2)
SOFTCAP = 0.7  # small against scores of ~N(0, 1): tanh is far from linear, so capping changes the result


@pytest.mark.parametrize("heads", [(4, 4), (6, 2)])
@pytest.mark.parametrize("t, c, sink, recent, block", [(40, 40, 3, 7, None), (40, 13, 0, 5, 4), (57, 1, 4, 9, None)])
def test_softcapped_streaming_attention_matches_reference(heads, t, c, sink, recent, block):
    (hq, hkv) = heads
    q, k, v = rand(2, hq, c, 8, seed=t), rand(2, hkv, t, 8, seed=t + 1), rand(2, hkv, t, 8, seed=t + 2)
    n_sink = min(sink, t)
    args = (q, k[:, :, :n_sink], v[:, :, :n_sink], k, v, 0, recent, 8**-0.5)
    out = streaming_attention(*args, block=block, softcap=SOFTCAP)
    ref = reference_attention(q, k, v, torch.zeros(hkv, dtype=torch.bool), sink, recent, softcap=SOFTCAP)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    assert not torch.allclose(out, streaming_attention(*args, block=block), atol=1e-3)  # the cap matters


@pytest.mark.parametrize("t, c", [(30, 30), (30, 1), (30, 11)])
@pytest.mark.parametrize("scores_per_block", [1 << 22, 64])  # one block, or blocks of 2 queries
def test_softcapped_causal_attention_matches_reference(t, c, scores_per_block, monkeypatch):
    import duoattn.kernels.attention as kernels

    monkeypatch.setattr(kernels, "SOFTCAP_SCORES_PER_BLOCK", scores_per_block)
    q, k, v = rand(1, 6, c, 8, seed=t + c), rand(1, 2, t, 8, seed=t + 1), rand(1, 2, t, 8, seed=t + 2)
    ref = reference_attention(q, k, v, torch.ones(2, dtype=torch.bool), sink=0, recent=1, softcap=SOFTCAP)
    torch.testing.assert_close(causal_attention(q, k, v, 8**-0.5, softcap=SOFTCAP), ref, rtol=1e-10, atol=1e-10)


def test_softcapped_dense_attention_by_hand():
    q, k, v = rand(1, 4, 1, 8, seed=21), rand(1, 2, 9, 8, seed=22), rand(1, 2, 9, 8, seed=23)
    kk, vv = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
    scores = q @ kk.transpose(-1, -2) * 8**-0.5
    expected = torch.softmax(SOFTCAP * torch.tanh(scores / SOFTCAP), dim=-1) @ vv
    torch.testing.assert_close(dense_attention(q, k, v, 8**-0.5, softcap=SOFTCAP), expected)


def test_paths_without_softcap_stay_on_sdpa(monkeypatch):
    import duoattn.kernels.attention as kernels

    def forbidden(*args, **kwargs):
        raise AssertionError("math fallback used without softcap")

    monkeypatch.setattr(kernels, "softcapped_attention", forbidden)
    q, k, v = rand(1, 4, 12, 8, seed=31), rand(1, 2, 12, 8, seed=32), rand(1, 2, 12, 8, seed=33)
    causal_attention(q, k, v, 0.3)
    causal_attention(q[:, :, -5:], k, v, 0.3)
    dense_attention(q[:, :, -1:], k, v, 0.3)
    streaming_attention(q, k[:, :, :2], v[:, :, :2], k, v, 0, 4, 0.3)


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

    from duoattn.layout import ChunkPlan

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
