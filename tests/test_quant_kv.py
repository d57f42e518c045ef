"""int8 / int4 quantisation of KV vectors against a bound computed by hand from each group's min and max."""

from __future__ import annotations

import pytest
import torch

from duoattn.quant.kv import KVQuantConfig, dequantize, pack_int4, quantize, unpack_int4

# significand precision p of each storage dtype: the scale is rounded up by at most 2**-(p - 1) relative
PRECISION = {torch.bfloat16: 8, torch.float16: 11, torch.float32: 24, torch.float64: 53}
WORK_EPS = {torch.bfloat16: 2.0**-23, torch.float16: 2.0**-23, torch.float32: 2.0**-23, torch.float64: 2.0**-52}


def hand_bound(x: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """Per-element bound: half the hand-computed step, widened by the scale's upward rounding, plus a few ulps of
    the work dtype's arithmetic on the group's magnitude."""
    g = x.double().reshape(*x.shape[:-1], -1, group)
    lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    p = PRECISION[x.dtype]
    subnormal_ulp = torch.finfo(x.dtype).smallest_normal * 2.0 ** -(p - 1)  # rounding up below the normal range
    step = (hi - lo) / (2**bits - 1) * (1 + 2.0 ** -(p - 1)) + subnormal_ulp
    magnitude = torch.maximum(lo.abs(), hi.abs())
    bound = step / 2 * (1 + 2.0**-10) + 4 * WORK_EPS[x.dtype] * magnitude
    return bound.expand_as(g).reshape(x.shape)


def roundtrip_error(x: torch.Tensor, bits: int, group: int | None):
    q = quantize(x, KVQuantConfig(bits, group))
    return (dequantize(q).double() - x.double()).abs(), q


def adversarial(dtype: torch.dtype) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(4, 3, 16, 64, generator=g)
    big = 1e30 if dtype != torch.float16 else 5e3  # float16 tops out at 65504
    tiny = 1e-30 if dtype != torch.float16 else 1e-3
    cases = {
        "random": base,
        "constant rows": torch.full((2, 5, 64), 3.25).expand(2, 5, 64).clone(),
        "zero rows": torch.zeros(3, 64),
        "huge range": base * big,
        "negative only": -base.abs() - 7.0,
        "tiny values": base * tiny,
        "one outlier": torch.cat([torch.full((1, 63), 0.5), torch.full((1, 1), 1e3 if dtype != torch.float16 else 6e4)], -1),
        "large offset, small spread": 1000.0 + 0.01 * base,
    }
    return {name: x.to(dtype) for name, x in cases.items()}


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("group", [None, 16, 32])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_roundtrip_within_the_hand_bound(bits, group, dtype):
    for name, x in adversarial(dtype).items():
        err, q = roundtrip_error(x, bits, group)
        bound = hand_bound(x, bits, group or x.shape[-1])
        worst = (err - bound).max().item()
        assert worst <= 0, f"{name}: error exceeds the bound by {worst:.3e}"
        assert q.scale.dtype == q.zero.dtype == dtype and q.data.dtype == torch.uint8
        assert q.data.shape[-1] == 64 * bits // 8 and q.scale.shape[-1] == 64 // (group or 64)


@pytest.mark.parametrize("bits", [8, 4])
def test_constant_groups_are_exact(bits):
    x = torch.tensor([[2.5] * 8 + [-1.0] * 8, [0.0] * 16])  # group 8: every group constant
    err, q = roundtrip_error(x, bits, 8)
    assert err.max().item() == 0.0
    assert (q.scale == 0).all()


@pytest.mark.parametrize("bits", [8, 4])
def test_bound_is_tight_and_codes_span_the_range(bits):
    """The bound is not vacuous: random data comes within 10% of half a step, and min / max hit codes 0 / qmax."""
    x = torch.randn(2000, 64, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    err, q = roundtrip_error(x, bits, None)
    step = (x.amax(-1, keepdim=True) - x.amin(-1, keepdim=True)) / (2**bits - 1)
    assert (err / step).max().item() > 0.45
    codes = unpack_int4(q.data) if bits == 4 else q.data
    assert codes.amin(-1).eq(0).all() and codes.amax(-1).eq(2**bits - 1).all()


def test_int4_packing_by_hand():
    codes = torch.tensor([[1, 2, 15, 0, 7, 8]], dtype=torch.uint8)
    packed = pack_int4(codes)
    assert packed.tolist() == [[0x21, 0x0F, 0x87]]
    every = torch.arange(256, dtype=torch.uint8).view(1, 256)
    assert torch.equal(pack_int4(unpack_int4(every)), every)


def test_int4_codes_by_hand():
    # one group [0, 1, ..., 15] * 0.5 + 1: step exactly 0.5, every value on the grid, so the round trip is exact
    x = torch.arange(16, dtype=torch.float32) * 0.5 + 1.0
    q = quantize(x.view(1, 16), KVQuantConfig(4))
    assert q.scale.item() == 0.5 and q.zero.item() == 1.0
    assert unpack_int4(q.data).flatten().tolist() == list(range(16))
    assert torch.equal(dequantize(q).flatten(), x)


def test_bad_configs_are_refused():
    with pytest.raises(ValueError, match="bits must be 8 or 4"):
        KVQuantConfig(bits=16)
    with pytest.raises(ValueError, match="group_size must be a positive integer"):
        KVQuantConfig(bits=8, group_size=0)
    with pytest.raises(ValueError, match="group_size 24 must divide head_dim 64"):
        quantize(torch.zeros(2, 64), KVQuantConfig(8, 24))
    with pytest.raises(ValueError, match="head_dim must be even"):
        quantize(torch.zeros(2, 7), KVQuantConfig(4))
    with pytest.raises(TypeError, match="floating-point"):
        quantize(torch.zeros(2, 8, dtype=torch.int32), KVQuantConfig(8))


def test_bytes_per_vector_formula():
    # head_dim 128: int4 = 64 bytes of codes + scale and zero point (bf16) = 68; int8 with groups of 32: 128 + 16
    assert KVQuantConfig(4).bytes_per_vector(128, 2) == 68
    assert KVQuantConfig(8, 32).bytes_per_vector(128, 2) == 144
    q = quantize(torch.randn(3, 5, 128, dtype=torch.bfloat16), KVQuantConfig(8, 32))
    assert q.nbytes() == 15 * 144
