"""Asymmetric integer quantisation of key / value vectors: int8, or int4 packed two codes per byte.

Each token's vector of one head (``head_dim`` channels) is cut into groups of ``group_size`` consecutive channels
(default: one group per vector). A group ``x`` gets a zero point ``z = min(x)`` and a scale
``s >= (max(x) - min(x)) / (2**bits - 1)``; a channel is stored as the code ``round((x - z) / s)`` in
``[0, 2**bits - 1]`` and read back as ``code * s + z``.

Scale and zero point are stored in the dtype of the input (the model dtype: bfloat16 on a GPU, float32 on the CPU):

* the zero point is the group minimum, one of the inputs, so it is exact in that dtype;
* the scale is rounded *up* to that dtype, so codes never overflow and need no clamping to stay within the bound;
* bfloat16 has float32's exponent range: huge ranges do not overflow and tiny ones do not flush to zero (float16,
  used by the original implementation, does both beyond about 6.5e4 and below 6e-8).

Error bound, per channel: ``|x - dequantize(quantize(x))| <= s / 2`` plus the rounding of the float32 (float64 for
float64 inputs) arithmetic, a few units in the last place of ``max(|min|, |max|)``; with the scale rounded up,
``s <= (max - min) / (2**bits - 1) * (1 + 2**-(p - 1)) + u`` where ``p`` is the significand precision of the storage
dtype (8 for bfloat16, 11 for float16, 24 for float32) and ``u`` its smallest subnormal (which only matters when
the step falls below the normal range: 6e-8 for float16). A constant group has ``s = 0`` and is reproduced exactly.

Memory per vector: ``head_dim * bits / 8`` bytes of codes plus ``2 * head_dim / group_size`` scales and zero points.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

KV_BITS = (16, 8, 4)  # 16: no quantisation, the cache keeps the model dtype

_SAME_SIZE_INT = {2: torch.int16, 4: torch.int32, 8: torch.int64}


@dataclass(frozen=True)
class KVQuantConfig:
    """How the retrieval heads' keys and values are stored.

    Args:
        bits: 8 or 4 bits per channel.
        group_size: channels per scale / zero point; None means one group per head vector (``head_dim``).
    """

    bits: int = 8
    group_size: int | None = None

    def __post_init__(self) -> None:
        if self.bits not in (8, 4):
            raise ValueError(f"kv bits must be 8 or 4 for a quantised cache (16 means no quantisation), got {self.bits!r}")
        if self.group_size is not None and (
            isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size < 1
        ):
            raise ValueError(f"kv group_size must be a positive integer or None, got {self.group_size!r}")

    def group(self, head_dim: int) -> int:
        """The group size for vectors of ``head_dim`` channels (checked to divide it)."""
        g = head_dim if self.group_size is None else self.group_size
        if head_dim % g:
            raise ValueError(f"kv group_size {g} must divide head_dim {head_dim}")
        if self.bits == 4 and head_dim % 2:
            raise ValueError(f"int4 packs two channels per byte: head_dim must be even, got {head_dim}")
        return g

    def bytes_per_vector(self, head_dim: int, scale_bytes: int) -> int:
        """Bytes that one quantised head vector takes: codes, scales and zero points."""
        return head_dim * self.bits // 8 + 2 * (head_dim // self.group(head_dim)) * scale_bytes


@dataclass
class QuantizedKV:
    """Quantised vectors along a token axis (the second-to-last).

    Attributes:
        data: uint8 codes ``[..., T, head_dim * bits / 8]`` (int4: channel ``2i`` in the low nibble, ``2i + 1`` high).
        scale, zero: ``[..., T, head_dim / group_size]`` in the storage dtype.
        bits: 8 or 4.
    """

    data: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    bits: int

    @property
    def num_tokens(self) -> int:
        return self.data.shape[-2]

    @property
    def head_dim(self) -> int:
        return self.data.shape[-1] * 8 // self.bits

    @property
    def group_size(self) -> int:
        return self.head_dim // self.scale.shape[-1]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.data, self.scale, self.zero))

    def tokens(self, start: int, stop: int) -> QuantizedKV:
        """Tokens ``start..stop-1`` (a view)."""
        return self.map(lambda t: t[..., start:stop, :])

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> QuantizedKV:
        return QuantizedKV(fn(self.data), fn(self.scale), fn(self.zero), self.bits)

    def write(self, start: int, other: QuantizedKV) -> None:
        """Copy ``other`` into tokens ``start..start+len(other)-1`` in place."""
        stop = start + other.num_tokens
        for mine, theirs in zip((self.data, self.scale, self.zero), (other.data, other.scale, other.zero)):
            mine[..., start:stop, :].copy_(theirs)

    @staticmethod
    def cat(a: QuantizedKV, b: QuantizedKV) -> QuantizedKV:
        """``a`` followed by ``b`` along the token axis."""
        return QuantizedKV(
            torch.cat([a.data, b.data], dim=-2),
            torch.cat([a.scale, b.scale], dim=-2),
            torch.cat([a.zero, b.zero], dim=-2),
            a.bits,
        )

    @staticmethod
    def zeros(lead: tuple[int, ...], num_tokens: int, head_dim: int, config: KVQuantConfig,
              dtype: torch.dtype, device: torch.device) -> QuantizedKV:
        """Storage for ``num_tokens`` vectors of ``head_dim`` channels, all reading back as 0."""
        groups = head_dim // config.group(head_dim)
        return QuantizedKV(
            torch.zeros(*lead, num_tokens, head_dim * config.bits // 8, dtype=torch.uint8, device=device),
            torch.zeros(*lead, num_tokens, groups, dtype=dtype, device=device),
            torch.zeros(*lead, num_tokens, groups, dtype=dtype, device=device),
            config.bits,
        )

    def write_at(self, index: torch.Tensor, other: QuantizedKV) -> None:
        """Copy ``other`` into the tokens at ``index`` (a 1-element device tensor): graph-safe, no host read."""
        for mine, theirs in zip((self.data, self.scale, self.zero), (other.data, other.scale, other.zero)):
            mine.index_copy_(-2, index, theirs)


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype quantisation arithmetic runs in: float32, or float64 for float64 inputs."""
    return torch.promote_types(dtype, torch.float32)


def round_up(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x`` (non-negative, finite) cast to ``dtype``, rounded towards +inf instead of to nearest."""
    y = x.to(dtype)
    if work_dtype(dtype) == dtype:
        return y  # no narrowing
    below = y.to(x.dtype) < x
    # For non-negative floats, the next representable value is the next integer bit pattern.
    itype = _SAME_SIZE_INT[y.element_size()]
    return torch.where(below, (y.view(itype) + 1).view(dtype), y)


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes in ``[0, 15]`` ``[..., D]`` -> ``[..., D / 2]``: channel ``2i`` low nibble, ``2i + 1`` high."""
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: ``[..., D / 2]`` -> ``[..., D]``."""
    return torch.stack([packed & 15, packed >> 4], dim=-1).flatten(-2)


def quantize(x: torch.Tensor, config: KVQuantConfig) -> QuantizedKV:
    """Quantise vectors ``x [..., T, D]``; scales and zero points keep ``x.dtype`` (see the module docstring)."""
    if not x.is_floating_point():
        raise TypeError(f"can only quantise floating-point tensors, got {x.dtype}")
    d = x.shape[-1]
    g = config.group(d)
    qmax = 2**config.bits - 1
    work = work_dtype(x.dtype)
    groups = x.reshape(*x.shape[:-1], d // g, g)
    zero = groups.amin(dim=-1)
    high = groups.amax(dim=-1)
    scale = round_up((high.to(work) - zero.to(work)) / qmax, x.dtype)
    # A constant group has scale 0: its codes are 0 and it reads back as the zero point, exactly.
    divisor = torch.where(scale == 0, torch.ones_like(scale), scale).to(work)
    codes = torch.round((groups.to(work) - zero.to(work).unsqueeze(-1)) / divisor.unsqueeze(-1))
    codes = codes.clamp_(0, qmax).to(torch.uint8).reshape(x.shape)
    data = pack_int4(codes) if config.bits == 4 else codes
    return QuantizedKV(data, scale, zero, config.bits)


def dequantize(q: QuantizedKV, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``[..., T, D]`` values, computed in the work dtype (float32 / float64) and returned in ``dtype`` (default:
    the work dtype)."""
    work = work_dtype(q.scale.dtype)
    codes = unpack_int4(q.data) if q.bits == 4 else q.data
    g = q.group_size
    groups = codes.reshape(*codes.shape[:-1], -1, g).to(work)
    out = groups * q.scale.to(work).unsqueeze(-1) + q.zero.to(work).unsqueeze(-1)
    return out.reshape(codes.shape).to(dtype or work)
