"""The learning-rate schedule of the original identification runs, as a pure function of the step.

Linear warm-up from 0.1 x lr over the first fifth of the steps, flat, then linear decay to 0.1 x lr over the last
fifth. Being a function of ``(step, total_steps)`` alone, it needs no state in a checkpoint.
"""

from __future__ import annotations


def lr_factor(step: int, total_steps: int) -> float:
    """Multiplier of the base learning rate at ``step`` (0-based) of a ``total_steps`` run."""
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    if not 0 <= step < total_steps:
        raise ValueError(f"step must be in [0, {total_steps}), got {step}")
    ramp = total_steps / 5
    warmup = max((step + 1) / ramp, 0.1)
    decay = max((total_steps - step) / ramp, 0.1)
    return min(1.0, warmup, decay)
