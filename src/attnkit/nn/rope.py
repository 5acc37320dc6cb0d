"""Rotary position embedding (RoFormer; the rotate-half layout of GPT-NeoX and Llama).

Full (every channel rotated) or partial (the first ``rotary_dim`` channels, the rest passed
through: GPT-NeoX, Phi, StableLM, GLM, Qwen3-Next). Also the context-extension variants that
change its frequencies: linear position interpolation, Llama 3.1's band-wise scaling, YaRN
(with its attention factor) and Gemma 4's proportional frequencies, computed as transformers
computes them (the tests compare with ``modeling_rope_utils``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from attnkit._validation import check_int


class RotaryEmbedding(nn.Module):
    """Rotate pairs of channels (i, i + R/2) by angle pos · base^(-2i/R), R = rotary_dim.

    After rotation, q·k depends on positions only through their difference, so attention
    sees relative positions. Apply to q and k (not v) after the projections.

    Args:
        head_dim: D, the width of the heads it is applied to.
        base: frequency base (10000 in RoFormer/Llama).
        inv_freq: the R/2 frequencies, if not base^(-2i/R) (see ``linear``, ``llama3``,
            ``yarn``).
        attention_factor: multiplies cos and sin, so q·k scales by its square (YaRN's
            temperature); 1 otherwise.
        rotary_dim: R, even, at most D: the channels rotated (the first R; the D - R after
            them carry no position); default D. transformers' ``partial_rotary_factor`` is R / D.
    """

    inv_freq: Tensor

    def __init__(
        self,
        head_dim: int,
        base: float = 10000.0,
        *,
        inv_freq: Tensor | None = None,
        attention_factor: float = 1.0,
        rotary_dim: int | None = None,
    ) -> None:
        super().__init__()
        check_int("head_dim", head_dim)
        rotary = _rotary_dim(head_dim, rotary_dim)
        if not base > 1:
            raise ValueError(f"base must be > 1, got {base}")
        if inv_freq is not None and tuple(inv_freq.shape) != (rotary // 2,):
            raise ValueError(
                f"inv_freq must have shape (rotary_dim / 2,) = ({rotary // 2},), "
                f"got {tuple(inv_freq.shape)}"
            )
        if not attention_factor > 0:
            raise ValueError(f"attention_factor must be > 0, got {attention_factor}")
        self.head_dim, self.rotary_dim, self.base = head_dim, rotary, float(base)
        self.attention_factor = float(attention_factor)
        inv = base_frequencies(rotary, base) if inv_freq is None else inv_freq.double()
        self.register_buffer("inv_freq", inv.float(), persistent=False)

    @classmethod
    def linear(
        cls, head_dim: int, factor: float, base: float = 10000.0, *, rotary_dim: int | None = None
    ) -> RotaryEmbedding:
        """Position interpolation: every frequency divided by ``factor``.

        Positions are squeezed into the trained range.
        """
        _check_factor(factor)
        inv = base_frequencies(_rotary_dim(head_dim, rotary_dim), base) / factor
        return cls(head_dim, base, inv_freq=inv, rotary_dim=rotary_dim)

    @classmethod
    def llama3(
        cls,
        head_dim: int,
        factor: float = 8.0,
        low_freq_factor: float = 1.0,
        high_freq_factor: float = 4.0,
        original_max_len: int = 8192,
        base: float = 500000.0,
        *,
        rotary_dim: int | None = None,
    ) -> RotaryEmbedding:
        """Llama 3.1's frequencies: long wavelengths interpolated, short ones kept.

        Wavelengths above original_max_len / low_freq_factor are divided by ``factor``, those
        below original_max_len / high_freq_factor kept, and the band between blended smoothly.
        """
        _check_factor(factor)
        if not 0 < low_freq_factor < high_freq_factor:
            raise ValueError(
                f"need 0 < low_freq_factor < high_freq_factor, got {low_freq_factor}, "
                f"{high_freq_factor}"
            )
        inv = base_frequencies(_rotary_dim(head_dim, rotary_dim), base)
        wavelen = 2 * math.pi / inv
        smooth = (original_max_len / wavelen - low_freq_factor) / (
            high_freq_factor - low_freq_factor
        )
        blended = (1 - smooth) * inv / factor + smooth * inv
        scaled = torch.where(wavelen > original_max_len / low_freq_factor, inv / factor, blended)
        scaled = torch.where(wavelen < original_max_len / high_freq_factor, inv, scaled)
        return cls(head_dim, base, inv_freq=scaled, rotary_dim=rotary_dim)

    @classmethod
    def yarn(
        cls,
        head_dim: int,
        factor: float,
        original_max_len: int,
        base: float = 10000.0,
        *,
        beta_fast: float = 32.0,
        beta_slow: float = 1.0,
        mscale: float | None = None,
        mscale_all_dim: float | None = None,
        truncate: bool = True,
        rotary_dim: int | None = None,
        attention_factor: float | None = None,
    ) -> RotaryEmbedding:
        """YaRN's frequencies and attention factor.

        Dims that turn fewer than ``beta_slow`` times over the original context are
        interpolated by ``factor``, those that turn more than ``beta_fast`` times kept, with a
        linear ramp between; cos and sin are scaled by 0.1·ln(factor) + 1 (or DeepSeek's
        ratio of two such terms with ``mscale`` and ``mscale_all_dim``), or by
        ``attention_factor`` where a model's configuration gives it.
        """
        _check_factor(factor)
        dim = _rotary_dim(head_dim, rotary_dim)  # the formulas see only the rotated channels

        def correction_dim(rotations: float) -> float:
            return (dim * math.log(original_max_len / (rotations * 2 * math.pi))) / (
                2 * math.log(base)
            )

        low, high = correction_dim(beta_fast), correction_dim(beta_slow)
        if truncate:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        if low == high:
            high += 0.001  # a ramp of zero width
        # 0: keep the frequency (it turns often over the original context), 1: interpolate
        ramp = ((torch.arange(dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
        inv = base_frequencies(dim, base)
        inv = inv * (1 - ramp) + inv / factor * ramp

        def m(scale: float, ms: float = 1.0) -> float:
            return 1.0 if scale <= 1 else 0.1 * ms * math.log(scale) + 1.0

        if attention_factor is not None:
            attention = attention_factor
        elif mscale and mscale_all_dim:
            attention = m(factor, mscale) / m(factor, mscale_all_dim)
        else:
            attention = m(factor)
        return cls(head_dim, base, inv_freq=inv, attention_factor=attention, rotary_dim=rotary_dim)

    @classmethod
    def from_parameters(
        cls, head_dim: int, params: Mapping[str, Any], max_position_embeddings: int | None = None
    ) -> RotaryEmbedding:
        """From a transformers config's ``rope_parameters``.

        rope_type default, linear, llama3, yarn or proportional (Gemma 4: every channel pair
        rotated, the last ones at frequency 0), and ``partial_rotary_factor``;
        ``max_position_embeddings`` gives YaRN's factor where the dict has none.
        """
        kind = params.get("rope_type", "default")
        base = float(params.get("rope_theta", 10000.0))
        # transformers rounds down: int(head_dim * partial_rotary_factor)
        rotary = int(head_dim * params.get("partial_rotary_factor", 1.0))
        if kind == "default":
            return cls(head_dim, base, rotary_dim=rotary)
        if kind == "linear":
            return cls.linear(head_dim, params["factor"], base, rotary_dim=rotary)
        if kind == "proportional":
            turning = int(params.get("partial_rotary_factor", 1.0) * head_dim // 2)
            inv = base_frequencies(head_dim, base) / params.get("factor", 1.0)
            return cls(head_dim, base, inv_freq=torch.cat([inv[:turning], inv[turning:] * 0]))
        if kind == "llama3":
            return cls.llama3(
                head_dim,
                params["factor"],
                params["low_freq_factor"],
                params["high_freq_factor"],
                params["original_max_position_embeddings"],
                base,
                rotary_dim=rotary,
            )
        if kind == "yarn":
            original = params["original_max_position_embeddings"]
            factor = params.get("factor")
            if factor is None:
                if max_position_embeddings is None:
                    raise ValueError("yarn without a factor needs max_position_embeddings")
                factor = max_position_embeddings / original
            return cls.yarn(
                head_dim,
                factor,
                original,
                base,
                beta_fast=params.get("beta_fast") or 32.0,
                beta_slow=params.get("beta_slow") or 1.0,
                mscale=params.get("mscale"),
                mscale_all_dim=params.get("mscale_all_dim"),
                truncate=params.get("truncate", True),
                rotary_dim=rotary,
                attention_factor=params.get("attention_factor"),
            )
        raise ValueError(
            f"rope_type {kind!r} is not supported (default, linear, llama3, yarn, proportional)"
        )

    def forward(self, x: Tensor, offset: int = 0, positions: Tensor | None = None) -> Tensor:
        """Rotate x (B, H, L, D) for positions ``offset .. offset + L - 1`` (or ``positions`` (L,)).

        Returns:
            (B, H, L, D) in x's dtype; channels from ``rotary_dim`` on as they came.
        """
        self._check_head_dim(x, "x")
        return self._rotate(x, *self._cos_sin(x.shape[-2], offset, positions, x.device))

    def rotate_qk(
        self, q: Tensor, k: Tensor, offset: int = 0, positions: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """``forward`` of q (B, Hq, L, D) and k (B, Hkv, L, D) at the same positions.

        The angles are computed once: a decoding step's small ops cost more than their
        arithmetic.
        """
        self._check_head_dim(q, "q")
        self._check_head_dim(k, "k")
        if q.shape[-2] != k.shape[-2]:
            raise ValueError(
                f"rotate_qk takes q and k at the same positions, got lengths {q.shape[-2]} "
                f"and {k.shape[-2]}"
            )
        cos, sin = self._cos_sin(q.shape[-2], offset, positions, q.device)
        return self._rotate(q, cos, sin), self._rotate(k, cos, sin)

    def _check_head_dim(self, x: Tensor, name: str) -> None:
        if x.shape[-1] != self.head_dim:
            raise ValueError(
                f"{name} has head dim {x.shape[-1]}, RotaryEmbedding expects {self.head_dim}"
            )

    def _cos_sin(
        self, L: int, offset: int, positions: Tensor | None, device: torch.device
    ) -> tuple[Tensor, Tensor]:
        """cos and signed sin (L, R) float32: [cos θ | cos θ] and [-sin θ | sin θ]·factor."""
        if positions is None:
            positions = torch.arange(offset, offset + L, device=device)
        elif positions.shape != (L,):
            raise ValueError(f"positions must have shape ({L},), got {tuple(positions.shape)}")
        angles = positions.to(torch.float32)[:, None] * self.inv_freq.to(device)[None, :]
        cos, sin = angles.cos(), angles.sin()
        cos, sin = torch.cat([cos, cos], dim=-1), torch.cat([-sin, sin], dim=-1)
        if self.attention_factor != 1:
            cos, sin = cos * self.attention_factor, sin * self.attention_factor
        return cos, sin

    def _rotate(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        """x·cos + [x₂ | x₁]·sin: pairs (i, i + R/2) rotated (sin carries rotate-half's sign)."""
        x, passed = x[..., : self.rotary_dim], x[..., self.rotary_dim :]
        half = self.rotary_dim // 2
        swapped = torch.cat([x[..., half:], x[..., :half]], dim=-1)
        out = (x.float() * cos + swapped.float() * sin).to(x.dtype)
        return out if passed.shape[-1] == 0 else torch.cat([out, passed], dim=-1)

    def extra_repr(self) -> str:
        """Shown inside the module's repr."""
        factor = (
            "" if self.attention_factor == 1 else f", attention_factor={self.attention_factor:g}"
        )
        partial = "" if self.rotary_dim == self.head_dim else f", rotary_dim={self.rotary_dim}"
        return f"head_dim={self.head_dim}{partial}, base={self.base:g}{factor}"


def base_frequencies(head_dim: int, base: float) -> Tensor:
    """base^(-2i/D) for i = 0 .. D/2 - 1, float64."""
    return base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)


def _rotary_dim(head_dim: int, rotary_dim: int | None) -> int:
    """R: ``rotary_dim`` (default head_dim), checked even and in 2 .. head_dim."""
    if rotary_dim is None:
        if head_dim % 2:
            raise ValueError(
                f"RotaryEmbedding needs an even head_dim, got {head_dim} (or an even rotary_dim)"
            )
        return head_dim
    check_int("rotary_dim", rotary_dim)
    if rotary_dim % 2 or not 2 <= rotary_dim <= head_dim:
        raise ValueError(
            f"rotary_dim must be even and in 2 .. head_dim = {head_dim}, got {rotary_dim}"
        )
    return rotary_dim


def _check_factor(factor: float) -> None:
    if not factor >= 1:
        raise ValueError(f"factor must be >= 1 (how much longer the context gets), got {factor}")
