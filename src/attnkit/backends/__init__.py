"""Attention backends. Each module has ``NAME``, ``unsupported_reason(req)`` and ``run(req)``.

reference  the spec: materialised softmax in float32/64 (backends/reference.py)
sdpa       torch.nn.functional.scaled_dot_product_attention (backends/sdpa.py)
tiled      flash attention (online softmax) in PyTorch, fwd + bwd, any device (tiled.py)
triton     flash attention kernels for GPUs, fwd + bwd, block-sparse (triton/)
"""

from __future__ import annotations

from typing import Protocol

from torch import Tensor

from attnkit.backends import reference, sdpa, tiled, triton
from attnkit.backends._common import Request


class Backend(Protocol):
    """What a backend module provides."""

    NAME: str

    def unsupported_reason(self, req: Request) -> str | None:
        """Why this backend cannot serve ``req``, or None when it can."""

    def run(self, req: Request) -> tuple[Tensor, Tensor | None]:
        """Output (B, Hq, Lq, Dv) and, when the backend computes it, LSE (B, Hq, Lq)."""


_REGISTRY: dict[str, Backend] = {
    reference.NAME: reference,
    sdpa.NAME: sdpa,
    tiled.NAME: tiled,
    triton.NAME: triton,
}


def get(name: str) -> Backend:
    """The backend module called ``name``."""
    return _REGISTRY[name]


def names() -> list[str]:
    """Names of the backends available in this installation (triton only where installed)."""
    return [n for n in _REGISTRY if n != triton.NAME or triton.installed()]
