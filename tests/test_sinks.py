"""Attention sinks (one logit per head, no value) against a softmax over an explicit extra column.

The reference here is written out by hand, independent of attnkit: scores, then the sink
logit appended as one more column, softmax, drop the column, multiply by v. It is what
transformers' gpt-oss eager attention does, and that module is checked too.
"""

from __future__ import annotations

import pytest
import torch

import attnkit
from attnkit import UnsupportedError, masks
from attnkit.nn import KVCache, MultiHeadAttention, RotaryEmbedding
from conftest import hf_attention, load_hf_attention


def explicit_sinks(q, k, v, allowed, sinks, scale):
    """out (B, Hq, Lq, Dv), lse (B, Hq, Lq), probs (B, Hq, Lq, Lk) with the sink column."""
    B, Hq, Lq, _ = q.shape
    G = Hq // k.shape[1]
    k, v = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)
    scores = (q @ k.transpose(-1, -2) * scale).masked_fill(~allowed, float("-inf"))
    sink_col = sinks.view(1, Hq, 1, 1).expand(B, Hq, Lq, 1).to(scores.dtype)
    combined = torch.cat([scores, sink_col], dim=-1)
    probs = combined.softmax(-1)[..., :-1]
    return probs @ v, combined.logsumexp(-1), probs


def _inputs(dtype, B=2, Hq=4, Hkv=2, Lq=7, Lk=11, D=5, Dv=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, Lq, D, generator=g, dtype=dtype)
    k = torch.randn(B, Hkv, Lk, D, generator=g, dtype=dtype)
    v = torch.randn(B, Hkv, Lk, Dv, generator=g, dtype=dtype)
    sinks = torch.randn(Hq, generator=g, dtype=dtype) * 2
    return q, k, v, sinks


def _row_without_keys(Lq, Lk):
    allowed = torch.rand(Lq, Lk, generator=torch.Generator().manual_seed(3)) < 0.6
    allowed[2] = False  # a row with no key: out 0, lse = the sink
    return allowed


MASKS = {
    "none": None,
    "causal": masks.causal(),
    "sliding_window": masks.sliding_window(3),
    "tensor with an empty row": _row_without_keys(7, 11),
}


@pytest.mark.parametrize("backend", ["reference", "tiled"])
@pytest.mark.parametrize("mask_name", list(MASKS))
def test_sinks_equal_an_extra_column_with_no_value_forward_and_backward(backend, mask_name):
    q, k, v, sinks = (t.requires_grad_() for t in _inputs(torch.float64))
    mask = MASKS[mask_name]
    allowed = torch.ones(7, 11, dtype=torch.bool)
    if isinstance(mask, masks.Mask):
        allowed = mask.dense(7, 11)[0, 0]
    elif mask is not None:
        allowed = mask
    out, lse = attnkit.attention(q, k, v, mask=mask, sinks=sinks, backend=backend, return_lse=True)
    exp_out, exp_lse, _ = explicit_sinks(q, k, v, allowed, sinks, 5**-0.5)
    torch.testing.assert_close(out, exp_out, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(lse, exp_lse, atol=1e-12, rtol=1e-10)
    g = torch.Generator().manual_seed(7)
    d_out, d_lse = (
        torch.randn(out.shape, generator=g, dtype=torch.float64),
        torch.randn(lse.shape, generator=g, dtype=torch.float64),
    )
    inputs = (q, k, v, sinks)
    got = torch.autograd.grad((out * d_out).sum() + (lse * d_lse).sum(), inputs)
    exp = torch.autograd.grad((exp_out * d_out).sum() + (exp_lse * d_lse).sum(), inputs)
    for name, a, b in zip(["q", "k", "v", "sinks"], got, exp, strict=True):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-8, msg=f"d{name}")
    if mask_name == "tensor with an empty row":
        assert torch.equal(out[:, :, 2], torch.zeros_like(out[:, :, 2]))
        torch.testing.assert_close(lse[:, :, 2], sinks.detach().expand(2, 4))


def test_a_sink_of_minus_infinity_is_no_sink_even_on_a_row_with_no_key():
    q, k, v, sinks = _inputs(torch.float64)
    sinks = torch.tensor([0.5, float("-inf"), 1.0, float("-inf")], dtype=torch.float64)
    sinks.requires_grad_()
    allowed = _row_without_keys(7, 11)
    out, lse = attnkit.attention(q, k, v, mask=allowed, sinks=sinks, return_lse=True)
    plain, plain_lse = attnkit.attention(q, k, v, mask=allowed, return_lse=True)
    torch.testing.assert_close(out[:, 1::2], plain[:, 1::2], atol=0, rtol=0)
    torch.testing.assert_close(lse[:, 1::2], plain_lse[:, 1::2], atol=0, rtol=0)
    assert bool(lse[:, 1::2, 2].isneginf().all())  # the empty row: still no mass anywhere
    out.sum().backward()
    assert bool(torch.isfinite(sinks.grad).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sinks_on_the_compiled_cpu_kernel_dtypes(dtype):
    """float32 / bfloat16 run the C++ tiled kernels; the sink step runs in lse's float32."""
    q, k, v, sinks = _inputs(dtype, Lq=33, Lk=70, D=16, Dv=16)
    out = attnkit.attention(q, k, v, mask=masks.causal(), sinks=sinks, backend="tiled")
    allowed = masks.causal().dense(33, 70)[0, 0]
    exp, _, _ = explicit_sinks(*(t.double() for t in (q, k, v)), allowed, sinks.double(), 0.25)
    tol = {torch.float32: 2e-6, torch.bfloat16: 2e-2}[dtype]
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), exp, atol=tol, rtol=tol)


def test_attention_weights_with_sinks_leave_the_sink_its_share():
    q, k, v, sinks = _inputs(torch.float64)
    mask = masks.sliding_window(3)
    w = attnkit.attention_weights(q, k, v, mask=mask, sinks=sinks)
    _, _, exp = explicit_sinks(q, k, v, mask.dense(7, 11)[0, 0], sinks, 5**-0.5)
    torch.testing.assert_close(w, exp, atol=1e-12, rtol=1e-10)
    assert bool((w.sum(-1) < 1).all())


def test_sinks_need_a_backend_that_returns_the_lse_and_a_well_formed_tensor():
    q, k, v, sinks = _inputs(torch.float32, Dv=5)  # D == Dv: SDPA's fused kernel applies
    assert attnkit.dispatch(q, k, v).backend == "sdpa"
    assert attnkit.dispatch(q, k, v, sinks=sinks).backend != "sdpa"
    with pytest.raises(UnsupportedError, match="'sdpa' cannot apply sinks"):
        attnkit.attention(q, k, v, sinks=sinks, backend="sdpa")
    for bad, error, match in (
        (torch.zeros(3), ValueError, r"sinks must have shape \(Hq,\) = \(4,\).*got \(3,\)"),
        (torch.zeros(1, 4), ValueError, r"got \(1, 4\)"),
        (torch.zeros(4, dtype=torch.long), TypeError, "floating-point"),
        ([0.0] * 4, TypeError, "sinks must be a torch.Tensor"),
    ):
        with pytest.raises(error, match=match):
            attnkit.attention(q, k, v, sinks=bad)
        with pytest.raises(error, match=match):
            attnkit.attention_weights(q, k, v, sinks=bad)


@pytest.mark.parametrize("window", [None, 4])
def test_multihead_attention_with_sinks_matches_transformers_gpt_oss(window):
    """Projections, rotary positions, GQA and learned sinks; causal and banded layers."""
    E, H, Hkv, D, B, L, theta = 64, 4, 2, 16, 2, 13, 10000.0
    hf = hf_attention(
        "gpt_oss",
        hidden_size=E,
        num_attention_heads=H,
        num_key_value_heads=Hkv,
        head_dim=D,
        attention_bias=True,
    )
    mask = masks.causal() if window is None else masks.sliding_window(window - 1)
    ours = MultiHeadAttention(
        E, H, num_kv_heads=Hkv, mask=mask, rope=RotaryEmbedding(D, theta), sinks=True
    ).eval()
    load_hf_attention(ours, hf)
    x = torch.randn(B, L, E, generator=torch.Generator().manual_seed(1))
    angles = torch.arange(L, dtype=torch.float32)[:, None] * RotaryEmbedding(D, theta).inv_freq
    cos, sin = angles.cos().expand(B, L, D // 2), angles.sin().expand(B, L, D // 2)
    additive = torch.zeros(L, L).masked_fill(~mask.dense(L, L)[0, 0], float("-inf"))
    exp_out, exp_w = hf(x, (cos, sin), additive.expand(B, 1, L, L))
    out, w = ours(x, need_weights=True)
    torch.testing.assert_close(out, exp_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(w, exp_w, atol=1e-6, rtol=1e-5)
    out.square().sum().backward()
    assert ours.sinks.grad is not None
    assert bool((ours.sinks.grad != 0).all())


def test_sinks_decode_with_a_windowed_cache_as_in_one_pass():
    """The sink is not a key: a windowed KVCache decodes a sinks model exactly."""
    E, H, W, L = 32, 4, 3, 12
    a = MultiHeadAttention(
        E, H, num_kv_heads=2, mask=masks.sliding_window(W), rope=RotaryEmbedding(8), sinks=True
    ).eval()
    with torch.no_grad():
        assert a.sinks is not None
        a.sinks.normal_(0, 2, generator=torch.Generator().manual_seed(0))
    x = torch.randn(1, L, E, generator=torch.Generator().manual_seed(2))
    full, _ = a(x)
    cache = KVCache(1, 2, max_len=2 * W, head_dim=8, window=W)
    steps = [a(x[:, t : t + 1], cache=cache)[0] for t in range(L)]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)
    plain = MultiHeadAttention(E, H, num_kv_heads=2, mask=masks.sliding_window(W)).eval()
    assert "sinks=True" in repr(a)
    assert "sinks=False" in repr(plain)
    with pytest.raises(ValueError, match="sinks"):
        MultiHeadAttention(E, H, sinks=True).to_torch()
