"""The GPU-only paths against the independent oracle (``tests/oracle.py``), through the public API: compiled
FlexAttention prefill, the Triton split-KV decode, CUDA-graph decoding, and the fused int8 / int4 decode kernel of the
quantised cache. CI cannot run them; run them on a GPU machine whenever a kernel or the fast path changes:

    PYTHONPATH=$PWD python -m pytest -q -m gpu tests/test_gpu_paths.py

and record the result and date in docs/benchmarks.md. The model is bfloat16 (the deployment dtype); the oracle
computes attention in float64 and returns bfloat16, so errors are relative norms of bfloat16 size.
"""

from __future__ import annotations

import numpy as np
import oracle
import pytest
import torch
from conftest import rel, run_chunks
from transformers import LlamaConfig, LlamaForCausalLM

from duoattn import HeadPattern, duo_attention
from duoattn.kernels.dispatch import KernelChoice
from duoattn.quant.kv import KVQuantConfig, dequantize, quantize

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

SINK, RECENT = 64, 256
VOCAB = 1000
LAYERS, KV_HEADS, HEAD_DIM = 4, 4, 128
# Retrieval heads are not first in their layers, and the layers differ in how many they have (0 to 4).
GATES = np.array([[0.1, 0.9, 0.2, 0.8], [0.0, 0.1, 0.2, 0.3], [0.3, 0.2, 0.9, 0.4], [0.6, 0.7, 0.8, 0.9]])
PATTERN = HeadPattern(GATES, sink=SINK, recent=RECENT)
ROLES = oracle.binarize(GATES)  # threshold 0.5

@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=1024, intermediate_size=2048, num_hidden_layers=LAYERS,
                         num_attention_heads=8, num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM,
                         attn_implementation="sdpa", max_position_embeddings=8192)
    with torch.device("cuda"):
        return LlamaForCausalLM(config).to(torch.bfloat16).eval()


def ids_of(batch: int, length: int, seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed)).cuda()


def expected_logits(model, ids: torch.Tensor, codec=None) -> torch.Tensor:
    return torch.cat([oracle.oracle_logits(model, ROLES, SINK, RECENT, row[None], codec=codec) for row in ids])


def test_roles_are_the_oracles(model):
    assert ROLES.sum(1).tolist() == [2, 0, 1, 4]
    with duo_attention(model, PATTERN) as handle:
        np.testing.assert_array_equal(handle.roles, ROLES)


def test_duo_attention_forward_chunked_prefill_and_decode_on_cuda(model):
    ids = ids_of(1, 1500, seed=1)
    expected = expected_logits(model, ids)
    with duo_attention(model, PATTERN) as handle, torch.no_grad():
        assert rel(model(ids).logits, expected) < 2e-2
        cache = handle.new_cache(1100)
        got = run_chunks(model, ids[:, :1100], cache, [512, 512] + [1] * 76)
        assert rel(got, expected[:, :1100]) < 2e-2
        n_ret = int(ROLES.sum())
        tokens = n_ret * 1100 + (ROLES.size - n_ret) * (SINK + RECENT)
        assert cache.kv_bytes() == tokens * HEAD_DIM * 2 * 2  # bfloat16 K and V


@pytest.mark.parametrize("streaming", ["flex", "blocks"])
@pytest.mark.parametrize("batch", [1, 3])
def test_generate_compiled_flex_triton_decode_and_cuda_graph(model, streaming, batch):
    """generate on the one path: chunked prefill (compiled FlexAttention or SDPA blocks), Triton decode replayed
    from a CUDA graph; its scores against the oracle teacher-forced on the tokens generate chose."""
    ids = ids_of(batch, 2000, seed=2)
    kernels = KernelChoice(decode="triton", streaming_prefill=streaming)
    with duo_attention(model, PATTERN, kernels=kernels, prefill_chunk_size=768) as handle, torch.no_grad():
        out = model.generate(ids, max_new_tokens=200, do_sample=False, output_logits=True, eos_token_id=None,
                             return_dict_in_generate=True, attention_mask=torch.ones_like(ids), pad_token_id=0)
        cache = out.past_key_values
        assert cache in handle.graphs.steps, handle.graphs.failed  # decode steps replayed a CUDA graph
        assert not cache.state.workspace.kernel.get("flex_failed")  # compiled FlexAttention really ran
        assert cache.describe()["decode_kernel"] == "triton"
    expected = expected_logits(model, out.sequences)
    assert rel(torch.stack(out.logits, dim=1), expected[:, 1999:2199]) < 2e-2


def test_eager_and_graph_decoding_agree(model):
    ids = ids_of(1, 800, seed=3)
    scores = []
    for graphs in (False, True):
        with duo_attention(model, PATTERN, cuda_graphs=graphs, prefill_chunk_size=400), torch.no_grad():
            out = model.generate(ids, max_new_tokens=100, do_sample=False, output_logits=True, eos_token_id=None,
                                 return_dict_in_generate=True, attention_mask=torch.ones_like(ids), pad_token_id=0)
        scores.append(torch.stack(out.logits, dim=1))
    assert rel(scores[1], scores[0]) < 1e-3


@pytest.mark.parametrize("bits, group", [(8, None), (8, 32), (4, None), (4, 64)])
def test_fused_quantised_decode_equals_the_oracle_with_the_codec(model, bits, group, monkeypatch):
    """Single-token decode steps of a quantised cache on CUDA run the fused Triton kernel (checked by a spy)."""
    from duoattn.kernels import decode_triton

    calls = []
    kernel = decode_triton.decode_rows

    def spy(q, rows, *args, **kwargs):
        calls.append(rows.quantized)
        return kernel(q, rows, *args, **kwargs)

    monkeypatch.setattr(decode_triton, "decode_rows", spy)
    cfg = KVQuantConfig(bits, group)
    ids = ids_of(1, 1300, seed=4)
    expected = expected_logits(model, ids, codec=lambda x: dequantize(quantize(x, cfg)))
    with duo_attention(model, PATTERN, kv_bits=bits, kv_group_size=group) as handle, torch.no_grad():
        cache = handle.new_cache(1300)
        got = run_chunks(model, ids, cache, [1200] + [1] * 100)
        assert cache.kv_bytes() == handle.expected_kv_bytes(1300)
    # Every decode step of every layer with retrieval heads read quantised storage (a layer without any has none).
    assert sum(calls) == 100 * int((ROLES.sum(axis=1) > 0).sum()), "the fused quantised decode kernel did not run"
    assert rel(got, expected) < 2e-2


@pytest.mark.parametrize("bits, group", [(8, None), (8, 32), (4, None), (4, 64)])
def test_fused_quantised_decode_kernel_alone(bits, group):
    """The kernel on its own: one query per head against a long quantised cache (no streaming heads), vs dense
    float64 attention over the dequantised keys and values."""
    from duoattn.kernels.decode_triton import decode_attention_quant

    gen = torch.Generator(device="cuda").manual_seed(6)
    q = torch.randn(2, 8, 1, HEAD_DIM, device="cuda", generator=gen, dtype=torch.bfloat16)  # 4 queries per KV head
    k, v = (torch.randn(2, 2, 5000, HEAD_DIM, device="cuda", generator=gen, dtype=torch.bfloat16) for _ in "kv")
    cfg = KVQuantConfig(bits, group)
    qk, qv = quantize(k, cfg), quantize(v, cfg)
    scale = HEAD_DIM**-0.5
    splits = 16
    out = torch.empty(2, 1, 8, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    po = torch.empty(2, 8, splits, HEAD_DIM, device="cuda")
    pl = torch.empty(2, 8, splits, device="cuda")
    clock = torch.tensor(5000, device="cuda")
    decode_attention_quant(q, qk, qv, None, None, clock, out, po, pl, scale, splits)
    got = out.transpose(1, 2)
    dk, dv = (dequantize(x).double().repeat_interleave(4, dim=1) for x in (qk, qv))
    probs = torch.softmax(q.double() @ dk.transpose(-1, -2) * scale, dim=-1)
    assert got.shape == q.shape and rel(got, probs @ dv) < 1e-2


def test_generate_on_cuda_follows_the_oracle(model):
    """Greedy generation, prefill in chunks: teacher-forced on the oracle's own tokens, the logits agree."""
    ids = ids_of(1, 1000, seed=5)
    want = oracle.oracle_generate(model, ROLES, SINK, RECENT, ids, max_new_tokens=32, min_new_tokens=32,
                                  do_sample=False)
    with duo_attention(model, PATTERN, prefill_chunk_size=256), torch.no_grad():
        got = model.generate(ids, max_new_tokens=32, min_new_tokens=32, do_sample=False)
        forced = model(want).logits
    assert rel(forced, expected_logits(model, want)) < 2e-2
    assert (got[:, 1000:] == want[:, 1000:]).float().mean() > 0.8  # bfloat16 near-ties may flip a few tokens


@pytest.mark.parametrize("bits", [16, 4])
def test_batched_graph_steps_follow_the_oracle_as_sequences_join_and_leave(model, bits):
    """The server's batched decode on the GPU: one CUDA graph per bucket of rows, replayed over a static view that
    is rebound as sequences join and leave (padding rows fill the bucket). Every member row of every step against
    the oracle, teacher-forced."""
    from duoattn.deploy import cache_kwarg
    from duoattn.graphs import BatchGraphs

    prompts = {"A": 300, "B": 1200, "C": 700, "D": 90}
    steps = 12
    ids = {k: ids_of(1, p + steps, seed=20 + i) for i, (k, p) in enumerate(prompts.items())}
    codec = None
    if bits < 16:
        cfg = KVQuantConfig(bits)
        codec = lambda x: dequantize(quantize(x, cfg))  # noqa: E731
    expected = {k: expected_logits(model, x, codec=codec)[0] for k, x in ids.items()}
    done = dict.fromkeys(prompts, 0)
    with duo_attention(model, PATTERN, kv_bits=bits) as handle, torch.no_grad():
        caches = {}
        for k, p in prompts.items():
            caches[k] = handle.new_cache(p + steps)
            run_chunks(model, ids[k][:, :p], caches[k], [512] * (p // 512) + ([p % 512] if p % 512 else []))
        graphs = BatchGraphs(model, cache_kwarg(model), handle.new_cache, max_len=4096)

        def rounds(names, n):
            for _ in range(n):
                tokens = [int(ids[k][0, prompts[k] + done[k]]) for k in names]
                got = graphs.step([caches[k] for k in names], tokens).float()
                for b, k in enumerate(names):
                    want = expected[k][prompts[k] + done[k]].float()
                    assert rel(got[b], want) < 2e-2, (k, done[k])
                    done[k] += 1

        rounds(["A", "B", "C"], 4)
        rounds(["B", "D", "C"], 4)
        rounds(["D", "A"], 4)
        assert graphs.failed is None, graphs.failed
        assert sorted(graphs.steps) == [2, 4] and all(s.fits() for s in graphs.steps.values())
        graphs.unbind()
        for k in prompts:
            assert caches[k].length() == prompts[k] + done[k] == int(caches[k].state.clock)
