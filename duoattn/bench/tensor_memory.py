"""Peak memory of tensors on devices without allocator statistics (the CPU).

CUDA's caching allocator reports its peak (``torch.cuda.max_memory_allocated``); the CPU allocator reports
nothing. :class:`PeakTensorMemory` counts instead: every tensor that an operator creates while the mode is active
(forward and backward passes alike) adds its storage's bytes until that storage is freed. Tensors that existed
before (weights) are not counted. The count is exact for the tensors PyTorch creates, independent of the
allocator's caching and of other processes, so it suits tests; it slows every operator down, so time separately.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class PeakTensorMemory(TorchDispatchMode):
    """``with PeakTensorMemory() as m: ...`` then ``m.peak`` (bytes): the most bytes of tensor storage created in
    the block and alive at one moment; ``m.current``: those still alive."""

    def __init__(self, device: str = "cpu"):
        super().__init__()
        self.device = device
        self.current = 0
        self.peak = 0
        self._live: dict[int, int] = {}

    def _freed(self, key: int) -> None:
        self.current -= self._live.pop(key, 0)

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        # An output in an input's storage (a view, an in-place result) is not new memory.
        leaves = tree_flatten((args, kwargs))[0]
        inputs = {t.untyped_storage().data_ptr() for t in leaves if isinstance(t, torch.Tensor)}
        for tensor in tree_flatten(out)[0]:
            if not isinstance(tensor, torch.Tensor) or tensor.device.type != self.device:
                continue
            storage = tensor.untyped_storage()
            key = storage.data_ptr()
            if key == 0 or key in self._live or key in inputs:
                continue
            self._live[key] = storage.nbytes()
            self.current += storage.nbytes()
            self.peak = max(self.peak, self.current)
            weakref.finalize(storage, self._freed, key)
        return out
