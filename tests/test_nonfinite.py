"""NaN and inf in the inputs reach exactly the outputs the reference says they reach.

A fast path must not hide a diverged input. The CPU kernels used to turn NaN scores into
probability 0 (AVX-512 maxps returns its second operand when either is NaN, and the exp2
clamp had x first), so a NaN query row came out as zeros with LSE -inf, like a fully masked
row, and a NaN key was silently ignored.
"""

from __future__ import annotations

import pytest
import torch

import attnkit
from attnkit import masks, score_mods
from attnkit.backends import tiled
from attnkit.backends.tiled import TileConfig
from conftest import assert_close_scaled, rand_qkv

B, HQ, HKV, LQ, LK, D = 2, 4, 2, 70, 90, 16  # GQA, Lq != Lk, a ragged last tile at 32
# q: a query row; k: a key in the second chunk of keys (64-89 at the tiles below), reached
# after the row already has a finite max, so the NaN must survive exp2 itself
POISONED = {"q": 37, "k": 70, "v": 70}

PATHS = {  # name: (dtype, use the compiled kernel)
    "compiled-fp32": (torch.float32, True),
    "compiled-bf16": (torch.bfloat16, True),
    "compiled-fp16": (torch.float16, True),
    "pytorch-fp32": (torch.float32, False),
}
MASKS = {
    "none": None,
    "causal": masks.causal(),
    "window": masks.sliding_window(4),
    "document&causal": masks.document(torch.arange(LK) * 3 // LK) & masks.causal(),
}
MODS = ["none", "alibi+softcap"]  # built per test (score_mod_for)


def poisoned(where: str, value: float) -> tuple[torch.Tensor, ...]:
    """float64 q, k, v with one element of q (query head 1) or k (kv head 1) set to ``value``."""
    q, k, v = rand_qkv(B, HQ, HKV, LQ, LK, D, dtype=torch.float64)
    {"q": q, "k": k, "v": v}[where][1, 1, POISONED[where], 5] = value
    return q, k, v


def score_mod_for(name: str) -> object:
    if name == "none":
        return None
    alibi = score_mods.alibi(score_mods.alibi_slopes(HQ))
    return score_mods.compose(alibi, score_mods.softcap(5.0))


def run_path(path: str, q, k, v, mask, mod, requires_grad=False):
    dtype, use_kernel = PATHS[path]
    q, k, v = (t.to(dtype).requires_grad_(requires_grad) for t in (q, k, v))
    req = attnkit.functional._request(q, k, v, mask, mod, None, 0.0, None, True)
    out, lse = tiled.run(req, TileConfig(32, 32, 64, use_kernel=use_kernel))
    return (q, k, v), out, lse


@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("where", ["q", "k"])
@pytest.mark.parametrize("mod", MODS)
@pytest.mark.parametrize("mask", list(MASKS))
@pytest.mark.parametrize("path", list(PATHS))
def test_non_finite_input_reaches_the_rows_that_attend_to_it(path, mask, mod, where, value):
    q, k, v = poisoned(where, value)
    mask_, mod_ = MASKS[mask], score_mod_for(mod)
    ref, ref_lse = attnkit.attention(
        q, k, v, mask=mask_, score_mod=mod_, backend="reference", return_lse=True
    )
    bad = ref.isnan()
    # the poison must reach some rows and not all, else this tests nothing; only softcap
    # makes inf harmless (c·tanh(±inf) = ±c)
    assert (bad.any() and not bad.all()) or (value == float("inf") and mod != "none")
    _, out, lse = run_path(path, q, k, v, mask_, mod_)
    assert torch.equal(out.isnan(), bad)
    # a NaN row has LSE NaN; a +inf score LSE +inf in the reference (NaN here); masked: -inf
    assert torch.equal(torch.isfinite(lse), torch.isfinite(ref_lse))
    ref_low = attnkit.attention(
        *(t.to(PATHS[path][0]) for t in (q, k, v)), mask=mask_, score_mod=mod_, backend="reference"
    )
    assert_close_scaled(out[~bad], ref[~bad], ref_low[~bad], mult=2.0, floor=1e-5)


@pytest.mark.parametrize("where", ["q", "k", "v"])
@pytest.mark.parametrize("path", ["compiled-fp32", "pytorch-fp32"])
def test_nan_reaches_the_gradients_the_reference_gives(path, where):
    """Without a mask (the reference's dense softmax spreads a NaN row's P over masked keys
    too, which a tiled kernel rightly does not, so masks would compare an artefact)."""
    q, k, v = poisoned(where, float("nan"))
    dout = torch.randn(B, HQ, LQ, D, dtype=torch.float64)

    def grads(inputs, out):
        return torch.autograd.grad(out, inputs, dout.to(out.dtype))

    ref_inputs = tuple(t.clone().requires_grad_() for t in (q, k, v))
    ref = grads(ref_inputs, attnkit.attention(*ref_inputs, backend="reference"))
    inputs, out, _ = run_path(path, q, k, v, None, None, requires_grad=True)
    assert any(g.isnan().any() for g in ref)
    assert not all(g.isnan().all() for g in ref)
    for name, got, want in zip("qkv", grads(inputs, out), ref, strict=True):
        assert torch.equal(got.isnan(), want.isnan()), f"d{name}"


@pytest.mark.slow
def test_portable_kernel_propagates_nan():
    """The portable loops (no AVX-512) take the same care: their exp2 keeps NaN."""
    from attnkit.backends import cpu_kernel
    from attnkit.block_mask import partial_bitmaps

    cpu_kernel.build(
        "attnkit_tiled_forward_cpu_portable",
        ["ATTNKIT_PORTABLE_SIMD", "ATTNKIT_OP_NAMESPACE=attnkit_portable"],
    )
    for where in ("q", "k"):
        for mask in (None, masks.causal()):
            q, k, v = poisoned(where, float("nan"))
            ref, ref_lse = attnkit.attention(
                q, k, v, mask=mask, backend="reference", return_lse=True
            )
            q, k, v = q.float(), k.float(), v.float()
            req = attnkit.functional._request(q, k, v, mask, None, None, 0.0, None, True)
            bm = tiled.block_mask_for(req, TileConfig(32, 32, 64))
            tile_index, bitmaps = partial_bitmaps(bm)
            out, lse = torch.ops.attnkit_portable.tiled_forward(
                q, k, v, bm.kinds, tile_index, bitmaps, torch.empty(0), 32, 32, 64, D**-0.5, 0.0,
                k.shape[2] - q.shape[2], -1, 0, 0.0,
            )  # fmt: skip
            assert ref.isnan().any()
            assert torch.equal(out.isnan(), ref.isnan()), (where, mask)
            assert torch.equal(lse.isnan(), ref_lse.isnan()), (where, mask)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mask", ["none", "causal"])
@pytest.mark.parametrize("backend", ["sdpa", "auto"])
@pytest.mark.parametrize("lengths", [(1, 5), (7, 7), (3, 15), (20, 40)], ids=str)
def test_sdpa_keeps_a_nan_query_row_nan(lengths, backend, mask, dtype):
    """Below 16 keys torch's CPU kernel returns zeros for a NaN query row (pytorch#141128).

    ``auto`` sends such unmasked calls to SDPA, so this is what a model's NaN meets there.
    """
    Lq, Lk = lengths
    q, k, v = rand_qkv(B, HQ, HKV, Lq, Lk, D, dtype=torch.float64)
    q[1, 1, Lq // 2, 5] = float("nan")
    ref = attnkit.attention(q, k, v, mask=MASKS[mask], backend="reference")
    assert ref.isnan().any()
    assert not ref.isnan().all()
    out = attnkit.attention(
        *(t.to(dtype) for t in (q, k, v)), mask=MASKS[mask], backend=backend
    )  # fmt: skip
    assert torch.equal(out.isnan(), ref.isnan())


@pytest.mark.parametrize("Lk", [5, 15, 40])
def test_sdpa_gives_a_nan_query_row_the_gradients_the_reference_gives(Lk):
    q, k, v = rand_qkv(B, HQ, HKV, 3, Lk, D, dtype=torch.float64)
    q[1, 1, 1, 5] = float("nan")
    dout = torch.randn(B, HQ, 3, D, dtype=torch.float64)
    grads = {}
    for backend, dtype in (("reference", torch.float64), ("sdpa", torch.float32)):
        inputs = tuple(t.to(dtype).requires_grad_() for t in (q, k, v))
        out = attnkit.attention(*inputs, backend=backend)
        grads[backend] = torch.autograd.grad(out, inputs, dout.to(dtype))
    for name, got, want in zip("qkv", grads["sdpa"], grads["reference"], strict=True):
        assert want.isnan().any()
        assert torch.equal(got.isnan(), want.isnan()), f"d{name}"
