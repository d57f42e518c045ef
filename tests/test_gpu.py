"""The deployment path on a GPU in bfloat16: compiled FlexAttention prefill, Triton decode (dense and quantised),
CUDA-graph decode steps inside ``generate``, against references.

Skipped without CUDA. Errors are relative (``||got - ref|| / ||ref||``), bfloat16-sized.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import cache_kwarg, reference_logits, rel, run_chunks
from transformers import LlamaConfig, LlamaForCausalLM

from duoattn import HeadPattern, duo_attention
from duoattn.kernels.dispatch import KernelChoice

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

SINK, RECENT = 64, 256


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=1000, hidden_size=1024, intermediate_size=2048, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=2, head_dim=128, attn_implementation="sdpa")
    with torch.device("cuda"):
        return LlamaForCausalLM(config).to(torch.bfloat16).eval()


def pattern() -> HeadPattern:
    return HeadPattern(np.array([[1.0, 0.0], [0.0, 0.0], [0.3, 0.9], [1.0, 1.0]]), sink=SINK, recent=RECENT)


def ids_of(length, seed):
    return torch.randint(0, 1000, (1, length), generator=torch.Generator().manual_seed(seed)).cuda()


@pytest.mark.parametrize("streaming", ["flex", "blocks"])
def test_chunked_prefill_and_decode_match_the_oracle(model, streaming):
    ids = ids_of(1500, 0)
    expected = reference_logits(model, pattern(), ids)
    with torch.no_grad(), duo_attention(model, pattern(), kernels=KernelChoice(streaming_prefill=streaming)) as h:
        cache = h.new_cache(1536)
        got = run_chunks(model, ids, cache, [512, 512, 200] + [1] * 276)
        assert not cache.state.workspace.kernel.get("flex_failed"), cache.state.workspace.kernel.get("flex_failed")
        assert cache.describe()["decode_kernel"] == "triton"
    assert rel(got[:, :1224], expected[:, :1224]) < 2e-2
    assert rel(got[:, 1224:], expected[:, 1224:]) < 2e-2


@pytest.mark.parametrize("kv_bits", [16, 8, 4])
def test_generate_with_graphs_equals_generate_without(model, kv_bits):
    ids = ids_of(700, 1)
    kw = dict(max_new_tokens=40, do_sample=False, output_scores=True, return_dict_in_generate=True,
              eos_token_id=None, pad_token_id=0, attention_mask=torch.ones_like(ids))
    outs = []
    for graphs in (False, True):
        with duo_attention(model, pattern(), kv_bits=kv_bits, prefill_chunk_size=256, cuda_graphs=graphs) as h:
            outs.append(model.generate(ids, **kw))
            cache = outs[-1][cache_kwarg(model)]
            assert (cache in h.graphs.steps) == graphs, h.graphs.failed
            assert cache.length() == 739
    assert rel(torch.stack(outs[1].scores), torch.stack(outs[0].scores)) < 1e-2


def test_full_attention_generate_matches_the_unpatched_model(model):
    """Every head a retrieval head: generate's logits equal the unpatched model's, teacher-forced on the tokens
    generate chose (comparing two free-running greedy generations would compare different continuations after the
    first bfloat16 near-tie)."""
    ids = ids_of(2000, 2)
    # An explicit mask: with pad_token_id=0 generate would otherwise treat every token 0 in the prompt as padding.
    kw = dict(max_new_tokens=32, do_sample=False, output_logits=True, return_dict_in_generate=True,
              eos_token_id=None, pad_token_id=0, attention_mask=torch.ones_like(ids))
    with duo_attention(model, HeadPattern.uniform(4, 2, 1.0), prefill_chunk_size=512):
        got = model.generate(ids, **kw)
    with torch.no_grad():
        expected = model(got.sequences).logits[:, 1999:2031]
    assert rel(torch.stack(got.logits, dim=1), expected) < 3e-2


def test_split_kv_decode_at_long_context_matches_the_torch_path(model):
    """One long random cache (200K tokens): a decode step on the Triton kernels against the torch path."""
    outs = {}
    token = torch.zeros(1, 1, dtype=torch.long, device="cuda")
    with torch.no_grad(), duo_attention(model, pattern()) as h:
        caches = {name: h.new_cache(200_016, batch_size=1, kernels=KernelChoice(decode=name))
                  for name in ("triton", "torch")}
        caches["triton"].fill_random(200_000, torch.Generator(device="cuda").manual_seed(3))
        for a, b in zip(caches["triton"].layers, caches["torch"].layers):
            for name in ("full_k", "full_v", "ring_k", "ring_v"):
                if getattr(a, name) is not None:
                    getattr(b, name).copy_(getattr(a, name))
        caches["torch"].set_length(200_000)
        for name, cache in caches.items():
            outs[name] = model(token, **{cache_kwarg(model): cache}).logits.clone()
    assert rel(outs["triton"], outs["torch"]) < 2e-2
    tri, ref = caches["triton"].layers[0], caches["torch"].layers[0]
    assert torch.equal(tri.full_k[:, :, 200_000], ref.full_k[:, :, 200_000])  # the appended token, both paths
    assert torch.equal(tri.ring_k, ref.ring_k)
