"""Score mods against their formulas."""

from __future__ import annotations

import pytest
import torch

import attnkit
from attnkit import score_mods
from conftest import naive_attention, rand_qkv


def test_alibi_slopes_standard():
    torch.testing.assert_close(score_mods.alibi_slopes(8), 2.0 ** (-torch.arange(1, 9.0)))
    s6 = score_mods.alibi_slopes(6)  # 4 from H=4, then every other of H=8
    expected = [2**-2, 2**-4, 2**-6, 2**-8, 2**-1, 2**-3]
    torch.testing.assert_close(s6, torch.tensor(expected))


@pytest.mark.parametrize(("Lq", "Lk"), [(7, 7), (5, 11)])
def test_alibi_bottom_right_formula(Lq, Lk):
    q, k, v = rand_qkv(1, 4, 4, Lq, Lk, 8, dtype=torch.float64)
    slopes = score_mods.alibi_slopes(4).double()
    i = torch.arange(Lq).view(-1, 1)
    j = torch.arange(Lk).view(1, -1)
    bias = -slopes.view(1, 4, 1, 1) * (i + (Lk - Lq) - j).abs()
    out = attnkit.attention(q, k, v, score_mod=score_mods.alibi(slopes), backend="reference")
    torch.testing.assert_close(out, naive_attention(q, k, v, bias=bias)[0])


@pytest.mark.parametrize("offset", [0, -4, 9, 30])
def test_alibi_offset_places_the_queries_among_the_keys(offset):
    """alibi(slopes, offset=o): query i sits at key i + o, whatever Lq and Lk are."""
    Lq, Lk = 5, 11
    q, k, v = rand_qkv(1, 4, 4, Lq, Lk, 8, dtype=torch.float64)
    slopes = score_mods.alibi_slopes(4).double()
    i, j = torch.arange(Lq).view(-1, 1), torch.arange(Lk).view(1, -1)
    bias = -slopes.view(1, 4, 1, 1) * (i + offset - j).abs()
    mod = score_mods.alibi(slopes, offset=offset)
    assert repr(mod) == f"alibi(H=4, offset={offset})"
    for backend in ("reference", "tiled"):  # (the compiled kernels': tests/test_tiled.py)
        out = attnkit.attention(q, k, v, score_mod=mod, backend=backend)
        torch.testing.assert_close(out, naive_attention(q, k, v, bias=bias)[0], msg=backend)


def test_kernel_mods_read_back_as_the_score_mod_they_came_from():
    """``KernelMods.score_mod()`` rebuilds what ``kernel_mods`` read (ring blocks and Ulysses'
    head cuts rebuild ALiBi from it)."""
    slopes = score_mods.alibi_slopes(4)
    for mod in (
        score_mods.alibi(slopes),
        score_mods.alibi(slopes, offset=-7),
        score_mods.softcap(3.0),
        score_mods.compose(score_mods.alibi(slopes, offset=5), score_mods.softcap(3.0)),
    ):
        found = score_mods.kernel_mods(mod)
        assert found is not None
        again = found.score_mod()
        assert repr(again) == repr(mod)
        assert score_mods.kernel_mods(again) == found
    assert score_mods.kernel_mods(None) == score_mods.KernelMods()
    assert score_mods.KernelMods().score_mod() is None
    assert score_mods.KernelMods(alibi_offset=3).offset_for(5, 11) == 3
    assert score_mods.KernelMods().offset_for(5, 11) == 6


def test_softcap_and_compose():
    q, k, v = rand_qkv(1, 2, 2, 6, 6, 8, dtype=torch.float64)
    q = q * 10
    scores = torch.einsum("bhid,bhjd->bhij", q, k) / 8**0.5
    capped = 3.0 * torch.tanh(scores / 3.0)
    out = attnkit.attention(q, k, v, score_mod=score_mods.softcap(3.0), backend="reference")
    torch.testing.assert_close(out, naive_attention(q, k, v, bias=capped - scores)[0])
    slopes = torch.tensor([0.5, 0.25], dtype=torch.float64)
    i, j = torch.arange(6).view(-1, 1), torch.arange(6).view(1, -1)
    both = 3.0 * torch.tanh((scores - slopes.view(1, 2, 1, 1) * (i - j).abs()) / 3.0)
    mod = score_mods.compose(score_mods.alibi(slopes), score_mods.softcap(3.0))
    out2 = attnkit.attention(q, k, v, score_mod=mod, backend="reference")
    torch.testing.assert_close(out2, naive_attention(q, k, v, bias=both - scores)[0])
    assert "alibi" in repr(mod)
    assert "softcap(3)" in repr(mod)
    # called directly, a ScoreMod applies itself as to square scores (no alignment offset)
    b, h = torch.zeros(1, 1, 1, 1, dtype=torch.long), torch.arange(2).view(1, 2, 1, 1)
    torch.testing.assert_close(mod(scores, b, h, i, j), both)


def test_relative_bias_plain_and_t5():
    table = torch.randn(2, 7, dtype=torch.float64)
    q, k, v = rand_qkv(1, 2, 2, 5, 9, 8, dtype=torch.float64)
    rel = torch.arange(9).view(1, -1) - (torch.arange(5).view(-1, 1) + 4)
    bias = table[:, (rel.clamp(-3, 3) + 3)].unsqueeze(0)
    out = attnkit.attention(q, k, v, score_mod=score_mods.relative_bias(table), backend="reference")
    torch.testing.assert_close(out, naive_attention(q, k, v, bias=bias)[0])
    # T5 buckets: small distances exact, far ones share the last bucket
    rel = torch.tensor([-200, -3, -1, 0, 1, 3, 200])
    b = score_mods.t5_bucket(rel, num_buckets=32, max_distance=128, bidirectional=True)
    assert b.tolist()[1:6] == [3, 1, 0, 17, 19]
    assert b[0].item() == 15
    assert b[-1].item() == 31


@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize(("num_buckets", "max_distance"), [(32, 128), (16, 64), (8, 20)])
def test_t5_buckets_are_t5s(bidirectional, num_buckets, max_distance):
    """Every distance to ±300 lands in the bucket transformers' T5 gives it, in encoders
    (bidirectional) and decoders (keys up to the query only; once untested here)."""
    from transformers.models.t5.modeling_t5 import T5Attention

    rel = torch.arange(-300, 301)
    want = T5Attention._relative_position_bucket(
        rel, bidirectional=bidirectional, num_buckets=num_buckets, max_distance=max_distance
    )
    got = score_mods.t5_bucket(rel, num_buckets, max_distance, bidirectional)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["reference", "tiled"])
def test_a_custom_score_mod_of_another_dtype_computes_in_the_scores_dtype(backend):
    """A user's bias of another dtype (float64 on float32 scores) is cast to the scores'
    dtype, as the built-in mods cast theirs: tiled's loops once failed on it deep inside
    ("expected scalar type Float but found Double"). Its gradient reaches the bias."""
    q, k, v = rand_qkv(1, 2, 2, 6, 9, 8, dtype=torch.float32)
    bias = torch.randn(2, 6, 9, dtype=torch.float64, requires_grad=True)
    out = attnkit.attention(
        q, k, v, score_mod=lambda s, b, h, i, j: s + bias[h, i, j], backend=backend
    )
    assert out.dtype == torch.float32
    exact_bias = bias.detach().clone().requires_grad_()
    want = naive_attention(q, k, v, bias=exact_bias.unsqueeze(0))[0]
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)
    out.sum().backward()
    want.sum().backward()
    assert bias.grad is not None
    assert bias.grad.dtype == torch.float64
    torch.testing.assert_close(bias.grad, exact_bias.grad, rtol=1e-5, atol=1e-5)


def test_score_mod_validation():
    with pytest.raises(ValueError, match="cap"):
        score_mods.softcap(0)
    for offset in (1.5, True, "3"):
        with pytest.raises(TypeError, match="alibi offset must be an int or None"):
            score_mods.alibi(score_mods.alibi_slopes(2), offset=offset)
    with pytest.raises(ValueError, match="odd"):
        score_mods.relative_bias(torch.zeros(2, 6))
    q = torch.randn(1, 1, 2, 4)
    with pytest.raises(TypeError, match="score_mod"):
        attnkit.attention(q, q, q, score_mod=3)


def test_score_mods_built_for_other_head_counts_are_refused_at_the_boundary():
    """A per-head parameter that does not match q's heads is a ValueError naming both, on every
    backend (it used to be an IndexError, or a RuntimeError from inside the CPU kernel)."""
    q = torch.randn(1, 4, 6, 8)
    mods = [
        score_mods.alibi(score_mods.alibi_slopes(2)),
        score_mods.relative_bias(torch.randn(3, 5)),
        score_mods.compose(score_mods.alibi(score_mods.alibi_slopes(2)), score_mods.softcap(5.0)),
    ]
    for mod in mods:
        for backend in ("auto", "reference", "tiled"):
            with pytest.raises(ValueError, match=r"built for \d heads, but q has Hq=4"):
                attnkit.attention(q, q, q, score_mod=mod, backend=backend)
    two_heads, three_heads = mods[0], mods[1]
    with pytest.raises(ValueError, match=r"built for \[2, 3\] heads"):
        score_mods.compose(two_heads, three_heads)


@pytest.mark.parametrize(
    ("dtype", "mod"),
    [(torch.float32, "alibi"), (torch.float32, "alibi+softcap"), (torch.float64, "alibi")],
    ids=["compiled", "compiled-softcap", "pytorch"],
)
def test_one_alibi_slope_is_shared_by_every_head(dtype, mod):
    """alibi(tensor([s])) serves any number of heads (as a (1, T) bias table does); the CPU
    kernel used to refuse it."""
    q, k, v = rand_qkv(1, 4, 2, 9, 13, 8, dtype=dtype)

    def mods(slopes):
        if mod == "alibi":
            return score_mods.alibi(slopes)
        return score_mods.compose(score_mods.alibi(slopes), score_mods.softcap(4.0))

    shared = torch.tensor([0.3], dtype=dtype)
    want = attnkit.attention(q, k, v, score_mod=mods(shared.expand(4)), backend="reference")
    got = attnkit.attention(q, k, v, score_mod=mods(shared), backend="tiled")
    torch.testing.assert_close(got, want)
