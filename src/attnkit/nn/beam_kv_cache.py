"""Beam search's KV cache: a prompt's keys and values held once, each beam's own after them.

The K beams of a prompt share its keys and values. Copying them to every beam costs K times
the memory, and beam search's reorder copies every held position again at every step. A
``BeamKVCache`` keeps the prompt's cache as it was fed (B rows) and only
the new tokens' keys and values per beam (B·K rows); ``MultiHeadAttention`` attends the
beams' queries over the prompt with the K beams as K times the query heads (grouped-query
attention over the prompt's kv heads: its keys are read once for every beam) and over their
own keys, and merges the two exactly by their log-sum-exps.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from attnkit._validation import check_int
from attnkit.nn.kv_cache import KVCache
from attnkit.nn.sharded_kv_cache import ShardedKVCache

#: Set False to copy a prompt's caches to every beam instead (``benchmarks/cpu_beam_search.py``
#: compares).
SHARE_PROMPTS = True


class BeamKVCache(KVCache):
    """The new tokens' keys and values of B·K beams, after a prompt's cache of B rows.

    Beam k of prompt b is row b·K + k. ``keys`` and ``values`` are the beams' own positions
    ``prefix.position`` .. ``position - 1`` (``start`` is where they begin); ``prefix``
    holds positions 0 .. ``prefix.position - 1`` for each prompt, never copied or reordered.
    ``reorder`` keeps every beam among its prompt's.

    Args:
        prefix: the prompt's cache (B rows), fed and holding every position from 0 (not a
            windowed cache that dropped some), or this rank's run of a prompt's cache sharded
            over processes (a ``ShardedKVCache``; the beams' own positions are then held on
            every rank alike).
        beams: K.
        max_new: the beams' own positions it may hold.
    """

    def __init__(self, prefix: KVCache, beams: int, max_new: int) -> None:
        check_int("BeamKVCache beams", beams)
        if prefix.window is not None or (
            prefix.start != 0 and not isinstance(prefix, ShardedKVCache)
        ):
            raise ValueError(
                "a BeamKVCache shares a prompt's whole cache: it takes no windowed cache "
                f"(got window={prefix.window}, start={prefix.start})"
            )
        B, Hkv, _, D = prefix.keys.shape
        keys = prefix.keys
        super().__init__(
            B * beams, Hkv, max(max_new, 1), D, keys.dtype, keys.device, prefix.values.shape[-1]
        )
        self.prefix, self.beams = prefix, beams
        self.position = prefix.position

    def reorder(self, index: Tensor) -> None:
        """Row i continues as row ``index[i]``, a beam of the same prompt (beam search)."""
        rows = self._k.shape[0]
        if isinstance(index, Tensor) and index.dim() == 1 and index.dtype == torch.long:
            if index.shape != (rows,):
                raise ValueError(
                    f"BeamKVCache.reorder takes an index of its {rows} rows, got "
                    f"{tuple(index.shape)}"
                )
            prompt = torch.arange(rows, device=index.device) // self.beams
            if not torch.equal(torch.div(index, self.beams, rounding_mode="floor"), prompt):
                raise ValueError(
                    f"BeamKVCache.reorder keeps each row among its prompt's {self.beams} beams "
                    "(row i takes one of rows (i // K)·K .. (i // K)·K + K - 1)"
                )
        super().reorder(index)

    def reset(self) -> None:
        """Forget the beams' own positions; the prompt's stay."""
        super().reset()
        self.position = self.prefix.position

    def __repr__(self) -> str:
        return (
            f"BeamKVCache(beams={self.beams}, prefix={self.prefix.length}, "
            f"length={self.length}, position={self.position})"
        )


def beams_sharing(
    caches: Sequence[KVCache],
    beams: int,
    max_new: int,
    padding: Tensor | None,
    logits: Tensor,
) -> tuple[list[KVCache], Tensor | None, Tensor]:
    """Fed prompts' B rows as their beams' B·K: ``BeamKVCache``s over ``caches``.

    ``padding`` (B, ·) and the next-token ``logits`` (B, V) come back repeated for every beam
    (row b·K + k is beam k of prompt b).
    """
    rows = torch.arange(logits.shape[0], device=logits.device).repeat_interleave(beams)
    shared: list[KVCache] = [BeamKVCache(cache, beams, max_new) for cache in caches]
    return shared, None if padding is None else padding[rows], logits[rows]
