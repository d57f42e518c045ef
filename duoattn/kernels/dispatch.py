"""The one place that picks DuoAttention's kernels.

=================  ==============================================  ===============================================
step               CUDA                                            elsewhere (and soft-capping, odd head sizes)
=================  ==============================================  ===============================================
append a token     Triton, one launch per layer (dense, or         ``index_copy_`` at the device length, per
                   quantise + store in the same launch)            member (cache)
decode attention   Triton split-KV over the retrieval cache (dense  SDPA over the stored prefix (the host count),
                   or dequantised in registers) + the ring, merge   dequantised first when quantised, per member
prefill retrieval  SDPA (flash), causal aligned lower-right        the same (soft-capped: a math path by blocks)
prefill streaming  FlexAttention, block-sparse                     SDPA block by block (``streaming_attention``)
=================  ==============================================  ===============================================

Decode steps take :class:`~duoattn.kernels.rows.DecodeRows`: the rows of one cache, or of several caches with their
own lengths (a batch view, :mod:`duoattn.batch`). Only the CUDA decode path is graph-safe (lengths come from the
device); :func:`graph_safe` says so.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..layout import ring_slot
from ..quant.kv import KVQuantConfig, QuantizedKV, dequantize, quantize
from .attention import causal_attention, dense_attention, streaming_attention
from .rows import DecodeRows, Member

try:  # optional: the Triton kernels need the triton package (CUDA machines have it with PyTorch)
    from . import decode_triton
except ImportError:
    decode_triton = None

DECODE_KERNELS = ("auto", "triton", "torch")
STREAMING_PREFILL_KERNELS = ("auto", "flex", "flex-eager", "blocks")
DECODE_BLOCK = 64


def triton_available() -> bool:
    return decode_triton is not None


@dataclass(frozen=True)
class KernelChoice:
    """Kernels of a cache. ``auto`` picks Triton / compiled FlexAttention on CUDA, the SDPA paths elsewhere.

    ``flex-eager`` runs FlexAttention without compiling it (slow; for checking the block mask on the CPU).
    """

    decode: str = "auto"
    streaming_prefill: str = "auto"

    def __post_init__(self) -> None:
        if self.decode not in DECODE_KERNELS:
            raise ValueError(f"decode kernel must be one of {DECODE_KERNELS}, got {self.decode!r}")
        if self.streaming_prefill not in STREAMING_PREFILL_KERNELS:
            raise ValueError(
                f"streaming prefill kernel must be one of {STREAMING_PREFILL_KERNELS}, got {self.streaming_prefill!r}"
            )

    def resolve(self, device: torch.device, head_dim: int, softcap: bool = False,
                quantized: bool = False) -> KernelChoice:
        """Replace ``auto`` by what runs on ``device``; refuse a choice that cannot run there."""
        cuda = device.type == "cuda"
        min_dim = 32 if quantized else 16  # the quantised kernel splits vectors into halves of >= 16 channels
        pow2 = head_dim >= min_dim and head_dim & (head_dim - 1) == 0
        decode = self.decode
        if decode == "auto":
            decode = "triton" if cuda and triton_available() and pow2 and not softcap else "torch"
        elif decode == "triton":
            if not triton_available():
                raise ValueError("decode kernel 'triton' needs the triton package")
            if not pow2:
                raise ValueError(f"decode kernel 'triton' needs a power-of-two head_dim >= {min_dim}, got {head_dim}")
            if softcap:
                raise ValueError("decode kernel 'triton' does not soft-cap scores; use 'torch'")
        streaming = self.streaming_prefill
        if streaming == "auto":
            streaming = "flex" if cuda and not softcap else "blocks"
        elif streaming.startswith("flex") and softcap:
            raise ValueError("the FlexAttention streaming prefill does not soft-cap scores; use 'blocks'")
        return KernelChoice(decode, streaming)


def graph_safe(kernels: KernelChoice | None) -> bool:
    """Whether decode steps with these kernels read no length on the host (and so can be graph-captured)."""
    return kernels is not None and kernels.decode == "triton"


@dataclass
class Workspace:
    """Buffers shared by every layer of a cache, allocated once: the decode output, the split-KV partials and the
    streaming prefill scratch."""

    decode_out: torch.Tensor | None = None
    partial_out: torch.Tensor | None = None
    partial_lse: torch.Tensor | None = None
    scratch_k: torch.Tensor | None = None
    scratch_v: torch.Tensor | None = None
    dense_k: torch.Tensor | None = None
    dense_v: torch.Tensor | None = None
    kernel: dict[str, Any] = field(default_factory=dict)

    @torch.inference_mode(False)
    def reserve_decode(self, batch: int, rows: int, splits: int, heads: int, head_dim: int, dtype: torch.dtype,
                       device: torch.device) -> None:
        """Room for ``rows`` retrieval query heads x ``splits`` partial results, and a ``[B, 1, heads, D]`` output."""
        if self.decode_out is None or self.decode_out.shape[2] < heads:
            self.decode_out = torch.empty(batch, 1, heads, head_dim, dtype=dtype, device=device)
        have = self.partial_lse
        if have is not None and have.shape[1] >= rows and have.shape[2] >= splits:
            return
        rows = max(rows, 1, 0 if have is None else have.shape[1])
        splits = max(splits, 0 if have is None else have.shape[2])
        self.partial_out = torch.empty(batch, rows, splits, head_dim, dtype=torch.float32, device=device)
        self.partial_lse = torch.empty(batch, rows, splits, dtype=torch.float32, device=device)

    @torch.inference_mode(False)
    def scratch(self, batch: int, heads: int, length: int, head_dim: int, dtype: torch.dtype,
                device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Streaming scratch ``[B, heads, length, D]`` (views of one buffer grown on demand)."""
        # Zeroed: slots no token uses are masked out, and masked garbage could still be NaN (0 * NaN = NaN).
        return self._grown("scratch", torch.zeros, batch, heads, length, head_dim, dtype, device)

    @torch.inference_mode(False)
    def dense(self, batch: int, heads: int, length: int, head_dim: int, dtype: torch.dtype,
              device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Room ``[B, heads, length, D]`` for one layer's full-length streaming keys and values while its dense
        prompt queries run (prefill ``"window:N"``): one buffer for all layers, freed by :meth:`release_dense`."""
        return self._grown("dense", torch.empty, batch, heads, length, head_dim, dtype, device)  # written first

    def release_dense(self) -> None:
        self.dense_k = self.dense_v = None

    def _grown(self, name: str, make: Callable[..., torch.Tensor], batch: int, heads: int, length: int,
               head_dim: int, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Views ``[B, heads, length, D]`` of the buffers ``{name}_k / {name}_v``, replaced by larger ones made with
        ``make`` when they hold fewer heads or positions."""
        have = getattr(self, f"{name}_k")
        if have is None or have.shape[1] < heads or have.shape[2] < length:
            shape = (batch, max(heads, 0 if have is None else have.shape[1]),
                     max(length, 0 if have is None else have.shape[2]), head_dim)
            del have
            setattr(self, f"{name}_k", None)  # free the old buffers before taking new ones
            setattr(self, f"{name}_v", None)
            setattr(self, f"{name}_k", make(shape, dtype=dtype, device=device))
            setattr(self, f"{name}_v", make(shape, dtype=dtype, device=device))
        k, v = getattr(self, f"{name}_k"), getattr(self, f"{name}_v")
        return k[:, :heads, :length], v[:, :heads, :length]


# ----------------------------------------------------------------------------------------------------- decode
def decode_splits(kernels: KernelChoice, batch: int, n_ret: int, max_len: int) -> int:
    """How many ranges the split-KV kernel cuts each retrieval head's cache into (1 for the torch path)."""
    if kernels.decode != "triton":
        return 1
    return decode_triton.default_splits(batch, n_ret, max_len, DECODE_BLOCK)


def append_rows(kernels: KernelChoice, k: torch.Tensor, v: torch.Tensor, rows: DecodeRows, lengths: torch.Tensor,
                sink: int, recent: int) -> None:
    """Store one token per row, ``k, v [B, Hkv, 1, D]``: row ``b`` at position ``lengths[b] - 1`` (``lengths``: a 0-d
    clock or ``[B]`` on the device; retrieval heads first, then the ring). No host read: graph-safe."""
    if kernels.decode == "triton" and (
            not rows.quantized or decode_triton.quant_append_supported(k.shape[-1], rows.members[0].full_k.group_size)):
        decode_triton.append_rows(k, v, rows, lengths, sink, recent)
        return
    lens = lengths.reshape(-1)
    row = 0
    for m in rows.members:  # per sequence, never per head
        pos = (lens[row : row + 1] if lens.numel() > 1 else lens) - 1
        _append_member(m, k[row : row + m.batch], v[row : row + m.batch], pos, rows.n_ret, sink, recent)
        row += m.batch


def _append_member(m: Member, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor, n_ret: int, sink: int,
                   recent: int) -> None:
    if m.full_k is not None:
        if isinstance(m.full_k, QuantizedKV):
            config = _config_of(m.full_k)
            m.full_k.write_at(pos, quantize(k[:, :n_ret], config))
            m.full_v.write_at(pos, quantize(v[:, :n_ret], config))
        else:
            m.full_k.index_copy_(2, pos, k[:, :n_ret])
            m.full_v.index_copy_(2, pos, v[:, :n_ret])
    if m.ring_k is not None:
        slot = ring_slot(pos, sink, recent)
        m.ring_k.index_copy_(2, slot, k[:, n_ret:])
        m.ring_v.index_copy_(2, slot, v[:, n_ret:])


def append_token(
    kernels: KernelChoice,
    k: torch.Tensor,
    v: torch.Tensor,
    full_k: torch.Tensor | QuantizedKV | None,
    full_v: torch.Tensor | QuantizedKV | None,
    ring_k: torch.Tensor | None,
    ring_v: torch.Tensor | None,
    clock: torch.Tensor,
    sink: int,
    recent: int,
) -> None:
    """:func:`append_rows` over one cache's tensors (builds their rows on each call; caches keep theirs)."""
    rows = DecodeRows.of(full_k, full_v, ring_k, ring_v, tables=kernels.decode == "triton")
    append_rows(kernels, k, v, rows, clock, sink, recent)


def _config_of(stored: QuantizedKV) -> KVQuantConfig:
    return KVQuantConfig(bits=stored.bits, group_size=stored.group_size)


def decode_rows(
    kernels: KernelChoice,
    q: torch.Tensor,
    rows: DecodeRows,
    lengths: torch.Tensor,
    member_lengths: Callable[[], Sequence[int]],
    workspace: Workspace,
    scale: float,
    splits: int,
    softcap: float | None = None,
) -> torch.Tensor:
    """``q [B, Hq, 1, D]`` (retrieval query heads first) over ``rows`` -> ``[B, 1, Hq, D]``.

    The Triton path reads row lengths from the device (``lengths``: a 0-d clock or ``[B]``) and writes into the
    shared ``workspace.decode_out``; the torch path asks ``member_lengths()`` for each member's host count and runs
    one SDPA per member.
    """
    hq = q.shape[1]
    if kernels.decode == "triton":
        out = workspace.decode_out[: q.shape[0], :, :hq]
        decode_triton.decode_rows(q, rows, lengths, out, workspace.partial_out, workspace.partial_lse, scale, splits,
                                  block=DECODE_BLOCK)
        return out
    n_ret, n_str = rows.n_ret, rows.n_str
    hr = hq * n_ret // (n_ret + n_str)
    outs, row = [], 0
    for m, length in zip(rows.members, member_lengths()):  # per sequence, never per head
        qm = q[row : row + m.batch]
        row += m.batch
        parts = []
        if m.full_k is not None:
            k, v = _prefix(m.full_k, length, q.dtype), _prefix(m.full_v, length, q.dtype)
            parts.append(dense_attention(qm[:, :hr], k, v, scale, softcap))
        if m.ring_k is not None:
            n = min(length, m.ring_k.shape[2])  # the ring holds exactly the visible keys (in any order)
            parts.append(dense_attention(qm[:, hr:], m.ring_k[:, :, :n], m.ring_v[:, :, :n], scale, softcap))
        outs.append(parts[0] if len(parts) == 1 else torch.cat(parts, dim=1))
    out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=0)
    return out.transpose(1, 2)


def decode_attention(
    kernels: KernelChoice,
    q: torch.Tensor,
    full_k: torch.Tensor | QuantizedKV | None,
    full_v: torch.Tensor | QuantizedKV | None,
    ring_k: torch.Tensor | None,
    ring_v: torch.Tensor | None,
    clock: torch.Tensor,
    length: int,
    workspace: Workspace,
    scale: float,
    splits: int,
    softcap: float | None = None,
) -> torch.Tensor:
    """:func:`decode_rows` over one cache's tensors with one clock (``length`` its host count); builds their rows on
    each call (caches keep theirs)."""
    rows = DecodeRows.of(full_k, full_v, ring_k, ring_v, tables=kernels.decode == "triton")
    return decode_rows(kernels, q, rows, clock, lambda: [length], workspace, scale, splits, softcap)


def _prefix(stored: torch.Tensor | QuantizedKV, end: int, dtype: torch.dtype) -> torch.Tensor:
    """Positions ``0..end-1`` of a retrieval buffer ``[B, n_ret, max_len, D]`` (dequantised if quantised)."""
    if isinstance(stored, QuantizedKV):
        return dequantize(stored.tokens(0, end), dtype)
    return stored[:, :, :end]


# ---------------------------------------------------------------------------------------------------- prefill
def prefill_retrieval(q: torch.Tensor, full_k: torch.Tensor | QuantizedKV, full_v: torch.Tensor | QuantizedKV,
                      end: int, scale: float, softcap: float | None = None) -> torch.Tensor:
    """Causal attention of the chunk's ``C`` queries (positions ``end - C .. end - 1``) over the stored prefix
    -> ``[B, Hq, C, D]``. A quantised prefix is dequantised first: queries see what decoding will see."""
    return causal_attention(q, _prefix(full_k, end, q.dtype), _prefix(full_v, end, q.dtype), scale, softcap)


def prefill_streaming(
    kernels: KernelChoice,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    plan: Any,
    workspace: Workspace,
    scale: float,
    softcap: float | None = None,
) -> torch.Tensor:
    """Streaming heads of one chunk: ``q [B, n_str * G, C, D]`` over the scratch ``k, v [B, n_str, L, D]`` laid out by
    ``plan`` (a :class:`duoattn.layout.ChunkPlan`) -> ``[B, n_str * G, C, D]``.

    If compiled FlexAttention fails, the cache falls back to the block-by-block SDPA kernel for good, records why in
    ``workspace.kernel["flex_failed"]`` and warns once.
    """
    if kernels.streaming_prefill in ("flex", "flex-eager") and not workspace.kernel.get("flex_failed"):
        try:
            return _flex_prefill(kernels, q, k, v, plan, scale)
        except Exception as err:  # noqa: BLE001 - any compile failure leaves a correct, slower path
            if kernels.streaming_prefill == "flex-eager":
                raise
            workspace.kernel["flex_failed"] = repr(err)
            warnings.warn(f"FlexAttention failed ({err!r}); streaming heads use block-by-block SDPA", stacklevel=2)
    p, c = plan.prefix, plan.size
    return streaming_attention(
        q, k[:, :, : plan.sink_visible], v[:, :, : plan.sink_visible], k[:, :, p - plan.n_run : p + c],
        v[:, :, p - plan.n_run : p + c], plan.run_start, plan.recent, scale, softcap=softcap,
    )


def _flex_prefill(kernels, q, k, v, plan, scale) -> torch.Tensor:
    from .flex import flex_streaming_attention, streaming_state

    mask = plan.extras.get("flex_mask")
    if mask is None:
        state = streaming_state(plan.sink, plan.recent, plan.prefix, q.device)
        mask = plan.extras["flex_mask"] = state.block_mask(plan)
    return flex_streaming_attention(q, k, v, mask, scale, compiled=kernels.streaming_prefill == "flex")


def split_streaming_prefill(q: torch.Tensor, n_streamed: int, stream: Callable[[torch.Tensor], torch.Tensor],
                            dense_k: torch.Tensor | None, dense_v: torch.Tensor | None, scale: float,
                            softcap: float | None = None) -> torch.Tensor:
    """Streaming heads' queries ``q [B, n_str * G, C, D]`` of a prompt chunk -> ``[B, n_str * G, C, D]``.

    The first ``n_streamed`` follow the streaming rule (``stream`` maps them to their output); the others (prefill
    modes ``"full"`` / ``"window:N"``) attend causally to ``dense_k, dense_v [B, n_str, end, D]``, every position up
    to the chunk's last query.
    """
    c = q.shape[-2]
    if n_streamed == c:
        return stream(q)
    dense = causal_attention(q[:, :, n_streamed:], dense_k, dense_v, scale, softcap)
    if n_streamed == 0:
        return dense
    return torch.cat([stream(q[:, :, :n_streamed]), dense], dim=2)


# ---------------------------------------------------------------------------------------------- no cache at all
def uncached_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, n_ret: int, groups: int, sink: int,
                       recent: int, scale: float, softcap: float | None = None,
                       dense_from: int | None = None) -> torch.Tensor:
    """Keys are plain ``[B, Hkv, T, D]`` at positions ``0..T-1`` and the queries the last ``C`` of them (no cache,
    or a stock cache); retrieval heads are the first ``n_ret`` KV heads -> ``[B, Hq, C, D]``. Queries at positions
    ``>= dense_from`` attend fully on streaming heads too."""
    hr = n_ret * groups
    c, t = q.shape[-2], k.shape[-2]
    parts = []
    if n_ret:
        parts.append(causal_attention(q[:, :hr], k[:, :n_ret], v[:, :n_ret], scale, softcap))
    if n_ret < k.shape[1]:
        ks, vs = k[:, n_ret:], v[:, n_ret:]

        def stream(qs: torch.Tensor) -> torch.Tensor:
            # Only the sink and the last n + recent - 1 keys up to the last query can be seen by a streaming head.
            end = t - c + qs.shape[-2]
            n_sink, lo = min(sink, end), max(0, end - qs.shape[-2] - recent + 1)
            return streaming_attention(qs, ks[:, :, :n_sink], vs[:, :, :n_sink], ks[:, :, lo:end], vs[:, :, lo:end],
                                       lo, recent, scale, softcap=softcap)

        n = c if dense_from is None else min(c, max(0, dense_from - (t - c)))
        parts.append(split_streaming_prefill(q[:, hr:], n, stream, ks, vs, scale, softcap))
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


__all__ = ["DecodeRows", "KernelChoice", "Workspace", "append_rows", "append_token", "decode_attention", "decode_rows",
           "graph_safe", "prefill_retrieval",
           "prefill_streaming", "split_streaming_prefill", "uncached_attention"]
