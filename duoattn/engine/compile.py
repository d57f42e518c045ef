"""Optional compilation for fewer kernels per decode step (the model's own code stays in charge).

:func:`compile_norms` routes each RMSNorm module's ``forward`` through ``torch.compile`` (one fused kernel instead
of the seven elementwise kernels of the eager module) by setting an instance attribute; :func:`restore_norms`
deletes it, which restores the class's method. Every norm of a model shares one compiled graph.

Compiling the whole decode step is not offered: dynamo traces it as one graph (see the tests), but inductor
(torch 2.11, triton 3.6) failed to recompile the Triton decode kernel inside it on the H200 (docs/benchmarks.md).
"""

from __future__ import annotations

import torch
from torch import nn

COMPILE_MODES = ("none", "norms")


def compile_norms(model: nn.Module, backend: str = "inductor") -> list[nn.Module]:
    """Compile the ``forward`` of every module whose class name ends with ``RMSNorm``; returns those modules."""
    done = []
    for module in model.modules():
        if type(module).__name__.endswith("RMSNorm") and "forward" not in vars(module):
            module.forward = torch.compile(module.forward, backend=backend)
            done.append(module)
    if not done:
        raise ValueError(f"{type(model).__name__} has no RMSNorm modules to compile")
    return done


def restore_norms(modules: list[nn.Module]) -> None:
    """Undo :func:`compile_norms`."""
    for module in modules:
        if "forward" in vars(module):
            del module.forward
