"""A preallocated key/value cache for incremental decoding, optionally a sliding window."""

from __future__ import annotations

import torch
from torch import Tensor

from attnkit._validation import check_int


class KVCache:
    """Keys (B, Hkv, max_len, D) and values (B, Hkv, max_len, Dv), filled left to right.

    Self-attention appends each step's new keys/values and attends over ``keys``/``values``;
    cross-attention fills it once from the encoder memory and reuses it every step.

    With ``window=w`` the cache serves sliding-window attention (``masks.sliding_window(w)``,
    as in Mistral or Gemma's local layers) in bounded memory, for any number of positions:
    before each append it keeps only the last w positions, which is every key the new queries
    can see. When the buffer is full, those w are moved to its front (one copy every
    ``max_len - w`` positions), so ``keys`` stays one ordered, contiguous run of positions
    ``start .. position - 1``, and masks of relative position apply to it unchanged.

    Gradients flow through it (decoding steps of a model being trained): while autograd
    records keys or values, each append writes into copies of the buffers instead, since the
    earlier steps' graphs hold views of them. Decode under ``torch.no_grad()`` otherwise, as
    ``generate`` does: each step then writes in place.

    Args:
        batch, num_kv_heads, max_len, head_dim: buffer sizes. With a window, max_len must
            hold the window plus the most positions appended at once; 2·w or more keeps the
            copies rare.
        dtype, device: of the buffers.
        value_dim: Dv when it differs from head_dim; 0 keeps keys only (``values`` is then
            empty), for multi-head latent attention, whose values are part of its keys.
        window: keep only the last ``window`` positions before each append; None keeps all.

    Example:
        >>> cache = KVCache(1, 2, max_len=8, head_dim=4, window=3)
        >>> for _ in range(10):
        ...     _ = cache.append(torch.randn(1, 2, 1, 4), torch.randn(1, 2, 1, 4))
        >>> cache.position, cache.start, cache.keys.shape[2]  # positions 6, 7, 8, 9
        (10, 6, 4)
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
        window: int | None = None,
    ) -> None:
        check_int("KVCache batch", batch, least=0)  # (an empty batch, as attention takes)
        for name, n in (
            ("num_kv_heads", num_kv_heads),
            ("max_len", max_len),
            ("head_dim", head_dim),
        ):
            check_int(f"KVCache {name}", n)
        if window is not None:
            check_int("KVCache window", window, least=0)
            if window >= max_len:
                raise ValueError(
                    f"KVCache max_len ({max_len}) must exceed window ({window}): it holds the "
                    "window plus the positions appended at once"
                )
        dv = head_dim if value_dim is None else check_int("KVCache value_dim", value_dim, 0)
        self._k = torch.zeros(batch, num_kv_heads, max_len, head_dim, dtype=dtype, device=device)
        self._v = torch.zeros(batch, num_kv_heads, max_len, dv, dtype=dtype, device=device)
        self.window = window
        self._lo = self._hi = 0  # keys/values are buffer slots [_lo, _hi)
        self.position = 0  # positions appended since the last reset

    @classmethod
    def holding(cls, keys: Tensor, values: Tensor, length: int | None = None) -> KVCache:
        """A cache over keys (B, Hkv, L, D) and values (B, Hkv, L, Dv), not copied.

        For keys and values computed elsewhere and handed in as tensors, such as the encoder
        memory's that a cross-attention reads at every step of an exported decoder. It holds
        their first ``length`` positions (default: all L); appends write into the rest.
        """
        if (
            keys.dim() != 4
            or values.dim() != 4
            or keys.shape[:3] != values.shape[:3]
            or (keys.dtype, keys.device) != (values.dtype, values.device)
        ):
            raise ValueError(
                f"KVCache.holding takes keys (B, Hkv, L, D) and values (B, Hkv, L, Dv) of one "
                f"dtype and device, got {keys.dtype} {tuple(keys.shape)} and {values.dtype} "
                f"{tuple(values.shape)}"
            )
        held = keys.shape[2] if length is None else length
        if not 0 <= held <= keys.shape[2]:
            raise ValueError(
                f"KVCache.holding length must lie in 0 .. {keys.shape[2]} (the buffers' L), "
                f"got {length}"
            )
        cache = cls.__new__(cls)
        cache._k, cache._v, cache.window = keys, values, None
        cache._lo, cache._hi = 0, held
        cache.position = held
        return cache

    @property
    def max_len(self) -> int:
        """Capacity in positions."""
        return self._k.shape[2]

    @property
    def length(self) -> int:
        """How many positions ``keys`` and ``values`` hold."""
        return self._hi - self._lo

    @property
    def start(self) -> int:
        """The position of ``keys[:, :, 0]``: 0 unless a window dropped older ones."""
        return self.position - self.length

    @property
    def keys(self) -> Tensor:
        """Cached keys (B, Hkv, length, D), positions ``start .. position - 1``."""
        return self._k[:, :, self._lo : self._hi]

    @property
    def values(self) -> Tensor:
        """Cached values (B, Hkv, length, Dv)."""
        return self._v[:, :, self._lo : self._hi]

    def append(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Append k (B, Hkv, n, D) and v (B, Hkv, n, Dv); return the cached keys and values.

        With a window, what is returned is the last ``window`` earlier positions and the n new.
        """
        for name, new, buffer in (("k", k, self._k), ("v", v, self._v)):
            if (new.dtype, new.device) != (buffer.dtype, buffer.device):
                raise TypeError(
                    f"KVCache holds {buffer.dtype} on {buffer.device}, got {name} {new.dtype} "
                    f"on {new.device}; a module's new_cache() takes the dtype its projections "
                    "output where it is called (autocast's inside torch.autocast)"
                )
        expect_k = (*self._k.shape[:2], k.shape[2], self._k.shape[3])
        expect_v = (*self._v.shape[:2], v.shape[2], self._v.shape[3])
        if tuple(k.shape) != expect_k or tuple(v.shape) != expect_v or k.shape[2] != v.shape[2]:
            raise ValueError(
                f"KVCache.append got k {tuple(k.shape)}, v {tuple(v.shape)}; expected "
                f"(B, Hkv, n, D) = {expect_k} and {expect_v}"
            )
        n = k.shape[2]
        if torch.is_grad_enabled() and any(t.requires_grad for t in (k, v, self._k, self._v)):
            # Earlier steps' graphs may hold views of the buffers: writing into them would void
            # those gradients, so write into copies (one per step, only while recording them).
            self._k, self._v = self._k.clone(), self._v.clone()
        if self.window is not None:
            self._keep_window(n)
        if self._hi + n > self.max_len:
            raise ValueError(
                f"KVCache is full: length {self.length} + {n} new > max_len {self.max_len}"
            )
        self._k[:, :, self._hi : self._hi + n] = k
        self._v[:, :, self._hi : self._hi + n] = v
        self._hi += n
        self.position += n
        return self.keys, self.values

    def _keep_window(self, n: int) -> None:
        """Drop all but the last ``window`` positions; make room for n more at the end."""
        assert self.window is not None
        keep = min(self.length, self.window)
        if self._hi + n > self.max_len:
            if keep + n > self.max_len:
                raise ValueError(
                    f"KVCache(window={self.window}, max_len={self.max_len}) cannot take {n} "
                    f"positions at once: the window's {keep} plus {n} exceed max_len"
                )
            # slices of one buffer may overlap, and copy_ between overlapping memory is undefined
            kept = slice(self._hi - keep, self._hi)
            self._k[:, :, :keep] = self._k[:, :, kept].clone()
            self._v[:, :, :keep] = self._v[:, :, kept].clone()
            self._hi = keep
        self._lo = self._hi - keep

    def crop(self, position: int) -> None:
        """Forget every position from ``position`` on (e.g. draft tokens a verifier rejected).

        The cache must still hold what the next queries need: with a window, the ``window``
        positions before ``position`` (so append drafts in one call, and crop within it).
        """
        if isinstance(position, bool) or not isinstance(position, int):
            raise TypeError(f"KVCache.crop position must be an int, got {position!r}")
        lowest = self.start
        if self.window is not None and self.start > 0:
            lowest += self.window
        if not lowest <= position <= self.position:
            window = "" if self.window is None else f" and window={self.window}"
            raise ValueError(
                f"KVCache.crop({position}): with positions {self.start} .. {self.position - 1} "
                f"held{window}, it can crop to {lowest} .. {self.position} only"
            )
        self._hi -= self.position - position
        self.position = position

    def reorder(self, index: Tensor) -> None:
        """Row i of the batch becomes a copy of row ``index[i]`` (beam search).

        ``index`` (B',) int64 may repeat rows or change the batch size: ``arange(B)
        .repeat_interleave(K)`` gives each row K beams, and each step then keeps the rows
        of the beams that survive. With the batch size unchanged only the held positions
        are rewritten, in place, and an identity index copies nothing.
        """
        if (
            not isinstance(index, Tensor)
            or index.dtype != torch.long
            or index.dim() != 1
            or index.device != self._k.device
        ):
            raise TypeError(
                f"KVCache.reorder takes a 1-D int64 tensor on {self._k.device}, got "
                + (
                    f"{index.dtype} {tuple(index.shape)} on {index.device}"
                    if isinstance(index, Tensor)
                    else type(index).__name__
                )
            )
        batch = self._k.shape[0]
        if index.numel() and not 0 <= int(index.min()) <= int(index.max()) < batch:
            raise ValueError(
                f"KVCache.reorder index must lie in 0 .. {batch - 1} (the batch), got "
                f"{int(index.min())} .. {int(index.max())}"
            )
        if index.numel() != batch or (
            torch.is_grad_enabled() and (self._k.requires_grad or self._v.requires_grad)
        ):  # a new batch size, or buffers autograd holds: new buffers
            self._k, self._v = self._k.index_select(0, index), self._v.index_select(0, index)
        elif not torch.equal(index, torch.arange(batch, device=index.device)):
            # the same batch: rewrite only the slots in use, in place (no new buffers per step)
            for buffer in (self._k, self._v):
                held = buffer[:, :, self._lo : self._hi]
                held.copy_(held.index_select(0, index))

    def reset(self) -> None:
        """Forget every cached position (buffers are kept)."""
        self._lo = self._hi = self.position = 0

    def __repr__(self) -> str:
        window = "" if self.window is None else f", window={self.window}"
        return (
            f"KVCache(length={self.length}, position={self.position}, "
            f"shape={tuple(self._k.shape)}, dtype={self._k.dtype}{window})"
        )
