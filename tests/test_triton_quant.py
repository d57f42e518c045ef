"""The Triton decode kernels over a quantised retrieval cache (decode attention and the fused quantise-and-store
append) against the dense float64 oracle on dequantised inputs.

On a machine without CUDA the kernels run under the Triton interpreter (``conftest.py`` selects it before triton
is imported); without triton the tests are skipped.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

pytest.importorskip("triton")
if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("without a GPU these tests need TRITON_INTERPRET=1 (tests/conftest.py sets it)",
                allow_module_level=True)

from conftest import reference_logits, run_chunks  # noqa: E402
from test_triton_kernels import interpreter_on_numpy2  # noqa: E402, F401 - the same interpreter fix-up

from duoattn import HeadPattern, duo_attention  # noqa: E402
from duoattn.kernels import decode_triton, dispatch  # noqa: E402
from duoattn.kernels.dispatch import KernelChoice  # noqa: E402
from duoattn.kernels.reference import reference_attention  # noqa: E402
from duoattn.quant.kv import KVQuantConfig, QuantizedKV, dequantize, quantize  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def reference_split(q, kd, vd, rk, rv, n_ret, length, cap):
    """float64 oracle of one decode query per head: retrieval KV heads (first ``n_ret``) over the ``length`` stored
    (dequantised) keys, streaming heads over the first ``min(length, cap)`` ring slots (any order)."""
    parts = []
    hq = q.shape[1]
    group = hq // (n_ret + (0 if rk is None else rk.shape[1]))
    if n_ret:
        parts.append(reference_attention(q[:, : n_ret * group].double(), kd[:, :, :length].double(),
                                         vd[:, :, :length].double(), torch.ones(n_ret, dtype=torch.bool), 0, 1,
                                         q_pos=torch.tensor([length - 1])))
    if rk is not None:
        n = min(length, cap)
        parts.append(reference_attention(q[:, n_ret * group :].double(), rk[:, :, :n].double(),
                                         rv[:, :, :n].double(), torch.ones(rk.shape[1], dtype=torch.bool), 0, 1,
                                         q_pos=torch.tensor([n - 1])))
    return torch.cat(parts, dim=1).transpose(1, 2)  # [B, 1, Hq, D]


@pytest.mark.parametrize("bits, group", [(8, None), (4, None), (4, 16), (8, 8)])
@pytest.mark.parametrize("n_ret, n_str, g, splits", [(2, 1, 2, 3), (1, 0, 3, 1), (1, 2, 1, 2)])
def test_quantised_decode_kernel_matches_reference(bits, group, n_ret, n_str, g, splits):
    gen = torch.Generator().manual_seed(bits + n_ret * 10 + splits)
    b, d, max_len, cap = 2, 32, 100, 9
    cfg = KVQuantConfig(bits, group)
    k = (torch.randn(b, n_ret, max_len, d, generator=gen) * 3 + 1).to(DEVICE)  # an offset: zero points matter
    v = torch.randn(b, n_ret, max_len, d, generator=gen).to(DEVICE)
    qk, qv = quantize(k, cfg), quantize(v, cfg)
    rk = torch.randn(b, n_str, cap, d, generator=gen).to(DEVICE) if n_str else None
    rv = torch.randn(b, n_str, cap, d, generator=gen).to(DEVICE) if n_str else None
    hq = (n_ret + n_str) * g
    po = torch.empty(b, n_ret * g, splits, d, dtype=torch.float32, device=DEVICE)
    pl = torch.empty(b, n_ret * g, splits, dtype=torch.float32, device=DEVICE)
    for length in (1, 37, 100):
        q = torch.randn(b, hq, 1, d, generator=gen).to(DEVICE)
        out = torch.full((b, 1, hq, d), float("nan"), device=DEVICE)  # poisoned
        decode_triton.decode_attention_quant(q, qk, qv, rk, rv, torch.tensor(length, device=DEVICE), out, po, pl,
                                             d**-0.5, splits, block=16)
        ref = reference_split(q.cpu(), dequantize(qk).cpu(), dequantize(qv).cpu(),
                              None if rk is None else rk.cpu(), None if rv is None else rv.cpu(), n_ret, length, cap)
        assert not out.isnan().any(), "an output element was never written"
        torch.testing.assert_close(out.cpu().double(), ref, rtol=1e-5, atol=1e-5)


def test_quantised_decode_kernel_refuses_small_head_dims():
    qk = quantize(torch.randn(1, 1, 4, 16), KVQuantConfig(8))
    out = torch.empty(1, 1, 2, 16)
    with pytest.raises(ValueError, match="power-of-two head_dim >= 32"):
        decode_triton.decode_attention_quant(torch.randn(1, 2, 1, 16), qk, qk, None, None, torch.tensor(4), out,
                                             torch.empty(1, 2, 1, 16), torch.empty(1, 2, 1), 1.0, 1)


@pytest.mark.parametrize("bits, group", [(8, None), (4, None), (4, 8)])
def test_fused_quantised_append_stores_what_quantize_stores(bits, group):
    """One launch per token: retrieval heads quantised at ``clock - 1``, streaming heads in their ring slot."""
    b, hkv, n_ret, d, sink, recent, max_len = 2, 3, 2, 32, 2, 3, 12
    cfg = KVQuantConfig(bits, group)
    assert decode_triton.quant_append_supported(d, cfg.group(d))
    fk = QuantizedKV.zeros((b, n_ret), max_len, d, cfg, torch.float32, torch.device(DEVICE))
    fv = QuantizedKV.zeros((b, n_ret), max_len, d, cfg, torch.float32, torch.device(DEVICE))
    rk = torch.zeros(b, hkv - n_ret, sink + recent, d, device=DEVICE)
    rv = torch.zeros_like(rk)
    gen = torch.Generator().manual_seed(bits)
    keys = torch.randn(b, hkv, max_len, d, generator=gen).to(DEVICE) * 2 - 0.5
    values = torch.randn(b, hkv, max_len, d, generator=gen).to(DEVICE)
    for pos in range(max_len):
        decode_triton.append_token_quant(keys[:, :, pos : pos + 1], values[:, :, pos : pos + 1], fk, fv, rk, rv,
                                         torch.tensor(pos + 1, device=DEVICE), sink, recent)
        slot = pos if pos < sink else sink + (pos - sink) % recent
        assert torch.equal(rk[:, :, slot], keys[:, n_ret:, pos]) and torch.equal(rv[:, :, slot], values[:, n_ret:, pos])
    want_k, want_v = quantize(keys[:, :n_ret], cfg), quantize(values[:, :n_ret], cfg)
    # the same scales and zero points, and codes that read back within one step of what quantize() stores
    for got, want, x in ((fk, want_k, keys[:, :n_ret]), (fv, want_v, values[:, :n_ret])):
        torch.testing.assert_close(got.zero, want.zero, rtol=0, atol=0)
        torch.testing.assert_close(got.scale, want.scale, rtol=1e-6, atol=0)
        err = (dequantize(got) - x).abs()
        step = got.scale.repeat_interleave(got.group_size, dim=-1)
        assert (err <= step * 0.5 + 1e-6).all()  # the quantisation bound of duoattn.quant.kv


def test_deployment_on_the_quantised_triton_path_matches_its_oracle():
    """kv_bits=8, Triton decode (quantised append + decode kernels) after a chunked prefill, against the dense oracle
    whose retrieval keys / values went through the same quantise / dequantise round trip."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, attn_implementation="sdpa")  # head_dim 32
    model = LlamaForCausalLM(config).to(DEVICE).eval()
    ids = torch.randint(0, 97, (1, 60), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    pattern = HeadPattern(np.array([[1.0, 0.0], [0.2, 0.9]]), sink=3, recent=10)
    expected = reference_logits(model, pattern, ids, kv_quant=KVQuantConfig(8))
    with torch.no_grad(), duo_attention(model, pattern, kv_bits=8, kernels=KernelChoice(decode="triton"),
                                        cuda_graphs=False) as handle:
        cache = handle.new_cache(64)
        got = run_chunks(model, ids, cache, [25, 25] + [1] * 10)
        assert cache.describe()["decode_kernel"] == "triton" and cache.describe()["kv_bits"] == 8
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_quantised_decode_agrees_with_the_torch_path():
    g = torch.Generator().manual_seed(5)
    k = torch.randn(1, 2, 3000, 128, generator=g).to("cuda", torch.bfloat16)
    v = torch.randn(1, 2, 3000, 128, generator=g).to("cuda", torch.bfloat16)
    q = torch.randn(1, 8, 1, 128, generator=g).to("cuda", torch.bfloat16)
    clock = torch.tensor(3000, device="cuda")
    for bits in (8, 4):
        qk, qv = quantize(k, KVQuantConfig(bits)), quantize(v, KVQuantConfig(bits))
        outs = {}
        for name in ("triton", "torch"):
            ws = dispatch.Workspace()
            kernels = KernelChoice(decode=name).resolve(torch.device("cuda"), 128, quantized=True)
            splits = dispatch.decode_splits(kernels, 1, 2, 3000)
            ws.reserve_decode(1, 8, splits, 8, 128, torch.bfloat16, torch.device("cuda"))
            outs[name] = dispatch.decode_attention(kernels, q, qk, qv, None, None, clock, 3000, ws, 128**-0.5,
                                                   splits).clone()
        err = (outs["triton"].double() - outs["torch"].double()).norm() / outs["torch"].double().norm()
        assert err < 2e-2  # both bfloat16 outputs of float32 math
