"""DifferentialAttention against transformers' DiffLlamaAttention and its own definition."""

from __future__ import annotations

import copy
import re

import pytest
import torch

from attnkit import masks
from attnkit.nn import DifferentialAttention, KVCache, from_transformers
from attnkit.nn.differential_attention import lambda_init
from conftest import assert_close_scaled, hf_attention

DIFFLLAMA = {"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2}


def diffllama_reference(hf, x):
    """DiffLlamaAttention on x (B, L, E) at positions 0.., causal, as its model runs it."""
    from transformers.models.diffllama.modeling_diffllama import DiffLlamaRotaryEmbedding

    B, L, _ = x.shape
    cos, sin = DiffLlamaRotaryEmbedding(hf.config)(x, torch.arange(L)[None].expand(B, L))
    causal = torch.ones(L, L, dtype=torch.bool).tril()
    additive = torch.zeros(L, L, dtype=x.dtype).masked_fill(~causal, float("-inf"))
    return hf(x, position_embeddings=(cos, sin), attention_mask=additive.expand(B, 1, L, L))[0]


@pytest.mark.parametrize("layer_idx", [0, 3])
@pytest.mark.parametrize("heads", [(4, 2), (8, 2), (4, 4)])
def test_matches_diffllama_and_decodes_the_same(layer_idx, heads):
    """Output (float32 against DiffLlama in float64, within twice its float32 error), every
    parameter's gradient (both in float64) and decoding one token at a time over a cache."""
    H, Hkv = heads
    hf = hf_attention("diffllama", **{**DIFFLLAMA, "num_attention_heads": H,
                                      "num_key_value_heads": Hkv})  # fmt: skip
    hf.layer_idx, hf.lambda_init = layer_idx, lambda_init(layer_idx)
    ours = from_transformers(hf)
    assert isinstance(ours, DifferentialAttention)
    assert (ours.num_heads, ours.num_kv_heads, ours.lambda_init) == (H // 2, Hkv // 2,
                                                                     hf.lambda_init)  # fmt: skip
    x = torch.randn(2, 9, 64, generator=torch.Generator().manual_seed(1))
    hf64 = copy.deepcopy(hf).double()
    expected, truth = diffllama_reference(hf, x), diffllama_reference(hf64, x.double())
    out, _ = ours(x)
    assert_close_scaled(out, truth, expected, floor=1e-6)
    ours64 = from_transformers(hf64)
    ours64(x.double())[0].square().sum().backward()
    truth.square().sum().backward()
    theirs = dict(hf64.named_parameters())
    for name, p in ours64.named_parameters():  # DiffLlama takes λ's dot products in float32
        g = theirs[name.replace("out_proj", "o_proj")].grad
        torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-6 * g.abs().max().item())
    cache = ours.new_cache(2, 9)
    with torch.no_grad():
        steps = [ours(x[:, t : t + 1], cache=cache)[0] for t in range(9)]
    assert_close_scaled(torch.cat(steps, 1), truth, expected, floor=1e-6)


def test_is_the_difference_of_two_softmax_maps():
    """From the definition, in float64: (A1 − λ·A2)·V per head, RMS-normalised, times
    1 − λ_init, through W0; the weights it returns are A1 − λ·A2."""
    E, h, g, L = 48, 2, 1, 7
    m = DifferentialAttention(E, h, num_kv_heads=g, depth=2, mask=masks.causal(), bias=True)
    m = m.double()
    x = torch.randn(1, L, E, dtype=torch.float64)
    d = m.head_dim
    q = m.q_proj(x).view(1, L, 2, h, d).permute(2, 0, 3, 1, 4)  # (map, B, h, L, d)
    k = m.k_proj(x).view(1, L, 2, g, d).permute(2, 0, 3, 1, 4)
    v = m.v_proj(x).view(1, L, 2, g, d).permute(0, 3, 1, 2, 4).reshape(1, g, L, 2 * d)
    causal = torch.ones(L, L, dtype=torch.bool).tril()
    lam = (m.lambda_q1 @ m.lambda_k1).exp() - (m.lambda_q2 @ m.lambda_k2).exp() + m.lambda_init
    scores = q @ k.repeat_interleave(h // g, 2).transpose(-1, -2) / d**0.5
    a1, a2 = scores.masked_fill(~causal, float("-inf")).softmax(-1)
    diff = a1 - lam * a2
    heads = diff @ v.repeat_interleave(h // g, 1)
    heads = heads * torch.rsqrt(heads.pow(2).mean(-1, keepdim=True) + m.norm.eps)
    expected = m.out_proj((heads * (1 - m.lambda_init)).transpose(1, 2).reshape(1, L, E))
    out, weights = m(x, need_weights=True)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(weights, diff)
    torch.testing.assert_close(weights.sum(-1), (1 - lam).expand(1, h, L))
    assert m.lambda_init == pytest.approx(0.8 - 0.6 * torch.e ** (-0.6))


def test_windowed_cache_key_padding_and_errors():
    m = DifferentialAttention(32, 2, mask=masks.sliding_window(3)).eval()
    x = torch.randn(2, 10, 32)
    full, _ = m(x)
    cache = m.new_cache(2, 8, window=3)
    with torch.no_grad():
        steps = [m(x[:, t : t + 1], cache=cache)[0] for t in range(10)]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)
    padding = torch.zeros(2, 10, dtype=torch.bool)
    padding[1, 6:] = True  # the second sequence is 6 long
    padded, _ = m(x, key_padding_mask=padding)
    alone, _ = m(x[1:, :6])
    torch.testing.assert_close(padded[1, :6], alone[0], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match=r"x must be \(B, L, E=32\)"):
        m(torch.randn(2, 5, 31))
    with pytest.raises(ValueError, match="looks back without bound"):
        DifferentialAttention(32, 2, mask=masks.causal())(
            x[:, :1], cache=KVCache(2, 2, 8, 16, window=3)
        )
    with pytest.raises(ValueError, match="not divisible by 2 · num_heads = 6"):
        DifferentialAttention(32, 3)
    with pytest.raises(ValueError, match="num_heads 4 is not a multiple of num_kv_heads 3"):
        DifferentialAttention(48, 4, num_kv_heads=3)
    assert "lambda_init=0.2" in repr(m)


def test_causal_lm_differential_layers(tmp_path):
    """CausalLM(differential=True): nhead / 2 differential heads per layer, λ_init growing with
    depth, checkpoints that rebuild it; what it lacks is refused by name."""
    from attnkit.nn import CausalLM, load_checkpoint, save_checkpoint

    lm = CausalLM(11, d_model=32, nhead=4, num_layers=3, positions="rope", differential=True)
    attn = [layer.self_attn for layer in lm.layers]
    assert all(isinstance(a, DifferentialAttention) and a.num_heads == 2 for a in attn)
    assert [a.lambda_init for a in attn] == pytest.approx([lambda_init(i) for i in range(3)])
    assert attn[0].lambda_init < attn[1].lambda_init < attn[2].lambda_init
    save_checkpoint(tmp_path / "diff.pt", lm)
    again = load_checkpoint(tmp_path / "diff.pt").model
    ids = torch.randint(0, 11, (1, 6))
    torch.testing.assert_close(again(ids)[0], lm(ids)[0])
    for kwargs, message in (
        ({"sinks": True}, "differential attention has no sinks; drop them"),
        ({"positions": "alibi"}, "has no positions='alibi'"),
        ({"nhead": 3, "d_model": 30}, "nhead 3 and num_kv_heads 3 must be even"),
        ({"latent": {"kv_rank": 8, "nope_dim": 4, "rope_dim": 4, "v_dim": 4}}, "drop differential"),
    ):
        with pytest.raises(ValueError, match=re.escape(message)):
            CausalLM(11, **{"d_model": 32, "nhead": 4, "differential": True, **kwargs})
