"""Hypothesis properties from DESIGN §7, and gradcheck in float64."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import attnkit
from attnkit import masks, score_mods
from conftest import rand_qkv

dims = st.integers(1, 9)
MASKS = {
    "none": lambda: None,
    "causal": masks.causal,
    "window": lambda: masks.sliding_window(3, 1),
    "padding": lambda: masks.key_padding([2]),
    "document": lambda: masks.document([0, 0, 1, 1, 1, 2, 2, 3, 3]),
}


@settings(max_examples=60)
@given(Lq=dims, Lk=dims, H=st.integers(1, 3), mask=st.sampled_from(list(MASKS)))
def test_weights_rows_sum_to_one_or_zero(Lq, Lk, H, mask):
    m = MASKS[mask]()
    if mask == "document":
        m = masks.document(list(range(Lk)) if Lk != 9 else [0, 0, 1, 1, 1, 2, 2, 3, 3])
        if Lq > Lk:
            return
    q, k, v = rand_qkv(1, H, H, Lq, Lk, 4)
    w = attnkit.attention_weights(q, k, v, mask=m)
    sums = w.sum(-1)
    alive = torch.ones_like(sums, dtype=torch.bool) if m is None else m.dense(Lq, Lk).any(-1)
    torch.testing.assert_close(sums, alive.expand_as(sums).float())


@settings(max_examples=40)
@given(L=st.integers(2, 12), cut=st.integers(0, 11), seed=st.integers(0, 1000))
def test_causal_output_independent_of_future(L, cut, seed):
    cut = cut % L
    torch.manual_seed(seed)
    q, k, v = rand_qkv(1, 2, 2, L, L, 4, dtype=torch.float64)
    out = attnkit.attention(q, k, v, mask=masks.causal())
    q2, k2, v2 = q.clone(), k.clone(), v.clone()
    for t in (q2, k2, v2):
        t[:, :, cut + 1 :] = torch.randn_like(t[:, :, cut + 1 :])
    out2 = attnkit.attention(q2, k2, v2, mask=masks.causal())
    torch.testing.assert_close(out[:, :, : cut + 1], out2[:, :, : cut + 1])


@settings(max_examples=40)
@given(Lq=dims, Lk=st.integers(2, 12), split=st.integers(1, 11), masked=st.booleans())
def test_merging_halves_by_lse_equals_whole(Lq, Lk, split, masked):
    split = 1 + split % (Lk - 1)
    q, k, v = rand_qkv(1, 2, 2, Lq, Lk, 4, dtype=torch.float64)
    allowed = masks.causal().dense(Lq, Lk) if masked else torch.ones(1, 1, Lq, Lk, dtype=torch.bool)
    o, lse = attnkit.attention(q, k, v, mask=allowed, return_lse=True)
    o1, l1 = attnkit.attention(
        q, k[:, :, :split], v[:, :, :split], mask=allowed[..., :split], return_lse=True
    )
    o2, l2 = attnkit.attention(
        q, k[:, :, split:], v[:, :, split:], mask=allowed[..., split:], return_lse=True
    )
    lse_m = torch.logaddexp(l1, l2)
    w1 = torch.exp(l1 - lse_m).nan_to_num(0.0).unsqueeze(-1)
    w2 = torch.exp(l2 - lse_m).nan_to_num(0.0).unsqueeze(-1)
    torch.testing.assert_close(lse_m, lse)
    torch.testing.assert_close(w1 * o1 + w2 * o2, o)


@settings(max_examples=30)
@given(Hkv=st.integers(1, 3), groups=st.integers(1, 3), Lq=dims, Lk=dims)
def test_gqa_equals_mha_with_repeated_kv(Hkv, groups, Lq, Lk):
    q, k, v = rand_qkv(2, Hkv * groups, Hkv, Lq, Lk, 8, dtype=torch.float64)
    out = attnkit.attention(q, k, v, mask=masks.causal())
    rep = attnkit.attention(
        q, k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1), mask=masks.causal()
    )
    torch.testing.assert_close(out, rep)


def test_gradcheck_reference_with_mask_and_score_mods():
    q, k, v = rand_qkv(1, 2, 1, 5, 6, 3, dtype=torch.float64, requires_grad=True)
    table = torch.randn(2, 5, dtype=torch.float64, requires_grad=True)
    slopes = score_mods.alibi_slopes(2).double()

    def f(q, k, v, table):
        mod = score_mods.compose(
            score_mods.alibi(slopes), score_mods.relative_bias(table), score_mods.softcap(2.0)
        )
        return attnkit.attention(
            q,
            k,
            v,
            mask=masks.sliding_window(2, 1),
            score_mod=mod,
            backend="reference",
            return_lse=True,
        )

    assert torch.autograd.gradcheck(f, (q, k, v, table))


@settings(max_examples=40)
@given(
    Lq=dims,
    Lk=dims,
    groups=st.integers(1, 3),
    mask=st.sampled_from(["none", "causal", "window", "padding"]),
    seed=st.integers(0, 1000),
)
def test_sinks_output_is_its_weights_times_values_and_rows_sum_below_one(
    Lq, Lk, groups, mask, seed
):
    """Any shape, GQA, mask: tiled's output with sinks equals the sink-scaled weights times
    v, and each row's weights sum to 1 minus the sink's share (a row with no key: 0)."""
    torch.manual_seed(seed)
    m = MASKS[mask]()
    q, k, v = rand_qkv(1, 2 * groups, 2, Lq, Lk, 4, dtype=torch.float64)
    sinks = torch.randn(2 * groups, dtype=torch.float64) * 3
    out, lse = attnkit.attention(q, k, v, mask=m, sinks=sinks, backend="tiled", return_lse=True)
    w = attnkit.attention_weights(q, k, v, mask=m, sinks=sinks)
    torch.testing.assert_close(out, w @ v.repeat_interleave(groups, 1))
    sink_share = torch.exp(sinks[:, None] - lse)  # the sink's probability in each row
    torch.testing.assert_close(w.sum(-1) + sink_share, torch.ones_like(lse))
