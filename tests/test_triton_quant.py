"""The Triton decode kernel over a quantised cache against the dense oracle on dequantised inputs.

On a machine without CUDA the kernel runs under the Triton interpreter (``conftest.py`` selects it before triton
is imported); without triton the tests are skipped.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from duoattn.kernels.reference import reference_attention  # noqa: E402
from duoattn.kernels.triton_quant import quantized_decode_attention  # noqa: E402
from duoattn.quant.kv import KVQuantConfig, dequantize, quantize  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("bits, group", [(8, None), (4, None), (4, 16), (8, 8)])
@pytest.mark.parametrize("hq, hkv, t, splits", [(4, 2, 100, 3), (3, 1, 37, None), (2, 1, 1, 2)])
def test_decode_kernel_matches_reference(bits, group, hq, hkv, t, splits):
    g = torch.Generator().manual_seed(t + hq)
    q = torch.randn(2, hq, 1, 32, generator=g).to(DEVICE)
    k = (torch.randn(2, hkv, t, 32, generator=g) * 3 + 1).to(DEVICE)
    v = torch.randn(2, hkv, t, 32, generator=g).to(DEVICE)
    cfg = KVQuantConfig(bits, group)
    qk, qv = quantize(k, cfg), quantize(v, cfg)
    ref = reference_attention(q.cpu(), dequantize(qk).cpu(), dequantize(qv).cpu(), torch.ones(hkv, dtype=torch.bool),
                              0, 1)
    out = quantized_decode_attention(q, qk, qv, 32**-0.5, block_n=16, num_splits=splits)
    assert out.shape == (2, hq, 1, 32) and out.dtype == q.dtype
    torch.testing.assert_close(out.cpu(), ref, rtol=1e-5, atol=1e-5)


def test_decode_kernel_reads_a_preallocated_prefix_in_bfloat16():
    """A cache preallocated for 96 tokens holding 50: the kernel sees only the view of the first 50."""
    g = torch.Generator().manual_seed(0)
    k = torch.randn(1, 2, 96, 64, generator=g).to(DEVICE, torch.bfloat16)
    v = torch.randn(1, 2, 96, 64, generator=g).to(DEVICE, torch.bfloat16)
    q = torch.randn(1, 6, 1, 64, generator=g).to(DEVICE, torch.bfloat16)
    qk, qv = quantize(k, KVQuantConfig(4)).tokens(0, 50), quantize(v, KVQuantConfig(4)).tokens(0, 50)
    ref = reference_attention(q.float().cpu(), dequantize(qk).cpu(), dequantize(qv).cpu(),
                              torch.ones(2, dtype=torch.bool), 0, 1)
    out = quantized_decode_attention(q, qk, qv, 64**-0.5, block_n=16)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float().cpu(), ref, rtol=2e-2, atol=2e-2)  # bfloat16 output rounding


def test_decode_kernel_refuses_bad_shapes():
    qk = quantize(torch.randn(1, 1, 4, 32), KVQuantConfig(8))
    with pytest.raises(ValueError, match="one query per sequence"):
        quantized_decode_attention(torch.randn(1, 2, 3, 32), qk, qk, 1.0)
    with pytest.raises(ValueError, match="power of two"):
        q24 = quantize(torch.randn(1, 1, 4, 24), KVQuantConfig(8))
        quantized_decode_attention(torch.randn(1, 2, 1, 24), q24, q24, 1.0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_decode_dispatches_to_the_kernel_and_agrees_with_the_tiled_path():
    from duoattn.kernels import tiled

    g = torch.Generator().manual_seed(5)
    k = torch.randn(1, 2, 3000, 128, generator=g).to("cuda", torch.bfloat16)
    v = torch.randn(1, 2, 3000, 128, generator=g).to("cuda", torch.bfloat16)
    q = torch.randn(1, 8, 1, 128, generator=g).to("cuda", torch.bfloat16)
    for bits in (8, 4):
        qk, qv = quantize(k, KVQuantConfig(bits)), quantize(v, KVQuantConfig(bits))
        assert tiled._triton_decode() is not None
        fast = tiled.quantized_attention(q, qk, qv, 128**-0.5)
        slow = tiled.quantized_causal_attention(q, qk, qv, 128**-0.5)
        torch.testing.assert_close(fast, slow, rtol=2e-2, atol=2e-2)  # both bfloat16 outputs of float32 math
