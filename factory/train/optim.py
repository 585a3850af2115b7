"""What every training loop here shares: the learning-rate schedule and the precision choice."""

from __future__ import annotations

import math

import torch


def bf16_is_fast() -> bool:
    """bf16 autocast pays off on GPUs and on CPUs with native bf16 (AVX512-BF16, AMX), and is far
    slower than fp32 on AVX2. torch's capability string says only "AVX512" on such a CPU, so ask for
    the feature itself."""
    native = (getattr(torch.cpu, name, lambda: False)() for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
    return any(native) or torch.cuda.is_available()


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warm-up to `peak`, then a cosine down to a tenth of it at `total`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))
