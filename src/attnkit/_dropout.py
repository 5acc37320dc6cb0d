"""Counter-based attention dropout.

The keep/drop decision of score (b, h, i, j) is a hash of (seed, b, h, i, j), as
FlashAttention's Philox offsets are. So every backend and every tile size drops exactly the
same entries for one seed, the backward pass regenerates the forward's mask without storing
it, and a tiled kernel can be checked against the reference with dropout on.
"""

from __future__ import annotations

import torch
from torch import Tensor

_M32 = 0xFFFFFFFF


def _mix(x: Tensor) -> Tensor:
    """lowbias32 (C. Wellons): a well-mixing 32-bit integer hash, on int64 holding 32 bits."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _M32
    return x ^ (x >> 16)


def draw_seed(generator: torch.Generator | None, device: torch.device) -> int:
    """One 32-bit seed from ``generator`` (or torch's global RNG when None)."""
    gen_device = generator.device if generator is not None else device
    if gen_device.type != "cpu" and generator is None:
        gen_device = device
    return int(torch.randint(0, 1 << 32, (1,), generator=generator, device=gen_device).item())


def keep_mask(seed: int, p: float, b: Tensor, h: Tensor, q: Tensor, kv: Tensor) -> Tensor:
    """Bool tensor (broadcast of the index tensors): True where the probability is kept."""
    x = _mix(torch.full_like(b, seed & _M32) + b)
    x = _mix((x + h) & _M32)
    x = _mix((x + q) & _M32)
    x = _mix((x + kv) & _M32)
    return (x >> 8) >= threshold(p)


def threshold(p: float) -> int:
    """An entry is dropped when its 24-bit hash is below this (probability p)."""
    return int(p * (1 << 24))


def kernel_args(seed: int | None, p: float) -> tuple[int, int, float]:
    """(seed, threshold, p) as the compiled CPU kernels take them; seed -1: no dropout."""
    return (-1, 0, 0.0) if seed is None else (seed, threshold(p), p)
