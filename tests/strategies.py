"""Hypothesis strategies for whole attention requests: shapes, a mask built from the pattern
library and its combinators, a score mod and a dtype, checked against the float64 reference.

Shared by the CPU backends' property test and the Triton one (``tests/test_triton.py``).
"""

from __future__ import annotations

import torch
from hypothesis import strategies as st

import attnkit
from attnkit import masks, score_mods
from conftest import assert_close_scaled

ALIGNS = st.sampled_from(["bottom_right", "top_left"])


@st.composite
def _pattern(draw, B: int, Lq: int, Lk: int):
    """One mask of the pattern library (or a bool tensor), valid for these lengths."""
    kind = draw(
        st.sampled_from(
            [
                "causal",
                "window",
                "dilated",
                "strided",
                "fixed",
                "prefix_lm",
                "global",
                "padding",
                "padding_mask",
                "document",
                "key_ranges",
                "bigbird",
                "block_sparse",
                "dense",
                "tensor",
            ]
        )
    )
    seed = draw(st.integers(0, 2**16))
    gen = torch.Generator().manual_seed(seed)
    if kind == "causal":
        return masks.causal(align=draw(ALIGNS))
    if kind == "window":
        left, right = draw(st.integers(-1, 40)), draw(st.integers(-1, 20))
        return masks.sliding_window(left, right, align=draw(ALIGNS))
    if kind == "dilated":
        return masks.dilated(draw(st.integers(1, 20)), draw(st.integers(1, 4)))
    if kind == "strided":
        return masks.strided(draw(st.integers(1, 12)), align=draw(ALIGNS))
    if kind == "fixed":
        block = draw(st.integers(1, 20))
        return masks.fixed(block, draw(st.integers(0, block)), align=draw(ALIGNS))
    if kind == "prefix_lm":
        return masks.prefix_lm(draw(st.integers(0, Lk + 2)), align=draw(ALIGNS))
    if kind == "global":
        return masks.global_tokens(
            sorted(draw(st.sets(st.integers(0, Lk - 1), min_size=1, max_size=3)))
        )
    if kind == "padding":
        return masks.key_padding(draw(st.lists(st.integers(0, Lk), min_size=B, max_size=B)))
    if kind == "padding_mask":
        return masks.from_padding_mask(torch.rand(B, Lk, generator=gen) < 0.7)
    if kind == "document" and Lq <= Lk:
        return masks.document(torch.randint(0, 3, (Lk,), generator=gen).sort().values)
    if kind == "key_ranges":  # some rows keep none (first > last)
        first = torch.randint(0, Lk, (B, Lq), generator=gen)
        return masks.key_ranges(first, first + torch.randint(-3, Lk, (B, Lq), generator=gen))
    if kind == "bigbird" and Lq <= Lk:
        return masks.bigbird(draw(st.sampled_from([4, 8, 16])), 1, 1, 1, seed=seed)
    if kind == "block_sparse":
        block = draw(st.sampled_from([4, 16]))
        layout = torch.rand(-(-Lq // block), -(-Lk // block), generator=gen) < 0.5
        return masks.block_sparse(layout, block)
    if kind == "dense":
        return masks.from_dense(torch.rand(Lq, Lk, generator=gen) < 0.5)
    # "tensor", and document / bigbird where Lq > Lk (they need Lq <= Lk)
    return torch.rand(B, 1, Lq, Lk, generator=gen) < draw(st.floats(0.0, 1.0))


@st.composite
def _band(draw):
    """Causal, a window, or both: the masks most models use (the kernels compute their band)."""
    causal = masks.causal(align=draw(ALIGNS))
    window = masks.sliding_window(draw(st.integers(0, 40)), draw(st.integers(-1, 8)))
    return draw(st.sampled_from([causal, window, causal & window]))


@st.composite
def _padded_band(draw, B: int, Lk: int):
    """A band & a batch's padding, as models attend (the CPU kernels read its kept keys)."""
    if draw(st.booleans()):
        padding = masks.key_padding(draw(st.lists(st.integers(0, Lk), min_size=B, max_size=B)))
    else:
        gen = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
        valid = torch.rand(B, Lk, generator=gen) < 0.7
        valid[:, : draw(st.integers(0, Lk))] = False  # left padding
        padding = masks.from_padding_mask(valid)
    return draw(_band()) & padding


def any_mask(B: int, Lq: int, Lk: int):
    """No mask, a band, a band & padding, a pattern, or &, |, ~ of patterns."""
    leaf = _pattern(B, Lq, Lk).filter(lambda m: isinstance(m, masks.Mask))
    combined = st.one_of(
        st.tuples(leaf, leaf).map(lambda ab: ab[0] & ab[1]),
        st.tuples(leaf, leaf).map(lambda ab: ab[0] | ab[1]),
        leaf.map(lambda a: ~a),
    )
    return st.one_of(st.none(), _band(), _padded_band(B, Lk), _pattern(B, Lq, Lk), combined)


SCORE_MODS = {
    "none": lambda H: None,
    "alibi": lambda H: score_mods.alibi(score_mods.alibi_slopes(H)),
    "softcap": lambda H: score_mods.softcap(5.0),
    "alibi+softcap": lambda H: score_mods.compose(
        score_mods.alibi(score_mods.alibi_slopes(H)), score_mods.softcap(10.0)
    ),
    "alibi(offset=-7)": lambda H: score_mods.alibi(score_mods.alibi_slopes(H), offset=-7),
}


@st.composite
def requests(
    draw,
    lengths=(1, 2, 17, 33, 64, 100, 129),
    head_dims=(8, 16, 40, 59, 64),
    score_mods=True,
    dropout=True,
):
    """One random attention request (``score_mods`` / ``dropout`` False: without them).

    Returns:
        (B, Hq, Hkv, Lq, Lk, D, Dv), dtype, and the keyword arguments of ``attnkit.attention``:
        mask, score_mod, scale (None or another), sinks (None or (Hq,) logits), dropout_p
        (attnkit's counter-based dropout: the same seed drops the same weights everywhere).
    """
    B, Hkv = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    Hq = Hkv * draw(st.integers(1, 3))
    Lq = draw(st.sampled_from(lengths))
    Lk = draw(st.one_of(st.just(Lq), st.sampled_from(lengths)))
    D = draw(st.sampled_from(head_dims))
    Dv = draw(st.sampled_from([D, 24]))
    kwargs = {
        "mask": draw(any_mask(B, Lq, Lk)),
        "score_mod": SCORE_MODS[draw(st.sampled_from(list(SCORE_MODS)))](Hq)
        if score_mods
        else None,
        "scale": draw(st.one_of(st.none(), st.floats(0.05, 1.0))),
        "sinks": draw(st.one_of(st.none(), st.just(torch.linspace(-2.0, 2.0, Hq)))),
        "dropout_p": draw(st.sampled_from([0.0, 0.0, 0.0, 0.2])) if dropout else 0.0,
    }
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
    return (B, Hq, Hkv, Lq, Lk, D, Dv), dtype, kwargs


def _flash_rowsum_error(q, k, v, kwargs, dout):
    """c (B, Hq, Lq): how far a flash backward's rowsum(dO∘O) is from the exact one.

    Flash backward passes (tiled's, triton's, FlashAttention-2's; torch SDPA's on CPU errs
    alike) take dS = P ∘ (dP − rowsum(dO∘O)), with O the output as stored (16 bits in 16-bit
    runs) and the rowsum in float32; the reference's autograd takes Σ_j P_j·dP_j instead. dS
    then differs by P·c: the gradient of c·LSE, which the reference gets added. With few keys
    per row (dS's terms cancel: with one key, dS is exactly 0 in the reference, not in a
    flash pass) this alone took them to 5-9x the reference's gradient error.

    With sinks, the kernels store the output over the real keys (``apply_sinks`` scales it
    after): its rounding is the one to take. The seed on LSE' = logaddexp(lse, sink) is then
    c / share, and dO reaches the kernel as share·dO: the shares cancel.
    """
    pre = kwargs | {"sinks": None}  # (the same dropout seed, so the same dropped pairs)
    with torch.no_grad():
        stored, exact = (
            attnkit.attention(
                *(t.to(dtype) for t in (q, k, v)),
                **pre,
                generator=torch.Generator().manual_seed(1),
                backend="reference",
            )
            for dtype in (q.dtype, torch.float64)
        )
    seed = dout.to(q.dtype)  # what dP and the rowsum both take
    flash = (seed.float() * stored.float()).sum(-1).double()
    return ((seed.double() * exact).sum(-1) - flash).to(torch.promote_types(q.dtype, torch.float32))


def check_against_reference(shape, dtype, kwargs, backend, device="cpu", with_lse=True):
    """DESIGN §7 for one request: out and LSE within 2x, dq/dk/dv within 4x the error of the
    reference run in ``dtype``, against float64; -inf LSE exactly on the reference's keyless rows
    (``with_lse=False`` for backends that do not return it: SDPA).

    In 16 bits the floor is one unit of the dtype at the largest value. The reference's
    gradients take rowsum(dO∘O) as flash backward passes do (``_flash_rowsum_error``).

    Returns False where ``backend`` refuses the request (``UnsupportedError``), else True.
    """
    B, Hq, Hkv, Lq, Lk, D, Dv = shape
    gen = torch.Generator().manual_seed(0)
    q64, k64, v64, dout = (
        torch.randn(*s, dtype=torch.float64, generator=gen).to(device)
        for s in ((B, Hq, Lq, D), (B, Hkv, Lk, D), (B, Hkv, Lk, Dv), (B, Hq, Lq, Dv))
    )
    kwargs = {n: x.to(device) if isinstance(x, torch.Tensor) else x for n, x in kwargs.items()}
    results = {}
    for name, run_dtype, run_backend in (
        ("fast", dtype, backend),
        ("ref64", torch.float64, "reference"),
        ("low", dtype, "reference"),
    ):
        q, k, v = (t.to(run_dtype).requires_grad_() for t in (q64, k64, v64))
        lse_too = with_lse or run_backend == "reference"
        generator = torch.Generator().manual_seed(1)  # each run draws the same dropout seed
        try:
            got = attnkit.attention(
                q, k, v, **kwargs, generator=generator, backend=run_backend, return_lse=lse_too
            )
        except attnkit.UnsupportedError:
            assert run_backend != "reference"
            return False
        out, lse = got if lse_too else (got, None)
        outputs, seeds = [out], [dout.to(run_dtype)]
        if name == "low":
            outputs, seeds = [out, lse], [*seeds, _flash_rowsum_error(q, k, v, kwargs, dout)]
        grads = torch.autograd.grad(outputs, (q, k, v), seeds)
        results[name] = (out, lse, *grads)
    for i, what in enumerate(("output", "lse", "dq", "dk", "dv")):
        got, want, low = (results[n][i] for n in ("fast", "ref64", "low"))
        if got is None:
            continue
        if what == "lse":  # -inf exactly where the reference has a row without keys
            finite = torch.isfinite(want)
            assert torch.equal(torch.isfinite(got), finite), "LSE: -inf on other rows"
            got, want, low = got[finite], want[finite], low[finite]
            if not finite.any():
                continue
        mult = 2.0 if what in ("output", "lse") else 4.0
        floor = 2e-5
        if got.dtype != torch.float32:  # stored in 16 bits: a hair's difference before the
            # last rounding can land one unit away from the reference's, which rounded too
            floor = max(floor, torch.finfo(got.dtype).eps * want.abs().max().item())
        assert_close_scaled(got, want, low, mult=mult, floor=floor, what=what)
    return True
