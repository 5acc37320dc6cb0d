"""Multi-head latent attention against transformers' DeepseekV3Attention; absorbed decoding."""

from __future__ import annotations

import pytest
import torch

from attnkit import masks
from attnkit.nn import MultiHeadLatentAttention
from attnkit.nn.latent_attention import TRANSFORMERS_NAMES
from conftest import hf_attention

E, H, R, NOPE, ROPE, V = 48, 4, 20, 12, 8, 10  # odd sizes: kv_rank 20, head dims 12+8, values 10


def deepseek(q_rank, **overrides):
    """A transformers DeepseekV3Attention at the sizes above, random weights."""
    sizes = {
        "hidden_size": E,
        "num_attention_heads": H,
        "num_key_value_heads": H,
        "q_lora_rank": q_rank,
        "kv_lora_rank": R,
        "qk_nope_head_dim": NOPE,
        "qk_rope_head_dim": ROPE,
        "v_head_dim": V,
        "rope_interleave": False,
    }
    return hf_attention("deepseek_v3", **{**sizes, **overrides})


def deepseek_pair(q_rank, mask=None):
    hf = deepseek(q_rank)
    ours = MultiHeadLatentAttention.from_transformers(hf).eval()
    if mask is not None:
        ours.mask = mask
    return hf, ours


#: DeepSeek-V3's context extension, at this test's original context of 64 positions
DEEPSEEK_YARN = {
    "max_position_embeddings": 64 * 40,
    "rope_parameters": {
        "rope_type": "yarn",
        "rope_theta": 10000.0,
        "factor": 40.0,
        "original_max_position_embeddings": 64,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
    },
}


def hf_forward(hf, x, allowed, start=0):
    """transformers' output and weights on x (B, L, E) at positions start.., its own rotary
    embedding giving cos and sin, under the bool mask ``allowed`` (L, L)."""
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3RotaryEmbedding

    B, L, _ = x.shape
    positions = torch.arange(start, start + L)[None].expand(B, L)
    cos, sin = DeepseekV3RotaryEmbedding(hf.config)(x, positions)
    additive = torch.zeros(L, L).masked_fill(~allowed, float("-inf"))
    return hf(x, (cos, sin), additive.expand(B, 1, L, L))


@pytest.mark.parametrize("q_rank", [None, 16])
def test_matches_transformers_deepseek_v3_attention_with_gradients(q_rank):
    hf, ours = deepseek_pair(q_rank)
    B, L = 2, 9
    x = torch.randn(B, L, E, generator=torch.Generator().manual_seed(1))
    exp_out, exp_w = hf_forward(hf, x, masks.causal().dense(L, L)[0, 0])
    out, w = ours(x, need_weights=True)
    torch.testing.assert_close(out, exp_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(w, exp_w, atol=1e-6, rtol=1e-5)
    seed = torch.randn(out.shape, generator=torch.Generator().manual_seed(2))
    (exp_out * seed).sum().backward()
    (out * seed).sum().backward()
    theirs = dict(hf.named_parameters())
    for name, p in ours.named_parameters():
        module, _, param = name.rpartition(".")
        hf_name = {v: k for k, v in TRANSFORMERS_NAMES.items()}.get(module, module) + "." + param
        torch.testing.assert_close(p.grad, theirs[hf_name].grad, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("backend", ["auto", "tiled", "reference"])
@pytest.mark.parametrize(("mask", "window"), [(None, None), (masks.sliding_window(3), 3)])
def test_absorbed_decoding_with_a_latent_cache_equals_the_full_pass(mask, window, backend):
    """Prompt, then one token at a time: MQA over [c | k_rope] with values c (a strided view
    of the cached keys), then V_h."""
    hf, ours = deepseek_pair(16, mask=mask)
    ours.backend = backend
    B, L = 2, 11
    x = torch.randn(B, L, E, generator=torch.Generator().manual_seed(3))
    allowed = (mask or masks.causal()).dense(L, L)[0, 0]
    exp_out, exp_w = hf_forward(hf, x, allowed)
    cache = ours.new_cache(B, max_len=L if window is None else 2 * window, window=window)
    assert ours.absorbs(1)
    with torch.no_grad():
        first, _ = ours(x[:, :4], cache=cache)
        steps = [ours(x[:, t : t + 1], cache=cache, need_weights=True) for t in range(4, L)]
    got = torch.cat([first, *(out for out, _ in steps)], 1)
    torch.testing.assert_close(got, exp_out, atol=1e-5, rtol=1e-5)
    last_w = steps[-1][1]  # over the keys the cache holds: positions start .. L - 1
    torch.testing.assert_close(last_w[:, :, 0], exp_w[:, :, -1, cache.start :])
    # the cache holds kv_rank + rope_dim numbers per token and no values
    assert cache.keys.shape == (B, 1, cache.length, R + ROPE)
    assert cache.values.numel() == 0


@pytest.mark.parametrize("q_rank", [None, 16])
def test_a_long_prompt_over_the_cache_runs_expanded_and_decoding_absorbed(q_rank):
    """kv_rank 20, nope 12, v 10: absorbed below 20·22 / 18 = 24.4 queries. A 30-token
    prompt expands the cached latents, the steps after it absorb; both equal the full pass."""
    hf, ours = deepseek_pair(q_rank)
    assert ours.absorbs(24)
    assert not ours.absorbs(25)
    B, L, P = 1, 34, 30
    x = torch.randn(B, L, E, generator=torch.Generator().manual_seed(5))
    exp_out, _ = hf_forward(hf, x, masks.causal().dense(L, L)[0, 0])
    cache = ours.new_cache(B, max_len=L)
    with torch.no_grad():
        parts = [ours(x[:, :P], cache=cache)[0]]
        parts += [ours(x[:, t : t + 1], cache=cache)[0] for t in range(P, L)]
    torch.testing.assert_close(torch.cat(parts, 1), exp_out, atol=1e-5, rtol=1e-5)


def test_refuses_bad_sizes_and_inputs():
    with pytest.raises(ValueError, match="kv_rank must be an int >= 1"):
        MultiHeadLatentAttention(E, H, kv_rank=0, nope_dim=NOPE, rope_dim=ROPE, v_dim=V)
    with pytest.raises(ValueError, match="even head_dim"):
        MultiHeadLatentAttention(E, H, kv_rank=R, nope_dim=NOPE, rope_dim=7, v_dim=V)
    mla = MultiHeadLatentAttention(E, H, kv_rank=R, nope_dim=NOPE, rope_dim=ROPE, v_dim=V)
    with pytest.raises(ValueError, match=r"x must be \(B, L, E=48\), got \(2, 5, 40\)"):
        mla(torch.randn(2, 5, 40))
    with pytest.raises(ValueError, match="keeps only the last 3 positions"):
        mla(torch.randn(1, 2, E), cache=mla.new_cache(1, 8, window=3))  # causal needs them all
    assert "kv_rank=20" in repr(mla)


def test_from_transformers_refuses_parameters_it_has_no_place_for():
    """A DeepSeek-like layer with more (sinks, DeepSeek-V3.2's indexer) is refused by name,
    not failed inside load_state_dict."""
    hf = deepseek(None)
    hf.sinks = torch.nn.Parameter(torch.zeros(H))
    with pytest.raises(ValueError, match=r"has no place for: \.sinks"):
        MultiHeadLatentAttention.from_transformers(hf)


def test_causal_lm_layers_refuse_what_latent_attention_does_not_have():
    from attnkit.nn import CausalLM

    sizes = {"kv_rank": 12, "nope_dim": 4, "rope_dim": 4, "v_dim": 6}
    for kwargs, named in (
        ({"num_kv_heads": 2}, "num_kv_heads"),
        ({"sinks": True, "qk_norm": True, "output_gate": True}, "sinks, qk_norm, output_gate"),
        ({"positions": "alibi"}, "positions='alibi'"),
    ):
        with pytest.raises(ValueError, match=f"drop {named}"):
            CausalLM(9, d_model=32, nhead=4, latent=sizes, **kwargs)
    lm = CausalLM(9, d_model=32, nhead=4, num_layers=2, positions="rope", latent=sizes)
    caches = lm.new_caches(1, 8)
    assert all(c.keys.shape[-1] == 12 + 4 and c.values.shape[-1] == 0 for c in caches)


def test_yarn_rope_and_mscale_match_deepseek_v3_long_context_attention():
    """DeepSeek-V3's YaRN (factor 40, mscale = mscale_all_dim) at positions past the original
    context: transformers' rotary embedding against RotaryEmbedding.yarn built by hand, its
    softmax scale passed as ``scale`` (positions 0..199 are cached zeros, masked out)."""
    from attnkit.nn import RotaryEmbedding

    hf = deepseek(None, **DEEPSEEK_YARN)
    yarn = RotaryEmbedding.yarn(ROPE, 40.0, original_max_len=64, mscale=1.0, mscale_all_dim=1.0)
    assert hf.scaling != pytest.approx((NOPE + ROPE) ** -0.5)  # YaRN changed the scale
    ours = MultiHeadLatentAttention(
        E, H, kv_rank=R, nope_dim=NOPE, rope_dim=ROPE, v_dim=V, rope=yarn, scale=hf.scaling
    ).eval()
    ours.load_state_dict(MultiHeadLatentAttention.from_transformers(hf).state_dict())
    B, L = 2, 9
    x = torch.randn(B, L, E, generator=torch.Generator().manual_seed(6))
    exp_out, _ = hf_forward(hf, x, masks.causal().dense(L, L)[0, 0], start=200)  # past 64
    cache = ours.new_cache(B, 200 + L)
    cache.append(torch.zeros(B, 1, 200, R + ROPE), torch.zeros(B, 1, 200, 0))  # positions 0..199
    with torch.no_grad():
        out, _ = ours(x, cache=cache, mask=masks.custom(lambda b, h, q, kv: kv >= 200))
    torch.testing.assert_close(out, exp_out, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("q_rank", [None, 16])
@pytest.mark.parametrize("yarn", [False, True])
def test_from_transformers_with_interleaved_rope_as_deepseek_checkpoints(q_rank, yarn):
    """rope_interleave=True, as real checkpoints: from_transformers reorders the rotary rows,
    reads the scale and the rotary kind, and the module then computes what transformers does,
    decoding over its cache included."""
    hf = deepseek(q_rank, rope_interleave=True, **(DEEPSEEK_YARN if yarn else {}))
    ours = MultiHeadLatentAttention.from_transformers(hf).eval()
    B, L = 2, 10
    x = torch.randn(B, L, E, generator=torch.Generator().manual_seed(7))
    exp_out, exp_w = hf_forward(hf, x, masks.causal().dense(L, L)[0, 0])
    out, w = ours(x, need_weights=True)
    torch.testing.assert_close(out, exp_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(w, exp_w, atol=1e-6, rtol=1e-5)
    cache = ours.new_cache(B, L)
    with torch.no_grad():
        steps = [ours(x[:, t : t + 1], cache=cache)[0] for t in range(L)]
    torch.testing.assert_close(torch.cat(steps, 1), exp_out, atol=1e-5, rtol=1e-5)
