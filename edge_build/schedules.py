"""Learning-rate schedules: the course's `build_lr`, one learning rate per training step.

`constant` holds `lr_max`; `cosine` follows half a cosine from `lr_max` to `lr_end`;
`square` decays as (1 - progress)^2. Each may start with a linear warm-up from
`lr_init` to `lr_max`. The list is fed to MindSpore's optimizer as a per-step tensor.
"""

from __future__ import annotations

import math

SCHEDULES = ("constant", "cosine", "square")


def build_lr(
    total_steps: int,
    lr_max: float,
    decay_type: str = "cosine",
    warmup_steps: int = 0,
    lr_init: float = 0.0,
    lr_end: float = 0.0,
) -> list[float]:
    """One learning rate per step: linear warm-up over `warmup_steps`, then the decay."""
    if decay_type not in SCHEDULES:
        raise ValueError(f"unknown learning-rate schedule {decay_type!r}; choose one of {', '.join(SCHEDULES)}")
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    if not 0 <= warmup_steps <= total_steps:
        raise ValueError(f"warmup_steps must be in 0..{total_steps}, got {warmup_steps}")
    if lr_max < 0 or lr_init < 0 or lr_end < 0:
        raise ValueError("learning rates must be >= 0")
    decay_steps = total_steps - warmup_steps
    rates: list[float] = []
    for step in range(total_steps):
        if step < warmup_steps:
            # Reaches lr_max on the last warm-up step, so the decay starts from the peak.
            rate = lr_init + (lr_max - lr_init) * (step + 1) / warmup_steps
        else:
            progress = (step - warmup_steps) / decay_steps
            if decay_type == "cosine":
                rate = lr_end + (lr_max - lr_end) * 0.5 * (1.0 + math.cos(math.pi * progress))
            elif decay_type == "square":
                rate = lr_end + (lr_max - lr_end) * (1.0 - progress) ** 2
            else:
                rate = lr_max
        rates.append(float(rate))
    return rates
