"""Split-KV decode attention over a quantised (int8 / int4) retrieval cache, in Triton.

One decoding query per sequence. Each program takes one (sequence, KV head) and one slice of the cached tokens; it
loads tiles of packed codes plus their scales and zero points, dequantises them in registers (float32) and merges
tiles with an online softmax. The ``group`` query heads that share the KV head are processed together, so every
tile is read from memory once. A second small kernel merges the slices. Nothing of the cache is ever written back
dequantised: memory traffic is the packed bytes.

Channels are handled as even / odd halves, the int4 layout (channel ``2i`` in a byte's low nibble, ``2i + 1`` in
its high nibble); int8 reads the same halves with two strided loads, so both widths share one kernel.

Runs on CUDA; on the CPU it runs under the Triton interpreter (``TRITON_INTERPRET=1`` before import) for tests.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ..quant.kv import QuantizedKV


@triton.jit
def _load_halves(base, offs_n, offs_i, stride_t, mask_n, BITS: tl.constexpr):
    """Codes of channels 2i and 2i + 1 for tokens offs_n: two [BLOCK_N, HALF_D] float32 tiles."""
    rows = base + offs_n.to(tl.int64)[:, None] * stride_t  # 64-bit: caches of ~10M tokens pass 2**31 bytes
    if BITS == 4:
        packed = tl.load(rows + offs_i[None, :], mask=mask_n[:, None], other=0)
        lo = (packed & 15).to(tl.float32)
        hi = (packed >> 4).to(tl.float32)
    else:
        lo = tl.load(rows + 2 * offs_i[None, :], mask=mask_n[:, None], other=0).to(tl.float32)
        hi = tl.load(rows + 2 * offs_i[None, :] + 1, mask=mask_n[:, None], other=0).to(tl.float32)
    return lo, hi


@triton.jit
def _dequant(base_s, base_z, offs_n, grp_e, grp_o, stride_t, mask_n, lo, hi):
    rows_s = base_s + offs_n.to(tl.int64)[:, None] * stride_t
    rows_z = base_z + offs_n.to(tl.int64)[:, None] * stride_t
    s_e = tl.load(rows_s + grp_e[None, :], mask=mask_n[:, None], other=0).to(tl.float32)
    z_e = tl.load(rows_z + grp_e[None, :], mask=mask_n[:, None], other=0).to(tl.float32)
    s_o = tl.load(rows_s + grp_o[None, :], mask=mask_n[:, None], other=0).to(tl.float32)
    z_o = tl.load(rows_z + grp_o[None, :], mask=mask_n[:, None], other=0).to(tl.float32)
    return lo * s_e + z_e, hi * s_o + z_o


@triton.jit
def _split_kernel(
    Q, KD, KS, KZ, VD, VS, VZ, M_OUT, L_OUT, O_OUT,
    seq_len, tokens_per_split, sm_scale,
    stride_qb, stride_qh,
    stride_kb, stride_kh, stride_kt, stride_ksb, stride_ksh, stride_kst,
    stride_vb, stride_vh, stride_vt, stride_vsb, stride_vsh, stride_vst,
    H_KV: tl.constexpr, G: tl.constexpr, BLOCK_G: tl.constexpr, HALF_D: tl.constexpr, GROUP: tl.constexpr,
    BITS: tl.constexpr, BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr,
):
    bh = tl.program_id(0)
    split = tl.program_id(1)
    b = (bh // H_KV).to(tl.int64)
    h = (bh % H_KV).to(tl.int64)
    offs_g = tl.arange(0, BLOCK_G)
    offs_i = tl.arange(0, HALF_D)
    mask_g = offs_g < G
    q_rows = Q + b * stride_qb + (h * G + offs_g)[:, None] * stride_qh
    q_e = tl.load(q_rows + 2 * offs_i[None, :], mask=mask_g[:, None], other=0).to(tl.float32) * sm_scale
    q_o = tl.load(q_rows + 2 * offs_i[None, :] + 1, mask=mask_g[:, None], other=0).to(tl.float32) * sm_scale
    grp_e = (2 * offs_i) // GROUP
    grp_o = (2 * offs_i + 1) // GROUP

    m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc_e = tl.zeros([BLOCK_G, HALF_D], dtype=tl.float32)
    acc_o = tl.zeros([BLOCK_G, HALF_D], dtype=tl.float32)
    start = split * tokens_per_split
    stop = tl.minimum(start + tokens_per_split, seq_len)
    kd = KD + b * stride_kb + h * stride_kh
    ks, kz = KS + b * stride_ksb + h * stride_ksh, KZ + b * stride_ksb + h * stride_ksh
    vd = VD + b * stride_vb + h * stride_vh
    vs, vz = VS + b * stride_vsb + h * stride_vsh, VZ + b * stride_vsb + h * stride_vsh
    # A while loop: the interpreter (under NumPy 2.4) cannot take a runtime range bound. Every slice starts with a
    # valid key, so m_i is finite after the first tile.
    n0 = start
    while n0 < stop:
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < stop
        lo, hi = _load_halves(kd, offs_n, offs_i, stride_kt, mask_n, BITS)
        k_e, k_o = _dequant(ks, kz, offs_n, grp_e, grp_o, stride_kst, mask_n, lo, hi)
        s = tl.dot(q_e, tl.trans(k_e), input_precision="ieee") + tl.dot(q_o, tl.trans(k_o), input_precision="ieee")
        s = tl.where(mask_n[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        p = tl.exp(s - m_new[:, None])
        alpha = tl.exp(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        lo, hi = _load_halves(vd, offs_n, offs_i, stride_vt, mask_n, BITS)
        v_e, v_o = _dequant(vs, vz, offs_n, grp_e, grp_o, stride_vst, mask_n, lo, hi)
        acc_e = acc_e * alpha[:, None] + tl.dot(p, v_e, input_precision="ieee")
        acc_o = acc_o * alpha[:, None] + tl.dot(p, v_o, input_precision="ieee")
        m_i = m_new
        n0 += BLOCK_N
    part = bh * NUM_SPLITS + split
    tl.store(M_OUT + part * BLOCK_G + offs_g, m_i)
    tl.store(L_OUT + part * BLOCK_G + offs_g, l_i)
    o_rows = O_OUT + (part * BLOCK_G + offs_g)[:, None] * (2 * HALF_D)
    tl.store(o_rows + 2 * offs_i[None, :], acc_e)
    tl.store(o_rows + 2 * offs_i[None, :] + 1, acc_o)


@triton.jit
def _merge_kernel(
    M_IN, L_IN, O_IN, OUT, stride_ob, stride_oh,
    H_KV: tl.constexpr, G: tl.constexpr, BLOCK_G: tl.constexpr, D: tl.constexpr, NUM_SPLITS: tl.constexpr,
):
    bh = tl.program_id(0)
    b = bh // H_KV
    h = bh % H_KV
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, D)
    m = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    for s in range(NUM_SPLITS):
        m = tl.maximum(m, tl.load(M_IN + (bh * NUM_SPLITS + s) * BLOCK_G + offs_g))
    l_sum = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, D], dtype=tl.float32)
    for s in range(NUM_SPLITS):
        part = bh * NUM_SPLITS + s
        w = tl.exp(tl.load(M_IN + part * BLOCK_G + offs_g) - m)  # an empty slice has m = -inf: weight 0
        l_sum += w * tl.load(L_IN + part * BLOCK_G + offs_g)
        acc += w[:, None] * tl.load(O_IN + (part * BLOCK_G + offs_g)[:, None] * D + offs_d[None, :])
    out = acc / l_sum[:, None]
    rows = OUT + b * stride_ob + (h * G + offs_g)[:, None] * stride_oh
    tl.store(rows + offs_d[None, :], out.to(OUT.dtype.element_ty), mask=(offs_g < G)[:, None])


def _check(k: QuantizedKV, name: str) -> None:
    for part in ("data", "scale", "zero"):
        t = getattr(k, part)
        if t.stride(-1) != 1:
            raise ValueError(f"{name}.{part} must be contiguous along its last dimension")


def quantized_decode_attention(
    q: torch.Tensor, k: QuantizedKV, v: QuantizedKV, scale: float, block_n: int = 64, num_splits: int | None = None
) -> torch.Tensor:
    """One decoding query per sequence over the whole quantised cache.

    Args:
        q: ``[B, Hq, 1, D]``.
        k, v: quantised ``[B, Hkv, T, ...]``; ``D`` a power of two >= 32 (``tl.dot`` tiles of ``D / 2``).
        num_splits: token slices per (sequence, KV head); default fills the GPU about twice.
    Returns:
        ``[B, Hq, 1, D]`` in the dtype of ``q``.
    """
    bsz, hq, c, d = q.shape
    hkv, t = k.data.shape[1], k.num_tokens
    if c != 1:
        raise ValueError(f"the decode kernel takes one query per sequence, got {c}")
    if d < 32 or d & (d - 1):
        raise ValueError(f"head_dim must be a power of two >= 32, got {d}")
    if k.head_dim != d or v.head_dim != d or hq % hkv:
        raise ValueError(f"q [{bsz}, {hq}, 1, {d}] does not match keys of {hkv} heads x {k.head_dim} channels")
    _check(k, "keys")
    _check(v, "values")
    group = hq // hkv
    block_g = max(16, triton.next_power_of_2(group))
    tiles = max(1, math.ceil(t / block_n))
    if num_splits is None:
        sms = torch.cuda.get_device_properties(q.device).multi_processor_count if q.is_cuda else 4
        num_splits = max(1, math.ceil(2 * sms / (bsz * hkv)))
    num_splits = min(num_splits, tiles)
    per_split = math.ceil(tiles / num_splits) * block_n
    num_splits = math.ceil(t / per_split)

    qs = q[:, :, 0]  # [B, Hq, D]
    if qs.stride(-1) != 1:
        qs = qs.contiguous()
    parts = bsz * hkv * num_splits
    m_part = torch.empty(parts, block_g, dtype=torch.float32, device=q.device)
    l_part = torch.empty_like(m_part)
    o_part = torch.empty(parts, block_g, d, dtype=torch.float32, device=q.device)
    out = torch.empty(bsz, hq, d, dtype=q.dtype, device=q.device)
    _split_kernel[(bsz * hkv, num_splits)](
        qs, k.data, k.scale, k.zero, v.data, v.scale, v.zero, m_part, l_part, o_part,
        t, per_split, scale,
        qs.stride(0), qs.stride(1),
        k.data.stride(0), k.data.stride(1), k.data.stride(2),
        k.scale.stride(0), k.scale.stride(1), k.scale.stride(2),
        v.data.stride(0), v.data.stride(1), v.data.stride(2),
        v.scale.stride(0), v.scale.stride(1), v.scale.stride(2),
        H_KV=hkv, G=group, BLOCK_G=block_g, HALF_D=d // 2, GROUP=k.group_size, BITS=k.bits,
        BLOCK_N=block_n, NUM_SPLITS=num_splits,
    )
    _merge_kernel[(bsz * hkv,)](
        m_part, l_part, o_part, out, out.stride(0), out.stride(1),
        H_KV=hkv, G=group, BLOCK_G=block_g, D=d, NUM_SPLITS=num_splits,
    )
    return out.unsqueeze(2)
