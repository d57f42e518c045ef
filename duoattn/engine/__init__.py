"""The fast DuoAttention engine: reordered heads, a preallocated graph-safe cache, block-sparse prefill and split-KV
decode kernels, decode steps replayed from a CUDA graph. Everything also runs on the CPU with SDPA kernels."""

from .cache import StaticDuoCache, StaticDuoLayer
from .enable import FastDuo, disable_fast_duo, enable_fast_duo, fast_duo_attention
from .reorder import HeadOrder, permute_heads
from .runner import DecodeRunner, prefill

__all__ = [
    "DecodeRunner",
    "FastDuo",
    "HeadOrder",
    "StaticDuoCache",
    "StaticDuoLayer",
    "disable_fast_duo",
    "enable_fast_duo",
    "fast_duo_attention",
    "permute_heads",
    "prefill",
]
