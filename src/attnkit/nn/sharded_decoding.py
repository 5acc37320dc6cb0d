"""A CausalLM's decoding with its KV cache split along the sequence over processes.

What ``CausalLM.generate(..., group=g)`` and ``beam_search(..., group=g)`` drive: every rank
passes the same prompt; rank r of P feeds positions r·n .. (r+1)·n - 1 of it (n = len // P,
``ring_attention`` across the ranks) into its ``ShardedKVCache`` per layer; the rest of the
prompt (len mod P tokens) and every new token go to every rank, the last rank storing their
keys and values, attention merging every rank's run (``sharded_cache_attention``). Each rank
holds about 1/P of the prompt's cache, the last one also the new tokens'.

The last rank's logits are broadcast, so every rank continues with the same tokens.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import Tensor

from attnkit.nn.beam_search import Decoding

if TYPE_CHECKING:
    from attnkit.nn.transformer import CausalLM


def sharded_decoding(
    lm: CausalLM, prompt: Tensor, max_new_tokens: int, group: dist.ProcessGroup
) -> Decoding:
    """Feed prompt (N, P), the same on every rank of ``group``, into caches sharded over it.

    A collective: every rank of ``group`` calls it with the same prompt and max_new_tokens
    (checked: ranks that disagree all raise ValueError), then calls ``step`` and
    ``reorder`` with the same arguments in the same order.
    """
    if not dist.is_initialized():
        raise RuntimeError("group= needs torch.distributed initialised (init_process_group)")
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    last = world - 1
    N, P = prompt.shape
    n, rest = divmod(P, world)
    # the last rank holds the rest of the prompt and every new token; a run holds >= 1 slot
    held = n + (rest + max_new_tokens if rank == last else 0)
    caches = lm.new_sharded_caches(N, max(held, 1), kv_start=rank * n, group=group)
    _check_ranks_agree(prompt, max_new_tokens, group)

    def shared(logits: Tensor) -> Tensor:  # (N, V): the last rank's, on every rank
        logits = logits.contiguous()
        dist.broadcast(logits, group_src=last, group=group)
        return logits

    logits = None
    if n:  # every rank's equal chunk, attended by ring attention
        logits, _ = lm(prompt[:, rank * n : (rank + 1) * n], start=rank * n, caches=caches)
    for cache in caches:
        cache.start_decoding()
    if rest:  # the prompt's last tokens, as every rank's same new tokens
        logits, _ = lm(prompt[:, world * n :], start=world * n, caches=caches)
    assert logits is not None  # P >= 1, so n or rest is

    def step(token: Tensor, t: int) -> Tensor:  # token t of the continuation in, logits out
        out: Tensor = lm(token[:, None], start=P + t, caches=caches)[0]
        return shared(out[:, -1])

    def reorder(index: Tensor) -> None:
        for cache in caches:
            cache.reorder(index)

    return Decoding(shared(logits[:, -1]), step, reorder)


def _check_ranks_agree(prompt: Tensor, max_new_tokens: int, group: dist.ProcessGroup) -> None:
    """Every rank the same prompt shape, token ids (a checksum) and max_new_tokens."""
    ids = prompt.reshape(-1).long()
    weights = torch.arange(1, ids.numel() + 1, device=ids.device)
    mine = torch.stack(
        [
            torch.tensor(prompt.shape[0], device=ids.device),
            torch.tensor(prompt.shape[1], device=ids.device),
            torch.tensor(max_new_tokens, device=ids.device),
            (ids * weights).sum(),  # int64 wraps: equal prompts, equal sums
        ]
    )
    everyone = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(everyone, mine, group=group)
    seen = {tuple(int(x) for x in t) for t in everyone}
    if len(seen) > 1:
        raise ValueError(
            "generation over sharded caches needs the same prompt and max_new_tokens on "
            "every rank; (batch, prompt length, max_new_tokens, token checksum) per rank: "
            f"{[tuple(int(x) for x in t) for t in everyone]}"
        )
