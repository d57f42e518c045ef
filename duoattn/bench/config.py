"""Settings of ``duoattn bench`` and the rows it measures."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from ..checks import check_int
from ..kernels.dispatch import DECODE_KERNELS, STREAMING_PREFILL_KERNELS
from ..quant.kv import KV_BITS
from ..quant.weights import WEIGHT_BITS
from .shapes import SHAPES

H200_COPY_BANDWIDTH = 4.3e12  # bytes/s, device-to-device copy measured on the team's H200 (read + write)


def _positive_ints(name: str, values: list[int], allow_empty: bool = True) -> None:
    if not values and not allow_empty:
        raise ValueError(f"{name} must not be empty")
    bad = [v for v in values if isinstance(v, bool) or not isinstance(v, int) or v < 1]
    if bad:
        raise ValueError(f"{name} must be positive integers, got {bad}")


@dataclass
class BenchConfig:
    """What to measure. Every DuoAttention and full-attention row runs ``model.generate`` under ``duo_attention``:
    what users run.

    Attributes:
        shapes: named random-weight model shapes (``llama-3-8b``, ``llama-2-7b``, ``tiny``); ignored with ``model``.
        model: a real model (HF id, directory or ``.gguf``) instead of the shapes.
        pattern: a pattern directory for ``model`` (default: random gates, seeded).
        ratios: fractions of retrieval KV heads; 1.0 is full attention on the DuoAttention path.
        kv_bits: retrieval-cache precisions (16, 8, 4) of the DuoAttention rows (full attention: 16 only).
        weight_bits: linear-weight precisions (16, or 8 for int8 weight-only layers); one model per value.
        contexts: decode contexts: the cache holds that many random keys / values (no prefill) and ``generate``
            decodes ``steps`` tokens after it.
        prefill_contexts: prompt lengths that ``generate`` prefills for real, in chunks of ``prefill_chunk``.
        stock: add transformers' own rows (SDPA, dynamic cache, the unpatched model) at the same contexts.
        capacity: search the longest context whose cache fits and decodes, for every (ratio, kv_bits) setting.
        step_rows: add the step-level diagnostic rows (a graph-replayed decode step on the same cache).
        bandwidth: bytes/s used for the bandwidth bound (the measured copy bandwidth is reported as well).
        profile: add a kernel-time breakdown to every step row.
    """

    shapes: list[str] = field(default_factory=lambda: ["llama-3-8b"])
    model: str | None = None
    pattern: str | None = None
    ratios: list[float] = field(default_factory=lambda: [1.0, 0.5, 0.25])
    kv_bits: list[int] = field(default_factory=lambda: [16])
    weight_bits: list[int] = field(default_factory=lambda: [16])
    contexts: list[int] = field(default_factory=lambda: [131072])
    prefill_contexts: list[int] = field(default_factory=list)
    prefill_chunk: int = 32768
    stock: bool = True
    capacity: bool = False
    step_rows: bool = True
    sink: int = 64
    recent: int = 256
    steps: int = 32
    graph: bool = True
    decode_kernel: str = "auto"
    streaming_kernel: str = "auto"
    dtype: str = "bfloat16"
    device: str | None = None
    seed: int = 0
    bandwidth: float = H200_COPY_BANDWIDTH
    reserve_gib: float = 3.0
    profile: bool = False
    out: str | None = None

    def __post_init__(self) -> None:
        if self.model is None:
            if not self.shapes:
                raise ValueError("give at least one model shape, or a model")
            unknown = [s for s in self.shapes if s not in SHAPES]
            if unknown:
                raise ValueError(f"unknown model shape(s) {unknown}; known: {', '.join(SHAPES)}")
        bad = [r for r in self.ratios if not 0.0 <= r <= 1.0]
        if bad:
            raise ValueError(f"ratios must lie in [0, 1] (fractions of retrieval heads), got {bad}")
        if not self.ratios:
            raise ValueError("ratios must not be empty")
        if not self.kv_bits or any(b not in KV_BITS for b in self.kv_bits):
            raise ValueError(f"kv_bits must be some of {KV_BITS}, got {self.kv_bits}")
        if not self.weight_bits or any(b not in WEIGHT_BITS for b in self.weight_bits):
            raise ValueError(f"weight_bits must be some of {WEIGHT_BITS}, got {self.weight_bits}")
        _positive_ints("contexts", self.contexts)
        _positive_ints("prefill_contexts", self.prefill_contexts)
        for name, low in (("prefill_chunk", 2), ("steps", 1), ("sink", 0), ("recent", 1)):
            check_int(name, getattr(self, name), low)
        if self.decode_kernel not in DECODE_KERNELS:
            raise ValueError(f"decode_kernel must be one of {DECODE_KERNELS}, got {self.decode_kernel!r}")
        if self.streaming_kernel not in STREAMING_PREFILL_KERNELS:
            raise ValueError(
                f"streaming_kernel must be one of {STREAMING_PREFILL_KERNELS}, got {self.streaming_kernel!r}"
            )
        if self.dtype not in ("bfloat16", "float16", "float32"):
            raise ValueError(f"dtype must be bfloat16, float16 or float32, got {self.dtype!r}")
        if not self.bandwidth > 0:
            raise ValueError(f"bandwidth must be positive (bytes/s), got {self.bandwidth!r}")
        if not self.reserve_gib >= 0:
            raise ValueError(f"reserve_gib must be >= 0, got {self.reserve_gib!r}")

    def settings(self) -> list[tuple[float, int]]:
        """``(ratio, kv_bits)`` pairs: full attention (ratio 1) keeps the model dtype."""
        return [(r, b) for r in self.ratios for b in self.kv_bits if r < 1.0 or b == 16]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Row:
    """One measurement.

    ``kind`` is ``generate`` (``model.generate`` end to end: the headline), ``step`` (one graph-replayed decode step:
    a diagnostic) or ``max_context``. ``path`` is ``stock`` (the unpatched model: SDPA + dynamic cache), ``full``
    (DuoAttention's path with every head retrieval) or ``duo``. ``fill`` is ``random`` (the cache was filled with
    random keys and values) or ``prefill`` (``generate`` prefilled the prompt).
    """

    kind: str
    path: str
    shape: str
    ratio: float
    context: int
    kv_bits: int = 16
    weight_bits: int = 16
    status: str = "ok"
    fill: str | None = None
    ms_per_token: float | None = None
    ms_spread: list[float] | None = None  # [min, max] of the timed steps (step rows)
    prefill_s: float | None = None
    first_call_s: float | None = None  # generate's first call on a cache: kernel warm-up and graph capture
    peak_bytes: int | None = None
    kv_bytes: int | None = None
    kv_read_bytes: int | None = None
    weight_read_bytes: int | None = None
    bound_ms: float | None = None
    kernels: dict[str, Any] | None = None
    profile: dict[str, Any] | None = None
    note: str = ""

    @property
    def vs_bound(self) -> float | None:
        if self.ms_per_token is None or not self.bound_ms:
            return None
        return self.ms_per_token / self.bound_ms

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["vs_bound"] = self.vs_bound
        return d
