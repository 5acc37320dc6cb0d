"""Past one machine: ring attention over torch.distributed (gloo on CPUs, NCCL on GPUs).

torchrun --nproc-per-node 4 examples/ring_attention.py --seq 65536
"""

from attnkit.distributed.layout import gather_sequence, shard_sequence, unshard_sequence
from attnkit.distributed.merge import merge_partials
from attnkit.distributed.ring import ring_attention

__all__ = [
    "gather_sequence",
    "merge_partials",
    "ring_attention",
    "shard_sequence",
    "unshard_sequence",
]
