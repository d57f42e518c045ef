"""Attention kernels. ``attention`` holds the SDPA kernels used on every device; ``reference`` the dense oracle."""

from .attention import causal_attention, dense_attention, streaming_attention

__all__ = ["causal_attention", "dense_attention", "streaming_attention"]
