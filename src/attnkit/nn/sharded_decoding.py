"""A CausalLM's decoding with its KV cache split along the sequence over processes.

What ``CausalLM.generate(..., group=g)`` and ``beam_search(..., group=g)`` drive: every rank
passes the same prompt; rank r of P feeds positions r·n .. (r+1)·n - 1 of it (n = len // P,
``ring_attention`` across the ranks) into its ``ShardedKVCache`` per layer; the rest of the
prompt (len mod P tokens) and every new token go to every rank, the last rank storing their
keys and values, attention merging every rank's run (``sharded_cache_attention``). Each rank
holds about 1/P of the prompt's cache, the last one also the new tokens'.

The last rank's logits are broadcast, so every rank continues with the same tokens. A
left-padded batch's pads reach the ring as document ids and the decoding as padding over each
rank's keys (``MultiHeadAttention`` over a ``ShardedKVCache``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch.distributed as dist
from torch import Tensor

from attnkit.distributed.agreement import check_ranks_agree
from attnkit.nn.beam_kv_cache import beams_sharing
from attnkit.nn.beam_search import Decoding, over_caches, padding_upto
from attnkit.nn.kv_cache import KVCache

if TYPE_CHECKING:
    from attnkit.nn.transformer import CausalLM


def sharded_decoding(
    lm: CausalLM,
    prompt: Tensor,
    padding: Tensor | None,
    max_new_tokens: int,
    group: dist.ProcessGroup,
    beams: int = 1,
) -> Decoding:
    """Feed prompt (N, P), the same on every rank of ``group``, into caches sharded over it.

    ``padding`` (N, P + max_new_tokens) bool, True = pad, over the whole text (left-padded
    prompts), or None. A collective: every rank of ``group`` calls it with the same prompt,
    padding and max_new_tokens (checked: ranks that disagree all raise ValueError), then
    calls ``step`` and ``reorder`` with the same arguments in the same order. With ``beams``
    > 1, where the layers can (``CausalLM._beams_share_prompts``), the decoding of N·beams
    rows whose beams share the sharded prompt's caches (``BeamKVCache``, the beams' own keys
    and values on every rank); else of the N rows.
    """
    if not dist.is_initialized():
        raise RuntimeError("group= needs torch.distributed initialised (init_process_group)")
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    last = world - 1
    N, P = prompt.shape
    n, rest = divmod(P, world)
    shared = beams > 1 and lm._beams_share_prompts(windowed=False)
    # the last rank holds the rest of the prompt and every new token (the beams' own, when
    # they share the prompt, on every rank); a run holds >= 1 slot
    held = n + (rest + (0 if shared else max_new_tokens) if rank == last else 0)
    caches = lm.new_sharded_caches(N, max(held, 1), kv_start=rank * n, group=group)
    check_ranks_agree(
        group, "generation over sharded caches", prompt.device,
        prompt=prompt, prompt_padding=padding, max_new_tokens=max_new_tokens,
    )  # fmt: skip

    fed: list[KVCache] = list(caches)

    def feed(ids: Tensor, start: int, pads: Tensor | None) -> Tensor:
        logits: Tensor = lm(ids, start=start, caches=fed, padding=pads)[0]
        return logits[:, -1]

    logits = None
    if n:  # every rank's equal chunk, attended by ring attention
        chunk = prompt[:, rank * n : (rank + 1) * n]
        logits = feed(chunk, rank * n, padding_upto(padding, (rank + 1) * n))
    for cache in caches:
        cache.start_decoding()
    if rest:  # the prompt's last tokens, as every rank's same new tokens
        logits = feed(prompt[:, world * n :], world * n, padding_upto(padding, P))
    assert logits is not None  # P >= 1, so n or rest is
    if shared:  # (feed reads fed when called)
        fed, padding, logits = beams_sharing(caches, beams, max_new_tokens, padding, logits)

    def feed_shared(ids: Tensor, start: int, pads: Tensor | None) -> Tensor:
        return last_ranks(feed(ids, start, pads), group)

    return over_caches(feed_shared, fed, padding, P, last_ranks(logits, group))


def last_ranks(x: Tensor, group: dist.ProcessGroup) -> Tensor:
    """The last rank's ``x`` (logits, sampled tokens) on every rank of ``group``."""
    x = x.contiguous()
    dist.broadcast(x, group_src=dist.get_world_size(group) - 1, group=group)
    return x
