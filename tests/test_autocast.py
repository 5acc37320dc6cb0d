"""Inside torch.autocast: attention runs in autocast's dtype on every backend, as torch SDPA
does there, and the modules' KV caches hold that dtype."""

from __future__ import annotations

import pytest
import torch

import attnkit
from attnkit import masks
from attnkit.nn import CausalLM
from conftest import TRITON_DEVICE, needs_triton_device
from test_transformer import positions_kwargs

BACKENDS = ["auto", "reference", "tiled", "sdpa", pytest.param("triton", marks=needs_triton_device)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_attention_inside_autocast_equals_attention_on_inputs_cast_by_hand(backend, dtype):
    """The same output, bit for bit, as casting float32 leaves to autocast's dtype first, and
    the same float32 gradients; float64 inputs are left alone, as autocast leaves them."""
    device = TRITON_DEVICE if backend == "triton" else "cpu"
    torch.manual_seed(0)
    leaves = [torch.randn(2, 4, n, 32, device=device, requires_grad=True) for n in (17, 23, 23)]
    kwargs = {"mask": masks.causal(), "backend": backend}
    if backend != "sdpa":
        kwargs["sinks"] = torch.randn(4, device=device)
    with torch.autocast(device, dtype=dtype):
        out = attnkit.attention(*leaves, **kwargs)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, leaves, grad)
    cast_by_hand = [t.to(dtype) for t in leaves]
    expected = attnkit.attention(*cast_by_hand, **kwargs)
    assert out.dtype == dtype
    assert all(g.dtype == torch.float32 for g in got)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    for g, e in zip(got, torch.autograd.grad(expected, leaves, grad), strict=True):
        torch.testing.assert_close(g, e, rtol=0, atol=0)

    if backend != "triton":  # (its kernels take no float64)
        doubles = [t.detach().double() for t in leaves]
        with torch.autocast(device, dtype=dtype):
            assert attnkit.attention(*doubles, **kwargs).dtype == torch.float64


@pytest.mark.parametrize("positions", ["rope", "latent", "differential"])
def test_cached_decoding_under_autocast_is_as_close_to_float32_as_the_full_pass(positions):
    """Inside torch.autocast the projections output bfloat16, so new_caches() holds bfloat16;
    decoding over it lands as near the float32 model as the bfloat16 full pass (DESIGN §7)."""
    torch.manual_seed(0)
    lm = CausalLM(
        30, d_model=32, nhead=4, num_layers=2, max_len=32, **positions_kwargs(positions)
    ).eval()
    ids = torch.randint(0, 30, (2, 12))
    with torch.no_grad():
        exact, _ = lm(ids)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            full, _ = lm(ids)
            caches = lm.new_caches(2, 12)
            first, _ = lm(ids[:, :5], caches=caches)
            rest = [lm(ids[:, t : t + 1], start=t, caches=caches)[0] for t in range(5, 12)]
    assert {c.keys.dtype for c in caches} == {torch.bfloat16}
    cached = torch.cat([first, *rest], dim=1).float()
    full_error = (full.float() - exact).abs().max()
    assert (cached - exact).abs().max() <= 2 * full_error + 1e-5
