"""Random MultiHeadAttention configurations and calls on each backend vs the reference.

Each example draws a module (heads, GQA/MQA, self- or cross-attention with its own kdim,
bias, QK-norm, V-norm, sinks, output gate, a module mask, a score mod, RoPE, batch_first) and
a call (a mask or bool tensor, torch's key_padding_mask, need_weights). In float32 on
``backend``, its output, weights and the gradients of its inputs and of every parameter must
stay within DESIGN §7's bounds of the same module on the reference backend. This covers what
lies between the modules and the kernels: masks combined with padding, weights, layouts.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import event, given, settings
from hypothesis import strategies as st

import attnkit
from attnkit.masks import Mask
from attnkit.nn import MultiHeadAttention, RotaryEmbedding
from conftest import assert_close_scaled
from strategies import SCORE_MODS, any_mask


@st.composite
def module_calls(draw, lse_free=False):
    """A module: (E, H, its keyword arguments, rope?); a call: (B, Lq, Lk, cross?, kwargs).

    ``lse_free``: without sinks and score mods (what torch SDPA cannot serve).
    """
    H = draw(st.sampled_from([1, 2, 4]))
    E, head_dim = draw(st.sampled_from([8, 24])), draw(st.sampled_from([4, 8, 12]))
    cross = draw(st.booleans())
    B, Lq = draw(st.integers(1, 3)), draw(st.integers(1, 40))
    Lk = draw(st.integers(1, 40)) if cross else Lq
    kdim = draw(st.sampled_from([None, 6])) if cross else None
    config = {
        "num_kv_heads": draw(st.sampled_from([h for h in (1, 2, 4) if H % h == 0])),
        "head_dim": head_dim,
        "kdim": kdim,
        "vdim": kdim,
        "bias": draw(st.booleans()),
        "qk_norm": draw(st.sampled_from([False, "rms", "layer"])),
        "v_norm": draw(st.booleans()),
        "sinks": not lse_free and draw(st.booleans()),
        "output_gate": draw(st.booleans()),
        "batch_first": draw(st.booleans()),
        "mask": draw(any_mask(B, Lq, Lk).filter(lambda m: m is None or isinstance(m, Mask))),
        "score_mod": None if lse_free else SCORE_MODS[draw(st.sampled_from(list(SCORE_MODS)))](H),
    }
    rope = not cross and draw(st.booleans())
    padding = None
    if draw(st.booleans()):
        seed = draw(st.integers(0, 2**16))
        padding = torch.rand(B, Lk, generator=torch.Generator().manual_seed(seed)) < 0.3
    call = {
        "mask": draw(any_mask(B, Lq, Lk)),
        "key_padding_mask": padding,
        "need_weights": draw(st.booleans()),
    }
    return (E, H, config, rope), (B, Lq, Lk, cross, call)


def run(module, x, memory, call):
    """Output, weights, and the gradients of x, memory and every parameter."""
    x, memory = (None if t is None else t.clone().requires_grad_() for t in (x, memory))
    out, weights = module(x, memory, memory, **call)
    leaves = [t for t in (x, memory) if t is not None] + list(module.parameters())
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(2), dtype=out.dtype)
    return [out, weights, *torch.autograd.grad(out, leaves, dout, allow_unused=True)]


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["tiled", "sdpa", "auto"])
@settings(max_examples=150)
@given(data=st.data())
def test_random_modules_match_the_reference_backend(backend, data):
    drawn = data.draw(module_calls(lse_free=backend == "sdpa"), label="module and call")
    (E, H, config, rope), (B, Lq, Lk, cross, call) = drawn
    torch.manual_seed(0)
    state = MultiHeadAttention(E, H, **config).state_dict()
    if config["sinks"]:
        state["sinks"] = torch.linspace(-2.0, 2.0, H)

    def module(dtype, backend):
        rotary = RotaryEmbedding(config["head_dim"]) if rope else None
        m = MultiHeadAttention(E, H, **config, rope=rotary, backend=backend)
        m.load_state_dict(state)
        return m.to(dtype).eval()

    gen = torch.Generator().manual_seed(1)
    x = torch.randn(B, Lq, E, generator=gen, dtype=torch.float64)
    memory = None
    if cross:
        memory = torch.randn(B, Lk, config["kdim"] or E, generator=gen, dtype=torch.float64)
    if not config["batch_first"]:
        x, memory = (None if t is None else t.transpose(0, 1) for t in (x, memory))
    results = {}
    for name, dtype, run_backend in (
        ("fast", torch.float32, backend),
        ("ref64", torch.float64, "reference"),
        ("low", torch.float32, "reference"),
    ):
        inputs = (None if t is None else t.to(dtype) for t in (x, memory))
        try:
            results[name] = run(module(dtype, run_backend), *inputs, call)
        except attnkit.UnsupportedError:
            assert run_backend != "reference"
            event(f"{backend} refused it")
            return
    for i, (got, want, low) in enumerate(zip(*results.values(), strict=True)):
        if want is None:  # weights not asked for, or a parameter this call does not reach
            assert got is None
            continue
        mult = 2.0 if i < 2 else 4.0  # output and weights; gradients
        assert_close_scaled(got, want, low, mult=mult, floor=2e-5, what=f"result {i}")
