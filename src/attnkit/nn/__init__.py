"""attnkit modules.

MultiHeadAttention (self, cross, GQA), MultiHeadLatentAttention (DeepSeek MLA),
DifferentialAttention (DIFF Transformer), KVCache, ShardedKVCache (a cache split over processes),
BeamKVCache (beams sharing their prompt's cache),
RotaryEmbedding, and transformers built on them (encoder/decoder layers, Transformer, CausalLM)
with greedy, sampled and beam-search decoding (``Beams``), and ``DecodingStep`` /
``TranslationStep``: a CausalLM / Transformer over caches held as tensors, which torch.export
takes.
"""

from attnkit.nn.attention import MultiHeadAttention
from attnkit.nn.beam_kv_cache import BeamKVCache
from attnkit.nn.beam_search import Beams
from attnkit.nn.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from attnkit.nn.decoding_step import DecodingStep, TranslationStep
from attnkit.nn.differential_attention import DifferentialAttention
from attnkit.nn.from_transformers import from_transformers
from attnkit.nn.kv_cache import KVCache
from attnkit.nn.latent_attention import LatentSizes, MultiHeadLatentAttention
from attnkit.nn.rope import RotaryEmbedding
from attnkit.nn.sharded_kv_cache import ShardedKVCache
from attnkit.nn.transformer import (
    CausalLM,
    FeedForward,
    Transformer,
    TransformerDecoderLayer,
    TransformerEncoderLayer,
)

__all__ = [
    "BeamKVCache",
    "Beams",
    "CausalLM",
    "Checkpoint",
    "DecodingStep",
    "DifferentialAttention",
    "FeedForward",
    "KVCache",
    "LatentSizes",
    "MultiHeadAttention",
    "MultiHeadLatentAttention",
    "RotaryEmbedding",
    "ShardedKVCache",
    "Transformer",
    "TransformerDecoderLayer",
    "TransformerEncoderLayer",
    "TranslationStep",
    "from_transformers",
    "load_checkpoint",
    "save_checkpoint",
]
