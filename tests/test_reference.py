"""The reference backend against a float64 formula written out in the test (conftest)."""

from __future__ import annotations

import math

import pytest
import torch

import attnkit
from attnkit import masks
from conftest import naive_attention, per_head_predicate, rand_qkv

SHAPES = [  # B, Hq, Hkv, Lq, Lk, D, Dv
    (1, 1, 1, 1, 1, 8, 8),
    (2, 4, 4, 17, 17, 40, 40),
    (1, 6, 2, 13, 29, 59, 23),  # GQA, Lq != Lk, D != Dv
    (2, 4, 1, 29, 11, 16, 16),  # MQA, Lq > Lk
]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("mask", [None, masks.causal(), masks.sliding_window(4, 2)])
def test_matches_formula_float64(shape, mask):
    B, Hq, Hkv, Lq, Lk, D, Dv = shape
    q, k, v = rand_qkv(B, Hq, Hkv, Lq, Lk, D, Dv, dtype=torch.float64)
    allowed = None if mask is None else mask.dense(Lq, Lk)
    out, lse = attnkit.attention(q, k, v, mask=mask, backend="reference", return_lse=True)
    exp_out, exp_lse = naive_attention(q, k, v, allowed)
    torch.testing.assert_close(out, exp_out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse, exp_lse, rtol=1e-12, atol=1e-12)
    assert out.dtype == torch.float64
    assert lse.dtype == torch.float64


def test_custom_mask_that_varies_per_batch_and_head():
    """The predicate is evaluated at the request's B and Hq (it used to see b = h = 0 only, so
    head 0's mask was applied to every head)."""
    B, Hq, Lq, Lk = 2, 4, 9, 14
    q, k, v = rand_qkv(B, Hq, 2, Lq, Lk, 8, dtype=torch.float64)
    b, h, i, j = (torch.arange(n).view(*[-1 if d == a else 1 for d in range(4)])
                  for a, n in enumerate((B, Hq, Lq, Lk)))  # fmt: skip
    allowed = (i + 2 * j + 3 * h + b) % 5 != 0
    mask = masks.custom(per_head_predicate)
    out = attnkit.attention(q, k, v, mask=mask, backend="reference")
    torch.testing.assert_close(out, naive_attention(q, k, v, allowed)[0], rtol=1e-12, atol=1e-12)
    weights = attnkit.attention_weights(q, k, v, mask=mask)
    assert torch.equal(weights > 0, allowed.expand(B, Hq, Lq, Lk))


@pytest.mark.parametrize(
    ("dtype", "atol"), [(torch.float32, 2e-6), (torch.bfloat16, 2e-2), (torch.float16, 2e-3)]
)
def test_low_precision_dtypes(dtype, atol):
    q, k, v = rand_qkv(2, 4, 2, 33, 47, 32, dtype=dtype)
    out, lse = attnkit.attention(q, k, v, mask=masks.causal(), backend="reference", return_lse=True)
    exp_out, exp_lse = naive_attention(q, k, v, masks.causal().dense(33, 47))
    assert out.dtype == dtype
    assert lse.dtype == torch.float32
    torch.testing.assert_close(out.double(), exp_out, atol=atol, rtol=0)
    torch.testing.assert_close(lse.double(), exp_lse, atol=1e-5, rtol=1e-5)


def test_scale_and_score_mod():
    q, k, v = rand_qkv(1, 2, 2, 9, 12, 8, dtype=torch.float64)
    bias = torch.randn(1, 2, 9, 12, dtype=torch.float64)

    def add_bias(score, b, h, qi, kv):
        return score + bias[b, h, qi, kv]

    out = attnkit.attention(q, k, v, scale=0.3, score_mod=add_bias, backend="reference")
    torch.testing.assert_close(out, naive_attention(q, k, v, scale=0.3, bias=bias)[0])


def test_fully_masked_rows_are_zero_not_nan():
    q, k, v = rand_qkv(1, 2, 2, 6, 6, 8, requires_grad=True)
    allowed = torch.ones(6, 6, dtype=torch.bool)
    allowed[2] = False
    out, lse = attnkit.attention(q, k, v, mask=allowed, backend="reference", return_lse=True)
    assert torch.equal(out[:, :, 2], torch.zeros_like(out[:, :, 2]))
    assert bool(torch.isneginf(lse[:, :, 2]).all())
    assert bool(torch.isfinite(lse[:, :, [0, 1, 3]]).all())
    out.sum().backward()
    for t in (q, k, v):
        assert bool(torch.isfinite(t.grad).all())
    assert torch.equal(q.grad[:, :, 2], torch.zeros_like(q.grad[:, :, 2]))


def test_large_logits_stay_finite():
    q = torch.full((1, 1, 4, 8), 100.0)
    k = torch.full((1, 1, 5, 8), 100.0)
    v = torch.randn(1, 1, 5, 8)
    out, lse = attnkit.attention(
        q, k, v, scale=1.0 / 8 * 1.25, backend="reference", return_lse=True
    )
    assert bool(torch.isfinite(out).all())
    assert bool(torch.isfinite(lse).all())
    assert lse[0, 0, 0].item() == pytest.approx(1e4 * 1.25 + math.log(5), rel=1e-6)
    torch.testing.assert_close(out[0, 0], v[0, 0].mean(0).expand(4, 8))


def test_dropout_reproducible_and_unbiased():
    q, k, v = rand_qkv(1, 2, 2, 16, 16, 8, dtype=torch.float64)
    run = lambda seed: attnkit.attention(  # noqa: E731
        q, k, v, dropout_p=0.3, generator=torch.Generator().manual_seed(seed), backend="reference"
    )
    torch.testing.assert_close(run(1), run(1), rtol=0, atol=0)
    assert not torch.equal(run(1), run(2))
    mean = torch.stack([run(s) for s in range(400)]).mean(0)
    plain = attnkit.attention(q, k, v, backend="reference")
    assert (mean - plain).abs().mean().item() < 0.03


def test_dropout_keep_fraction():
    from attnkit import _dropout

    b = torch.arange(2).view(2, 1, 1, 1)
    h = torch.arange(3).view(1, 3, 1, 1)
    i = torch.arange(64).view(1, 1, 64, 1)
    j = torch.arange(64).view(1, 1, 1, 64)
    keep = _dropout.keep_mask(12345, 0.25, b, h, i, j)
    assert keep.shape == (2, 3, 64, 64)
    assert abs(keep.float().mean().item() - 0.75) < 0.01


def test_attention_weights_rows_and_shape():
    q, k, v = rand_qkv(2, 4, 2, 7, 9, 8)
    w = attnkit.attention_weights(q, k, v, mask=masks.causal())
    assert w.shape == (2, 4, 7, 9)
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 4, 7))
    assert bool((w[..., 0, 3:] == 0).all())


def test_gradients_flow_through_score_mod_tensors():
    q, k, v = rand_qkv(1, 2, 2, 5, 5, 4, dtype=torch.float64, requires_grad=True)
    table = torch.zeros(2, 9, dtype=torch.float64, requires_grad=True)
    out = attnkit.attention(
        q, k, v, score_mod=attnkit.score_mods.relative_bias(table), backend="reference"
    )
    out.sum().backward()
    assert table.grad is not None
    assert table.grad.abs().sum() > 0


@pytest.mark.skipif(not torch.backends.mkl.is_available(), reason="torch without MKL")
def test_import_resolves_mkl_vector_math_on_one_thread():
    """``import attnkit`` first calls each VML-backed op (exp among them) on one element of
    float32 and of float64: oneMKL 2024.2 picks a function's kernel at its first call, and
    torch's threads making it together can run the low-accuracy one (pytorch/pytorch#188792;
    the reference's float64 softmax came out up to 3.3e-9 off in 4 of 60 spawns of 4 fresh
    processes, 0 of 100 with attnkit imported first)."""
    import subprocess
    import sys

    code = (
        "import torch\n"
        "seen = []\n"
        "real = torch.exp\n"
        "torch.exp = lambda t, *a: seen.append((t.numel(), str(t.dtype))) or real(t, *a)\n"
        "import attnkit\n"
        "print(seen[:2])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[(1, 'torch.float32'), (1, 'torch.float64')]", out.stderr
