"""Delegate to ``torch.nn.functional.scaled_dot_product_attention``.

Used where SDPA can express the request: no mask, causal, or any mask as a dense bool
tensor. It cannot return the LSE, apply a score_mod, or draw attnkit's reproducible dropout,
and says so.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from attnkit._symbolic import surely
from attnkit.backends._common import Request, dense_mask, inside_torch_func
from attnkit.masks import Mask, lookback

NAME = "sdpa"


def unsupported_reason(req: Request) -> str | None:
    """Why SDPA cannot serve ``req``, or None when it can."""
    if req.return_lse:
        return "torch SDPA does not return the log-sum-exp (return_lse=True)"
    if req.score_mod is not None:
        return "torch SDPA cannot apply a score_mod"
    if req.seed is not None:
        return (
            "torch SDPA draws dropout from the global RNG; attnkit's reproducible "
            "counter-based dropout needs backend 'reference' or 'tiled'"
        )
    return None


def is_plain_causal(mask: object, Lq: int, Lk: int) -> bool:
    """SDPA's is_causal is top-left aligned; bottom-right causal equals it when Lq == Lk."""
    if not isinstance(mask, Mask) or mask.spec is None or mask.spec[0] != "causal":
        return False
    return mask.spec[1] == "top_left" or surely(Lq == Lk)


def attends_every_key(mask: object, Lq: int, Lk: int) -> bool:
    """Whether the mask's spec shows it hides no key.

    True for ``full()``, and for one query (KV-cache decoding) under bottom-right causal or
    under a bottom-right window that reaches the first key (``KVCache(window=w)`` holds just
    the window that ``sliding_window(w)`` needs).
    """
    if not isinstance(mask, Mask) or mask.spec is None:
        return False
    if mask.spec == ("full",):
        return True
    # one query sits at the last key, and these patterns attend an unbroken run back from it
    if not surely(Lq == 1) or mask.spec[0] not in ("causal", "sliding_window"):
        return False
    reach = lookback(mask)  # None unless bottom-right aligned
    return reach is not None and surely(Lk <= reach + 1)


def hides_nothing(allowed: Tensor) -> bool:
    """Whether a CPU bool mask is all True.

    Not checked elsewhere: it would sync the device, and it would break a compiled graph.
    """
    if allowed.device.type != "cpu" or torch.compiler.is_compiling():
        return False
    return bool(allowed.all())


#: Fold grouped query heads into rows for one query when at least this many share a kv head.
FOLD_MIN_GROUP = 4


def _sdpa(req: Request, attn_mask: Tensor | None = None) -> Tensor:
    """torch SDPA with ``attn_mask`` (bool, broadcastable; None: no mask), GQA included.

    One query on CPU whose kv heads each serve at least ``FOLD_MIN_GROUP`` query heads,
    under a mask that is the same for every head, runs as rows of one head: the G heads of a
    kv head become G query rows (one query's position is theirs all), one small matrix
    product per kv head instead of G matrix-vector ones that each read the keys.
    ``benchmarks/cpu_dispatch_rule.py --tables gqa_fold``: 1.10-1.86x torch's enable_gqa
    without a mask (G = 4 and 8, D = 64 and 128, 1024 and 4096 keys; 0.95-2.09x over four
    runs) and 1.03-2.26x under a ragged batch's padding mask, while folding G = 2 ran at
    0.60-0.94x and 4 queries at 0.87-1.44x, so they are not folded.
    """
    s = req.shapes
    G = s.Hq // s.Hkv
    per_head = attn_mask is not None and attn_mask.dim() >= 3 and attn_mask.shape[-3] != 1
    if s.Lq != 1 or G < FOLD_MIN_GROUP or not req.q.is_cpu or per_head:
        return F.scaled_dot_product_attention(
            req.q, req.k, req.v, attn_mask=attn_mask, scale=req.scale, enable_gqa=G > 1
        )
    rows = req.q.reshape(s.B, s.Hkv, G, s.D)
    out = F.scaled_dot_product_attention(rows, req.k, req.v, attn_mask=attn_mask, scale=req.scale)
    return out.view(s.B, s.Hq, 1, s.Dv)


#: torch's CPU kernel finds a row's max with scalar code below one vector of float lanes
#: (16 at AVX-512, 8 at AVX2), which drops NaN: a NaN query row comes out as zeros, like a
#: fully masked row (pytorch/pytorch#141128). Below this many keys, eager calls make such
#: rows NaN.
SCALAR_ROW_MAX_BELOW = 16


def _keep_nan_query_rows(out: Tensor, req: Request) -> Tensor:
    """``out`` with the rows of NaN queries NaN, as every other backend gives them.

    Their gradients are NaN already: SDPA's backward does not drop the NaN.
    """
    if torch.compiler.is_compiling():  # eager only: a length test would guard the graph
        return out
    if not req.q.is_cpu or req.shapes.Lk >= SCALAR_ROW_MAX_BELOW:
        return out
    # one sum finds any NaN (2-7 µs; the search by rows, 3-60) where a branch on data may be
    # taken: torch.func's transforms (vmap) refuse it, so there the search always runs
    if inside_torch_func() is None and not req.q.sum().isnan():
        return out
    nan_rows = req.q.isnan().any(dim=-1, keepdim=True)  # (B, Hq, Lq, 1)
    return out.masked_fill(nan_rows, float("nan"))


def run(req: Request) -> tuple[Tensor, None]:
    """Output (B, Hq, Lq, Dv) in q's dtype; fully masked rows are zeros."""
    s = req.shapes
    if is_plain_causal(req.mask, s.Lq, s.Lk):
        out = F.scaled_dot_product_attention(
            req.q, req.k, req.v, is_causal=True, scale=req.scale, enable_gqa=s.Hq != s.Hkv
        )
        return _keep_nan_query_rows(out, req), None
    allowed = (
        None if attends_every_key(req.mask, s.Lq, s.Lk) else dense_mask(req.mask, s, req.q.device)
    )
    if allowed is not None and hides_nothing(allowed):
        allowed = None  # SDPA with a bool mask takes a slower kernel than without one
    if allowed is None:
        return _keep_nan_query_rows(_sdpa(req), req), None
    # SDPA turns a fully masked row into NaN (and NaN gradients). Let such rows attend
    # everywhere, then zero their output: the zeroing also zeroes their gradient.
    dead = ~allowed.any(dim=-1, keepdim=True)
    out = _keep_nan_query_rows(_sdpa(req, allowed | dead), req)
    return out.masked_fill(dead, 0.0), None
