"""8-bit weight-only linear layers against float64 matmuls and a hand-computed error bound."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_llama
from test_deploy import MIXED
from torch import nn

from duoattn import HeadPattern, duo_attention
from duoattn.models import load_model
from duoattn.quant.weights import Int8Linear, linear_weight_bytes, quantize_linear_weights

PRECISION = {torch.bfloat16: 8, torch.float32: 24, torch.float64: 53}


def linear(k, n, dtype, seed=0, bias=True):
    torch.manual_seed(seed)
    layer = nn.Linear(k, n, bias=bias).to(dtype)
    with torch.no_grad():
        layer.weight[3].zero_()  # an all-zero row must stay exactly zero
        layer.weight[5, 7] = 0.9  # an outlier sets its row's scale
    return layer


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("k", [64, 33])  # bfloat16: 64 takes the fused int8 kernel, 33 the fallback
def test_int8_linear_within_the_hand_bound(dtype, k):
    layer = linear(k, 48, dtype)
    x = torch.randn(2, 5, k, generator=torch.Generator().manual_seed(1)).to(dtype)
    q = Int8Linear.from_linear(layer)
    w = layer.weight.double()
    want = x.double() @ w.T + layer.bias.double()
    # hand bound: |W - q s| <= s / 2 with s = max|W_row| / 127 (rounded up by at most one ulp of the dtype) ...
    s = w.abs().amax(dim=1) / 127 * (1 + 2.0 ** -(PRECISION[dtype] - 1))
    bound = x.double().abs().sum(-1, keepdim=True) * s / 2
    # ... plus the rounding of the output to the activation dtype and of the float32 accumulation
    bound = bound + want.abs() * 2.0 ** -PRECISION[dtype] + 1e-5 * (dtype != torch.float64)
    err = (q(x).double() - want).abs()
    assert q(x).dtype == dtype and q(x).shape == (2, 5, 48)
    assert (err <= bound).all(), f"error exceeds the bound by {(err - bound).max().item():.3e}"
    assert q.weight.dtype == torch.int8 and q.weight[3].eq(0).all() and q.scale[3].item() == 0
    # each row's largest weight gets code 127, or 126 where rounding the scale up to bfloat16 took > 1/254 of it
    top = q.weight.abs().amax(dim=1)[torch.arange(48) != 3]
    assert top.ge(126 if dtype == torch.bfloat16 else 127).all() and top.le(127).all()


def test_linear_weight_memory_halves_in_bfloat16():
    model = tiny_llama().to(torch.bfloat16)
    before = linear_weight_bytes(model)
    shapes = [m.weight.shape for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"]
    replaced = quantize_linear_weights(model)
    assert replaced == len(shapes) == 3 * 7  # q, k, v, o, gate, up, down per layer; the LM head is kept
    assert isinstance(model.lm_head, nn.Linear) and not isinstance(model.lm_head, Int8Linear)
    quantised = sum(n * k + 2 * n for n, k in shapes)  # int8 codes + one bfloat16 scale per output channel
    lm_head = model.lm_head.weight.numel() * 2
    assert linear_weight_bytes(model) == quantised + lm_head
    assert before == 2 * sum(n * k for n, k in shapes) + lm_head
    assert (quantised / (before - lm_head)) == pytest.approx(0.5, abs=0.05)


def test_int8_model_stays_close_to_the_float_model():
    """Tolerance: per-channel int8 moves each weight by at most 1/254 of its row's largest weight; through 3
    layers the logits of this random float32 model move by ~1% of their spread, and we allow 3%."""
    model = tiny_llama().to(torch.float32)
    ids = torch.randint(0, 97, (1, 40), generator=torch.Generator().manual_seed(2))
    want = model(ids).logits
    quantize_linear_weights(model)
    got = model(ids).logits
    err = (got - want).abs().max().item() / want.std().item()
    assert 1e-4 < err < 0.03, err
    # DuoAttention (and its quantised cache) runs on the int8 model unchanged
    with duo_attention(model, HeadPattern(MIXED, sink=2, recent=6), kv_bits=8):
        duo = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert duo.shape == (1, 44)


def test_bad_weight_bits_are_refused():
    with pytest.raises(ValueError, match=r"weight_bits must be one of \(16, 8\), got 4"):
        quantize_linear_weights(tiny_llama(), bits=4)
    with pytest.raises(ValueError, match=r"weight_bits must be one of \(16, 8\), got 4"):
        load_model(weight_bits=4)
    with pytest.raises(ValueError, match="2-D int8"):
        Int8Linear(torch.zeros(3, 4), torch.ones(3), None)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("m", [1, 7, 300])
def test_int8_linear_on_cuda_within_the_hand_bound(m):
    from duoattn.quant import weights

    layer = linear(4096, 1024, torch.bfloat16).cuda()
    q = Int8Linear.from_linear(layer)
    x = torch.randn(m, 4096, generator=torch.Generator().manual_seed(1)).to("cuda", torch.bfloat16)
    want = x.double() @ layer.weight.double().T + layer.bias.double()
    s = layer.weight.double().abs().amax(dim=1) / 127 * (1 + 2.0**-7)
    bound = x.double().abs().sum(-1, keepdim=True) * s / 2 + want.abs() * 2.0**-8 + 1e-3
    err = (q(x).double() - want).abs()
    assert (err <= bound).all(), f"error exceeds the bound by {(err - bound).max().item():.3e}"
    print("fused int8 kernel on CUDA bfloat16:", weights._FUSED_OK.get(("cuda", torch.bfloat16)))
