"""A preallocated key/value cache for incremental decoding."""

from __future__ import annotations

import torch
from torch import Tensor


class KVCache:
    """Keys (B, Hkv, max_len, D) and values (B, Hkv, max_len, Dv), filled left to right.

    Self-attention appends each step's new keys/values and attends over ``keys``/``values``;
    cross-attention fills it once from the encoder memory and reuses it every step.

    Args:
        batch, num_kv_heads, max_len, head_dim: buffer sizes.
        dtype, device: of the buffers.
        value_dim: Dv when it differs from head_dim.
    """

    def __init__(
        self,
        batch: int,
        num_kv_heads: int,
        max_len: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        value_dim: int | None = None,
    ) -> None:
        for name, n in (
            ("batch", batch),
            ("num_kv_heads", num_kv_heads),
            ("max_len", max_len),
            ("head_dim", head_dim),
        ):
            if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                raise ValueError(f"KVCache {name} must be an int >= 1, got {n!r}")
        dv = head_dim if value_dim is None else value_dim
        self._k = torch.zeros(batch, num_kv_heads, max_len, head_dim, dtype=dtype, device=device)
        self._v = torch.zeros(batch, num_kv_heads, max_len, dv, dtype=dtype, device=device)
        self.length = 0

    @property
    def max_len(self) -> int:
        """Capacity in positions."""
        return self._k.shape[2]

    @property
    def keys(self) -> Tensor:
        """Cached keys (B, Hkv, length, D)."""
        return self._k[:, :, : self.length]

    @property
    def values(self) -> Tensor:
        """Cached values (B, Hkv, length, Dv)."""
        return self._v[:, :, : self.length]

    def append(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Append k (B, Hkv, n, D) and v (B, Hkv, n, Dv); return all cached keys and values."""
        expect_k = (*self._k.shape[:2], k.shape[2], self._k.shape[3])
        expect_v = (*self._v.shape[:2], v.shape[2], self._v.shape[3])
        if tuple(k.shape) != expect_k or tuple(v.shape) != expect_v or k.shape[2] != v.shape[2]:
            raise ValueError(
                f"KVCache.append got k {tuple(k.shape)}, v {tuple(v.shape)}; expected "
                f"(B, Hkv, n, D) = {expect_k} and {expect_v}"
            )
        n = k.shape[2]
        if self.length + n > self.max_len:
            raise ValueError(
                f"KVCache is full: length {self.length} + {n} new > max_len {self.max_len}"
            )
        self._k[:, :, self.length : self.length + n] = k
        self._v[:, :, self.length : self.length + n] = v
        self.length += n
        return self.keys, self.values

    def reset(self) -> None:
        """Forget every cached position (buffers are kept)."""
        self.length = 0

    def __repr__(self) -> str:
        return f"KVCache(length={self.length}, shape={tuple(self._k.shape)}, dtype={self._k.dtype})"
