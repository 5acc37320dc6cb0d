"""Bool tensor masks: their tile maps are built once per tensor, and never outlive it."""

import gc
import weakref

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import attnkit
from attnkit import masks
from attnkit.backends import tensor_masks
from attnkit.backends.tensor_masks import tensor_block_mask
from attnkit.block_mask import partial_bitmaps
from conftest import assert_close_scaled


def _mask(*shape, seed=0):
    """A sliding band with random holes: empty, full and partial tiles, odd lengths."""
    Lq, Lk = shape[-2:]
    band = masks.sliding_window(40, 9).dense(Lq, Lk)[0, 0]
    holes = torch.rand(*shape, generator=torch.Generator().manual_seed(seed)) < 0.97
    return band & holes


def _qkv(B, H, Lq, Lk, dtype=torch.float64):
    g = torch.Generator().manual_seed(1)
    return [
        torch.randn(B, H, L, 24, generator=g, dtype=dtype).requires_grad_() for L in (Lq, Lk, Lk)
    ]


@pytest.mark.parametrize(
    "shape", [(113, 203), (2, 1, 113, 203), (1, 3, 37, 70), (2, 1, 1, 203)], ids=str
)
def test_tile_map_and_predicate_are_those_of_from_dense(shape):
    mask = _mask(*shape)
    Lq = 113 if shape[-2] == 1 else shape[-2]
    Lk = shape[-1]
    B = shape[0] if len(shape) == 4 else 2
    m4 = mask.view((1,) * (4 - mask.dim()) + tuple(mask.shape))
    expected = masks.from_dense(m4.expand(m4.shape[0], m4.shape[1], Lq, Lk))
    for bq, bk in [(16, 32), (64, 64)]:
        got = tensor_block_mask(mask, Lq, Lk, bq, bk, B, 3)
        want = expected.blocks(Lq, Lk, bq, bk, B=B, H=3)
        assert got.counts()["partial"] > 0
        assert bq > 16 or got.counts()["empty"] > 0
        torch.testing.assert_close(got.kinds, want.kinds)
        # to_dense evaluates the predicate on partial tiles: here it reads the bitmaps
        torch.testing.assert_close(got.to_dense(), want.to_dense())
        # and the kernels read the bitmaps themselves
        for mine, theirs in zip(partial_bitmaps(got), partial_bitmaps(want), strict=True):
            torch.testing.assert_close(mine, theirs)


def test_the_same_tensor_is_classified_once_per_tile_shape():
    mask = _mask(2, 1, 113, 203)
    first = tensor_block_mask(mask, 113, 203, 64, 64, 2, 4)
    assert tensor_block_mask(mask, 113, 203, 64, 64, 2, 4) is first
    assert tensor_block_mask(mask, 113, 203, 32, 64, 2, 4) is not first
    # an equal tensor is another tensor: no identity, no sharing
    assert tensor_block_mask(mask.clone(), 113, 203, 64, 64, 2, 4) is not first


@pytest.mark.parametrize("backend", ["tiled", "auto"])
def test_a_mask_written_in_place_is_read_again(backend):
    q, k, v = _qkv(2, 2, 113, 203)
    mask = _mask(2, 1, 113, 203)
    before = attnkit.attention(q, k, v, mask=mask, backend=backend)
    mask[:, :, :, 100:] = False  # same tensor, new contents
    after = attnkit.attention(q, k, v, mask=mask, backend=backend)
    ref = attnkit.attention(q, k, v, mask=mask.clone(), backend="reference")
    torch.testing.assert_close(after, ref)
    assert not torch.allclose(before, after)


def test_a_tile_map_holds_no_reference_to_its_tensor():
    mask = _mask(2, 1, 113, 203)
    bm = tensor_block_mask(mask, 113, 203, 64, 64, 2, 4)
    alive = weakref.ref(mask)
    entries = len(tensor_masks._ENTRIES)
    del mask
    gc.collect()
    assert alive() is None
    assert len(tensor_masks._ENTRIES) == entries - 1
    assert bm.counts()["partial"] > 0  # and the map still works without it
    assert bm.to_dense().any()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_backward_runs_after_the_mask_tensor_is_freed(dtype):
    """A model's mask dies with its forward; the backward reads the tiles the forward kept."""
    q, k, v = _qkv(2, 2, 113, 203, dtype)
    mask = _mask(2, 1, 113, 203)
    ref_mask = mask.clone()
    out = attnkit.attention(q, k, v, mask=mask, backend="tiled")
    del mask
    gc.collect()
    grads = torch.autograd.grad(out.sum(), (q, k, v))

    def reference(dt):
        qr, kr, vr = (t.detach().to(dt).requires_grad_() for t in (q, k, v))
        o = attnkit.attention(qr, kr, vr, mask=ref_mask, backend="reference")
        return [o, *torch.autograd.grad(o.sum(), (qr, kr, vr))]

    ref64, ref_low = reference(torch.float64), reference(dtype)
    for fast, r64, low, what in zip([out, *grads], ref64, ref_low, "oqkv", strict=True):
        assert_close_scaled(fast, r64, low, floor=1e-12, what=what)


def test_inference_tensors_are_served_without_a_cache():
    q, k, v = (t.detach() for t in _qkv(1, 2, 37, 70))
    with torch.inference_mode():
        mask = _mask(1, 1, 37, 70)
        entries = len(tensor_masks._ENTRIES)
        out = attnkit.attention(q, k, v, mask=mask, backend="tiled")
        assert len(tensor_masks._ENTRIES) == entries
    torch.testing.assert_close(out, attnkit.attention(q, k, v, mask=mask, backend="reference"))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_tiles_whose_kind_differs_between_batch_rows(dtype):
    """Kernels evaluate the predicate for every row of a tile partial in any row: where it
    is full or empty in another, the predicate must say so there."""
    q, k, v = _qkv(2, 2, 113, 203, dtype)
    mask = _mask(2, 1, 113, 203)
    mask[0] = torch.arange(203) < 64  # batch 0: full tiles, then empty ones
    out = attnkit.attention(q, k, v, mask=mask, backend="tiled")
    ref = attnkit.attention(*(t.double() for t in (q, k, v)), mask=mask, backend="reference")
    low = attnkit.attention(q, k, v, mask=mask, backend="reference")
    assert_close_scaled(out, ref, low, floor=1e-12)


@settings(max_examples=25)
@given(
    B=st.integers(1, 2),
    H=st.sampled_from([1, 2]),
    Lq=st.integers(1, 140),
    Lk=st.integers(1, 140),
    broadcast=st.sampled_from(["none", "batch", "heads", "queries"]),
    density=st.sampled_from([0.0, 0.3, 0.9, 1.0]),
    seed=st.integers(0, 2**16),
)
def test_any_bool_tensor_twice_and_rewritten_matches_the_reference(
    B, H, Lq, Lk, broadcast, density, seed
):
    """Random bool tensors of every broadcast shape, over several tiles: tiled's output and
    gradients equal the float64 reference at the first call, at a second call (its cached
    tile map) and after the tensor is rewritten in place."""
    g = torch.Generator().manual_seed(seed)
    shape = [B, H, Lq, Lk]
    shape[{"none": 0, "batch": 0, "heads": 1, "queries": 2}[broadcast]] = (
        shape[0] if broadcast == "none" else 1
    )
    mask = torch.rand(*shape, generator=g) < density
    mask[..., : max(1, Lk // 3)] |= torch.rand(*shape[:-1], 1, generator=g) < 0.5  # some full
    q, k, v = (
        torch.randn(B, H, L, 8, generator=g, dtype=torch.float64).requires_grad_()
        for L in (Lq, Lk, Lk)
    )

    def both(m):
        out = {}
        for backend in ("tiled", "reference"):
            o = attnkit.attention(q, k, v, mask=m, backend=backend)
            out[backend] = [o, *torch.autograd.grad((o * o).sum(), (q, k, v))]
        for got, want in zip(out["tiled"], out["reference"], strict=True):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)

    both(mask)
    both(mask)
    mask.logical_not_()
    both(mask)


@pytest.mark.parametrize("backend", ["reference", "tiled", "sdpa", "auto"])
@pytest.mark.parametrize(
    "shape", [(), (1,), (203,), (113, 1), (113, 203), (3, 1, 203), (2, 1, 113, 203)], ids=str
)
def test_masks_of_every_rank_that_broadcasts(shape, backend):
    """A bool tensor of fewer than 4 dims gets leading 1s, as broadcasting gives it (torch
    SDPA itself raised an IndexError on a (Lk,) mask)."""
    q, k, v = _qkv(2, 3, 113, 203, dtype=torch.float32)
    g = torch.Generator().manual_seed(len(shape))
    mask = torch.rand(shape, generator=g) < 0.7 if shape else torch.tensor(True)
    full = mask.view((1,) * (4 - mask.dim()) + shape).expand(2, 3, 113, 203)
    runs = {
        "got": (backend, mask, torch.float32),
        "low": ("reference", full, torch.float32),
        "want": ("reference", full, torch.float64),
    }
    outs, grads = {}, {}
    for name, (b, m, dtype) in runs.items():
        x = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
        outs[name] = attnkit.attention(*x, mask=m, backend=b)
        grads[name] = torch.autograd.grad(outs[name].square().sum(), x)
    assert_close_scaled(outs["got"], outs["want"], outs["low"])
    for i, what in enumerate(("dq", "dk", "dv")):
        assert_close_scaled(grads["got"][i], grads["want"][i], grads["low"][i], 4.0, what=what)
