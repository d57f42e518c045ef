"""DuoLayer / DuoCache bookkeeping with hand-checkable contents: every key is its own position number."""

from __future__ import annotations

import pytest
import torch

from duoattn.cache import DuoCache, DuoLayer
from duoattn.roles import LayerRoles


def roles(retrieval, sink, recent, groups=1):
    return LayerRoles.build(torch.tensor(retrieval), groups, sink, recent, "cpu")


def chunk(t0, t1, heads=3):
    """Keys/values [1, heads, t1 - t0, 1] whose entries are their positions (values: negated)."""
    pos = torch.arange(t0, t1, dtype=torch.float32).view(1, 1, -1, 1).expand(1, heads, -1, 1)
    return pos.clone(), -pos.clone()


def positions(x):
    return x[0, 0, :, 0].tolist()


@pytest.mark.parametrize("sink, recent", [(4, 6), (0, 5), (3, 1), (10, 10)])
@pytest.mark.parametrize("chunks", [[1] * 40, [7, 1, 1, 13, 1, 25, 1, 1], [40], [3, 3, 3, 3, 30]])
def test_streaming_keeps_exactly_sink_and_recent(sink, recent, chunks):
    layer = DuoLayer(roles([True, False, False], sink, recent))
    t = 0
    for size in chunks:
        k, v = chunk(t, t + size)
        ks, vs = layer.update(k, v)
        t += size
        assert positions(ks.full) == list(range(t))  # retrieval head: everything
        assert positions(vs.full) == [-p for p in range(t)]
        kept = set(range(min(sink, t))) | set(range(max(sink, t - recent), t))
        stored = layer.stream_keys[0, 0, :, 0].tolist()
        assert len(stored) == min(t, sink + recent)  # never more than sink + recent slots
        assert set(stored) == kept
        assert layer.stream_keys.shape[1] == 2  # only the two streaming heads are stored
        if size == 1:  # decoding: the returned keys are exactly the visible ones
            assert ks.run is None and set(positions(ks.sink)) == kept
        else:  # a chunk: sink positions + a consecutive run ending at the last query and covering its window
            assert positions(ks.sink) == list(range(min(sink, t)))
            run = positions(ks.run)
            assert run == list(range(ks.run_start, t))
            assert ks.run_start <= max(min(sink, t), t - size - recent + 1)
            assert positions(vs.run) == [-p for p in run]


def test_kv_bytes_match_formula_and_preallocation():
    sink, recent, t = 4, 8, 50
    r = roles([True, False, True, False], sink, recent, groups=2)
    cache = DuoCache([r, r])
    pre = DuoCache([r, r], max_cache_len=64)
    for c in (cache, pre):
        for layer_idx in range(2):
            k, v = chunk(0, 30, heads=4)
            c.update(k, v, layer_idx)
            for step in range(30, t):
                k, v = chunk(step, step + 1, heads=4)
                c.update(k, v, layer_idx)
    per_layer = (2 * t + 2 * min(t, sink + recent)) * 1 * 2 * 4  # heads x tokens x head_dim x (K,V) x fp32
    assert cache.kv_bytes() == 2 * per_layer
    assert pre.kv_bytes() == 2 * (2 * 64 + 2 * (sink + recent)) * 2 * 4  # retrieval preallocated to 64
    assert cache.get_seq_length() == pre.get_seq_length() == t
    for a, b in zip(cache.layers, pre.layers):
        torch.testing.assert_close(a.stream_keys, b.stream_keys)
        torch.testing.assert_close(a.full_keys, b.full_keys[:, :, :t])
    with pytest.raises(ValueError, match="max_cache_len=64"):
        pre.update(*chunk(t, 70, heads=4), 0)


def test_short_sequences_hold_only_what_they_saw():
    layer = DuoLayer(roles([False], 4, 8))
    layer.update(*chunk(0, 5, heads=1))
    assert layer.kv_bytes() == 5 * 2 * 4
    layer.update(*chunk(5, 6, heads=1))
    assert layer.kv_bytes() == 6 * 2 * 4


def test_all_retrieval_and_all_streaming_layers():
    full = DuoLayer(roles([True, True], 2, 3))
    ks, _ = full.update(*chunk(0, 10, heads=2))
    assert ks.sink is None and full.stream_keys is None and positions(ks.full) == list(range(10))
    stream = DuoLayer(roles([False, False], 2, 3))
    ks, _ = stream.update(*chunk(0, 10, heads=2))
    assert ks.full is None and stream.full_keys is None and stream.stream_keys.shape[-2] == 5


def test_batch_operations_and_unsupported_ones():
    layer = DuoLayer(roles([True, False], 2, 3))
    k = torch.arange(2 * 2 * 6, dtype=torch.float32).view(2, 2, 6, 1)
    layer.update(k, k)
    layer.reorder_cache(torch.tensor([1, 0]))
    assert layer.full_keys[0, 0, :, 0].tolist() == k[1, 0, :, 0].tolist()
    layer.batch_select_indices(torch.tensor([1]))
    assert layer.full_keys.shape[0] == 1
    with pytest.raises(NotImplementedError, match="cropped"):
        layer.crop(-2)
    layer.reset()
    assert layer.get_seq_length() == 0 and layer.kv_bytes() == 0
