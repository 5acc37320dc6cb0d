"""Packed variable-length sequences against attention on each sequence alone."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import attnkit
from attnkit import masks
from attnkit.backends import cpu_kernel, tiled
from attnkit.functional import _request, dispatch
from attnkit.varlen import query_tile_rows, tile_visits, varlen_mask
from conftest import assert_close_scaled

# (queries, keys) per sequence: prefill, a chunk after cached keys, one decoding query, a
# sequence with no query this call, and one whose keys are all new
LENGTHS = [(5, 5), (3, 9), (1, 6), (0, 4), (7, 7)]


def cu_seqlens(lengths):
    """cu_seqlens_q and cu_seqlens_k of sequences with these (queries, keys) counts."""
    lengths = list(lengths)
    return tuple(
        torch.tensor([0, *torch.tensor([pair[i] for pair in lengths]).cumsum(0).tolist()])
        for i in (0, 1)
    )


def packed(lengths, Hq=4, Hkv=2, D=8, Dv=6, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    total_q, total_k = sum(a for a, _ in lengths), sum(b for _, b in lengths)
    q = torch.randn(total_q, Hq, D, generator=g, dtype=dtype, requires_grad=True)
    k = torch.randn(total_k, Hkv, D, generator=g, dtype=dtype, requires_grad=True)
    v = torch.randn(total_k, Hkv, Dv, generator=g, dtype=dtype, requires_grad=True)
    return q, k, v, *cu_seqlens(lengths)


def one_by_one(q, k, v, cu_q, cu_k, mask):
    """Each sequence alone through the reference backend: out (total_q, Hq, Dv), lse."""
    outs, lses = [], []
    for i in range(cu_q.numel() - 1):
        qs, ks, vs = q[cu_q[i] : cu_q[i + 1]], k[cu_k[i] : cu_k[i + 1]], v[cu_k[i] : cu_k[i + 1]]
        if qs.shape[0] == 0:
            continue
        o, lse = attnkit.attention(
            *(t.transpose(0, 1)[None] for t in (qs, ks, vs)),
            mask=mask,
            backend="reference",
            return_lse=True,
        )
        outs.append(o[0].transpose(0, 1))
        lses.append(lse[0])
    return torch.cat(outs), torch.cat(lses, dim=-1)


CASES = {
    "none": ({}, None),
    "causal": ({"causal": True}, masks.causal()),
    "window (2, 1)": ({"window": (2, 1)}, masks.sliding_window(2, 1)),
    "causal window 2": ({"causal": True, "window": (2, 3)}, masks.sliding_window(2)),
}


@pytest.mark.parametrize("backend", ["reference", "tiled", "auto"])
@pytest.mark.parametrize("case", list(CASES))
def test_varlen_equals_each_sequence_alone_forward_and_backward(backend, case):
    kwargs, mask = CASES[case]
    q, k, v, cu_q, cu_k = packed(LENGTHS)
    out, lse = attnkit.varlen_attention(
        q, k, v, cu_q, cu_k, backend=backend, return_lse=True, **kwargs
    )
    exp_out, exp_lse = one_by_one(q, k, v, cu_q, cu_k, mask)
    assert out.shape == (q.shape[0], 4, 6)
    assert lse.shape == (4, q.shape[0])
    torch.testing.assert_close(out, exp_out)
    torch.testing.assert_close(lse, exp_lse)
    seed = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(1))
    got = torch.autograd.grad((out * seed).sum(), (q, k, v))
    exp = torch.autograd.grad((exp_out * seed).sum(), (q, k, v))
    for name, a, b in zip("qkv", got, exp, strict=True):
        torch.testing.assert_close(a, b, msg=name)


@settings(max_examples=40)
@given(
    lengths=st.lists(
        st.tuples(st.integers(0, 9), st.integers(0, 9)), min_size=1, max_size=5
    ).filter(lambda ls: sum(a for a, _ in ls) > 0 and sum(b for _, b in ls) > 0),
    case=st.sampled_from(list(CASES)),
)
def test_varlen_mask_is_each_sequences_mask_on_the_diagonal(lengths, case):
    """The packed mask holds each sequence's own mask (aligned bottom-right by its own
    lengths) in its diagonal block, and nothing else: offsets that differ, sequences with
    more queries than keys, empty ones."""
    kwargs, mask = CASES[case]
    cu_q, cu_k = cu_seqlens(lengths)
    expected = torch.zeros(int(cu_q[-1]), int(cu_k[-1]), dtype=torch.bool)
    for i, (a, b) in enumerate(lengths):
        if a and b:
            own = (mask or masks.full()).dense(a, b)[0, 0]
            expected[cu_q[i] : cu_q[i + 1], cu_k[i] : cu_k[i + 1]] = own
    got = varlen_mask(cu_q, cu_k, **kwargs).dense(int(cu_q[-1]), int(cu_k[-1]))[0, 0]
    assert torch.equal(got, expected)


def test_varlen_cu_seqlens_k_defaults_to_q():
    q, k, v, _, _ = packed([(4, 4), (6, 6)])
    cu = torch.tensor([0, 4, 10])
    out = attnkit.varlen_attention(q, k, v, cu, causal=True)
    torch.testing.assert_close(out, one_by_one(q, k, v, cu, cu, masks.causal())[0])


def test_varlen_refuses_bad_offsets_and_layouts():
    q, k, v, cu_q, cu_k = packed(LENGTHS)
    for bad, match in (
        (torch.tensor([1, 5, 16]), "must rise from 0"),
        (torch.tensor([0, 9, 5, 16]), "must rise from 0"),
        (torch.tensor([0, 5]), "must rise from 0 to the packed length 16"),
        (torch.tensor([[0, 16]]), "1-D tensor"),
    ):
        with pytest.raises(ValueError, match=match):
            attnkit.varlen_attention(q, k, v, bad, cu_k)
    with pytest.raises(TypeError, match="integers"):
        attnkit.varlen_attention(q, k, v, cu_q.double(), cu_k)
    with pytest.raises(ValueError, match="describe 5 and 1 sequences"):
        attnkit.varlen_attention(q, k, v, cu_q, torch.tensor([0, k.shape[0]]))
    for window in ((2,), 3, (2, -3)):
        with pytest.raises(ValueError, match="window"):
            attnkit.varlen_attention(q, k, v, cu_q, cu_k, window=window)
    with pytest.raises(ValueError, match=r"q must be \(total, H, D\)"):
        attnkit.varlen_attention(q[None], k, v, cu_q, cu_k)


@settings(max_examples=30)
@given(
    lengths=st.lists(
        st.tuples(st.integers(0, 6), st.integers(0, 6)).map(lambda t: (min(t), max(t))),
        min_size=1,
        max_size=5,
    ).filter(lambda ls: sum(a for a, _ in ls) > 0 and sum(b for _, b in ls) > 0),
    case=st.sampled_from(list(CASES)),
    groups=st.integers(1, 3),
)
def test_any_packing_equals_each_sequence_alone(lengths, case, groups):
    kwargs, mask = CASES[case]
    q, k, v, cu_q, cu_k = packed(lengths, Hq=2 * groups, Hkv=2)
    with torch.no_grad():
        out = attnkit.varlen_attention(q, k, v, cu_q, cu_k, backend="tiled", **kwargs)
        torch.testing.assert_close(out, one_by_one(q, k, v, cu_q, cu_k, mask)[0])


def packed_offsets(lengths):
    """The offsets key - query of the sequences with queries, in packed positions."""
    ends_q = torch.tensor([a for a, _ in lengths]).cumsum(0)
    ends_k = torch.tensor([b for _, b in lengths]).cumsum(0)
    return {int(k - q) for (a, _), q, k in zip(lengths, ends_q, ends_k, strict=True) if a}


@settings(max_examples=40)
@given(
    lengths=st.lists(st.tuples(st.integers(0, 12), st.integers(0, 12)), min_size=2, max_size=6)
    .filter(lambda ls: sum(a for a, _ in ls) > 0 and sum(b for _, b in ls) > 0)
    .filter(lambda ls: len(packed_offsets(ls)) > 1),  # offsets differ: the per-query rule
    window=st.sampled_from([(-1, 0), (2, 0), (3, 1), (0, -1), (1, 2)]),
    block_q=st.integers(1, 5),
    block_k=st.integers(1, 5),
)
def test_varlen_window_tiles_agree_with_its_predicate(lengths, window, block_q, block_k):
    """Every tile's kind (empty / partial / full) as the predicate's pairs say, including
    sequences with more queries than keys (aligned positions that step back)."""
    cu_q, cu_k = cu_seqlens(lengths)
    mask = varlen_mask(cu_q, cu_k, window=window)
    Lq, Lk = int(cu_q[-1]), int(cu_k[-1])
    dense = mask.dense(Lq, Lk)[0, 0]
    pad_q, pad_k = -Lq % block_q, -Lk % block_k
    attended = torch.nn.functional.pad(dense.int(), (0, pad_k, 0, pad_q))
    inside = torch.nn.functional.pad(torch.ones(Lq, Lk, dtype=torch.int), (0, pad_k, 0, pad_q))
    per_tile = [
        x.view(x.shape[0] // block_q, block_q, x.shape[1] // block_k, block_k).sum((1, 3))
        for x in (attended, inside)
    ]
    expected = torch.where(per_tile[0] == 0, 0, torch.where(per_tile[0] == per_tile[1], 2, 1))
    assert torch.equal(mask.blocks(Lq, Lk, block_q, block_k).kinds[0, 0].long(), expected)


def _request_of(cu_q, cu_k, dtype=torch.float32, **kwargs):
    q = torch.zeros(1, 1, int(cu_q[-1]), 8, dtype=dtype)
    k = torch.zeros(1, 1, int(cu_k[-1]), 8, dtype=dtype)
    return _request(q, k, k, varlen_mask(cu_q, cu_k, **kwargs), None, None, 0.0, None, False)


@pytest.mark.parametrize(
    ("queries", "keys", "rows", "runs"),
    [
        ([1] * 32, [300 + 64 * i for i in range(32)], 1, 1),  # a decoding batch: a row each
        ([4] * 32, [300 + 64 * i for i in range(32)], 4, 4),
        ([16] * 32, [300 + 64 * i for i in range(32)], 16, 16),
        ([256] * 6, [256 * (i + 1) for i in range(6)], 64, 64),  # chunked prefill: the default
        ([5000], [5000], 64, 128),  # one long sequence: every height visits alike; wide rows
        ([4], [5000], 64, 16),  # 4 queries: tiled's default for them, 16 rows
    ],
)
def test_query_tiles_follow_the_sequences(queries, keys, rows, runs):
    """tiled runs the height ``query_tile_rows`` models cheapest where it is shorter than its
    default (else its own rule, 128 rows for wide rows), on the kernels' key ranges."""
    cu_q, cu_k = cu_seqlens(zip(queries, keys, strict=True))
    assert query_tile_rows(cu_q, cu_k, causal=True) == rows
    req = _request_of(cu_q, cu_k, causal=True)
    cfg = tiled.tuned_config(req)
    assert cfg.block_q == runs
    assert isinstance(tiled.kernel_tiles(req, cfg), cpu_kernel.KeyRanges)


def test_varlen_tiles_cost_visits_times_rows():
    # two sequences of 3 queries over 1 and 2 kv tiles; a tile straddling both visits 3
    cu_q, cu_k = cu_seqlens([(3, 64), (3, 128)])
    assert [tile_visits(cu_q, cu_k, b) for b in (1, 2, 4, 8, 16)] == [9, 6, 5, 3, 3]
    # costs 9·7, 6·8, 5·10, then 3·12 from 8 rows (a tile holds the 6 rows there are): the
    # tallest of those
    assert query_tile_rows(cu_q, cu_k) == 64
    cu_q, cu_k = cu_seqlens([(3, 64), (3, 128)] * 4)  # 24 rows: 4-row tiles, 18 visits
    assert query_tile_rows(cu_q, cu_k) == 4  # 18·10 = 180; 8 rows 15·14, 2 rows 24·8
    # causal prefill of 128 tokens: the first 64-row tile sees one kv tile, not two
    cu = cu_seqlens([(128, 128)])
    assert (tile_visits(*cu, 64), tile_visits(*cu, 64, causal=True)) == (4, 3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_auto_runs_decoding_batches_on_tiled_without_a_tile_map(dtype):
    """A decoding batch (one query per sequence) goes to tiled at any size: its kernels read
    the key ranges, so the per-step tile map that sent small batches to SDPA is gone."""
    for lengths in ([(1, 6), (1, 300)], [(1, 2048)] * 16):
        req = _request_of(*cu_seqlens(lengths), dtype=dtype, causal=True)
        assert dispatch(req.q, req.k, req.v, mask=req.mask).backend == "tiled"
        assert not tiled.builds_tile_map(req)


@pytest.mark.parametrize("case", ["causal", "causal window 2", "none"])
def test_short_sequences_on_the_cpu_kernels_in_float32(case):
    """Many short sequences (1-row to 8-row tiles) through the compiled kernels: output and
    every gradient within 2x the float32 reference's own error of float64."""
    kwargs, mask = CASES[case]
    g = torch.Generator().manual_seed(3)
    queries = torch.randint(1, 6, (40,), generator=g).tolist()
    cached = torch.randint(60, 200, (40,), generator=g).tolist()  # a kv tile or more each
    lengths = [(a, a + c) for a, c in zip(queries, cached, strict=True)]
    q, k, v, cu_q, cu_k = packed(lengths, Hq=4, Hkv=2, D=16, Dv=16)
    assert query_tile_rows(cu_q, cu_k) < 16
    seed = torch.randn(q.shape[0], 4, 16, dtype=torch.float64, generator=g)

    def run(dtype, backend):
        leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
        if backend == "one by one":
            out = one_by_one(*leaves, cu_q, cu_k, mask)[0]
        else:
            out = attnkit.varlen_attention(*leaves, cu_q, cu_k, backend=backend, **kwargs)
        return out, *torch.autograd.grad((out * seed.to(dtype)).sum(), leaves)

    exact = run(torch.float64, "one by one")
    fast, low = run(torch.float32, "tiled"), run(torch.float32, "one by one")
    for name, a, b, c in zip(("out", "dq", "dk", "dv"), fast, exact, low, strict=True):
        assert_close_scaled(a, b, c, what=name)
