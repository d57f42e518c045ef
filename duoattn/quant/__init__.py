"""Quantisation: the retrieval heads' KV cache in int8 / int4 (``kv``, ``cache``) and 8-bit linear weights
(``weights``)."""

from .kv import KV_BITS, KVQuantConfig, QuantizedKV, dequantize, quantize

__all__ = ["KV_BITS", "KVQuantConfig", "QuantizedKV", "dequantize", "quantize"]
