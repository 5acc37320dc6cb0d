"""Rotary position embedding (RoFormer; the rotate-half layout of GPT-NeoX and Llama)."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class RotaryEmbedding(nn.Module):
    """Rotate pairs of channels (i, i + D/2) by angle pos · base^(-2i/D).

    After rotation, q·k depends on positions only through their difference, so attention
    sees relative positions. Apply to q and k (not v) after the projections.

    Args:
        head_dim: D, must be even.
        base: frequency base (10000 in RoFormer/Llama).
    """

    inv_freq: Tensor

    def __init__(self, head_dim: int, base: float = 10000.0) -> None:
        super().__init__()
        if isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim < 2:
            raise ValueError(f"head_dim must be an even int >= 2, got {head_dim!r}")
        if head_dim % 2:
            raise ValueError(f"RotaryEmbedding needs an even head_dim, got {head_dim}")
        if not base > 1:
            raise ValueError(f"base must be > 1, got {base}")
        self.head_dim, self.base = head_dim, float(base)
        inv = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
        self.register_buffer("inv_freq", inv.float(), persistent=False)

    def forward(self, x: Tensor, offset: int = 0, positions: Tensor | None = None) -> Tensor:
        """Rotate x (B, H, L, D) for positions ``offset .. offset + L - 1`` (or ``positions`` (L,)).

        Returns:
            (B, H, L, D) in x's dtype.
        """
        if x.shape[-1] != self.head_dim:
            raise ValueError(
                f"x has head dim {x.shape[-1]}, RotaryEmbedding expects {self.head_dim}"
            )
        L = x.shape[-2]
        if positions is None:
            positions = torch.arange(offset, offset + L, device=x.device)
        elif positions.shape != (L,):
            raise ValueError(f"positions must have shape ({L},), got {tuple(positions.shape)}")
        angles = positions.to(torch.float32)[:, None] * self.inv_freq.to(x.device)[None, :]
        cos = torch.cat([angles.cos(), angles.cos()], dim=-1)
        sin = torch.cat([angles.sin(), angles.sin()], dim=-1)
        half = self.head_dim // 2
        rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return (x.float() * cos + rotated.float() * sin).to(x.dtype)

    def extra_repr(self) -> str:
        """Shown inside the module's repr."""
        return f"head_dim={self.head_dim}, base={self.base:g}"
