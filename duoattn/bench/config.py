"""Settings of ``duoattn bench`` and the rows it measures."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from ..checks import check_int
from ..engine.compile import COMPILE_MODES
from ..kernels.dispatch import DECODE_KERNELS, STREAMING_PREFILL_KERNELS
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
    """What to measure.

    Attributes:
        shapes: named random-weight model shapes (``llama-3-8b``, ``llama-2-7b``, ``tiny``); ignored with ``model``.
        model: a real model (HF id, directory or ``.gguf``) instead of the shapes.
        pattern: a pattern directory for ``model`` (default: random gates, seeded).
        ratios: fractions of retrieval KV heads; 1.0 is the engine's full-attention path.
        contexts: decode context lengths (tokens already in the cache).
        prefill_contexts: prompt lengths for the chunked prefill timing; ``prefill_chunk`` tokens per chunk.
        stock_contexts: contexts for the reference row: transformers' own SDPA attention and dynamic cache.
        max_context_ratios: ratios whose longest decodable context is searched (empty: no search).
        decode_fill: ``random`` fills the cache with random keys/values (no prefill); ``prefill`` runs a prefill.
        bandwidth: bytes/s used for the bandwidth bound (the measured copy bandwidth is reported as well).
        profile: add a kernel-time breakdown to every decode row (graph replay and an eager step).
        compile: ``none``, or ``norms`` to compile the model's RMSNorm modules (``torch.compile``, inductor)
            before the CUDA graph is captured.
    """

    shapes: list[str] = field(default_factory=lambda: ["llama-3-8b"])
    model: str | None = None
    pattern: str | None = None
    ratios: list[float] = field(default_factory=lambda: [1.0, 0.5, 0.25])
    contexts: list[int] = field(default_factory=lambda: [131072])
    prefill_contexts: list[int] = field(default_factory=list)
    prefill_chunk: int = 32768
    stock_contexts: list[int] = field(default_factory=list)
    max_context_ratios: list[float] = field(default_factory=list)
    sink: int = 64
    recent: int = 256
    steps: int = 50
    warmup: int = 10
    decode_fill: str = "random"
    graph: bool = True
    decode_kernel: str = "auto"
    streaming_kernel: str = "auto"
    dtype: str = "bfloat16"
    device: str | None = None
    seed: int = 0
    bandwidth: float = H200_COPY_BANDWIDTH
    profile: bool = False
    compile: str = "none"
    out: str | None = None

    def __post_init__(self) -> None:
        if self.model is None:
            if not self.shapes:
                raise ValueError("give at least one model shape, or a model")
            unknown = [s for s in self.shapes if s not in SHAPES]
            if unknown:
                raise ValueError(f"unknown model shape(s) {unknown}; known: {', '.join(SHAPES)}")
        for name in ("ratios", "max_context_ratios"):
            bad = [r for r in getattr(self, name) if not 0.0 <= r <= 1.0]
            if bad:
                raise ValueError(f"{name} must lie in [0, 1] (fractions of retrieval heads), got {bad}")
        if not self.ratios:
            raise ValueError("ratios must not be empty")
        _positive_ints("contexts", self.contexts)
        _positive_ints("prefill_contexts", self.prefill_contexts)
        _positive_ints("stock_contexts", self.stock_contexts)
        for name, low in (("prefill_chunk", 2), ("steps", 1), ("warmup", 0), ("sink", 0), ("recent", 1)):
            check_int(name, getattr(self, name), low)
        if self.decode_fill not in ("random", "prefill"):
            raise ValueError(f"decode_fill must be 'random' or 'prefill', got {self.decode_fill!r}")
        if self.decode_kernel not in DECODE_KERNELS:
            raise ValueError(f"decode_kernel must be one of {DECODE_KERNELS}, got {self.decode_kernel!r}")
        if self.streaming_kernel not in STREAMING_PREFILL_KERNELS:
            raise ValueError(
                f"streaming_kernel must be one of {STREAMING_PREFILL_KERNELS}, got {self.streaming_kernel!r}"
            )
        if self.compile not in COMPILE_MODES:
            raise ValueError(f"compile must be one of {COMPILE_MODES}, got {self.compile!r}")
        if self.dtype not in ("bfloat16", "float16", "float32"):
            raise ValueError(f"dtype must be bfloat16, float16 or float32, got {self.dtype!r}")
        if not self.bandwidth > 0:
            raise ValueError(f"bandwidth must be positive (bytes/s), got {self.bandwidth!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Row:
    """One measurement.

    ``path`` is ``stock`` (transformers' SDPA + dynamic cache), ``full`` (the engine, every head retrieval) or ``duo``
    (the engine at ``ratio`` retrieval heads). ``kind`` is ``decode``, ``prefill`` or ``max_context``.
    """

    kind: str
    path: str
    shape: str
    ratio: float
    context: int
    status: str = "ok"
    ms_per_token: float | None = None
    ms_spread: list[float] | None = None  # [min, max] of the timed steps
    prefill_s: float | None = None
    peak_bytes: int | None = None
    kv_bytes: int | None = None
    kv_read_bytes: int | None = None
    weight_read_bytes: int | None = None
    bound_ms: float | None = None
    fill: str | None = None
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
