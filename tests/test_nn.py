"""MultiHeadAttention against torch.nn.MultiheadAttention; GQA; KV-cache decoding; RoPE."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attnkit import masks
from attnkit.nn import KVCache, MultiHeadAttention, RotaryEmbedding
from conftest import per_head_predicate


@pytest.mark.parametrize("cross", [False, True])
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_from_torch_matches(cross, batch_first, bias):
    E, H, B, Lq, Lk = 48, 6, 3, 7, 11
    kdim, vdim = (24, 20) if cross else (None, None)
    m = torch.nn.MultiheadAttention(E, H, bias=bias, kdim=kdim, vdim=vdim, batch_first=batch_first)
    a = MultiHeadAttention.from_torch(m)
    x = torch.randn(B, Lq, E)
    key = torch.randn(B, Lk, kdim) if cross else x
    value = torch.randn(B, Lk, vdim) if cross else x
    Lkv = key.shape[1]
    kpm = torch.zeros(B, Lkv, dtype=torch.bool)
    kpm[1, Lkv - 3 :] = True
    attn_mask = torch.rand(Lq, Lkv) < 0.3  # torch: True = masked out
    attn_mask[:, 0] = False
    tr = (lambda t: t) if batch_first else (lambda t: t.transpose(0, 1))
    exp_out, exp_w = m(
        tr(x),
        tr(key),
        tr(value),
        key_padding_mask=kpm,
        attn_mask=attn_mask,
        average_attn_weights=False,
    )
    out, w = a(
        tr(x),
        None if not cross else tr(key),
        None if not cross else tr(value),
        key_padding_mask=kpm,
        mask=~attn_mask,
        need_weights=True,
    )
    torch.testing.assert_close(out, exp_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(w, exp_w, atol=1e-5, rtol=1e-5)


def test_per_head_custom_mask_with_a_tensor_mask_matches_torch():
    """A module mask that varies per head and batch, combined with a bool tensor given at the
    call (the mixed path materialises both): torch's per-(batch·head) 3-D attn_mask agrees."""
    E, H, B, L = 32, 4, 2, 9
    m = torch.nn.MultiheadAttention(E, H, batch_first=True)

    def predicate(b, h, q, kv):  # varies per batch and head; key 0 keeps every row non-empty
        return per_head_predicate(b, h, q, kv) | (kv == 0)

    a = MultiHeadAttention.from_torch(m)
    a.mask = masks.custom(predicate)
    x = torch.randn(B, L, E)
    extra = torch.rand(L, L) < 0.8
    extra[:, 0] = True
    b, h, i, j = (torch.arange(n).view(*[-1 if d == ax else 1 for d in range(4)])
                  for ax, n in enumerate((B, H, L, L)))  # fmt: skip
    allowed = (predicate(b, h, i, j) & extra).expand(B, H, L, L)
    out, w = a(x, mask=extra, need_weights=True)
    exp_out, exp_w = m(x, x, x, attn_mask=~allowed.reshape(B * H, L, L), average_attn_weights=False)
    torch.testing.assert_close(out, exp_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(w, exp_w, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"bias": False}, {"batch_first": False}, {"kdim": 16, "vdim": 12, "bias": False}],
    ids=["packed in_proj", "no bias", "sequence first", "kdim/vdim"],
)
def test_to_torch_round_trip(kwargs):
    a = MultiHeadAttention(32, 4, **kwargs)
    m = a.to_torch()
    batch_first = kwargs.get("batch_first", True)

    def seq(L, width):
        return torch.randn(2, L, width) if batch_first else torch.randn(L, 2, width)

    x, k, v = seq(5, 32), seq(6, kwargs.get("kdim", 32)), seq(6, kwargs.get("vdim", 32))
    torch.testing.assert_close(a(x, k, v)[0], m(x, k, v, need_weights=False)[0])


def test_to_torch_refuses_grouped_heads():
    with pytest.raises(ValueError, match="grouped-query"):
        MultiHeadAttention(32, 4, num_kv_heads=2).to_torch()
    with pytest.raises(ValueError, match="grouped-query"):
        MultiHeadAttention(32, 4, num_kv_heads=2).to_torch()


def test_gqa_equals_mha_with_repeated_heads():
    E, H, Hkv = 64, 8, 2
    g = MultiHeadAttention(E, H, num_kv_heads=Hkv)
    m = MultiHeadAttention(E, H)
    hd = E // H
    with torch.no_grad():
        m.q_proj.load_state_dict(g.q_proj.state_dict())
        m.out_proj.load_state_dict(g.out_proj.state_dict())
        for src, dst in ((g.k_proj, m.k_proj), (g.v_proj, m.v_proj)):
            w = src.weight.view(Hkv, hd, E).repeat_interleave(H // Hkv, dim=0).reshape(E, E)
            dst.weight.copy_(w)
            dst.bias.copy_(src.bias.view(Hkv, hd).repeat_interleave(H // Hkv, dim=0).reshape(E))
    x = torch.randn(2, 9, E)
    torch.testing.assert_close(g(x, mask=masks.causal())[0], m(x, mask=masks.causal())[0])


@pytest.mark.parametrize("cross", [False, True])
def test_heads_are_the_vectors_forward_attends_with(cross):
    """softmax(q·kᵀ·scale) over ``heads``' vectors (kv heads repeated) is forward's weights,
    and Σ weight·v through W0 its output: projections, QK/V-norms, RoPE at a position."""
    E, H, Hkv, d = 32, 4, 2, 8
    torch.manual_seed(0)
    kv_dims = {"kdim": 24, "vdim": 20} if cross else {}
    m = MultiHeadAttention(
        E, H, num_kv_heads=Hkv, rope=RotaryEmbedding(d), qk_norm=True, v_norm=True, scale=0.4,
        mask=None if cross else masks.causal(), batch_first=False, **kv_dims,
    ).double()  # fmt: skip
    x = torch.randn(7, 2, E, dtype=torch.float64)  # (L, B, E): forward's layout here
    memory = (
        torch.randn(11, 2, 24, dtype=torch.float64),
        torch.randn(11, 2, 20, dtype=torch.float64),
    )
    args = (x, *memory) if cross else (x,)
    out, weights = m(*args, need_weights=True)
    q, k, v = m.heads(*(t.transpose(0, 1) for t in args))  # heads takes (B, L, ·)
    assert (q.shape, k.shape, v.shape) == ((2, H, 7, d), (2, Hkv, 11 if cross else 7, d), k.shape)
    kr, vr = (t.repeat_interleave(H // Hkv, dim=1) for t in (k, v))
    scores = q @ kr.transpose(-1, -2) * 0.4
    if not cross:
        scores = scores.masked_fill(~masks.causal().dense(7, 7), float("-inf"))
    torch.testing.assert_close(scores.softmax(-1), weights, rtol=0, atol=1e-12)
    heads = (weights @ vr).transpose(1, 2).reshape(2, 7, H * d)
    torch.testing.assert_close(m.out_proj(heads).transpose(0, 1), out, rtol=0, atol=1e-12)
    if not cross:  # RoPE from position 5 (a cache's): other vectors, the same relative scores
        q5, k5, _ = m.heads(x.transpose(0, 1), position=5)
        assert not torch.allclose(q5, q)
        torch.testing.assert_close(
            q5[:, ::2] @ k5.transpose(-1, -2), q[:, ::2] @ k.transpose(-1, -2)
        )


@pytest.mark.parametrize("num_kv_heads", [4, 2, 1])
@pytest.mark.parametrize("use_rope", [False, True])
def test_kv_cache_decoding_equals_full_causal_pass(num_kv_heads, use_rope):
    E, H, B, L = 32, 4, 2, 12
    rope = RotaryEmbedding(E // H) if use_rope else None
    a = MultiHeadAttention(E, H, num_kv_heads=num_kv_heads, mask=masks.causal(), rope=rope).eval()
    x = torch.randn(B, L, E)
    full, _ = a(x)
    cache = KVCache(B, num_kv_heads, L, E // H)
    steps = [a(x[:, :5], cache=cache)[0]]  # a prompt of 5, then one token at a time
    steps += [a(x[:, t : t + 1], cache=cache)[0] for t in range(5, L)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)
    assert cache.length == L


@pytest.mark.parametrize("window", [None, 4])
def test_a_reset_cache_decodes_a_new_text_as_a_fresh_one(window):
    """``KVCache.reset`` forgets every position, windowed or not: a second text decoded in
    it gives what a new cache gives (with RoPE, whose positions restart at 0)."""
    E, H, L = 32, 4, 10
    mask = masks.causal() if window is None else masks.sliding_window(window)
    a = MultiHeadAttention(E, H, num_kv_heads=2, mask=mask, rope=RotaryEmbedding(E // H)).eval()
    first, second = torch.randn(2, L, E), torch.randn(2, L, E)

    def decode(x, cache):
        return torch.cat([a(x[:, t : t + 1], cache=cache)[0] for t in range(L)], dim=1)

    cache = KVCache(2, 2, L if window is None else window + 2, E // H, window=window)
    decode(first, cache)
    cache.reset()
    assert (cache.length, cache.position) == (0, 0)
    fresh = KVCache(2, 2, L if window is None else window + 2, E // H, window=window)
    torch.testing.assert_close(decode(second, cache), decode(second, fresh), rtol=0, atol=0)
    assert repr(cache) == repr(fresh)


def test_cross_attention_cache_reuses_encoder_keys():
    a = MultiHeadAttention(32, 4, kdim=24, vdim=24).eval()
    memory = torch.randn(2, 10, 24)
    x = torch.randn(2, 3, 32)
    cache = KVCache(2, 4, 10, 8)
    first, _ = a(x[:, :1], memory, cache=cache)
    assert cache.length == 10
    later, _ = a(x[:, 1:], torch.zeros(2, 10, 24), cache=cache)  # key ignored: cache is filled
    full, _ = a(x, memory)
    torch.testing.assert_close(torch.cat([first, later], dim=1), full, atol=1e-6, rtol=1e-6)


def test_a_cache_holding_given_keys_serves_cross_attention_without_a_copy():
    """``key_value_heads`` gives what a filled cross cache holds; ``KVCache.holding`` wraps
    them, uncopied, and cross-attention over it is cross-attention over the memory."""
    a = MultiHeadAttention(32, 4, num_kv_heads=2, kdim=24, vdim=20, qk_norm=True).eval()
    memory, values_in = torch.randn(2, 10, 24), torch.randn(2, 10, 20)
    x = torch.randn(2, 3, 32)
    k, v = a.key_value_heads(memory, values_in)
    filled = KVCache(2, 2, 10, 8)
    a(x, memory, values_in, cache=filled)
    torch.testing.assert_close((k, v), (filled.keys, filled.values))
    held = KVCache.holding(k, v)
    assert (held.length, held.position, held.start) == (10, 10, 0)
    assert held.keys.data_ptr() == k.data_ptr()
    assert held.values.data_ptr() == v.data_ptr()
    out, _ = a(x, memory, values_in, cache=held)
    torch.testing.assert_close(out, a(x, memory, values_in)[0])
    with pytest.raises(ValueError, match=r"KVCache.holding takes keys \(B, Hkv, L, D\)"):
        KVCache.holding(k, v[:, :, :9])
    with pytest.raises(ValueError, match=r"key must be \(B, Lk, kdim=24\)"):
        a.key_value_heads(values_in)


def test_rope_scores_depend_only_on_relative_position():
    rope = RotaryEmbedding(16)
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)

    def score(m, n):
        return (rope(q, offset=m) * rope(k, offset=n)).sum().item()

    assert score(3, 1) == pytest.approx(score(10, 8), abs=1e-4)
    assert score(0, 0) == pytest.approx((q * k).sum().item(), abs=1e-5)
    assert score(3, 1) != pytest.approx(score(3, 2), abs=1e-3)
    # norms are preserved
    torch.testing.assert_close(rope(q, offset=7).norm(), q.norm())


@pytest.mark.parametrize(("rotary_dim", "factor"), [(None, 1.0), (10, 1.3)])
def test_rope_is_rotate_half_and_rotate_qk_shares_its_angles(rotary_dim, factor):
    """Bit for bit Llama's x·cos + rotate_half(x)·sin, in float32 angles (transformers'); q
    and k through ``rotate_qk`` (the angles computed once) as through ``forward`` each."""
    rope = RotaryEmbedding(16, rotary_dim=rotary_dim, attention_factor=factor)
    R = rope.rotary_dim
    q, k = torch.randn(2, 4, 5, 16), torch.randn(2, 2, 5, 16)
    angles = torch.arange(7, 12).float()[:, None] * rope.inv_freq[None, :]
    cos = torch.cat([angles.cos(), angles.cos()], dim=-1) * factor
    sin = torch.cat([angles.sin(), angles.sin()], dim=-1) * factor

    def llama(x):
        x, rest = x[..., :R], x[..., R:]
        rotate_half = torch.cat([-x[..., R // 2 :], x[..., : R // 2]], dim=-1)
        return torch.cat([x * cos + rotate_half * sin, rest], dim=-1)

    assert torch.equal(rope(q, offset=7), llama(q))
    rq, rk = rope.rotate_qk(q, k, offset=7)
    assert torch.equal(rq, llama(q))
    assert torch.equal(rk, llama(k))
    with pytest.raises(ValueError, match="same positions"):
        rope.rotate_qk(q, k[:, :, :4])
    with pytest.raises(ValueError, match="k has head dim 8"):
        rope.rotate_qk(q, k[..., :8])


def test_module_mask_and_backend_and_dropout():
    a = MultiHeadAttention(16, 2, mask=masks.sliding_window(2), dropout=0.5, backend="reference")
    x = torch.randn(1, 6, 16)
    _, w = a.eval()(x, need_weights=True)
    assert bool((w[0, :, 5, :3] == 0).all())
    assert bool((w[0, :, 5, 3:] > 0).all())
    a.train()
    y1, _ = a(x)
    assert y1.shape == (1, 6, 16)


# ---- windowed KV cache (sliding-window decoding in bounded memory) ----------------------


@settings(max_examples=60)
@given(
    window=st.integers(0, 6),
    extra=st.integers(1, 6),
    ops=st.lists(st.one_of(st.integers(1, 5), st.just(-1)), min_size=1, max_size=30),
)
def test_windowed_cache_holds_the_window_before_every_append(window, extra, ops):
    """Keys are always the ordered run start..position-1, with the window kept at each append.

    Each key's value is its position, so a dropped, duplicated or misplaced key shows.
    ops: n > 0 appends n positions; -1 crops one position where the cache allows it.
    """
    max_len = window + extra
    cache = KVCache(1, 1, max_len, 1, window=window)
    for n in ops:
        before = cache.position
        if n == -1:
            if cache.position > 0 and (cache.start == 0 or cache.length > window):
                cache.crop(cache.position - 1)
            continue
        if min(cache.length, window) + n > max_len:
            with pytest.raises(ValueError, match="cannot take"):
                cache.append(torch.zeros(1, 1, n, 1), torch.zeros(1, 1, n, 1))
            continue
        new = torch.arange(before, before + n, dtype=torch.float32).view(1, 1, n, 1)
        keys, values = cache.append(new, -new)
        held = torch.arange(cache.start, cache.position, dtype=torch.float32)
        assert torch.equal(keys.flatten(), held)
        assert torch.equal(values.flatten(), -held)
        assert cache.position == before + n
        assert cache.start <= max(0, before - window)  # every key the new queries can see


def test_windowed_cache_copies_rarely_and_crop_keeps_the_window():
    cache = KVCache(1, 1, 8, 1, window=3)
    buffer = cache._k.data_ptr()
    for t in range(20):
        cache.append(torch.full((1, 1, 1, 1), float(t)), torch.zeros(1, 1, 1, 1))
    assert cache._k.data_ptr() == buffer  # compacted in place, never reallocated
    assert (cache.position, cache.length) == (20, 4)
    assert torch.equal(cache.keys.flatten(), torch.tensor([16.0, 17, 18, 19]))
    cache.crop(19)
    with pytest.raises(ValueError, match=r"can crop to 19 \.\. 19"):
        cache.crop(18)  # would leave 2 keys before position 18, and the window needs 3
    assert torch.equal(cache.keys.flatten(), torch.tensor([16.0, 17, 18]))
    drafts = torch.arange(19.0, 23.0).view(1, 1, 4, 1)  # a verifier's drafts, in one call
    cache.append(drafts, torch.zeros_like(drafts))
    cache.crop(20)  # keep one draft, reject three
    assert torch.equal(cache.keys.flatten(), torch.tensor([16.0, 17, 18, 19]))
    for bad, match in ((3, "must exceed window"), (-1, "window must be an int")):
        with pytest.raises(ValueError, match=match):
            KVCache(1, 1, 3, 1, window=bad)


@pytest.mark.parametrize("positions", ["rope", "alibi"])
@pytest.mark.parametrize("num_kv_heads", [4, 1])
def test_windowed_cache_decoding_equals_full_sliding_window_pass(positions, num_kv_heads):
    """Prompt longer than the window, then steps of 1–3 tokens across several compactions."""
    from attnkit import score_mods

    E, H, B, L, W = 32, 4, 2, 41, 5
    a = MultiHeadAttention(
        E,
        H,
        num_kv_heads=num_kv_heads,
        mask=masks.sliding_window(W),
        rope=RotaryEmbedding(E // H) if positions == "rope" else None,
        score_mod=score_mods.alibi(score_mods.alibi_slopes(H)) if positions == "alibi" else None,
    ).eval()
    x = torch.randn(B, L, E)
    full, _ = a(x)
    cache = KVCache(B, num_kv_heads, 9, E // H, window=W)
    steps, t = [a(x[:, :8], cache=cache)[0]], 8
    for n in [1, 2, 1, 3, 1, 1, 2] * 5:
        if t + n > L:
            break
        steps.append(a(x[:, t : t + n], cache=cache)[0])
        t += n
    assert t > 3 * cache.max_len
    assert cache.start > 0
    torch.testing.assert_close(torch.cat(steps, dim=1), full[:, :t], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["multi-head", "latent", "differential"])
@pytest.mark.parametrize("window", [None, 3])
def test_gradients_flow_through_cached_decoding_as_through_the_full_pass(kind, window):
    """Decoding steps of a model being trained: the outputs and the gradients of the input and
    of every parameter equal the full pass's (float64), across a windowed cache's moves too."""
    from attnkit.nn import DifferentialAttention, MultiHeadLatentAttention

    torch.manual_seed(0)
    mask = masks.causal() if window is None else masks.sliding_window(window)
    E, H, B, L = 16, 4, 2, 11
    module = {
        "multi-head": lambda: MultiHeadAttention(E, H, num_kv_heads=2, mask=mask),
        "latent": lambda: MultiHeadLatentAttention(
            E, H, kv_rank=8, nope_dim=4, rope_dim=2, v_dim=4, mask=mask
        ),
        "differential": lambda: DifferentialAttention(E, H, num_kv_heads=2, mask=mask),
    }[kind]().double()
    x = torch.randn(B, L, E, dtype=torch.float64, requires_grad=True)
    dout = torch.randn(B, L, E, dtype=torch.float64)
    leaves = [x, *module.parameters()]
    full, _ = module(x)
    expected = torch.autograd.grad(full, leaves, dout)

    cache = module.new_cache(B, L if window is None else window + 2, window=window)
    steps = [module(x[:, :4], cache=cache)[0]]
    steps += [module(x[:, t : t + 1], cache=cache)[0] for t in range(4, L)]
    decoded = torch.cat(steps, 1)
    torch.testing.assert_close(decoded, full, rtol=1e-9, atol=1e-9)
    got = torch.autograd.grad(decoded, leaves, dout)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize(
    ("mask", "reason"),
    [
        (masks.causal(), "looks back without bound"),
        (None, "no mask limits"),
        (masks.sliding_window(4), "looks back 4 positions"),
        (masks.sliding_window(3) & masks.global_tokens([0]), "more than relative positions"),
        (masks.custom(lambda b, h, q, kv: q >= kv), "more than relative positions"),
    ],
)
def test_windowed_cache_refuses_masks_it_would_change(mask, reason):
    a = MultiHeadAttention(16, 2, mask=mask).eval()
    cache = KVCache(1, 2, 8, 8, window=3)
    with pytest.raises(ValueError, match=f"window=3.*{reason}"):
        a(torch.randn(1, 2, 16), cache=cache)
    assert cache.position == 0  # refused before anything was appended
    ok = MultiHeadAttention(16, 2, mask=masks.sliding_window(2) & masks.causal()).eval()
    ok(torch.randn(1, 2, 16), cache=cache, mask=torch.ones(2, 2, dtype=torch.bool))
    assert cache.position == 2


@settings(max_examples=25)
@given(
    window=st.integers(0, 5),
    chunks=st.lists(st.integers(1, 4), min_size=1, max_size=12),
    room=st.integers(0, 3),
    num_kv_heads=st.sampled_from([1, 2, 4]),
    seed=st.integers(0, 100),
)
def test_windowed_cache_decoding_property(window, chunks, room, num_kv_heads, seed):
    """Any window, any chunking, a buffer just large enough or a little larger, GQA: the
    chunks' outputs equal one pass under sliding_window(window)."""
    torch.manual_seed(seed)
    E, H = 16, 4
    a = MultiHeadAttention(
        E, H, num_kv_heads=num_kv_heads, mask=masks.sliding_window(window),
        rope=RotaryEmbedding(E // H),
    ).eval()  # fmt: skip
    L = sum(chunks)
    x = torch.randn(1, L, E)
    full, _ = a(x)
    cache = KVCache(1, num_kv_heads, window + max(chunks) + room, E // H, window=window)
    outs, t = [], 0
    for n in chunks:
        outs.append(a(x[:, t : t + n], cache=cache)[0])
        t += n
    torch.testing.assert_close(torch.cat(outs, dim=1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("num_kv_heads", [4, 2])
def test_qk_norm_matches_transformers_qwen3_attention(num_kv_heads):
    """Per-head RMSNorm of q and k before RoPE, as Qwen3; and decoding normalises each key."""
    from conftest import hf_attention, load_hf_attention

    E, H, D, B, L = 64, 4, 16, 2, 11
    hf = hf_attention(
        "qwen3", hidden_size=E, num_attention_heads=H, num_key_value_heads=num_kv_heads, head_dim=D
    )
    rope = RotaryEmbedding(D)
    ours = MultiHeadAttention(
        E, H, num_kv_heads=num_kv_heads, bias=False, mask=masks.causal(), rope=rope, qk_norm=True
    ).eval()
    load_hf_attention(ours, hf)
    x = torch.randn(B, L, E, generator=torch.Generator().manual_seed(4))
    angles = torch.arange(L, dtype=torch.float32)[:, None] * rope.inv_freq
    cos, sin = (torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1))
    additive = torch.zeros(L, L).masked_fill(~masks.causal().dense(L, L)[0, 0], float("-inf"))
    exp_out, exp_w = hf(x, (cos.expand(B, L, D), sin.expand(B, L, D)), additive.expand(B, 1, L, L))
    out, w = ours(x, need_weights=True)
    torch.testing.assert_close(out, exp_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(w, exp_w, atol=1e-6, rtol=1e-5)
    cache = KVCache(B, num_kv_heads, L, D)
    steps = [ours(x[:, t : t + 1], cache=cache)[0] for t in range(L)]
    torch.testing.assert_close(torch.cat(steps, 1), exp_out, atol=1e-5, rtol=1e-5)
    assert "qk_norm=True" in repr(ours)


def test_output_gate_scales_each_head_channel_by_a_sigmoid_of_the_query():
    """A gate of zero weights halves what W0 sees (σ(0) = 1/2); its own weights get gradients;
    cross-attention gates from the queries, not the keys."""
    E, H, B = 32, 4, 2
    gated = MultiHeadAttention(E, H, num_kv_heads=2, output_gate=True)
    plain = MultiHeadAttention(E, H, num_kv_heads=2)
    plain.load_state_dict({k: v for k, v in gated.state_dict().items() if "gate" not in k})
    with torch.no_grad():
        gated.gate_proj.weight.zero_()
        gated.gate_proj.bias.zero_()
    x, memory = torch.randn(B, 5, E), torch.randn(B, 7, E)
    for key in (None, memory):
        b = gated.out_proj.bias
        torch.testing.assert_close(gated(x, key)[0] - b, (plain(x, key)[0] - b) / 2)
    with torch.no_grad():
        gated.gate_proj.weight.normal_()
    out, _ = gated(x, memory)
    out.square().sum().backward()
    assert gated.gate_proj.weight.grad.abs().sum() > 0
    assert "output_gate=True" in repr(gated)
    with pytest.raises(ValueError, match="output_gate"):
        MultiHeadAttention(E, H, output_gate=True).to_torch()


ROPE_SCALINGS = {  # name -> (our constructor, transformers' rope_parameters), head_dim 32
    "proportional (Gemma 4)": (
        lambda: RotaryEmbedding.from_parameters(
            32, {"rope_type": "proportional", "rope_theta": 10000.0, "factor": 1.0}
        ),
        {"rope_type": "proportional", "rope_theta": 10000.0, "factor": 1.0},
    ),
    "linear": (
        lambda: RotaryEmbedding.linear(32, factor=4.0, base=10000.0),
        {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
    ),
    "llama3": (
        lambda: RotaryEmbedding.llama3(32, 8.0, 1.0, 4.0, original_max_len=8192, base=500000.0),
        {
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    ),
    "yarn": (
        lambda: RotaryEmbedding.yarn(32, 4.0, original_max_len=2048, base=10000.0),
        {
            "rope_type": "yarn",
            "rope_theta": 10000.0,
            "factor": 4.0,
            "original_max_position_embeddings": 2048,
        },
    ),
    "yarn, DeepSeek's mscale": (
        lambda: RotaryEmbedding.yarn(
            32, 40.0, original_max_len=4096, mscale=0.707, mscale_all_dim=0.707, beta_fast=32
        ),
        {
            "rope_type": "yarn",
            "rope_theta": 10000.0,
            "factor": 40.0,
            "original_max_position_embeddings": 4096,
            "mscale": 0.707,
            "mscale_all_dim": 0.707,
            "beta_fast": 32,
            "beta_slow": 1,
        },
    ),
    "yarn, the config's attention factor": (
        lambda: RotaryEmbedding.yarn(32, 8.0, original_max_len=1024, attention_factor=1.5),
        {
            "rope_type": "yarn",
            "rope_theta": 10000.0,
            "factor": 8.0,
            "original_max_position_embeddings": 1024,
            "attention_factor": 1.5,
        },
    ),
    "yarn, factor from the context": (  # max_position_embeddings / original: 8192 / 1024
        lambda: RotaryEmbedding.yarn(32, 8.0, original_max_len=1024),
        {
            "rope_type": "yarn",
            "rope_theta": 10000.0,
            "factor": None,
            "original_max_position_embeddings": 1024,
        },
    ),
    "yarn, mscale 1 vs all-dim 0.5": (
        lambda: RotaryEmbedding.yarn(
            32, 16.0, original_max_len=1024, mscale=1.0, mscale_all_dim=0.5, truncate=False
        ),
        {
            "rope_type": "yarn",
            "rope_theta": 10000.0,
            "factor": 16.0,
            "original_max_position_embeddings": 1024,
            "mscale": 1.0,
            "mscale_all_dim": 0.5,
            "truncate": False,
        },
    ),
}


@pytest.mark.parametrize("partial", [1.0, 0.5, 0.25])
@pytest.mark.parametrize("name", list(ROPE_SCALINGS))
def test_rope_scalings_match_transformers(name, partial):
    """Frequencies and attention factor as transformers' ROPE_INIT_FUNCTIONS compute them,
    and the rotation applies both as its rotary embedding does (cos, sin times the factor),
    full or partial (the first int(32 · partial) channels rotated, the rest passed)."""
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    ours_fn, params = ROPE_SCALINGS[name]
    params = {**params, "partial_rotary_factor": partial}
    original = params.get("original_max_position_embeddings", 2048)
    max_len = int(original * (params["factor"] or 8))  # (factor None: the context gives it)
    config = transformers.LlamaConfig(  # the context the factor reaches, so no warning
        hidden_size=64,
        num_attention_heads=2,
        max_position_embeddings=max_len,
        rope_parameters=params,
    )
    inv_freq, factor = ROPE_INIT_FUNCTIONS[params["rope_type"]](config, "cpu")
    rope = ours_fn() if partial == 1 else RotaryEmbedding.from_parameters(32, params, max_len)
    R = int(32 * partial) if params["rope_type"] != "proportional" else 32
    assert rope.rotary_dim == R
    torch.testing.assert_close(rope.inv_freq, inv_freq.float(), rtol=1e-6, atol=0)
    assert rope.attention_factor == pytest.approx(factor, rel=1e-12)
    x = torch.randn(1, 2, 7, 32, dtype=torch.float64)
    positions = torch.tensor([0, 1, 5, 100, 2048, 9000, 30000])
    # float32 angles from our (float64-derived) frequencies: transformers' float32-derived ones
    # differ in the last bit, which position 30000 turns into 1e-3 rad
    angles = positions.float()[:, None] * rope.inv_freq[None]
    cos, sin = (torch.cat([f(angles)] * 2, -1).double() * factor for f in (torch.cos, torch.sin))
    part = x[..., :R]
    rotated = torch.cat([-part[..., R // 2 :], part[..., : R // 2]], -1)
    expected = torch.cat([part * cos + rotated * sin, x[..., R:]], -1)
    torch.testing.assert_close(rope(x, positions=positions), expected, rtol=1e-6, atol=1e-6)


def test_rope_scalings_refuse_bad_arguments():
    with pytest.raises(ValueError, match="factor must be >= 1"):
        RotaryEmbedding.linear(32, factor=0.5)
    with pytest.raises(ValueError, match="low_freq_factor < high_freq_factor"):
        RotaryEmbedding.llama3(32, low_freq_factor=4.0, high_freq_factor=1.0)
    with pytest.raises(ValueError, match=r"inv_freq must have shape \(rotary_dim / 2,\) = \(16,\)"):
        RotaryEmbedding(32, inv_freq=torch.ones(8))
    assert "attention_factor" in repr(RotaryEmbedding.yarn(32, 4.0, original_max_len=512))
