"""The functional API: ``attention``, ``attention_weights``, ``dispatch``, ``backends``.

Shape legend: q (B, Hq, Lq, D), k (B, Hkv, Lk, D), v (B, Hkv, Lk, Dv), Hq % Hkv == 0.
"""

from __future__ import annotations

import contextlib
from typing import Literal, overload

import torch
from torch import Tensor

from attnkit import _dropout
from attnkit import _validation as check
from attnkit import backends as _backends
from attnkit._symbolic import surely
from attnkit._types import FULL, PARTIAL, DispatchDecision, ScoreModFn, Shapes, UnsupportedError
from attnkit.backends import cpu_kernel, reference, sdpa, tiled, triton
from attnkit.backends._common import MaskLike, Request, compute_dtype, inside_torch_func
from attnkit.block_mask import BlockMask
from attnkit.masks import Mask
from attnkit.score_mods import ScoreMod, resolve
from attnkit.sinks import apply_sinks, check_sinks, sink_probabilities

BackendName = Literal["auto", "reference", "tiled", "sdpa", "triton"]
_KNOWN = ("auto", "reference", "tiled", "sdpa", "triton")


def check_mask_kind(mask: object) -> MaskLike:
    """A mask is an attnkit Mask, a BlockMask, a bool tensor or None."""
    if isinstance(mask, Tensor):
        check.check_bool_dtype(mask)
        return mask
    if mask is None or isinstance(mask, Mask | BlockMask):
        return mask
    raise TypeError(
        "mask must be an attnkit Mask, a BlockMask, a bool tensor or None, "
        f"got {type(mask).__name__}"
    )


def _check_mask(given: object, s: Shapes) -> MaskLike:
    mask = check_mask_kind(given)
    if isinstance(mask, Tensor):
        check.check_mask_broadcasts(mask, s)
    elif isinstance(mask, Mask):
        if mask.batch not in (None, s.B):
            raise ValueError(f"mask {mask!r} is built for batch {mask.batch}, but q has B={s.B}")
        if mask.heads not in (None, s.Hq):
            raise ValueError(f"mask {mask!r} is built for {mask.heads} heads, but q has Hq={s.Hq}")
    elif isinstance(mask, BlockMask):
        if (mask.q_len, mask.kv_len) != (s.Lq, s.Lk):
            raise ValueError(
                f"BlockMask was built for (Lq, Lk) = ({mask.q_len}, {mask.kv_len}), "
                f"but q, k give ({s.Lq}, {s.Lk})"
            )
        b, h = mask.shape[:2]
        if b not in (1, s.B) or h not in (1, s.Hq):
            raise ValueError(f"BlockMask kinds {mask.shape} do not broadcast to B={s.B}, H={s.Hq}")
    return mask


def _check_score_mod(score_mod: object, s: Shapes) -> None:
    heads = score_mod.heads if isinstance(score_mod, ScoreMod) else None
    if heads not in (None, s.Hq):
        raise ValueError(f"score_mod {score_mod!r} is built for {heads} heads, but q has Hq={s.Hq}")


def autocast_dtype(t: Tensor) -> torch.dtype:
    """The dtype ``t`` computes in here, as torch.autocast decides it.

    Inside ``torch.autocast``: autocast's, for floating tensors other than float64 (which
    autocast leaves alone); else ``t``'s own. Attention inputs are cast to it, and the
    modules' KV caches hold it for their projections' outputs.
    """
    # _is_any_autocast_enabled first: ~0.2 µs, where reading t.device costs ~1 µs
    if (
        torch._C._is_any_autocast_enabled()
        and t.is_floating_point()
        and t.dtype != torch.float64
        and torch.is_autocast_enabled(t.device.type)
    ):
        return torch.get_autocast_dtype(t.device.type)
    return t.dtype


def autocast_inputs(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Cast q, k, v to ``autocast_dtype`` inside ``torch.autocast``, as torch SDPA does there.

    So every backend runs in it; the cast is differentiable, so float32 leaves get float32
    gradients.
    """
    if not torch._C._is_any_autocast_enabled() or not all(isinstance(t, Tensor) for t in (q, k, v)):
        return q, k, v  # (check_qkv names what is not a tensor)
    return q.to(autocast_dtype(q)), k.to(autocast_dtype(k)), v.to(autocast_dtype(v))


def autocast_off(q: Tensor) -> contextlib.AbstractContextManager[object]:
    """Autocast off on q's device for a backend's own math (its inputs are cast already).

    A no-op when autocast is off: entering ``torch.autocast`` costs ~10 µs, a twentieth of a
    decoding step's attention call here.
    """
    if torch._C._is_any_autocast_enabled() and torch.is_autocast_enabled(q.device.type):
        return torch.autocast(q.device.type, enabled=False)
    return _NO_CONTEXT


_NO_CONTEXT = contextlib.nullcontext()  # reusable: it holds no state


def _distinct_while_compiling(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """q, k, v as distinct tensors while torch.compile traces (``attention(x, x, x)``).

    Dynamo refuses one tensor as several inputs of an autograd.Function, which the tiled and
    triton backends run: views stand in for the repeats.
    """
    if not torch.compiler.is_compiling():
        return q, k, v
    k = k.view_as(k) if k is q else k
    v = v.view_as(v) if v is q or v is k else v
    return q, k, v


def _request(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: object,
    score_mod: ScoreMod | ScoreModFn | None,
    scale: float | None,
    dropout_p: float,
    generator: torch.Generator | None,
    return_lse: bool,
) -> Request:
    q, k, v = autocast_inputs(q, k, v)
    s = check.check_qkv(q, k, v)
    q, k, v = _distinct_while_compiling(q, k, v)
    _check_score_mod(score_mod, s)
    p = check.check_dropout(dropout_p)
    check.check_generator(generator)
    seed = _dropout.draw_seed(generator, q.device) if p > 0 else None
    return Request(
        q=q,
        k=k,
        v=v,
        shapes=s,
        mask=_check_mask(mask, s),
        score_mod=resolve(score_mod, s.Lq, s.Lk),
        score_mod_source=score_mod,
        scale=check.check_scale(scale, s.D),
        dropout_p=p,
        seed=seed,
        return_lse=return_lse,
    )


#: Whether torch's CPU kernels run at AVX-512 here; read once at import, as torch.compile does
#: not trace the capability query.
_AVX512 = torch.backends.cpu.get_cpu_capability() == "AVX512"

#: A bool *tensor* mask on CPU goes to tiled when FULL_TILE_COST × (the fraction of score pairs
#: in full tiles) + PARTIAL_TILE_COST × (the fraction in partial ones) is below 1, SDPA's
#: masked pass over every pair; empty tiles cost nothing. Partial tiles read a bitmap per
#: tile: on a random 90 % mask (every tile partial) tiled ran at 0.49-0.65x SDPA's speed from
#: N = 256 to 4096, a cost of 1.5-2.0; with full tiles (key padding, as a tensor) at
#: 1.27-1.41x, a cost of 0.71-0.79 (benchmarks/cpu_dispatch_rule.py --tables masked). Below
#: 256 tokens partial tiles cost less (tiled 1.33-1.48x on a padding tensor of 64-128 tokens,
#: 0.82-0.97x on the random one) and the rule errs towards SDPA there. That was on AVX2 (the
#: kernels' portable loops). Where torch runs at AVX-512 partial tiles cost about what full
#: ones do: the random mask ran at 1.39-1.71x SDPA's speed from N = 128 to 4096 in fp32, a cost
#: of 0.58-0.72 (on the AMX VM, once the exp pass stopped underflowing on masked scores;
#: benchmarks/results/cpu_dispatch_amx.txt's last table).
FULL_TILE_COST = 0.7
PARTIAL_TILE_COST = 0.75 if _AVX512 else 1.9

#: Up to this many queries (decoding, speculative drafts) under a bool tensor or a Mask that
#: shares no tile maps (held in tensors: documents; or a custom predicate), CPU goes to SDPA
#: with a dense mask: a model makes such a mask anew at every call, so tiled builds its tile
#: map every time. Causal & the padding of a ragged batch of 4 as a bool tensor of 4 or 16
#: queries (benchmarks/cpu_dispatch_rule.py --tables few_queries, two runs): tiled ran at
#: 0.54-0.81x SDPA's speed over 512 keys and 0.88-0.98x over 2048, 1.02-1.33x from 64. Exempt:
#: what the compiled kernels read without a map (``tiled.builds_tile_map``: a band & padding
#: Masks, a bool tensor of kept keys, key ranges: documents, varlen, prefix-LM), where tiled
#: ran at 1.23-2.88x SDPA's speed (benchmarks/cpu_padding.py) and a varlen decoding batch's
#: step at 1.1-2.4x (benchmarks/cpu_varlen.py --decode).
FEW_QUERIES = 16

#: bfloat16 inference on a CPU with AMX under a mask goes to SDPA where tiled would compute
#: at least this fraction of the score pairs: SDPA's kernel runs on the tile units, and with a
#: bool mask ran at 1.1-1.5x tiled's speed under key padding (tiled computing every tile) from
#: N = 256 to 4096, while tiled ran 1.05-1.25x under prefix_lm(N/2) (63 % of the pairs) and
#: 1.7-5.3x under sliding_window(3N/4) and two documents (benchmarks/cpu_dispatch_rule.py
#: --tables masked --masked-dtype bfloat16, benchmarks/results/cpu_dispatch_amx.txt's last).
AMX_BF16_SDPA_FROM_FRACTION = 0.8

#: Plain causal attention on CPU goes to tiled from this many (query, key) pairs B·Hq·Lq·Lk
#: (8 heads of 128²): tiled ran at 1.12-1.72x SDPA's is_causal from N = 128 to 4096 in fp32
#: and bf16, forward and forward+backward, except bf16 fwd+bwd at 4096 (0.93x); at N = 64 it
#: ran at 0.60-0.89x (1.5x for bf16 fwd+bwd), its fixed cost per call showing (AVX2). On the
#: AMX VM (AVX-512) fp32 at N = 128: 1.26-1.32x forward, 1.05-1.12x forward+backward.
TILED_CAUSAL_MIN_PAIRS = 8 * 128 * 128
#: bfloat16 training on a CPU with AMX stays on tiled up to these many (query, key) pairs per
#: head, Lq·Lk, without a mask and under plain causal: SDPA's bf16 backward costs more per call
#: there. Forward+backward, B·H = 8-32, D = 64: tiled ran at 1.02-2.32x SDPA's speed up to
#: N = 256 without a mask (0.91-1.02x at 384), 1.13-2.71x up to 512 under causal (0.93-1.11x
#: at 768); at D = 128 alike, except no mask at 256 (0.91x) (benchmarks/cpu_dispatch_rule.py
#: --tables bf16_training, benchmarks/results/cpu_dispatch_amx.txt).
AMX_BF16_TILED_TRAINING_PAIRS = 256 * 256
AMX_BF16_TILED_CAUSAL_TRAINING_PAIRS = 512 * 512
#: the dtypes the causal rule was measured in; float64 (PyTorch ops in tiled) stays on SDPA:
#: tiled ran at 0.20-0.86x its speed, no mask or causal, N = 64-4096
_CPU_KERNEL_DTYPES = (torch.float32, torch.bfloat16)


def _fast_sdpa_bf16() -> bool:
    """Whether SDPA's bfloat16 CPU kernels run on the tile units: a CPU with AMX.

    There SDPA ran causal bfloat16 at 1.5-2.2x tiled's speed forward and 1.05-1.15x
    forward+backward at N = 1024-4096 (tiled on MKL's bfloat16 GEMM too), though tiled ran
    short training faster (``AMX_BF16_TILED_TRAINING_PAIRS``). Without AMX, SDPA's bfloat16
    backward is the slow one: with no mask tiled ran 1.8-6.0x faster forward+backward at
    N = 64-4096 on a Zen 3 VM (AVX2, benchmarks/results/cpu_dispatch_avx2.txt) and 1.20-2.21x
    at N = 128-1024 at AVX-512 without AMX (emulated on the AMX VM, oneDNN and MKL kept off
    its tile units: cpu_dispatch_avx512_no_amx.txt), the forward alone at parity.
    """
    return cpu_kernel.HAS_AMX


def _fast_sdpa_fp16_forward() -> bool:
    """Whether SDPA's float16 CPU forward is faster than tiled's: where torch runs at AVX-512.

    No mask or causal, N = 64-4096: SDPA ran 1.1-2.1x faster on the AMX VM and 1.07-1.59x with
    its tile units kept off (cpu_dispatch_avx512_no_amx.txt); at AVX2 tiled ran 1.2-2.5x
    faster. Training stays on tiled (1.06-1.52x faster with AMX, 3.1-15.8x without).
    """
    return _AVX512


def _bf16_training_on_tiled(req: Request, amx: bool, amx_pairs_limit: int) -> bool:
    """Whether bfloat16 training goes to tiled, by the pairs per head (Lq·Lk).

    Without AMX at any size (causal: tiled ran 1.24-2.1x faster already at N = 64); with AMX
    up to ``amx_pairs_limit``.
    """
    return not amx or surely(req.shapes.Lq * req.shapes.Lk <= amx_pairs_limit)


def _bf16_training_reason(amx: bool) -> str:
    if amx:
        return "short bfloat16 training on a CPU with AMX: SDPA's backward costs more per call"
    return "bfloat16 with gradients on a CPU without AMX: SDPA's bf16 backward is slow here"


_NO_PAIRS = "B, Lq or Lk is 0: no (query, key) pair to score, so no kernel runs"


def _scores_without_pairs(req: Request) -> Tensor:
    """q·kᵀ (B, Hkv, Hq/Hkv, Lq, Lk) where B, Lq or Lk is 0: a product with no element."""
    s = req.shapes
    q = req.q.reshape(s.B, s.Hkv, s.Hq // s.Hkv, s.Lq, s.D)
    return q @ req.k.unsqueeze(2).transpose(-1, -2)


def _without_pairs(req: Request) -> tuple[Tensor, Tensor]:
    """The result where B, Lq or Lk is 0, as SDPA gives it: an empty output, or zeros.

    Output (B, Hq, Lq, Dv) and LSE (B, Hq, Lq) = -inf: with no key each row is fully masked
    (DESIGN §2). It is (q·kᵀ)·v over the empty dimension: autograd gives q, k and v zero
    gradients, and a NaN in q has no product to reach.
    """
    s = req.shapes
    out = (_scores_without_pairs(req) @ req.v.unsqueeze(2)).reshape(s.B, s.Hq, s.Lq, s.Dv)
    lse = torch.full(
        (s.B, s.Hq, s.Lq), float("-inf"), dtype=compute_dtype(req.q.dtype), device=req.q.device
    )
    return out, lse


def _auto(req: Request) -> DispatchDecision:
    if req.shapes.no_pairs:  # (the rules' size arithmetic divides by these)
        return DispatchDecision("reference", _NO_PAIRS)
    decision = _auto_rule(req)
    if decision.backend == "tiled" and (why := tiled.unsupported_reason(req)) is not None:
        fallback = "sdpa" if sdpa.unsupported_reason(req) is None else "reference"
        return DispatchDecision(fallback, why)  # under torch.export: a tile map
    return decision


def _auto_rule(req: Request) -> DispatchDecision:
    why_not_sdpa = sdpa.unsupported_reason(req)
    if (under_torch_func := inside_torch_func()) is not None:
        if why_not_sdpa is None:
            return DispatchDecision("sdpa", under_torch_func)
        return DispatchDecision("reference", f"{under_torch_func}; {why_not_sdpa}")
    device = req.q.device.type
    if device == "cuda" and triton.unsupported_reason(req) is None:
        if req.q.dtype != torch.float32 or why_not_sdpa is not None:
            return DispatchDecision("triton", "CUDA tensors: attnkit's Triton kernels serve it")
        return DispatchDecision(
            "sdpa", "float32 on CUDA: SDPA (the Triton kernels multiply fp32 exactly on CUDA cores)"
        )
    if why_not_sdpa is not None:
        return DispatchDecision("tiled", f"{why_not_sdpa}; tiled can, in O(N) memory")
    on_cpu = device == "cpu"
    if on_cpu and req.shapes.Dv != req.shapes.D:  # Dv last: ruff reads D as a constant
        return DispatchDecision(
            "tiled",
            "key and value head dims differ: SDPA's fused CPU kernels need them equal and it "
            "falls back to materialising every score; tiled ran 1.06-5.08x faster",
        )
    plain_causal = req.mask is not None and sdpa.is_plain_causal(
        req.mask, req.shapes.Lq, req.shapes.Lk
    )
    # decoding's causal or window mask may hide nothing: then the no-mask rules apply
    no_mask = req.mask is None or sdpa.attends_every_key(req.mask, req.shapes.Lq, req.shapes.Lk)
    if on_cpu and req.q.dtype == torch.float16 and (no_mask or plain_causal):
        if not req.needs_grad and _fast_sdpa_fp16_forward():
            return DispatchDecision(
                "sdpa", "float16 without gradients on an AVX-512 CPU: SDPA's kernel is faster"
            )
        return DispatchDecision(
            "tiled",
            "float16 on CPU: SDPA's kernel is slow for it (at AVX2, and in its backward), "
            "tiled widens tiles to fp32 in-kernel",
        )
    bf16_training = on_cpu and req.q.dtype == torch.bfloat16 and req.needs_grad
    amx = _fast_sdpa_bf16()
    slow_sdpa_training = bf16_training and not amx
    if no_mask:
        if bf16_training and _bf16_training_on_tiled(req, amx, AMX_BF16_TILED_TRAINING_PAIRS):
            return DispatchDecision("tiled", _bf16_training_reason(amx))
        return DispatchDecision("sdpa", "no mask: torch SDPA's fused kernel (tiled is no faster)")
    if plain_causal:
        limit = AMX_BF16_TILED_CAUSAL_TRAINING_PAIRS
        if bf16_training and _bf16_training_on_tiled(req, amx, limit):
            return DispatchDecision("tiled", _bf16_training_reason(amx))
        s = req.shapes
        big = not surely(s.B * s.Hq * s.Lq * s.Lk < TILED_CAUSAL_MIN_PAIRS)
        if on_cpu and req.q.dtype in _CPU_KERNEL_DTYPES and big:
            if req.q.dtype == torch.bfloat16 and amx:
                return DispatchDecision(
                    "sdpa", "causal bfloat16 on a CPU with AMX: SDPA's fused kernel runs on it"
                )
            return DispatchDecision(
                "tiled", "causal on CPU: tiled skips the upper tiles and beats SDPA's is_causal"
            )
        return DispatchDecision("sdpa", "causal: torch SDPA's fused is_causal kernel")
    if req.q.device.type != "cpu":
        return DispatchDecision("sdpa", "non-CPU tensors: SDPA with the mask as a bool tensor")
    # a bool tensor too: models make one per call, so its tile map serves one call's layers;
    # none of it where the kernels read the mask without a map (a band & padding, kept keys)
    made_anew = isinstance(req.mask, Tensor) or (
        isinstance(req.mask, Mask) and not req.mask.shares_tiles
    )
    unshared = made_anew and tiled.builds_tile_map(req)
    # not float16 (SDPA has no fast CPU kernel for it) nor where SDPA's bf16 backward is slow
    sdpa_fast = req.q.dtype != torch.float16 and not slow_sdpa_training
    if unshared and surely(req.shapes.Lq <= FEW_QUERIES) and sdpa_fast:
        return DispatchDecision(
            "sdpa",
            f"at most {FEW_QUERIES} queries under a bool tensor, a mask held in tensors or a "
            "custom predicate: tiled would build its tile map for this call alone, SDPA's "
            "masked pass over so few rows costs less",
        )
    # not while compiling: counting the tiles would fix the lengths (tiled serves it there)
    if (
        req.q.dtype == torch.bfloat16
        and not req.needs_grad
        and amx
        and not surely(req.shapes.Lq <= FEW_QUERIES)
        and not torch.compiler.is_compiling()
    ):
        computed = tiled.computed_fraction(req, tiled.default_config(req.shapes.Lq))
        if computed >= AMX_BF16_SDPA_FROM_FRACTION:
            return DispatchDecision(
                "sdpa",
                f"bfloat16 inference on a CPU with AMX: tiled would compute {computed:.0%} of "
                "the pairs, and SDPA's masked kernel on the tile units is faster",
            )
    if not isinstance(req.mask, Tensor):
        return DispatchDecision(
            "tiled",
            "a mask on CPU: tiled skips its empty tiles and runs the rest at SDPA's dense speed, "
            "while SDPA with a bool mask computes every pair, slower than without a mask",
        )
    if not unshared:  # a tensor the kernels read as it is: the same keys for every query
        if sdpa_fast and surely(req.shapes.Lq <= FEW_QUERIES) and sdpa.hides_nothing(req.mask):
            return DispatchDecision(
                "sdpa", "a bool tensor that hides no key, few queries: SDPA without a mask"
            )
        return DispatchDecision(
            "tiled",
            "a bool tensor of the keys each sequence keeps: tiled's kernels read it as they "
            "are (no tile map), skipping the tiles it empties",
        )
    # the BlockMask alone gives the work in each kind of tile (no chunk planning needed)
    bm = tiled.block_mask_for(req, tiled.default_config(req.shapes.Lq))
    full, partial = bm.area_fraction(FULL), bm.area_fraction(PARTIAL)
    cost = FULL_TILE_COST * full + PARTIAL_TILE_COST * partial
    split = f"{full:.0%} of the pairs in full tiles, {partial:.0%} in partial ones"
    if cost < 1:
        return DispatchDecision(
            "tiled", f"bool tensor, {split}: tiled's modelled cost is {cost:.2f}x SDPA's"
        )
    return DispatchDecision(
        "sdpa", f"bool tensor, {split}: SDPA's masked pass costs less ({cost:.2f}x modelled)"
    )


def _choose(req: Request, backend: str) -> DispatchDecision:
    if not isinstance(backend, str) or backend not in _KNOWN:
        raise ValueError(f"backend must be one of {', '.join(_KNOWN)}; got {backend!r}")
    if backend == "auto":
        return _auto(req)
    why = _backends.get(backend).unsupported_reason(req)
    if why is not None:
        raise UnsupportedError(f"backend {backend!r} cannot do this request: {why}")
    return DispatchDecision(backend, "named explicitly")


@overload
def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    mask: MaskLike = ...,
    score_mod: ScoreMod | ScoreModFn | None = ...,
    scale: float | None = ...,
    dropout_p: float = ...,
    generator: torch.Generator | None = ...,
    backend: BackendName = ...,
    sinks: Tensor | None = ...,
    return_lse: Literal[False] = ...,
) -> Tensor: ...
@overload
def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    mask: MaskLike = ...,
    score_mod: ScoreMod | ScoreModFn | None = ...,
    scale: float | None = ...,
    dropout_p: float = ...,
    generator: torch.Generator | None = ...,
    backend: BackendName = ...,
    sinks: Tensor | None = ...,
    return_lse: Literal[True],
) -> tuple[Tensor, Tensor]: ...
def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    mask: MaskLike = None,
    score_mod: ScoreMod | ScoreModFn | None = None,
    scale: float | None = None,
    dropout_p: float = 0.0,
    generator: torch.Generator | None = None,
    backend: BackendName = "auto",
    sinks: Tensor | None = None,
    return_lse: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Scaled dot-product attention: softmax(q·kᵀ·scale + mods, masked) · v.

    Args:
        q: queries (B, Hq, Lq, D).
        k: keys (B, Hkv, Lk, D); Hq must be a multiple of Hkv (GQA / MQA).
        v: values (B, Hkv, Lk, Dv).
        mask: an ``attnkit.masks`` Mask, a BlockMask, a bool tensor broadcastable to
            (B, Hq, Lq, Lk) with True = attend (as SDPA), or None. Patterns align
            bottom-right: query i lines up with key i + Lk - Lq.
        score_mod: ``fn(score, b, h, q_idx, kv_idx) -> score``, applied after scaling and
            before masking (``attnkit.score_mods`` has alibi, softcap, relative_bias).
        scale: multiplies q·kᵀ; default 1/sqrt(D).
        dropout_p: probability of dropping an attention weight (counter-based, reproducible).
        generator: draws the dropout seed; the same generator state gives the same dropout.
        backend: "auto", "reference", "tiled", "sdpa" or "triton". A named backend that
            cannot do the request raises ``UnsupportedError``; "auto" follows ``dispatch``.
        sinks: attention sinks (Hq,), one logit per query head that joins every row's
            softmax with no value (gpt-oss; ``attnkit.sinks``). Needs a backend that
            returns the LSE (not SDPA).
        return_lse: also return the log-sum-exp of each row's scores (sinks included).

    Returns:
        out (B, Hq, Lq, Dv) in q's dtype, and with ``return_lse`` also lse (B, Hq, Lq)
        float32 (float64 for float64 inputs), natural log. A fully masked row gives zeros and
        lse = -inf. Inside ``torch.autocast`` inputs other than float64 are first cast to
        autocast's dtype, as torch SDPA does there, whichever backend serves the call.

    Raises:
        ValueError, TypeError: bad shapes, dtypes, devices, mask or arguments (named).
        UnsupportedError: the named backend cannot do this request.
    """
    need_lse = check.check_flag("return_lse", return_lse) or sinks is not None
    req = _request(q, k, v, mask, score_mod, scale, dropout_p, generator, need_lse)
    if sinks is not None:
        check_sinks(sinks, req.shapes.Hq, q.device)
        if backend == "sdpa":
            raise UnsupportedError(
                "backend 'sdpa' cannot apply sinks: they rescale the output by its "
                "log-sum-exp, which torch SDPA does not return"
            )
    decision = _choose(req, backend)
    with autocast_off(q):  # a backend's own float32 math stays float32
        run = _without_pairs if req.shapes.no_pairs else _backends.get(decision.backend).run
        out, lse = run(req)
        if sinks is not None:
            assert lse is not None
            out, lse = apply_sinks(out, lse, sinks)
    if return_lse:
        assert lse is not None
        return out, lse
    return out


def attention_weights(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    mask: MaskLike = None,
    score_mod: ScoreMod | ScoreModFn | None = None,
    scale: float | None = None,
    sinks: Tensor | None = None,
) -> Tensor:
    """The attention probabilities, materialised (for inspection and visualisation).

    Args: as ``attention`` (q (B, Hq, Lq, D), k (B, Hkv, Lk, D), v (B, Hkv, Lk, Dv)).

    Returns:
        (B, Hq, Lq, Lk) float32 (float64 for float64 inputs); each row sums to 1, or to 0
        when the mask leaves it no key; with ``sinks``, to less than 1 (the rest is the
        sink's weight).
    """
    req = _request(q, k, v, mask, score_mod, scale, 0.0, None, False)
    if req.shapes.no_pairs:  # (B, Hq, Lq, Lk) holds no element
        s = req.shapes
        return _scores_without_pairs(req).reshape(s.B, s.Hq, s.Lq, s.Lk).to(compute_dtype(q.dtype))
    with autocast_off(q):
        probs, lse = reference.probabilities(req)
        if sinks is not None:
            check_sinks(sinks, req.shapes.Hq, q.device)
            probs = sink_probabilities(probs, lse, sinks)
    return probs


def dispatch(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    mask: MaskLike = None,
    score_mod: ScoreMod | ScoreModFn | None = None,
    dropout_p: float = 0.0,
    sinks: Tensor | None = None,
    return_lse: bool = False,
) -> DispatchDecision:
    """The backend ``attention(..., backend="auto")`` would pick for these inputs, and why.

    Rule (measured on CPU, see README "Performance"):

    -  Inside a torch.func transform (grad, vjp, jacrev, vmap): sdpa, or reference where SDPA
       cannot do it (the tiled and triton backends' fused kernels do not compose with them).
    0. CUDA tensors that the Triton kernels support: triton, except float32 that SDPA can
       serve (exact fp32 dots run on CUDA cores and spill registers; see the launcher).
    1. SDPA cannot do it (score_mod, return_lse or sinks, dropout): tiled. On CPU, also
       key and value head dims that differ (D != Dv, as MLA's 192 / 128): SDPA's fused
       CPU kernels need them equal and it falls back to its O(N²) math path (tiled ran
       1.06-5.08x faster, forward and forward+backward, N = 128-2048,
       ``--tables head_dims``; over three runs 0.85-6.2x, the slow end unmasked fwd+bwd).
    2. No mask, or a mask whose spec shows it hides no key (``full()``; one query under
       bottom-right causal, or under a window reaching the first key, as decoding): SDPA
       (torch's fused kernel; tiled runs at 0.55-1.8x its speed, with no consistent
       winner), except float16 on CPU: tiled (SDPA has no fast float16 CPU kernel at AVX2:
       tiled ran 1.2-8.6x faster, N = 64-4096, forward and forward+backward; at AVX-512 only
       float16 that needs gradients), and bfloat16 needing gradients on a CPU without AMX:
       tiled (SDPA's bf16 backward is slow there: tiled 1.2-6.0x faster forward+backward).
    3. Plain causal: on CPU in float16 (1.7-9.8x SDPA's speed) or in float32/bfloat16 with at
       least ``TILED_CAUSAL_MIN_PAIRS`` (query, key) pairs, tiled (it skips the upper tiles),
       and at any size for bfloat16 training where rule 2 sends it to tiled; otherwise
       SDPA's is_causal.
    4. Any other Mask or BlockMask on CPU: tiled, except up to ``FEW_QUERIES`` queries
       under a Mask that shares no tile maps (``Mask.shares_tiles``) and that the compiled
       kernels cannot take without one (they take a band & padding): SDPA, since a model
       makes such masks anew each call. A bool tensor mask on CPU that varies over neither
       heads nor queries (one query's, a (B, 1, 1, Lk) padding: ``tiled.kept_keys``): tiled,
       whose kernels read it without a tile map, or SDPA without a mask where it is all
       True and the queries few. Any other bool tensor: as an unshared Mask up to
       ``FEW_QUERIES`` queries (with no mask where it is all True), then tiled when its
       tiles' modelled cost (``FULL_TILE_COST``, ``PARTIAL_TILE_COST``) is below SDPA's.
       Otherwise (and on other devices): SDPA with a bool mask.
    5. Under torch.export, what rules 1-4 give tiled that would need a tile map (any mask but
       causal and sliding-window ones, & padding): SDPA with a bool mask (reference where
       SDPA cannot).

    On a CPU with AMX (SDPA's bfloat16 kernels run on its tile units): causal bfloat16 and
    bfloat16 inference under a mask tiled would mostly compute (``AMX_BF16_SDPA_FROM_FRACTION``)
    go to SDPA; bfloat16 training goes to tiled only for short sequences
    (``AMX_BF16_TILED_TRAINING_PAIRS`` per head without a mask,
    ``AMX_BF16_TILED_CAUSAL_TRAINING_PAIRS`` under causal).

    Sizes that torch.compile or torch.export keep symbolic take, without a guard, the branch
    for long sequences (rules 3 and 4) unless their range decides it (``attnkit._symbolic``).

    ``python benchmarks/cpu_dispatch_rule.py`` measures each case on the machine at hand.
    """
    need_lse = check.check_flag("return_lse", return_lse) or sinks is not None
    req = _request(q, k, v, mask, score_mod, None, dropout_p, None, need_lse)
    return _auto(req)


def backends() -> list[str]:
    """Names of the backends available here (besides "auto")."""
    return _backends.names()
