"""Past one machine: a sequence split over processes (gloo on CPUs, NCCL on GPUs).

``ring_attention`` passes key/value blocks around the ranks (self-attention, or a decoder's
queries over an encoder's keys); ``ulysses_attention`` swaps the sequence split for a head
split (all-to-all; heads that do not divide go as evenly as they can) and attends locally,
under any mask; ``hybrid_attention`` does both on a grid of ranks (Ulysses within groups, the
ring across). ``sharded_cache_attention`` decodes over a KV cache sharded along the sequence
(``CausalLM.generate(..., group=)`` drives it, and ``Transformer.generate(..., group=)`` its
cross-attention over an encoder memory split over the ranks).

torchrun --nproc-per-node 4 examples/ring_attention.py --seq 65536
"""

from attnkit.distributed.hybrid import hybrid_attention, hybrid_groups, shard_hybrid
from attnkit.distributed.layout import gather_sequence, shard_sequence, unshard_sequence
from attnkit.distributed.merge import merge_partials
from attnkit.distributed.ring import ring_attention
from attnkit.distributed.sharded_cache import sharded_cache_attention
from attnkit.distributed.ulysses import ulysses_attention

__all__ = [
    "gather_sequence",
    "hybrid_attention",
    "hybrid_groups",
    "merge_partials",
    "ring_attention",
    "shard_hybrid",
    "shard_sequence",
    "sharded_cache_attention",
    "ulysses_attention",
    "unshard_sequence",
]
