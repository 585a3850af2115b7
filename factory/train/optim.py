"""What every training loop here shares: the learning-rate schedule (the precision choice is `models.adapter.bf16_is_fast`)."""

from __future__ import annotations

import math


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warm-up to `peak`, then a cosine down to a tenth of it at `total`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))
