"""Linear warmup, then cosine decay to a floor: the GPT-2 lineage schedule.

    factor(t) = (t + 1) / warmup                                   t < warmup
              = floor + (1 - floor) * (1 + cos(pi * p)) / 2        p = (t - warmup) / (steps - warmup)

``t`` counts completed optimizer steps, so the first step already runs at lr/warmup (never 0).
The training loop steps the scheduler itself, once per optimizer step, on every launcher: under
Accelerate a torch scheduler handed to ``prepare`` would be stepped ``num_processes`` times per
step (docs/design/field_notes.md, 'Accelerate 1.15'), which is why it is not handed over.
"""

from __future__ import annotations

import math

from torch.optim.lr_scheduler import LambdaLR


class WarmupCosine:
    """Picklable lr factor (LambdaLR stores plain functions badly in checkpoints)."""

    def __init__(self, warmup: int, steps: int, floor: float):
        if steps <= 0:
            raise ValueError(f"steps must be positive, got {steps}")
        if not 0 <= warmup <= steps:
            raise ValueError(f"warmup must be in [0, steps={steps}], got {warmup}")
        if not 0 <= floor <= 1:
            raise ValueError(f"floor must be in [0, 1], got {floor}")
        self.warmup, self.steps, self.floor = warmup, steps, floor

    def __call__(self, t: int) -> float:
        if t < self.warmup:
            return (t + 1) / self.warmup
        progress = min(1.0, (t - self.warmup) / max(1, self.steps - self.warmup))
        return self.floor + (1 - self.floor) * 0.5 * (1 + math.cos(math.pi * progress))


def warmup_cosine(optimizer, warmup: int, steps: int, floor: float) -> LambdaLR:
    return LambdaLR(optimizer, WarmupCosine(warmup, steps, floor))
