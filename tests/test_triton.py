"""Triton kernels checked on CPU with TRITON_INTERPRET=1 against the float64 reference.

Small odd shapes keep the interpreter quick; on a GPU the same kernels are compiled.
"""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are first compiled
pytest.importorskip("triton", reason="triton is not installed (pip install 'attnkit[triton]')")

import triton
import triton.language as tl

import attnkit
from attnkit import masks, score_mods
from attnkit.backends.tensor_masks import tensor_block_mask
from attnkit.backends.triton.kernel_parts import cast
from conftest import (
    TRITON_DEVICE,
    assert_close_scaled,
    needs_triton_device,
    packed_document_ids,
    per_head_predicate,
    rand_qkv,
    random_key_ranges,
    record_launches,
)

pytestmark = needs_triton_device
DEVICE = TRITON_DEVICE


def check(shape, mask=None, score_mod=None, return_lse=False, dtype=torch.float32, layout=None):
    """Output (and LSE) and dq, dk, dv of triton in ``dtype`` vs the float64 reference, with
    DESIGN §7 tolerances (2x / 4x the reference's own error in ``dtype``, plus a floor).

    ``layout`` turns each of triton's q, k, v into the same values in another memory layout.
    """
    B, Hq, Hkv, Lq, Lk, D, Dv = shape
    q64, k64, v64 = (t.to(DEVICE) for t in rand_qkv(B, Hq, Hkv, Lq, Lk, D, Dv, torch.float64))
    dout = torch.randn(B, Hq, Lq, Dv, dtype=torch.float64, device=DEVICE)
    dlse = torch.randn(B, Hq, Lq, dtype=torch.float64, device=DEVICE)
    results = {}
    for name, run_dtype, backend in (
        ("ref64", torch.float64, "reference"),
        ("ref32", dtype, "reference"),
        ("triton", dtype, "triton"),
    ):
        q, k, v = (t.to(run_dtype).requires_grad_() for t in (q64, k64, v64))
        inputs = [layout(t) if layout and backend == "triton" else t for t in (q, k, v)]
        out, lse = attnkit.attention(
            *inputs, mask=mask, score_mod=score_mod, backend=backend, return_lse=True
        )
        grads_of = [out, lse] if return_lse else [out]
        seeds = [dout.to(run_dtype), dlse.to(lse.dtype).masked_fill(torch.isinf(lse), 0)][
            : len(grads_of)
        ]
        grads = torch.autograd.grad(grads_of, (q, k, v), seeds)
        results[name] = (out, lse, *grads)
    for i, (got, want, low) in enumerate(
        zip(*(results[n] for n in ("triton", "ref64", "ref32")), strict=True)
    ):
        if i == 1:  # LSE: compare where finite, and -inf exactly where the reference has it
            finite = torch.isfinite(want)
            assert torch.equal(torch.isfinite(got), finite)
            got, want, low = got[finite], want[finite], low[finite]
        assert_close_scaled(got, want, low, mult=2.0 if i < 2 else 4.0, floor=2e-5)


SHAPES = [  # B, Hq, Hkv, Lq, Lk, D, Dv
    (1, 1, 1, 1, 1, 16, 16),
    (1, 2, 2, 17, 17, 40, 40),
    (1, 4, 2, 17, 33, 64, 40),  # GQA, Lq != Lk, Dv != D
    (1, 2, 1, 33, 20, 128, 64),  # MQA, Lq > Lk
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("mask_name", ["none", "causal"])
def test_shapes(shape, mask_name):
    check(shape, mask=masks.causal() if mask_name == "causal" else None)


@pytest.mark.slow
def test_larger_odd_shape():
    check((1, 2, 1, 113, 203, 64, 64), mask=masks.sliding_window(40, 8))


@pytest.mark.parametrize(
    "mask",
    [
        masks.sliding_window(7, 3),
        masks.document([0] * 10 + [1] * 15 + [2] * 12),
        masks.key_padding([37, 9]),
        masks.block_sparse(torch.rand(3, 3, generator=torch.Generator().manual_seed(0)) < 0.5, 16),
        masks.causal() & masks.key_padding([30, 37]),
        masks.custom(per_head_predicate) | masks.sliding_window(3),
    ],
    ids=["window", "document", "padding", "block_sparse", "causal&padding", "per-head custom"],
)
def test_masks(mask):
    check((2, 2, 1, 37, 37, 32, 32), mask=mask)


@pytest.mark.parametrize(
    "mod",
    [
        score_mods.alibi(score_mods.alibi_slopes(4)),
        score_mods.softcap(2.0),
        score_mods.compose(score_mods.alibi(score_mods.alibi_slopes(4)), score_mods.softcap(3.0)),
        score_mods.compose(
            score_mods.alibi(score_mods.alibi_slopes(4), offset=-40), score_mods.softcap(3.0)
        ),
    ],
    ids=["alibi", "softcap", "alibi+softcap", "alibi(offset=-40)+softcap"],
)
def test_in_kernel_score_mods(mod):
    check((1, 4, 2, 20, 29, 32, 32), mask=masks.causal(), score_mod=mod)


def test_one_alibi_slope_serves_every_head():
    """A (1,) slope tensor is repeated per head: the kernels read slope h for head h."""
    check((1, 4, 2, 20, 29, 32, 32), score_mod=score_mods.alibi(torch.tensor([0.4])))


def test_lse_and_its_gradient():
    check((1, 2, 2, 21, 21, 16, 16), mask=masks.causal(), return_lse=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_block_backward_parts_add_up_to_the_whole_gradient(dtype):
    """Ring attention's backward on the kernels: two blocks of keys, each given the *global*
    out and LSE as slices of longer tensors (a zigzag chunk's are), add up to the gradient of
    attention over both, returned in float32 (no 16-bit rounding per block)."""
    from attnkit.backends import triton as triton_backend

    Lq, Lk, split, scale = 23, 37, 16, 40**-0.5
    q64, k64, v64 = (t.to(DEVICE) for t in rand_qkv(1, 4, 2, Lq + 9, Lk, 40, 24, torch.float64))
    dout64 = torch.randn(1, 4, Lq + 9, 24, dtype=torch.float64, device=DEVICE)
    dlse64 = torch.randn(1, 4, Lq + 9, dtype=torch.float64, device=DEVICE)
    rows = slice(5, 5 + Lq)  # the queries: a slice of a longer shard, as in a ring's chunk

    def window(k0):  # a causal window of 20 keys, for keys from k0 on
        return masks.sliding_window(20, align=Lk - Lq - k0)

    def whole(run_dtype):
        q = q64[:, :, rows].to(run_dtype).requires_grad_()
        k, v = (t.to(run_dtype).requires_grad_() for t in (k64, v64))
        out, lse = attnkit.attention(q, k, v, mask=window(0), backend="reference", return_lse=True)
        seeds = [dout64[:, :, rows].to(run_dtype), dlse64[:, :, rows].to(torch.float32)]
        return (out, lse), torch.autograd.grad([out, lse], (q, k, v), [seeds[0], seeds[1].to(lse)])

    (out, lse), ref64 = whole(torch.float64)
    _, ref_low = whole(dtype)
    # the global out and LSE as slices of longer tensors (their rows outside are never read)
    out_long = torch.zeros(1, 4, Lq + 9, 24, dtype=dtype, device=DEVICE)
    lse_long = torch.zeros(1, 4, Lq + 9, dtype=torch.float32, device=DEVICE)
    out_long[:, :, rows], lse_long[:, :, rows] = out.to(dtype), lse.float()
    q, k, v, dout = (t.to(dtype) for t in (q64, k64, v64, dout64))
    parts = [
        triton_backend.block_backward(
            dout[:, :, rows],
            q[:, :, rows],
            k[:, :, a:b],
            v[:, :, a:b],
            out_long[:, :, rows],
            lse_long[:, :, rows],
            mask=window(a),
            scale=scale,
            dlse=dlse64[:, :, rows].float(),
        )
        for a, b in ((0, split), (split, Lk))
    ]
    assert all(g.dtype == torch.float32 for part in parts for g in part)
    got = (
        parts[0][0] + parts[1][0],
        torch.cat([parts[0][1], parts[1][1]], dim=2),
        torch.cat([parts[0][2], parts[1][2]], dim=2),
    )
    for g, r64, r_low in zip(got, ref64, ref_low, strict=True):
        assert_close_scaled(g, r64, r_low, mult=4.0, floor=2e-5)


def test_attention_sinks_through_the_lse():
    """Sinks rescale out by the triton LSE: forward and every gradient, sinks' included."""
    q64, k64, v64 = (t.to(DEVICE) for t in rand_qkv(1, 4, 2, 19, 26, 16, 16, torch.float64))
    sinks64 = torch.randn(4, dtype=torch.float64, device=DEVICE)
    results = {}
    for backend, dtype in (("reference", torch.float64), ("triton", torch.float32)):
        inputs = [t.to(dtype).requires_grad_() for t in (q64, k64, v64, sinks64)]
        out = attnkit.attention(*inputs[:3], mask=masks.causal(), sinks=inputs[3], backend=backend)
        results[backend] = (out, *torch.autograd.grad(out.square().sum(), inputs))
    for got, want in zip(results["triton"], results["reference"], strict=True):
        torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=2e-5)


def test_fully_masked_rows():
    allowed = torch.ones(19, 19, dtype=torch.bool)
    allowed[4] = False
    check((1, 2, 2, 19, 19, 16, 16), mask=allowed)


@pytest.mark.filterwarnings("ignore:All-NaN slice:RuntimeWarning")  # numpy's max, interpreted
@pytest.mark.parametrize("where", ["q", "k"])
@pytest.mark.parametrize("mask", [None, masks.causal()], ids=["none", "causal"])
def test_nan_reaches_the_rows_that_attend_to_it(where, mask):
    """NaN scores make a row NaN, out and LSE alike, as in the reference (not a row of zeros)."""
    q, k, v = (t.to(DEVICE) for t in rand_qkv(1, 4, 2, 20, 29, 16, dtype=torch.float64))
    {"q": q, "k": k}[where][0, 1, 11, 3] = float("nan")
    ref, ref_lse = attnkit.attention(q, k, v, mask=mask, backend="reference", return_lse=True)
    out, lse = attnkit.attention(
        q.float(), k.float(), v.float(), mask=mask, backend="triton", return_lse=True
    )
    assert ref.isnan().any()
    assert not ref.isnan().all()
    assert torch.equal(out.isnan(), ref.isnan())
    assert torch.equal(lse.isnan(), ref_lse.isnan())


LAYOUTS = {  # the same values as x (B, H, L, D), laid out otherwise in memory
    "heads transposed out of (B, L, H, D)": lambda x: (
        x.transpose(1, 2).contiguous().transpose(1, 2)
    ),
    "prefix of a longer buffer": lambda x: torch.cat([x, torch.zeros_like(x[:, :, :5])], 2)[
        :, :, : x.shape[2]
    ],
    "head dim strided (copied)": lambda x: x.transpose(-1, -2).contiguous().transpose(-1, -2),
}


@pytest.mark.parametrize("layout", LAYOUTS.values(), ids=LAYOUTS)
def test_strided_inputs(layout):
    """The kernels read q, k, v through their strides, and store dq, dk, dv through theirs."""
    check((2, 4, 2, 19, 26, 32, 24), mask=masks.causal(), layout=layout)


def test_a_kv_caches_keys_reach_the_kernel_uncopied(monkeypatch):
    """Decoding: the cache's keys and values, views into its buffer, are not copied per step."""
    from attnkit.nn import KVCache

    cache = KVCache(2, 2, 64, 16, device=DEVICE)
    prompt_k, prompt_v = (torch.randn(2, 2, 30, 16, device=DEVICE) for _ in range(2))
    cache.append(prompt_k, prompt_v)
    q, new_k, new_v = (torch.randn(2, 4, 1, 16, device=DEVICE) for _ in range(3))
    k, v = cache.append(new_k[:, :2], new_v[:, :2])
    assert not k.is_contiguous()  # a prefix of the (2, 2, 64, 16) buffer
    launched = record_launches(monkeypatch)
    out = attnkit.attention(q, k, v, mask=masks.causal(), backend="triton")
    ((_q, k_in, v_in, *_),) = (call.args for call in launched)
    assert (k_in.data_ptr(), k_in.stride()) == (k.data_ptr(), k.stride())
    assert (v_in.data_ptr(), v_in.stride()) == (v.data_ptr(), v.stride())
    want = attnkit.attention(q, k, v, mask=masks.causal(), backend="reference")
    torch.testing.assert_close(out, want, atol=2e-6, rtol=2e-6)


def test_kv_splits_follow_flash_attentions_heuristic():
    from attnkit.backends.triton.launches import MAX_KV_SPLITS, kv_splits

    assert kv_splits(programs=132, kv_tiles=256, sm_count=132) == 1  # the SMs are busy
    assert kv_splits(programs=106, kv_tiles=256, sm_count=132) == 1  # 80 % of them
    assert kv_splits(programs=32, kv_tiles=256, sm_count=132) == 4  # 128 programs: 97 % full
    assert kv_splits(programs=1, kv_tiles=3, sm_count=132) == 3  # never more than tiles
    # one per SM fills them all; 55 (86 %) is the fewest within 85 % of that
    assert kv_splits(programs=1, kv_tiles=4096, sm_count=64) == 55
    # at most MAX_KV_SPLITS (128/132 full); the fewest within 85 % of that are 109, but
    # 109 and 110 splits take 38 tiles each, as 108 do: 111 is the first that takes fewer
    assert MAX_KV_SPLITS == 128
    assert kv_splits(programs=1, kv_tiles=4096, sm_count=132) == 111
    # 4 splits of 9 tiles take 3 each, as 3 splits do: 4 is skipped
    assert kv_splits(programs=1, kv_tiles=9, sm_count=4) == 3


DECODING_CASES = {  # shape (B, Hq, Hkv, Lq, Lk, D, Dv), mask, score_mod
    "one query, no mask": ((1, 2, 2, 1, 200, 16, 16), None, None),
    "one query, causal, GQA": ((2, 4, 2, 1, 150, 32, 24), masks.causal(), None),
    "5 queries, window": ((1, 2, 1, 5, 181, 16, 16), masks.sliding_window(37), None),
    "padding tensor, a row with no key": ((1, 2, 2, 3, 97, 16, 16), "padding", None),
    "per-head tensor mask": ((1, 4, 2, 2, 90, 16, 16), "per-head", None),
    "alibi and softcap, GQA": (
        (1, 4, 2, 3, 130, 16, 16),
        masks.causal(),
        score_mods.compose(score_mods.alibi(score_mods.alibi_slopes(4)), score_mods.softcap(3.0)),
    ),
    "3 queries, MQA, alibi": (
        (1, 4, 1, 3, 70, 16, 16),
        masks.sliding_window(30),
        score_mods.alibi(score_mods.alibi_slopes(4)),
    ),
}


def _decoding_mask(mask, B, Hq, Lq, Lk):
    if mask not in ("padding", "per-head"):
        return mask
    heads = Hq if mask == "per-head" else 1
    dense = torch.rand(B, heads, Lq, Lk, generator=torch.Generator().manual_seed(0)) < 0.7
    dense[..., 1, :] = False  # a row with no key
    return dense.to(DEVICE)


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "unpacked"])
@pytest.mark.parametrize("sm_count", [64, 1], ids=["split", "unsplit"])
@pytest.mark.parametrize(("shape", "mask", "mod"), DECODING_CASES.values(), ids=DECODING_CASES)
def test_decoding_output_and_lse_match_the_reference(
    monkeypatch, shape, mask, mod, sm_count, packed
):
    """Inference over few queries: packed, one program per (batch, kv head) takes the queries
    of all its query heads (PackGQA); split, each row's kv tiles are spread over programs
    (FlashDecoding) and the partial results merged by their LSEs. Output and LSE as the
    float64 reference, either way."""
    from attnkit.backends import triton as tr

    B, Hq, Hkv, Lq, Lk, D, Dv = shape
    q64, k64, v64 = (t.to(DEVICE) for t in rand_qkv(B, Hq, Hkv, Lq, Lk, D, Dv, torch.float64))
    mask = _decoding_mask(mask, B, Hq, Lq, Lk)
    monkeypatch.setattr(tr, "sm_count", lambda device: sm_count)  # 64: not filled by these
    monkeypatch.setattr(tr.launches, "PACK_GQA", packed)
    launched = record_launches(monkeypatch)
    results = {}
    for name, dtype, backend in (
        ("ref64", torch.float64, "reference"),
        ("ref32", torch.float32, "reference"),
        ("triton", torch.float32, "triton"),
    ):
        q, k, v = (t.to(dtype) for t in (q64, k64, v64))
        results[name] = attnkit.attention(
            q, k, v, mask=mask, score_mod=mod, backend=backend, return_lse=True
        )
    (call,) = launched
    packs = packed and not (isinstance(mask, torch.Tensor) and mask.shape[1] > 1)
    assert call.meta["PACK_GQA"] is packs
    if packs:  # one program per (batch, kv head) over all its query heads' queries
        assert call.grid[:2] == (1, B * Hkv)
        assert call.meta["BLOCK_M"] == max(16, Hq // Hkv * Lq)
    assert (call.grid[2] > 1) is (sm_count > 1)
    (out, lse), (want, want_lse), (low, low_lse) = (
        results[n] for n in ("triton", "ref64", "ref32")
    )
    assert_close_scaled(out, want, low, floor=2e-5)
    finite = torch.isfinite(want_lse)
    assert torch.equal(torch.isfinite(lse), finite)
    assert_close_scaled(lse[finite], want_lse[finite], low_lse[finite], floor=2e-5, what="lse")
    if isinstance(mask, torch.Tensor):  # the row with no key: zeros, as in training
        assert torch.equal(out[:, :, 1], torch.zeros_like(out[:, :, 1]))


def test_decoding_tiles_pack_query_heads_only_where_they_fit_one_forward_tile(monkeypatch):
    from attnkit.backends import triton as tr
    from attnkit.backends.triton import Launch, decoding_launch

    forward = Launch(128, 64, 8, 3)
    assert decoding_launch(forward, group=4, Lq=1) == Launch(16, 64, 4, 3)  # rows up to 16
    assert decoding_launch(forward, group=8, Lq=5) == Launch(64, 64, 4, 3)
    assert decoding_launch(forward, group=1, Lq=1) == Launch(16, 64, 4, 3)  # MHA: a 16-row tile
    assert decoding_launch(forward, group=4, Lq=32) == Launch(128, 64, 8, 3)  # as large
    assert decoding_launch(forward, group=4, Lq=33) is None  # larger than the forward's
    monkeypatch.setattr(tr.launches, "PACK_GQA", False)
    assert decoding_launch(forward, group=4, Lq=1) is None


@pytest.mark.filterwarnings("ignore:All-NaN slice:RuntimeWarning")  # numpy's max, interpreted
def test_a_nan_in_one_split_reaches_the_merged_row(monkeypatch):
    from attnkit.backends import triton as tr

    monkeypatch.setattr(tr, "sm_count", lambda device: 64)
    q, k, v = (t.to(DEVICE) for t in rand_qkv(1, 2, 2, 1, 200, 16))
    k[0, 1, 150, 3] = float("nan")
    out, lse = attnkit.attention(q, k, v, backend="triton", return_lse=True)
    assert out[0, 1].isnan().all()
    assert lse[0, 1].isnan().all()
    assert not out[0, 0].isnan().any()


def test_second_derivatives_raise():
    q, k, v = (t.to(DEVICE) for t in rand_qkv(1, 2, 2, 17, 17, 16, requires_grad=True))
    out = attnkit.attention(q, k, v, mask=masks.causal(), backend="triton")
    grads = torch.autograd.grad(out.sum(), (q, k, v), create_graph=True)
    with pytest.raises(attnkit.UnsupportedError, match="triton backend computes first-order"):
        torch.autograd.grad(sum((g**2).sum() for g in grads), (q, k, v))


def test_refuses_what_it_cannot_do():
    q = torch.randn(1, 2, 8, 16, device=DEVICE)
    with pytest.raises(attnkit.UnsupportedError, match="score_mods run in-kernel"):
        attnkit.attention(q, q, q, score_mod=lambda s, b, h, i, j: s, backend="triton")
    with pytest.raises(attnkit.UnsupportedError, match="dropout"):
        attnkit.attention(q, q, q, dropout_p=0.1, backend="triton")
    with pytest.raises(attnkit.UnsupportedError, match="float16, bfloat16 or float32"):
        attnkit.attention(q.double(), q.double(), q.double(), backend="triton")


def test_float16_inputs():
    check((1, 2, 1, 33, 33, 32, 32), mask=masks.causal(), dtype=torch.float16)


@triton.jit
def _round_kernel(x_ptr, out_ptr, N: tl.constexpr, DOT_PRECISION: tl.constexpr):
    r = tl.arange(0, N)
    tl.store(out_ptr + r, cast(tl.load(x_ptr + r), tl.bfloat16, DOT_PRECISION))


def test_bfloat16_rounding_is_to_nearest_even():
    """kernel_parts.cast rounds bf16 P tiles and results to nearest even, as torch and a GPU do.

    The interpreter's own cast truncates: a biased error up to twice as large, which took the
    kernels' bf16 outputs or gradients past DESIGN §7's bounds in 5 of 160 random cases (mixed
    masks, score mods, shapes and dtypes); rounding to nearest even, in none of 350.
    """
    scales = 10.0 ** torch.randint(-30, 30, (4096,), generator=torch.Generator().manual_seed(0))
    x = torch.randn(4096) * scales  # normal floats: bf16 keeps fp32's exponent range
    x[:4] = torch.tensor([1 + 2**-8, 1 + 3 * 2**-8, float("inf"), -float("inf")])  # ties, infs
    out = torch.empty(4096, dtype=torch.bfloat16, device=DEVICE)
    dot_precision = "widen" if DEVICE == "cpu" else "ieee"
    _round_kernel[(1,)](x.to(DEVICE), out, N=4096, DOT_PRECISION=dot_precision)
    assert torch.equal(out.cpu().view(torch.int16), x.to(torch.bfloat16).view(torch.int16))


ALIBI_SOFTCAP = score_mods.compose(
    score_mods.alibi(score_mods.alibi_slopes(4)), score_mods.softcap(10.0)
)


@pytest.mark.parametrize(
    ("shape", "mask", "mod"),
    [
        ((1, 2, 1, 33, 33, 32, 32), masks.causal(), None),
        ((2, 4, 2, 17, 40, 64, 40), masks.sliding_window(9, 2), ALIBI_SOFTCAP),
        ((2, 2, 2, 37, 37, 16, 16), masks.document([0] * 10 + [1] * 15 + [2] * 12), None),
        ((1, 4, 1, 1, 45, 40, 40), masks.causal(align="top_left"), ALIBI_SOFTCAP),
    ],
    ids=["causal", "gqa-window-alibi-softcap", "document", "decoding"],
)
def test_bfloat16_inputs(shape, mask, mod):
    """bf16 (under the interpreter, tiles are widened for tl.dot: kernel_parts.dot)."""
    check(shape, mask=mask, score_mod=mod, dtype=torch.bfloat16)


@pytest.mark.parametrize("grad", [False, True], ids=["inference", "training"])
def test_runs_under_torch_compile(grad):
    """The kernels are torch custom ops: compiled graphs call them (building the BlockMask
    is data dependent and stays outside the graph)."""
    from torch._dynamo.testing import CompileCounterWithBackend

    q, k, v = (torch.randn(1, 2, 33, 32, device=DEVICE, requires_grad=grad) for _ in range(3))

    def f(q, k, v):
        return attnkit.attention(q, k, v, mask=masks.causal(), backend="triton")

    graphs = CompileCounterWithBackend("aot_eager")
    torch.testing.assert_close(torch.compile(f, backend=graphs)(q, k, v), f(q, k, v))
    targets = {str(node.target) for g in graphs.graphs for node in g.graph.nodes}
    assert "attnkit.triton_forward.default" in targets


def test_eager_calls_skip_the_custom_ops_dispatch(monkeypatch):
    """Eager calls run the launcher directly: the ops' Python dispatch would cost a decoding
    step more host time than its kernel takes on a GPU."""
    from attnkit.backends import triton as tr

    def dispatched(*args):
        raise AssertionError("went through the custom op")

    monkeypatch.setattr(tr, "triton_forward", dispatched)
    monkeypatch.setattr(tr, "triton_backward", dispatched)
    q, k, v = (torch.randn(1, 2, 9, 16, device=DEVICE, requires_grad=True) for _ in range(3))
    with torch.no_grad():
        attnkit.attention(q, k, v, backend="triton")
    attnkit.attention(q, k, v, backend="triton").sum().backward()


@pytest.mark.parametrize("by_columns", [False, True], ids=["rows", "columns"])
@pytest.mark.parametrize(("Lq", "Lk"), [(1, 1), (1, 100), (40, 33), (16, 64)])
def test_the_walk_of_every_key_is_the_full_block_masks(by_columns, Lq, Lk):
    from attnkit.backends import triton as tr
    from attnkit.backends.triton import Launch
    from attnkit.backends.triton.walks import _build_walk, _full_walk

    launch = Launch(16, 32, 1, 1)
    built = _build_walk(masks.full().blocks(Lq, Lk, 16, 32), by_columns, torch.device(DEVICE))
    made = _full_walk(Lq, Lk, launch, by_columns, torch.device(DEVICE))
    for name in ("num", "idx", "tile", "bits"):
        got, want = getattr(made, name), getattr(built, name)
        assert (got.shape, got.dtype) == (want.shape, want.dtype), name
        assert torch.equal(got, want), name
    assert tr.walks.keeps_every_key(None, Lq, Lk)


def test_decoding_under_causal_builds_no_block_mask_as_the_cache_grows(monkeypatch):
    """One query under a bottom-right causal mask keeps every key: no BlockMask is built for
    each new cache length (it cost a decoding step more host time than its kernel)."""
    from attnkit.backends import triton as tr

    assert tr.walks.keeps_every_key(masks.causal(), 1, 60)
    assert not tr.walks.keeps_every_key(masks.causal(), 2, 60)
    assert not tr.walks.keeps_every_key(masks.causal(align="top_left"), 1, 60)
    assert not tr.walks.keeps_every_key(masks.sliding_window(8), 1, 60)
    assert tr.walks.keeps_every_key(masks.sliding_window(8), 1, 9)  # a windowed cache's 9 keys

    def built(*args, **kwargs):
        raise AssertionError("a BlockMask was built")

    q, k, v = (t.to(DEVICE) for t in rand_qkv(1, 4, 2, 1, 60, 16))
    want = [
        attnkit.attention(q, k[:, :, :n], v[:, :, :n], mask=masks.causal(), backend="reference")
        for n in (58, 59, 60)
    ]
    monkeypatch.setattr(masks.Mask, "blocks", built)
    for n, expected in zip((58, 59, 60), want, strict=True):
        got = attnkit.attention(q, k[:, :, :n], v[:, :, :n], mask=masks.causal(), backend="triton")
        torch.testing.assert_close(got, expected, atol=2e-6, rtol=2e-6)


BANDS = {
    "causal": masks.causal(),
    "causal, top-left": masks.causal(align="top_left"),
    "window 7 back, 3 ahead": masks.sliding_window(7, 3),
    "unbounded back, 2 ahead": masks.sliding_window(-1, 2),
    "7 back, unbounded ahead": masks.sliding_window(7, -1),
    "window off the keys for some rows": masks.sliding_window(4, 4, align=-12),
    "window & causal": masks.sliding_window(9, 4) & masks.causal(),
}


def _no_block_mask(*args, **kwargs):
    raise AssertionError("a BlockMask was built")


@pytest.mark.parametrize(
    "shape", [(1, 4, 2, 37, 29, 32, 32), (2, 2, 1, 20, 53, 16, 16)], ids=["Lq>Lk", "Lq<Lk"]
)
@pytest.mark.parametrize("mask", BANDS.values(), ids=BANDS)
def test_band_masks_are_computed_in_the_kernels(monkeypatch, shape, mask):
    """Causal and sliding-window masks need no tile map: every kernel finds its tiles from
    the band lo <= j - i <= hi and masks the tiles on its edge by comparing indices. Output,
    LSE and gradients as the float64 reference, with no BlockMask built."""
    from attnkit.backends import triton as tr

    launched = record_launches(monkeypatch)
    monkeypatch.setattr(masks.Mask, "blocks", _no_block_mask)
    check(shape, mask=mask, return_lse=True)
    assert [call.meta["BAND"] for call in launched] == [True] * 3
    assert tr.kernel_band(_req(shape, mask)) == masks.band(mask, shape[3], shape[4])


def test_band_masks_with_alibi_mask_every_tile_in_the_kernels(monkeypatch):
    """With ALiBi the kernels mask every tile of the band, not only its edge tiles."""
    launched = record_launches(monkeypatch)
    monkeypatch.setattr(masks.Mask, "blocks", _no_block_mask)
    mod = score_mods.alibi(score_mods.alibi_slopes(4))
    check((1, 4, 2, 37, 29, 32, 32), mask=masks.sliding_window(7, 3), score_mod=mod)
    assert [(c.meta["BAND"], c.meta["HAS_ALIBI"]) for c in launched] == [(True, True)] * 3


def test_band_masks_with_softcap_walk_tile_lists():
    """Softcap's kernels spilled registers computing the band (see ``kernel_band``)."""
    from attnkit.backends import triton as tr
    from attnkit.functional import _request

    q, k, v = (t.to(DEVICE) for t in rand_qkv(1, 2, 2, 40, 40, 16))
    alibi = score_mods.alibi(score_mods.alibi_slopes(2))
    for mod, banded in ((score_mods.softcap(30.0), False), (alibi, True)):
        req = _request(q, k, v, masks.causal(), mod, None, 0.0, None, False)
        assert bool(tr.kernel_band(req)) is banded


@pytest.mark.parametrize("mask", [masks.causal(), masks.sliding_window(7, 3)], ids=repr)
def test_band_masks_walk_tile_lists_when_told_to(monkeypatch, mask):
    """``BAND_IN_KERNEL = False`` (the GPU benchmark's comparison) walks them as any mask."""
    from attnkit.backends import triton as tr

    monkeypatch.setattr(tr.walks, "BAND_IN_KERNEL", False)
    launched = record_launches(monkeypatch)
    check((1, 4, 2, 37, 29, 32, 32), mask=mask, return_lse=True)
    assert not any(call.meta["BAND"] for call in launched)


def _req(shape, mask):
    from attnkit.functional import _request

    q, k, v = (t.to(DEVICE) for t in rand_qkv(*shape))
    return _request(q, k, v, mask, None, None, 0.0, None, False)


@pytest.mark.parametrize(
    "mask",
    [None, masks.full(), masks.causal() & masks.key_padding([40]), masks.dilated(3, 2)],
    ids=repr,
)
def test_no_band_where_every_key_is_kept_or_the_mask_is_no_band(mask):
    from attnkit.backends import triton as tr

    assert tr.kernel_band(_req((1, 2, 2, 40, 50, 16, 16), mask)) == ()
    # one query under causal keeps every key: nothing to compare at all
    assert tr.kernel_band(_req((1, 2, 2, 1, 50, 16, 16), masks.causal())) == ()


@pytest.mark.parametrize(
    "mask", [masks.causal(), masks.sliding_window(20), masks.sliding_window(3, 40)], ids=repr
)
@pytest.mark.parametrize(("Lq", "Lk"), [(1, 300), (5, 300), (40, 300), (300, 300)])
def test_row_kv_tiles_bounds_the_tiles_a_band_reaches(mask, Lq, Lk):
    """The split-KV heuristic's tile count: never fewer than a query tile visits, at most
    one more."""
    from attnkit.backends import triton as tr

    req = _req((1, 2, 2, Lq, Lk, 16, 16), mask)
    launch = tr.Launch(16, 32, 1, 1)
    bound = tr.row_kv_tiles(req, launch)
    visited = (mask.blocks(Lq, Lk, 16, 32).kinds != 0).sum(-1).max()
    if tr.kernel_band(req):
        assert visited <= bound <= visited + 1
    else:
        assert bound == -(-Lk // 32)


def test_decoding_under_a_window_builds_no_block_mask_as_the_cache_grows(monkeypatch):
    """A window over a growing cache (not a windowed one: it hides the oldest keys) used to
    build a tile map at every step; the kernels now compute it, in inference and training."""
    q, k, v = (t.to(DEVICE) for t in rand_qkv(1, 4, 2, 2, 60, 16))
    mask = masks.sliding_window(8)
    want = [
        attnkit.attention(q, k[:, :, :n], v[:, :, :n], mask=mask, backend="reference")
        for n in (58, 59, 60)
    ]
    monkeypatch.setattr(masks.Mask, "blocks", _no_block_mask)
    for n, expected in zip((58, 59, 60), want, strict=True):
        with torch.no_grad():
            got = attnkit.attention(q, k[:, :, :n], v[:, :, :n], mask=mask, backend="triton")
        torch.testing.assert_close(got, expected, atol=2e-6, rtol=2e-6)
    k.requires_grad_()
    attnkit.attention(q, k, v, mask=mask, backend="triton").sum().backward()
    assert k.grad is not None


def _kept_at_random(B, Lk):
    """(B, Lk) bool: about 80 % of the keys kept, at random (seed 1)."""
    return torch.rand(B, Lk, generator=torch.Generator().manual_seed(1)) > 0.2


KEY_RANGES = {  # (mask, Lq, Lk, score_mod)
    "documents, ids out of order": (
        masks.document(torch.tensor([2, 0, 1]).repeat_interleave(torch.tensor([10, 3, 24]))),
        37,
        37,
        None,
    ),
    "documents & causal & padding": (
        masks.document(packed_document_ids([20, 1, 16])[0])
        & masks.causal()
        & masks.key_padding([37, 19]),
        37,
        37,
        None,
    ),
    "documents, query ids, Lq != Lk": (
        masks.document(torch.arange(23) // 6, torch.arange(41) // 10),
        23,
        41,
        None,
    ),
    "prefix_lm & padding, Lq < Lk": (
        masks.prefix_lm(9) & masks.key_padding([41, 30]),
        23,
        41,
        None,
    ),
    "key_ranges at random, empty rows": (
        masks.key_ranges(*random_key_ranges(29, 45, (-6, 30))),
        29,
        45,
        None,
    ),
    "ranges from a tile's last key to the next one's first": (
        masks.key_ranges([31] * 16 + [15] * 13, [32] * 16 + [16] * 13),
        29,
        45,
        None,
    ),
    "causal & padding": (masks.causal() & masks.key_padding([30, 37]), 37, 37, None),
    "padding tensor (B, 1, 1, Lk)": (_kept_at_random(2, 41)[:, None, None], 23, 41, None),
    "padding tensor (Lk,), alibi": (
        _kept_at_random(1, 41)[0],
        23,
        41,
        score_mods.alibi(score_mods.alibi_slopes(4)),
    ),
    "window & random padding, alibi": (
        masks.sliding_window(5, 2) & masks.from_padding_mask(_kept_at_random(2, 37)),
        37,
        37,
        score_mods.alibi(score_mods.alibi_slopes(4)),
    ),
    "varlen, causal": (
        attnkit.varlen.varlen_mask(
            torch.tensor([0, 1, 6, 20, 35]), torch.tensor([0, 9, 14, 40, 50]), causal=True
        ),
        35,
        50,
        score_mods.alibi(score_mods.alibi_slopes(4)),
    ),
}


def _triton_results(q, k, v, mask, mod):
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out, lse = attnkit.attention(
        q, k, v, mask=mask, score_mod=mod, backend="triton", return_lse=True
    )
    loss = (out * torch.arange(out.shape[-1], device=DEVICE)).sum()
    loss = loss + lse.masked_fill(torch.isinf(lse), 0).sum()
    return (out, lse, *torch.autograd.grad(loss, (q, k, v)))


@pytest.mark.parametrize(("mask", "Lq", "Lk", "mod"), KEY_RANGES.values(), ids=KEY_RANGES)
def test_key_ranges_are_masked_in_the_kernels(monkeypatch, mask, Lq, Lk, mod):
    """Documents, prefix LM, varlen, key ranges and padding: tile lists found from each query
    tile's first and last keys, partial tiles masked by comparing indices, no BlockMask built
    and no bitmap read. Output, LSE and gradients as the float64 reference, and bit for bit
    what the same kernels give walking the mask's BlockMask (GQA, two sequences; under the
    interpreter: compiled for a GPU, to fp32 rounding)."""
    from attnkit.backends import triton as tr

    shape = (2, 4, 2, Lq, Lk, 16, 16)
    q, k, v = (t.to(DEVICE) for t in rand_qkv(*shape))
    monkeypatch.setattr(tr.walks, "BAND_IN_KERNEL", False)
    walked = _triton_results(q, k, v, mask, mod)
    monkeypatch.setattr(tr.walks, "BAND_IN_KERNEL", True)
    launched = record_launches(monkeypatch)
    monkeypatch.setattr(masks.Mask, "blocks", _no_block_mask)
    got = _triton_results(q, k, v, mask, mod)
    assert [(c.meta["RANGES"], c.meta["BAND"]) for c in launched] == [(True, False)] * 3
    for what, g, w in zip(("out", "lse", "dq", "dk", "dv"), got, walked, strict=True):
        if DEVICE == "cpu":
            assert torch.equal(g, w), what
        else:  # compiled at one stage fewer: the compiler may fuse other multiply-adds
            torch.testing.assert_close(g, w, msg=what)
    check(shape, mask=mask, score_mod=mod, return_lse=True)


def test_a_varlen_decoding_batch_packs_heads_over_key_ranges(monkeypatch):
    """One query per sequence over its own cache (a serving step): query heads packed by kv
    head, rows split over programs, partial tiles masked from each sequence's key range."""
    cu_q = torch.arange(5)
    cu_k = torch.tensor([0, 9, 40, 41, 75])
    g = torch.Generator().manual_seed(0)
    q = torch.randn(4, 8, 16, generator=g).to(DEVICE)
    k, v = (torch.randn(75, 2, 16, generator=g).to(DEVICE) for _ in range(2))
    want = attnkit.varlen_attention(q, k, v, cu_q, cu_k, causal=True, backend="reference")
    launched = record_launches(monkeypatch)
    monkeypatch.setattr(masks.Mask, "blocks", _no_block_mask)
    with torch.no_grad():
        got = attnkit.varlen_attention(q, k, v, cu_q, cu_k, causal=True, backend="triton")
    ((meta, grid),) = [(c.meta, c.grid) for c in launched]
    assert (meta["RANGES"], meta["PACK_GQA"]) == (True, True)
    assert grid[2] > 1  # kv splits
    torch.testing.assert_close(got, want, atol=2e-6, rtol=2e-6)


@pytest.mark.parametrize("by_columns", [False, True], ids=["rows", "columns"])
@pytest.mark.parametrize(("mask", "Lq", "Lk", "mod"), KEY_RANGES.values(), ids=KEY_RANGES)
def test_key_range_walks_list_every_tile_the_block_mask_does(by_columns, mask, Lq, Lk, mod):
    """The walk found from key ranges visits every non-empty tile of the mask's BlockMask, and
    calls full only its full tiles (it may visit more: tiles between two rows' ranges)."""
    from attnkit.backends import triton as tr

    q, k, v = (t.to(DEVICE) for t in rand_qkv(2, 4, 2, Lq, Lk, 16))
    req = attnkit.functional._request(q, k, v, mask, mod, None, 0.0, None, False)
    launch = tr.Launch(16, 32, 1, 1)
    walk = tr.tile_walk(req, launch, by_columns)
    assert walk.in_ranges
    if isinstance(mask, torch.Tensor):
        kinds = tensor_block_mask(mask, Lq, Lk, 16, 32, 2, 4).kinds
    else:
        kinds = mask.blocks(Lq, Lk, 16, 32, B=2, H=4).kinds
    kinds = kinds.expand(walk.tile.shape[0], *kinds.shape[1:])[:, :1]
    listed = torch.zeros_like(kinds, dtype=torch.bool)
    lists = listed.transpose(-1, -2) if by_columns else listed
    for index in torch.cartesian_prod(*(torch.arange(n) for n in walk.num.shape)).tolist():
        b, h, row = index
        lists[b, h, row, walk.idx[b, h, row, : walk.num[b, h, row]].long()] = True
    assert torch.all(listed | (kinds == 0)), "a non-empty tile is not listed"
    full = walk.tile == -1
    assert torch.all(~(full & listed) | (kinds == 2)), "a tile called full is not"


@pytest.mark.parametrize("in_kernel", [True, False], ids=["key ranges", "BlockMask"])
def test_key_range_kernels_take_one_stage_fewer(monkeypatch, in_kernel):
    """As the band's (``launches.band_launches``): with no bitmap to load, their loops
    pipelined every stage and overflowed shared memory at the table's stages."""
    from attnkit.backends import triton as tr

    two_stages = tr.Launch(16, 16, 1, 2)
    monkeypatch.setattr(tr, "choose_launches", lambda *a: tr.launches.Launches(*[two_stages] * 3))
    monkeypatch.setattr(tr.walks, "BAND_IN_KERNEL", in_kernel)
    launched = record_launches(monkeypatch)
    q, k, v = (t.to(DEVICE).requires_grad_() for t in rand_qkv(1, 2, 2, 20, 20, 16))
    attnkit.attention(
        q, k, v, mask=masks.document(packed_document_ids([7, 13])[0]), backend="triton"
    ).sum().backward()
    stages = 1 if in_kernel else 2
    assert [(c.meta["RANGES"], c.meta["num_stages"]) for c in launched] == [(in_kernel, stages)] * 3


def test_key_ranges_with_softcap_walk_bitmaps():
    """Softcap's kernels spilled registers masking from ranges (see ``kernel_ranges``)."""
    from attnkit.backends import triton as tr

    mask = masks.document(packed_document_ids([10, 3, 24])[0])
    for mod, in_ranges in ((score_mods.softcap(30.0), False), (None, True)):
        q, k, v = (t.to(DEVICE) for t in rand_qkv(1, 2, 2, 37, 37, 16))
        req = attnkit.functional._request(q, k, v, mask, mod, None, 0.0, None, False)
        assert (tr.kernel_ranges(req) is not None) is in_ranges


def test_key_range_walks_made_once_per_mask_and_lengths():
    """A model's layers share the mask: its ranges and walks are made once per device and
    tiles (varlen makes a new mask, and so new walks, at each call)."""
    from attnkit.backends import triton as tr

    mask = masks.document(packed_document_ids([10, 3, 24])[0]) & masks.causal()

    q, k, v = (t.to(DEVICE) for t in rand_qkv(1, 2, 2, 37, 37, 16))
    req = attnkit.functional._request(q, k, v, mask, None, None, 0.0, None, False)

    def walk(by_columns=False):
        return tr.tile_walk(req, tr.Launch(16, 16, 1, 1), by_columns)

    first = walk()
    assert first.in_ranges
    assert walk() is first
    columns = walk(by_columns=True)
    assert columns is not first
    assert columns.ranges is first.ranges


def test_padding_tensor_walks_made_once_per_tensor_until_written():
    """A model passes one padding tensor to every layer: its ranges and walk are made once,
    and again after an in-place write (its version counter moves)."""
    from attnkit.backends import triton as tr

    keep = _kept_at_random(2, 37)[:, None, None]
    q, k, v = (t.to(DEVICE) for t in rand_qkv(2, 2, 2, 37, 37, 16))

    def walk():
        req = attnkit.functional._request(q, k, v, keep, None, None, 0.0, None, False)
        return tr.tile_walk(req, tr.Launch(16, 16, 1, 1))

    first = walk()
    assert first.in_ranges
    assert walk() is first
    keep[0, ..., :5] = False
    again = walk()
    assert again is not first
    assert torch.equal(again.keys[0, :5].cpu(), torch.zeros(5, dtype=torch.int8))


def test_tile_walks_built_once_per_mask_and_device():
    """Calls that reuse a mask, or an equal one, reuse its tile walks (no argsort or
    host-to-device copy)."""
    from attnkit.backends import triton as tr
    from attnkit.functional import _request

    q, k, v = (t.to(DEVICE) for t in rand_qkv(1, 2, 2, 40, 40, 16))
    launch = tr.choose_launches(16, q.dtype, tr.gpu_arch(q.device)).forward

    def walk(mask, by_columns=False):
        req = _request(q, k, v, mask, None, None, 0.0, None, False)
        return tr.tile_walk(req, launch, by_columns)

    mask = masks.dilated(9, 2)
    first = walk(mask)
    assert walk(mask) is first
    assert walk(masks.dilated(9, 2)) is first  # the same spec: Mask.blocks shares
    assert walk(masks.dilated(10, 2)) is not first
    assert walk(mask, by_columns=True).bits is first.bits  # rows and columns share bitmaps
    assert first.num.device == q.device


def test_trainable_alibi_slopes_are_refused_not_silently_frozen():
    """The kernels compute no slope gradient: triton says so, and auto routes to tiled."""
    slopes = score_mods.alibi_slopes(2).requires_grad_()
    q, k, v = (t.to(DEVICE) for t in rand_qkv(1, 2, 2, 16, 16, 16))
    mod = score_mods.alibi(slopes)
    with pytest.raises(attnkit.UnsupportedError, match="require grad"):
        attnkit.attention(q, k, v, score_mod=mod, backend="triton")
    assert attnkit.dispatch(q, k, v, score_mod=mod).backend == "tiled"
    with torch.no_grad():  # nothing to learn: the kernels may apply them
        attnkit.attention(q, k, v, score_mod=mod, backend="triton")


def test_slices_past_32_bit_offsets_are_refused():
    """Offsets within one (batch, head) slice are 32-bit: a slice reaching 2^31 elements
    would wrap around, so it is refused and auto goes elsewhere; a whole tensor may pass."""
    from attnkit.backends import triton as tr
    from attnkit.functional import _request

    def reason(q, kv):
        return tr.unsupported_reason(_request(q, kv, kv, None, None, None, 0.0, None, False))

    small = torch.zeros(1, device=DEVICE).expand(2, 4, 64, 256)
    many_slices = torch.zeros(1, device=DEVICE).expand(2, 4, 2**20, 256)  # 2^31, no memory
    assert reason(small, small) is None
    assert reason(many_slices, small) is None
    one_slice = torch.zeros(1, device=DEVICE).expand(1, 1, 2**23, 256)  # 2^31 in one slice
    assert "a slice here spans 2147483648 >= 2^31" in reason(one_slice, one_slice[:, :, :64])
    # the kernels read a view in place: heads transposed out of (B, L, H, D) have rows
    # H·D apart, so 2^18 + 1 rows of 64 heads of 128 reach past 2^31
    rows_apart = torch.empty(1, 2**18 + 1, 64, 128, device="meta").transpose(1, 2)
    assert rows_apart[:, :1].numel() < 2**31 <= tr.slice_extent(rows_apart)
    # 64-bit offsets past the slice only for tensors that need them (they cost registers)
    prefix = torch.empty(3, 4, 2**20, 256, device="meta")[:, :, :64]  # spans past 2^31
    contiguous = torch.empty(2**31, dtype=torch.int8, device="meta")
    reach = [
        tr.calls._reaches_2_31(x) for x in (small, many_slices, prefix, contiguous, prefix[:1])
    ]
    assert reach == [False, False, True, True, False]  # expanded dims reach nothing


BIG_OFFSETS = """
import sys, torch, attnkit
from attnkit.backends import triton as tr
sys.path.insert(0, sys.argv[2])
from conftest import assert_close_scaled

H, L, D = 5, 20, 16
hs = 2**29 + 64  # head stride: the offset of head h, h·hs, passes 2^31 elements at h = 4
buf = torch.empty(H * hs, dtype=torch.float16, device=sys.argv[1])  # 5 GiB, little touched

def view(offset):
    x = buf.as_strided((1, H, L, D), (H * hs, hs, D, 1), offset)
    return x.copy_(torch.randn(1, H, L, D))

q, k, v = view(0), view(L * D), view(2 * L * D)
launched = []
launch = tr.calls.KernelCall.launch
tr.calls.KernelCall.launch = lambda call: (launched.append(call), launch(call))
with torch.no_grad():
    out = attnkit.attention(q, k, v, mask=attnkit.masks.causal(), backend="triton")
assert [call.meta["WIDE_OFFSETS"] for call in launched] == [True]
ref = {
    dtype: attnkit.attention(
        *(t.contiguous().to(dtype) for t in (q, k, v)), mask=attnkit.masks.causal(),
        backend="reference",
    )
    for dtype in (torch.float64, torch.float16)
}
assert_close_scaled(out, ref[torch.float64], ref[torch.float16])

# the packed decoding forward reaches each row's head through a vector of head offsets
launched.clear()
with torch.no_grad():
    out = attnkit.attention(q[:, :, -3:], k, v, mask=attnkit.masks.causal(), backend="triton")
assert [(c.meta["WIDE_OFFSETS"], c.meta["PACK_GQA"]) for c in launched] == [(True, True)]
ref = {
    dtype: attnkit.attention(
        *(t.contiguous().to(dtype) for t in (q[:, :, -3:], k, v)), mask=attnkit.masks.causal(),
        backend="reference",
    )
    for dtype in (torch.float64, torch.float16)
}
assert_close_scaled(out, ref[torch.float64], ref[torch.float16])
"""


@pytest.mark.slow
def test_heads_past_2_31_elements_into_the_buffer_are_reached_in_64_bit():
    """A head whose slice starts past 2^31 elements (views into one 5 GiB buffer, read in
    place): with 32-bit slice offsets it read out of bounds (a crash, hence the subprocess)."""
    import subprocess
    import sys
    from pathlib import Path

    tests = str(Path(__file__).parent)
    done = subprocess.run(
        [sys.executable, "-c", BIG_OFFSETS, DEVICE, tests], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]


# Per kernel (forward, dK/dV, dQ): tiles like sm_80's and sm_90's choices, and three
# different shapes, so each kernel walks its own BlockMask.
GPU_TILES = {
    "sm_80 tiles": [(128, 32)] * 3,
    "sm_90 tiles": [(64, 128)] * 3,
    "per-kernel tiles": [(128, 64), (32, 128), (128, 32)],
}


def gpu_launches(tiles):
    from attnkit.backends import triton as tr

    return tr.launches.Launches(*(tr.Launch(m, n, 4, 2) for m, n in tiles))


@pytest.mark.slow
@pytest.mark.parametrize("tiles", list(GPU_TILES.values()), ids=list(GPU_TILES))
@pytest.mark.parametrize(
    "mask",
    [masks.sliding_window(40), masks.document(torch.arange(150) * 3 // 150) & masks.causal()],
    ids=["window", "document&causal"],
)
def test_gpu_tile_shapes(monkeypatch, tiles, mask):
    """The tiles the launcher picks on GPUs are not square, unlike the interpreter's 16x16, and
    differ per kernel: the bitmaps, the dK/dV kernel's transposed scores and the tile walks
    are checked at those."""
    from attnkit.backends import triton as tr

    monkeypatch.setattr(tr, "choose_launches", lambda D, dtype, arch: gpu_launches(tiles))
    check((1, 4, 2, 150, 150, 64, 64), mask=mask, return_lse=True)


@pytest.mark.slow
def test_gpu_tile_shapes_with_score_mods_and_lq_ne_lk(monkeypatch):
    """ALiBi's distance and softcap in the dK/dV kernel's transposed scores, queries offset."""
    from attnkit.backends import triton as tr

    launches = gpu_launches([(64, 128), (32, 128), (128, 32)])
    monkeypatch.setattr(tr, "choose_launches", lambda D, dtype, arch: launches)
    slopes = score_mods.alibi_slopes(4)
    mod = score_mods.compose(score_mods.alibi(slopes), score_mods.softcap(3.0))
    check((1, 4, 2, 90, 200, 64, 64), mask=masks.causal(), score_mod=mod)


@pytest.mark.slow
def test_block_mask_at_other_tiles_is_retiled(monkeypatch):
    """A BlockMask built at FlexAttention's 128x128 (or any) tiles serves kernels whose tiles
    differ, and differ from each other, without rebuilding it from a predicate."""
    from attnkit.backends import triton as tr

    launches = gpu_launches([(64, 32), (32, 64), (64, 16)])
    monkeypatch.setattr(tr, "choose_launches", lambda D, dtype, arch: launches)
    layout = torch.tensor([[1, 0], [1, 1]], dtype=torch.bool)
    for mask in (masks.block_sparse(layout, 128), masks.sliding_window(37) | masks.causal()):
        check((1, 2, 2, 200, 200, 32, 32), mask=mask.blocks(200, 200, 128, 128))


def test_under_torch_export_triton_refuses_by_name_and_auto_takes_sdpa():
    """The launcher works from concrete sizes and host-side caches of tile lists: an exported
    graph gets SDPA (``auto``), and ``backend="triton"`` says why it cannot serve it."""

    class Attention(torch.nn.Module):
        def __init__(self, backend: str) -> None:
            super().__init__()
            self.backend = backend

        def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            out: torch.Tensor = attnkit.attention(
                q, k, v, mask=masks.causal(), backend=self.backend
            )
            return out

    q, k, v = (torch.randn(1, h, 40, 16, device=DEVICE) for h in (4, 2, 2))
    with pytest.raises(attnkit.UnsupportedError, match=r"not under torch\.export"):
        torch.export.export(Attention("triton"), (q, k, v))
    graph = torch.export.export(Attention("auto"), (q, k, v))
    want = attnkit.attention(q, k, v, mask=masks.causal(), backend="reference")
    torch.testing.assert_close(graph.module()(q, k, v), want)
