"""attnkit.nn.from_transformers against the transformers attention modules it converts.

Each module gets random weights (norm gains and sinks included), and its own rotary
embedding class gives the cos/sin it is called with; the mask follows transformers' own
definition (causal, and q - kv < W on sliding-window layers), written out here.
"""

from __future__ import annotations

import importlib

import pytest
import torch

from attnkit.nn import KVCache, MultiHeadAttention, MultiHeadLatentAttention, from_transformers
from conftest import hf_attention

FAMILIES = {  # family -> config; the comment says what each one exercises
    "llama": {  # GQA, Llama 3.1 rope scaling, no biases
        "hidden_size": 64,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 256,
        "rope_parameters": {
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32,
        },
    },
    "qwen2": {"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2},  # qkv bias
    "qwen3": {  # q/k RMSNorm, head_dim 16 x 4 heads != hidden 48
        "hidden_size": 48,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
    },
    "mistral": {  # multi-query, a sliding window on every layer
        "hidden_size": 64,
        "num_attention_heads": 4,
        "num_key_value_heads": 1,
        "sliding_window": 4,
    },
    "gemma2": {  # logit softcapping, query_pre_attn_scalar, a sliding layer
        "hidden_size": 64,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "query_pre_attn_scalar": 24,
        "attn_logit_softcapping": 2.0,
        "sliding_window": 4,
        "num_hidden_layers": 1,
        "layer_types": ["sliding_attention"],
    },
    "gpt_oss": {  # sinks, biases, a sliding layer, YaRN by default
        "hidden_size": 64,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "sliding_window": 4,
        "num_hidden_layers": 1,
        "layer_types": ["sliding_attention"],
        "attention_bias": True,
    },
}


def transformers_reference(family, hf, x):
    """The module's output and weights on x (B, L, E) at positions 0.., as its model runs it."""
    modeling = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
    prefix = "".join(part.capitalize() for part in family.split("_"))
    B, L, _ = x.shape
    positions = torch.arange(L)[None].expand(B, L)
    cos, sin = getattr(modeling, f"{prefix}RotaryEmbedding")(hf.config)(x, positions)
    q, kv = torch.arange(L)[:, None], torch.arange(L)[None]
    allowed = kv <= q
    window = getattr(hf, "sliding_window", getattr(hf.config, "sliding_window", None))
    if window:
        allowed &= q - kv < window
    additive = torch.zeros(L, L).masked_fill(~allowed, float("-inf"))
    return hf(x, (cos, sin), additive.expand(B, 1, L, L))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_converted_attention_matches_transformers_and_decodes_the_same(family):
    hf = hf_attention(family, **FAMILIES[family])
    ours = from_transformers(hf)
    assert isinstance(ours, MultiHeadAttention)
    x = torch.randn(
        2, 11, FAMILIES[family]["hidden_size"], generator=torch.Generator().manual_seed(0)
    )
    exp_out, exp_w = transformers_reference(family, hf, x)
    out, w = ours(x, need_weights=True)
    torch.testing.assert_close(out, exp_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(w, exp_w, atol=1e-6, rtol=1e-5)
    cache = KVCache(2, ours.num_kv_heads, 11, ours.head_dim)
    with torch.no_grad():
        steps = [ours(x[:, t : t + 1], cache=cache)[0] for t in range(11)]
    torch.testing.assert_close(torch.cat(steps, 1), exp_out, atol=1e-5, rtol=1e-5)


def test_what_each_family_turns_into():
    qwen2 = from_transformers(hf_attention("qwen2", **FAMILIES["qwen2"]))
    assert qwen2.q_proj.bias is not None
    assert qwen2.out_proj.bias is None  # Qwen2 has q/k/v biases and none on o_proj
    qwen3 = from_transformers(hf_attention("qwen3", **FAMILIES["qwen3"]))
    assert (qwen3.head_dim, qwen3.q_norm is not None) == (16, True)
    oss = from_transformers(hf_attention("gpt_oss", **FAMILIES["gpt_oss"]))
    assert oss.sinks is not None
    assert repr(oss.mask) == "sliding_window(left=3, right=0)"
    assert oss.rope is not None
    assert oss.rope.attention_factor != 1.0  # gpt-oss's default YaRN
    deepseek = hf_attention(
        "deepseek_v3",
        hidden_size=48,
        num_attention_heads=4,
        num_key_value_heads=4,
        q_lora_rank=None,
        kv_lora_rank=20,
        qk_nope_head_dim=12,
        qk_rope_head_dim=8,
        v_head_dim=10,
    )
    assert isinstance(from_transformers(deepseek), MultiHeadLatentAttention)
    with pytest.raises(ValueError, match="lacks q_proj"):
        from_transformers(torch.nn.Linear(2, 2))
