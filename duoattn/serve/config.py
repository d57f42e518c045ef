"""Settings of ``duoattn serve``."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..checks import check_int
from ..prefill import PrefillMode
from ..quant.kv import KV_BITS

GIB = 2**30
# Default KV budget: this fraction of the GPU memory left free once the model is loaded (the rest is headroom for
# activations, prefill scratch and the allocator's fragmentation) ...
CUDA_FREE_FRACTION = 0.8
# ... and on the CPU a fixed budget, since free host memory is shared with everything else on the machine.
CPU_BUDGET_GIB = 4.0


@dataclass
class ServeConfig:
    """Settings of the server; the CLI builds one from its flags.

    Attributes:
        model: a Hugging Face id, directory or ``.gguf`` file; None for the embedded SmolLM2-135M-Instruct.
        pattern: a pattern directory; None for the pattern shipped for the embedded model.
        sparsity: fraction of streaming heads.
        kv_bits: 16, 8 or 4: how retrieval heads store keys and values.
        host, port: where to listen.
        max_batch: most requests running at once (decoding or prefilling); more wait in the queue.
        kv_budget_gib: KV pool size; None: a fraction of free memory on CUDA, a fixed budget on the CPU.
        queue_size: most requests waiting for memory or a batch slot; one more gets 503.
        queue_timeout: seconds a request waits in the queue before it gets 503.
        prefill_chunk: prompt tokens per prefill chunk; one chunk runs per scheduling round.
        default_max_tokens: tokens a chat request may generate when it sets no ``max_tokens`` (bounded by the
            context); completions default to OpenAI's 16.
        max_model_len: longest prompt + completion accepted; None: the model's ``max_position_embeddings``.
        served_name: the model name clients send; None: the model's directory or file name.
        device, dtype: where and in which precision the model runs (defaults: see ``load_model``).
        cuda_graphs: replay decode steps from CUDA graphs on the GPU.
        prefill: DuoAttention's prefill mode, ``streaming``, ``full`` or ``window:N`` (:mod:`duoattn.prefill`); the
            pool keeps room for one prompt's history (only one request prefills at a time).
    """

    model: str | None = None
    pattern: str | None = None
    sparsity: float = 0.5
    kv_bits: int = 16
    host: str = "127.0.0.1"
    port: int = 8000
    max_batch: int = 16
    kv_budget_gib: float | None = None
    queue_size: int = 64
    queue_timeout: float = 30.0
    prefill_chunk: int = 512
    default_max_tokens: int = 256
    max_model_len: int | None = None
    served_name: str | None = None
    device: str | None = None
    dtype: str | None = None
    cuda_graphs: bool = True
    prefill: str = "streaming"

    def __post_init__(self) -> None:
        self.prefill = PrefillMode.parse(self.prefill).name
        if not 0.0 <= self.sparsity <= 1.0:
            raise ValueError(f"sparsity must be in [0, 1], got {self.sparsity}")
        if self.kv_bits not in KV_BITS:
            raise ValueError(f"kv_bits must be one of {KV_BITS}, got {self.kv_bits!r}")
        check_int("port", self.port, 0)
        if self.port > 65535:
            raise ValueError(f"port must be <= 65535, got {self.port}")
        for name in ("max_batch", "prefill_chunk", "default_max_tokens"):
            check_int(name, getattr(self, name), 1)
        check_int("queue_size", self.queue_size, 0)
        if self.max_model_len is not None:
            check_int("max_model_len", self.max_model_len, 2)
        if self.kv_budget_gib is not None and not (math.isfinite(self.kv_budget_gib) and self.kv_budget_gib > 0):
            raise ValueError(f"kv_budget_gib must be a positive number, got {self.kv_budget_gib}")
        if not (math.isfinite(self.queue_timeout) and self.queue_timeout >= 0):
            raise ValueError(f"queue_timeout must be a number of seconds >= 0, got {self.queue_timeout}")
