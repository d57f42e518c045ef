"""Decode-step kernels in Triton for the static DuoAttention cache (one new token per sequence).

The cache of a layer holds ``n_ret`` retrieval KV heads ``[B, n_ret, max_len, D]`` and ``n_str`` streaming KV heads
in a sink + recent ring ``[B, n_str, sink + recent, D]`` (see ``duoattn.cache``). After head reordering the
query heads of retrieval KV heads come first: query head ``h * G + g`` belongs to KV head ``h``.

* :func:`append_token` writes the new token's keys and values: one launch, every KV head of the layer.
* :func:`decode_attention` (and :func:`decode_attention_quant` over an int8 / int4 retrieval cache) runs split-KV
  attention ("flash-decoding"): the retrieval cache is cut into ``splits``
  ranges per KV head, each program reads its range once for all ``G`` query heads of the group and writes a partial
  output and log-sum-exp; the same launch lets one program per streaming KV head attend over its small ring. A
  second launch merges the partial results of the retrieval heads.

The quantised variant reads packed codes plus their scales and zero points and dequantises them in registers
(float32): memory traffic is the packed bytes. Channels are handled as even / odd halves, the int4 layout (channel
``2i`` in a byte's low nibble, ``2i + 1`` in its high nibble); int8 reads the same halves with two strided loads.

Every kernel addresses storage through the offset table of :class:`~duoattn.kernels.rows.DecodeRows` (row ``b``,
KV head ``h`` starts at ``base + offsets[kind, b, h]``), so the rows may come from one cache or from several
caches of different sizes (a batch view, :mod:`duoattn.batch`); one cache of batch ``B`` is the special case
``offset = b * stride(0) + h * stride(1)``.

The number of cached tokens of row ``b`` is read from a device tensor (``lengths[b]``, or one ``clock`` for every
row), never from the host: a CUDA graph captured once stays valid while the sequences grow. The grid is fixed;
each split of row ``b`` covers ``ceil(lengths[b] / splits)`` tokens.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ..quant.kv import QuantizedKV
from .rows import DecodeRows, length_stride

LOG2E = 1.4426950408889634
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _offset(OFF, idx, ALIGNED: tl.constexpr):
    """A row's element offset from the table; ALIGNED: every key / value offset is a multiple of 16."""
    off = tl.load(OFF + idx)
    if ALIGNED:
        off = tl.multiple_of(off, 16)
    return off


@triton.jit
def _append_kernel(
    K_NEW, V_NEW, BASE, OFF, LEN,
    s_kb, s_kh, s_vb, s_vh,
    s_ok, s_ob, s_len, s_t,
    n_ret, sink, recent,
    D: tl.constexpr, ALIGNED: tl.constexpr,
):
    h = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1).to(tl.int64)
    pos = tl.load(LEN + b * s_len).to(tl.int64) - 1
    d = tl.arange(0, D)
    k = tl.load(K_NEW + b * s_kb + h * s_kh + d)
    v = tl.load(V_NEW + b * s_vb + h * s_vh + d)
    # Retrieval heads store at the position; streaming heads at duoattn.layout.ring_slot.
    slot = tl.where((h < n_ret) | (pos < sink), pos, sink + (pos - sink) % recent)
    k_off = _offset(OFF, b * s_ob + h, ALIGNED)
    v_off = _offset(OFF + s_ok, b * s_ob + h, ALIGNED)
    tl.store(BASE + k_off + slot * s_t + d, k)
    tl.store(BASE + v_off + slot * s_t + d, v)


@triton.jit
def _attend_tile(acc, m, l, q, K, V, s_t, start, hi, qk_scale, BLOCK: tl.constexpr, D: tl.constexpr,
                 PRECISION: tl.constexpr):
    n = start + tl.arange(0, BLOCK)
    d = tl.arange(0, D)
    valid = n < hi
    k = tl.load(K + n[:, None] * s_t + d[None, :], mask=valid[:, None], other=0.0)
    v = tl.load(V + n[:, None] * s_t + d[None, :], mask=valid[:, None], other=0.0)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
    s = tl.where(valid[None, :], s, float("-inf"))
    m_new = tl.maximum(m, tl.max(s, 1))
    alpha = tl.exp2(m - m_new)
    p = tl.exp2(s - m_new[:, None])
    l = l * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return acc, m_new, l


@triton.jit
def _attend_range(acc, m, l, q, K, V, s_t, lo, hi, qk_scale, BLOCK: tl.constexpr, D: tl.constexpr,
                  PRECISION: tl.constexpr, INTERPRETED: tl.constexpr):
    """Online softmax of queries ``q [GP, D]`` over keys ``lo..hi-1``; scores in the log2 domain."""
    if INTERPRETED:  # the interpreter (under NumPy 2.4) cannot take a runtime range bound
        start = lo
        while start < hi:
            acc, m, l = _attend_tile(acc, m, l, q, K, V, s_t, start, hi, qk_scale, BLOCK, D, PRECISION)
            start += BLOCK
    else:  # scf.for: software-pipelined loads (a while loop is not)
        for start in range(lo, hi, BLOCK):
            acc, m, l = _attend_tile(acc, m, l, q, K, V, s_t, start, hi, qk_scale, BLOCK, D, PRECISION)
    return acc, m, l


@triton.jit
def _decode_kernel(
    Q, BASE, OFF, LEN, OUT, PO, PL,
    s_qb, s_qh,
    s_ok, s_ob, s_len, s_t,
    s_outb, s_outh,
    s_pb, s_ph, s_ps,
    s_lb, s_lh,
    n_ret, cap, qk_scale,
    G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr, SPLITS: tl.constexpr,
    PRECISION: tl.constexpr, INTERPRETED: tl.constexpr, ALIGNED: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1).to(tl.int64)
    length = tl.load(LEN + b * s_len).to(tl.int64)
    g = tl.arange(0, GP)
    d = tl.arange(0, D)
    g_ok = g < G  # query rows beyond the group are padding for tl.dot (at least 16 rows)
    acc = tl.zeros([GP, D], dtype=tl.float32)
    m = tl.full([GP], float("-inf"), dtype=tl.float32)
    l = tl.zeros([GP], dtype=tl.float32)
    if pid < n_ret * SPLITS:
        h = pid // SPLITS
        s = pid % SPLITS
        heads = h * G + g
        q = tl.load(Q + b * s_qb + heads[:, None] * s_qh + d[None, :], mask=g_ok[:, None], other=0.0)
        per = tl.cdiv(tl.cdiv(length, SPLITS), BLOCK) * BLOCK
        lo = s * per
        hi = tl.minimum(lo + per, length)
        k_off = _offset(OFF, b * s_ob + h, ALIGNED)
        v_off = _offset(OFF + s_ok, b * s_ob + h, ALIGNED)
        acc, m, l = _attend_range(
            acc, m, l, q, BASE + k_off, BASE + v_off, s_t, lo, hi, qk_scale, BLOCK, D, PRECISION, INTERPRETED,
        )
        has = l > 0  # an empty split contributes nothing to the merge
        l_safe = tl.where(has, l, 1.0)
        lse = tl.where(has, m + tl.log2(l_safe), float("-inf"))
        o = acc / l_safe[:, None]
        tl.store(PO + b * s_pb + heads[:, None] * s_ph + s * s_ps + d[None, :], o, mask=g_ok[:, None])
        tl.store(PL + b * s_lb + heads * s_lh + s, lse, mask=g_ok)
    else:
        kv = n_ret + pid - n_ret * SPLITS
        heads = kv * G + g
        q = tl.load(Q + b * s_qb + heads[:, None] * s_qh + d[None, :], mask=g_ok[:, None], other=0.0)
        # While the sequence is shorter than the ring, slot = position: the first `length` slots are filled.
        n = tl.minimum(length, cap)
        k_off = _offset(OFF, b * s_ob + kv, ALIGNED)
        v_off = _offset(OFF + s_ok, b * s_ob + kv, ALIGNED)
        acc, m, l = _attend_range(
            acc, m, l, q, BASE + k_off, BASE + v_off, s_t, 0, n, qk_scale, BLOCK, D, PRECISION, INTERPRETED,
        )
        o = acc / l[:, None]
        tl.store(OUT + b * s_outb + heads[:, None] * s_outh + d[None, :], o.to(OUT.dtype.element_ty),
                 mask=g_ok[:, None])


@triton.jit
def _combine_kernel(
    PO, PL, OUT,
    s_pb, s_ph, s_ps,
    s_lb, s_lh,
    s_ob, s_oh,
    SPLITS: tl.constexpr, SP: tl.constexpr, CHUNK: tl.constexpr, D: tl.constexpr,
):
    hq = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1).to(tl.int64)
    idx = tl.arange(0, SP)
    lse = tl.load(PL + b * s_lb + hq * s_lh + idx, mask=idx < SPLITS, other=float("-inf"))
    m = tl.max(lse, 0)
    total = tl.sum(tl.exp2(lse - m), 0)
    d = tl.arange(0, D)
    c = tl.arange(0, CHUNK)
    acc = tl.zeros([D], dtype=tl.float32)
    for start in range(0, SPLITS, CHUNK):
        sidx = start + c
        ok = sidx < SPLITS
        w = tl.exp2(tl.load(PL + b * s_lb + hq * s_lh + sidx, mask=ok, other=float("-inf")) - m)
        o = tl.load(PO + b * s_pb + hq * s_ph + sidx[:, None] * s_ps + d[None, :], mask=ok[:, None], other=0.0)
        acc += tl.sum(w[:, None] * o, 0)
    tl.store(OUT + b * s_ob + hq * s_oh + d, (acc / total).to(OUT.dtype.element_ty))


@triton.jit
def _load_halves(base, offs_n, offs_i, stride_t, mask_n, BITS: tl.constexpr):
    """Codes of channels 2i and 2i + 1 for tokens offs_n: two [BLOCK_N, HALF_D] float32 tiles."""
    rows = base + offs_n.to(tl.int64)[:, None] * stride_t  # 64-bit: caches of ~10M tokens pass 2**31 bytes
    if BITS == 4:
        packed = tl.load(rows + offs_i[None, :], mask=mask_n[:, None], other=0)
        lo = (packed & 15).to(tl.float32)
        hi = (packed >> 4).to(tl.float32)
    else:  # one coalesced load of whole rows, then split into even / odd channels in registers
        HALF_D: tl.constexpr = offs_i.shape[0]
        d = tl.arange(0, 2 * HALF_D)
        codes = tl.load(rows + d[None, :], mask=mask_n[:, None], other=0)
        pairs = tl.reshape(codes, [codes.shape[0], HALF_D, 2])
        lo, hi = tl.split(pairs)
        lo = lo.to(tl.float32)
        hi = hi.to(tl.float32)
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
def _attend_tile_quant(acc_e, acc_o, m, l, qe, qo, q_e, q_o, q_sum, KD, KS, KZ, VD, VS, VZ, s_kt, s_kst, s_vt,
                       s_vst, n0, hi, qk_scale, BLOCK: tl.constexpr, HALF_D: tl.constexpr, GROUP: tl.constexpr,
                       BITS: tl.constexpr, PRECISION: tl.constexpr):
    i = tl.arange(0, HALF_D)
    n = n0 + tl.arange(0, BLOCK)
    valid = n < hi
    rows = n.to(tl.int64)
    dot_type = qe.dtype
    lo_c, hi_c = _load_halves(KD, n, i, s_kt, valid, BITS)
    if GROUP == 2 * HALF_D:
        ks = tl.load(KS + rows * s_kst, mask=valid, other=0).to(tl.float32)
        kz = tl.load(KZ + rows * s_kst, mask=valid, other=0).to(tl.float32)
        qc = tl.dot(qe, tl.trans(lo_c.to(dot_type)), input_precision=PRECISION)
        qc += tl.dot(qo, tl.trans(hi_c.to(dot_type)), input_precision=PRECISION)
        s = qc * ks[None, :] + q_sum[:, None] * kz[None, :]
    else:
        k_e, k_o = _dequant(KS, KZ, n, (2 * i) // GROUP, (2 * i + 1) // GROUP, s_kst, valid, lo_c, hi_c)
        s = tl.dot(q_e, tl.trans(k_e), input_precision="ieee")
        s += tl.dot(q_o, tl.trans(k_o), input_precision="ieee")
    s = tl.where(valid[None, :], s * qk_scale, float("-inf"))
    m_new = tl.maximum(m, tl.max(s, 1))
    alpha = tl.exp2(m - m_new)
    p = tl.exp2(s - m_new[:, None])
    l = l * alpha + tl.sum(p, 1)
    lo_c, hi_c = _load_halves(VD, n, i, s_vt, valid, BITS)
    if GROUP == 2 * HALF_D:
        vs = tl.load(VS + rows * s_vst, mask=valid, other=0).to(tl.float32)
        vz = tl.load(VZ + rows * s_vst, mask=valid, other=0).to(tl.float32)
        pw = (p * vs[None, :]).to(dot_type)
        pz = tl.sum(p * vz[None, :], 1)
        acc_e = acc_e * alpha[:, None] + tl.dot(pw, lo_c.to(dot_type), input_precision=PRECISION) + pz[:, None]
        acc_o = acc_o * alpha[:, None] + tl.dot(pw, hi_c.to(dot_type), input_precision=PRECISION) + pz[:, None]
    else:
        v_e, v_o = _dequant(VS, VZ, n, (2 * i) // GROUP, (2 * i + 1) // GROUP, s_vst, valid, lo_c, hi_c)
        acc_e = acc_e * alpha[:, None] + tl.dot(p, v_e, input_precision="ieee")
        acc_o = acc_o * alpha[:, None] + tl.dot(p, v_o, input_precision="ieee")
    return acc_e, acc_o, m_new, l


@triton.jit
def _attend_range_quant(acc_e, acc_o, m, l, q_e, q_o, KD, KS, KZ, VD, VS, VZ, s_kt, s_kst, s_vt, s_vst, lo, hi,
                        qk_scale, BLOCK: tl.constexpr, HALF_D: tl.constexpr, GROUP: tl.constexpr, BITS: tl.constexpr,
                        PRECISION: tl.constexpr, INTERPRETED: tl.constexpr):
    """Online softmax (log2 domain) of query halves ``q_e, q_o [GP, D/2]`` (float32) over quantised keys
    ``lo..hi-1``.

    With one scale per vector (``GROUP == D``) nothing is dequantised: ``q . (c s + z) = s (q . c) + z sum(q)`` and
    ``sum_n p_n (c_n s_n + z_n) = (p s) . c + p . z``, so the dots run on the integer codes (exact in bfloat16) on
    tensor cores. Smaller groups dequantise each tile in registers. A non-empty range starts with a valid key, so
    ``m`` is finite after the first tile.
    """
    dot_type = q_e.dtype if PRECISION == "ieee" else tl.bfloat16
    q_sum = tl.sum(q_e, 1) + tl.sum(q_o, 1)
    qe = q_e.to(dot_type)
    qo = q_o.to(dot_type)
    if INTERPRETED:  # the interpreter (under NumPy 2.4) cannot take a runtime range bound
        n0 = lo
        while n0 < hi:
            acc_e, acc_o, m, l = _attend_tile_quant(acc_e, acc_o, m, l, qe, qo, q_e, q_o, q_sum, KD, KS, KZ, VD, VS,
                                                    VZ, s_kt, s_kst, s_vt, s_vst, n0, hi, qk_scale, BLOCK, HALF_D,
                                                    GROUP, BITS, PRECISION)
            n0 += BLOCK
    else:
        for n0 in range(lo, hi, BLOCK):
            acc_e, acc_o, m, l = _attend_tile_quant(acc_e, acc_o, m, l, qe, qo, q_e, q_o, q_sum, KD, KS, KZ, VD, VS,
                                                    VZ, s_kt, s_kst, s_vt, s_vst, n0, hi, qk_scale, BLOCK, HALF_D,
                                                    GROUP, BITS, PRECISION)
    return acc_e, acc_o, m, l


@triton.jit
def _append_quant_kernel(
    K_NEW, V_NEW, CODES, BASE, OFF, LEN,
    s_kb, s_kh, s_vb, s_vh,
    s_ok, s_ob, s_len, s_ct, s_st, s_t,
    n_ret, sink, recent,
    HALF_D: tl.constexpr, GROUP: tl.constexpr, BITS: tl.constexpr, ROUND_UP_16: tl.constexpr,
    ALIGNED: tl.constexpr,
):
    """One token: retrieval heads quantised (duoattn.quant.kv.quantize, one launch for keys and values), streaming
    heads into the ring. Group minima / maxima come from the even / odd channel halves."""
    h = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1).to(tl.int64)
    pos = tl.load(LEN + b * s_len).to(tl.int64) - 1
    i = tl.arange(0, HALF_D)
    NG: tl.constexpr = 2 * HALF_D // GROUP
    row_h = b * s_ob + h
    if h < n_ret:
        for which in tl.static_range(2):
            src = K_NEW + b * s_kb + h * s_kh if which == 0 else V_NEW + b * s_vb + h * s_vh
            data = CODES + _offset(OFF + which * s_ok, row_h, ALIGNED)
            scale_p = BASE + tl.load(OFF + (2 + 2 * which) * s_ok + row_h)
            zero_p = BASE + tl.load(OFF + (3 + 2 * which) * s_ok + row_h)
            x_e = tl.load(src + 2 * i)
            x_o = tl.load(src + 2 * i + 1)
            ge = tl.reshape(x_e.to(tl.float32), [NG, GROUP // 2])
            go = tl.reshape(x_o.to(tl.float32), [NG, GROUP // 2])
            lo = tl.minimum(tl.min(ge, 1), tl.min(go, 1))  # [NG]
            hi = tl.maximum(tl.max(ge, 1), tl.max(go, 1))
            step = (hi - lo) / (2**BITS - 1)
            stored = step.to(x_e.dtype)
            if ROUND_UP_16:  # round the scale up to the storage dtype, so codes never overflow
                below = stored.to(tl.float32) < step
                bumped = (stored.to(tl.int16, bitcast=True) + 1).to(x_e.dtype, bitcast=True)
                stored = tl.where(below, bumped, stored)
            z = lo.to(x_e.dtype)
            sf = stored.to(tl.float32)
            div = tl.where(sf == 0, 1.0, sf)
            ce = tl.reshape(tl.floor((ge - lo[:, None]) / div[:, None] + 0.5), [HALF_D])
            co = tl.reshape(tl.floor((go - lo[:, None]) / div[:, None] + 0.5), [HALF_D])
            ce = tl.minimum(tl.maximum(ce, 0.0), 2**BITS - 1).to(tl.uint8)
            co = tl.minimum(tl.maximum(co, 0.0), 2**BITS - 1).to(tl.uint8)
            row = data + pos * s_ct
            if BITS == 4:
                tl.store(row + i, ce | (co << 4))
            else:
                tl.store(row + 2 * i, ce)
                tl.store(row + 2 * i + 1, co)
            g = tl.arange(0, NG)
            tl.store(scale_p + pos * s_st + g, stored)
            tl.store(zero_p + pos * s_st + g, z)
    else:
        # duoattn.layout.ring_slot
        slot = tl.where(pos < sink, pos, sink + (pos - sink) % recent)
        d = tl.arange(0, 2 * HALF_D)
        k_off = _offset(OFF, row_h, ALIGNED)
        v_off = _offset(OFF + s_ok, row_h, ALIGNED)
        tl.store(BASE + k_off + slot * s_t + d, tl.load(K_NEW + b * s_kb + h * s_kh + d))
        tl.store(BASE + v_off + slot * s_t + d, tl.load(V_NEW + b * s_vb + h * s_vh + d))


@triton.jit
def _decode_quant_kernel(
    Q, CODES, BASE, OFF, LEN, OUT, PO, PL,
    s_qb, s_qh,
    s_ok, s_ob, s_len, s_ct, s_st, s_t,
    s_outb, s_outh,
    s_pb, s_ph, s_ps,
    s_lb, s_lh,
    n_ret, cap, qk_scale,
    G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, HALF_D: tl.constexpr, GROUP: tl.constexpr,
    BITS: tl.constexpr, BLOCK: tl.constexpr, SPLITS: tl.constexpr, PRECISION: tl.constexpr,
    INTERPRETED: tl.constexpr, ALIGNED: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1).to(tl.int64)
    length = tl.load(LEN + b * s_len).to(tl.int64)
    g = tl.arange(0, GP)
    g_ok = g < G
    if pid < n_ret * SPLITS:
        h = pid // SPLITS
        s = pid % SPLITS
        heads = h * G + g
        i = tl.arange(0, HALF_D)
        q_rows = Q + b * s_qb + heads[:, None] * s_qh
        q_e = tl.load(q_rows + 2 * i[None, :], mask=g_ok[:, None], other=0.0).to(tl.float32)
        q_o = tl.load(q_rows + 2 * i[None, :] + 1, mask=g_ok[:, None], other=0.0).to(tl.float32)
        acc_e = tl.zeros([GP, HALF_D], dtype=tl.float32)
        acc_o = tl.zeros([GP, HALF_D], dtype=tl.float32)
        m = tl.full([GP], float("-inf"), dtype=tl.float32)
        l = tl.zeros([GP], dtype=tl.float32)
        per = tl.cdiv(tl.cdiv(length, SPLITS), BLOCK) * BLOCK
        lo = s * per
        hi = tl.minimum(lo + per, length)
        row_h = b * s_ob + h
        acc_e, acc_o, m, l = _attend_range_quant(
            acc_e, acc_o, m, l, q_e, q_o,
            CODES + _offset(OFF, row_h, ALIGNED), BASE + tl.load(OFF + 2 * s_ok + row_h),
            BASE + tl.load(OFF + 3 * s_ok + row_h),
            CODES + _offset(OFF + s_ok, row_h, ALIGNED), BASE + tl.load(OFF + 4 * s_ok + row_h),
            BASE + tl.load(OFF + 5 * s_ok + row_h),
            s_ct, s_st, s_ct, s_st, lo, hi, qk_scale, BLOCK, HALF_D, GROUP, BITS, PRECISION, INTERPRETED,
        )
        has = l > 0
        l_safe = tl.where(has, l, 1.0)
        lse = tl.where(has, m + tl.log2(l_safe), float("-inf"))
        rows = PO + b * s_pb + heads[:, None] * s_ph + s * s_ps
        tl.store(rows + 2 * i[None, :], acc_e / l_safe[:, None], mask=g_ok[:, None])
        tl.store(rows + 2 * i[None, :] + 1, acc_o / l_safe[:, None], mask=g_ok[:, None])
        tl.store(PL + b * s_lb + heads * s_lh + s, lse, mask=g_ok)
    else:
        kv = n_ret + pid - n_ret * SPLITS
        heads = kv * G + g
        d = tl.arange(0, D)
        q = tl.load(Q + b * s_qb + heads[:, None] * s_qh + d[None, :], mask=g_ok[:, None], other=0.0)
        acc = tl.zeros([GP, D], dtype=tl.float32)
        m = tl.full([GP], float("-inf"), dtype=tl.float32)
        l = tl.zeros([GP], dtype=tl.float32)
        n = tl.minimum(length, cap)
        k_off = _offset(OFF, b * s_ob + kv, ALIGNED)
        v_off = _offset(OFF + s_ok, b * s_ob + kv, ALIGNED)
        acc, m, l = _attend_range(
            acc, m, l, q, BASE + k_off, BASE + v_off, s_t, 0, n, qk_scale, BLOCK, D, PRECISION, INTERPRETED,
        )
        o = acc / l[:, None]
        tl.store(OUT + b * s_outb + heads[:, None] * s_outh + d[None, :], o.to(OUT.dtype.element_ty),
                 mask=g_ok[:, None])


def _check_head_dim(d: int) -> None:
    if d < 16 or d & (d - 1):
        raise ValueError(f"the Triton decode kernels need a power-of-two head_dim >= 16, got {d}")


def append_rows(k: torch.Tensor, v: torch.Tensor, rows: DecodeRows, lengths: torch.Tensor, sink: int,
                recent: int) -> None:
    """Store ``k, v [B, Hkv, 1, D]``: row ``b`` at position ``lengths[b] - 1`` (KV heads ``< n_ret`` in the
    retrieval storage, quantised if it is; the rest in the ring slot). ``lengths``: a 0-d clock or ``[B]``."""
    bsz, hkv, _, d = k.shape
    if bsz != rows.batch:
        raise ValueError(f"keys hold {bsz} rows, the storage {rows.batch}")
    offsets, base, codes = rows.tables()
    common = (k.stride(0), k.stride(1), v.stride(0), v.stride(1), offsets.stride(0), offsets.stride(1),
              length_stride(lengths, bsz))
    if rows.quantized:
        _append_quant_kernel[(hkv, bsz)](
            k, v, codes, base, offsets, lengths, *common, rows.code_stride, rows.scale_stride, rows.token_stride,
            rows.n_ret, sink, recent,
            HALF_D=d // 2, GROUP=rows.members[0].full_k.group_size, BITS=rows.members[0].full_k.bits,
            ROUND_UP_16=k.element_size() == 2, ALIGNED=rows.aligned,
        )
        return
    _check_head_dim(d)
    _append_kernel[(hkv, bsz)](
        k, v, base, offsets, lengths, *common, rows.token_stride, rows.n_ret, sink, recent, D=d,
        ALIGNED=rows.aligned,
    )


def append_token(
    k: torch.Tensor,
    v: torch.Tensor,
    full_k: torch.Tensor | None,
    full_v: torch.Tensor | None,
    ring_k: torch.Tensor | None,
    ring_v: torch.Tensor | None,
    clock: torch.Tensor,
    sink: int,
    recent: int,
) -> None:
    """Store ``k, v [B, Hkv, 1, D]`` of one cache at position ``clock - 1``: KV heads ``< n_ret`` in the full cache,
    the rest in the ring. ``clock`` is a one-element integer tensor on the device (the length after this token).
    (Builds the offset table on each call: caches keep theirs and call :func:`append_rows`.)"""
    append_rows(k, v, DecodeRows.of(full_k, full_v, ring_k, ring_v, tables=True), clock, sink, recent)


def default_splits(batch: int, n_ret: int, max_len: int, block: int) -> int:
    """Splits per retrieval KV head: enough programs to fill the GPU (at least four per multiprocessor), and for long
    caches about one split per 2K tokens (each program then streams a few dozen tiles), up to 4096."""
    if n_ret == 0:
        return 1
    sms = 8  # the interpreter's stand-in
    if torch.cuda.is_available():
        sms = torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
    want = max(triton.cdiv(4 * sms, batch * n_ret), triton.cdiv(max_len, 2048))
    return max(1, min(triton.next_power_of_2(want), 4096, triton.next_power_of_2(triton.cdiv(max_len, block))))


def decode_rows(
    q: torch.Tensor,
    rows: DecodeRows,
    lengths: torch.Tensor,
    out: torch.Tensor,
    partial_out: torch.Tensor,
    partial_lse: torch.Tensor,
    scale: float,
    splits: int,
    block: int = 64,
) -> None:
    """One query per head and row over ``rows``; writes ``out``.

    Args:
        q: ``[B, Hq, 1, D]`` with retrieval query heads first.
        rows: the storage; row ``b`` has ``lengths[b]`` tokens (retrieval heads: its first ``lengths[b]``
            positions; streaming heads: its first ``min(lengths[b], sink + recent)`` ring slots).
        lengths: a 0-d clock (every row) or ``[B]``, int64 on the device.
        out: ``[B, 1, Hq, D]``.
        partial_out, partial_lse: float32 workspaces ``[B, >= n_ret * G, >= splits, D]`` and
            ``[B, >= n_ret * G, >= splits]``.
        splits: ranges per retrieval KV head (fixed for the life of a captured graph).
    """
    bsz, hq, _, d = q.shape
    if bsz != rows.batch:
        raise ValueError(f"queries hold {bsz} rows, the storage {rows.batch}")
    n_ret, n_str = rows.n_ret, rows.n_str
    group = hq // (n_ret + n_str)
    offsets, base, codes = rows.tables()
    cap = rows.ring_cap if n_str else 0  # each row reads min(its length, cap) ring slots
    q2, o2 = q[:, :, 0], out[:, 0]  # [B, Hq, D]
    table = (offsets.stride(0), offsets.stride(1), length_stride(lengths, bsz))
    shared = (o2.stride(0), o2.stride(1),
              partial_out.stride(0), partial_out.stride(1), partial_out.stride(2),
              partial_lse.stride(0), partial_lse.stride(1),
              n_ret, cap, scale * LOG2E)
    if rows.quantized:
        if d < 32 or d & (d - 1):
            raise ValueError(f"the quantised decode kernel needs a power-of-two head_dim >= 32, got {d}")
        stored = rows.members[0].full_k
        _decode_quant_kernel[(n_ret * splits + n_str, bsz)](
            q2, codes, base, offsets, lengths, o2, partial_out, partial_lse,
            q2.stride(0), q2.stride(1), *table, rows.code_stride, rows.scale_stride, rows.token_stride, *shared,
            G=group, GP=max(16, triton.next_power_of_2(group)), D=d, HALF_D=d // 2, GROUP=stored.group_size,
            BITS=stored.bits, BLOCK=block, SPLITS=splits,
            PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
            INTERPRETED=INTERPRETED, ALIGNED=rows.aligned, num_warps=4, num_stages=2,
        )
    else:
        _check_head_dim(d)
        _decode_kernel[(n_ret * splits + n_str, bsz)](
            q2, base, offsets, lengths, o2, partial_out, partial_lse,
            q2.stride(0), q2.stride(1), *table, rows.token_stride, *shared,
            G=group, GP=max(16, triton.next_power_of_2(group)), D=d, BLOCK=block, SPLITS=splits,
            PRECISION="ieee" if q.dtype == torch.float32 else None,  # float32 caches (tests): no tf32 rounding
            INTERPRETED=INTERPRETED, ALIGNED=rows.aligned, num_warps=4, num_stages=3,
        )
    if n_ret:
        _combine(partial_out, partial_lse, o2, n_ret * group, bsz, splits, d)


def decode_attention(
    q: torch.Tensor,
    full_k: torch.Tensor | None,
    full_v: torch.Tensor | None,
    ring_k: torch.Tensor | None,
    ring_v: torch.Tensor | None,
    clock: torch.Tensor,
    out: torch.Tensor,
    partial_out: torch.Tensor,
    partial_lse: torch.Tensor,
    scale: float,
    splits: int,
    block: int = 64,
) -> None:
    """:func:`decode_rows` over one cache's tensors (``full_k, full_v [B, n_ret, max_len, D]``, ``ring_k, ring_v
    [B, n_str, cap, D]``, any of them None) with one ``clock`` for every row. Builds the offset table on each call."""
    _check_head_dim(q.shape[-1])
    rows = DecodeRows.of(full_k, full_v, ring_k, ring_v, tables=True)
    decode_rows(q, rows, clock, out, partial_out, partial_lse, scale, splits, block)


def _combine(partial_out, partial_lse, o2, rows: int, bsz: int, splits: int, d: int) -> None:
    _combine_kernel[(rows, bsz)](
        partial_out, partial_lse, o2,
        partial_out.stride(0), partial_out.stride(1), partial_out.stride(2),
        partial_lse.stride(0), partial_lse.stride(1),
        o2.stride(0), o2.stride(1),
        SPLITS=splits, SP=triton.next_power_of_2(splits), CHUNK=min(32, triton.next_power_of_2(splits)), D=d,
        num_warps=4,
    )


def decode_attention_quant(
    q: torch.Tensor,
    full_k: QuantizedKV,
    full_v: QuantizedKV,
    ring_k: torch.Tensor | None,
    ring_v: torch.Tensor | None,
    clock: torch.Tensor,
    out: torch.Tensor,
    partial_out: torch.Tensor,
    partial_lse: torch.Tensor,
    scale: float,
    splits: int,
    block: int = 64,
) -> None:
    """:func:`decode_attention` with the retrieval heads' keys and values quantised (``QuantizedKV
    [B, n_ret, max_len, ...]``, int8 or int4); ``D`` a power of two >= 32."""
    d = q.shape[-1]
    if d < 32 or d & (d - 1):
        raise ValueError(f"the quantised decode kernel needs a power-of-two head_dim >= 32, got {d}")
    rows = DecodeRows.of(full_k, full_v, ring_k, ring_v, tables=True)
    decode_rows(q, rows, clock, out, partial_out, partial_lse, scale, splits, block)


def quant_append_supported(head_dim: int, group: int) -> bool:
    """Whether the fused quantise-and-store append takes this geometry (powers of two, groups of at least two
    channels)."""
    pow2 = lambda n: n >= 1 and n & (n - 1) == 0  # noqa: E731
    return pow2(head_dim) and head_dim >= 32 and pow2(group) and group >= 2


def append_token_quant(
    k: torch.Tensor,
    v: torch.Tensor,
    full_k: QuantizedKV,
    full_v: QuantizedKV,
    ring_k: torch.Tensor | None,
    ring_v: torch.Tensor | None,
    clock: torch.Tensor,
    sink: int,
    recent: int,
) -> None:
    """:func:`append_token` for a quantised retrieval cache: one launch quantises and stores the token."""
    append_rows(k, v, DecodeRows.of(full_k, full_v, ring_k, ring_v, tables=True), clock, sink, recent)
