"""Run a transformers model's own attention layers through attnkit.

``register()`` adds attnkit to transformers' ``AttentionInterface`` (and the mask interface it
needs), so any model loaded or switched with ``attn_implementation="attnkit"`` computes every
attention with ``attnkit.attention``: the tiled flash kernels on CPU (forward and backward),
the Triton kernels on CUDA, whatever ``backend`` names. The model's weights, positions, norms
and caches stay transformers'; only softmax(q·kᵀ·scale)·v changes hands.

Example:
    >>> import torch, transformers
    >>> from attnkit.integrations.transformers import register
    >>> name = register()  # "attnkit"
    >>> config = transformers.LlamaConfig(vocab_size=32, hidden_size=32, intermediate_size=64,
    ...     num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2)
    >>> model = transformers.LlamaForCausalLM(config).eval()
    >>> model.set_attn_implementation(name)
    >>> model(torch.tensor([[1, 2, 3]])).logits.shape
    torch.Size([1, 3, 32])

Masks follow transformers' SDPA path exactly: the model builds them with ``sdpa_mask``, which
leaves out the mask where causality alone says it (no padding; attnkit then runs its
tile-skipping causal mask, top-left aligned like SDPA's ``is_causal``), and gives a bool
tensor otherwise (padding, sliding windows, image tokens), whose empty tiles attnkit skips too
(its tile map is built once per tensor, so every layer of a forward shares it).
``model(..., output_attentions=True)`` gets each layer's weights from ``attention_weights``.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from attnkit import masks, score_mods
from attnkit._types import ScoreModFn
from attnkit.backends._common import MaskLike
from attnkit.functional import BackendName, attention, attention_weights
from attnkit.score_mods import _select

__all__ = ["attention_forward", "register"]


def register(name: str = "attnkit", backend: BackendName = "auto") -> str:
    """Make ``attn_implementation=name`` run attention through ``attnkit.attention(backend=…)``.

    Registers the attention function and transformers' SDPA mask builder under ``name``, for
    ``from_pretrained(..., attn_implementation=name)`` or ``model.set_attn_implementation``.
    Returns ``name``.
    """
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    AttentionInterface.register(name, partial(attention_forward, backend=backend))
    AttentionMaskInterface.register(name, sdpa_mask)
    return name


def attention_forward(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    position_bias: Tensor | None = None,
    *,
    backend: BackendName = "auto",
    **kwargs: Any,
) -> tuple[Tensor, Tensor | None]:
    """transformers' attention-function signature over ``attnkit.attention``.

    Args:
        module: the calling attention layer (its ``is_causal`` is read when no mask is given).
        query: (B, Hq, Lq, D).
        key: (B, Hkv, Lk, D); Hkv divides Hq (grouped heads are not repeated).
        value: (B, Hkv, Lk, Dv).
        attention_mask: bool (B|1, 1|Hq, Lq, Lk), True = attend; or float, added to the scores
            (a large negative value masks); or None: causal (top-left) when the layer is causal
            and Lq > 1, else none.
        dropout: attention-weight dropout p.
        scaling: softmax scale (None: 1/sqrt(D)).
        is_causal: overrides the module's ``is_causal`` when given.
        position_bias: float (B|1, Hq|1, Lq, Lk) added to the scores (T5-style).
        backend: the attnkit backend.
        kwargs: ``softcap`` (Gemma 2: c·tanh(s / c), before any bias), ``s_aux`` (gpt-oss's
            sinks, (Hq,)), ``output_attentions``; the rest (sliding_window, cache details) is
            already in the mask.

    Returns:
        (output (B, Lq, Hq, Dv), weights (B, Hq, Lq, Lk) where ``output_attentions`` asks for
        them (``model(..., output_attentions=True)``), else None).
    """
    Lq = query.shape[2]
    mods: list[ScoreModFn | score_mods.ScoreMod] = []
    if kwargs.get("softcap"):
        mods.append(score_mods.softcap(float(kwargs["softcap"])))
    mask: MaskLike
    if attention_mask is None:
        causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
        mask = masks.causal(align="top_left") if causal and Lq > 1 else None
    elif attention_mask.dtype == torch.bool:
        mask = attention_mask
    else:  # additive: its large negatives become the mask, anything else a bias
        mask = attention_mask > torch.finfo(attention_mask.dtype).min / 2
        bias = attention_mask.masked_fill(~mask, 0)
        if bias.any():
            mods.append(_added(bias))
    if position_bias is not None:
        mods.append(_added(position_bias))
    score_mod = None if not mods else mods[0] if len(mods) == 1 else score_mods.compose(*mods)
    common: dict[str, Any] = {
        "score_mod": score_mod,
        "scale": scaling,
        "sinks": kwargs.get("s_aux"),
    }
    out = attention(
        query, key, value, mask=mask, dropout_p=dropout, backend=backend, **common
    )  # fmt: skip
    weights = (
        attention_weights(query, key, value, mask=mask, **common)
        if kwargs.get("output_attentions")
        else None
    )
    return out.transpose(1, 2).contiguous(), weights


def _added(bias: Tensor) -> ScoreModFn:
    """A score mod adding ``bias`` (B|1, H|1, Lq, Lk) to the scores."""

    def add(score: Tensor, b: Tensor, h: Tensor, q: Tensor, kv: Tensor) -> Tensor:
        # a size-1 (broadcast) dim is read at 0 whatever the index
        index = tuple(_select(i, n) for n, i in zip(bias.shape, (b, h, q, kv), strict=True))
        return score + bias[index].to(score.dtype)

    return add
