"""A BERT encoder built from attnkit modules, so any attnkit backend and mask can drive it.

Layout of one layer (post-norm, as BERT): x = LN(x + W0·attn(x)); x = LN(x + W2·gelu(W1·x)).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from attnkit._validation import check_token_ids
from attnkit.backends._common import MaskLike
from attnkit.functional import BackendName
from attnkit.masks import Mask
from attnkit.nn.attention import MultiHeadAttention


@dataclass(frozen=True)
class BertConfig:
    """Sizes of a BERT encoder (the fields of a Hugging Face ``config.json`` we need)."""

    vocab_size: int = 30522
    hidden_size: int = 384
    num_hidden_layers: int = 6
    num_attention_heads: int = 12
    intermediate_size: int = 1536
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BertConfig:
        """Keep the known fields of a ``config.json``; refuse what this encoder would get wrong.

        Other model types (RoBERTa counts positions from its padding id, ELECTRA projects its
        embeddings, ...), relative position embeddings and activations other than GELU would
        load and run, and compute something else.
        """
        for key, supported in (
            ("model_type", "bert"),
            ("position_embedding_type", "absolute"),
            ("hidden_act", "gelu"),
        ):
            if d.get(key, supported) != supported:
                raise ValueError(
                    f"only BERT models with {key}={supported!r} are supported, got {d[key]!r}"
                )
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


@dataclass
class EncoderOutput:
    """What the encoder returns.

    Attributes:
        last_hidden_state: (B, L, E).
        hidden_states: embeddings output then each layer's output, each (B, L, E).
        attentions: each layer's attention probabilities (B, H, L, L) (empty unless asked).
    """

    last_hidden_state: Tensor
    hidden_states: list[Tensor] = field(default_factory=list)
    attentions: list[Tensor] = field(default_factory=list)


class BertLayer(nn.Module):
    """Self-attention (with W0) and a GELU MLP, each followed by residual + LayerNorm."""

    def __init__(self, cfg: BertConfig, backend: BackendName = "auto") -> None:
        super().__init__()
        E = cfg.hidden_size
        self.attention = MultiHeadAttention(E, cfg.num_attention_heads, backend=backend)
        self.attn_norm = nn.LayerNorm(E, eps=cfg.layer_norm_eps)
        self.ffn_in = nn.Linear(E, cfg.intermediate_size)
        self.ffn_out = nn.Linear(cfg.intermediate_size, E)
        self.ffn_norm = nn.LayerNorm(E, eps=cfg.layer_norm_eps)

    def forward(
        self, x: Tensor, mask: MaskLike, key_padding_mask: Tensor | None, need_weights: bool
    ) -> tuple[Tensor, Tensor | None]:
        """X (B, L, E) -> (B, L, E), and the attention weights (B, H, L, L) when asked."""
        a, weights = self.attention(
            x, mask=mask, key_padding_mask=key_padding_mask, need_weights=need_weights
        )
        x = self.attn_norm(x + a)
        x = self.ffn_norm(x + self.ffn_out(nn.functional.gelu(self.ffn_in(x))))
        return x, weights


class BertEncoder(nn.Module):
    """Embeddings (word + position + token type, LayerNorm) and a stack of ``BertLayer``."""

    def __init__(self, cfg: BertConfig, backend: BackendName = "auto") -> None:
        super().__init__()
        self.config = cfg
        E = cfg.hidden_size
        self.word_embeddings = nn.Embedding(cfg.vocab_size, E)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, E)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, E)
        self.embed_norm = nn.LayerNorm(E, eps=cfg.layer_norm_eps)
        self.layers = nn.ModuleList(BertLayer(cfg, backend) for _ in range(cfg.num_hidden_layers))

    def set_backend(self, backend: BackendName) -> None:
        """Run every layer's attention on ``backend``."""
        for layer in self.layers:
            assert isinstance(layer, BertLayer)
            layer.attention.backend = backend

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        token_type_ids: Tensor | None = None,
        *,
        mask: Mask | None = None,
        output_attentions: bool = False,
    ) -> EncoderOutput:
        """Encode token ids.

        Args:
            input_ids: (B, L) int.
            attention_mask: (B, L), 1 = real token, 0 = padding (Hugging Face convention).
            token_type_ids: (B, L), default zeros.
            mask: an attnkit Mask applied in every layer (e.g. a sparse pattern), combined
                with the padding.
            output_attentions: also return every layer's probabilities (B, H, L, L).

        Returns:
            ``EncoderOutput`` with last_hidden_state (B, L, E), hidden_states (embeddings +
            one per layer) and attentions.
        """
        check_token_ids("input_ids", input_ids, self.word_embeddings.num_embeddings)
        L = input_ids.shape[1]
        if self.config.max_position_embeddings < L:
            raise ValueError(
                f"{L} tokens exceed the model's {self.config.max_position_embeddings} positions"
            )
        positions = torch.arange(L, device=input_ids.device)
        types = torch.zeros_like(input_ids) if token_type_ids is None else token_type_ids
        x = self.word_embeddings(input_ids) + self.position_embeddings(positions)
        x = self.embed_norm(x + self.token_type_embeddings(types))
        padding = None if attention_mask is None else attention_mask == 0
        out = EncoderOutput(last_hidden_state=x, hidden_states=[x])
        for layer in self.layers:
            x, weights = layer(x, mask, padding, output_attentions)
            out.hidden_states.append(x)
            if weights is not None:
                out.attentions.append(weights)
        out.last_hidden_state = x
        return out

    # Hugging Face BertModel parameter names -> ours
    _RENAMES = (
        ("embeddings.word_embeddings.", "word_embeddings."),
        ("embeddings.position_embeddings.", "position_embeddings."),
        ("embeddings.token_type_embeddings.", "token_type_embeddings."),
        ("embeddings.LayerNorm.", "embed_norm."),
        ("encoder.layer.", "layers."),
        (".attention.self.query.", ".attention.q_proj."),
        (".attention.self.key.", ".attention.k_proj."),
        (".attention.self.value.", ".attention.v_proj."),
        (".attention.output.dense.", ".attention.out_proj."),
        (".attention.output.LayerNorm.", ".attn_norm."),
        (".intermediate.dense.", ".ffn_in."),
        (".output.dense.", ".ffn_out."),
        (".output.LayerNorm.", ".ffn_norm."),
    )

    def load_hf_state_dict(self, state: dict[str, Tensor]) -> None:
        """Load a Hugging Face ``BertModel`` state dict, or the ``bert.`` part of one with heads.

        (``BertForMaskedLM``, ``BertForPreTraining``, ...) The pooler, the heads and buffers
        are ignored: the encoder ends at the last layer's hidden states.
        """
        ours: dict[str, Tensor] = {}
        for name, tensor in state.items():
            new = name.removeprefix("bert.")
            if new.startswith(("pooler.", "cls.")) or new.endswith("position_ids"):
                continue
            for old, repl in self._RENAMES:
                new = new.replace(old, repl)
            ours[new] = tensor
        missing, unexpected = self.load_state_dict(ours, strict=False)
        if missing or unexpected:
            raise ValueError(f"weights do not fit: missing {missing}, unexpected {unexpected}")
