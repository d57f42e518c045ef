"""The fast engine on a GPU in bfloat16: compiled FlexAttention, Triton decode, CUDA graphs, against SDPA references.

Skipped without CUDA. Errors are relative (``||got - ref|| / ||ref||``), bfloat16-sized.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from duoattn import HeadPattern, duo_attention
from duoattn.engine import DecodeRunner, StaticDuoCache, fast_duo_attention, prefill
from duoattn.engine.attention import _decode
from duoattn.kernels.dispatch import KernelChoice

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

SINK, RECENT = 64, 256


def rel(got: torch.Tensor, ref: torch.Tensor) -> float:
    got, ref = got.double(), ref.double()
    assert torch.isfinite(got).all()
    return float((got - ref).norm() / ref.norm())


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=1000, hidden_size=1024, intermediate_size=2048, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=2, head_dim=128, attn_implementation="sdpa")
    with torch.device("cuda"):
        return LlamaForCausalLM(config).to(torch.bfloat16).eval()


def pattern() -> HeadPattern:
    return HeadPattern(np.array([[1.0, 0.0], [0.0, 0.0], [0.3, 0.9], [1.0, 1.0]]), sink=SINK, recent=RECENT)


def core_logits(model, ids) -> torch.Tensor:
    """The core implementation's logits for every position (one pass, its own SDPA kernels)."""
    with duo_attention(model, pattern()):
        return model(ids, use_cache=False).logits


@pytest.mark.parametrize("streaming", ["flex", "blocks"])
def test_engine_prefill_and_graph_decode_match_the_core(model, streaming):
    ids = torch.randint(0, 1000, (1, 3000), generator=torch.Generator().manual_seed(0)).cuda()
    expected = core_logits(model, ids)
    with fast_duo_attention(model, pattern()) as engine:
        cache = engine.new_cache(3072, kernels=KernelChoice(streaming_prefill=streaming))
        last = prefill(model, cache, ids[:, :2600], 1024)
        assert not cache.state.kernel_workspace.get("flex_failed"), cache.state.kernel_workspace.get("flex_failed")
        assert rel(last, expected[:, 2599]) < 2e-2
        runner = DecodeRunner(model, cache)
        assert runner.graph is not None
        got = torch.stack([runner.step(ids[:, t]).clone() for t in range(2600, 3000)], dim=1)
    assert rel(got, expected[:, 2600:3000]) < 2e-2


def test_graph_replay_equals_eager_decoding(model):
    ids = torch.randint(0, 1000, (1, 700), generator=torch.Generator().manual_seed(1)).cuda()
    with fast_duo_attention(model, pattern()) as engine:
        outs = []
        for graph in (False, True):
            cache = engine.new_cache(800)
            prefill(model, cache, ids[:, :600], 300)
            runner = DecodeRunner(model, cache, graph=graph)
            outs.append(torch.stack([runner.step(ids[:, t]).clone() for t in range(600, 700)], dim=1))
            assert cache.length() == 700
    assert rel(outs[1], outs[0]) < 1e-3


def test_full_path_matches_the_unpatched_model(model):
    ids = torch.randint(0, 1000, (1, 2000), generator=torch.Generator().manual_seed(2)).cuda()
    expected = model(ids).logits
    with fast_duo_attention(model, HeadPattern.uniform(4, 2, 1.0)) as engine:
        cache = engine.new_cache(2048)
        last = prefill(model, cache, ids[:, :1500], 512)
        runner = DecodeRunner(model, cache)
        got = torch.stack([runner.step(ids[:, t]).clone() for t in range(1500, 2000)], dim=1)
    assert rel(last, expected[:, 1499]) < 2e-2
    assert rel(got, expected[:, 1500:2000]) < 2e-2


def test_split_kv_decode_at_long_context_matches_sdpa():
    """One long cache (200K tokens, GQA 4:1): the Triton path against the torch path on the same cache."""
    g = torch.Generator(device="cuda").manual_seed(3)
    caches = {}
    for name in ("triton", "torch"):
        cache = StaticDuoCache([2, 1], 1, 200_000, 3, 4, 128, SINK, RECENT, dtype=torch.bfloat16, device="cuda",
                               kernels=KernelChoice(decode=name))
        caches[name] = cache
    caches["triton"].fill_random(199_990, g)
    for a, b in zip(caches["triton"].layers, caches["torch"].layers):
        for name in ("full_k", "full_v", "ring_k", "ring_v"):
            getattr(b, name).copy_(getattr(a, name))
    caches["torch"].set_length(199_990)
    q = torch.randn(1, 12, 1, 128, generator=g, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, 3, 1, 128, generator=g, device="cuda", dtype=torch.bfloat16)
    outs = {}
    for name, cache in caches.items():
        states, _ = cache.update(k, k.neg(), 0)
        outs[name] = _decode(q, states, 128**-0.5).clone()
    assert rel(outs["triton"], outs["torch"]) < 1e-2
    tri, ref = caches["triton"].layers[0], caches["torch"].layers[0]
    assert torch.equal(tri.full_k[:, :, 199_990], k[:, :2, 0]) and torch.equal(tri.full_k, ref.full_k)
    assert torch.equal(tri.ring_k, ref.ring_k) and torch.equal(tri.ring_v, ref.ring_v)
