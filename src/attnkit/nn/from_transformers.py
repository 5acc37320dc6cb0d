"""attnkit attention modules from transformers' attention modules, weights copied.

Llama-family layouts (Llama, Mistral, Qwen2, Qwen3, Gemma 2, gpt-oss and their kin:
``q_proj``, ``k_proj``, ``v_proj``, ``o_proj`` over ``head_dim``-wide heads, grouped kv heads,
rotary positions from ``config.rope_parameters``) become ``MultiHeadAttention``, with their
per-head q/k RMSNorm (Qwen3), attention sinks (gpt-oss), logit softcapping and softmax scale
(Gemma 2) and sliding-window layers.
DeepSeek-V2/V3 (multi-head latent attention) become ``MultiHeadLatentAttention``. The tests
run each against the transformers module it came from.
"""

from __future__ import annotations

from typing import Any

import torch

from attnkit import masks, score_mods
from attnkit.nn.attention import MultiHeadAttention
from attnkit.nn.latent_attention import MultiHeadLatentAttention
from attnkit.nn.rope import RotaryEmbedding

_PROJECTIONS = {"q_proj": "q_proj", "k_proj": "k_proj", "v_proj": "v_proj", "o_proj": "out_proj"}


def from_transformers(module: Any) -> MultiHeadAttention | MultiHeadLatentAttention:
    """The attnkit module that computes what ``module`` (a transformers attention) computes.

    Its mask is causal, or a sliding window where the layer has one (transformers'
    ``sliding_window=W``: the query and the W - 1 keys before it, ``sliding_window(W - 1)``).
    Call it like any attnkit module: positions come from the rotary embedding it builds (or
    a cache), not from the caller.
    """
    if hasattr(module, "kv_a_proj_with_mqa"):
        return MultiHeadLatentAttention.from_transformers(module)
    missing = [name for name in _PROJECTIONS if not hasattr(module, name)]
    if missing or not hasattr(module, "config"):
        raise ValueError(
            f"from_transformers takes a transformers attention module with q/k/v/o "
            f"projections; {type(module).__name__} lacks {', '.join(missing) or 'a config'}"
        )
    config = module.config
    head_dim = int(module.head_dim)
    params = dict(config.rope_parameters or {})
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError("from_transformers: partial rotary embeddings are not supported")
    rope = RotaryEmbedding.from_parameters(
        head_dim, params, getattr(config, "max_position_embeddings", None)
    )
    window = getattr(module, "sliding_window", getattr(config, "sliding_window", None))
    mask = masks.sliding_window(window - 1) if window else masks.causal()
    q_norm, k_norm = getattr(module, "q_norm", None), getattr(module, "k_norm", None)
    sinks = getattr(module, "sinks", None)
    cap = getattr(module, "attn_logit_softcapping", None)  # Gemma 2: c·tanh(s / c)
    scale = float(module.scaling)
    weight = module.q_proj.weight
    new = MultiHeadAttention(
        module.q_proj.in_features,
        config.num_attention_heads,
        num_kv_heads=config.num_key_value_heads or config.num_attention_heads,
        head_dim=head_dim,
        bias=any(getattr(module, name).bias is not None for name in _PROJECTIONS),
        mask=mask,
        rope=rope,
        score_mod=None if cap is None else score_mods.softcap(float(cap)),
        qk_norm=q_norm is not None,
        sinks=sinks is not None,
        scale=None if scale == head_dim**-0.5 else scale,
        device=weight.device,
        dtype=weight.dtype,
    )
    with torch.no_grad():
        for theirs, ours in _PROJECTIONS.items():
            source, target = getattr(module, theirs), getattr(new, ours)
            target.weight.copy_(source.weight)
            if source.bias is None:
                target.register_parameter("bias", None)  # Qwen2: q/k/v biases, none on o
            else:
                target.bias.copy_(source.bias)
        for source, target in ((q_norm, new.q_norm), (k_norm, new.k_norm)):
            if source is not None and target is not None:
                target.weight.copy_(source.weight)
                target.eps = float(
                    getattr(source, "variance_epsilon", getattr(source, "eps", 1e-6))
                )
        if sinks is not None and new.sinks is not None:
            new.sinks.copy_(sinks)
    return new.train(module.training)
