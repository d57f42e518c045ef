"""Sink + recent attention for identification, in memory that does not grow with ``length x window``.

Both kernels keep the contract of :func:`duoattn.kernels.attention.streaming_attention`: queries ``[B, Hq, C, D]``
at the last ``C`` positions of a run of keys ``[B, Hkv, R, D]`` that starts at absolute position ``run_start``,
plus the sink keys ``[B, Hkv, S, D]`` at positions ``0..S-1``; query ``i`` sees sink key ``s`` iff ``s <= i`` and
run key ``j`` iff ``j <= i``, ``i - j < recent`` and ``j >= S`` (a run key below ``S`` is one of the sink keys).
Positions are absolute, so a process holding one slice of a sample needs only its own queries, the sink keys and
the ``recent - 1`` keys before its slice.

* :func:`blocked_streaming_attention` (CPU, and the fallback on CUDA): blocks of queries, each against the sink
  keys and the ``block + recent - 1`` run keys its windows reach, as one 4-D SDPA call per chunk of blocks. 4-D
  inputs let PyTorch's fused kernels run (on the CPU its flash kernel keeps one log-sum-exp per query for the
  backward instead of the probabilities, and is several times faster than the math path that 5-D inputs take).
  A chunk holds at most :data:`CHUNK_PAIRS` (query, key) pairs per head; when a call needs several chunks and
  autograd records, each chunk is recomputed in the backward pass, so no more than one chunk's windows and mask
  ever exist at once.
* :func:`flex_streaming_attention` (CUDA): compiled FlexAttention with a block mask built directly from the window
  rule, so neither scores nor a dense mask exist at any size; ``mask_mod`` applies the token-exact rule inside the
  listed blocks.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..kernels.attention import default_block, softcapped_attention

KERNELS = ("auto", "flex", "blocks")
# (query, key) pairs per head in one SDPA call of the blocked kernel: 4M, i.e. 16 MiB of float32 scores per head
# on the math path, and much less on the fused ones.
CHUNK_PAIRS = 1 << 22
FLEX_BLOCK = 128


def resolve_kernel(name: str, device: torch.device) -> str:
    """``auto`` -> ``flex`` on CUDA, ``blocks`` elsewhere; ``flex`` needs CUDA (FlexAttention has no CPU backward)."""
    if name not in KERNELS:
        raise ValueError(f"student kernel must be one of {KERNELS}, got {name!r}")
    if name == "auto":
        return "flex" if device.type == "cuda" else "blocks"
    if name == "flex" and device.type != "cuda":
        raise ValueError(f"the flex student kernel needs a CUDA device (FlexAttention has no CPU backward), "
                         f"got {device}")
    return name


def _trim_run(
    q: torch.Tensor, num_sink: int, k_run: torch.Tensor, v_run: torch.Tensor, run_start: int, recent: int
) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """Drop the run keys no query can see; returns ``(k_run, v_run, run_start, first)`` with ``first`` the position
    of the first query."""
    c, run_len = q.shape[-2], k_run.shape[-2]
    if run_len < c:
        raise ValueError(f"the run ({run_len} keys) must contain the {c} query positions")
    first = run_start + run_len - c
    if run_start > max(num_sink, first - recent + 1):
        raise ValueError(f"the run starts at {run_start}: the windows of the queries from {first} need the keys from "
                         f"{max(num_sink, first - recent + 1)}")
    lo = max(0, first - recent + 1 - run_start)
    return k_run[..., lo:, :], v_run[..., lo:, :], run_start + lo, first


# ------------------------------------------------------------------------------------------------ blocked SDPA
def _window_mask(
    num_blocks: int, block: int, num_sink: int, recent: int, run_start: int, first: int, last: int,
    device: torch.device,
) -> torch.Tensor:
    """Bool ``[num_blocks, 1, block, S + block + recent - 1]``: the sink keys, then the window slots of each block;
    slot ``j`` of block ``b`` holds the key at ``first + b * block - recent + 1 + j``."""
    window = block + recent - 1
    q_abs = first + torch.arange(num_blocks * block, device=device).view(num_blocks, block, 1)
    q_abs = q_abs.clamp(max=last)  # padding queries of the last block repeat the last query
    k_abs = first + block * torch.arange(num_blocks, device=device).view(-1, 1, 1) - recent + 1
    k_abs = k_abs + torch.arange(window, device=device).view(1, 1, -1)
    win = (k_abs <= q_abs) & (q_abs - k_abs < recent) & (k_abs >= max(num_sink, run_start))
    sink = torch.arange(num_sink, device=device).view(1, 1, -1) <= q_abs
    return torch.cat([sink, win], dim=-1).unsqueeze(1)


def _blocks(
    q: torch.Tensor, k_sink: torch.Tensor, v_sink: torch.Tensor, k_run: torch.Tensor, v_run: torch.Tensor,
    run_start: int, recent: int, scale: float, softcap: float | None, block: int,
) -> torch.Tensor:
    """One call over every block of ``q``; the run starts at most ``recent - 1`` keys before the first query."""
    bsz, hq, c, d = q.shape
    hkv, num_sink, run_len = k_run.shape[1], k_sink.shape[-2], k_run.shape[-2]
    first = run_start + run_len - c
    block = min(block, c)
    num_blocks = math.ceil(c / block)
    window = block + recent - 1
    # Left padding puts the key at `first - recent + 1` in slot 0; the padded slots are masked out (they are
    # before position 0, or sink positions, which the sink keys provide).
    pad_left, pad_right = run_start - (first - recent + 1), num_blocks * block - c

    def windows(run: torch.Tensor, sink: torch.Tensor) -> torch.Tensor:  # -> [B * nb, Hkv, S + W, D]
        x = F.pad(run, (0, 0, pad_left, pad_right)).unfold(2, window, block).permute(0, 2, 1, 4, 3)
        if num_sink:
            x = torch.cat([sink.unsqueeze(1).expand(-1, num_blocks, -1, -1, -1), x], dim=3)
        return x.reshape(bsz * num_blocks, hkv, num_sink + window, d)

    keys, values = windows(k_run, k_sink), windows(v_run, v_sink)
    queries = F.pad(q, (0, 0, 0, pad_right)).view(bsz, hq, num_blocks, block, d).transpose(1, 2)
    queries = queries.reshape(bsz * num_blocks, hq, block, d)
    mask = _window_mask(num_blocks, block, num_sink, recent, run_start, first, first + c - 1, q.device)
    if bsz > 1:
        mask = mask.repeat(bsz, 1, 1, 1)
    if softcap is None:
        if q.is_cuda and hq != hkv:
            # CUDA's fused SDPA kernels take a mask only without enable_gqa (with it, the math path would hold
            # every score); the repeated windows are one chunk's worth.
            keys, values = keys.repeat_interleave(hq // hkv, 1), values.repeat_interleave(hq // hkv, 1)
        out = F.scaled_dot_product_attention(queries, keys, values, attn_mask=mask, scale=scale, enable_gqa=True)
    else:
        out = softcapped_attention(queries, keys, values, scale, softcap, mask)
    out = out.view(bsz, num_blocks, hq, block, d).transpose(1, 2).reshape(bsz, hq, num_blocks * block, d)
    return out[:, :, :c]


def blocked_streaming_attention(
    q: torch.Tensor,
    k_sink: torch.Tensor,
    v_sink: torch.Tensor,
    k_run: torch.Tensor,
    v_run: torch.Tensor,
    run_start: int,
    recent: int,
    scale: float,
    softcap: float | None = None,
    block: int | None = None,
    chunk_pairs: int | None = None,
) -> torch.Tensor:
    """Token-exact sink + recent attention (see the module docstring) -> ``[B, Hq, C, D]``; ``chunk_pairs``
    defaults to :data:`CHUNK_PAIRS`."""
    k_run, v_run, run_start, first = _trim_run(q, k_sink.shape[-2], k_run, v_run, run_start, recent)
    c, num_sink = q.shape[-2], k_sink.shape[-2]
    chunk_pairs = CHUNK_PAIRS if chunk_pairs is None else chunk_pairs
    block = min(block or default_block(recent), c)
    blocks_per_chunk = max(1, chunk_pairs // (block * (num_sink + block + recent - 1)))
    chunk = blocks_per_chunk * block
    if c <= chunk:
        return _blocks(q, k_sink, v_sink, k_run, v_run, run_start, recent, scale, softcap, block)
    recompute = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k_sink, v_sink, k_run, v_run))
    out = []
    for a in range(0, c, chunk):
        b = min(c, a + chunk)
        # queries at first + a .. first + b - 1 reach back to first + a - recent + 1
        lo = max(run_start, first + a - recent + 1) - run_start
        hi = first + b - run_start
        args = (q[..., a:b, :], k_sink, v_sink, k_run[..., lo:hi, :], v_run[..., lo:hi, :], run_start + lo,
                recent, scale, softcap, block)
        if recompute:  # keep only the inputs; the chunk's windows and mask are rebuilt in the backward pass
            out.append(checkpoint(_blocks, *args, use_reentrant=False, preserve_rng_state=False))
        else:
            out.append(_blocks(*args))
    return torch.cat(out, dim=-2)


# ------------------------------------------------------------------------------------------------ FlexAttention
_compiled_flex: Any = None


def _flex() -> Any:
    """FlexAttention compiled once per process, for dynamic sequence lengths (each sample has its own)."""
    global _compiled_flex
    if _compiled_flex is None:
        from torch.nn.attention.flex_attention import flex_attention

        _compiled_flex = torch.compile(flex_attention, dynamic=True)
    return _compiled_flex


class FlexWindow:
    """The block mask and ``mask_mod`` of one window (sink count, recent) on one device.

    ``mask_mod`` reads the layout of the current call from 0-dim tensors that :meth:`block_mask` updates in place,
    so that one function object (and so one compiled kernel) serves every call. Every layer of one pass has the
    same layout; :meth:`block_mask` is called again only for another layout, after the previous pass's backward.
    Keys are laid out as ``[sink keys (S), run keys from run_start, padding]``, queries from ``q_start``.
    """

    def __init__(self, recent: int, device: torch.device):
        self.recent = recent
        self.device = device
        self.layout: tuple[int, ...] | None = None
        self.mask: Any = None
        scalar = lambda: torch.zeros((), dtype=torch.int32, device=device)  # noqa: E731
        self.q_start, self.run_start, self.num_sink, self.num_keys = scalar(), scalar(), scalar(), scalar()
        q_start, run_start, num_sink, num_keys = self.q_start, self.run_start, self.num_sink, self.num_keys

        def mask_mod(b: Any, h: Any, q_idx: Any, kv_idx: Any) -> Any:
            q = q_idx + q_start
            is_sink = kv_idx < num_sink
            k = torch.where(is_sink, kv_idx, kv_idx - num_sink + run_start)
            visible = (k <= q) & (is_sink | ((q - k < recent) & (k >= num_sink)))
            return visible & (kv_idx < num_keys)

        self.mask_mod = mask_mod

    def block_mask(self, num_queries: int, q_start: int, num_sink: int, run_len: int, run_start: int) -> Any:
        """The block mask of queries ``q_start..q_start+C-1`` over ``S`` sink keys and ``R`` run keys (padded to
        whole blocks); a :class:`~torch.nn.attention.flex_attention.BlockMask`."""
        from torch.nn.attention.flex_attention import BlockMask

        layout = (num_queries, q_start, num_sink, run_len, run_start)
        if layout == self.layout:
            return self.mask
        bs = FLEX_BLOCK
        num_keys = num_sink + run_len
        nq, nkv = math.ceil(num_queries / bs), math.ceil(num_keys / bs)
        for tensor, value in ((self.q_start, q_start), (self.run_start, run_start), (self.num_sink, num_sink),
                              (self.num_keys, num_keys)):
            tensor.fill_(value)
        # Per query block: the sink blocks, then the blocks of run keys its windows reach (a block holding both
        # sink and run keys is listed once, as a sink block).
        sink_blocks = math.ceil(num_sink / bs)
        first = q_start + bs * torch.arange(nq, dtype=torch.int64)
        lo_pos = (first - self.recent + 1).clamp(min=max(run_start, num_sink))
        hi_pos = (first + bs - 1).clamp(max=q_start + num_queries - 1)
        lo_blk = ((num_sink + lo_pos - run_start) // bs).clamp(min=sink_blocks)
        hi_blk = (num_sink + hi_pos - run_start) // bs
        counts = sink_blocks + (hi_blk - lo_blk + 1).clamp(min=0)
        col = torch.arange(nkv, dtype=torch.int64)[None, :]
        indices = torch.where(col < sink_blocks, col, lo_blk[:, None] + col - sink_blocks).clamp(max=nkv - 1)
        # kv_indices is a full-width table (one column per key block); only the first `counts` of a row count
        self.mask = BlockMask.from_kv_blocks(
            counts.to(torch.int32).view(1, 1, nq).to(self.device),
            indices.to(torch.int32).view(1, 1, nq, nkv).to(self.device),
            BLOCK_SIZE=bs,
            mask_mod=self.mask_mod,
            seq_lengths=(nq * bs, nkv * bs),
        )
        self.layout = layout
        return self.mask


_windows: dict[tuple[int, str], FlexWindow] = {}


def flex_window(recent: int, device: torch.device) -> FlexWindow:
    """The :class:`FlexWindow` of ``recent`` on ``device``, one per process (one compiled ``mask_mod``)."""
    key = (recent, str(device))
    if key not in _windows:
        _windows[key] = FlexWindow(recent, device)
    return _windows[key]


_softcaps: dict[float, Any] = {}


def _softcap_mod(cap: float) -> Any:
    """``score_mod`` of soft-capped scores, one function object per cap (so one compiled kernel)."""
    if cap not in _softcaps:

        def score_mod(score: Any, b: Any, h: Any, q_idx: Any, kv_idx: Any) -> Any:
            return cap * torch.tanh(score / cap)

        _softcaps[cap] = score_mod
    return _softcaps[cap]


def _pad_to(x: torch.Tensor, length: int) -> torch.Tensor:
    return F.pad(x, (0, 0, 0, length - x.shape[-2]))


def flex_streaming_attention(
    q: torch.Tensor,
    k_sink: torch.Tensor,
    v_sink: torch.Tensor,
    k_run: torch.Tensor,
    v_run: torch.Tensor,
    run_start: int,
    recent: int,
    scale: float,
    softcap: float | None = None,
    compiled: bool = True,
) -> torch.Tensor:
    """Token-exact sink + recent attention with FlexAttention -> ``[B, Hq, C, D]``.

    ``compiled=False`` runs eager FlexAttention, a reference that materialises every score (tests only).
    """
    from torch.nn.attention.flex_attention import flex_attention

    k_run, v_run, run_start, first = _trim_run(q, k_sink.shape[-2], k_run, v_run, run_start, recent)
    c, num_sink, run_len = q.shape[-2], k_sink.shape[-2], k_run.shape[-2]
    mask = flex_window(recent, q.device).block_mask(c, first, num_sink, run_len, run_start)
    q_len, kv_len = mask.seq_lengths
    # Whole blocks: the padding keys are invisible to mask_mod, the padding queries are dropped.
    keys = _pad_to(torch.cat([k_sink, k_run], dim=2), kv_len)
    values = _pad_to(torch.cat([v_sink, v_run], dim=2), kv_len)
    queries = _pad_to(q, q_len)
    score_mod = None if softcap is None else _softcap_mod(float(softcap))
    attend = _flex() if compiled else flex_attention
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # eager FlexAttention warns that it is slow
        out = attend(queries, keys, values, score_mod=score_mod, block_mask=mask, scale=scale, enable_gqa=True)
    return out[:, :, :c]


def check_flex(
    num_query_heads: int, num_kv_heads: int, head_dim: int, sink: int, recent: int, dtype: torch.dtype,
    device: torch.device,
) -> str | None:
    """Run the compiled flex kernel forward and backward once on a small problem of the model's head layout and
    compare it with the blocked kernel; None if it works, else what went wrong. This compiles the kernel (for
    dynamic lengths) before the first step, so that a stack without a working FlexAttention falls back cleanly."""
    gen = torch.Generator(device=device).manual_seed(0)
    c = 2 * FLEX_BLOCK + 17
    shapes = ((num_query_heads, c), (num_kv_heads, sink), (num_kv_heads, sink), (num_kv_heads, c + recent - 1),
              (num_kv_heads, c + recent - 1))
    inputs = [torch.randn(1, h, n, head_dim, generator=gen, device=device, dtype=dtype) for h, n in shapes]
    dout = torch.randn(1, num_query_heads, c, head_dim, generator=gen, device=device, dtype=dtype)
    results = []
    try:
        for kernel in (flex_streaming_attention, blocked_streaming_attention):
            leaves = [x.clone().requires_grad_() for x in inputs]
            out = kernel(*leaves[:5], sink, recent, head_dim**-0.5)
            out.backward(dout)
            grads = [torch.zeros_like(x) if x.grad is None else x.grad for x in leaves]
            results.append([out.float(), *(g.float() for g in grads)])
    except Exception as err:  # noqa: BLE001 - any failure of the compiled kernel means: use the blocked one
        return f"{type(err).__name__}: {str(err).strip().splitlines()[0][:300] if str(err).strip() else ''}"
    tol = 3e-2 if dtype in (torch.bfloat16, torch.float16) else 1e-4
    for got, want in zip(*results):
        error = ((got - want).norm() / want.norm().clamp(min=1e-12)).item()
        if not error <= tol:  # also catches NaN
            return f"compiled FlexAttention differs from the blocked kernel (relative error {error:.3g})"
    return None
