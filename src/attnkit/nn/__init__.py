"""attnkit modules.

MultiHeadAttention (self, cross, GQA), KVCache, RotaryEmbedding, and transformers built on them
(encoder/decoder layers, Transformer, CausalLM).
"""

from attnkit.nn.attention import MultiHeadAttention
from attnkit.nn.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from attnkit.nn.kv_cache import KVCache
from attnkit.nn.rope import RotaryEmbedding
from attnkit.nn.transformer import (
    CausalLM,
    FeedForward,
    Transformer,
    TransformerDecoderLayer,
    TransformerEncoderLayer,
)

__all__ = [
    "CausalLM",
    "Checkpoint",
    "FeedForward",
    "KVCache",
    "MultiHeadAttention",
    "RotaryEmbedding",
    "Transformer",
    "TransformerDecoderLayer",
    "TransformerEncoderLayer",
    "load_checkpoint",
    "save_checkpoint",
]
