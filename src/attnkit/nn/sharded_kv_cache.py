"""A KV cache sharded along the sequence over processes: generation past one device's memory.

Each rank's ``ShardedKVCache`` holds a contiguous run of the cache's positions.
``CausalLM.generate(..., group=g)`` drives these caches (``attnkit.nn.sharded_decoding``). By
hand, the prompt is fed in equal chunks, rank r's chunk at positions r·n .. (r+1)·n - 1
(``MultiHeadAttention`` attends them with ``ring_attention``); after ``start_decoding`` every
rank feeds the same new tokens, the rank holding the last run stores their keys and values,
and attention runs over every rank's run with ``sharded_cache_attention``:

    caches = lm.new_sharded_caches(batch, max_len=n + new_tokens, kv_start=rank * n)
    logits, _ = lm(prompt[:, rank * n : (rank + 1) * n], start=rank * n, caches=caches)
    for cache in caches:
        cache.start_decoding()
    # the last rank's logits choose the first new token; broadcast it, then on every rank:
    logits, _ = lm(token, start=caches[0].position, caches=caches)
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from attnkit._types import UnsupportedError
from attnkit._validation import check_int
from attnkit.nn.kv_cache import KVCache


class ShardedKVCache(KVCache):
    """This rank's run of a KV cache sharded along the sequence over ``group``'s ranks.

    ``position`` is the global position of the next token this rank is fed (positions,
    RoPE's included, continue from it); ``keys`` and ``values`` hold global positions
    ``kv_start`` .. ``kv_start + length - 1``.

    Args:
        batch, num_kv_heads, max_len, head_dim, dtype, device, value_dim: as ``KVCache``'s
            (max_len: the positions this rank may hold, its prompt chunk and, on the rank
            that ends the prompt, every new token).
        kv_start: the global position of this rank's first key: rank r of equal chunks of n
            holds r·n on.
        group: the process group (default: the world).
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
        *,
        kv_start: int,
        group: dist.ProcessGroup | None = None,
    ) -> None:
        super().__init__(batch, num_kv_heads, max_len, head_dim, dtype, device, value_dim)
        self.kv_start = check_int("ShardedKVCache kv_start", kv_start, least=0)
        self.group = group
        self.position = kv_start
        self.decoding = False  # before start_decoding: this rank's prompt chunk
        self.takes_new = False  # whether new tokens' keys go into this rank's run

    @property
    def start(self) -> int:
        """The global position of ``keys[:, :, 0]``."""
        return self.kv_start

    def start_decoding(self) -> None:
        """After every rank's prompt chunk: from here on, every rank's same new tokens.

        ``position`` becomes the whole prompt's length on every rank, and the rank whose run
        ends the prompt takes the new tokens. A collective: every rank calls it, once per
        cache, in the same order.
        """
        if self.decoding:
            raise RuntimeError("ShardedKVCache.start_decoding was called already")
        rank, world = dist.get_rank(self.group), dist.get_world_size(self.group)
        mine = torch.tensor([self.kv_start + self.length, self.length], device=self._k.device)
        runs = [torch.empty_like(mine) for _ in range(world)]
        dist.all_gather(runs, mine, group=self.group)  # every rank's (end, length)
        ends = [int(run[0]) for run in runs]
        total = max(ends)
        # the run with keys that ends the prompt takes them (empty runs may end there too);
        # with no keys anywhere (a prompt shorter than the ranks), the highest rank
        taker = max(range(world), key=lambda r: (ends[r] == total, int(runs[r][1]) > 0, r))
        self.position, self.decoding = total, True
        self.takes_new = taker == rank

    def append(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store k and v if they are this rank's to hold; advance ``position``; return the run.

        This rank's to hold: its prompt chunk, or new tokens on the rank that takes them.
        """
        if not self.decoding or self.takes_new:
            return super().append(k, v)
        self.position += k.shape[2]
        return self.keys, self.values

    def crop(self, position: int) -> None:
        """Refused: the positions to forget may lie in other ranks' runs."""
        raise UnsupportedError(
            "ShardedKVCache cannot crop: the positions to forget may lie in other ranks' runs"
        )

    def reset(self) -> None:
        """Forget every cached position; the next tokens are a prompt chunk again."""
        super().reset()
        self.position, self.decoding, self.takes_new = self.kv_start, False, False

    def __repr__(self) -> str:
        return (
            f"ShardedKVCache(kv_start={self.kv_start}, length={self.length}, "
            f"position={self.position}, decoding={self.decoding}, takes_new={self.takes_new})"
        )
