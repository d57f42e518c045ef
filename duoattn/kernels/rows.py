"""Where a decode step reads and writes: one layer's storage for ``B`` rows (sequences), gathered from members.

A *member* is one cache's storage of one layer, batch ``b_i``: retrieval keys / values ``[b_i, n_ret, T_i, D]``
(dense, or :class:`~duoattn.quant.kv.QuantizedKV` codes + scales + zero points) and the streaming ring
``[b_i, n_str, cap_i, D]``. A :class:`~duoattn.cache.DuoCache` is one member; a batch view
(:mod:`duoattn.batch`) gathers one member per request, each with its own ``T_i`` and its own length. Members
must agree on heads, head size, dtype, device and quantisation.

The Triton kernels address every row through one int64 table ``offsets [kinds, B, Hkv]``: the element offset of
row ``b``'s KV head ``h`` (its token 0) from a base pointer. Kinds:

* 0 / 1, keys / values: for ``h < n_ret`` the retrieval storage (dense: from ``base``; quantised: the codes, from
  ``codes``), for ``h >= n_ret`` the ring (from ``base``);
* 2..5, quantised only: key scales, key zero points, value scales, value zero points of retrieval heads (from
  ``base``, which then has the scales' dtype, as the ring).

Token strides are the same in every member (the last two dimensions are contiguous), so a single cache of batch
``B`` is the special case ``offset = b * stride(0) + h * stride(1)``. Row lengths come from a device tensor: a 0-d
clock read by every row, or one length per row. Tables are built once per membership, never per step.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..quant.kv import QuantizedKV

Stored = torch.Tensor | QuantizedKV
ALIGN = 16  # elements: offsets that are all multiples of this let the kernels keep vectorised loads


@dataclass(frozen=True)
class Member:
    """One cache's storage of one layer (any of them None when the layer has no such heads)."""

    full_k: Stored | None
    full_v: Stored | None
    ring_k: torch.Tensor | None
    ring_v: torch.Tensor | None

    @property
    def batch(self) -> int:
        t = self.ring_k if self.ring_k is not None else self.full_k
        return (t.data if isinstance(t, QuantizedKV) else t).shape[0]

    def parts(self) -> list[torch.Tensor]:
        out = []
        for s in (self.full_k, self.full_v, self.ring_k, self.ring_v):
            if isinstance(s, QuantizedKV):
                out += [s.data, s.scale, s.zero]
            elif s is not None:
                out.append(s)
        return out


def _heads(stored: Stored | None) -> int:
    if stored is None:
        return 0
    return (stored.data if isinstance(stored, QuantizedKV) else stored).shape[1]


class DecodeRows:
    """One layer's storage for a decode step over the rows of ``members`` (in order); ``tables``: build the
    Triton offset table (on the members' device).

    ``base`` / ``codes`` fix the pointers the offsets count from (by default the first member's storage), and
    ``out`` is an existing table to write into: with both, rows of another membership are addressed through the same
    tensors, which is what lets a captured CUDA graph decode them (:meth:`duoattn.batch.BatchCache.bind`).
    ``ring_cap`` bounds the ring slots any row reads (default: the largest member ring).
    """

    def __init__(self, members: Sequence[Member], tables: bool = False, base: torch.Tensor | None = None,
                 codes: torch.Tensor | None = None, out: torch.Tensor | None = None, ring_cap: int | None = None):
        if not members:
            raise ValueError("DecodeRows needs at least one member")
        self.members = list(members)
        first = self.members[0]
        self.n_ret, self.n_str = _heads(first.full_k), _heads(first.ring_k)
        if self.n_ret + self.n_str == 0:
            raise ValueError("a member without retrieval or streaming heads has nothing to decode")
        self.quantized = isinstance(first.full_k, QuantizedKV)
        like = first.ring_k if first.ring_k is not None else first.full_k
        self.head_dim = like.head_dim if isinstance(like, QuantizedKV) else like.shape[-1]
        self.dtype = (like.scale if isinstance(like, QuantizedKV) else like).dtype
        self.device = (like.data if isinstance(like, QuantizedKV) else like).device
        for i, m in enumerate(self.members):
            self._check(i, m)
        self.batch = sum(m.batch for m in self.members)
        # Ring slots a row may read: no row reads more than its length, and no length passes its own ring, so any
        # bound at least the largest ring is safe; a view that is rebound fixes it at the largest ring it can hold.
        largest = max((m.ring_k.shape[2] for m in self.members if m.ring_k is not None), default=0)
        if ring_cap is not None and ring_cap < largest:
            raise ValueError(f"ring_cap {ring_cap} is below the largest ring of the members ({largest} slots)")
        self.ring_cap = largest if ring_cap is None else ring_cap
        self.offsets: torch.Tensor | None = None
        self.base: torch.Tensor | None = None
        self.codes: torch.Tensor | None = None
        self.aligned = False
        if tables:
            self._build_tables(base, codes, out)
        elif base is not None or codes is not None or out is not None:
            raise ValueError("base, codes and out describe the Triton tables: pass tables=True with them")

    @classmethod
    def of(cls, full_k: Stored | None, full_v: Stored | None, ring_k: torch.Tensor | None,
           ring_v: torch.Tensor | None, tables: bool = False) -> DecodeRows:
        """The rows of one cache's storage."""
        return cls([Member(full_k, full_v, ring_k, ring_v)], tables)

    def _check(self, i: int, m: Member) -> None:
        if _heads(m.full_k) != self.n_ret or _heads(m.ring_k) != self.n_str:
            raise ValueError(f"member {i} has {_heads(m.full_k)} retrieval / {_heads(m.ring_k)} streaming KV heads, "
                             f"member 0 has {self.n_ret} / {self.n_str}")
        if isinstance(m.full_k, QuantizedKV) != self.quantized:
            raise ValueError(f"member {i}: every member must be quantised alike (member 0: {self.quantized})")
        for t in m.parts():
            if t.device != self.device:
                raise ValueError(f"member {i} is on {t.device}, member 0 on {self.device}")
            if t.dim() != 4 or t.stride(-1) != 1 or t.stride(-2) != t.shape[-1]:
                raise ValueError(f"member {i}: storage must be [B, heads, tokens, channels] with contiguous tokens, "
                                 f"got shape {tuple(t.shape)}, strides {t.stride()}")
        for s in (m.full_k, m.full_v, m.ring_k, m.ring_v):
            if s is not None and not isinstance(s, QuantizedKV) and s.dtype != self.dtype:
                raise ValueError(f"member {i} stores {s.dtype}, member 0 {self.dtype}")
        if self.quantized:
            f = self.members[0].full_k
            if (m.full_k.bits, m.full_k.group_size, m.full_k.scale.dtype) != (f.bits, f.group_size, f.scale.dtype):
                raise ValueError(f"member {i} is quantised as {m.full_k.bits} bits / group {m.full_k.group_size}, "
                                 f"member 0 as {f.bits} / {f.group_size}")

    # ------------------------------------------------------------------------------------------ Triton tables
    @property
    def token_stride(self) -> int:
        """Elements per token of dense retrieval storage and of the ring."""
        return self.head_dim

    @property
    def code_stride(self) -> int:
        return self.members[0].full_k.data.shape[-1] if self.quantized else 0

    @property
    def scale_stride(self) -> int:
        return self.members[0].full_k.scale.shape[-1] if self.quantized else 0

    def _build_tables(self, base: torch.Tensor | None, codes: torch.Tensor | None, out: torch.Tensor | None) -> None:
        first = self.members[0]
        if self.quantized:
            self.codes, self.base = first.full_k.data, first.full_k.scale
        else:
            self.base = first.full_k if first.full_k is not None else first.ring_k
        if base is not None:
            if base.dtype != self.base.dtype or base.device != self.base.device:
                raise ValueError(f"base must be {self.base.dtype} on {self.base.device}, got {base.dtype} on "
                                 f"{base.device}")
            self.base = base
        if codes is not None:
            if not self.quantized or codes.dtype != self.codes.dtype or codes.device != self.codes.device:
                raise ValueError("codes must be the quantised storage's dtype and device (quantised members only)")
            self.codes = codes
        kinds = 6 if self.quantized else 2
        hkv = self.n_ret + self.n_str
        # Vectorised over each member's rows and heads: a membership change of a large batch (a server's requests
        # coming and going) costs a few array operations per member and layer, not a Python step per head.
        table = np.zeros((kinds, self.batch, hkv), dtype=np.int64)

        def offsets(t: torch.Tensor, base: torch.Tensor, rows: int, heads: int) -> np.ndarray:
            delta = t.data_ptr() - base.data_ptr()
            if t.element_size() != base.element_size() or delta % t.element_size():
                raise ValueError("storage of the members is not aligned to its element size")
            return (delta // t.element_size() + np.arange(rows, dtype=np.int64)[:, None] * t.stride(0)
                    + np.arange(heads, dtype=np.int64)[None, :] * t.stride(1))

        row = 0
        for m in self.members:
            rows, end = m.batch, row + m.batch
            if self.n_ret:
                if self.quantized:
                    table[0, row:end, :self.n_ret] = offsets(m.full_k.data, self.codes, rows, self.n_ret)
                    table[1, row:end, :self.n_ret] = offsets(m.full_v.data, self.codes, rows, self.n_ret)
                    for kind, t in enumerate((m.full_k.scale, m.full_k.zero, m.full_v.scale, m.full_v.zero), 2):
                        table[kind, row:end, :self.n_ret] = offsets(t, self.base, rows, self.n_ret)
                else:
                    table[0, row:end, :self.n_ret] = offsets(m.full_k, self.base, rows, self.n_ret)
                    table[1, row:end, :self.n_ret] = offsets(m.full_v, self.base, rows, self.n_ret)
            if self.n_str:
                table[0, row:end, self.n_ret:] = offsets(m.ring_k, self.base, rows, self.n_str)
                table[1, row:end, self.n_ret:] = offsets(m.ring_v, self.base, rows, self.n_str)
            row = end
        self.aligned = bool((table[:2] % ALIGN == 0).all())
        with torch.inference_mode(False):  # built under no_grad / inference, read by later steps
            if out is None:
                self.offsets = torch.from_numpy(table).to(self.device)
                return
            if tuple(out.shape) != table.shape or out.dtype != torch.int64 or out.device != self.device:
                raise ValueError(f"out must be an int64 table of shape {table.shape} on {self.device}, got "
                                 f"{out.dtype} {tuple(out.shape)} on {out.device}")
            out.copy_(torch.from_numpy(table))
            self.offsets = out

    def tables(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``(offsets, base, codes)`` for the kernels."""
        if self.offsets is None:
            raise RuntimeError("these DecodeRows were built without Triton tables (tables=False)")
        return self.offsets, self.base, self.codes


def length_stride(lengths: torch.Tensor, batch: int) -> int:
    """Stride of row ``b``'s length in ``lengths``: 0 for one clock shared by every row, else 1."""
    if lengths.dim() == 0 or lengths.numel() == 1:
        return 0
    if lengths.dim() != 1 or lengths.numel() != batch:
        raise ValueError(f"lengths must be a 0-d clock or one length per row ({batch}), got shape "
                         f"{tuple(lengths.shape)}")
    return lengths.stride(0)


__all__ = ["DecodeRows", "Member", "length_stride"]
