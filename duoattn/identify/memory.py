"""Activation checkpointing of the student pass, one decoder layer at a time.

Only the gates need gradients, yet autograd keeps every layer's intermediate activations (the MLP's
``T x intermediate`` tensors dominate) until the backward pass. With :func:`checkpointed_layers`, the student
pass keeps only each layer's input hidden states and recomputes one layer at a time during the backward pass
(``torch.utils.checkpoint``, non-reentrant). The recomputed layer reads the same recorded teacher outputs and the
same gates (the optimizer steps after the backward), and routes attention to the student again through
:meth:`GateSet.student_pass`, so its values, and so the gradients, are those of the first computation.

It costs one more forward pass of the student; :func:`resolve_checkpointing` turns it on by default on CUDA, where
memory binds, and off on the CPU, where the default samples fit and time binds.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..models import attention_modules
from .gates import GateSet

CHECKPOINTING = ("auto", "on", "off")


def resolve_checkpointing(mode: str, device: torch.device) -> bool:
    """``auto`` -> on for CUDA, off elsewhere."""
    if mode not in CHECKPOINTING:
        raise ValueError(f"checkpointing must be one of {CHECKPOINTING}, got {mode!r}")
    return device.type == "cuda" if mode == "auto" else mode == "on"


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The decoder layer of each attention module (its parent), indexed by layer."""
    names = {id(module): name for name, module in model.named_modules()}
    layers = []
    for attn in attention_modules(model):
        parent = names[id(attn)].rpartition(".")[0]
        layers.append(model.get_submodule(parent))
    return layers


@contextmanager
def checkpointed_layers(model: nn.Module, gate_set: GateSet) -> Iterator[None]:
    """For the body, every decoder layer of ``model`` is checkpointed during student passes with autograd on; the
    teacher pass (no autograd) runs as before. The layers are restored afterwards."""
    layers = decoder_layers(model)

    def wrap(original: Any) -> Any:
        def forward(*args: Any, **kwargs: Any) -> Any:
            if not (gate_set.student and torch.is_grad_enabled()):
                return original(*args, **kwargs)
            start = gate_set.start  # the recomputation in the backward pass must see the same student pass

            def run(*a: Any, **kw: Any) -> Any:
                with gate_set.student_pass(start):
                    return original(*a, **kw)

            # eval mode: nothing random to replay, so the RNG state need not be saved
            return checkpoint(run, *args, use_reentrant=False, preserve_rng_state=False, **kwargs)

        return forward

    try:
        for layer in layers:
            layer.forward = wrap(layer.forward)
        yield
    finally:
        for layer in layers:
            layer.__dict__.pop("forward", None)
