"""Ring attention on real gloo process groups (loopback only, bounded time) vs one process."""

from __future__ import annotations

import importlib.util
import itertools
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from hypothesis import given, settings
from hypothesis import strategies as st

import attnkit
from attnkit import masks, score_mods
from attnkit.distributed import (
    hybrid_attention,
    hybrid_groups,
    merge_partials,
    ring_attention,
    shard_hybrid,
    shard_sequence,
    ulysses_attention,
    unshard_sequence,
)
from conftest import (
    TRITON_DEVICE,
    assert_close_scaled,
    gloo_rank,
    needs_triton_device,
    per_head_predicate,
    rand_qkv,
    spawn_ok,
)

# (name, L, Hq, Hkv, causal, window, layout); a name ending in "sinks" adds attention sinks,
# one starting with "documents" packs documents (DOCUMENT_LENGTHS, one list per batch row;
# "documents_shared": row 0's for every row, so blocks that share no document are skipped)
CASES = [
    ("full", 24, 2, 2, False, None, "contiguous"),
    ("full_zigzag", 24, 2, 2, False, None, "zigzag"),
    ("causal_contiguous", 24, 2, 2, True, None, "contiguous"),
    ("causal_zigzag", 32, 4, 2, True, None, "zigzag"),
    ("window", 40, 2, 1, True, 5, "zigzag"),
    ("window_sym", 24, 2, 2, False, (3, 2), "contiguous"),
    ("causal_zigzag_sinks", 32, 4, 2, True, None, "zigzag"),
    ("documents_causal_zigzag", 32, 4, 2, True, None, "zigzag"),
    ("documents_shared_full_contiguous", 24, 2, 2, False, None, "contiguous"),
    ("documents_window_zigzag", 40, 2, 1, True, 6, "zigzag"),
    ("bigbird", 32, 2, 2, False, None, "zigzag"),
    ("dilated|global_causal", 32, 4, 2, True, None, "zigzag"),
    ("per_head_contiguous", 24, 2, 2, False, None, "contiguous"),
    ("documents_block_layout", 32, 2, 1, True, None, "zigzag"),
    ("softcap_causal_zigzag", 32, 4, 2, True, None, "zigzag"),
    ("alibi_window", 40, 4, 2, True, 6, "zigzag"),
    ("positional_full_contiguous", 24, 2, 2, False, None, "contiguous"),
]
#: a Mask over the whole sequence given as ``mask=``, for the cases so named (on top of their
#: causal, window and documents)
WHOLE_MASKS = {
    "bigbird": lambda L: masks.bigbird(4, 1, 1, 1, seed=0),
    "dilated|global": lambda L: masks.dilated(2, 2) | masks.global_tokens([0, 3]),
    "per_head": lambda L: masks.custom(per_head_predicate),
    "block_layout": lambda L: masks.block_sparse(
        torch.rand(L // 4, L // 4, generator=torch.Generator().manual_seed(L)) < 0.6, 4
    ),
}


#: a score_mod over the whole sequence for the cases so named: a softcap (in the kernels), and
#: mods that read positions (called at each block's global positions)
SCORE_MODS = {
    "softcap": lambda Hq: score_mods.softcap(1.5),
    "alibi": lambda Hq: score_mods.alibi(score_mods.alibi_slopes(Hq)),
    "positional": lambda Hq: (
        lambda s, b, h, q, kv: s + 0.5 * torch.cos((q - kv).to(s.dtype)) - 0.2 * h
    ),
}
#: the cases whose score_mod the kernels do not compute (called at global positions on loops)
CALLED_AT_POSITIONS = ("positional",)


def score_mod_of(name, Hq):
    """The case's ``score_mod=`` (SCORE_MODS), or None."""
    found = [make(Hq) for key, make in SCORE_MODS.items() if key in name]
    return found[0] if found else None


def whole_mask(name, L):
    """The case's ``mask=`` (WHOLE_MASKS), or None."""
    found = [make(L) for key, make in WHOLE_MASKS.items() if key in name]
    return found[0] if found else None


#: documents of a batch row, in order: many short ones in row 0 (blocks of the ring that share
#: none are skipped), one long one in row 1; each case's length cuts the last one short
DOCUMENT_LENGTHS = ([3, 5, 1, 9, 2, 4, 40], [40])


def document_ids(L):
    """(2, L) document ids of DOCUMENT_LENGTHS' rows cut to L positions."""
    return torch.stack(
        [
            torch.repeat_interleave(torch.arange(len(n)), torch.tensor(n))[:L]
            for n in DOCUMENT_LENGTHS
        ]
    )


def global_mask(causal, window, ids=None, extra=None):
    """The one-process mask of ring_attention(causal=, window=, document_ids=, mask=extra)."""
    if window is not None:
        left, right = (window, 0 if causal else window) if isinstance(window, int) else window
        mask = masks.sliding_window(left, 0 if causal else right)
    else:
        mask = masks.causal() if causal else None
    for more in (None if ids is None else masks.document(ids), extra):
        if more is not None:
            mask = more if mask is None else mask & more
    return mask


def _reference(q, k, v, sinks, mask, weight, dtype, score_mod=None):
    """out, LSE and the gradients of q, k, v (and sinks) of one process's attention in dtype."""
    inputs = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    sinks = None if sinks is None else sinks.detach().to(dtype).requires_grad_()
    out, lse = attnkit.attention(
        *inputs,
        mask=mask,
        score_mod=score_mod,
        sinks=sinks,
        backend="reference",
        return_lse=True,
    )
    wanted = inputs if sinks is None else [*inputs, sinks]
    grads = torch.autograd.grad((out * weight.to(dtype)).sum() + lse.sum() * 0.1, wanted)
    return {
        "out": out,
        "lse": lse,
        **dict(zip(["dq", "dk", "dv", "dsinks"], grads, strict=False)),
    }


def _worker(
    rank,
    world,
    init_file,
    results_dir,
    backend="tiled",
    dtype=torch.float64,
    names=None,
    head_ranks=None,
):
    """Every case (or those ``names``) on ``backend`` in ``dtype`` vs one process's reference:
    to 1e-9 in float64, else within 4x the reference's own error in dtype (DESIGN §7).
    ``head_ranks``: hybrid_attention over a grid of world / head_ranks x head_ranks ranks."""
    assert names is None or set(names) <= {case[0] for case in CASES}, names
    with gloo_rank(rank, world, init_file, results_dir):
        groups = None if head_ranks is None else hybrid_groups(head_ranks)
        for name, L, Hq, Hkv, causal, window, layout in CASES:
            if names is not None and name not in names:
                continue
            torch.manual_seed(0)  # the same global tensors on every rank
            q, k, v = rand_qkv(2, Hq, Hkv, L, L, 8, 6, dtype=torch.float64)
            weight = torch.randn(2, Hq, L, 6, dtype=torch.float64)
            sinks = torch.randn(Hq, dtype=torch.float64) if name.endswith("sinks") else None
            ids = document_ids(L) if name.startswith("documents") else None
            if name.startswith("documents_shared"):
                ids = ids[0]
            extra = whole_mask(name, L)
            mask = global_mask(causal, window, ids, extra)
            mod = score_mod_of(name, Hq)
            want = _reference(q, k, v, sinks, mask, weight, torch.float64, mod)
            low = (
                want
                if dtype == torch.float64
                else _reference(q, k, v, sinks, mask, weight, dtype, mod)
            )

            def shard(t, layout=layout, dim=2):
                if groups is not None:
                    return shard_hybrid(t.detach(), *groups, layout, dim)
                return shard_sequence(t.detach(), world, rank, layout, dim)

            lq, lk, lv = (shard(t).to(dtype).requires_grad_() for t in (q, k, v))
            local_sinks = None if sinks is None else sinks.to(dtype).requires_grad_()
            method, more = ring_attention, {}
            if groups is not None:
                method, more = hybrid_attention, {"head_group": groups[0], "ring_group": groups[1]}
            out, lse = method(
                lq,
                lk,
                lv,
                **more,
                causal=causal,
                window=window,
                layout=layout,
                sinks=local_sinks,
                document_ids=None if ids is None else shard(ids, dim=-1),
                mask=extra,
                score_mod=mod,
                backend=backend,
                return_lse=True,
            )
            ((out * shard(weight).to(dtype)).sum() + lse.sum() * 0.1).backward()
            got = {"out": out, "lse": lse, "dq": lq.grad, "dk": lk.grad, "dv": lv.grad}
            if local_sinks is not None:  # each rank's gradient covers its queries: sum over ranks
                assert local_sinks.grad is not None
                dist.all_reduce(local_sinks.grad)
                got["dsinks"] = local_sinks.grad
            for what, g in got.items():
                cut = (lambda t: t) if what == "dsinks" else shard
                if dtype == torch.float64:
                    torch.testing.assert_close(
                        g,
                        cut(want[what]),
                        rtol=1e-9,
                        atol=1e-9,
                        msg=lambda m, w=what, n=name: f"{n} {w}: {m}",
                    )
                else:  # (an LSE of -inf, a query without keys, exactly where the reference's)
                    exact, low_exact = cut(want[what]), cut(low[what])
                    finite = torch.isfinite(exact)
                    assert torch.equal(torch.isfinite(g), finite), f"{name} {what}"
                    assert_close_scaled(
                        g[finite],
                        exact[finite],
                        low_exact[finite],
                        mult=4.0,
                        floor=2e-5,
                        what=f"{name} {what}",
                    )


@pytest.mark.slow
@pytest.mark.parametrize("world", [1, 2, 4])
def test_ring_attention_matches_single_process(world, tmp_path):
    spawn_ok(_worker, world, tmp_path)


@pytest.mark.slow
@needs_triton_device
@pytest.mark.skipif(TRITON_DEVICE != "cpu", reason="gloo passes CPU tensors: the interpreter's")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_ring_attention_on_the_triton_kernels(dtype, tmp_path):
    """backend="triton" (on a GPU, what "auto" picks): forward and backward, with the kernels
    computing each block under TRITON_INTERPRET=1; every case in float32 but those whose
    score_mod the kernels do not compute, a few in bfloat16."""
    few = ["causal_zigzag_sinks", "documents_window_zigzag", "dilated|global_causal"]
    kernels = [c[0] for c in CASES if not any(key in c[0] for key in CALLED_AT_POSITIONS)]
    spawn_ok(_worker, 2, tmp_path, "triton", dtype, kernels if dtype == torch.float32 else few)


@pytest.mark.slow
def test_ring_attention_on_the_compiled_cpu_kernels(tmp_path):
    """float32 on tiled: each block on the compiled CPU kernels, ALiBi (at the block's offset)
    and the softcap in them; four ranks, so blocks sit at many offsets."""
    names = ["causal_zigzag", "softcap_causal_zigzag", "alibi_window", "documents_window_zigzag"]
    spawn_ok(_worker, 4, tmp_path, "tiled", torch.float32, names)


@pytest.mark.slow
@pytest.mark.parametrize("head_ranks", [2, 4, 1], ids=["2x2", "1x4", "4x1"])
def test_hybrid_attention_matches_single_process(head_ranks, tmp_path):
    """Every ring case on a grid of 4 ranks: Ulysses over head groups of ``head_ranks``, the
    ring over the others (2 x 2), and the grid's edges: Ulysses alone (1 x 4: the cases with
    a query head for each rank) and the ring alone (4 x 1)."""
    names = None if head_ranks < 4 else [case[0] for case in CASES if case[2] >= 4]
    spawn_ok(_worker, 4, tmp_path, "tiled", torch.float64, names, head_ranks)


def ulysses_cases(L, Hq):
    """(name, mask, score_mod, Hkv, layout, sinks) for ulysses_attention: masks and mods that
    read the head (cut to each rank's heads) and ones that do not."""
    g = torch.Generator().manual_seed(7)
    per_head = torch.rand(2, Hq, L, L, generator=g) > 0.3
    per_head[..., 0] = True  # (every query keeps a key: the tensor is also the dense form)
    layout = torch.rand(Hq, L // 4, L // 4, generator=g) < 0.5
    slopes = score_mods.alibi_slopes(Hq)
    ids = document_ids(L)
    return [
        ("none", None, None, 2, "contiguous", False),
        ("causal_zigzag_sinks", masks.causal(), None, 2, "zigzag", True),
        ("window_mqa", masks.sliding_window(5, 3), None, 1, "contiguous", False),
        ("documents_causal", masks.causal() & masks.document(ids), None, 4, "zigzag", False),
        ("bigbird", masks.bigbird(4, 1, 1, 1, seed=0), None, 2, "contiguous", False),
        ("dilated|global", masks.dilated(3, 2) | masks.global_tokens([0, 5]), None, 2, "zigzag",
         False),
        ("per_head_predicate", masks.custom(per_head_predicate), None, 2, "contiguous", False),
        ("per_head_layout", masks.block_sparse(layout, 4) & masks.causal(), None, 2, "zigzag",
         False),
        ("per_head_tensor", per_head, None, 4, "contiguous", False),
        ("alibi_softcap", masks.causal(), score_mods.compose(
            score_mods.alibi(slopes), score_mods.softcap(3.0)), 2, "zigzag", False),
        ("head_score_mod", None, lambda s, b, h, q, kv: s + 0.3 * h - 0.01 * (q - kv).abs(),
         1, "contiguous", False),
    ]  # fmt: skip


def _ulysses_worker(rank, world, init_file, results_dir, Hq=4):
    with gloo_rank(rank, world, init_file, results_dir):
        L = 24
        for name, mask, score_mod, Hkv, layout, with_sinks in ulysses_cases(L, Hq):
            torch.manual_seed(0)  # the same global tensors on every rank
            q, k, v = rand_qkv(2, Hq, Hkv, L, L, 8, 6, dtype=torch.float64)
            weight = torch.randn(2, Hq, L, 6, dtype=torch.float64)
            sinks = torch.randn(Hq, dtype=torch.float64) if with_sinks else None
            inputs = [t.clone().requires_grad_() for t in (q, k, v)]
            ref, ref_lse = attnkit.attention(
                *inputs, mask=mask, score_mod=score_mod, sinks=sinks, return_lse=True,
                backend="reference",
            )  # fmt: skip
            ref_grads = torch.autograd.grad((ref * weight).sum() + ref_lse.sum() * 0.1, inputs)

            def shard(t, layout=layout):
                return shard_sequence(t.detach(), world, rank, layout)

            local = [shard(t).requires_grad_() for t in (q, k, v)]
            out, lse = ulysses_attention(
                *local, mask=mask, score_mod=score_mod, sinks=sinks, layout=layout,
                return_lse=True,
            )  # fmt: skip
            grads = torch.autograd.grad((out * shard(weight)).sum() + lse.sum() * 0.1, local)
            for what, got, want in [
                ("out", out, shard(ref)),
                ("lse", lse, shard(ref_lse)),
                *((f"d{x}", g, shard(r)) for x, g, r in zip("qkv", grads, ref_grads, strict=True)),
            ]:
                torch.testing.assert_close(
                    got, want, rtol=1e-9, atol=1e-9,
                    msg=lambda m, w=what, n=name: f"{n} {w}: {m}",
                )  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("world", [1, 2, 4])
def test_ulysses_attention_matches_single_process(world, tmp_path):
    """Every mask and score_mod, GQA and MQA (kv heads repeated), both layouts, sinks: out,
    LSE and dq, dk, dv against one process's float64 reference."""
    spawn_ok(_ulysses_worker, world, tmp_path)


@pytest.mark.slow
def test_ulysses_attention_splits_heads_that_do_not_divide_over_the_ranks(tmp_path):
    """8 query heads over 3 ranks: 2, 3 and 3 each; the middle rank's cut runs through a kv
    head's group, so it gets one kv head per query head (2 or 4 kv heads), the others their
    groups' (MQA, GQA): every case, against one process's float64 reference."""
    spawn_ok(_ulysses_worker, 3, tmp_path, 8)


#: (name, layout, Hq, Hkv, causal, window, extra mask, score_mod, packed pairs, sinks) for
#: cross-attention: 12 queries over 36 keys (the queries aligned to the keys' end)
CROSS_CASES = [
    ("full_gqa", "contiguous", 4, 2, False, None, None, None, False, False),
    ("full_zigzag_sinks", "zigzag", 2, 2, False, None, None, None, False, True),
    ("causal_suffix", "zigzag", 2, 1, True, None, None, None, False, False),
    ("window", "contiguous", 2, 2, True, 5, None, None, False, False),
    ("dilated|global", "zigzag", 2, 2, False, None,
     masks.dilated(3, 2) | masks.global_tokens([0, 5]), None, False, False),
    ("alibi_softcap_causal", "contiguous", 4, 2, True, None, None, score_mods.compose(
        score_mods.alibi(score_mods.alibi_slopes(4)), score_mods.softcap(2.0)), False, False),
    ("relative_bias", "zigzag", 2, 2, False, None, None,
     lambda s, b, h, q, kv: s + 0.3 * torch.cos((q - kv).to(s.dtype)) - 0.1 * h, False, False),
    ("packed_pairs", "contiguous", 2, 2, False, None, None, None, True, False),
]  # fmt: skip
#: packed translation pairs, (B, L) ids: targets (queries) and sources (keys), pair by pair
CROSS_IDS = (
    torch.tensor([[0] * 3 + [1] * 5 + [2] * 4, [0] * 12]),
    torch.tensor([[0] * 10 + [1] * 8 + [2] * 18, [0] * 36]),
)


def _cross_worker(
    rank, world, init_file, results_dir, dtype=torch.float64, names=None, backend="auto"
):
    """ring_attention's cross-attention against one process's float64 reference: to 1e-9 in
    float64, else within 4x the reference's own error in dtype."""
    with gloo_rank(rank, world, init_file, results_dir):
        Lq, Lk = 12, 36
        for name, layout, Hq, Hkv, causal, window, extra, mod, packed, with_sinks in CROSS_CASES:
            if names is not None and name not in names:
                continue
            torch.manual_seed(0)
            q, k, v = rand_qkv(2, Hq, Hkv, Lq, Lk, 8, 6, dtype=torch.float64)
            weight = torch.randn(2, Hq, Lq, 6, dtype=torch.float64)
            sinks = torch.randn(Hq, dtype=torch.float64) if with_sinks else None
            mask = global_mask(causal, window, None, extra)
            if packed:
                pairs = masks.document(CROSS_IDS[0], kv_ids=CROSS_IDS[1])
                mask = pairs if mask is None else mask & pairs
            want = _reference(q, k, v, sinks, mask, weight, torch.float64, mod)
            low = _reference(q, k, v, sinks, mask, weight, dtype, mod)

            def shard(t, dim=2, layout=layout):
                return shard_sequence(t.detach(), world, rank, layout, dim)

            local = [shard(t).to(dtype).requires_grad_() for t in (q, k, v)]
            sinks = None if sinks is None else sinks.to(dtype)
            out, lse = ring_attention(
                *local, causal=causal, window=window, mask=extra, score_mod=mod, layout=layout,
                sinks=sinks, return_lse=True, backend=backend,
                document_ids=shard(CROSS_IDS[0], -1) if packed else None,
                kv_document_ids=shard(CROSS_IDS[1], -1) if packed else None,
            )  # fmt: skip
            grads = torch.autograd.grad(
                (out * shard(weight).to(dtype)).sum() + lse.sum() * 0.1, local
            )
            for what, got in zip(("out", "lse", "dq", "dk", "dv"), (out, lse, *grads), strict=True):
                if dtype == torch.float64:
                    torch.testing.assert_close(
                        got, shard(want[what]), rtol=1e-9, atol=1e-9,
                        msg=lambda m, w=what, n=name: f"{n} {w}: {m}",
                    )  # fmt: skip
                else:
                    assert_close_scaled(
                        got, shard(want[what]), shard(low[what]), mult=4.0, floor=1e-5,
                        what=f"{name} {what}",
                    )  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 3])
def test_ring_cross_attention_matches_single_process(world, tmp_path):
    """Decoder queries over encoder keys, each sharded: masks, windows and mods over the
    whole 12 x 36 grid, GQA, sinks, packed pairs (kv_document_ids): out, LSE, dq, dk, dv."""
    spawn_ok(_cross_worker, world, tmp_path)


@pytest.mark.slow
def test_ring_cross_attention_on_the_compiled_cpu_kernels(tmp_path):
    """float32 on tiled's kernels: the causal and window offsets and ALiBi's of a 12 x 36
    grid in the kernels, block by block."""
    names = ["causal_suffix", "window", "alibi_softcap_causal"]
    spawn_ok(_cross_worker, 2, tmp_path, torch.float32, names)


@pytest.mark.slow
@needs_triton_device
@pytest.mark.skipif(TRITON_DEVICE != "cpu", reason="gloo passes CPU tensors: the interpreter's")
def test_ring_cross_attention_on_the_triton_kernels(tmp_path):
    """backend="triton" under TRITON_INTERPRET=1, float32: every cross case whose score_mod
    the kernels compute."""
    names = [c[0] for c in CROSS_CASES if c[0] != "relative_bias"]
    spawn_ok(_cross_worker, 2, tmp_path, torch.float32, names, "triton")


def _hybrid_odd_worker(rank, world, init_file, results_dir):
    with gloo_rank(rank, world, init_file, results_dir):
        with pytest.raises(ValueError, match="head_ranks=3 does not divide the world's 2 ranks"):
            hybrid_groups(3)
        with pytest.raises(ValueError, match="head_ranks must be a positive int"):
            hybrid_groups(0)
        groups = dict(zip(("head_group", "ring_group"), hybrid_groups(2), strict=True))
        x = torch.randn(1, 6, 4, 8)
        with pytest.raises(ValueError, match=r"hybrid_attention: every rank must hold shards"):
            hybrid_attention(x[:, : 3 + rank], x[:, : 3 + rank], x[:, : 3 + rank], **groups)
        with pytest.raises(ValueError, match="hybrid_attention takes a Mask over the whole"):
            hybrid_attention(x, x, x, mask=torch.ones(8, 8, dtype=torch.bool), **groups)
        with pytest.raises(ValueError, match=r"document_ids must be this rank's shard.*\(8,\)"):
            hybrid_attention(x, x, x, document_ids=torch.zeros(8, dtype=torch.long), **groups)
        with pytest.raises((TypeError, ValueError), match="sinks"):
            hybrid_attention(x, x, x, sinks=torch.zeros(4), **groups)
        alibi = score_mods.alibi(score_mods.alibi_slopes(4))
        with pytest.raises(ValueError, match=r"built for 4 heads, but q has Hq=6"):
            hybrid_attention(x, x, x, score_mod=alibi, **groups)
        ring = dict(zip(("head_group", "ring_group"), hybrid_groups(1), strict=True))
        with pytest.raises(ValueError, match="pad it to a multiple of 4"):  # L = 6, 2 x 2 chunks
            hybrid_attention(x[:, :, :3], x[:, :, :3], x[:, :, :3], **ring)


@pytest.mark.slow
def test_hybrid_attention_refuses_grids_heads_masks_and_shards_that_do_not_fit(tmp_path):
    spawn_ok(_hybrid_odd_worker, 2, tmp_path)


def _ulysses_odd_worker(rank, world, init_file, results_dir):
    with gloo_rank(rank, world, init_file, results_dir):
        x = torch.randn(1, 6, 4, 8)
        uneven = torch.randn(1, 2, 4 + rank, 8)
        shapes = r"same shape \(B, Hq, Hkv, L/P, D, Dv\); they range from \[1, 2, 2, 4, 8, 8\]"
        with pytest.raises(ValueError, match=shapes):
            ulysses_attention(uneven, uneven, uneven)
        heads = x[:, : 4 + 2 * rank]  # 4 heads on rank 0, 6 on rank 1
        with pytest.raises(ValueError, match=r"they range from \[1, 4, 4, 4, 8, 8\] to \[1, 6"):
            ulysses_attention(heads, heads, heads)
        with pytest.raises(ValueError, match=r"at least one query head, got Hq=1 \(ring_att"):
            ulysses_attention(x[:, :1], x[:, :1], x[:, :1])
        with pytest.raises(ValueError, match="pad it to a multiple of 4"):
            ulysses_attention(x[:, :, :3], x[:, :, :3], x[:, :, :3], layout="zigzag")
        per_head = masks.block_sparse(torch.rand(6, 2, 2) < 0.5, 4).blocks(8, 8, 4, 4, H=6)
        with pytest.raises(ValueError, match="BlockMask only when it is the same for every head"):
            ulysses_attention(x, x, x, mask=per_head)
        with pytest.raises(ValueError, match=r"built for 4 heads, but q has Hq=6"):
            ulysses_attention(x, x, x, score_mod=score_mods.alibi(score_mods.alibi_slopes(4)))
        with pytest.raises((TypeError, ValueError), match="sinks"):
            ulysses_attention(x, x, x, sinks=torch.zeros(4))
        # float32 on tiled's kernels, and a second derivative through the reference backend
        torch.manual_seed(0)
        q, k, v = rand_qkv(1, 4, 2, 16, 16, 8, 8, dtype=torch.float32)
        mask = masks.causal() & masks.document(torch.arange(16) // 5)
        whole = attnkit.attention(q, k, v, mask=mask, backend="reference")
        local = [shard_sequence(t, world, rank, "zigzag") for t in (q, k, v)]
        out = ulysses_attention(*local, mask=mask, layout="zigzag", backend="tiled")
        torch.testing.assert_close(out, shard_sequence(whole, world, rank, "zigzag"))
        q, k, v = rand_qkv(1, 2, 2, 8, 8, 4, 4, dtype=torch.float64)

        def second_derivative(inputs, attend):
            inputs = [t.requires_grad_() for t in inputs]
            (dq,) = torch.autograd.grad(
                attend(*inputs).square().sum(), inputs[:1], create_graph=True
            )
            return torch.autograd.grad(dq.square().sum(), inputs)

        want = second_derivative(
            [t.clone() for t in (q, k, v)], lambda *t: attnkit.attention(*t, backend="reference")
        )
        got = second_derivative(
            [shard_sequence(t, world, rank, "contiguous") for t in (q, k, v)],
            lambda *t: ulysses_attention(*t, backend="reference"),
        )
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, shard_sequence(w, world, rank, "contiguous"))


@pytest.mark.slow
def test_ulysses_attention_refuses_what_does_not_split_and_runs_tiled_and_second_derivatives(
    tmp_path,
):
    spawn_ok(_ulysses_odd_worker, 2, tmp_path)


def test_ulysses_shares_heads_out_as_evenly_as_they_go_with_the_kv_heads_they_read():
    from attnkit.distributed.ulysses import head_bounds, kv_heads_for

    assert head_bounds(12, 8) == [0, 1, 3, 4, 6, 7, 9, 10, 12]
    assert head_bounds(8, 4) == [0, 2, 4, 6, 8]
    # 8 query heads over 2 kv heads (groups of 4), cut 2 / 3 / 3 over three ranks
    assert [kv_heads_for(a, n, 4) for a, n in ((0, 2), (2, 3), (5, 3))] == [[0], [0, 0, 1], [1]]
    assert kv_heads_for(4, 4, 2) == [2, 3]  # whole groups: grouped attention on the rank
    assert kv_heads_for(1, 4, 2) == [0, 1, 1, 2]  # a cut through groups: one per query head
    assert kv_heads_for(3, 2, 1) == [3, 4]  # MHA


@settings(max_examples=200)
@given(st.integers(1, 16), st.integers(1, 6), st.data())
def test_every_ranks_query_heads_read_the_kv_heads_they_would_alone(groups, size, data):
    """Over any world <= Hq: the shares cover the heads in order, differ by at most one, and
    on each rank query head i reads (attention's GQA mapping over the kv heads it got) the
    kv head the whole model's head first + i reads."""
    from attnkit.distributed.ulysses import head_bounds, kv_heads_for

    Hq = groups * size  # Hkv = groups kv heads of ``size`` query heads each
    world = data.draw(st.integers(1, Hq))
    bounds = head_bounds(Hq, world)
    shares = [b - a for a, b in itertools.pairwise(bounds)]
    assert (bounds[0], bounds[-1]) == (0, Hq)
    assert max(shares) - min(shares) <= 1
    for first, count in zip(bounds, shares, strict=False):
        kv = kv_heads_for(first, count, size)
        assert count % len(kv) == 0  # a grouping attention takes
        per = count // len(kv)
        assert [kv[i // per] for i in range(count)] == [(first + i) // size for i in range(count)]


def test_ulysses_keeps_what_reads_no_head_and_cuts_what_does():
    """Built-in patterns pass unchanged (backends keep recognising them: a causal band, ALiBi
    in-kernel); per-head masks and mods become exactly the rank's heads of the whole."""
    from attnkit.distributed.ulysses import mask_for_heads, score_mod_for_heads

    for mask in (masks.causal(), masks.document(torch.arange(8) // 3), None):
        assert mask_for_heads(mask, 2, 2, 4) is mask
    layout = torch.rand(4, 2, 2, generator=torch.Generator().manual_seed(0)) < 0.5
    for mask in (masks.custom(per_head_predicate), masks.block_sparse(layout, 4)):
        cut = mask_for_heads(mask, 2, 2, 4)
        assert torch.equal(cut.dense(8, 8, B=2, H=2), mask.dense(8, 8, B=2, H=4)[:, 2:])
        blocks = cut.blocks(8, 8, 4, 4, B=2, H=2)
        assert torch.equal(blocks.kinds, mask.blocks(8, 8, 4, 4, B=2, H=4).kinds[:, 2:])
        assert cut.bind(8, 8).any_ranges  # (so a ring's Mask.part can take it too)
    tensor = torch.rand(1, 4, 8, 8) > 0.5
    assert torch.equal(mask_for_heads(tensor, 2, 2, 4), tensor[:, 2:])
    slopes = score_mods.alibi_slopes(4)
    both = score_mods.compose(score_mods.alibi(slopes), score_mods.softcap(2.0))
    kernel = score_mods.kernel_mods(score_mod_for_heads(both, 2, 2, 8))
    assert kernel is not None
    assert torch.equal(kernel.slopes, slopes[2:])
    assert kernel.softcap == 2.0
    cap = score_mods.softcap(2.0)
    assert score_mod_for_heads(cap, 2, 2, 8) is cap


def _odd_worker(rank, world, init_file, results_dir):
    with gloo_rank(rank, world, init_file, results_dir):
        q = torch.randn(1, 2, 5, 8)  # 10 positions over 2 ranks: not 4 zigzag chunks
        with pytest.raises(ValueError, match="pad it to a multiple of 4"):
            ring_attention(q, q, q, causal=True, layout="zigzag")
        empty = torch.randn(1, 2, 0, 8)
        with pytest.raises(ValueError, match="a shard of at least one position"):
            ring_attention(empty, empty, empty)
        uneven = torch.randn(1, 2, 4 + rank, 8)
        with pytest.raises(ValueError, match=r"same shard lengths \(queries, keys\); they ra"):
            ring_attention(uneven, uneven, uneven)
        with pytest.raises(ValueError, match=r"from \(4, 4\) to \(4, 5\)"):  # the keys'
            ring_attention(torch.randn(1, 2, 4, 8), uneven, uneven)
        ids, kv = torch.zeros(4, dtype=torch.long), torch.randn(1, 2, 6, 8)
        with pytest.raises(ValueError, match="takes the keys' ids as kv_document_ids: quer"):
            ring_attention(torch.randn(1, 2, 4, 8), kv, kv, document_ids=ids)
        with pytest.raises(ValueError, match=r"kv_document_ids must be .*\(6,\) or \(1, 6\) for k"):
            ring_attention(torch.randn(1, 2, 4, 8), kv, kv, document_ids=ids, kv_document_ids=ids)
        with pytest.raises(ValueError, match="kv_document_ids needs document_ids"):
            ring_attention(kv, kv, kv, kv_document_ids=torch.zeros(6, dtype=torch.long))
        q = torch.randn(2, 2, 4, 8)
        with pytest.raises(ValueError, match="document_ids must be an integer tensor"):
            ring_attention(q, q, q, document_ids=torch.zeros(4))
        with pytest.raises(
            ValueError, match=r"\(4,\) or \(2, 4\) for q \(2, 2, 4, 8\); got \(3, 4\)"
        ):
            ring_attention(q, q, q, document_ids=torch.zeros(3, 4, dtype=torch.long))
        with pytest.raises(ValueError, match="on every rank or none"):  # rank 1 gives none
            ring_attention(q, q, q, document_ids=torch.zeros(4, dtype=torch.long) if rank else None)
        with pytest.raises(ValueError, match=r"takes a Mask over the whole sequence .* got Tensor"):
            ring_attention(q, q, q, mask=torch.ones(8, 8, dtype=torch.bool))
        with pytest.raises(ValueError, match="finds its tiles for a whole grid only"):
            ring_attention(q, q, q, mask=masks.document(torch.arange(8) // 3))
        with pytest.raises(
            ValueError, match="backend must be 'auto', 'tiled' or 'triton', got 'x'"
        ):
            ring_attention(q, q, q, backend="x")
        with pytest.raises(ValueError, match="backend='triton' cannot serve these inputs: tri"):
            ring_attention(q.double(), q.double(), q.double(), backend="triton")
        positional = score_mods.relative_bias(torch.randn(2, 5))
        if importlib.util.find_spec("triton") is not None:
            with pytest.raises(
                ValueError, match=r"other than ALiBi and softcap .*backend='tiled' does"
            ):
                ring_attention(q, q, q, score_mod=positional, backend="triton")
        learning = score_mods.alibi(score_mods.alibi_slopes(2).requires_grad_())
        with pytest.raises(ValueError, match="does not differentiate score_mod parameters"):
            ring_attention(q, q, q, score_mod=score_mods.compose(learning, score_mods.softcap(2)))
        with pytest.raises(ValueError, match=r"built for 4 heads, but q has Hq=2"):
            ring_attention(q, q, q, score_mod=score_mods.alibi(score_mods.alibi_slopes(4)))
        with pytest.raises(TypeError, match="score_mod must be a ScoreMod or fn"):
            ring_attention(q, q, q, score_mod=3.0)
        x = torch.randn(1, 2, 8, 8, requires_grad=True)
        (dx,) = torch.autograd.grad(ring_attention(x, x, x).sum(), (x,), create_graph=True)
        with pytest.raises(attnkit.UnsupportedError, match="ring_attention computes first-order"):
            torch.autograd.grad((dx**2).sum(), (x,))
        with torch.autocast("cpu", dtype=torch.bfloat16):  # runs in autocast's dtype
            out = ring_attention(x, x, x, causal=True)
        cast = x.detach().bfloat16()
        expected = ring_attention(cast, cast, cast, causal=True)
        torch.testing.assert_close(out, expected, rtol=0, atol=0)


@pytest.mark.slow
def test_ring_attention_refuses_bad_shards_and_second_derivatives_and_follows_autocast(tmp_path):
    spawn_ok(_odd_worker, 2, tmp_path)


def test_ring_blocks_that_share_no_document_are_skipped():
    """Four ranks, one document each (contiguous): each rank's queries meet only its own
    block, whole (no mask); a batch row that is one document makes every block visited."""
    from attnkit.distributed.ring import _pairs, _Setup

    def pairs(rank, src, ids):
        setup = _Setup(None, rank, 4, 32, 32, "contiguous", False, None, 1.0, "tiled")
        shard = [shard_sequence(ids, 4, r, "contiguous", dim=1) for r in (rank, src)]
        return _pairs(setup, src, *shard)

    one_each = (torch.arange(32) // 8)[None]
    for rank in range(4):
        for src in range(4):
            found = pairs(rank, src, one_each)
            assert [pair[4] for pair in found] == ([None] if src == rank else [])
    with_one_long = torch.cat([one_each, torch.zeros_like(one_each)])
    found = pairs(0, 1, with_one_long)
    assert len(found) == 1
    assert found[0][4] is not None  # row 0 masks it all, row 1 none of it


@pytest.mark.parametrize("layout", ["zigzag", "contiguous"])
def test_ring_blocks_keep_alibi_in_the_kernels_at_their_global_distances(layout):
    """Each block's score mod is the whole sequence's at the block's global positions; ALiBi
    (alone, with its own offset, or under a softcap) stays a mod the kernels apply."""
    from attnkit.distributed.ring import _pairs, _Setup

    L, world, H = 24, 3, 2
    slopes = score_mods.alibi_slopes(H).double()
    b, h = torch.zeros(1, 1, 1, 1, dtype=torch.long), torch.arange(H).view(1, H, 1, 1)
    for mod in (
        score_mods.alibi(slopes),
        score_mods.alibi(slopes, offset=3),
        score_mods.compose(score_mods.alibi(slopes), score_mods.softcap(2.0)),
    ):
        whole = score_mods.resolve(mod, L, L)
        scores = torch.randn(1, H, L, L, dtype=torch.float64)
        i, j = torch.arange(L).view(-1, 1), torch.arange(L).view(1, -1)
        want = whole(scores, b, h, i, j)
        for rank in range(world):
            q_pos = shard_sequence(torch.arange(L), world, rank, layout, dim=0)
            for src in range(world):
                k_pos = shard_sequence(torch.arange(L), world, src, layout, dim=0)
                setup = _Setup(
                    None, rank, world, L, L, layout, False, None, 1.0, "tiled", None, mod
                )
                for _, _, (qa, qb), (ka, kb), _, block_mod in _pairs(setup, src):
                    assert score_mods.kernel_mods(block_mod) is not None, (mod, rank, src)
                    rows, cols = q_pos[qa:qb], k_pos[ka:kb]
                    local = scores[:, :, rows][:, :, :, cols]
                    fn = score_mods.resolve(block_mod, qb - qa, kb - ka)
                    li, lj = torch.arange(qb - qa).view(-1, 1), torch.arange(kb - ka).view(1, -1)
                    got = fn(local, b, h, li, lj)
                    expected = want[:, :, rows][:, :, :, cols]
                    torch.testing.assert_close(got, expected, msg=f"{mod} {rank} {src}")


@needs_triton_device
def test_ring_blocks_run_on_triton_for_cuda_tensors_it_takes_and_on_tiled_otherwise():
    pytest.importorskip("triton")
    from attnkit.distributed.ring import _block_backend

    x = torch.randn(1, 2, 4, 8, device=TRITON_DEVICE)
    softcap, alibi = score_mods.softcap(2.0), score_mods.alibi(score_mods.alibi_slopes(2))
    assert _block_backend("triton", x, x, x, None) == "triton"
    assert _block_backend("triton", x, x, x, softcap) == "triton"
    assert _block_backend("tiled", x, x, x, None) == "tiled"
    # CPU tensors stay on tiled's compiled kernels, even under the interpreter
    assert _block_backend("auto", x, x, x, softcap) == ("triton" if x.is_cuda else "tiled")
    assert _block_backend("auto", x.double(), x.double(), x.double(), None) == "tiled"
    assert _block_backend("triton", x, x, x, alibi) == "triton"  # at each block's offset
    assert _block_backend("auto", x, x, x, alibi) == ("triton" if x.is_cuda else "tiled")
    positional = score_mods.relative_bias(torch.randn(2, 7))
    assert _block_backend("auto", x, x, x, positional) == "tiled"  # shifted per block: loops
    with pytest.raises(ValueError, match="other than ALiBi and softcap"):
        _block_backend("triton", x, x, x, positional)


def test_ring_attention_needs_a_process_group():
    q = torch.randn(1, 1, 4, 8)
    with pytest.raises(RuntimeError, match=r"torch\.distributed"):
        ring_attention(q, q, q)
    with pytest.raises(RuntimeError, match=r"hybrid_groups needs torch\.distributed"):
        hybrid_groups(2)
    with pytest.raises(RuntimeError, match=r"hybrid_attention needs torch\.distributed"):
        hybrid_attention(q, q, q, head_group=None, ring_group=None)


@pytest.mark.parametrize("layout", ["zigzag", "contiguous"])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_shard_unshard_round_trip(layout, world):
    x = torch.arange(2 * 3 * 24 * 2).view(2, 3, 24, 2)
    shards = [shard_sequence(x, world, r, layout) for r in range(world)]
    assert all(s.shape == (2, 3, 24 // world, 2) for s in shards)
    assert torch.equal(unshard_sequence(shards, layout), x)
    if layout == "zigzag" and world == 2:  # chunks of 6: rank 0 holds 0 and 3, rank 1 holds 1, 2
        assert shards[0][0, 0, :, 0].tolist() == [0, 2, 4, 6, 8, 10, 36, 38, 40, 42, 44, 46]


def test_shard_rejects_uneven_lengths():
    with pytest.raises(ValueError, match="pad it to a multiple of 6"):
        shard_sequence(torch.zeros(1, 1, 10, 2), 3, 0, "zigzag")


def test_merge_partials_equals_whole():
    q, k, v = rand_qkv(1, 2, 2, 7, 12, 4, dtype=torch.float64)
    allowed = masks.causal().dense(7, 12)
    whole, whole_lse = attnkit.attention(q, k, v, mask=allowed, return_lse=True)
    parts = [
        attnkit.attention(q, k[:, :, a:b], v[:, :, a:b], mask=allowed[..., a:b], return_lse=True)
        for a, b in [(0, 3), (3, 9), (9, 12)]
    ]
    out, lse = merge_partials([p[0] for p in parts], [p[1] for p in parts])
    torch.testing.assert_close(out, whole)
    torch.testing.assert_close(lse, whole_lse)
    with pytest.raises(ValueError, match="as many"):
        merge_partials([out], [])


def test_merge_stacked_takes_the_same_few_operations_for_any_number_of_parts():
    """The split-KV decoding forward merges up to 128 parts stacked in one tensor: as many
    operations (GPU kernel launches) for 64 parts as for 2, the result as merge_partials'."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from attnkit.distributed.merge import merge_stacked

    class CountOps(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.count += 1
            return func(*args, **(kwargs or {}))

    counts = []
    for parts in (2, 64):
        outs, lses = torch.randn(parts, 1, 2, 3, 4), torch.randn(parts, 1, 2, 3)
        lses[0, 0, 0, 0] = float("-inf")  # a part with no key for one row
        lses[:, 0, 1, 2] = float("-inf")  # a row with no key in any part
        with CountOps() as ops:
            out, lse = merge_stacked(outs, lses)
        counts.append(ops.count)
        want, want_lse = merge_partials(list(outs), list(lses))
        torch.testing.assert_close(out, want)
        torch.testing.assert_close(lse, want_lse)
        assert torch.equal(out[0, 1, 2], torch.zeros(4))
        assert lse[0, 1, 2] == float("-inf")
    assert counts[0] == counts[1], counts  # a sum over the parts took 3 more per part


@pytest.mark.slow
@pytest.mark.parametrize(
    ("method", "ranks", "more"),
    [
        ("ring", 2, []),
        ("ulysses", 2, ["--ulysses"]),
        ("ring", 2, ["--full", "--mask", "dilated:8,4+global:0"]),
        ("hybrid", 4, ["--hybrid", "2", "--mask", "dilated:8,4+global:0"]),
        ("ring", 2, ["--alibi", "--softcap", "5"]),
        ("ring", 2, ["--kv-seq", "3072", "--alibi"]),
    ],
    ids=["ring", "ulysses", "ring_sparse", "hybrid_2x2_sparse", "ring_alibi_softcap", "cross"],
)
def test_the_ring_example_runs_under_torchrun_and_matches_one_process(method, ranks, more):
    """examples/ring_attention.py as its docstring runs it (packed documents, forward and
    backward; cross-attention: 1,024 queries over 3,072 keys, 4 packed pairs): it reports its
    error against one process, and that error is small."""
    example = Path(__file__).parents[1] / "examples" / "ring_attention.py"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node"]
    options = ["--seq", "1024", "--check-seq", "256", "--documents", "4", "--backward", *more]
    run = subprocess.run(
        [*torchrun, str(ranks), str(example), *options],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    grid = " as 2 x 2" if method == "hybrid" else ""
    assert f"{method} attention, P={ranks}{grid} (gloo), seq=1024" in run.stdout
    assert "forward+backward:" in run.stdout
    error = re.search(rf"max \|{method} - single process\| at seq=256: (\S+)", run.stdout)
    assert error is not None, run.stdout
    assert float(error.group(1)) < 1e-5
