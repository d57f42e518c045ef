"""8-bit weight-only quantisation of a model's linear layers, on PyTorch's own int8 matmul.

Each ``nn.Linear`` (except those named in ``skip``, the LM head by default, as in the original W8 setup) becomes an
:class:`Int8Linear`: int8 codes ``[out, in]`` with one symmetric scale per output channel,
``s_i = max_k |W_ik| / 127`` (rounded up to the model dtype), ``W_ik ~ q_ik * s_i``, so ``|W_ik - q_ik s_i| <= s_i / 2``
and each output moves by at most ``s_i / 2 * sum_k |x_k|``.

The matmul is ``torch._weight_int8pack_mm`` (int8 weights, activations in the model dtype, dequantisation fused in
the kernel), which PyTorch ships for the CPU and CUDA; where it is missing or refuses a dtype / shape the layer
falls back to dequantising its weight for the call (as it does for float32 / float64 activations). Why not a library: transformers' weight quantisers need
packages with compiled parts (bitsandbytes, torchao, optimum-quanto, hqq) that the GPU machine cannot install, and
its FP8 quantiser refuses to quantise on a CPU. See ``docs/quantization.md``.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from .kv import round_up, work_dtype

WEIGHT_BITS = (16, 8)  # 16: weights stay in the model dtype

# float32 activations take the dequantising path: PyTorch's CPU int8 kernel is 20x slower than it at prefill sizes
# (measured on 2 cores: 833 ms vs 42 ms for 600 x 576 x 1536).
FUSED_DTYPES = (torch.bfloat16, torch.float16)

# (device type, dtype) -> whether torch._weight_int8pack_mm runs there and agrees with the reference; probed once.
_FUSED_OK: dict[tuple[str, torch.dtype], bool] = {}


def _fused_available(device: torch.device, dtype: torch.dtype) -> bool:
    key = (device.type, dtype)
    if key not in _FUSED_OK:
        ok = False
        if dtype in FUSED_DTYPES and hasattr(torch, "_weight_int8pack_mm"):
            x = torch.linspace(-1, 1, 4 * 64, device=device).view(4, 64).to(dtype)
            w = (torch.arange(32 * 64, device=device) % 255 - 127).view(32, 64).to(torch.int8)
            s = torch.linspace(0.01, 0.02, 32, device=device).to(dtype)
            try:
                got = torch._weight_int8pack_mm(x, w, s).double()
                want = (x.double() @ w.double().T) * s.double()
                ok = bool(torch.allclose(got, want, rtol=2e-2, atol=2e-2))
            except (RuntimeError, NotImplementedError):
                ok = False
        _FUSED_OK[key] = ok
    return _FUSED_OK[key]


class Int8Linear(nn.Module):
    """``y = x @ (q * s[:, None]).T + b`` with int8 codes ``q [out, in]`` and per-output-channel scales ``s [out]``."""

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        if codes.dtype != torch.int8 or codes.dim() != 2:
            raise ValueError(f"codes must be a 2-D int8 tensor [out, in], got {codes.dtype} {tuple(codes.shape)}")
        if scale.shape != codes.shape[:1]:
            raise ValueError(f"scale must have shape [{codes.shape[0]}], got {tuple(scale.shape)}")
        # Parameters (frozen), not buffers: code elsewhere finds a module's device through its parameters.
        self.weight = nn.Parameter(codes, requires_grad=False)
        self.scale = nn.Parameter(scale, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        """Quantise ``linear``'s weight; scales are stored in its dtype, rounded up so no code exceeds 127."""
        w = linear.weight.detach()
        work = w.to(work_dtype(w.dtype))
        scale = round_up(work.abs().amax(dim=1) / 127, w.dtype)
        divisor = torch.where(scale == 0, torch.ones_like(scale), scale).to(work.dtype)  # all-zero rows stay 0
        codes = torch.round(work / divisor[:, None]).clamp_(-127, 127).to(torch.int8)
        return cls(codes, scale, linear.bias)

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``[out, in]`` weight as the layer applies it."""
        dtype = dtype or self.scale.dtype
        return self.weight.to(dtype) * self.scale.to(dtype)[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [..., in]`` -> ``[..., out]``."""
        lead = x.shape[:-1]
        rows = x.reshape(-1, self.in_features)
        scale = self.scale.to(x.dtype)
        # The CPU kernel crashes on bfloat16 rows whose length is not a multiple of 32; real models never have one.
        y = None
        if self.in_features % 32 == 0 and _fused_available(x.device, x.dtype):
            try:
                y = torch._weight_int8pack_mm(rows.contiguous(), self.weight, scale)
            except RuntimeError as err:  # a shape this build's kernel refuses: stop trying it on this device
                warnings.warn(f"torch._weight_int8pack_mm failed ({err}); dequantising weights instead", stacklevel=2)
                _FUSED_OK[(x.device.type, x.dtype)] = False
        if y is None:
            y = F.linear(rows, self.weight.to(x.dtype)) * scale
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y.view(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def quantize_linear_weights(model: nn.Module, bits: int = 8, skip: tuple[str, ...] = ("lm_head",)) -> int:
    """Replace every ``nn.Linear`` of ``model`` whose name does not end with one of ``skip`` by an
    :class:`Int8Linear`, in place (this is lossy: load the model again to undo it). Returns how many were
    replaced. ``bits=16`` leaves the model alone."""
    if isinstance(bits, bool) or bits not in WEIGHT_BITS:
        raise ValueError(f"weight_bits must be one of {WEIGHT_BITS}, got {bits!r}")
    if bits == 16:
        return 0
    targets = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and not any(name == s or name.endswith("." + s) for s in skip)
    ]
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, Int8Linear.from_linear(module))
    return len(targets)


def linear_weight_bytes(model: nn.Module) -> int:
    """Bytes of the weights (and int8 scales) of every linear layer, biases excluded."""
    total = 0
    for module in model.modules():
        if isinstance(module, Int8Linear):
            tensors = (module.weight, module.scale)
        elif isinstance(module, nn.Linear):
            tensors = (module.weight,)
        else:
            continue
        total += sum(t.numel() * t.element_size() for t in tensors)
    return total
