"""A Transformer's encoder run over a source split along the sequence over processes.

What ``Transformer.generate(..., group=g)`` and ``beam_search(..., group=g)`` drive, for a
source too long for one device (a book to translate or summarise): every rank passes the
same source (B, S); rank r of P encodes positions r·n .. (r+1)·n - 1 of it (n = ⌈S / P⌉,
the last ranks' places past S padding), the encoder's self-attention running through
``ring_attention`` across the ranks. Each rank keeps only its shard of the memory and the
cross-attention keys and values projected from it (a ``ShardedKVCache`` per decoder layer).
The target, a few tokens, runs on every rank: its self-attention cache is every rank's own,
its cross-attention merges every rank's part (``sharded_cache_attention``: one all_gather of
(B, H, T, head_dim + 1) per layer and step, whatever the source's length).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from attnkit._validation import check_token_ids
from attnkit.distributed.layout import check_initialised
from attnkit.nn.attention import MultiHeadAttention

if TYPE_CHECKING:
    from attnkit.nn.transformer import Transformer


def sharded_encode(
    model: Transformer, src: Tensor, group: dist.ProcessGroup
) -> tuple[Tensor, Tensor]:
    """src (B, S), the same on every rank -> this rank's memory shard (B, n, E) and its padding.

    Rank r's shard holds positions r·n .. (r+1)·n - 1, n = ⌈S / P⌉; its padding (B, n) is
    True at padded source tokens and at the places past S. A padded position (a pad token,
    or past S) is no key of any query: every real token's memory is what the encoder gives
    it in one process. A collective: every rank of ``group`` calls it with the same source.
    """
    check_initialised("Transformer.encode(group=)")
    # refuse on every rank alike, before the ring: a rank raising alone leaves the rest waiting
    check_token_ids("src", src, model.src_embed.tokens.num_embeddings)
    B, S = src.shape
    if model.src_embed.positions is not None and model.max_len < S:
        raise ValueError(f"source length {S} exceeds max_len {model.max_len} (learned positions)")
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    n = -(-S // world)
    start = rank * n
    padding = F.pad(src == model.pad_id, (0, world * n - S), value=True)  # (B, P·n)
    ids = src[:, start : start + n]  # fewer than n (none) on the last ranks past S
    weight = model.src_embed.tokens.weight
    x = model.src_embed(ids, start) if ids.shape[1] else weight.new_zeros(B, 0, weight.shape[1])
    x = torch.cat([x, x.new_zeros(B, n - ids.shape[1], x.shape[2])], dim=1)  # past S: zeros
    for layer in model.encoder:
        attn = layer.self_attn
        assert isinstance(attn, MultiHeadAttention)
        # a layer's ring attention runs over this rank's chunk; the cache holds it meanwhile
        cache = attn.new_sharded_cache(B, n, kv_start=start, group=group)
        x, _ = layer(x, key_padding_mask=padding[:, : start + n], cache=cache)
    return model.enc_norm(x), padding[:, start : start + n]
