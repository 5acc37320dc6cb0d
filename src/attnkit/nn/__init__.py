"""attnkit modules: MultiHeadAttention (self, cross, GQA), KVCache, RotaryEmbedding."""

from attnkit.nn.attention import MultiHeadAttention
from attnkit.nn.kv_cache import KVCache
from attnkit.nn.rope import RotaryEmbedding

__all__ = ["KVCache", "MultiHeadAttention", "RotaryEmbedding"]
