"""The SDPA backend equals the reference wherever it applies, and refuses what it cannot do."""

from __future__ import annotations

import contextlib
import math

import pytest
import torch

import attnkit
from attnkit import masks
from attnkit.backends import sdpa
from conftest import rand_qkv


def as_on_cpu(monkeypatch, cpu: str) -> None:
    """Dispatch as on an "AVX2" CPU, an "AVX512" one without AMX, or one with "AMX"."""
    monkeypatch.setattr(attnkit.functional, "_fast_sdpa_bf16", lambda: cpu == "AMX")
    monkeypatch.setattr(attnkit.functional, "_fast_sdpa_fp16_forward", lambda: cpu != "AVX2")


@pytest.fixture(autouse=True)
def _as_on_avx2(monkeypatch):
    """Dispatch as on an AVX2 CPU unless a test says otherwise (the 16-bit rules differ)."""
    as_on_cpu(monkeypatch, "AVX2")


MASKS = {
    "none": None,
    "causal": masks.causal(),
    "causal_tl": masks.causal(align="top_left"),
    "window": masks.sliding_window(5, 3),
    "padding": masks.key_padding([3, 19]),
    "bool": torch.rand(19, 19) > 0.3,
}


@pytest.mark.parametrize("mask_name", list(MASKS))
@pytest.mark.parametrize(
    ("Hq", "Hkv", "Lq", "Lk"), [(4, 4, 19, 19), (4, 2, 11, 19), (6, 1, 19, 19)]
)
def test_sdpa_equals_reference(mask_name, Hq, Hkv, Lq, Lk):
    mask = MASKS[mask_name]
    if isinstance(mask, torch.Tensor):
        mask = mask[:Lq, :Lk]
    q, k, v = rand_qkv(2, Hq, Hkv, Lq, Lk, 16, dtype=torch.float64, requires_grad=True)
    ref = attnkit.attention(q, k, v, mask=mask, backend="reference")
    grads_ref = torch.autograd.grad(ref.sum(), (q, k, v))
    out = attnkit.attention(q, k, v, mask=mask, backend="sdpa")
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    torch.testing.assert_close(out, ref)
    for g, gr in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(g, gr)


def test_sdpa_fully_masked_rows_zero_with_finite_grads():
    q, k, v = rand_qkv(1, 2, 2, 5, 5, 8, requires_grad=True)
    allowed = torch.ones(5, 5, dtype=torch.bool)
    allowed[1] = False
    out = attnkit.attention(q, k, v, mask=allowed, backend="sdpa")
    assert torch.equal(out[:, :, 1], torch.zeros_like(out[:, :, 1]))
    out.sum().backward()
    assert all(bool(torch.isfinite(t.grad).all()) for t in (q, k, v))


@pytest.mark.parametrize(
    ("kwargs", "why"),
    [
        ({"return_lse": True}, "log-sum-exp"),
        ({"score_mod": attnkit.score_mods.softcap(5.0)}, "score_mod"),
        ({"dropout_p": 0.1}, "dropout"),
    ],
)
def test_sdpa_refuses_with_reason(kwargs, why):
    q, k, v = rand_qkv(1, 2, 2, 4, 4, 8)
    with pytest.raises(attnkit.UnsupportedError, match=why):
        attnkit.attention(q, k, v, backend="sdpa", **kwargs)
    # auto routes around it and says why
    decision = attnkit.dispatch(
        q, k, v, **{kk: vv for kk, vv in kwargs.items() if kk != "generator"}
    )
    assert decision.backend != "sdpa"
    assert why in decision.reason


def test_dispatch_prefers_sdpa_when_expressible():
    q, k, v = rand_qkv(1, 2, 2, 4, 4, 8)
    assert attnkit.dispatch(q, k, v, mask=masks.causal()).backend == "sdpa"
    assert set(attnkit.backends()) >= {"reference", "sdpa"}


@pytest.mark.parametrize("cpu", ["AVX2", "AVX512", "AMX"])
def test_dispatch_causal_on_cpu_by_size_and_dtype(monkeypatch, cpu):
    """Causal goes to tiled from TILED_CAUSAL_MIN_PAIRS pairs in float32 and, unless SDPA runs
    it on AMX, bfloat16; in float16 at any size, except without gradients where torch runs
    at AVX-512; never in float64."""
    from attnkit.functional import TILED_CAUSAL_MIN_PAIRS

    as_on_cpu(monkeypatch, cpu)
    causal = masks.causal()
    side = math.isqrt(TILED_CAUSAL_MIN_PAIRS // 4 - 1) + 1  # smallest L with 4·L² >= it
    fp16 = "tiled" if cpu == "AVX2" else "sdpa"
    for L, dtype, expected in (
        (side, torch.float32, "tiled"),
        (side, torch.bfloat16, "sdpa" if cpu == "AMX" else "tiled"),
        (side * 4, torch.bfloat16, "sdpa" if cpu == "AMX" else "tiled"),
        (side - 1, torch.float32, "sdpa"),
        (side - 1, torch.bfloat16, "sdpa"),
        (side, torch.float64, "sdpa"),
        (side - 1, torch.float16, fp16),
        (2, torch.float16, fp16),
    ):
        q, k, v = rand_qkv(2, 2, 1, L, L, 8, dtype=dtype)
        assert attnkit.dispatch(q, k, v, mask=causal).backend == expected, (L, dtype)
    q, k, v = rand_qkv(2, 2, 1, 8, 8, 8, dtype=torch.float16, requires_grad=True)
    for mask in (causal, None):  # float16 training: tiled, AMX or not
        assert attnkit.dispatch(q, k, v, mask=mask).backend == "tiled"
    q, k, v = rand_qkv(2, 2, 1, side, side + 5, 8)  # bottom-right, Lq != Lk: a general mask
    assert attnkit.dispatch(q, k, v, mask=causal).backend == "tiled"


@contextlib.contextmanager
def sdpa_attn_masks():
    """The ``attn_mask`` of every torch SDPA call made inside the block."""
    seen = []
    real = torch.nn.functional.scaled_dot_product_attention
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(
            torch.nn.functional,
            "scaled_dot_product_attention",
            lambda *a, **kw: seen.append(kw.get("attn_mask")) or real(*a, **kw),
        )
        yield seen


def test_decoding_under_causal_is_unmasked_attention():
    """One query under bottom-right causal sees every key (KV-cache decoding): auto applies the
    no-mask rules, and the sdpa backend runs SDPA without a mask (its masked kernel is slower),
    as it does for any mask that hides nothing; results match the reference."""
    causal = masks.causal()
    q, k, v = rand_qkv(1, 4, 2, 1, 300, 16, dtype=torch.float64)
    for dtype, expected in ((torch.float32, "sdpa"), (torch.float16, "tiled")):
        args = [t.to(dtype) for t in (q, k, v)]
        decision = attnkit.dispatch(*args, mask=causal)
        assert decision.backend == expected, dtype
        assert "no mask" in decision.reason or "float16" in decision.reason
    q2 = torch.cat([q, q], dim=2)  # two queries: the first cannot see the last key
    assert attnkit.dispatch(*(t.float() for t in (q2, k, v)), mask=causal).backend == "tiled"
    with sdpa_attn_masks() as seen:
        for mask in (causal, masks.sliding_window(400), masks.sliding_window(8)):
            got = attnkit.attention(q, k, v, mask=mask, backend="sdpa")
            want = attnkit.attention(q, k, v, mask=mask, backend="reference")
            torch.testing.assert_close(got, want)
    assert [m is None for m in seen] == [True, True, False]  # nothing hidden: no mask passed


@pytest.mark.parametrize(
    ("mask", "Lq", "sees_all"),
    [
        (masks.full(), 5, True),
        (masks.causal(), 1, True),
        (masks.causal(align="top_left"), 1, False),  # query 0 sees key 0 only
        (masks.sliding_window(299), 1, True),  # a cache holding just the window: 299 + itself
        (masks.sliding_window(298), 1, False),
        (masks.sliding_window(-1, 2), 1, True),
        (masks.sliding_window(400), 2, False),  # the first query cannot see the last key
        (masks.dilated(300, 1, causal=True), 1, False),  # not recognised: computed as a mask
    ],
)
def test_masks_that_hide_no_key_dispatch_as_no_mask(mask, Lq, sees_all):
    """Decided from the spec and checked against the mask itself; auto then follows the
    no-mask rule (SDPA's unmasked kernel)."""
    assert sdpa.attends_every_key(mask, Lq, 300) is sees_all
    if sees_all:
        assert bool(mask.dense(Lq, 300).all())
    q, k, v = rand_qkv(1, 2, 2, Lq, 300, 16)
    decision = attnkit.dispatch(q, k, v, mask=mask)
    assert (decision.backend == "sdpa" and "no mask" in decision.reason) is sees_all


@pytest.mark.parametrize("cpu", ["AVX2", "AVX512", "AMX"])
def test_dispatch_bfloat16_training_by_cpu(monkeypatch, cpu):
    """bfloat16 with gradients: tiled at any size on a CPU without AMX (SDPA's bf16 backward
    is slow there); with AMX for short sequences, up to AMX_BF16_TILED_TRAINING_PAIRS per head
    without a mask and AMX_BF16_TILED_CAUSAL_TRAINING_PAIRS under causal; SDPA for inference,
    and for float32 calls below TILED_CAUSAL_MIN_PAIRS."""
    from attnkit.functional import (
        AMX_BF16_TILED_CAUSAL_TRAINING_PAIRS,
        AMX_BF16_TILED_TRAINING_PAIRS,
    )

    as_on_cpu(monkeypatch, cpu)
    amx = cpu == "AMX"

    def picks(Lq: int, Lk: int, mask: masks.Mask | None, **kw) -> str:
        q, k, v = rand_qkv(1, 2, 2, Lq, Lk, 8, dtype=torch.bfloat16, **kw)
        return attnkit.dispatch(q, k, v, mask=mask).backend

    for pairs, mask in (
        (AMX_BF16_TILED_TRAINING_PAIRS, None),
        (AMX_BF16_TILED_CAUSAL_TRAINING_PAIRS, masks.causal()),
    ):
        side = math.isqrt(pairs)
        shapes = ((64, 64, True), (side, side, True), (side + 1, side + 1, False))
        if mask is None:  # Lq != Lk: pairs per head count
            shapes += ((side // 2, side * 2, True), (side, side + 1, False))
        for Lq, Lk, short in shapes:
            want = "tiled" if short or not amx else "sdpa"
            assert picks(Lq, Lk, mask, requires_grad=True) == want, (Lq, Lk, mask)
            with torch.no_grad():
                assert picks(Lq, Lk, None, requires_grad=True) == "sdpa"
    q, k, v = rand_qkv(1, 2, 2, 64, 64, 8, requires_grad=True)
    assert attnkit.dispatch(q, k, v).backend == "sdpa"
    assert attnkit.dispatch(q, k, v, mask=masks.causal()).backend == "sdpa"


def test_dispatch_bfloat16_inference_under_masks_on_amx(monkeypatch):
    """With AMX, bfloat16 inference goes to SDPA where tiled would compute most of the pairs
    (AMX_BF16_SDPA_FROM_FRACTION); sparser masks, float32 and training stay on tiled."""
    N = 512
    q, k, v = rand_qkv(1, 2, 2, N, N, 8, dtype=torch.bfloat16)
    padding = masks.key_padding([N - 7])
    kept_most = (padding, padding.dense(N, N)[0, 0], masks.causal(align="top_left") | padding)
    documents = masks.document(torch.arange(N) * 4 // N) & masks.causal()
    sparser = (masks.sliding_window(N // 4), masks.prefix_lm(N // 2), documents)
    for amx in (False, True):
        as_on_cpu(monkeypatch, "AMX" if amx else "AVX512")
        for mask in kept_most:
            assert attnkit.dispatch(q, k, v, mask=mask).backend == ("sdpa" if amx else "tiled")
            assert attnkit.dispatch(q.float(), k.float(), v.float(), mask=mask).backend == "tiled"
        for mask in sparser:
            assert attnkit.dispatch(q, k, v, mask=mask).backend == "tiled"
    q.requires_grad_()
    assert attnkit.dispatch(q, k, v, mask=padding).backend == "tiled"


def test_dispatch_rule_on_cpu(monkeypatch):
    monkeypatch.setattr(attnkit.functional, "PARTIAL_TILE_COST", 1.9)  # the AVX2 measurement's
    q, k, v = rand_qkv(1, 2, 2, 4096, 4096, 8)
    assert attnkit.dispatch(q, k, v).backend == "sdpa"
    assert attnkit.dispatch(q.half(), k.half(), v.half()).backend == "tiled"
    assert attnkit.dispatch(q.double(), k.double(), v.double()).backend == "sdpa"
    assert attnkit.dispatch(q, k, v, mask=masks.causal()).backend == "tiled"
    assert attnkit.dispatch(q, k, v, mask=masks.causal(align="top_left")).backend == "tiled"
    for mask in (masks.sliding_window(256), ~masks.sliding_window(256), masks.key_padding([9])):
        assert attnkit.dispatch(q, k, v, mask=mask).backend == "tiled"
    # bool tensors by their tiles' modelled cost: empty tiles free, partial ones dear
    window = masks.sliding_window(256).dense(4096, 4096)
    sparse = attnkit.dispatch(q, k, v, mask=window)
    assert sparse.backend == "tiled"
    assert "bool tensor, 5% of the pairs in full tiles, 3% in partial ones" in sparse.reason
    assert attnkit.dispatch(q, k, v, mask=~window).backend == "tiled"  # mostly full tiles
    unstructured = torch.rand(4096, 4096, generator=torch.Generator().manual_seed(0)) < 0.9
    assert attnkit.dispatch(q, k, v, mask=unstructured).backend == "sdpa"  # all partial
    with monkeypatch.context() as avx512:  # partial tiles as cheap as full ones: tiled
        avx512.setattr(attnkit.functional, "PARTIAL_TILE_COST", 0.75)
        assert attnkit.dispatch(q, k, v, mask=unstructured).backend == "tiled"
    # a cost of 0.7 · 0.6 + 1.9 · 0.3 = 0.99 runs tiled, 0.7 · 0.5 + 1.9 · 0.35 = 1.015 SDPA
    for n_full, n_partial, expected in ((60, 30, "tiled"), (50, 35, "sdpa")):
        rows = torch.zeros(100, 6400, dtype=torch.bool)  # 100 query tiles of 64 x 6400 keys
        rows[:n_full] = True
        rows[n_full : n_full + n_partial, ::2] = True
        mask = rows.repeat_interleave(64, 0)
        qq, kk, vv = rand_qkv(1, 1, 1, 6400, 6400, 8)
        assert attnkit.dispatch(qq, kk, vv, mask=mask).backend == expected, (n_full, n_partial)
    assert attnkit.dispatch(q, k, v, return_lse=True).backend == "tiled"


def test_dispatch_few_queries_under_masks_that_share_no_tile_maps():
    """Decoding under a custom predicate (or a bool tensor) made anew each step: tiled would
    build its tile map every call; up to FEW_QUERIES queries go to SDPA, more to tiled. A
    ragged batch's padding & causal is made anew too, but the compiled kernels take its kept
    keys beside the band, no tile map: tiled at any length (SDPA where they cannot serve it,
    float64). Masks with a plain spec share tile maps and stay on tiled."""
    from attnkit.functional import FEW_QUERIES

    valid = torch.ones(2, 300, dtype=torch.bool)
    valid[1, :40] = False
    padded = masks.causal() & masks.from_padding_mask(valid)
    custom = masks.custom(lambda b, h, q, kv: kv % 3 != 0)
    assert not padded.shares_tiles
    assert not custom.shares_tiles
    assert masks.sliding_window(8).shares_tiles
    for Lq, expected in ((1, "sdpa"), (FEW_QUERIES, "sdpa"), (FEW_QUERIES + 1, "tiled")):
        q, k, v = rand_qkv(2, 2, 2, Lq, 300, 16)
        assert attnkit.dispatch(q, k, v, mask=custom).backend == expected, Lq
        assert attnkit.dispatch(q, k, v, mask=padded).backend == "tiled", Lq
    q, k, v = rand_qkv(2, 2, 2, 1, 300, 16, dtype=torch.float16)  # no fast fp16 SDPA on CPU
    assert attnkit.dispatch(q, k, v, mask=custom).backend == "tiled"
    q, k, v = rand_qkv(2, 2, 2, 1, 300, 16, dtype=torch.float64)
    assert attnkit.dispatch(q, k, v, mask=padded).backend == "sdpa"  # tiled's loops: a tile map
    for mask in (padded, custom):  # and the result is the same
        got = attnkit.attention(q, k, v, mask=mask)
        torch.testing.assert_close(got, attnkit.attention(q, k, v, mask=mask, backend="reference"))
    q, k, v = rand_qkv(1, 2, 2, 1, 300, 16)
    assert attnkit.dispatch(q, k, v, mask=masks.sliding_window(8)).backend == "tiled"
    for Lq, expected in ((2, "sdpa"), (FEW_QUERIES, "sdpa"), (FEW_QUERIES + 1, "tiled")):
        q, k, v = rand_qkv(1, 2, 2, Lq, 300, 16)  # a bool tensor is made anew each call too
        window = masks.sliding_window(8).dense(Lq, 300)
        assert attnkit.dispatch(q, k, v, mask=window).backend == expected, Lq
    # but one query's tensor is the keys it keeps, which the kernels read without a tile map
    q, k, v = rand_qkv(1, 2, 2, 1, 300, 16)
    assert attnkit.dispatch(q, k, v, mask=masks.sliding_window(8).dense(1, 300)).backend == "tiled"


def test_small_bool_tensors_that_hide_nothing_run_sdpa_without_a_mask():
    """A decoding step's mask over a windowed cache is all True: auto sends the few queries
    to SDPA, which runs its unmasked kernel; a mask hiding one key is passed on (one query's
    mask is the keys it keeps: tiled's kernels read it, no tile map)."""
    from attnkit.functional import FEW_QUERIES

    with sdpa_attn_masks() as seen:
        for Lq in (1, 2, FEW_QUERIES):
            q, k, v = rand_qkv(2, 4, 2, Lq, 300, 16)
            everything = torch.ones(2, 1, Lq, 300, dtype=torch.bool)
            hides_one = everything.clone()
            hides_one[1, 0, -1, 7] = False
            for mask, expected in (
                (everything, "sdpa"),
                (hides_one, "tiled" if Lq == 1 else "sdpa"),
            ):
                assert attnkit.dispatch(q, k, v, mask=mask).backend == expected, Lq
                got = attnkit.attention(q, k, v, mask=mask)
                want = attnkit.attention(q, k, v, mask=mask, backend="reference")
                torch.testing.assert_close(got, want)
    assert [m is None for m in seen] == [True, True, False, True, False]  # nothing hidden: none


@pytest.mark.parametrize(("Hq", "Hkv", "Lq"), [(8, 2, 1), (8, 1, 1), (12, 3, 1), (8, 2, 3)])
def test_unmasked_grouped_heads_folded_into_rows_equal_reference(Hq, Hkv, Lq):
    """Without a mask one query of G heads that share a kv head runs as G rows of one head:
    q laid out (B, L, H, D) and transposed, as MultiHeadAttention makes it, values of another
    width. (Lq = 3 is not folded: the same answer by enable_gqa.)"""
    B, Lk, D, Dv = 2, 23, 16, 8
    q = torch.randn(B, Lq, Hq, D, dtype=torch.float64).transpose(1, 2).requires_grad_()
    k = torch.randn(B, Hkv, Lk, D, dtype=torch.float64, requires_grad=True)
    v = torch.randn(B, Hkv, Lk, Dv, dtype=torch.float64, requires_grad=True)
    seed = torch.randn(B, Hq, Lq, Dv, dtype=torch.float64)
    results = []
    for backend in ("sdpa", "reference"):
        out = attnkit.attention(q, k, v, backend=backend)
        results.append((out, *torch.autograd.grad((out * seed).sum(), (q, k, v))))
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("layout", ["per batch row", "per head", "2-D"])
def test_one_query_of_grouped_heads_under_a_mask_equals_reference(layout):
    """A ragged batch's padding mask (the same for every head) folds the G heads into rows;
    a mask that varies per head does not; rows with no key stay zero either way."""
    B, Hq, Hkv, Lk = 3, 8, 2, 13
    q, k, v = rand_qkv(B, Hq, Hkv, 1, Lk, 16, dtype=torch.float64, requires_grad=True)
    if layout == "per batch row":
        allowed = torch.ones(B, 1, 1, Lk, dtype=torch.bool)
        allowed[1, ..., :5] = False
        allowed[2] = False  # no key at all
    elif layout == "per head":
        allowed = torch.rand(B, Hq, 1, Lk, generator=torch.Generator().manual_seed(0)) < 0.5
    else:
        allowed = torch.arange(Lk)[None] % 3 != 0  # (Lq, Lk)
    results = []
    for backend in ("sdpa", "reference"):
        out = attnkit.attention(q, k, v, mask=allowed, backend=backend)
        results.append((out, *torch.autograd.grad(out.square().sum(), (q, k, v))))
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want)


def test_dispatch_sends_different_key_and_value_widths_to_tiled_on_cpu():
    q, k = rand_qkv(1, 4, 4, 64, 64, 24)[:2]
    v = torch.randn(1, 4, 64, 16)
    decision = attnkit.dispatch(q, k, v)
    assert decision.backend == "tiled"
    assert "head dims differ" in decision.reason
    assert attnkit.dispatch(q, k, torch.randn(1, 4, 64, 24)).backend == "sdpa"
