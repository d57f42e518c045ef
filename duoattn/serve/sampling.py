"""Per-request sampling: greedy, temperature and nucleus (top-p), each request with its own seeded generator.

A request's draws depend only on its seed and its own logits, never on which other requests run beside it.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    """How one request picks its tokens. ``temperature`` 0 is greedy (argmax, as ``generate(do_sample=False)``)."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None

    def generator(self, device: torch.device) -> torch.Generator | None:
        """A generator seeded with ``seed`` (a random seed if None); None for greedy decoding."""
        if self.temperature == 0.0:
            return None
        seed = self.seed if self.seed is not None else secrets.randbits(63)
        return torch.Generator(device=device).manual_seed(seed % 2**64)


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """One token id from ``logits [vocab]``."""
    if params.temperature == 0.0 or generator is None:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float() / params.temperature, dim=-1)
    if params.top_p < 1.0:
        # Keep the smallest set of most likely tokens whose mass reaches top_p (the most likely one always).
        sorted_probs, order = probs.sort(descending=True)
        keep = sorted_probs.cumsum(0) - sorted_probs < params.top_p
        probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_probs[keep])
    return int(torch.multinomial(probs, 1, generator=generator))
